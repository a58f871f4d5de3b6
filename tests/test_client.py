"""The shared client (realign/client.py) and what it stands on: adapting requests to what a
server accepts, the model check, pacing by the rate-limit headers, the request cache, prices
and the spending cap. Against the fake OpenAI server, with reformat.py as the caller where
a whole run is needed."""

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from fake_servers import LEGACY, FakeOpenAIServer

import reformat
from realign.cache import Cache, request_key
from realign.client import Adapter, OpenAITransport, refused_field
from realign.engine import Refusal
from realign.pacing import parse_reset
from realign.pricing import Budget, BudgetReached, Spend, find_price, price_of_run
from realign.records import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-client-test-secret-31"


pytestmark = pytest.mark.usefixtures("api_env")  # no ambient OpenAI or Slurm variables; OPENAI_API_KEY=KEY


def record(i, category="open_qa"):
    return {"id": i, "items": [{"from": "human", "value": f"Question {i}?", "category": category},
                               {"from": "gpt", "value": f"Answer {i}."}]}


def reformat_run(tmp_path, server, n=3, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "input.json"
    path.write_text(json.dumps([record(i) for i in range(n)]), encoding="utf-8")
    status = reformat.main(["--input_data_path", str(path), "--output_directory", str(tmp_path / "out"),
                            "--base_url", server.url, *extra])
    batch = tmp_path / "out" / "rewrite_data_0_of_1_batch.jsonl"
    lines = [json.loads(line) for line in batch.read_text().splitlines()] if batch.exists() else []
    return status, lines


def chats(server):
    return server.requests_to("/v1/chat/completions")


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def error_line(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if ": error: " in line][-1]


# -- adapting the body ----------------------------------------------------------------------


def refusal(message, param=None, code=None):
    return Refusal(400, {"message": message, "type": "invalid_request_error", "param": param, "code": code})


def test_the_refused_field_is_found_in_param_or_in_the_message():
    body = {"model": "m", "messages": [], "max_tokens": 10, "temperature": 0.3}
    assert refused_field(body, refusal("x", param="max_tokens")) == "max_tokens"
    # The message names the field, and also the one to use instead, which is not in the body.
    assert refused_field(body, refusal("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                       "Use 'max_completion_tokens' instead.")) == "max_tokens"
    assert refused_field(body, refusal("Unrecognized request argument supplied: temperature")) == "temperature"
    assert refused_field(body, refusal("The messages are too long.")) is None  # 'messages' is never adapted


def test_the_adapter_renames_the_cap_drops_a_value_and_splits_n():
    adapter = Adapter("/chat/completions")
    logical = {"model": "m", "messages": [], "n": 2, "temperature": 0.3, "max_output_tokens": 100}
    assert adapter.apply(logical) == [{"model": "m", "messages": [], "n": 2, "temperature": 0.3,
                                       "max_completion_tokens": 100}]
    assert adapter.learn(adapter.apply(logical)[0], refusal("Unrecognized request argument supplied: "
                                                             "max_completion_tokens"))
    assert adapter.learn(adapter.apply(logical)[0], refusal("no", param="temperature", code="unsupported_value"))
    assert adapter.learn(adapter.apply(logical)[0], refusal("only 1", param="n", code="unsupported_value"))
    assert adapter.apply(logical) == [{"model": "m", "messages": [], "n": 1, "max_tokens": 100}] * 2
    assert len(adapter.notes) == 3
    # Learning the same refusal again changes nothing: each adaptation happens once.
    assert not adapter.learn({"model": "m", "messages": [], "n": 1, "max_tokens": 100},
                             refusal("no", param="temperature"))


def test_a_default_reasoning_effort_moves_up_and_a_chosen_one_is_dropped():
    adapter = Adapter("/chat/completions", effort_is_default=True)
    body = {"model": "m", "messages": [], "reasoning_effort": "none"}
    assert adapter.learn(body, refusal("no", param="reasoning_effort", code="unsupported_value"))
    assert adapter.apply(body) == [{"model": "m", "messages": [], "reasoning_effort": "minimal"}]
    other = Adapter("/chat/completions")  # chosen with --reasoning_effort: left out, not changed
    assert other.learn(body, refusal("no", param="reasoning_effort", code="unsupported_value"))
    assert other.apply(body) == [{"model": "m", "messages": []}]


def test_an_older_server_gets_max_tokens_and_no_new_fields(tmp_path, fake_openai, caplog):
    fake_openai.profiles = {"*": LEGACY}  # refuses max_completion_tokens, reasoning_effort, service_tier
    with caplog.at_level(logging.INFO):
        status, lines = reformat_run(tmp_path, fake_openai, 3, "--concurrency", "1", "--service_tier", "flex")
    assert status == 0 and all("status" not in line for line in lines)
    sent = [r.body for r in chats(fake_openai)]
    final = sent[-1]
    assert final["max_tokens"] == 2048 and "max_completion_tokens" not in final
    assert "reasoning_effort" not in final and "service_tier" not in final
    assert len(sent) == 3 + 3  # one refusal per adaptation, then the three records
    assert sum("refused" in w for w in warnings_of(caplog)) == 3


def test_settings_reach_the_body_and_none_leaves_a_field_out(tmp_path, fake_openai):
    status, _ = reformat_run(tmp_path, fake_openai, 1, "--reasoning_effort", "low", "--service_tier", "priority",
                             "--extra_body", '{"chat_template_kwargs": {"enable_thinking": false}, "seed": 7}',
                             "--temperature", "none", "--top_p", "none")
    assert status == 0
    body = chats(fake_openai)[0].body
    assert (body["reasoning_effort"], body["service_tier"], body["seed"]) == ("low", "priority", 7)
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "temperature" not in body and "top_p" not in body


@pytest.mark.parametrize("value", ["[1, 2]", "{not json"])
def test_extra_body_must_be_a_json_object(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reformat.parse_args(["--input_data_path", "x", "--output_directory", "y", "--extra_body", value])
    assert exit_info.value.code == 2
    assert "--extra_body" in capsys.readouterr().err


@pytest.mark.slow
def test_flex_waits_longer_and_a_busy_flex_tier_is_retried(tmp_path, fake_openai):
    assert reformat.parse_args(["--input_data_path", "x", "--output_directory", "y",
                                "--service_tier", "flex"]).request_timeout == 900.0
    answered = []
    fake_openai.flex_unavailable = lambda body: not answered and not answered.append(1)  # the first one only
    status, lines = reformat_run(tmp_path, fake_openai, 1, "--service_tier", "flex")
    assert status == 0 and len(chats(fake_openai)) == 2
    assert "status" not in lines[0]


# -- the model check ------------------------------------------------------------------------


def test_a_shut_down_model_stops_at_once_and_a_retiring_one_warns(tmp_path, fake_openai, caplog, capsys):
    fake_openai.models = {"gpt-6-luna": {}, "gpt-4o-mini": {"shutdown_date": "2027-01-14"},
                          "gpt-5": {"shutdown_date": "2026-12-11"}}
    fake_openai.today = "2026-12-01"
    with caplog.at_level(logging.WARNING):
        status, _ = reformat_run(tmp_path, fake_openai, 1, "--model", "gpt-4o-mini")
    assert status == 0
    assert "model 'gpt-4o-mini' is deprecated: it shuts down on 2027-01-14" in warnings_of(caplog)

    fake_openai.today = "2026-12-11"  # the day gpt-5 shuts down: gone from the list
    status, _ = reformat_run(tmp_path / "b", fake_openai, 1, "--model", "gpt-5")
    assert status == 1
    assert error_line(capsys) == (f"reformat: error: model 'gpt-5' is not offered by {fake_openai.url}; it offers: "
                                  "gpt-4o-mini, gpt-6-luna (choose one with --model, or pass --no-model_check for a gateway that accepts names it does not list)")


def test_a_listed_model_past_its_shutdown_date_stops(fake_openai, capsys):
    import datetime

    fake_openai.models = {"old-model": {"shutdown_date": "2026-10-23"}}
    fake_openai.today = "2026-10-01"  # the server still lists it; our clock says it is gone

    async def check():
        transport = OpenAITransport(fake_openai.url, KEY)
        try:
            await transport.check_model("old-model", today=datetime.date(2026, 12, 1))
        finally:
            await transport.close()

    with pytest.raises(Exception, match=r"model 'old-model' was shut down on 2026-10-23"):
        asyncio.run(check())


def test_a_server_without_a_models_endpoint_is_not_checked(tmp_path, fake_openai):
    fake_openai.models_endpoint = "none"
    status, lines = reformat_run(tmp_path, fake_openai, 2, "--model", "anything-goes")
    assert status == 0 and len(lines) == 2


# -- pacing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("12ms", 0.012), ("1s", 1.0), ("6m0s", 360.0), ("1m30.5s", 90.5),
                                           ("2h3m", 7380.0), ("0.5", 0.5), ("soon", None), ("1x", None)])
def test_reset_durations_are_read_as_openai_writes_them(text, seconds):
    assert parse_reset(text) == seconds


@pytest.mark.slow
def test_pacing_against_a_rate_limited_server_gets_almost_no_429(tmp_path, fake_openai, caplog):
    fake_openai.set_rate_limits(rpm=600, initial=0.0)  # 10 a second, from an empty bucket
    with caplog.at_level(logging.INFO):
        status, lines = reformat_run(tmp_path, fake_openai, 20, "--concurrency", "16")
    assert status == 0 and len(lines) == 20
    refused = sum((fake_openai.stats()["rate_limited"] or {}).values())
    assert refused <= 1  # at most the first request, sent before any header said the limit
    assert "pacing: 600 requests/min" in caplog.text


@pytest.mark.slow
def test_progress_in_a_log_file_is_not_redrawn_per_record(tmp_path):
    path = tmp_path / "input.json"
    path.write_text(json.dumps([record(i) for i in range(40)]), encoding="utf-8")
    with FakeOpenAIServer(latency=0.02) as server:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", str(path),
                               "--output_directory", str(tmp_path / "out"), "--base_url", server.url,
                               "--concurrency", "2"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OPENAI_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    bar_updates = done.stderr.count("chunk 0:")
    assert bar_updates <= 3  # opened, closed: not once per record


# -- the cache -------------------------------------------------------------------------------


def test_keys_depend_on_every_part_of_the_request():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0.3}
    key = request_key("https://api.example/v1/chat/completions", body)
    assert key == request_key("https://api.example/v1/chat/completions", dict(reversed(list(body.items()))))
    for changed in ({**body, "n": 3}, {**body, "temperature": 0.2}, {**body, "model": "m2"},
                    {**body, "messages": [{"role": "user", "content": "hi!"}]}):
        assert request_key("https://api.example/v1/chat/completions", changed) != key
    assert request_key("https://other.example/v1/chat/completions", body) != key


def test_no_cache_reads_and_writes_nothing_and_refresh_writes_only(tmp_path):
    with Cache(str(tmp_path), read=True, write=True) as cache:
        cache.put("k", {"choices": [1]})
        assert cache.get("k") == {"choices": [1]}
    with Cache(str(tmp_path), read=False, write=True) as refresh:
        assert refresh.get("k") is None
        refresh.put("k", {"choices": [2]})
    with Cache(str(tmp_path / "none"), read=False, write=False) as off:
        off.put("k", {"choices": [3]})
        assert off.get("k") is None
    assert not os.path.exists(tmp_path / "none")
    with Cache(str(tmp_path)) as cache:
        assert cache.get("k") == {"choices": [2]}


def write_entries(directory, worker, count):
    cache = Cache(directory)
    for i in range(count):
        cache.put(f"w{worker}-{i}", {"worker": worker, "i": i, "text": "x" * 500})
        cache.put("shared", {"worker": worker})
    cache.close()


def open_at_once(directory, barrier, worker):
    barrier.wait()  # every process opens the new cache at the same moment, as a Slurm array's do
    with Cache(directory) as cache:
        cache.put(f"w{worker}", {"worker": worker})


@pytest.mark.slow
def test_processes_creating_one_cache_at_the_same_moment_all_open_it(tmp_path):
    # Before the database is in WAL mode SQLite refuses some of them at once ("database is
    # locked"); without the retry, 10 of 40 rounds of six processes had such a refusal here.
    context = multiprocessing.get_context("fork")
    for round_ in range(12):
        directory = str(tmp_path / f"cache{round_}")
        barrier = context.Barrier(8)
        workers = [context.Process(target=open_at_once, args=(directory, barrier, w)) for w in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0] * 8, f"round {round_}"
        with Cache(directory) as cache:
            assert [cache.get(f"w{w}") for w in range(8)] == [{"worker": w} for w in range(8)]


@pytest.mark.slow
def test_eight_processes_writing_one_cache_lose_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=write_entries, args=(str(tmp_path), w, 150)) for w in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    with Cache(str(tmp_path)) as cache:
        for w in range(8):
            for i in range(150):
                assert cache.get(f"w{w}-{i}") == {"worker": w, "i": i, "text": "x" * 500}
        assert cache.get("shared")["worker"] in range(8)
    db = sqlite3.connect(tmp_path / "requests.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT COUNT(*) FROM replies").fetchone() == (8 * 150 + 1,)


@pytest.mark.slow
def test_a_kill_while_writing_leaves_a_cache_the_next_run_reads(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from realign.cache import Cache\n"
            "c = Cache(sys.argv[1])\n"
            "for i in range(100000): c.put(f'k{i}', {'i': i, 'text': 'y' * 2000})\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), ROOT])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (tmp_path / "requests.sqlite3-wal").exists() and (tmp_path / "requests.sqlite3-wal").stat().st_size > 2e6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    with Cache(str(tmp_path)) as cache:
        rows = cache._db.execute("SELECT key FROM replies").fetchall()
        assert rows  # what was committed is there
        assert all(cache.get(key) is not None for (key,) in rows[:50])
        cache.put("after", {"ok": True})
        assert cache.get("after") == {"ok": True}
    db = sqlite3.connect(tmp_path / "requests.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- prices and the cap ----------------------------------------------------------------------


def test_the_price_of_a_run_follows_its_tier_and_a_cap_without_a_price_is_a_usage_error():
    import argparse

    def flags(**given):
        values = {"service_tier": None, "price_input": None, "price_output": None, "price_cached_input": None,
                  "max_cost": None}
        return argparse.Namespace(**{**values, **given})

    assert price_of_run(flags(), "gpt-6-luna").input * 1e6 == pytest.approx(0.10)
    assert price_of_run(flags(service_tier="flex"), "gpt-6-luna").input * 1e6 == pytest.approx(0.05)
    assert price_of_run(flags(), "gpt-6-luna", batch=True).output * 1e6 == pytest.approx(0.25)
    assert price_of_run(flags(), "my-local-model") is None  # no cap: an unknown price is only unknown
    with pytest.raises(InputError, match=r"--max_cost needs a price for 'my-local-model'.*--price_input"):
        price_of_run(flags(max_cost=1.0), "my-local-model")
    assert price_of_run(flags(max_cost=1.0, price_input=2, price_output=4), "my-local-model").output * 1e6 == 4


def test_prices_come_from_the_table_or_the_flags():
    luna = find_price("gpt-6-luna")
    assert (luna.input * 1e6, luna.cached_input * 1e6, luna.output * 1e6) == pytest.approx((0.10, 0.01, 0.50))
    batch = find_price("gpt-6-luna-2026-09-22", "batch")  # a dated snapshot, at the Batch API's price
    assert (batch.input * 1e6, batch.output * 1e6) == pytest.approx((0.05, 0.25))
    assert find_price("my-local-model") is None
    mine = find_price("my-local-model", price_input=2, price_output=4)
    assert mine.cost(prompt_tokens=1_000_000, completion_tokens=500_000) == pytest.approx(4.0)
    assert luna.cost(prompt_tokens=1000, completion_tokens=0, cached_tokens=400) == pytest.approx(
        (600 * 0.10 + 400 * 0.01) / 1e6)


def test_the_budget_counts_the_requests_in_flight_and_learns_longer_replies():
    spend = Spend(find_price("x", price_input=1_000_000, price_output=1_000_000))  # $1 per token: easy sums
    budget = Budget(10.0, spend)
    first = budget.reserve(2, 2)  # $4
    second = budget.reserve(2, 2)  # $8 in flight
    with pytest.raises(BudgetReached, match=r"budget reached: \$0.0000 of \$10.0000"):
        budget.reserve(2, 2)
    spend.add_usage({"prompt_tokens": 2, "completion_tokens": 4})  # the reply was twice as long
    budget.settle(first, expected_completion=2, actual_completion=4)
    assert budget.ratio() == 2.0
    assert budget.estimate(1, 1) == 3.0  # 1 in + 1 x 2 out
    budget.settle(second)
