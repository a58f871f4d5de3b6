"""The request engine (realign/engine.py) through the OpenAI transport, against the fake server:
the cache, refusals and adaptation, retries, the budget, the dry run, stopping."""

import asyncio
import threading
import time

import pytest
from fake_servers import FakeOpenAIServer

from realign import engine
from realign.cache import Cache
from realign.client import OpenAITransport, Sampling
from realign.engine import Options, Request, run_requests
from realign.pool import Stopper
from realign.pricing import find_price

KEY = "sk-engine-test-key-0090"
SAMPLING = Sampling(model="gpt-6-luna", n=1, max_output_tokens=50)


def chat(text, **fields):
    return {"messages": [{"role": "user", "content": text}], **SAMPLING.fields(), **fields}


def chats(server):
    return server.requests_to("/v1/chat/completions")


class Recorder:
    """Requests whose replies and errors are recorded by name; ``use`` decides what a reply is."""

    def __init__(self, use=lambda reply: True):
        self.use = use
        self.replies, self.errors = {}, {}

    def request(self, name, body=None, **fields):
        def on_reply(reply):
            self.replies.setdefault(name, []).append(reply)
            return self.use(reply)

        return Request(body or chat(name), on_reply, lambda error: self.errors.setdefault(name, error),
                       expected_output=20, **fields)


def send(server, requests, stopper=None, transport=None, **options):
    transport = transport or OpenAITransport(server.url, KEY, model="gpt-6-luna")
    options = Options(**{"concurrency": 4, "max_retries": 3, **options})
    return asyncio.run(run_requests(requests, transport, options, "test", stopper or Stopper()))


def test_a_used_reply_is_cached_and_one_not_used_is_asked_again_fresh(fake_openai, tmp_path):
    cache = Cache(str(tmp_path / "cache"))
    recorder = Recorder(use=lambda reply: False)
    send(fake_openai, [recorder.request("q")], cache=cache)
    send(fake_openai, [recorder.request("q")], cache=cache)  # not used: not cached, asked again
    assert len(chats(fake_openai)) == 2
    used = Recorder()
    send(fake_openai, [used.request("q")], cache=cache)
    usage = send(fake_openai, [used.request("q")], cache=cache)  # now from the cache
    assert len(chats(fake_openai)) == 3 and usage.stats["cache_hits"] == 1 and usage.stats["requests"] == 0


def test_a_follow_up_of_the_same_body_skips_the_cache_and_another_one_caches_the_reply(fake_openai, tmp_path):
    cache = Cache(str(tmp_path / "cache"))
    asked = []

    def request(text, again):
        def on_reply(reply):
            asked.append(text)
            if again:
                return request(text if again == "same" else text + " (re-ask)", None)
            return True

        return Request(chat(text), on_reply)

    send(fake_openai, [request("a", "same"), request("b", "other")], cache=cache)
    assert sorted(asked) == ["a", "a", "b", "b (re-ask)"] and len(chats(fake_openai)) == 4
    fake_openai.requests.clear()
    asked.clear()
    send(fake_openai, [request("b", "other")], cache=cache)  # both replies of b were answers: cached
    assert asked == ["b", "b (re-ask)"] and chats(fake_openai) == []


def test_a_record_specific_refusal_after_a_success_fails_only_that_record(fake_openai, caplog):
    # A context-length refusal that names max_completion_tokens, after the first success: the
    # record fails; the body of every other request stays as it was (no adaptation, no flip).
    fake_openai.add_fault(400, match=lambda body: "long" in body["messages"][0]["content"],
                          message="This model's maximum context length is 8192 tokens. However, you requested "
                                  "9000 tokens (8000 in the messages, 1000 in max_completion_tokens).",
                          code="context_length_exceeded", param="messages")
    recorder = Recorder()
    names = ["first", "long one", "third", "fourth"]
    usage = send(fake_openai, [recorder.request(name) for name in names], concurrency=1)
    assert set(recorder.replies) == {"first", "third", "fourth"}
    assert str(recorder.errors["long one"]).startswith("HTTP 400: This model's maximum context length")
    assert recorder.errors["long one"].refused
    bodies = [r.body for r in chats(fake_openai)]
    assert len(bodies) == 4 and all("max_completion_tokens" in b and "max_tokens" not in b for b in bodies)
    assert usage.transport.adaptations() == "none"


def test_an_unsupported_parameter_refusal_adapts_a_running_job_once(fake_openai):
    fake_openai.add_fault(400, match=lambda body: "later" in body["messages"][0]["content"] and "top_p" in body,
                          message="Unsupported value: 'top_p' does not support 0.5 with this model.",
                          code="unsupported_value", param="top_p")
    recorder = Recorder()
    requests = [recorder.request("first", chat("first", top_p=0.5)),
                recorder.request("later", chat("later", top_p=0.5)),
                recorder.request("last", chat("last", top_p=0.5))]
    usage = send(fake_openai, requests, concurrency=1)
    assert set(recorder.replies) == {"first", "later", "last"} and not recorder.errors
    bodies = [r.body for r in chats(fake_openai)]
    assert ["top_p" in b for b in bodies] == [True, True, False, False]
    assert usage.transport.adaptations().startswith("top_p=0.5 refused")


def test_a_429_without_retry_after_backs_off_exponentially(fake_openai, waits):
    fake_openai.add_fault(429, times=4)  # no Retry-After, no rate-limit headers
    recorder = Recorder()
    usage = send(fake_openai, [recorder.request("q")], max_retries=5)
    assert "q" in recorder.replies and usage.stats["retries"] == 4
    assert all(0.5 * 2 ** i <= wait <= 2 ** i for i, wait in enumerate(waits))  # 1, 2, 4, 8 s with jitter


def test_a_gateway_that_does_not_list_the_model_works_without_the_model_check(fake_openai):
    # The fake lists its default models and answers any other name too, as a gateway with aliases.
    recorder = Recorder()
    body = {**chat("q"), "model": "team-alias"}
    with pytest.raises(engine.FatalError, match="'team-alias' is not offered .* --no-model_check"):
        send(fake_openai, [recorder.request("q", body)],
             transport=OpenAITransport(fake_openai.url, KEY, model="team-alias"))
    assert chats(fake_openai) == []
    send(fake_openai, [recorder.request("q", body)],
         transport=OpenAITransport(fake_openai.url, KEY, model="team-alias", check_model=False))
    assert "q" in recorder.replies and chats(fake_openai)[0].body["model"] == "team-alias"


def test_the_cache_is_read_and_written_off_the_event_loop(fake_openai, tmp_path):
    cache = Cache(str(tmp_path / "cache"))
    threads = []
    for name in ("get", "put"):
        method = getattr(cache, name)

        def spy(*args, method=method):
            threads.append(threading.current_thread() is threading.main_thread())
            return method(*args)

        setattr(cache, name, spy)
    send(fake_openai, [Recorder().request("q")], cache=cache)
    assert threads == [False, False]


def test_lookups_asked_for_together_go_to_the_cache_thread_together(fake_openai, tmp_path, monkeypatch):
    # A cached rerun: eight workers ask for their replies at once; the cache's thread is
    # handed them in one go, not one hand-over each.
    from realign import engine

    cache = Cache(str(tmp_path / "cache"))
    names = [f"q{i}" for i in range(8)]
    send(fake_openai, [Recorder().request(name) for name in names], cache=cache, concurrency=8)
    handovers = []
    off_loop = engine.Run.off_loop

    async def counted(self, function, *args):
        handovers.append(function)
        return await off_loop(self, function, *args)

    monkeypatch.setattr(engine.Run, "off_loop", counted)
    recorder = Recorder()
    usage = send(fake_openai, [recorder.request(name) for name in names], cache=cache, concurrency=8)
    assert usage.stats["cache_hits"] == 8 and sorted(recorder.replies) == names
    assert len(handovers) <= 2


def test_the_dry_run_counts_what_the_real_run_sends(fake_openai, tmp_path):
    cache = Cache(str(tmp_path / "cache"))
    send(fake_openai, [Recorder().request("cached")], cache=cache)
    fake_openai.requests.clear()
    price = find_price("gpt-6-luna")
    requests = [Recorder().request(name) for name in ("cached", "a", "b")]
    usage = send(fake_openai, requests, cache=Cache(str(tmp_path / "cache"), write=False), dry_run=True, price=price)
    assert chats(fake_openai) == [] and fake_openai.requests == []  # nothing at all was sent (no model check)
    assert (usage.dry.requests, usage.dry.cached) == (2, 1)
    assert usage.dry.completion_tokens == 40 and usage.dry.cost() == pytest.approx(
        price.cost(usage.dry.prompt_tokens, 40))


def test_max_cost_stops_within_one_request_of_the_cap(fake_openai):
    # Each request costs the same: its prompt and 20 completion tokens at $10 a million tokens.
    fake_openai.chat_responder = lambda body, i: " ".join(["word"] * 20)
    price = find_price("x", price_input=10, price_output=10)
    recorder = Recorder()
    requests = [recorder.request(f"q{i}") for i in range(200)]
    for request in requests:
        request.expected_output = 60  # the estimate: three times what the replies use
    cap = 0.01
    usage = send(fake_openai, requests, concurrency=4, max_cost=cap, price=price)
    per_request = usage.spend.cost / usage.stats["requests"]
    assert usage.stopped == "budget"
    assert cap - per_request <= usage.spend.cost <= cap + per_request


@pytest.mark.slow
def test_a_stop_during_the_first_request_waits_for_that_request_alone(fake_openai):
    fake_openai.latency = 1.5  # the first request (the probe) is on its way when the stop comes
    recorder = Recorder()
    stopper = Stopper()
    threading.Timer(0.3, stopper.stop, args=("signal",)).start()
    started = time.monotonic()
    usage = send(fake_openai, [recorder.request(f"q{i}") for i in range(20)], stopper=stopper, concurrency=8,
                 transport=OpenAITransport(fake_openai.url, KEY, model="gpt-6-luna", check_model=False))
    assert time.monotonic() - started < 1.5 + 2.0  # the probe's reply, not the 10 s grace
    assert usage.stopped == "signal" and len(chats(fake_openai)) == 1 and len(recorder.replies) == 1


@pytest.mark.slow
def test_a_second_stop_cancels_the_requests_in_flight():
    with FakeOpenAIServer(latency=30) as server:
        stopper = Stopper()
        recorder = Recorder()
        threading.Timer(0.5, stopper.stop, args=("signal",)).start()
        threading.Timer(1.0, lambda: [callback() for callback in list(stopper._on_hard_stop)]).start()
        started = time.monotonic()
        usage = send(server, [recorder.request(f"q{i}") for i in range(4)], stopper=stopper,
                     transport=OpenAITransport(server.url, KEY, model="gpt-6-luna", check_model=False))
        assert time.monotonic() - started < 5 and usage.stopped == "signal" and not recorder.replies
