"""The one request engine: every paid call of every stage goes through :func:`send_requests`.

A stage says *what* to ask: an iterable of :class:`Request` (a body, what to do with the
reply, what to do when there is none), read lazily, and a transport that knows one wire
(:mod:`realign.client`: an OpenAI-compatible API; :mod:`realign.search`: Serper;
:mod:`realign.batch_api`: OpenAI's Batch API). The engine alone decides *how*:

- **the cache** (:mod:`realign.cache`): a request whose reply is cached is not sent; a reply
  the stage used is stored. Reads and writes run off the event loop, in the cache's own
  thread; the lookups asked for in one turn of the loop are handed to it together.
- **the dry run**: the same path, up to the wire, where a counting step takes the place of
  the send (requests, tokens, searches, cost, time at the known rate limits): it cannot
  drift from the real run.
- **the budget** (``--max_cost``) and the spend of every reply.
- **pacing** (:mod:`realign.pacing`) by the server's rate-limit headers.
- **the retry loop** (:func:`call_with_retries`) and the one mapping from an HTTP status to
  what to do (:func:`judge_status`): transient failures are retried with backoff honouring
  ``Retry-After`` (without it, exponential backoff with jitter), a refusal may adapt the
  body, what will not heal stops the run.
- **the pool** (:func:`realign.pool.run_pool`): ``--concurrency`` requests at once. SIGINT or
  SIGTERM stops new requests; those in flight have :data:`realign.pool.STOP_GRACE` seconds;
  a second signal cancels them; the stage then exits 130 (:meth:`Usage.finish`).
- **the usage file** (``--usage_path``) and the spend fragment of the summary line.

The stage's callbacks run on the event loop: ``request.on_reply(reply)`` returns True (the
reply was used: it is cached, with what the handler added to it under a key of its own,
such as reformat.py's verdicts of the quality checks), False (not used), or a follow-up
:class:`Request` (asked next, in the same slot of the pool: a re-ask, a shortened query);
``request.on_error(error)`` gets a :class:`RequestFailed` and may return a follow-up too.
Refusals before any request succeeded are held back (the settings, not the records, may be
wrong): :data:`REJECTION_LIMIT` of them stop the run.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable

from realign.cli import FatalError
from realign.pool import STOP_GRACE, Stopped, Stopper, run_pool, sleep_unless_stopped
from realign.pricing import Budget, BudgetReached, Spend
from realign.retry import is_transient_status, parse_retry_after_ms, retry_delay

logger = logging.getLogger(__name__)

REJECTION_LIMIT = 8  # this many refused requests before any success: the settings are wrong
ADAPTABLE_CODES = ("unsupported_parameter", "unsupported_value")  # refusals that adapt a running job
MAX_ADAPTATIONS = 8  # adaptations tried for one request
STATUS_SECONDS = 2.0  # how often a running run rewrites its usage file (done, total, spend so far)


@dataclasses.dataclass
class Request:
    """One paid call a stage wants made (see the module docstring)."""

    body: dict  # the logical body; the transport turns it into what goes on the wire
    on_reply: Callable  # (reply) -> True (used), False (not used) or a follow-up Request
    on_error: Callable | None = None  # (RequestFailed) -> None or a follow-up Request
    expected_output: float = 0.0  # completion tokens it is expected to use (budget, dry run)
    name: str | None = None  # stable across runs (the Batch API's custom_id)
    fresh: bool = False  # not answered from the cache (a re-ask of the same body)
    state: dict = dataclasses.field(default_factory=dict)  # the stage's notes across asks (kept by the Batch API)


@dataclasses.dataclass
class Response:
    """What came back from one HTTP call: status, headers, the JSON body (or None)."""

    status: int
    headers: object
    body: object


class TransportError(Exception):
    """No response at all: a timeout or a connection error (transient)."""


class RequestFailed(Exception):
    """A request got no usable reply: ``refused`` by the server on its merits (HTTP 4xx), or
    a transient failure that outlived ``--max_retries``."""

    def __init__(self, message, status=None, refused=False):
        super().__init__(message)
        self.status = status
        self.refused = refused


class Refusal(Exception):
    """HTTP 400/413/422 for one body: a parameter may be adapted."""

    def __init__(self, status, error):
        self.status = status
        self.error = error if isinstance(error, dict) else {}
        super().__init__(self.message)

    @property
    def message(self):
        return str(self.error.get("message") or f"HTTP {self.status}")

    @property
    def code(self):
        return str(self.error.get("code") or "")


def error_of(body):
    """The ``{"message", "type", "param", "code"}`` object of an error reply (OpenAI's shape,
    or Serper's ``{"message"}``), else {}."""
    if not isinstance(body, dict):
        return {}
    inner = body.get("error")
    if isinstance(inner, dict):
        return inner
    if isinstance(inner, str):
        return {"message": inner}
    return body


def judge_status(status, error):
    """What to do about an HTTP status: "ok"; "transient" (retry); "rate_limited" (retry,
    and pace down); "refused" (this body; a parameter may be adapted); "rejected" (this
    request only); or "bad_key", "not_found", "no_quota" (stop the run)."""
    code = str(error.get("code") or "")
    if 200 <= status < 300:
        return "ok"
    if status in (401, 403):
        return "bad_key"
    if status == 404:
        return "not_found"
    if status == 429 and code == "insufficient_quota":
        return "no_quota"
    if status in (400, 413, 422):
        return "refused"
    if status == 429 and (code == "rate_limit_exceeded" or error.get("type") in ("requests", "tokens")):
        return "rate_limited"
    if is_transient_status(status):
        return "transient"
    return "rejected"


async def call_with_retries(send, transport, *, what, max_retries, stopper=None, pacer=None, tokens=0.0,
                            stats=None, accept=(), recover=None):
    """THE retry loop: ``await send()`` (-> :class:`Response`) until it answers, retrying what
    is transient. Returns the Response (also for a status in ``accept``); raises
    :class:`Refusal` (400/413/422), :class:`RequestFailed` (another refusal, or retries
    spent), FatalError (what will not heal; the transport words it) or :class:`Stopped`.
    Before a retry, ``await recover()`` may find that the failed call was carried out after
    all (the Batch API's uploads): what it returns, when not None, is returned."""
    stats = stats if stats is not None else collections.Counter()
    stopping = (lambda: stopper.requests_blocked()) if stopper is not None else None
    attempt = 0
    while True:
        if stopper is not None and stopper.requests_blocked():
            raise Stopped(stopper.reason)
        sent_at = await pacer.acquire(tokens, stopping) if pacer is not None else None
        if stopper is not None and stopper.requests_blocked():
            raise Stopped(stopper.reason)
        stats["requests"] += 1
        retry_after = None
        try:
            response = await send()
        except TransportError as e:
            if pacer is not None:
                pacer.failed()
            problem = str(e)
        else:
            if pacer is not None:
                pacer.observe(response.headers, sent_at)
            error = error_of(response.body)
            verdict = "ok" if response.status in accept else judge_status(response.status, error)
            if verdict == "ok":
                if response.status in accept or transport.is_reply(response.body):
                    return response
                problem = "an unreadable reply"
            elif verdict in ("bad_key", "not_found", "no_quota"):
                raise FatalError(transport.fatal_message(verdict, response.status, error))
            elif verdict == "refused":
                raise Refusal(response.status, error)
            elif verdict == "rejected":
                message = str(error.get("message") or "")[:300]
                raise RequestFailed(f"HTTP {response.status}" + (f": {message}" if message else ""),
                                    response.status, refused=True)
            else:
                retry_after = parse_retry_after_ms(response.headers)
                code = str(error.get("code") or "")
                problem = f"HTTP {response.status}" + (f" {code}" if code else "")
                if verdict == "rate_limited":
                    stats["rate_limited"] += 1
                    if pacer is not None:
                        pacer.refused(sent_at, retry_after)
        if attempt >= max_retries:
            raise RequestFailed(f"failed after {attempt + 1} attempts: {problem}")
        # Without Retry-After: exponential backoff with jitter, whatever else the headers say.
        delay = retry_delay(attempt, retry_after)
        logger.debug("%s: %s, retry %d in %.2f s", what, problem, attempt + 1, delay)
        stats["retries"] += 1
        attempt += 1
        await sleep_unless_stopped(stopper, delay)
        if recover is not None:
            found = await recover()
            if found is not None:
                return found


# -- what a run used ------------------------------------------------------------------------


class Usage:
    """What one run of the engine sent, used and spent; the summary fragment and the usage file."""

    def __init__(self, stage, transport, spend, dry=None):
        self.stage = stage
        self.transport = transport
        self.spend = spend
        self.dry = dry  # DryCount of a dry run
        self.stats = collections.Counter()
        self.stopped = None  # "signal", "budget" or "error"
        self.stop_message = None
        self.limits = {"requests": None, "tokens": None}
        self.extra = None  # a transport's own account (the Batch API's): describe() and as_dict()
        self.progress = None  # (records done, records in all) at the end, where the stage says

    def describe(self):
        """The client's part of a summary line, e.g. ``requests: 12, retries: 1 (429 rate limit: 0), cache
        hits: 3, pacing: 500 requests/min, adaptations: none, prompt tokens: ..., spend: $0.0012``."""
        if self.extra is not None:
            return self.extra.describe()
        s = self.stats
        paced = ", ".join(f"{int(v):,} {dim}/min" for dim, v in self.limits.items() if v) or "no limits seen"
        return (f"requests: {s['requests']:,}, retries: {s['retries']:,} (429 rate limit: {s['rate_limited']:,}), "
                f"cache hits: {s['cache_hits']:,}, pacing: {paced}, adaptations: {self.transport.adaptations()}, "
                f"{self.spend.describe()}")

    def as_dict(self):
        """The ``--usage_path`` file: what a pipeline adds up over its stages."""
        if self.dry is not None:
            return {"stage": self.stage, "dry_run": True, **self.dry.as_dict(),
                    **(self.extra.as_dict() if self.extra is not None else {})}
        data = {"stage": self.stage, "dry_run": False, "requests": self.stats["requests"],
                "cache_hits": self.stats["cache_hits"], "searches": self.spend.searches,
                "prompt_tokens": self.spend.prompt_tokens, "completion_tokens": self.spend.completion_tokens,
                "cost_usd": self.spend.cost if self.spend.priced else None, "stopped": self.stopped}
        if self.extra is not None:
            data.update(self.extra.as_dict())
        if self.progress is not None:
            data["done"], data["total"] = self.progress
        return data

    def write(self, path, **extra):
        if path:
            from realign.records import write_json_atomic

            write_json_atomic(path, {**self.as_dict(), **extra})

    def finish(self, where):
        """The one ending of a stopped run: a signal exits 130 (KeyboardInterrupt), the budget
        exits 1 naming the cap; ``where`` names what holds the finished work."""
        if self.stopped == "signal":
            raise KeyboardInterrupt
        if self.stopped == "budget":
            raise FatalError(f"{self.stop_message}; the finished work is in {where}: rerun with a higher "
                             "--max_cost to continue")


class DryCount:
    """The counting step of a dry run: what each request would send and cost."""

    def __init__(self, stage, count_prompt, price, limits, search_price=None, completion_note=""):
        self.stage = stage
        self.count_prompt = count_prompt  # (body) -> prompt tokens
        self.price = price
        self.limits = limits or {}
        self.search_price = search_price
        self.completion_note = completion_note
        self.requests = self.cached = 0
        self.prompt_tokens = self.completion_tokens = self.limit_tokens = 0.0
        self.counted = "estimated at 4 characters a token"

    def add(self, body, expected_output, limit_tokens):
        prompt = self.count_prompt(body)
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += expected_output
        self.limit_tokens += prompt + limit_tokens

    def cost(self):
        if not self.requests:
            return 0.0
        if self.search_price is not None:
            return self.requests * self.search_price
        if self.price is None:
            return None
        return self.price.cost(self.prompt_tokens, self.completion_tokens)

    def minutes(self):
        """Expected wall time in minutes at the known rate limits, or None."""
        times = []
        if self.limits.get("requests"):
            times.append(self.requests / self.limits["requests"])
        if self.limits.get("tokens") and self.limit_tokens:
            times.append(self.limit_tokens / self.limits["tokens"])
        return max(times) if times else None

    def as_dict(self):
        searches = self.search_price is not None
        return {"requests": 0 if searches else self.requests, "searches": self.requests if searches else 0,
                "cache_hits": self.cached, "prompt_tokens": round(self.prompt_tokens),
                "completion_tokens": round(self.completion_tokens), "cost_usd": self.cost(),
                "minutes": self.minutes(), "tokens_counted": self.counted,
                "price": self.price.source if self.price else None}

    def lines(self, extra=None):
        """The report, a few lines a person reads."""
        lines = [f"dry run of {self.stage}: nothing was sent" + (f" ({extra})" if extra else "")]
        cost = self.cost()
        if self.search_price is not None:
            lines.append(f"  searches to send: {self.requests:,} (Serper credits), answered by the cache: "
                         f"{self.cached:,}")
            lines.append(f"  expected cost: ${cost:,.4f} (${self.search_price:g} a search)")
            lines.append("  expected time: not estimated (Serper sends no rate-limit headers)")
            return lines
        lines.append(f"  requests to send: {self.requests:,} (answered by the cache: {self.cached:,})")
        lines.append(f"  prompt tokens: {self.prompt_tokens:,.0f}, {self.counted}")
        lines.append(f"  expected completion tokens: {self.completion_tokens:,.0f} ({self.completion_note})")
        if cost is None:
            lines.append("  cost: unknown (no price for this model: pass --price_input and --price_output)")
        else:
            lines.append(f"  expected cost: ${cost:,.4f} ({self.price.source if self.price else 'no request'})")
        minutes = self.minutes()
        if minutes is None:
            lines.append("  expected time: unknown (no rate limit known: pass --max_requests_per_minute / "
                         "--max_tokens_per_minute, or run once to learn the server's)")
        else:
            known = ", ".join(f"{v:,.0f} {k}/min" for k, v in self.limits.items() if v)
            lines.append(f"  expected time at the rate limits ({known}): {minutes:,.1f} min")
        return lines


# -- one run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    """How the engine sends (the flags of :func:`add_engine_arguments`)."""

    concurrency: int = 16
    max_retries: int = 8
    cache: object = None  # realign.cache.Cache or None
    price: object = None  # realign.pricing.Price or None
    search_price: float | None = None  # USD a request, for a transport that bills by the request
    max_cost: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    dry_run: bool = False
    count_prompt: Callable | None = None  # a dry run's prompt counter (default: the transport's estimate)
    counted: str | None = None  # how count_prompt counts, for the dry run's report
    completion_note: str = "n x the original response's length; reasoning tokens not included"
    refusal_hint: str = ""  # what to check when every request is refused
    grace: float = STOP_GRACE
    check_first: bool = True  # the transport's check (the model) before anything is written or sent
    usage_path: str | None = None  # also written every STATUS_SECONDS while the run goes on (a pipeline shows it)
    progress: Callable | None = None  # () -> (records done, records in all), for that file


class Run:
    """The state the workers of one run share: cache, spend, budget, pacer, held refusals."""

    def __init__(self, stage, transport, options, stopper):
        from realign.pacing import Pacer

        self.transport = transport
        self.options = options
        self.stopper = stopper
        self.cache = options.cache
        self.spend = Spend(options.price)
        self.spend.search_price = options.search_price
        self.budget = Budget(options.max_cost, self.spend)
        self.dry = None
        if options.dry_run:
            limits = {"requests": options.rpm, "tokens": options.tpm}
            self.dry = DryCount(stage, options.count_prompt or transport.estimate_prompt, options.price, limits,
                                options.search_price, options.completion_note)
            if options.counted:
                self.dry.counted = options.counted
        self.pacer = None if options.dry_run else Pacer(options.rpm, options.tpm)
        self.usage = Usage(stage, transport, self.spend, self.dry)
        self.stats = self.usage.stats
        self.succeeded = False
        self.held = []  # (request, error): refusals before any success
        self.prompt_ratio = None  # usage's prompt tokens over the estimate, learned from replies
        self._prepared = None
        # One thread for the cache: its reads and writes take turns anyway (one lock), and
        # threads that wait for the lock only take the interpreter from the event loop.
        self._cache_thread = None
        self._reads = []  # (key, future): lookups asked for in this turn of the event loop
        self._reading = set()  # the tasks reading them (the event loop keeps only weak references)

    # -- the cache, off the event loop ----------------------------------------------------

    async def off_loop(self, function, *args):
        """``function(*args)`` in the cache's thread."""
        if self._cache_thread is None:
            self._cache_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="realign-cache")
        return await asyncio.get_running_loop().run_in_executor(self._cache_thread, function, *args)

    def close(self):
        if self._cache_thread is not None:
            self._cache_thread.shutdown(wait=True)

    async def cache_get(self, key):
        """The cached reply of ``key``, or None. The lookups the workers ask for in one turn of
        the event loop go to the cache's thread together: one hand-over for many (on a cached
        rerun, a hand-over per request cost more than the lookup)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._reads.append((key, future))
        if len(self._reads) == 1:
            loop.call_soon(self._read_waiting)
        return await future

    def _read_waiting(self):
        reads, self._reads = self._reads, []

        def deliver(task):
            self._reading.discard(task)
            failure = None if task.cancelled() else task.exception()
            for i, (_, future) in enumerate(reads):
                if future.done():
                    continue  # its worker was cancelled
                if task.cancelled():
                    future.cancel()
                elif failure is not None:
                    future.set_exception(failure)
                else:
                    future.set_result(task.result()[i])

        keys = [key for key, _ in reads]
        task = asyncio.ensure_future(self.off_loop(lambda: [self.cache.get(key) for key in keys]))
        self._reading.add(task)
        task.add_done_callback(deliver)

    async def cached_reply(self, request):
        if self.cache is None or request.fresh:
            return None
        key = self.transport.key(request.body)
        if self.dry is not None:
            return key if await self.off_loop(self.cache.contains, key) else None
        return await self.cache_get(key)

    async def store(self, request, reply):
        if self.cache is not None and self.dry is None:
            await self.off_loop(self.cache.put, self.transport.key(request.body), reply)

    # -- asking ------------------------------------------------------------------------------

    async def converse(self, request):
        """Ask ``request`` and its follow-ups until the stage is done with it."""
        while request is not None:
            request = await self.ask(request)

    async def ask(self, request):
        """One request: from the cache, or counted (dry run), or sent; the follow-up or None."""
        hit = await self.cached_reply(request)
        if hit is not None:
            self.stats["cache_hits"] += 1
            if self.dry is not None:
                self.dry.cached += 1
                return None
            return await self.deliver(request, hit, cached=True)
        prompt, raw = self.estimate(request.body)
        try:
            ticket = self.budget.reserve(prompt, request.expected_output, fixed=self.options.search_price)
        except BudgetReached as e:
            self.stop("budget", str(e))
            raise Stopped("budget") from None
        if self.dry is not None:
            self.dry.add(request.body, request.expected_output, self.limit_tokens(request.body) - prompt)
            self.budget.settle(ticket)
            self.spend.cost += self.budget.estimate(prompt, request.expected_output) \
                if self.options.search_price is None else self.options.search_price
            return None
        completion = None
        try:
            await self.prepare()
            reply = await self.send(request.body, prompt)
            prompt_used, completion = self.spend.add_reply(reply, self.transport)
            if prompt_used and raw:
                ratio = prompt_used / raw
                self.prompt_ratio = ratio if self.prompt_ratio is None else 0.9 * self.prompt_ratio + 0.1 * ratio
        except RequestFailed as error:
            return await self.fail(request, error)
        finally:
            self.budget.settle(ticket, request.expected_output, completion)
        await self.note_success()
        return await self.deliver(request, reply, cached=False)

    async def note_success(self):
        """A request was answered: the refusals held back were on their merits after all, and
        the stage records them now."""
        if not self.succeeded:
            self.succeeded = True
            held, self.held = self.held, []
            for waiting, error in held:
                await self.converse(self.call_on_error(waiting, error))

    async def deliver(self, request, reply, cached):
        """Hand the reply to the stage; the follow-up or None. A reply is cached when the stage
        used it, or moved on to another question (a judge's re-ask is a new conversation); a
        request asked again as it was (a re-ask) was not answered usably: its reply is not."""
        outcome = request.on_reply(reply)
        again = isinstance(outcome, Request) and self.transport.key(outcome.body) == self.transport.key(request.body)
        if not cached and (outcome is True or (isinstance(outcome, Request) and not again)):
            await self.store(request, reply)
        if again:
            outcome.fresh = True  # the same body: a new reply, not this one from the cache
        return outcome if isinstance(outcome, Request) else None

    async def fail(self, request, error):
        if error.refused and not self.succeeded:
            self.held.append((request, error))
            if len(self.held) >= REJECTION_LIMIT:
                raise FatalError(f"the first {REJECTION_LIMIT} requests were all refused ({error}); "
                                 f"{self.options.refusal_hint}")
            return None
        return self.call_on_error(request, error)

    @staticmethod
    def call_on_error(request, error):
        """The stage's handler of a failed request; its follow-up Request, or None."""
        outcome = request.on_error(error) if request.on_error is not None else None
        return outcome if isinstance(outcome, Request) else None

    async def send(self, body, prompt):
        """Send ``body`` as the server accepts it (adapting to its refusals); one reply."""
        transport = self.transport
        for _ in range(MAX_ADAPTATIONS):
            bodies = transport.wire(body)
            try:
                results = await asyncio.gather(*(self.post(wire, prompt) for wire in bodies),
                                               return_exceptions=True)
                failure = next((r for r in results if isinstance(r, BaseException)), None)
                if failure is not None:
                    for result in results:  # the parts that were answered were paid for
                        if not isinstance(result, BaseException):
                            self.spend.add_reply(result, transport)
                    raise failure
                return results[0] if len(results) == 1 else transport.merge(results)
            except Refusal as refusal:
                if transport.wire(body) != bodies:  # adapted meanwhile (another request's refusal)
                    continue
                # A running job adapts only to what the server calls an unsupported parameter or
                # value; other refusals (too long, a bad record) fail this request only.
                if (not self.succeeded or refusal.code in ADAPTABLE_CODES) and transport.learn(bodies[0], refusal):
                    self.stats["adapted_resends"] += 1
                    continue
                raise RequestFailed(f"HTTP {refusal.status}: {refusal.message[:300]}", refusal.status,
                                    refused=True) from None
        raise RequestFailed("the server kept refusing the request after adapting it", 400, refused=True)

    async def post(self, wire, prompt):
        response = await call_with_retries(
            lambda: self.transport.post(wire), self.transport, what=self.transport.name,
            max_retries=self.options.max_retries, stopper=self.stopper, pacer=self.pacer,
            tokens=self.transport.token_cost(wire, prompt), stats=self.stats)
        return response.body

    async def prepare(self):
        """The transport's check before anything is sent (the model), once."""
        if self._prepared is None:
            self._prepared = asyncio.ensure_future(self.transport.prepare(self))
        await self._prepared

    # -- estimates and stopping ----------------------------------------------------------

    def estimate(self, body):
        """``(prompt tokens learned from the replies so far, raw estimate)``."""
        raw = self.transport.estimate_prompt(body)
        return raw * (self.prompt_ratio or 1.0), raw

    def limit_tokens(self, body):
        return sum(self.transport.token_cost(wire, self.estimate(body)[0]) for wire in self.transport.wire(body))

    def stop(self, reason, message=None):
        self.stopper.stop(reason, message)

    def finish_usage(self):
        usage = self.usage
        usage.stopped = self.stopper.reason
        usage.stop_message = self.stopper.message
        if self.options.progress is not None:
            usage.progress = self.options.progress()
        if self.pacer is not None:
            usage.limits = self.pacer.limits()
        return usage


async def write_status(run):
    """Keep the usage file of a running run current: what is done of what, and the spend so far."""
    options = run.options
    while True:
        done, total = options.progress() if options.progress else (None, None)
        await asyncio.to_thread(run.usage.write, options.usage_path, running=True, done=done, total=total)
        await asyncio.sleep(STATUS_SECONDS)


async def run_requests(requests, transport, options, stage, stopper):
    """Send every request of the iterable ``requests`` (see the module docstring); the
    :class:`Usage`. The transport's ``run`` (the Batch API) replaces the pool when it has one."""
    run = Run(stage, transport, options, stopper)
    status = asyncio.ensure_future(write_status(run)) if options.usage_path and run.dry is None else None
    try:
        if run.dry is None and options.check_first:  # the model check before anything is written or sent
            await run.prepare()
        if hasattr(transport, "run"):
            await transport.run(run, requests)
        else:
            await run_pool(requests, run.converse, options.concurrency, stopper, options.grace)
        if run.held and not run.succeeded and not stopper.is_set():
            raise FatalError(f"every request was refused ({run.held[0][1]}); {options.refusal_hint}")
    finally:
        if status is not None:
            status.cancel()
        if run.cache is not None and run.pacer is not None and run.pacer.headers_seen:
            limits = run.pacer.limits()
            await run.off_loop(run.cache.remember_limits, transport.limits_key, limits["requests"],
                               limits["tokens"])
        run.close()
        await transport.close()
    return run.finish_usage()


def send_requests(requests, transport, options, stage, stopper=None):
    """:func:`run_requests` in an event loop of its own, with SIGINT and SIGTERM handled as a
    stop (see the module docstring); the :class:`Usage` (``usage.finish(...)`` raises for a
    stopped run)."""
    stopper = stopper or Stopper()
    with stopper.signals_handled():
        return asyncio.run(run_requests(requests, transport, options, stage, stopper))


# -- the flags ----------------------------------------------------------------------------------


def add_engine_arguments(group, *, default_concurrency=16, default_max_retries=8, usage_help=None, concurrency=True):
    """The flags of the engine, the same on every paid stage: the pool (``concurrency=False``
    for a stage that keeps the original's name for it), retries, the cache, the dry run, the
    cap and the usage file."""
    import argparse

    from realign.cli import non_negative_int, positive_float, positive_int

    if concurrency:
        group.add_argument("--concurrency", type=positive_int, default=default_concurrency,
                           help=f"requests in flight at once (default: {default_concurrency})")
    group.add_argument("--max_retries", type=non_negative_int, default=default_max_retries,
                       help="retries of a request after a rate limit, server error, timeout or connection "
                            f"error, with backoff honouring Retry-After (default: {default_max_retries})")
    group.add_argument("--cache_dir", default=None,
                       help="folder of the request cache (default: $REALIGN_CACHE_DIR, else ~/.cache/realign)")
    group.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                       help="answer repeated requests from the cache and store new replies "
                            "(--no-cache: neither; default: on)")
    group.add_argument("--refresh_cache", action=argparse.BooleanOptionalAction, default=False,
                       help="do not answer from the cache, but store the new replies (default: off)")
    group.add_argument("--dry_run", action=argparse.BooleanOptionalAction, default=False,
                       help="send nothing: print the requests, tokens, cost and time the run would take "
                            "(default: off)")
    group.add_argument("--max_cost", type=positive_float, default=None,
                       help="stop starting requests before the spend of this run would pass this many USD "
                            "(default: no cap)")
    group.add_argument("--usage_path", default=None,
                       help=usage_help or "also write this run's requests, tokens and spend (with --dry_run: the "
                                          "estimate) as JSON to this file (default: not written)")


def options_from_args(args, *, cache, price=None, search_price=None, limits_key=None, **fields):
    """The engine's :class:`Options` from a stage's flags. A dry run reckons with the rate
    limits given by flag, else those the cache remembers for ``limits_key``."""
    rpm = getattr(args, "max_requests_per_minute", None)
    tpm = getattr(args, "max_tokens_per_minute", None)
    if args.dry_run and cache is not None and limits_key is not None:
        known = cache.known_limits(limits_key)
        rpm, tpm = rpm or known.get("requests"), tpm or known.get("tokens")
    fields.setdefault("usage_path", getattr(args, "usage_path", None))
    return Options(concurrency=args.concurrency, max_retries=args.max_retries, cache=cache, price=price,
                   search_price=search_price, max_cost=args.max_cost, rpm=rpm, tpm=tpm, dry_run=args.dry_run,
                   **fields)
