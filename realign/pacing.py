"""Rate-limit pacing: start requests no faster than the server's limits refill.

OpenAI-style servers limit requests and tokens per minute with token buckets that refill
continuously, and describe the bucket on every reply: ``x-ratelimit-limit-*`` (the
per-minute limit), ``x-ratelimit-remaining-*`` (what is left now) and
``x-ratelimit-reset-*`` (how long until the bucket is full again). A refused request
counts against the limit too, so sending until a 429 wastes the budget.

:class:`Pacer` keeps, per dimension (requests, tokens), what this process may spend now:
every request it starts takes its cost out, it refills at this process's *share* of the
known rate, and every reply resets it to that share of the server's level (the level when
that request was admitted, plus the refill since) minus what this process started since.
Claiming only its share of the level is what keeps N processes on one key from all
spending the same requests: each spends from its own part.

The share comes from how the server's level moves between this process's own admissions:
level before - level after + refill = everything the key spent in between; minus what this
process started = what the others spent; the share is what they leave. N processes see the
same shortfall (or excess) at once, so each takes up only its own part of it (its part of
the spending): together they correct the total once, whatever N is, instead of N times over
(eight processes used to swing between bursts of 429s and idle seconds). A process that
starts while the bucket is not full may be joining others: it starts at a quarter of the
refill, spends no more than that refill, and takes its measured share once it has one. Where
its first request found no more than the key's reserve there, it starts at an eighth: many
processes may be starting at once, each one's first request in the others' debt, and a
quarter each made eight of them spend twice the refill (every second request refused). Too
little costs nothing: what nobody spends stays in the bucket until a measured share claims
it. Only measurements move the share up: a silence says nothing about the others, since a
process with a small share is silent by its own pacing (taken as the others slowing down,
it got every request refused on a key of 60 requests a minute that others left it a
quarter of).

A busy machine delays replies and stalls processes, and must not look like spare room: the
server is taken to have admitted a request as late as its quickest recent replies allow
(not at the send: that would count the refill of the delay twice); a reply that came late,
or after a gap without replies, does not move the share; a wait that overslept does not
refill what this process may spend (the next reply says what is left of it).

A reserve (two latencies of the refill, at least 0.2 s, split by share) absorbs what the
others start while the news is on its way. Before any reply has said what the limits are,
one request is sent alone (a probe): a server without rate-limit headers is then not paced
at all. ``rpm`` / ``tpm`` given by the user are this process's own budget from the start:
the headers (which describe the whole key) may lower what it spends, never raise it.
"""

import asyncio
import collections
import logging
import re
import time

logger = logging.getLogger(__name__)

DIMENSIONS = ("requests", "tokens")
MIN_SHARE = 1 / 64  # never assume less than this share of the refill
START_SHARE = 0.25  # the share of a process that starts while others may be spending
EMPTY_START_SHARE = 1 / 8  # the same where its first request found no room: eight starting at once take the refill
SHARE_WINDOW = 1.0  # seconds of replies (at least two latencies) over which the others' spending is measured
MIN_SHARE_SPAN = 0.3  # seconds of replies (at least 1.5 latencies) needed to measure it
SHARE_TIME = 0.5  # seconds over which a measured change of the share is taken up
REFUSAL_DECREASE = 0.7  # a 429 of the rate limit: take less of the refill
MAX_SLEEP = 0.25  # the estimate is looked at again at least this often while waiting
MIN_RESERVE_SECONDS = 0.2  # reserve: at least this many seconds of the refill (split by share)
RECENT_REPLIES = 32  # the reply times from which the server's quickest and typical replies are taken
LATE_REPLY = 1.5  # a reply slower than this many typical ones (+ LATE_SLACK) came late
LATE_SLACK = 0.05  # seconds
REPLY_GAP = 0.5  # seconds without a reply (and 4 usual gaps) that are a stall, not a quiet key
OVERSLEEP = 0.05  # seconds a wait may overrun before the loop counts as held up
DRAIN_SECONDS = 0.25  # what may be spent beyond the share's refill goes out over about this long

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
    """What this process may spend of one of the server's buckets (``level``), and its
    share of the refill."""

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
        self.measured = None  # admission time of the last measurement of the share taken up
        self.synced = float("-inf")  # admission time of the reply the level was last reset from
        self.history = collections.deque()  # (admission time, server level) from recent replies

    @property
    def rate(self):
        return self.limit / 60.0 if self.limit else None

    def refill(self, now):
        if self.limit is None:
            return
        if self.updated is not None and self.level is not None:
            self.level = min(self.capacity, self.level + self.rate * self.share * max(0.0, now - self.updated))
        self.updated = now

    def server_level(self, remaining, reset):
        """The server's level after it admitted our request. ``remaining`` is floored (at 0
        too, where the bucket owes); the time until full says it to the millisecond where
        the bucket's size is known."""
        if reset is None or not self.capacity:
            return remaining
        exact = self.capacity - self.rate * reset
        if remaining >= 1:
            return min(max(exact, remaining), remaining + 1)
        return min(exact, 1.0)


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
        self.recent = collections.deque(maxlen=RECENT_REPLIES)  # seconds from send to reply, latest replies
        self.last_reply = None  # when the latest reply came
        self.reply_gap = None  # smoothed seconds between replies
        self.sent = collections.deque()  # (time, request cost, token cost) of recent starts
        self.headers_seen = False
        self.probe_done = rpm is not None or tpm is not None  # given limits: no probe needed
        self._probe_in_flight = False
        self._probe_sent_at = None
        self._probe_event = None
        self._lock = None
        self._last_refusal = float("-inf")
        self._last_start = None  # when the latest request started

    # -- sending ------------------------------------------------------------------

    def _reserve(self, bucket):
        """Left in the bucket for what the others start while our news is on its way: this
        process's part of the key's reserve."""
        seconds = max(MIN_RESERVE_SECONDS, 2 * (self.latency or 0.0))
        return min(bucket.share * bucket.rate * seconds, 0.5 * (bucket.capacity or 0))

    def _wait_needed(self, now, costs):
        """Seconds to wait before a request of ``costs`` may start (0 when it may now)."""
        wait = max(0.0, self.cooldown_until - now)
        for dim, bucket in self.buckets.items():
            if bucket.limit is None or bucket.level is None:
                continue
            bucket.refill(now)
            cost = min(costs[dim], bucket.capacity)
            need = cost + self._reserve(bucket)
            if bucket.level < need:
                wait = max(wait, (need - bucket.level) / (bucket.rate * bucket.share))
            elif self._last_start is not None:
                # Evenly spaced, at this process's share of the refill plus what it may spend
                # beyond that spread over DRAIN_SECONDS: a level it may claim at once (after a
                # stall, when its share rose) goes out over a moment in which the others'
                # replies can show it, not in one burst on news that may be stale.
                pace = bucket.rate * bucket.share + (bucket.level - need) / DRAIN_SECONDS
                wait = max(wait, self._last_start + cost / pace - now)
        return wait

    async def acquire(self, tokens=0, stopping=None):
        """Wait until a request costing one request and ``tokens`` tokens may start; take
        its cost out of the buckets; return the start time (pass it to :meth:`observe`).
        ``stopping()`` true ends the wait early, the wait for the probe's reply too: the
        caller then does not send, and nothing is taken."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._probe_event = asyncio.Event()
        costs = {"requests": 1.0, "tokens": float(tokens)}
        async with self._lock:  # one waiter at a time: requests start in order, evenly spaced
            while not self.probe_done and self._probe_in_flight:
                if stopping is not None and stopping():
                    return self.clock()
                try:
                    await asyncio.wait_for(self._probe_event.wait(), MAX_SLEEP)
                except TimeoutError:
                    pass  # look at stopping() again
            while True:
                now = self.clock()
                if stopping is not None and stopping():
                    return now
                wait = self._wait_needed(now, costs)
                if wait <= 0:
                    break
                asked = min(wait, MAX_SLEEP)
                await asyncio.sleep(asked)
                overslept = self.clock() - now - asked
                if overslept > OVERSLEEP:
                    # The loop was held up (a busy machine): what the others spent meanwhile is
                    # unknown, so the refill of that time is not spent at once; the next reply
                    # says what is left of it.
                    for bucket in self.buckets.values():
                        if bucket.updated is not None:
                            bucket.updated = max(bucket.updated, now + overslept)
            for dim, bucket in self.buckets.items():
                if bucket.level is not None:
                    bucket.level -= costs[dim]
            self.sent.append((now, costs["requests"], costs["tokens"]))
            self._last_start = now
            if not self.probe_done:
                self._probe_in_flight = True
                self._probe_sent_at = now
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

    def _timing(self, now, sent_at):
        """(when the server admitted the request, as late as it can have; whether the reply
        came late or after a stall, so that it says nothing reliable about the others)."""
        elapsed = max(0.0, now - sent_at)
        self.latency = elapsed if self.latency is None else 0.8 * self.latency + 0.2 * elapsed
        self.recent.append(elapsed)
        ordered = sorted(self.recent)
        quickest, typical = ordered[len(ordered) // 10], ordered[len(ordered) // 2]
        stalled = False
        if self.last_reply is not None:
            gap = now - self.last_reply
            # A long silence while this request was on its way: the machine or the server
            # stalled (a silence because nothing was sent is no stall).
            stalled = sent_at < self.last_reply and gap > max(REPLY_GAP, 4 * (self.reply_gap or 0.0))
            self.reply_gap = gap if self.reply_gap is None else 0.8 * self.reply_gap + 0.2 * gap
        self.last_reply = now
        # Between the send and the reply less the server's quickest answer: the latest time
        # is the safe one, a reply held up on the way must not count the delay's refill twice.
        admitted = max(sent_at, now - quickest)
        late = elapsed > LATE_REPLY * typical + LATE_SLACK
        return admitted, late or stalled, stalled

    def observe(self, headers, sent_at):
        """Bring the estimate in step with a reply's ``x-ratelimit-*`` headers (any status)."""
        now = self.clock()
        admitted, unreliable, stalled = self._timing(now, sent_at)
        described = read_rate_headers(headers) if headers is not None else {}
        if described:
            self.headers_seen = True
        for dim, (limit, remaining, reset) in described.items():
            bucket = self.buckets[dim]
            if bucket.fixed:
                self._observe_fixed(bucket, dim, now, max(0.0, now - sent_at), sent_at, limit, remaining, reset)
                continue
            if admitted <= bucket.synced:  # older than the reply the level was last reset from
                continue
            bucket.synced = admitted
            bucket.limit = limit
            if reset is not None and remaining >= 1:
                # remaining (floored) + the refill until full = the bucket's size, up to one
                # short: where that is within one of the limit, the size is the limit.
                size = remaining + bucket.rate * reset
                bucket.capacity = limit if size > limit - 1.01 else min(limit, max(size, 1.0))
            if bucket.capacity is None:
                bucket.capacity = bucket.limit
            level = bucket.server_level(remaining, reset)  # when it admitted our request
            if not self.probe_done and level < bucket.capacity - 1:
                bucket.share = self._start_share(bucket, level)
            if stalled:
                bucket.history.clear()  # a measurement across a stall would show room that is not there
            if not unreliable:
                self._estimate_share(bucket, dim, admitted, level)
            bucket.refill(now)
            # Our share of that level and of the refill since, minus what we started since
            # the send (those the server had not counted then): claiming only a share of what
            # is there keeps N processes from all spending it.
            since = self._sent_since(sent_at)[dim]
            server_now = min(bucket.capacity, level + bucket.rate * (now - admitted))
            claim = bucket.share * server_now - since
            if bucket.measured is None and bucket.level is not None:
                bucket.level = min(bucket.level, claim)  # share not measured yet: only its refill
            else:
                bucket.level = claim
        self._forget_old_sends(now)
        self._end_probe()

    def _observe_fixed(self, bucket, dim, now, elapsed, sent_at, limit, remaining, reset):
        """A limit given by flag stays this process's own budget; the server's headers (which
        describe the whole key) may only lower what it may spend now, never raise it."""
        bucket.limit = min(bucket.limit, limit)  # the server allows less than the flag: its limit binds
        bucket.refill(now)
        server_rate = limit / 60.0
        capacity = remaining + server_rate * reset if reset is not None else float(limit)
        level = remaining
        if remaining < 1 and reset is not None:  # floored at 0: the reset shows a debt
            level = min(0.0, float(limit) - server_rate * reset)
        server_now = min(capacity, level + server_rate * elapsed) - self._sent_since(sent_at)[dim]
        bucket.level = server_now if bucket.level is None else min(bucket.level, server_now)

    def _start_share(self, bucket, level):
        """The share of the refill to start with when the probe found the bucket not full
        (``level``: what it left there): others may be spending, and until the replies say
        how much, too little costs nothing (what nobody spends stays in the bucket, to be
        claimed once the share is measured) while too much costs 429s. Where the probe left
        no more than the key's reserve, the key is one that others spend as it refills, or
        one that many processes start on at once (each one's probe in the others' debt):
        all of them start small."""
        kept = bucket.rate * max(MIN_RESERVE_SECONDS, 2 * (self.latency or 0.0))
        return START_SHARE if level > kept else EMPTY_START_SHARE

    def _estimate_share(self, bucket, dim, admitted, level):
        """What the others spend, from how the server's level moved between two of our
        admissions: level before - level after + refill = everything spent in between;
        minus what we started in between = the others'."""
        window = max(SHARE_WINDOW, 2 * (self.latency or 0.0))
        history = bucket.history
        history.append((admitted, level))
        while len(history) > 2 and history[1][0] <= admitted - window:
            history.popleft()
        first_at, first_level = history[0]
        span = admitted - first_at
        if span < max(MIN_SHARE_SPAN, 1.5 * (self.latency or 0.0)):
            return
        ours = self._spent_between(first_at, admitted)[dim]
        slack = max(1.0, 0.002 * bucket.limit)
        if max(lvl for _, lvl in history) >= bucket.capacity - slack:
            others = 0.0  # the bucket was full: whatever the others spend, it holds nobody back
        else:
            others = max(0.0, first_level - level + bucket.rate * span - ours)
        room = min(1.0, max(MIN_SHARE, 1.0 - others / (bucket.rate * span)))
        # Every process on the key sees the same shortfall or excess: each takes up its own
        # part of it (its part of the spending), so that together they correct it once.
        part = ours / (ours + others) if ours + others > 0 else 1.0
        gain = 1.0 if bucket.measured is None else min(1.0, (admitted - bucket.measured) / SHARE_TIME)
        bucket.measured = admitted
        bucket.share = max(MIN_SHARE, bucket.share + gain * part * (room - bucket.share))

    def refused(self, sent_at, retry_after=None):
        """A 429 of the rate limit (after :meth:`observe` of its headers): take less of the
        refill; pause everyone for ``retry_after`` seconds when the server says so."""
        now = self.clock()
        # Once per round trip: the 429s of one burst are one signal. The probe's is none (it
        # is sent before anything is known, into a bucket that may well be empty).
        if sent_at > self._last_refusal and sent_at != self._probe_sent_at:
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
