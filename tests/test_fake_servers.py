"""The fake servers answer the real clients (openai SDK, requests) as the real APIs do."""

import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests
from realign.standins import MALFORMED_REPLY, FakeOpenAIServer, find_original_response

import constant

MODEL = "gpt-3.5-turbo-1106"
ORIGINAL = "1. Eat well.\n\n2. Sleep.\n[Original response end] is a marker.\n3. Move."
REWRITE_REQUEST = constant.REFORMAT_PROMPTS["adaptive"]["evidence"]["user"].format(
    question="Give three tips for staying healthy.", response=ORIGINAL,
    format="the answer; explanation; conclusion", evidence="1. Sleep matters.")
FAKE_SERVERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "realign", "standins.py")


def client_for(server, **kwargs):
    kwargs.setdefault("api_key", "k")
    return openai.OpenAI(base_url=server.url, max_retries=0, **kwargs)


def chat(server, content=REWRITE_REQUEST, client=None, **kwargs):
    messages = [{"role": "system", "content": "Reformat."}, {"role": "user", "content": content}]
    client = client or client_for(server)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def search(server, query, key="test-serper-key"):
    return requests.post(server.search_url, json={"q": query, "gl": "us", "hl": "en"},
                         headers={"X-API-KEY": key}, timeout=5)


# -- OpenAI: replies -------------------------------------------------------------------


def test_chat_default_reply_has_n_choices_and_usage(fake_openai):
    reply = chat(fake_openai, n=2)
    expected = f"Reasoning: The format fits the question.\nRevised response: **Answer**\n\n{ORIGINAL}"
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [expected, expected]
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    assert reply.model == MODEL
    assert reply.usage.completion_tokens == 2 * len(expected.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    (request,) = fake_openai.requests
    assert request.path == "/v1/chat/completions"
    assert request.body["n"] == 2
    assert request.headers["authorization"] == "Bearer k"


def test_find_original_response_falls_back_to_the_whole_text():
    assert find_original_response("  just text ") == "just text"


def test_chat_responder_is_scriptable_per_choice(fake_openai):
    fake_openai.chat_responder = lambda body, i: (
        "short" if i == 0 else {"content": "long but cut", "finish_reason": "length"})
    reply = chat(fake_openai, n=2)
    assert [(c.message.content, c.finish_reason) for c in reply.choices] == [
        ("short", "stop"), ("long but cut", "length")]


def test_completions_default_and_scripted(fake_openai):
    client = client_for(fake_openai)
    reply = client.completions.create(model="classifier", prompt="Task name:")
    assert [c.text for c in reply.choices] == [" open_qa"]
    assert reply.usage.prompt_tokens == 2

    fake_openai.completion_responder = lambda body, i: body["prompt"].upper()
    reply = client.completions.create(model="classifier", prompt=["a b", "c"])
    assert [(c.index, c.text) for c in reply.choices] == [(0, "A B"), (1, "C")]


# -- OpenAI: faults --------------------------------------------------------------------


def test_429_carries_retry_after_and_is_consumed(fake_openai):
    fake_openai.add_fault(status=429, retry_after=1)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(fake_openai)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    assert chat(fake_openai).choices[0].finish_reason == "stop"


def test_500(fake_openai):
    fake_openai.add_fault(status=500)
    with pytest.raises(openai.InternalServerError):
        chat(fake_openai)


def test_malformed_reply_lacks_the_marker(fake_openai):
    fake_openai.add_fault(kind="malformed")
    content = chat(fake_openai).choices[0].message.content
    assert content == MALFORMED_REPLY
    assert "Revised response:" not in content


def test_truncated_reply_stops_for_length(fake_openai):
    fake_openai.add_fault(kind="truncated")
    choice = chat(fake_openai).choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.message.content) < len(chat(fake_openai).choices[0].message.content)


def test_wrong_key_gives_401(fake_openai):
    fake_openai.expected_key = "right"
    with pytest.raises(openai.AuthenticationError):
        chat(fake_openai)
    client = client_for(fake_openai, api_key="right")
    assert client.completions.create(model="m", prompt="p").choices[0].text == " open_qa"


def test_unknown_model_gives_404(fake_openai):
    fake_openai.known_models = {"gpt-4"}
    with pytest.raises(openai.NotFoundError) as caught:
        chat(fake_openai)
    assert caught.value.code == "model_not_found"


def test_fault_for_matching_requests_only_and_forever(fake_openai):
    fake_openai.add_fault(status=500, times=None,
                          match=lambda body: "poison" in body["messages"][-1]["content"])
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            chat(fake_openai, content="poison")
    assert chat(fake_openai).choices[0].message.content.startswith("Reasoning:")


def test_latency_and_slow_reply(fake_openai):
    fake_openai.latency = 0.2
    started = time.monotonic()
    chat(fake_openai)
    assert time.monotonic() - started >= 0.2

    fake_openai.latency = 0
    fake_openai.add_fault(delay=2)
    with pytest.raises(openai.APITimeoutError):
        client_for(fake_openai, timeout=0.2).completions.create(model="m", prompt="p")
    assert chat(fake_openai).choices[0].finish_reason == "stop"


def test_fault_rates_are_roughly_honoured():
    rates = {"429": 0.10, "500": 0.05, "malformed": 0.05}
    seen = {"429": 0, "500": 0, "malformed": 0}
    with FakeOpenAIServer(fault_rates=rates, seed=1) as server:
        client = client_for(server)
        for _ in range(200):
            try:
                content = chat(server, client=client).choices[0].message.content
                seen["malformed"] += content == MALFORMED_REPLY
            except openai.RateLimitError:
                seen["429"] += 1
            except openai.InternalServerError:
                seen["500"] += 1
    assert seen == server.fault_counts
    assert 10 <= seen["429"] <= 30
    assert 3 <= seen["500"] <= 17
    assert 3 <= seen["malformed"] <= 17


def test_64_concurrent_requests_all_succeed(fake_openai):
    fake_openai.latency = 0.3  # long enough for all requests to be in flight at once
    barrier = threading.Barrier(64)
    statuses = []

    def one_request():
        barrier.wait()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        statuses.append(requests.post(fake_openai.url + "/chat/completions", json=body,
                                      timeout=10).status_code)

    threads = [threading.Thread(target=one_request) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 64
    assert fake_openai.max_in_flight == 64


# -- Serper ----------------------------------------------------------------------------


def test_serper_default_reply_shape(fake_serper):
    reply = search(fake_serper, "capital of France")
    assert reply.status_code == 200
    data = reply.json()
    assert data["searchParameters"]["q"] == "capital of France"
    assert [r["position"] for r in data["organic"]] == [1, 2, 3]
    for result in data["organic"]:
        assert set(result) == {"title", "link", "snippet", "position"}
        assert "capital of France" in result["snippet"]
    assert fake_serper.requests[0].headers["x-api-key"] == "test-serper-key"
    assert fake_serper.requests[0].body == {"q": "capital of France", "gl": "us", "hl": "en"}


def test_serper_wrong_or_missing_key_gives_403(fake_serper):
    reply = search(fake_serper, "q", key="wrong")
    assert (reply.status_code, reply.json()) == (403, {"message": "Unauthorized.",
                                                       "statusCode": 403})
    assert requests.post(fake_serper.search_url, json={"q": "q"}, timeout=5).status_code == 403


def test_serper_scripted_reply(fake_serper):
    scripted = {"answerBox": {"title": "Paris", "answer": "Paris"},
                "knowledgeGraph": {"title": "Paris", "type": "City", "description": "Capital.",
                                   "attributes": {"Population": "2.1 million"}},
                "organic": [{"title": "t", "link": "https://x", "snippet": "s", "position": 1,
                             "date": "Jan 1, 2024", "attributes": {"Area": "105 km²"}}]}
    fake_serper.responses = {"capital of France": scripted}
    assert search(fake_serper, "capital of France").json() == scripted
    assert "answerBox" not in search(fake_serper, "other").json()


def test_serper_always_failing_query_and_malformed(fake_serper):
    fake_serper.add_fault(status=500, times=None, match=lambda body: body["q"] == "x")
    assert [search(fake_serper, "x").status_code for _ in range(3)] == [500, 500, 500]
    assert search(fake_serper, "y").status_code == 200

    fake_serper.add_fault(kind="malformed", match=lambda body: body["q"] == "y")
    with pytest.raises(requests.JSONDecodeError):
        search(fake_serper, "y").json()


# -- command line ----------------------------------------------------------------------


def test_cli_prints_port_serves_and_reports_stats_on_sigterm():
    process = subprocess.Popen([sys.executable, FAKE_SERVERS, "serper", "--latency", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        word, port = process.stdout.readline().split()
        assert word == "PORT"
        reply = requests.post(f"http://127.0.0.1:{port}/search", json={"q": "x"},
                              headers={"X-API-KEY": "test-serper-key"}, timeout=5)
        assert reply.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=5)
    assert process.returncode == 0
    assert stdout == ""
    assert 'STATS {"requests": 1' in stderr


def test_cli_rejects_unknown_fault_label():
    result = subprocess.run([sys.executable, FAKE_SERVERS, "serper", "--fault-rate",
                             "truncated=0.1"], check=False, capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "unknown fault kind 'truncated'" in result.stderr
