"""Rate-limit pacing: start requests no faster than the server's limits refill.

OpenAI-style servers limit requests and tokens per minute with token buckets that refill
continuously, and describe the bucket on every reply: ``x-ratelimit-limit-*`` (the
per-minute limit), ``x-ratelimit-remaining-*`` (what is left now) and
``x-ratelimit-reset-*`` (how long until the bucket is full again). A refused request
counts against the limit too, so sending until a 429 wastes the budget.

:class:`Pacer` keeps, per dimension (requests, tokens), an estimate of the server's
bucket: it refills at the known rate, every request this process starts takes its cost
out, and every reply's headers reset it to what the server said (the server's level when
that request was admitted, plus the refill since, minus what this process started since).
When several processes share one key, each reply shows the server's level lower than this
process's own bookkeeping predicted: the difference is what the others spent. The pacer
then lowers its *share* of the refill (and raises it again when the server shows more
than predicted), so N processes settle on about 1/N each without talking to each other.
A small reserve (the refill of about one reply's latency) absorbs what the others start
while a reply is on its way.

Before any reply has said what the limits are, one request is sent alone (a probe): a
server without rate-limit headers is then not paced at all. ``rpm`` / ``tpm`` given by
the user are this process's own budget from the start: the headers (which describe the
whole key) may lower what it spends, never raise it.
"""

import asyncio
import collections
import logging
import re
import time

logger = logging.getLogger(__name__)

DIMENSIONS = ("requests", "tokens")
MIN_SHARE = 1 / 64  # never assume less than this share of the refill
SHARE_WINDOW = 2.0  # seconds of replies over which the others' spending is measured
SHARE_SMOOTHING = 0.2  # how far each reply moves the share towards the measured one
REFUSAL_DECREASE = 0.7  # a 429 of the rate limit: take less of the refill
MIN_SHARE_SPAN = 0.3  # seconds of replies needed before the others' spending is measured
STALE_SHARE = 2.0  # seconds without a reply after which the others are assumed to slow down
MAX_SLEEP = 0.25  # the estimate is looked at again at least this often while waiting
MIN_RESERVE_SECONDS = 0.5  # reserve: at least this many seconds of refill

_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value):
    """Seconds in an ``x-ratelimit-reset-*`` value: ``"12ms"``, ``"1s"``, ``"6m0s"``,
    ``"1m30.5s"``, ``"2h3m"``, or a plain number of seconds. None when unreadable."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    seconds, end = 0.0, 0
    for match in _DURATION_PART_RE.finditer(text):
        if match.start() != end:
            return None
        number, unit = float(match.group(1)), match.group(2)
        seconds += number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        end = match.end()
    return seconds if end == len(text) and end else None


def _header_number(headers, name):
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def read_rate_headers(headers):
    """``{dimension: (limit, remaining, reset_seconds)}`` for the dimensions the headers describe."""
    found = {}
    for dim in DIMENSIONS:
        limit = _header_number(headers, f"x-ratelimit-limit-{dim}")
        remaining = _header_number(headers, f"x-ratelimit-remaining-{dim}")
        if limit is None or remaining is None or limit <= 0:
            continue
        found[dim] = (limit, remaining, parse_reset(headers.get(f"x-ratelimit-reset-{dim}")))
    return found


class _Bucket:
    """This process's estimate of one of the server's buckets."""

    def __init__(self, dim, limit=None, fixed=False):
        self.dim = dim
        self.limit = limit  # per minute
        self.fixed = fixed  # given by the user: headers may lower it, never raise it
        self.capacity = limit  # the bucket's size: the limit, or less where the server says so
        self.level = None  # unknown until a limit is known
        if limit:  # a limit given by the user: start with one second's worth, not a burst
            self.level = limit / 60.0
        self.updated = None
        self.share = 1.0  # the part of the refill left to this process by the others
        self.history = collections.deque()  # (admission time, server level) from recent replies

    @property
    def rate(self):
        return self.limit / 60.0 if self.limit else None

    def refill(self, now):
        if self.limit is None:
            return
        if self.updated is not None and self.level is not None:
            self.level = min(self.capacity, self.level + self.rate * self.share * (now - self.updated))
            # No news for a while (nothing of ours in flight): the others may have stopped
            # or slowed down too; let the share drift back to the whole refill.
            if self.history and now - self.history[-1][0] > STALE_SHARE:
                self.share += (1.0 - self.share) * min(1.0, (now - self.updated) / STALE_SHARE)
        self.updated = now


class Pacer:
    """Decides when the next request may start. One per process and server, shared by all
    workers of an asyncio loop.

    ``await pacer.acquire(tokens)`` before sending (returns the send time to pass back);
    ``pacer.observe(headers, sent_at, ...)`` with the headers of every reply, error replies
    included; ``pacer.refused(retry_after)`` on a 429 of the rate limit.
    """

    def __init__(self, rpm=None, tpm=None, clock=time.monotonic):
        self.clock = clock
        self.buckets = {"requests": _Bucket("requests", rpm, rpm is not None),
                        "tokens": _Bucket("tokens", tpm, tpm is not None)}
        self.cooldown_until = 0.0
        self.latency = None  # smoothed seconds from send to reply
        self.sent = collections.deque()  # (time, request cost, token cost) of recent starts
        self.headers_seen = False
        self.probe_done = rpm is not None or tpm is not None  # given limits: no probe needed
        self._probe_in_flight = False
        self._probe_event = None
        self._lock = None
        self._last_refusal = float("-inf")

    # -- sending ------------------------------------------------------------------

    def _reserve(self, bucket):
        """Left in the bucket for what the others start while our news is on its way."""
        seconds = max(MIN_RESERVE_SECONDS, 2 * (self.latency or 0.0))
        return min(bucket.rate * seconds, 0.5 * (bucket.capacity or 0))

    def _wait_needed(self, now, costs):
        """Seconds to wait before a request of ``costs`` may start (0 when it may now)."""
        wait = max(0.0, self.cooldown_until - now)
        for dim, bucket in self.buckets.items():
            if bucket.limit is None or bucket.level is None:
                continue
            bucket.refill(now)
            need = min(costs[dim], bucket.capacity) + self._reserve(bucket)
            if bucket.level < need:
                wait = max(wait, (need - bucket.level) / (bucket.rate * bucket.share))
        return wait

    async def acquire(self, tokens=0, stopping=None):
        """Wait until a request costing one request and ``tokens`` tokens may start; take
        its cost out of the buckets; return the start time (pass it to :meth:`observe`).
        ``stopping()`` true ends the wait early (the caller then does not send)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._probe_event = asyncio.Event()
        costs = {"requests": 1.0, "tokens": float(tokens)}
        async with self._lock:  # one waiter at a time: requests start in order, evenly spaced
            while not self.probe_done and self._probe_in_flight:
                await self._probe_event.wait()
            while True:
                now = self.clock()
                wait = self._wait_needed(now, costs)
                if wait <= 0 or (stopping is not None and stopping()):
                    break
                await asyncio.sleep(min(wait, MAX_SLEEP))
            for dim, bucket in self.buckets.items():
                if bucket.level is not None:
                    bucket.level -= costs[dim]
            self.sent.append((now, costs["requests"], costs["tokens"]))
            if not self.probe_done:
                self._probe_in_flight = True
            return now

    # -- replies ------------------------------------------------------------------

    def _sent_since(self, when):
        """(requests, tokens) this process started after ``when``."""
        return self._spent_between(when, float("inf"))

    def _spent_between(self, start, end):
        """(requests, tokens) this process started in ``(start, end]``."""
        requests = tokens = 0.0
        for sent_at, r, t in reversed(self.sent):
            if sent_at <= start:
                break
            if sent_at <= end:
                requests += r
                tokens += t
        return {"requests": requests, "tokens": tokens}

    def _forget_old_sends(self, now):
        horizon = now - max(10.0, 4 * (self.latency or 0.0))
        while self.sent and self.sent[0][0] < horizon:
            self.sent.popleft()

    def observe(self, headers, sent_at):
        """Bring the estimate in step with a reply's ``x-ratelimit-*`` headers (any status)."""
        now = self.clock()
        elapsed = max(0.0, now - sent_at)
        self.latency = elapsed if self.latency is None else 0.8 * self.latency + 0.2 * elapsed
        described = read_rate_headers(headers) if headers is not None else {}
        if described:
            self.headers_seen = True
        for dim, (limit, remaining, reset) in described.items():
            bucket = self.buckets[dim]
            if bucket.fixed:
                self._observe_fixed(bucket, dim, now, elapsed, sent_at, limit, remaining, reset)
                continue
            bucket.limit = limit
            level = remaining  # the server's level when it admitted this request
            if reset is not None:
                if remaining >= 1:  # remaining + the refill until full = the bucket's size
                    bucket.capacity = min(bucket.limit, max(remaining + bucket.rate * reset, 1.0))
                elif bucket.capacity:  # remaining is floored at 0: the reset shows a debt
                    level = min(0.0, bucket.capacity - bucket.rate * reset)
            if bucket.capacity is None:
                bucket.capacity = bucket.limit
            self._estimate_share(bucket, dim, sent_at, level)
            bucket.refill(now)
            # Our share of that level and of the refill since, minus what we started since:
            # claiming only a share of what is there keeps N processes from all spending it.
            since = self._sent_since(sent_at)[dim]
            server_now = min(bucket.capacity, level + bucket.rate * elapsed)
            bucket.level = bucket.share * server_now - since
        self._forget_old_sends(now)
        self._end_probe()

    def _observe_fixed(self, bucket, dim, now, elapsed, sent_at, limit, remaining, reset):
        """A limit given by flag stays this process's own budget; the server's headers (which
        describe the whole key) may only lower what it may spend now, never raise it."""
        if limit < bucket.limit:  # the server allows less than the flag: its limit binds
            bucket.limit = limit
        bucket.refill(now)
        server_rate = limit / 60.0
        capacity = remaining + server_rate * reset if reset is not None else float(limit)
        level = remaining
        if remaining < 1 and reset is not None:  # floored at 0: the reset shows a debt
            level = min(0.0, float(limit) - server_rate * reset)
        server_now = min(capacity, level + server_rate * elapsed) - self._sent_since(sent_at)[dim]
        bucket.level = server_now if bucket.level is None else min(bucket.level, server_now)

    def _estimate_share(self, bucket, dim, admitted, level):
        """What the others spend, from how the server's level moved between two of our
        admissions: level before - level after + refill = everything spent in between;
        minus what we started in between = the others'."""
        window = max(SHARE_WINDOW, 4 * (self.latency or 0.0))
        history = bucket.history
        history.append((admitted, level))
        while len(history) > 2 and history[1][0] <= admitted - window:
            history.popleft()
        first_at, first_level = history[0]
        span = admitted - first_at
        if span < max(MIN_SHARE_SPAN, 2 * (self.latency or 0.0)):
            return
        slack = max(1.0, 0.002 * bucket.limit)
        if max(lvl for _, lvl in history) >= bucket.capacity - slack:
            others = 0.0  # the bucket was full: whatever the others spend, it holds nobody back
        else:
            spent = first_level - level + bucket.rate * span
            ours = self._spent_between(first_at, admitted)[dim]
            others = max(0.0, (spent - ours) / span)
        share = min(1.0, max(MIN_SHARE, 1.0 - others / bucket.rate))
        bucket.share += SHARE_SMOOTHING * (share - bucket.share)

    def refused(self, sent_at, retry_after=None):
        """A 429 of the rate limit (after :meth:`observe` of its headers): pause everyone for
        ``retry_after`` seconds when the server says so."""
        now = self.clock()
        if sent_at > self._last_refusal:  # once per round trip: the 429s of one burst are one signal
            self._last_refusal = now
            for bucket in self.buckets.values():
                bucket.share = max(MIN_SHARE, bucket.share * REFUSAL_DECREASE)
        if retry_after:
            self.cooldown_until = max(self.cooldown_until, now + retry_after)
        self._end_probe()

    def failed(self):
        """A request ended without a reply (timeout, connection): end a probe all the same."""
        self._end_probe()

    def _end_probe(self):
        if not self.probe_done:
            self.probe_done = True
            self._probe_in_flight = False
            if self._probe_event is not None:
                self._probe_event.set()

    @property
    def share(self):
        """The smallest share of a limit this process currently takes (1.0: it is alone)."""
        return min((b.share for b in self.buckets.values() if b.limit), default=1.0)

    def limits(self):
        """``{"requests": per minute or None, "tokens": ...}`` as known now."""
        return {dim: bucket.limit for dim, bucket in self.buckets.items()}
