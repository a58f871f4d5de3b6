"""The fake servers answer the real clients (openai SDK, requests) as the real APIs do.

Only the wire format is pinned here: what a client sees (statuses, bodies, headers).
Time-dependent behaviour runs on an injected clock, so nothing here measures time.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import openai
import pytest
import requests
from realign.standins import (
    MALFORMED_REPLY,
    REASONING,
    FakeOpenAIServer,
    Profile,
    default_chat_reply,
    openai_duration,
    spawn,
    stop_spawned,
)

import constant

MODEL = "gpt-3.5-turbo-1106"
ORIGINAL = "1. Eat well.\n\n2. Sleep.\n[Original response end] is a marker.\n3. Move."
REWRITE_REQUEST = constant.REFORMAT_PROMPTS["adaptive"]["evidence"]["user"].format(
    question="Give three tips for staying healthy.", response=ORIGINAL,
    format="the answer; explanation; conclusion", evidence="1. Sleep matters.")
FAKE_SERVERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "realign", "standins.py")
DEFAULT_REPLY_ABC = "Reasoning: The format fits the question.\nRevised response: **Answer**\n\na b c"  # 12 words


def client_for(server, **kwargs):
    kwargs.setdefault("api_key", "k")
    return openai.OpenAI(base_url=server.url, max_retries=0, **kwargs)


def chat(server, content=REWRITE_REQUEST, client=None, model=MODEL, **kwargs):
    messages = [{"role": "system", "content": "Reformat."}, {"role": "user", "content": content}]
    client = client or client_for(server)
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def post_chat(server, content="a b", model=MODEL, **fields):
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    return requests.post(server.url + "/chat/completions", json=body, timeout=5)


def limit_headers(reply):
    return {k: v for k, v in reply.headers.items() if k.startswith(("x-ratelimit", "retry-after"))}


def search(server, query, key="test-serper-key"):
    return requests.post(server.search_url, json={"q": query, "gl": "us", "hl": "en"},
                         headers={"X-API-KEY": key}, timeout=5)


@pytest.fixture
def clock(fake_openai):
    """Freeze the fake's clock at t=1000; advance it with `clock[0] = ...`."""
    now = [1000.0]
    fake_openai.clock = lambda: now[0]
    return now


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
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.usage.completion_tokens_details is None  # only a reasoning profile bills reasoning
    assert reply.service_tier is None  # only a profile with service tiers answers one
    (request,) = fake_openai.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.body["n"] == 2
    assert request.headers["authorization"] == "Bearer k"


def test_completions_default_and_scripted(fake_openai):
    client = client_for(fake_openai)
    reply = client.completions.create(model="classifier", prompt="Task name:")
    assert [c.text for c in reply.choices] == [" open_qa"]
    assert reply.usage.prompt_tokens == 2

    fake_openai.completion_responder = lambda body, i: body["prompt"].upper()
    reply = client.completions.create(model="classifier", prompt=["a b", "c"])
    assert [(c.index, c.text) for c in reply.choices] == [(0, "A B"), (1, "C")]


# -- OpenAI: errors ----------------------------------------------------------------------


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


def test_wrong_key_gives_401(fake_openai):
    fake_openai.expected_key = "right"
    with pytest.raises(openai.AuthenticationError):
        chat(fake_openai)
    with pytest.raises(openai.AuthenticationError):
        client_for(fake_openai).models.list()
    client = client_for(fake_openai, api_key="right")
    assert client.completions.create(model="m", prompt="p").choices[0].text == " open_qa"


def test_unknown_model_gives_404(fake_openai):
    fake_openai.known_models = {"gpt-4"}
    with pytest.raises(openai.NotFoundError) as caught:
        chat(fake_openai)
    assert caught.value.code == "model_not_found"


def test_fault_rates_are_roughly_honoured():
    # The benchmarks' random faults: seeded, so the counts are the same on every run.
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


def test_the_command_line_refuses_an_unknown_fault_label():
    result = subprocess.run([sys.executable, FAKE_SERVERS, "serper", "--fault-rate", "truncated=0.1"],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown fault kind 'truncated'" in result.stderr


def test_64_concurrent_requests_all_succeed(fake_openai):
    gate = threading.Barrier(64, timeout=30)  # no reply before all 64 requests are in flight

    def responder(body, choice_index):
        gate.wait()
        return default_chat_reply(body, choice_index)

    fake_openai.chat_responder = responder
    barrier = threading.Barrier(64)
    statuses = []

    def one_request():
        barrier.wait()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        statuses.append(requests.post(fake_openai.url + "/chat/completions", json=body,
                                      timeout=60).status_code)

    threads = [threading.Thread(target=one_request) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 64
    assert fake_openai.max_in_flight == 64


# -- OpenAI: models ----------------------------------------------------------------------


def test_models_list_and_retrieve_default_catalogue(fake_openai):
    client = client_for(fake_openai)
    listed = client.models.list()
    assert [m.model_dump(exclude_none=True) for m in listed.data] == [
        {"id": "gpt-6-luna", "object": "model", "created": 1764547200, "owned_by": "system"},
        {"id": "gpt-6-sol", "object": "model", "created": 1764547200, "owned_by": "system"},
        {"id": "gpt-4o-mini", "object": "model", "created": 1764547200, "owned_by": "system",
         "shutdown_date": "2027-01-14"}]
    assert client.models.retrieve("gpt-4o-mini").shutdown_date == "2027-01-14"
    reply = requests.get(fake_openai.url + "/models/gpt-x", timeout=5)
    assert (reply.status_code, reply.json()) == (404, {"error": {
        "message": "The model `gpt-x` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
    assert chat(fake_openai, model="gpt-x").model == "gpt-x"  # the default catalogue is not enforced


def test_models_with_shutdown_dates_are_gone_on_that_date(fake_openai):
    fake_openai.models = {"gpt-6-luna": {}, "gpt-4o-mini": {"shutdown_date": "2027-01-14"},
                          "gpt-old": {"shutdown_date": "2026-11-30"}}
    fake_openai.today = "2026-12-01"
    client = client_for(fake_openai)
    assert [m.id for m in client.models.list().data] == ["gpt-6-luna", "gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-old")
    reply = post_chat(fake_openai, model="gpt-old")
    assert (reply.status_code, reply.json()) == (404, {"error": {
        "message": "The model `gpt-old` has been deprecated, learn more here: "
                   "https://platform.openai.com/docs/deprecations",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
    assert post_chat(fake_openai, model="gpt-6-sol").json()["error"]["code"] == "model_not_found"  # not listed
    assert post_chat(fake_openai, model="gpt-4o-mini").status_code == 200

    fake_openai.today = "2027-01-14"
    assert [m.id for m in client.models.list().data] == ["gpt-6-luna"]
    assert post_chat(fake_openai, model="gpt-4o-mini").status_code == 404


def test_models_endpoint_like_vllm_and_absent(fake_openai):
    fake_openai.models_endpoint = "vllm"
    fake_openai.known_models = {"tiny-llama"}
    listed = requests.get(fake_openai.url + "/models", timeout=5)
    assert listed.json() == {"object": "list", "data": [
        {"id": "tiny-llama", "object": "model", "created": 1764547200, "owned_by": "vllm",
         "root": "tiny-llama", "parent": None, "max_model_len": 32768}]}
    one = requests.get(fake_openai.url + "/models/tiny-llama", timeout=5)
    assert (one.status_code, one.json()) == (404, {"detail": "Not Found"})

    fake_openai.models_endpoint = "none"
    for path in ("/models", "/models/tiny-llama"):
        reply = requests.get(fake_openai.url + path, timeout=5)
        assert (reply.status_code, reply.json()["error"]["code"]) == (404, "unknown_url")


# -- OpenAI: parameter profiles ----------------------------------------------------------


def test_reasoning_profile_refuses_max_tokens_and_sampling(fake_openai):
    fake_openai.profiles = {"gpt-6-luna": REASONING}
    reply = post_chat(fake_openai, model="gpt-6-luna", max_tokens=50)
    assert (reply.status_code, reply.json()) == (400, {"error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                   "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}})
    reply = post_chat(fake_openai, model="gpt-6-luna", temperature=0.3)
    assert (reply.status_code, reply.json()) == (400, {"error": {
        "message": "Unsupported value: 'temperature' does not support 0.3 with this model. "
                   "Only the default (1) value is supported.",
        "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}})
    assert post_chat(fake_openai, model="gpt-6-luna", top_p=0.9).json()["error"]["param"] == "top_p"
    error = post_chat(fake_openai, model="gpt-6-luna", reasoning_effort="extreme").json()["error"]
    assert (error["param"], error["code"]) == ("reasoning_effort", "unsupported_value")
    assert post_chat(fake_openai, model="gpt-6-luna", temperature=1, top_p=1).status_code == 200
    assert post_chat(fake_openai, model="other", max_tokens=50, temperature=0.3).status_code == 200  # no profile
    assert [r.body.get("max_tokens") for r in fake_openai.requests[:1]] == [50]  # refused requests are recorded


def test_reasoning_profile_bills_reasoning_and_answers_the_service_tier(fake_openai):
    fake_openai.profiles = {"*": REASONING}
    client = client_for(fake_openai)
    messages = [{"role": "user", "content": "a b c"}]
    reply = client.chat.completions.create(model="gpt-6-luna", messages=messages, reasoning_effort="low",
                                           service_tier="flex")
    assert reply.choices[0].message.content == DEFAULT_REPLY_ABC
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 44, 47)
    assert reply.usage.completion_tokens_details.reasoning_tokens == 32
    assert reply.service_tier == "flex"

    reply = client.chat.completions.create(model="gpt-6-luna", messages=messages, n=2, service_tier="auto")
    assert reply.usage.completion_tokens_details.reasoning_tokens == 256  # medium: 128 per choice
    assert reply.usage.completion_tokens == 280
    assert reply.service_tier == "default"

    # The cap holds reasoning and content: 32 reasoning + 8 words of content.
    reply = client.chat.completions.create(model="gpt-6-luna", messages=messages, reasoning_effort="low",
                                           max_completion_tokens=40)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (
        "Reasoning: The format fits the question.\nRevised response:", "length")
    assert reply.usage.completion_tokens == 40
    # Reasoning can use the whole cap: no content at all.
    reply = client.chat.completions.create(model="gpt-6-luna", messages=messages, max_completion_tokens=20)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "length")
    assert (reply.usage.completion_tokens, reply.usage.completion_tokens_details.reasoning_tokens) == (20, 20)


def test_legacy_profile_names_the_unrecognized_fields_in_the_message(fake_openai):
    fake_openai.profiles = {"*": "legacy"}
    reply = post_chat(fake_openai, max_completion_tokens=5)
    assert (reply.status_code, reply.json()) == (400, {"error": {
        "message": "Unrecognized request argument supplied: max_completion_tokens",
        "type": "invalid_request_error", "param": None, "code": None}})
    with pytest.raises(openai.BadRequestError) as caught:
        chat(fake_openai, reasoning_effort="low", service_tier="default")
    assert caught.value.body["message"] == "Unrecognized request arguments supplied: reasoning_effort, service_tier"
    assert caught.value.body["param"] is None
    assert post_chat(fake_openai, max_tokens=5).status_code == 200


def test_refusing_n_alone_or_with_reasoning(fake_openai):
    fake_openai.profiles = {"one": Profile(max_n=1), "luna": dataclasses.replace(REASONING, max_n=1)}
    for model in ("one", "luna"):
        reply = post_chat(fake_openai, model=model, n=2)
        assert (reply.status_code, reply.json()) == (400, {"error": {
            "message": "Unsupported value: 'n' does not support 2 with this model. Only 1 is supported.",
            "type": "invalid_request_error", "param": "n", "code": "unsupported_value"}})
        assert post_chat(fake_openai, model=model, n=1).status_code == 200
    assert post_chat(fake_openai, model="luna", max_tokens=5).json()["error"]["param"] == "max_tokens"


# -- OpenAI: rate limits -----------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [(0.012, "12ms"), (1, "1s"), (360, "6m0s"), (90.5, "1m30.5s"),
                                           (18.12, "18.12s"), (0, "0s")])
def test_reset_durations_are_written_as_openai_does(seconds, text):
    assert openai_duration(seconds) == text


def test_rate_limit_headers_on_every_reply_of_a_limited_endpoint(fake_openai, clock):
    fake_openai.set_rate_limits(rpm=60, tpm=1000)
    reply = post_chat(fake_openai, content="a b", max_tokens=300)  # costs 1 request, 2 + 300 tokens
    assert reply.status_code == 200
    assert limit_headers(reply) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "698",
        "x-ratelimit-reset-tokens": "18.12s"}
    fake_openai.known_models = {"gpt-4"}
    reply = post_chat(fake_openai, content="a b", max_tokens=300)  # an error reply is charged and carries them
    assert reply.status_code == 404
    assert limit_headers(reply)["x-ratelimit-remaining-tokens"] == "396"
    assert limit_headers(requests.get(fake_openai.url + "/models", timeout=5)) == {}  # not limited

    fake_openai.set_rate_limits(tpm=1000)  # only the configured dimension has headers
    assert sorted(limit_headers(post_chat(fake_openai, max_tokens=1))) == [
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]


def test_requests_limit_refuses_with_429_and_refusals_count_against_it(fake_openai, clock):
    fake_openai.set_rate_limits(rpm=2)
    assert [post_chat(fake_openai).status_code for _ in range(2)] == [200, 200]
    with pytest.raises(openai.RateLimitError) as caught:
        chat(fake_openai)
    assert caught.value.body == {
        "message": f"Rate limit reached for {MODEL} in organization org-standin on requests per min (RPM): "
                   "Limit 2, Used 2, Requested 1. Please try again in 30s. "
                   "Visit https://platform.openai.com/account/rate-limits to learn more.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    # The refusal took its request too, down to the floor of -1/30 (one second of debt):
    # full again after (2 + 1/30) * 30 s.
    assert limit_headers(caught.value.response) == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m1s"}
    clock[0] += 30
    assert post_chat(fake_openai).status_code == 429  # -1/30 + 1 is less than one request
    clock[0] += 31
    assert post_chat(fake_openai).status_code == 200
    assert fake_openai.stats()["rate_limited"] == {"requests": 2}
    assert fake_openai.request_count == 5  # refused requests are recorded


def test_tokens_limit_counts_prompt_words_and_the_output_cap(fake_openai, clock):
    fake_openai.set_rate_limits(tpm=1000)
    fake_openai.rate_limit_retry_after = True
    assert post_chat(fake_openai, content="a b", max_completion_tokens=600, max_tokens=5).status_code == 200
    reply = post_chat(fake_openai, content="a b", max_completion_tokens=600)  # 602 wanted, 398 left
    assert reply.status_code == 429
    assert reply.json()["error"] == {
        "message": f"Rate limit reached for {MODEL} in organization org-standin on tokens per min (TPM): "
                   "Limit 1000, Used 602, Requested 602. Please try again in 12.24s. "
                   "Visit https://platform.openai.com/account/rate-limits to learn more.",
        "type": "tokens", "param": None, "code": "rate_limit_exceeded"}
    assert (reply.headers["retry-after-ms"], reply.headers["retry-after"]) == ("12240", "13")
    assert fake_openai.stats()["rate_limited"] == {"tokens": 1}

    fake_openai.set_rate_limits(tpm=1000)
    reply = post_chat(fake_openai, content="a b")  # no cap: charged 4096 output tokens, more than a minute
    assert reply.json()["error"]["message"].startswith(
        f"Request too large for {MODEL} in organization org-standin on tokens per min (TPM): "
        "Limit 1000, Requested 4098.")
    assert "retry-after" not in reply.headers


def test_rate_limits_start_from_the_initial_fill(fake_openai, clock):
    fake_openai.set_rate_limits(rpm=60, initial=0.0)  # a long job's steady state: one request a second
    assert post_chat(fake_openai).status_code == 429  # the bucket owes one request: -1
    clock[0] += 1
    reply = post_chat(fake_openai)  # back to 0, still short, and owing again
    assert reply.json()["error"]["message"].split(". ")[1] == "Please try again in 1s"
    clock[0] += 2
    assert post_chat(fake_openai).status_code == 200


def test_flex_requests_can_find_no_capacity(fake_openai):
    fake_openai.flex_unavailable = lambda body: body["messages"][-1]["content"] == "busy"
    reply = post_chat(fake_openai, content="busy", service_tier="flex")
    assert (reply.status_code, reply.json()) == (429, {"error": {
        "message": "Resource unavailable: there is no flex capacity for this request right now. "
                   "Please retry later, or send it with service_tier 'default'.",
        "type": "server_error", "param": None, "code": "resource_unavailable"}})
    assert post_chat(fake_openai, content="busy", service_tier="default").status_code == 200
    assert post_chat(fake_openai, content="calm", service_tier="flex").status_code == 200


# -- OpenAI: files and batches -----------------------------------------------------------


def batch_line(custom_id, content, url="/v1/chat/completions", **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def upload(client, *lines, name="in.jsonl"):
    return client.files.create(file=(name, ("\n".join(lines) + "\n").encode()), purpose="batch")


def start_batch(client, *lines):
    file = upload(client, *lines)
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def jsonl(client, file_id):
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_files_upload_retrieve_content_delete(fake_openai, clock):
    client = client_for(fake_openai)
    data = b'{"a": 1}\n{"b": 2}\n'
    file = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert file.model_dump(exclude={"id"}) == {
        "object": "file", "bytes": 18, "created_at": 1000, "expires_at": 1000 + 30 * 24 * 3600,
        "filename": "requests.jsonl", "purpose": "batch", "status": "processed", "status_details": None}
    assert file.id.startswith("file-")
    assert client.files.retrieve(file.id).bytes == 18
    assert client.files.content(file.id).content == data
    assert [f.id for f in client.files.list().data] == [file.id]
    assert fake_openai.requests[0].body == {"purpose": "batch", "file": {"filename": "requests.jsonl", "bytes": 18}}

    assert client.files.delete(file.id).model_dump() == {"id": file.id, "object": "file", "deleted": True}
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(file.id)
    assert caught.value.body["message"] == f"No such File object: {file.id}"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("requests.json", data), purpose="batch")
    assert caught.value.body["message"] == "Invalid file format for Batch API. Must be .jsonl"


def test_batch_answers_each_line_as_online_mode_in_shuffled_order(fake_openai, clock):
    client = client_for(fake_openai)
    ids = [f"r{i}" for i in range(8)]
    batch = start_batch(client, *[batch_line(i, f"question {i}") for i in ids])
    assert batch.model_dump(exclude={"id", "input_file_id"}) == {
        "object": "batch", "endpoint": "/v1/chat/completions", "model": MODEL, "errors": None,
        "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
        "created_at": 1000, "in_progress_at": None, "expires_at": 1000 + 24 * 3600, "finalizing_at": None,
        "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
        "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": None,
        "usage": {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}}
    assert batch.id.startswith("batch_")

    batch = client.batches.retrieve(batch.id)
    assert (batch.status, batch.completed_at, batch.error_file_id) == ("completed", 1000, None)
    assert batch.request_counts.model_dump() == {"total": 8, "completed": 8, "failed": 0}
    lines = jsonl(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == ids
    assert [line["custom_id"] for line in lines] != ids  # not the input order
    line = next(line for line in lines if line["custom_id"] == "r3")
    assert line["id"].startswith("batch_req_") and line["error"] is None
    assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith("req_")
    online = post_chat(fake_openai, content="question r3").json()
    for body in (line["response"]["body"], online):
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == (
            "Reasoning: The format fits the question.\nRevised response: **Answer**\n\nquestion r3")
        assert body["usage"]["prompt_tokens"] == 2
    assert [b.id for b in client.batches.list().data] == [batch.id]
    assert len(fake_openai.batches) == 1
    assert [f.purpose for f in fake_openai.files.values()] == ["batch", "batch_output"]


def test_batch_lines_that_fail_go_to_the_error_file(fake_openai, clock):
    fake_openai.profiles = {"*": Profile(max_n=1)}
    fake_openai.batch_failures = lambda custom_id: custom_id == "boom"
    fake_openai.add_fault(503, match=lambda body: body["messages"][0]["content"] == "flaky")
    client = client_for(fake_openai)
    batch = client.batches.retrieve(start_batch(
        client, batch_line("ok", "fine"), batch_line("two", "x", n=2), batch_line("boom", "x"),
        batch_line("flaky", "flaky")).id)
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert [line["custom_id"] for line in jsonl(client, batch.output_file_id)] == ["ok"]
    errors = {line["custom_id"]: line for line in jsonl(client, batch.error_file_id)}
    assert {cid: line["response"]["status_code"] for cid, line in errors.items()} == {
        "two": 400, "boom": 500, "flaky": 503}
    assert errors["two"]["response"]["body"]["error"]["param"] == "n"
    assert errors["boom"]["response"]["body"] == {"error": {
        "message": "The server had an error processing your request.", "type": "server_error",
        "param": None, "code": None}}
    assert errors["boom"]["error"] is None


def test_batch_status_moves_with_the_clock(fake_openai, clock):
    fake_openai.batch_validate_s, fake_openai.batch_seconds_per_line, fake_openai.batch_finalize_s = 10, 5, 20
    client = client_for(fake_openai)
    batch_id = start_batch(client, batch_line("a", "x"), batch_line("b", "y"), batch_line("c", "z")).id
    seen = []
    for now in (1009, 1010, 1020, 1025, 1045):
        clock[0] = now
        batch = client.batches.retrieve(batch_id)
        seen.append((now, batch.status, batch.request_counts.total, batch.request_counts.completed,
                     batch.output_file_id is not None))
    assert seen == [(1009, "validating", 0, 0, False), (1010, "in_progress", 3, 0, False),
                    (1020, "in_progress", 3, 2, False), (1025, "finalizing", 3, 3, False),
                    (1045, "completed", 3, 3, True)]
    assert (batch.in_progress_at, batch.finalizing_at, batch.completed_at) == (1010, 1025, 1045)


def test_batch_input_that_fails_validation(fake_openai, clock):
    client = client_for(fake_openai)
    batch = start_batch(client, batch_line("a", "x"), batch_line("a", "y"), "not json",
                        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions"}),
                        batch_line("d", "x", url="/v1/completions"))
    batch = client.batches.retrieve(batch.id)
    assert (batch.status, batch.failed_at, batch.output_file_id) == ("failed", 1000, None)
    assert batch.request_counts.total == 0
    assert [e.model_dump() for e in batch.errors.data] == [
        {"code": "duplicate_custom_id", "line": 2, "param": "custom_id",
         "message": "The custom_id for this request is a duplicate of another request. "
                    "The custom_id parameter must be unique for each request in a batch."},
        {"code": "invalid_json_line", "line": 3, "param": None,
         "message": "This line is not parseable as valid JSON."},
        {"code": "missing_required_parameter", "line": 4, "param": "body",
         "message": "Missing required parameter: 'body'."},
        {"code": "invalid_url", "line": 5, "param": "url",
         "message": "The url '/v1/completions' does not match the batch endpoint '/v1/chat/completions'."}]


def test_batch_cancel_keeps_the_lines_done(fake_openai, clock):
    fake_openai.batch_seconds_per_line, fake_openai.batch_cancel_s = 5, 4
    client = client_for(fake_openai)
    batch_id = start_batch(client, batch_line("a", "x"), batch_line("b", "y"), batch_line("c", "z")).id
    clock[0] = 1007  # one line done at 1005
    batch = client.batches.cancel(batch_id)
    assert (batch.status, batch.cancelling_at, batch.request_counts.completed) == ("cancelling", 1007, 1)
    clock[0] = 1010
    assert client.batches.retrieve(batch_id).status == "cancelling"
    clock[0] = 1011
    batch = client.batches.retrieve(batch_id)
    assert (batch.status, batch.cancelled_at, batch.error_file_id) == ("cancelled", 1011, None)
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 0}
    assert len(jsonl(client, batch.output_file_id)) == 1
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch_id)


def test_batch_expiry_keeps_done_lines_and_lists_the_rest_as_expired(fake_openai, clock):
    fake_openai.batch_expire_after_lines = 1
    client = client_for(fake_openai)
    batch = client.batches.retrieve(start_batch(client, batch_line("a", "x"), batch_line("b", "y"),
                                                batch_line("c", "z")).id)
    assert (batch.status, batch.expired_at) == ("expired", 1000)
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
    assert len(jsonl(client, batch.output_file_id)) == 1
    expired = jsonl(client, batch.error_file_id)
    assert [(line["response"], line["error"]) for line in expired] == [(None, {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired."})] * 2

    fake_openai.batch_expire_after_lines, fake_openai.batch_seconds_per_line = None, 10
    fake_openai.batch_expire_after_s = 25  # lines due at 1010, 1020, 1030
    batch = start_batch(client, batch_line("a", "x"), batch_line("b", "y"), batch_line("c", "z"))
    assert batch.expires_at == 1025
    clock[0] = 1024
    assert client.batches.retrieve(batch.id).request_counts.completed == 2
    clock[0] = 1025
    batch = client.batches.retrieve(batch.id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("expired", 2, 1)


def test_a_batch_past_the_enqueued_token_limit_fails_until_the_queue_drains(fake_openai, clock):
    fake_openai.batch_token_limit = 5
    fake_openai.batch_seconds_per_line = 10
    client = client_for(fake_openai)
    first = start_batch(client, batch_line("a", "one two"), batch_line("b", "three four"))  # 4 tokens queued
    second = client.batches.retrieve(start_batch(client, batch_line("c", "five six")).id)
    assert (second.status, second.request_counts.total) == ("failed", 0)
    assert [e.model_dump() for e in second.errors.data] == [{
        "code": "token_limit_exceeded", "line": None, "param": None,
        "message": "Enqueued token limit reached for gpt-3.5-turbo-1106 in organization org-standin. Limit: 5 "
                   "enqueued tokens. Please try submitting an equivalent batch once your ongoing batches have "
                   "completed."}]
    clock[0] = 1020  # the first batch completed: its tokens are no longer queued
    assert client.batches.retrieve(first.id).status == "completed"
    third = start_batch(client, batch_line("c", "five six"))
    clock[0] = 1030
    assert client.batches.retrieve(third.id).status == "completed"


def test_faults_aimed_at_uploads_and_batch_creation(fake_openai, clock):
    fake_openai.set_rate_limits(rpm=1)
    assert post_chat(fake_openai).status_code == 200  # the minute's one request is spent
    fake_openai.add_fault(500, path="/v1/files")
    fake_openai.add_fault(503, path="/v1/batches", method="POST")
    fake_openai.add_fault(429)  # no path: the completion endpoints (and batch lines) only
    client = client_for(fake_openai)
    assert [m.id for m in client.models.list().data][:1] == ["gpt-6-luna"]  # takes no fault
    with pytest.raises(openai.InternalServerError):
        upload(client, batch_line("a", "x"))
    file = upload(client, batch_line("a", "x"), batch_line("b", "x"))
    with pytest.raises(openai.InternalServerError):
        client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = client.batches.retrieve(batch.id)  # batch lines ignore the rate limits
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
    assert [line["response"]["status_code"] for line in jsonl(client, batch.error_file_id)] == [429]
    assert sum(f.purpose == "batch" for f in fake_openai.files.values()) == 1
    assert len(fake_openai.batches) == 1
    assert fake_openai.stats()["uploads"] == 1


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


def test_spawned_openai_server_takes_limits_profile_and_models():
    process, port = spawn("openai", rpm=2, profile="reasoning", refuse_n=True,
                          models={"gpt-6-luna": None, "gpt-old": "2020-01-01"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        listed = requests.get(url + "/models", timeout=5).json()
        body = {"model": "gpt-6-luna", "messages": [{"role": "user", "content": "hi"}]}
        replies = [requests.post(url + "/chat/completions", json={**body, **extra}, timeout=5)
                   for extra in ({"max_tokens": 5}, {"n": 2}, {})]
    finally:
        stats = stop_spawned(process)
    assert [m["id"] for m in listed["data"]] == ["gpt-6-luna"]
    assert [(r.status_code, r.json()["error"]["param"]) for r in replies] == [
        (400, "max_tokens"), (400, "n"), (429, None)]
    assert replies[0].headers["x-ratelimit-limit-requests"] == "2"
    assert (stats["requests"], stats["main_requests"], stats["rate_limited"]) == (4, 3, {"requests": 1})
