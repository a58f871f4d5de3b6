"""The one worker pool and the one way to stop (used by the request engine, realign/engine.py).

Every stage stops the same way. SIGINT (Ctrl-C) and SIGTERM (Slurm's ``scancel``,
preemption, ``kill``) stop new requests from starting; the requests already on their way
may finish for :data:`STOP_GRACE` seconds and are saved as usual; then the script writes
what it has and exits 130. A second signal cancels what is still in flight at once. A
rerun repeats at most the requests that were in flight (and with the request cache not
even those of them that had been answered).

The other reasons to stop starting requests go through the same :class:`Stopper`: the
spending cap (``--max_cost``) and an error that will not heal (the requests in flight
then finish too: they were paid for).
"""

import asyncio
import contextlib
import logging
import signal
import threading
import time


logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE = 10.0  # seconds the requests in flight may still take after a stop signal
DUPLICATE_SIGNAL_WINDOW = 1.0  # a second signal sooner than this is the same stop, not "stop at once"


class Stopped(Exception):
    """Raised instead of starting a request once the run is stopping."""


class Stopper:
    """Why the run is stopping (None while it is not): "signal", "budget" or "error"."""

    def __init__(self):
        self.reason = None
        self.message = None
        self.signals = 0
        self._first_signal = 0.0
        self._event = threading.Event()
        self._loops = []
        self._on_hard_stop = []

    def is_set(self):
        return self._event.is_set()

    def stop(self, reason, message=None):
        """Stop starting new work (the first reason given is kept)."""
        if self.reason is None:
            self.reason = reason
            self.message = message
        self._event.set()
        for loop, callback in list(self._loops):
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop is closed
                pass

    @property
    def interrupted(self):
        return self.reason == "signal"

    def requests_blocked(self):
        """Whether requests already admitted must not be sent (or retried) either: a signal
        or an error, not a budget stop."""
        return self._event.is_set() and self.reason != "budget"

    def _handle_signal(self, signum, _frame):
        now = time.monotonic()
        if self.signals and now - self._first_signal < DUPLICATE_SIGNAL_WINDOW:
            return  # the same stop told twice (scancel signals every process, and the launcher passes it on)
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self._first_signal = now
            logger.warning("%s: no new requests; saving what finishes within %.0f s (again to stop at once)",
                           name, STOP_GRACE)
            self.stop("signal", f"stopped by {name}")
        else:
            logger.warning("%s again: cancelling the requests in flight", name)
            for callback in list(self._on_hard_stop):
                callback()

    def on_hard_stop(self, callback):
        """Call ``callback()`` on a second signal, until :meth:`forget_hard_stop` (an event
        loop's callback must go with its loop, or a later signal would call a closed loop)."""
        self._on_hard_stop.append(callback)
        return callback

    def forget_hard_stop(self, callback):
        with contextlib.suppress(ValueError):
            self._on_hard_stop.remove(callback)

    @contextlib.contextmanager
    def signals_handled(self):
        """Handle SIGINT and SIGTERM as a stop while the block runs (main thread only); the
        handlers that were there before are put back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle_signal) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _attach(self, loop, callback):
        entry = (loop, callback)
        self._loops.append(entry)
        return entry

    def _detach(self, entry):
        with contextlib.suppress(ValueError):
            self._loops.remove(entry)


async def sleep_unless_stopped(stopper, seconds):
    """Sleep, waking up at once when a signal or an error (not a budget stop) stops the run;
    a plain sleep when there is no ``stopper``."""
    deadline = time.monotonic() + seconds
    while stopper is None or not stopper.requests_blocked():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.25))


async def run_pool(jobs, handle, concurrency, stopper, grace=STOP_GRACE):
    """Await ``handle(job)`` for each job of the iterable ``jobs``, at most ``concurrency``
    at once, each job taken by exactly one worker.

    Stops taking jobs when ``stopper`` is set (a signal, the budget); jobs in progress
    then have ``grace`` seconds before they are cancelled (at once on a second signal).
    A ``FatalError`` (or any other exception) from a job stops the run the same way (the
    requests in flight were paid for: they may finish and be saved) and is then raised.
    ``handle`` may raise :class:`Stopped` for a job it could not start.
    """
    loop = asyncio.get_running_loop()
    todo = iter(jobs)
    woken = asyncio.Event()
    entry = stopper._attach(loop, woken.set)
    tasks = []

    async def worker():
        while not stopper.is_set():
            try:
                job = next(todo)
            except StopIteration:
                return
            try:
                await handle(job)
            except Stopped:
                return

    def cancel_all():
        for task in tasks:
            task.cancel()

    hard_stop = stopper.on_hard_stop(lambda: loop.call_soon_threadsafe(cancel_all))
    tasks.extend(asyncio.ensure_future(worker()) for _ in range(max(1, concurrency)))
    failure = None
    try:
        pending = set(tasks)
        deadline = None
        while pending:
            timeout, waiter = None, None
            if stopper.requests_blocked():  # the jobs in progress get the grace
                deadline = loop.time() + grace if deadline is None else deadline
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
            elif not stopper.is_set():
                waiter = asyncio.ensure_future(woken.wait())
            done, pending = await asyncio.wait(pending | ({waiter} if waiter else set()), timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            if waiter is not None:
                pending.discard(waiter)
                done.discard(waiter)
                waiter.cancel()
            for task in done:
                if failure is None and not task.cancelled() and task.exception() is not None:
                    failure = task.exception()
                    stopper.stop("error", str(failure))
    finally:
        stopper._detach(entry)
        stopper.forget_hard_stop(hard_stop)
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if failure is not None:
        raise failure
