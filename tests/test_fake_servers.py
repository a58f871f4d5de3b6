"""The fake servers of the tests (tests/fake_servers.py) and the demo's stand-ins
(realign/demo.py) answer the real clients as the real APIs do.

Only the wire shapes are pinned here: what a client sees (replies, error bodies, headers);
the fakes' behaviour is exercised by the tests of the stages that use them. Time-dependent
behaviour runs on an injected clock, so nothing here measures time.
"""

import json

import openai
import pytest
import requests

import constant

MODEL = "gpt-3.5-turbo-1106"
ORIGINAL = "1. Eat well.\n\n2. Sleep.\n[Original response end] is a marker.\n3. Move."
REWRITE_REQUEST = constant.REFORMAT_PROMPTS["adaptive"]["evidence"]["user"].format(
    question="Give three tips for staying healthy.", response=ORIGINAL,
    format="the answer; explanation; conclusion", evidence="1. Sleep matters.")


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
    url = getattr(server, "search_url", None) or server.url
    return requests.post(url, json={"q": query, "gl": "us", "hl": "en"}, headers={"X-API-KEY": key}, timeout=5)


@pytest.fixture
def clock(fake_openai):
    """Freeze the fake's clock at t=1000; advance it with `clock[0] = ...`."""
    now = [1000.0]
    fake_openai.clock = lambda: now[0]
    return now


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


def test_429_carries_retry_after_and_is_consumed(fake_openai):
    fake_openai.add_fault(status=429, retry_after=1)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(fake_openai)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    assert chat(fake_openai).choices[0].finish_reason == "stop"


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


# -- the demo's stand-ins (realign/demo.py) ------------------------------------------------


@pytest.mark.slow
def test_the_demo_stand_ins_answer_the_real_clients():
    from realign.demo import StandIn

    with StandIn("openai") as server, StandIn("serper") as search_server:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        assert {m.id for m in client.models.list()} >= {"gpt-6-luna", "gpt-6-sol"}
        assert client.models.retrieve("gpt-6-luna").id == "gpt-6-luna"
        messages = [{"role": "system", "content": "Reformat."}, {"role": "user", "content": REWRITE_REQUEST}]
        text = client.chat.completions.create(model="gpt-6-luna", messages=messages, n=2)
        assert len(text.choices) == 2 and text.choices[0].message.content == (
            f"Reasoning: The format fits the question.\nRevised response: **Answer**\n\n{ORIGINAL}")
        schema = {"type": "json_schema", "json_schema": {"name": "revision", "schema": {}}}
        as_json = client.chat.completions.create(model="gpt-6-luna", messages=messages, response_format=schema)
        assert json.loads(as_json.choices[0].message.content)["revised_response"] == f"**Answer**\n\n{ORIGINAL}"
        assert as_json.usage.completion_tokens > 0 and as_json.usage.prompt_tokens > 0
        reply = search(search_server, "Who wrote Dune?", key="none")
        assert [r["snippet"] for r in reply.json()["organic"]][0] == "Result 1 about Who wrote Dune?."
