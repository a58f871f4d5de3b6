"""realign/pacing.py: the Pacer against scripted rate-limit headers, with an injected clock
and, where requests have to wait, an event loop whose clock only moves when everything
waits (so that seconds of pacing take milliseconds and every run is the same)."""

import asyncio
import math
import selectors

import pytest

from realign.pacing import EMPTY_START_SHARE, REFUSAL_DECREASE, START_SHARE, Pacer


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def headers(limit, remaining, reset):
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": reset}


# -- an event loop on a virtual clock ------------------------------------------------------


class _Selector(selectors.SelectSelector):
    """Waiting for nothing: instead of sleeping, move the loop's clock on."""

    loop = None

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("nothing scheduled: the simulation would wait for ever")
        self.loop.now += max(timeout, 1e-6)  # a real clock always moves on a little
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        selector = _Selector()
        super().__init__(selector=selector)
        selector.loop = self
        self.now = 0.0

    def time(self):
        return self.now


def run_virtual(make_coroutine):
    """``make_coroutine(loop)``'s result, run on a VirtualLoop."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(make_coroutine(loop))
    finally:
        loop.close()


class Key:
    """One key's request bucket as the fake server keeps it: refills at limit/60 a second up
    to the limit, starts empty, every arrival takes one (down to one second of debt), an
    arrival that finds less than one is refused; headers as OpenAI sends them."""

    def __init__(self, clock, limit=1200, level=0.0):
        self.clock, self.limit, self.rate = clock, limit, limit / 60.0
        self.level, self.stamp = level, None
        self.admitted = self.refused = 0

    def refill(self):
        now = self.clock()
        if self.stamp is not None:
            self.level = min(self.limit, self.level + self.rate * (now - self.stamp))
        self.stamp = now

    def spend(self, amount):
        self.refill()
        self.level = max(self.level - amount, -self.rate)

    def arrive(self):
        self.refill()
        ok = self.level >= 1
        self.admitted += ok
        self.refused += not ok
        self.spend(1)
        reset = (self.limit - self.level) / self.rate
        return ok, headers(self.limit, max(0, math.floor(self.level)), f"{reset:.3f}s")


async def send(pacer, key, latency=0.2):
    """One request through the pacer; True when the key admitted it."""
    sent_at = await pacer.acquire()
    ok, reply_headers = key.arrive()
    await asyncio.sleep(latency if ok else 0.001)
    pacer.observe(reply_headers, sent_at)
    if not ok:
        pacer.refused(sent_at)
    return ok


async def worker(pacer, key, until):
    while asyncio.get_running_loop().time() < until:
        await send(pacer, key)


# -- limits given by flag ---------------------------------------------------------------------


def test_a_limit_given_by_flag_is_never_raised_by_the_headers():
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)  # this process's budget: 10 a second, one second's worth to start
    assert pacer.probe_done  # a known limit needs no probe
    for step in range(1, 21):
        sent = asyncio.run(pacer.acquire())
        clock.now += 0.2
        pacer.observe(headers(60000, 50000, "10s"), sent)  # the key as a whole has plenty
        assert pacer.limits()["requests"] == 600
        # its own budget: 10, one out per request and 0.2 s x 10 in per step; not the key's 50,000
        assert pacer.buckets["requests"].level == pytest.approx(10 + step * (2 - 1))
    clock.now += 0.2
    pacer.observe(headers(300, 0, "61s"), sent)  # the server's limit is lower: it binds
    assert pacer.limits()["requests"] == 300 and pacer.buckets["requests"].level < 0


# -- the probe -------------------------------------------------------------------------------


def test_a_waiter_blocked_on_the_probe_returns_when_stopping_turns_true():
    async def scenario():
        pacer = Pacer()
        probe_sent = await pacer.acquire()  # limits unknown: this one is the probe, sent alone
        stop = False
        waiter = asyncio.ensure_future(pacer.acquire(stopping=lambda: stop))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # held back until the probe's reply says what the limits are
        stop = True
        await asyncio.wait_for(waiter, 2.0)  # returns without the probe's reply
        assert [sent_at for sent_at, _, _ in pacer.sent] == [probe_sent]  # and took nothing
        return pacer

    pacer = asyncio.run(scenario())
    assert not pacer.probe_done


def test_a_server_without_rate_limit_headers_is_not_paced_after_the_probe():
    clock = Clock()
    pacer = Pacer(clock=clock)
    sent = asyncio.run(pacer.acquire())
    pacer.observe({}, sent)
    assert pacer.probe_done and not pacer.headers_seen
    for _ in range(1000):  # the clock stands still: any wait would never end
        asyncio.run(pacer.acquire())
    assert pacer.limits() == {"requests": None, "tokens": None}


# -- 429s ------------------------------------------------------------------------------------


def test_a_429_lowers_the_share_once_per_round_trip_and_the_probes_does_not():
    clock = Clock()
    pacer = Pacer(clock=clock)
    probe = asyncio.run(pacer.acquire())
    clock.now += 0.01
    pacer.observe(headers(1200, 0, "60.05s"), probe)  # the bucket is in debt: the probe is refused
    pacer.refused(probe)
    assert pacer.share == EMPTY_START_SHARE  # empty: many may be starting; the probe's 429 says nothing more
    clock.now += 1.0
    first = second = clock.now  # two requests of one burst
    clock.now += 0.01
    pacer.observe(headers(1200, 0, "60.01s"), first)
    before = pacer.share
    pacer.refused(first)
    assert pacer.share == pytest.approx(before * REFUSAL_DECREASE)
    pacer.observe(headers(1200, 0, "60.02s"), second)
    before = pacer.share
    pacer.refused(second)  # sent before the first refusal came back: the same signal
    assert pacer.share == before
    clock.now += 0.5
    later = clock.now
    clock.now += 0.01
    pacer.observe(headers(1200, 0, "60.01s"), later)
    before = pacer.share
    pacer.refused(later)  # sent after it: news
    assert pacer.share == pytest.approx(before * REFUSAL_DECREASE)


def test_a_429_with_retry_after_pauses_every_request():
    async def scenario(loop):
        pacer = Pacer(clock=loop.time)
        sent = await pacer.acquire()
        await asyncio.sleep(0.2)
        pacer.observe(headers(60000, 59000, "1s"), sent)  # plenty: nothing to wait for
        pacer.refused(sent, retry_after=2.0)
        refused_at = loop.time()
        return await pacer.acquire() - refused_at

    assert run_virtual(scenario) == pytest.approx(2.0, abs=0.01)


# -- the share ---------------------------------------------------------------------------------


def test_alone_on_a_key_the_pacer_takes_all_of_it():
    async def scenario(loop):
        key = Key(loop.time)
        pacer = Pacer(clock=loop.time)
        await asyncio.gather(*[worker(pacer, key, 20.0) for _ in range(16)])
        return key, pacer

    key, pacer = run_virtual(scenario)
    assert pacer.share > 0.95
    assert key.admitted >= 0.95 * 20 * 20  # 20 a second for 20 s
    assert key.refused <= 1  # at most the probe: the bucket starts empty


async def sample_at(times, read):
    """``read()`` at each of ``times`` (seconds on the loop's clock)."""
    loop, found = asyncio.get_running_loop(), []
    for when in times:
        await asyncio.sleep(max(0.0, when - loop.time()))
        found.append(read())
    return found


async def others_spending_three_quarters(key, until):
    """Other processes on the key, spending three quarters of its refill evenly until ``until``."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        await asyncio.sleep(0.01)
        key.spend(0.75 * key.rate * 0.01)


def test_the_share_converges_to_what_the_others_leave():
    """The others spend three quarters of the key's refill, evenly: the pacer's share goes to
    a quarter, it gets a quarter of the limit, and nothing is refused."""

    async def scenario(loop):
        key = Key(loop.time, level=20.0)
        pacer = Pacer(clock=loop.time)
        spender = asyncio.ensure_future(others_spending_three_quarters(key, 40.0))
        samples = asyncio.ensure_future(sample_at([15.0, 30.0], lambda: (key.admitted, pacer.share)))
        await asyncio.gather(*[worker(pacer, key, 30.0) for _ in range(16)])
        await spender
        return key, await samples

    key, [(admitted_15, _), (admitted_30, share_30)] = run_virtual(scenario)
    assert share_30 == pytest.approx(0.25, abs=0.05)
    assert admitted_30 - admitted_15 == pytest.approx(0.25 * 20 * 15, rel=0.1)
    assert key.refused == 0


def test_a_silence_of_its_own_pacing_is_no_news_of_the_others():
    """On a key of 60 requests a minute, the others spend three quarters: a quarter leaves the
    pacer a request every four seconds, and the replies between are all the news there is. Its
    share stays at a quarter (it used to drift back towards the whole refill after two silent
    seconds, and every such request was refused)."""

    async def scenario(loop):
        key = Key(loop.time, limit=60, level=1.0)
        pacer = Pacer(clock=loop.time)
        spender = asyncio.ensure_future(others_spending_three_quarters(key, 130.0))
        samples = asyncio.ensure_future(sample_at([40.0, 120.0], lambda: (key.admitted, key.refused, pacer.share)))
        await asyncio.gather(*[worker(pacer, key, 120.0) for _ in range(4)])
        await spender
        return await samples

    [(admitted_40, refused_40, _), (admitted_120, refused_120, share_120)] = run_virtual(scenario)
    assert share_120 == pytest.approx(0.25, abs=0.05)
    assert admitted_120 - admitted_40 == pytest.approx(0.25 * 80, rel=0.25)  # about a quarter of one a second
    assert refused_120 - refused_40 == 0


@pytest.mark.parametrize("n", [2, 4, 8])
def test_n_pacers_on_one_key_use_it_all_with_almost_no_429(n):
    """N processes start a little apart on an empty key: together they reach the limit, their
    shares add up to about one, nobody is starved, and at most 1% of requests are refused."""

    async def process(key, start, until):
        await asyncio.sleep(start)
        pacer = Pacer(clock=asyncio.get_running_loop().time)
        pacers.append(pacer)
        await asyncio.gather(*[worker(pacer, key, until) for _ in range(16)])

    pacers = []

    async def scenario(loop):
        key = Key(loop.time)
        samples = asyncio.ensure_future(sample_at([10.0, 40.0], lambda: (key.admitted, [p.share for p in pacers])))
        await asyncio.gather(*[process(key, 0.3 * i, 40.0) for i in range(n)])
        return key, await samples

    key, [(admitted_10, _), (admitted_40, shares)] = run_virtual(scenario)
    assert admitted_40 - admitted_10 >= 0.95 * 20 * 30
    assert key.refused <= 0.01 * (key.admitted + key.refused)
    assert sum(shares) == pytest.approx(1.0, abs=0.2)
    assert min(shares) > 0.2 / n  # nobody starved


@pytest.mark.parametrize("n", [4, 8])
def test_n_pacers_starting_at_once_on_an_empty_key_lose_only_their_first_requests(n):
    """Up to eight processes start within a quarter of a second on an empty key: every first
    request goes out blind into the others' debt and is refused, but none after it (a quarter
    of the refill each made eight spend twice the refill: every second request was refused
    too), and the refill the slow start leaves in the bucket is not lost."""

    async def process(key, start, until):
        await asyncio.sleep(start)
        pacer = Pacer(clock=asyncio.get_running_loop().time)
        await asyncio.gather(*[worker(pacer, key, until) for _ in range(16)])

    async def scenario(loop):
        key = Key(loop.time)
        await asyncio.gather(*[process(key, 0.25 * i / n, 20.0) for i in range(n)])
        return key

    key = run_virtual(scenario)
    assert key.refused <= n
    assert key.admitted >= 0.95 * 20 * 20


# -- a busy machine ------------------------------------------------------------------------


def test_a_reply_held_up_on_the_way_does_not_count_the_delay_twice():
    """The server's replies take 0.2 s, so it admitted a request about 0.2 s before the reply:
    a reply that arrives 1.5 s after the send says what the level was 0.2 s ago, not 1.5 s ago."""
    clock = Clock()
    pacer = Pacer(clock=clock)
    for _ in range(10):  # the key is busy: its level stays at 5 of 1,200
        sent = clock.now
        clock.now += 0.2
        pacer.observe(headers(1200, 5, "59.75s"), sent)
    share = pacer.share
    sent = clock.now
    clock.now += 1.5
    pacer.observe(headers(1200, 5, "59.75s"), sent)
    assert pacer.share == share  # a late reply moves no share
    # level 5 + 0.2 s of refill (4), not + 1.5 s of it (30); this process's share of that
    assert pacer.buckets["requests"].level == pytest.approx(share * (5 + 20 * 0.2))


def test_a_held_up_loop_does_not_spend_the_refill_of_the_hold_up_at_once():
    """The loop is blocked for a second while a request waits: the pacer does not then start
    a second's worth of requests in a burst; the next reply says what is left."""

    async def scenario(loop):
        key = Key(loop.time)
        pacer = Pacer(clock=loop.time)
        await asyncio.gather(*[worker(pacer, key, 5.0) for _ in range(16)])  # settled, alone
        starts = []

        async def starter():
            while True:
                starts.append(await pacer.acquire())

        task = asyncio.ensure_future(starter())
        await asyncio.sleep(0.3)
        loop.now += 1.0  # the machine held this process up for a second: no task ran
        await asyncio.sleep(0.01)
        task.cancel()
        return [t for t in starts if t >= loop.now - 0.02]

    assert len(run_virtual(scenario)) <= 2  # not the twenty a second of refill would allow


def test_a_large_level_is_spent_within_a_moment_but_not_in_one_burst():
    """A reply shows 300 requests' worth in the bucket: they go out within about a second,
    evenly enough that no 10 ms carry more than a few, so that a stale view (other processes
    claiming the same level) shows in the replies before all of it is gone."""

    async def scenario(loop):
        key = Key(loop.time, level=300.0)
        pacer = Pacer(clock=loop.time)
        starts = []

        async def starter():
            while loop.time() < 3.0:
                sent_at = await pacer.acquire()
                starts.append(sent_at)
                ok, reply_headers = key.arrive()
                await asyncio.sleep(0.2)
                pacer.observe(reply_headers, sent_at)

        await asyncio.gather(*[starter() for _ in range(64)])
        return starts, key

    starts, key = run_virtual(scenario)
    assert sum(1 for t in starts if t < 1.5) >= 300  # the level and the refill, spent
    assert max(sum(1 for t in starts if s <= t < s + 0.01) for s in starts) <= 12
    assert key.refused == 0
