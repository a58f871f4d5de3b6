"""reformat.py --batch_api (realign/batch_api.py): batches against the fake server's Files and Batch API."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_servers import REASONING, FakeOpenAIServer

import reformat
from realign import batch_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-batch-5ecret-0077"
FAST = ["--batch_api", "--poll_interval", "0.01"]


pytestmark = pytest.mark.usefixtures("api_env")  # no ambient OpenAI or Slurm variables; OPENAI_API_KEY=KEY


def record(record_id, category="open_qa", response=None):
    response = response or f"The answer of record {record_id!r}."
    return {"id": record_id, "items": [{"from": "human", "value": f"Question {record_id!r}?", "category": category},
                                       {"from": "gpt", "value": response}]}


def write_input(folder, records):
    path = folder / "input.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run(folder, server, records, *extra, out="out"):
    """Write ``records`` (once), run main against ``server``; return (exit status, batch lines by id)."""
    path = folder / "input.json"
    if not path.exists():
        write_input(folder, records)
    status = reformat.main(["--input_data_path", str(path), "--output_directory", str(folder / out),
                            "--base_url", server.url, *extra])
    return status, lines_by_id(folder / out / "rewrite_data_0_of_1_batch.jsonl")


def lines_by_id(path):
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    ids = [(type(line["id"]).__name__, line["id"]) for line in lines]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {line["id"]: line for line in lines}


def revised(line):
    return line["items"][1]["revised_response"]["revised_response"]


def batch_ids(server, number):
    """The record ids of the lines of the server's batch ``number`` (0-based), from their custom ids."""
    batch = list(server.batches.values())[number]
    return sorted((custom_id.split("@")[0] for custom_id, _ in batch.lines))


def record_file(folder, out="out"):
    with open(folder / out / "batches_0_of_1.json", encoding="utf-8") as f:
        return json.load(f)


def chats(server):
    return server.requests_to("/v1/chat/completions")


# -- pure functions ------------------------------------------------------------------


def test_custom_ids_keep_int_and_string_ids_apart_and_stay_short():
    fp = "0123456789abcdef01234567"
    assert batch_api.custom_id(1, fp) == "i:1@0123456789abcdef01234567"
    assert batch_api.custom_id("1", fp) == "s:1@0123456789abcdef01234567"
    long_id = "x" * 200
    assert batch_api.custom_id(long_id, fp) != batch_api.custom_id(long_id + "y", fp)
    assert batch_api.custom_id(long_id, fp).startswith("h:") and len(batch_api.custom_id(long_id, fp)) == 59
    assert batch_api.base_of("s:a#b@0123456789abcdef01234567#1") == "s:a#b@0123456789abcdef01234567"
    assert batch_api.base_of("s:a#b@0123456789abcdef01234567") == "s:a#b@0123456789abcdef01234567"


# -- a whole chunk -----------------------------------------------------------------


def test_every_id_ends_in_the_batch_file_once_with_its_own_answer(tmp_path, fake_openai, caplog):
    records = [record(i) for i in range(12)] + [record(str(i)) for i in range(3)] + [record(99, "story_generation")]
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, *FAST, "--batch_max_requests", "5")
    assert status == 0
    assert sorted(lines, key=str) == sorted([r["id"] for r in records], key=str)  # 1 and "1" both, once each
    for record_id, line in lines.items():
        if record_id == 99:
            assert line["items"][1]["revised_response"]["reason"].startswith("task 'story_generation' is not")
            continue
        # The fake answers "**Answer**" + the record's own original response, in shuffled order.
        assert revised(line) == f"**Answer**\n\nThe answer of record {record_id!r}."
        assert "status" not in line
    # 15 records to rewrite: the first online (the probe), 14 in request files of at most 5 lines.
    assert len(chats(fake_openai)) == 1
    assert [len(b.lines) for b in fake_openai.batches.values()] == [5, 5, 4]
    assert fake_openai.stats()["uploads"] == 3
    lines_of_batches = [custom_id for b in fake_openai.batches.values() for custom_id, _ in b.lines]
    assert len(set(lines_of_batches)) == 14
    body = next(iter(fake_openai.batches.values())).lines[0][1]
    assert body["max_completion_tokens"] == 2048 and "max_output_tokens" not in body  # as the client sends it
    recorded = record_file(tmp_path)
    assert [(e["lines"], e["status"], e["collected"]) for e in recorded["entries"]] == [
        (5, "completed", True), (5, "completed", True), (4, "completed", True)]
    assert all(e["batch_id"] in fake_openai.batches and e["file_id"] in fake_openai.files
               for e in recorded["entries"])
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("#chunk"))
    assert "batch API: uploads: 3, batches: 3 (and 0 of earlier runs, 0 adopted after a crash)" in summary
    assert "resubmission rounds: 0, lines from batches: 14, lines from the cache: 0, online requests: 1" in summary
    assert "failed: 0" in summary and "spend: $" in summary


def test_batch_mode_and_online_mode_write_the_same_lines(tmp_path, fake_openai):
    records = [record(i) for i in range(8)] + [record("eight")]
    status, batch_lines = run(tmp_path, fake_openai, records, *FAST, "--no-cache", out="batch")
    assert status == 0
    status, online_lines = run(tmp_path, fake_openai, records, "--no-cache", out="online")
    assert status == 0
    assert batch_lines == online_lines  # fingerprints included

    fake_openai.requests.clear()
    status, again = run(tmp_path, fake_openai, records, "--no-cache", out="batch")  # online after batch
    assert status == 0 and again == batch_lines and chats(fake_openai) == []


def test_a_reasoning_model_is_probed_online_once_and_no_batch_line_is_refused(tmp_path, fake_openai):
    fake_openai.profiles = {"*": REASONING}  # refuses temperature 0.3, reformat's default
    status, lines = run(tmp_path, fake_openai, [record(i) for i in range(6)], *FAST)
    assert status == 0 and len(lines) == 6
    assert len(fake_openai.batches) == 1  # no second round for refused lines
    (batch,) = fake_openai.batches.values()
    assert batch.failures == [] and len(batch.lines) == 5
    assert all("temperature" not in body for _, body in batch.lines)


# -- failures and resubmission ------------------------------------------------------


def test_failed_lines_are_sent_again_and_only_they(tmp_path, fake_openai):
    failing = {"i:3", "i:5"}
    seen = set()

    def fail_once(custom_id):
        record_id = custom_id.split("@")[0]
        if record_id in failing and record_id not in seen:
            seen.add(record_id)
            return 500
        return None

    fake_openai.batch_failures = fail_once
    fake_openai.add_fault(kind="malformed", match=lambda body: "Question 7?" in body["messages"][-1]["content"])
    status, lines = run(tmp_path, fake_openai, [record(i) for i in range(10)], *FAST)
    assert status == 0 and sorted(lines) == list(range(10))
    assert batch_ids(fake_openai, 0) == [f"i:{i}" for i in range(1, 10)]  # record 0 went online first
    assert batch_ids(fake_openai, 1) == ["i:3", "i:5", "i:7"]  # two errors and one unusable reply
    assert len(fake_openai.batches) == 2
    assert revised(lines[7]) == "**Answer**\n\nThe answer of record 7."
    recorded = record_file(tmp_path)
    assert (recorded["rounds"], recorded["resubmission_rounds"], recorded["attempts"]) == (2, 1, {})
    assert [e["resubmitted_lines"] for e in recorded["entries"]] == [0, 3]


def test_lines_failing_past_the_bounds_are_written_as_failed(tmp_path, fake_openai, caplog):
    fake_openai.batch_failures = lambda custom_id: custom_id.startswith("i:2@")
    fake_openai.add_fault(kind="malformed", times=None,
                          match=lambda body: "Question 4?" in body["messages"][-1]["content"])
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, [record(i) for i in range(6)], *FAST, "--max_retries", "2",
                            "--max_parse_retries", "1")
    assert status == 1
    assert (lines[2]["status"], lines[2]["error"]) == ("failed", "failed after 3 attempts: HTTP 500")
    assert (lines[4]["status"], lines[4]["candidate_checks"]) == (
        "rejected", {"candidates": 4, "failing": 4, "problems": {"unparsable": 4}})
    assert revised(lines[4]) == "The answer of record 4."  # the original response, as online
    assert all("status" not in lines[i] for i in (0, 1, 3, 5))
    assert [batch_ids(fake_openai, n) for n in range(len(fake_openai.batches))] == [
        ["i:1", "i:2", "i:3", "i:4", "i:5"], ["i:2", "i:4"], ["i:2"]]
    assert "kept the original (no candidate passed the checks): 1, passed through: 0, failed: 1" in caplog.text


def test_an_expired_batch_keeps_its_completed_lines_and_sends_only_the_rest(tmp_path, fake_openai):
    fake_openai.batch_expire_after_lines = 3  # every batch of more than 3 lines expires after 3
    status, lines = run(tmp_path, fake_openai, [record(i) for i in range(11)], *FAST)
    assert status == 0 and sorted(lines) == list(range(11))
    sizes = [len(b.lines) for b in fake_openai.batches.values()]
    assert sizes == [10, 7, 4, 1]
    for earlier, later in zip(list(fake_openai.batches.values()), list(fake_openai.batches.values())[1:]):
        answered = {line["custom_id"] for line in earlier.outputs}
        assert len(answered) == 3
        assert {custom_id for custom_id, _ in later.lines} == {c for c, _ in earlier.lines} - answered
    assert [e["status"] for e in record_file(tmp_path)["entries"]] == ["expired", "expired", "expired", "completed"]


def test_a_batch_refused_for_the_enqueued_token_limit_waits_for_the_running_ones(tmp_path, fake_openai):
    fake_openai.batch_token_limit = 1700  # a line's prompt is about 250 tokens: two batches of 3 fit, not three
    fake_openai.batch_seconds_per_line = 0.1
    t0 = time.time()  # the server's clock stands still until the third batch exists: however slow the
    fake_openai.clock = lambda: t0 if len(fake_openai.batches) < 3 else time.time()  # machine, 1 and 2 still run
    status, lines = run(tmp_path, fake_openai, [record(i) for i in range(10)], *FAST, "--batch_max_requests", "3")
    assert status == 0 and sorted(lines) == list(range(10)) and all("status" not in line for line in lines.values())
    batches = list(fake_openai.batches.values())
    assert [b.status for b in batches] == ["completed", "completed", "failed", "completed"]
    assert batches[2].errors[0]["code"] == "token_limit_exceeded"
    assert batch_ids(fake_openai, 3) == batch_ids(fake_openai, 2) == ["i:7", "i:8", "i:9"]
    assert batches[3].created >= max(b.stamps["completed_at"] for b in batches[:2])  # sent once the queue drained


def test_the_last_try_goes_online_with_batch_fallback_online(tmp_path, fake_openai):
    fake_openai.batch_failures = lambda custom_id: custom_id.startswith(("i:2@", "i:3@"))  # in batches, always
    status, lines = run(tmp_path, fake_openai, [record(i) for i in range(5)], *FAST, "--max_retries", "1",
                        "--batch_fallback_online")
    assert status == 0 and all("status" not in line for line in lines.values())
    assert len(fake_openai.batches) == 1  # the second and last try of 2 and 3 went online
    asked_online = sorted(r.body["messages"][-1]["content"].split("\n")[1] for r in chats(fake_openai))
    assert asked_online == ["Question 0?", "Question 2?", "Question 3?"]  # the probe, then the last tries


# -- the cache, the dry run, the budget ----------------------------------------------


def test_the_cache_answers_before_the_request_file_and_is_filled_from_the_results(tmp_path, fake_openai):
    records = [record(i) for i in range(10)]
    write_input(tmp_path, records[:4])
    status, _ = run(tmp_path, fake_openai, records[:4], out="online")  # 4 replies in the cache
    assert status == 0
    write_input(tmp_path, records)
    status, first = run(tmp_path, fake_openai, records, *FAST, out="batch")
    assert status == 0 and len(first) == 10
    assert len(chats(fake_openai)) == 4 + 1  # the online run, then the probe (record 4)
    assert batch_ids(fake_openai, 0) == ["i:5", "i:6", "i:7", "i:8", "i:9"]

    fake_openai.requests.clear()
    status, fresh = run(tmp_path, fake_openai, records, *FAST, out="fresh")  # every reply is cached now
    assert status == 0 and fresh == first
    assert len(fake_openai.batches) == 1 and fake_openai.requests_to("/v1/files", "/v1/batches") == []
    status, online = run(tmp_path, fake_openai, records, out="online again")
    assert status == 0 and online == first and chats(fake_openai) == []  # batch replies under the online keys


def test_the_dry_run_uses_batch_prices_and_predicts_the_batches(tmp_path, fake_openai, capsys):
    records = [record(i, response=" ".join(["word"] * 40)) for i in range(10)]
    usage = {}
    for mode in ("online", "batch"):
        extra = ["--batch_api", "--batch_max_requests", "4"] if mode == "batch" else []
        status, lines = run(tmp_path, fake_openai, records, "--dry_run", "--usage_path",
                            str(tmp_path / f"{mode}.json"), *extra)
        assert status == 0 and lines == {}
        usage[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert fake_openai.requests == [] and not (tmp_path / "out").exists()
    report = capsys.readouterr().out
    assert "constant.MODEL_PRICES, 2026-12-01, batch price of gpt-6-luna" in report
    assert "batch API: 9 request lines" in report and "in 3 request files, i.e. 3 batches" in report
    assert "the first request is sent online" in report
    assert usage["batch"]["requests"] == usage["online"]["requests"] == 10
    assert usage["batch"]["cost_usd"] == pytest.approx(usage["online"]["cost_usd"] / 2)  # gpt-6-luna's batch half

    status, _ = run(tmp_path, fake_openai, records, *FAST, "--batch_max_requests", "4")
    assert status == 0 and len(fake_openai.batches) == 3 and len(chats(fake_openai)) == 1


def test_max_cost_stops_creating_batches_and_a_higher_cap_finishes(tmp_path, fake_openai, capsys):
    records = [record(i, response=" ".join(["word"] * 50)) for i in range(12)]
    price = ["--price_input", "1000", "--price_output", "1000", "--batch_max_requests", "2"]
    status, lines = run(tmp_path, fake_openai, records, *FAST, *price, "--max_cost", "2.5")
    assert status == 1
    err = capsys.readouterr().err
    assert "reformat: error: budget reached: $" in err and "rerun with a higher --max_cost to continue" in err
    assert 0 < len(fake_openai.batches) < 6 and 0 < len(lines) < 12
    created = len(fake_openai.batches)
    status, lines = run(tmp_path, fake_openai, records, *FAST, *price, "--max_cost", "100")
    assert status == 0 and sorted(lines) == list(range(12))
    assert sum(len(b.lines) for b in list(fake_openai.batches.values())[created:]) == 12 - 1 - 2 * created


# -- crashes and resumes ---------------------------------------------------------------


def command(input_path, out, server, *extra):
    return [sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", str(input_path),
            "--output_directory", str(out), "--base_url", server.url, *FAST, *extra]


def wait_for_batch(out, process, seconds=60):
    path = out / "batches_0_of_1.json"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            entries = json.loads(path.read_text())["entries"]
            if entries and all(e.get("batch_id") for e in entries):
                return entries
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("no batch was recorded")


@pytest.mark.slow
def test_a_kill_after_creation_and_a_rerun_create_no_second_batch(tmp_path, fake_openai):
    records = [record(i) for i in range(8)]
    input_path = write_input(tmp_path, records)
    fake_openai.batch_validate_s = 3600  # the batch sits in "validating" while the process is killed
    process = subprocess.Popen(command(input_path, tmp_path / "out", fake_openai), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (entry,) = wait_for_batch(tmp_path / "out", process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    (batch,) = fake_openai.batches.values()
    assert entry["batch_id"] == batch.id and entry["status"] == "validating"
    fake_openai.clock = lambda: time.time() + 7200  # the batch runs and completes

    status, lines = run(tmp_path, fake_openai, records, *FAST)
    assert status == 0 and sorted(lines) == list(range(8))
    assert len(fake_openai.batches) == 1 and fake_openai.stats()["uploads"] == 1
    assert len(chats(fake_openai)) == 1  # the first process's probe; the rerun sent nothing new


class Crash(Exception):
    """A kill at one precise moment."""


@pytest.mark.parametrize("step, batches_in_the_summary", [
    ("file_id", "uploads: 0, batches: 1 (and 0 of earlier runs, 1 adopted after a crash)"),
    ("batch_id", "uploads: 0, batches: 0 (and 0 of earlier runs, 1 adopted after a crash)"),
])
def test_a_crash_between_a_call_and_its_record_adopts_what_the_call_made(tmp_path, fake_openai, monkeypatch, caplog,
                                                                        step, batches_in_the_summary):
    records = [record(i) for i in range(6)]
    real_write = batch_api.write_json_atomic

    def crash_when_the_step_would_be_saved(path, data):
        if any(e.get(step) for e in data["entries"]):
            raise Crash
        real_write(path, data)

    monkeypatch.setattr(batch_api, "write_json_atomic", crash_when_the_step_would_be_saved)
    with pytest.raises(Crash):
        run(tmp_path, fake_openai, records, *FAST)
    assert fake_openai.stats()["uploads"] == 1 and len(fake_openai.batches) == (step == "batch_id")
    assert step not in record_file(tmp_path)["entries"][0]  # done at the server, never recorded

    monkeypatch.setattr(batch_api, "write_json_atomic", real_write)
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, *FAST)
    assert status == 0 and sorted(lines) == list(range(6))
    assert len(fake_openai.batches) == 1 and fake_openai.stats()["uploads"] == 1
    (batch,) = fake_openai.batches.values()
    assert record_file(tmp_path)["entries"][0]["batch_id"] == batch.id
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("#chunk")][-1]
    assert batches_in_the_summary in summary


def test_a_kill_while_writing_a_request_file_leaves_nothing_half_sent(tmp_path, fake_openai, monkeypatch):
    records = [record(i) for i in range(8)]
    real_add = batch_api._RequestFile.add

    def crash_at_the_third_line(self, *args):
        if self.lines == 2:
            raise Crash
        real_add(self, *args)

    monkeypatch.setattr(batch_api._RequestFile, "add", crash_at_the_third_line)
    with pytest.raises(Crash):
        run(tmp_path, fake_openai, records, *FAST)
    assert fake_openai.stats()["uploads"] == 0 and not (tmp_path / "out" / "batches_0_of_1.json").exists()
    monkeypatch.setattr(batch_api._RequestFile, "add", real_add)
    status, lines = run(tmp_path, fake_openai, records, *FAST)
    assert status == 0 and sorted(lines) == list(range(8))
    assert [len(b.lines) for b in fake_openai.batches.values()] == [6]  # the first run's probe is done
    assert sorted(os.listdir(tmp_path / "out" / "batches_0_of_1")) == ["requests_0001.jsonl"]


def test_a_kill_mid_download_loses_nothing_and_a_rerun_writes_only_what_is_missing(tmp_path, fake_openai,
                                                                                  monkeypatch):
    records = [record(i) for i in range(10)]
    real_write = reformat.ProgressWriter.write
    written = []

    def crash_after_five_lines(self, line):
        if len(written) == 5:
            raise Crash
        written.append(line["id"])
        real_write(self, line)

    monkeypatch.setattr(reformat.ProgressWriter, "write", crash_after_five_lines)
    with pytest.raises(Crash):
        run(tmp_path, fake_openai, records, *FAST)
    kept = lines_by_id(tmp_path / "out" / "rewrite_data_0_of_1_batch.jsonl")
    assert sorted(kept) == sorted(written) and len(kept) == 5  # the probe and 4 lines of the batch
    monkeypatch.setattr(reformat.ProgressWriter, "write", real_write)

    status, lines = run(tmp_path, fake_openai, records, *FAST)
    assert status == 0 and sorted(lines) == list(range(10))
    assert all(lines[i] == kept[i] for i in kept)
    assert len(fake_openai.batches) == 1  # downloaded again, not sent again
    assert len(fake_openai.requests_to(f"/v1/files/{record_file(tmp_path)['entries'][0]['output_file_id']}/content")) == 2


@pytest.mark.slow
def test_transient_upload_and_create_failures_are_retried_and_a_lost_reply_is_adopted(tmp_path, fake_openai):
    fake_openai.add_fault(500, path="/v1/files", method="POST")
    fake_openai.add_fault(503, path="/v1/batches", method="POST")
    fake_openai.add_fault(delay=0.8, path="/v1/batches", method="POST")  # created, but the reply comes too late
    status, lines = run(tmp_path, fake_openai, [record(i) for i in range(4)], *FAST, "--request_timeout", "0.5")
    assert status == 0 and sorted(lines) == [0, 1, 2, 3]
    assert fake_openai.stats()["uploads"] == 1 and len(fake_openai.batches) == 1
    posts = [r.path for r in fake_openai.requests if r.method == "POST" and r.path in ("/v1/files", "/v1/batches")]
    assert posts == ["/v1/files", "/v1/files", "/v1/batches", "/v1/batches"]  # no third create: it was found
    assert record_file(tmp_path)["entries"][0]["batch_adopted"] is True


@pytest.mark.slow
def test_batch_cancel_and_a_rerun_keep_what_was_answered(tmp_path, capsys):
    records = [record(i) for i in range(11)]
    input_path = write_input(tmp_path, records)
    now = [time.time()]
    with FakeOpenAIServer() as server:
        server.clock = lambda: now[0]
        server.batch_seconds_per_line = 10
        process = subprocess.Popen(command(input_path, tmp_path / "out", server), cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_batch(tmp_path / "out", process)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        assert "batches keep running at the server" in err
        now[0] += 35  # 3 of the batch's 10 lines are answered

        status, _ = run(tmp_path, server, records, "--batch_cancel")
        assert status == 0
        (batch,) = server.batches.values()
        assert batch.status == "cancelling"
        (entry,) = record_file(tmp_path)["entries"]
        assert entry["status"] == "cancelling" and entry["cancel_requested"]
        assert "cancelled: 1, already finished: 0" in capsys.readouterr().err

        server.batch_seconds_per_line = 0
        status, lines = run(tmp_path, server, records, *FAST)
        assert status == 0 and sorted(lines) == list(range(11))
        first, second = server.batches.values()
        assert first.status == "cancelled" and len(first.outputs) == 3
        unanswered = {c for c, _ in first.lines} - {line["custom_id"] for line in first.outputs}
        # This process probed online first (one of the 7), then sent the other 6 in a new batch.
        (probed,) = unanswered - {c for c, _ in second.lines}
        assert len(second.lines) == 6
        assert chats(server)[-1].body["messages"][-1]["content"].split("\n")[1] == f"Question {probed[2:].split('@')[0]}?"

        capsys.readouterr()
        status, _ = run(tmp_path, server, records, "--batch_cancel")  # after the results were joined
        assert status == 0
        assert "cancelled: 0, already finished: 0, never created: 0, results already in the batch file: 2" \
            in capsys.readouterr().err


def test_a_server_without_the_batch_api_stops_with_a_clear_message(tmp_path, fake_openai, capsys):
    fake_openai.batch_api = False
    status, _ = run(tmp_path, fake_openai, [record(i) for i in range(3)], *FAST)
    assert status == 1
    err = capsys.readouterr().err
    assert "reformat: error: uploading realign_0_of_1_requests_0001_" in err
    assert "HTTP 404" in err and "offer the Batch API? Without --batch_api" in err


def test_the_online_mode_warns_about_batches_that_may_still_run(tmp_path, fake_openai, caplog):
    out = tmp_path / "out"
    out.mkdir()
    entry = {"request_file": "batches_0_of_1/requests_0001.jsonl", "batch_id": "batch_x", "status": "in_progress"}
    (out / "batches_0_of_1.json").write_text(json.dumps({"entries": [entry]}), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, [record(1)])
    assert status == 0 and list(lines) == [1]
    assert "1 batches of this chunk may still be running; their lines are asked online too" in caplog.text


def test_the_key_is_in_no_file_and_no_log_line(tmp_path, fake_openai, caplog, capsys, own_cache):
    fake_openai.expected_key = KEY
    fake_openai.batch_failures = lambda custom_id: custom_id.startswith("i:1@")
    with caplog.at_level(logging.DEBUG):
        status, lines = run(tmp_path, fake_openai, [record(i) for i in range(5)], *FAST, "--max_retries", "1",
                            "--usage_path", str(tmp_path / "out" / "usage.json"), "--verbose")
    assert status == 1 and lines[1]["status"] == "failed"
    assert fake_openai.requests[-1].headers["authorization"] == f"Bearer {KEY}"  # it was sent, as it must be
    files = [os.path.join(d, name) for top in (tmp_path, own_cache) for d, _, names in os.walk(top) for name in names]
    assert any(name.endswith("requests_0001.jsonl") for name in files) and len(files) >= 6
    for name in files:
        with open(name, "rb") as f:
            assert KEY.encode() not in f.read(), name
    output = capsys.readouterr()
    assert KEY not in caplog.text and KEY not in output.err and KEY not in output.out
