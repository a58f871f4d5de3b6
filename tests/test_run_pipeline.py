"""run_pipeline.py end to end: every stage as a real child process, against the fake
OpenAI-compatible server, the fake Serper and the tiny classifier under real vLLM."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import constant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "datasets", "examples", "realign_examples.json")
REWRITE_HEADING = "**Answer**"  # the fake server's rewrites start with it
# Of the 57 examples, the ones passed through unchanged with the categories they carry: a task
# that is never rewritten (SPEC §6), or more than one turn.
NOT_REWRITTEN_IDS = {101, 103, 107, 121, 125, 130, 131, 133, 134, "ex-a2", 178, 179, 181}

pytestmark = pytest.mark.slow  # every test runs the whole pipeline as child processes


def load_examples():
    with open(EXAMPLES, encoding="utf-8") as f:
        records = json.load(f)
    assert len(records) == 57  # the literal ids and positions below are this file's
    return records


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return str(path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pipeline_env(fake_openai, fake_serper=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "SERPER_API_KEY")}
    env.update(OPENAI_API_KEY="sk-test-e2e-secret", OPENAI_BASE_URL=fake_openai.url, PYTHONUNBUFFERED="1")
    if fake_serper is not None:
        env["SERPER_API_KEY"] = fake_serper.api_key
        env["REALIGN_TEST_SEARCH_URL"] = fake_serper.search_url
    return env


def pipeline_command(input_path, out_dir, env, *extra):
    command = [sys.executable, os.path.join(ROOT, "run_pipeline.py"), "--input_data_path", input_path,
               "--output_directory", str(out_dir), "--num_processes", "3", "--keep_reasons", *extra]
    if "REALIGN_TEST_SEARCH_URL" in env:
        command += ["--search_url", env["REALIGN_TEST_SEARCH_URL"]]
    return command


def run_pipeline(input_path, out_dir, env, *extra, timeout=300):
    return subprocess.run(pipeline_command(input_path, out_dir, env, *extra), env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def expected_tag(record):
    """SPEC §6's rule: needed where the tiny classifier (random weights) chose the category."""
    single_turn = len(record["items"]) == 2
    return "rewrite" if single_turn and record["items"][0]["category"] in constant.REWRITE_TASK else "original"


def user_messages(server):
    """The user message of every chat request the server got."""
    return [r.body["messages"][-1]["content"] for r in server.requests if r.path.endswith("/chat/completions")]


def requests_for(messages, question):
    return [m for m in messages if question in m]


def check_final(final, input_records):
    assert [r["id"] for r in final] == [r["id"] for r in input_records]  # each id once, input order
    for record in final:
        assert record["tag"] == expected_tag(record), record["id"]
        rewritten = record["items"][1]["value"].startswith(REWRITE_HEADING)
        assert rewritten == (record["tag"] == "rewrite"), record["id"]


@pytest.mark.vllm
def test_whole_pipeline_with_vllm_classifier_serper_and_three_processes(tmp_path, fake_openai, fake_serper,
                                                                         tiny_model_dir):
    records = load_examples()
    # Half the records lose their category, so stage 1 runs; the other half keep theirs.
    for index, record in enumerate(records):
        if index % 2:
            del record["items"][0]["category"]
    input_path = write_json(tmp_path / "input.json", records)
    out = tmp_path / "out"

    result = run_pipeline(input_path, out, pipeline_env(fake_openai, fake_serper),
                          "--classifier_backend", "vllm", "--classifier_model", tiny_model_dir,
                          "--classify_args", "--dtype float32 --enforce_eager --max_model_len 2048",
                          "--concurrency", "4", "--tokenizer_path", tiny_model_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("classify", "retrieval", "reformat_0", "reformat_1", "reformat_2", "merge", "filter"):
        assert (out / "logs" / f"{stage}.log").exists(), stage

    final = read_json(out / "final.json")
    check_final(final, records)
    # Of the records that kept their category (even positions), these are passed through.
    assert [r["id"] for r in final[::2] if r["tag"] == "original"] == [103, 121, 130, 133, 179]
    # The records that kept their category kept it; the others got one of the 46 names.
    for original, record in zip(records, final):
        category = record["items"][0]["category"]
        assert category == original["items"][0].get("category", category)
        assert category in constant.TASK_DESCRIPTION

    # Evidence reached the reformat request of every single-turn RAG record, and only those.
    messages = user_messages(fake_openai)
    searched = {r.body["q"] for r in fake_serper.requests}
    for record in final:
        question = record["items"][0]["value"]
        sent = requests_for(messages, question)
        rag = len(record["items"]) == 2 and record["items"][0]["category"] in constant.RAG_TASKS
        assert (question in searched) == rag, record["id"]
        if record["tag"] == "rewrite":
            assert len(sent) == 1, record["id"]  # one request (n candidates), never repeated
            assert (f"1. Result 1 about {question}." in sent[0]) == rag, record["id"]
        else:
            assert sent == [], record["id"]
    # The key is in no output file and no log.
    for path in out.rglob("*"):
        if path.is_file():
            assert "sk-test-e2e-secret" not in path.read_text(encoding="utf-8", errors="replace"), path
    assert "sk-test-e2e-secret" not in result.stderr


def wait_for_batch_lines(batch_dir, at_least, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = sum(p.read_text(encoding="utf-8").count("\n") for p in batch_dir.glob("*.jsonl")) \
            if batch_dir.exists() else 0
        if lines >= at_least:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} finished records after {timeout}s")


def finished_ids(batch_dir):
    done = set()
    for path in batch_dir.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["id"])
            except ValueError:
                pass  # a line torn by the kill
    return done


def test_rerun_after_kill_finishes_the_same_without_repeating_requests(tmp_path, fake_openai, fake_serper):
    records = load_examples()  # every record has a category: stage 1 is skipped
    input_path = write_json(tmp_path / "input.json", records)
    env = pipeline_env(fake_openai, fake_serper)

    # A clean run gives the reference final file (with a cache of its own, so that the
    # killed run below really sends its requests).
    reference = run_pipeline(input_path, tmp_path / "reference", {**env, "REALIGN_CACHE_DIR": str(tmp_path / "c0")})
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "stage classify: skipped" in reference.stderr
    fake_openai.requests.clear()

    # Slow replies, then SIGTERM to the launcher and all its children midway.
    fake_openai.latency = 0.5
    rewritable = [r for r in records if r["id"] not in NOT_REWRITTEN_IDS]
    passed_through = 13  # len(NOT_REWRITTEN_IDS): written at once, without a request
    out = tmp_path / "out"
    launcher = subprocess.Popen(pipeline_command(input_path, out, env, "--concurrency", "2"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        wait_for_batch_lines(out / "rewrite", at_least=passed_through + 4)
        os.killpg(launcher.pid, signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0, stderr[-3000:]
    assert "progress so far is saved, rerun to continue" in stderr, stderr[-3000:]
    assert not (out / "final.json").exists()
    done_before = finished_ids(out / "rewrite")
    assert passed_through + 4 <= len(done_before) < len(records), (len(done_before), passed_through)
    sent_before = len(user_messages(fake_openai))

    fake_openai.latency = 0.0
    rerun = run_pipeline(input_path, out, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_json(out / "final.json") == read_json(tmp_path / "reference" / "final.json")

    resent = user_messages(fake_openai)[sent_before:]
    by_id = {r["id"]: r for r in records}
    for record_id in done_before:
        assert requests_for(resent, by_id[record_id]["items"][0]["value"]) == [], record_id
    # Every rewritable record was asked for at least once over both runs.
    everything = user_messages(fake_openai)
    assert all(requests_for(everything, r["items"][0]["value"]) for r in rewritable)


def test_failed_reformat_process_is_named_by_batch_id(tmp_path, fake_openai):
    records = load_examples()
    input_path = write_json(tmp_path / "input.json", records)
    # Refuse the key for one question of the middle chunk only: that process stops at once.
    # Three processes over 57 records: batch 1 holds records 19 to 37, the first of them is id 128.
    assert records[19]["id"] == 128 and 128 not in NOT_REWRITTEN_IDS
    victim = records[19]["items"][0]["value"]
    fake_openai.add_fault(status=401, times=None,
                          match=lambda body: victim in body["messages"][-1]["content"])

    result = run_pipeline(input_path, tmp_path / "out", pipeline_env(fake_openai))
    assert result.returncode == 1
    assert "stage retrieval: skipped, SERPER_API_KEY is not set" in result.stderr
    assert "stage 'reformat' failed: batch ids 1 (exit status 1" in result.stderr
    assert "reformat_1.log" in result.stderr
    assert not (tmp_path / "out" / "merged.json").exists()
    assert "sk-test-e2e-secret" not in result.stderr


def test_the_demo_runs_with_no_key_and_ends_with_the_final_file_and_a_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "SERPER_API_KEY")}
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "run_pipeline.py"), "--demo", "--output_directory",
                             str(out)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the answers come from local stand-ins for OpenAI" in result.stderr
    final = read_json(out / "final.json")
    # The demo's stand-in drops the last sentence of one response in six: the checks refuse
    # those rewrites (a lost name, number, code line, or much of the wording).
    careless = {104: "no_candidate_passed", 106: "no_candidate_passed", 109: "no_candidate_passed",
                136: "no_candidate_passed", 148: "no_candidate_passed"}
    assert {r["id"]: r.get("reject_reason") for r in final if r["id"] in careless} == careless
    assert all(r["tag"] == "original" for r in final if r["id"] in careless)
    check_final([r for r in final if r["id"] not in careless],
                [r for r in load_examples() if r["id"] not in careless])
    report = (out / "evaluation.md").read_text(encoding="utf-8")
    headline = read_json(out / "evaluation.json")["headline"]
    assert headline.startswith("substantially rewritten ") and " of 57; " in headline and f"**{headline}**" in report
    assert headline in result.stderr
    with open(out / "evaluation.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"done in \d+\.\d s: ", result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(f"open {out / 'report.html'} in a browser"), last  # the page's path comes last
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_alpaca_in_messages_out_in_one_command(tmp_path, fake_openai, fake_serper):
    alpaca = [{"instruction": f"Explain point {i}.", "input": "" if i % 2 else f"Notes {i}.",
               "output": f"Point {i} means this and that.", "category": ["open_qa", "planning", "story_generation"][i % 3]}
              for i in range(30)]
    input_path = write_json(tmp_path / "alpaca.json", alpaca)
    result = run_pipeline(input_path, tmp_path / "out", pipeline_env(fake_openai, fake_serper),
                          "--input_format", "alpaca", "--output_format", "messages")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "final_messages.jsonl", encoding="utf-8") as f:
        converted = [json.loads(line) for line in f]
    assert len(converted) == 30
    for i, row in enumerate(converted):
        user, assistant = row["messages"]
        question = f"Explain point {i}." + ("" if i % 2 else f"\n\nNotes {i}.")
        assert user == {"role": "user", "content": question}
        assert assistant["role"] == "assistant"
        rewritten = alpaca[i]["category"] != "story_generation"  # story_generation is never reformatted
        assert assistant["content"].startswith(REWRITE_HEADING) == rewritten, i
        assert row["tag"] == ("rewrite" if rewritten else "original")


def test_the_dry_run_sends_nothing_and_reports_every_paid_stage(tmp_path, fake_openai, fake_serper):
    records = load_examples()
    input_path = write_json(tmp_path / "input.json", records)
    result = subprocess.run(pipeline_command(input_path, tmp_path / "out", pipeline_env(fake_openai, fake_serper),
                                             "--dry_run"), env=pipeline_env(fake_openai, fake_serper),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert fake_openai.requests == [] and fake_serper.requests == []
    assert "dry run of retrieval: nothing was sent" in result.stdout
    assert result.stdout.count("dry run of reformat: nothing was sent") == 3  # one per process
    assert not (tmp_path / "out" / "final.json").exists() and not (tmp_path / "out" / "rewrite").exists()


def unlabelled_alpaca(tmp_path, count=10):
    rows = [{"instruction": f"What is fact number {i}?", "input": "", "output": f"Fact {i} is a number."}
            for i in range(count)]
    return write_json(tmp_path / "own.json", rows)


def test_unlabelled_data_on_a_machine_without_a_gpu_stops_before_anything_with_the_alternatives(tmp_path,
                                                                                                 fake_openai):
    env = {**pipeline_env(fake_openai), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine has
    out = tmp_path / "out"
    result = run_pipeline(unlabelled_alpaca(tmp_path), out, env)
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error.startswith("run_pipeline.py: error: 10 records have no task label and no GPU is visible")
    assert "--classifier_backend openai_chat" in error and "--classifier_backend openai --classifier_base_url" in error
    assert fake_openai.requests == [] and not out.exists()


def test_the_dry_run_of_unlabelled_data_counts_classification_an_upper_bound_and_a_total(tmp_path, fake_openai,
                                                                                         fake_serper):
    env = pipeline_env(fake_openai, fake_serper)
    result = run_pipeline(unlabelled_alpaca(tmp_path), tmp_path / "out", env, "--classifier_backend", "openai_chat",
                          "--dry_run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert fake_openai.requests == [] and fake_serper.requests == []
    out = result.stdout
    assert "dry run of classify: nothing was sent (10 queries to classify with gpt-6-luna)" in out
    assert "stages 2 and 3 below are an upper bound: 10 records have no task yet" in out
    assert "searches to send: 10" in out  # every record counted as a searched task
    sent = [int(n) for n in re.findall(r"requests to send: (\d+) ", out)]
    assert sent[0] == 10 and sum(sent[1:]) == 10  # classify; reformat's 3 processes: every record, as open_qa
    (total,) = [line for line in out.splitlines() if line.startswith("dry run total:")]
    assert total.startswith("dry run total: 20 requests, ") and ", 10 searches, expected cost $" in total
    assert total.endswith("(stages 2 and 3: an upper bound)")


@pytest.mark.parametrize("problem, flags, message", [
    ("response", (), "input.json: record 2 (id 'b'): field 'items[1].value' must be a string"),
    ("threshold", ("--length_threshold", "-0.5"), "argument --length_threshold: must be 0 or more, got -0.5"),
])
def test_a_bad_record_or_flag_stops_before_any_request(tmp_path, fake_openai, problem, flags, message):
    records = [{"id": i, "items": [{"from": "human", "value": "Q?", "category": "open_qa"},
                                   {"from": "gpt", "value": "A."}]} for i in ("a", "c")]
    if problem == "response":
        records.insert(2, {"id": "b", "items": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": 7}]})
    result = run_pipeline(write_json(tmp_path / "input.json", records), tmp_path / "out", pipeline_env(fake_openai),
                          *flags)
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert message in error
    assert fake_openai.requests == [] and not (tmp_path / "out").exists()


def test_an_empty_response_is_reported_and_left_as_it_is(tmp_path, fake_openai):
    records = [{"id": i, "items": [{"from": "human", "value": f"Q{i}?", "category": "open_qa"},
                                   {"from": "gpt", "value": "" if i == 1 else f"Answer {i}."}]} for i in range(3)]
    result = run_pipeline(write_json(tmp_path / "input.json", records), tmp_path / "out", pipeline_env(fake_openai))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 record(s) have an empty response (ids 1): they are left as they are" in result.stderr
    final = {r["id"]: r for r in read_json(tmp_path / "out" / "final.json")}
    assert final[1]["items"][1]["value"] == "" and final[1]["tag"] == "original"
    assert len(user_messages(fake_openai)) == 2  # nothing was asked for the empty one


def test_a_slow_reformat_shows_its_progress_on_a_log_file_console(tmp_path, fake_openai, monkeypatch, capsys):
    import run_pipeline

    monkeypatch.setattr(run_pipeline, "LOG_REFRESH_SECONDS", 1.0)  # a line every second instead of 30
    for name, value in pipeline_env(fake_openai).items():
        monkeypatch.setenv(name, value)
    fake_openai.latency = 0.3
    records = [{"id": i, "items": [{"from": "human", "value": f"Question {i}?", "category": "open_qa"},
                                   {"from": "gpt", "value": f"Answer {i}."}]} for i in range(16)]
    status = run_pipeline.main(["--input_data_path", write_json(tmp_path / "input.json", records),
                                "--output_directory", str(tmp_path / "out"), "--concurrency", "1",
                                "--no-evaluate"])
    assert status == 0
    err = capsys.readouterr().err
    running = [line for line in err.splitlines() if "run_pipeline: reformat: " in line and "records/s" in line]
    assert running, err[-2000:]
    assert " of 16 records (" in running[0] and "ETA " in running[0] and "spend $" in running[0]
    assert "run_pipeline: reformat: 16 of 16 records (100%) in " in err


def test_a_changed_setting_that_pays_again_says_so_on_the_console_with_the_cost(tmp_path, fake_openai):
    records = [{"id": i, "items": [{"from": "human", "value": f"Q{i}?", "category": "open_qa"},
                                   {"from": "gpt", "value": f"Answer number {i}."}]} for i in range(4)]
    input_path = write_json(tmp_path / "input.json", records)
    env = pipeline_env(fake_openai)
    assert run_pipeline(input_path, tmp_path / "out", env, "--no-evaluate").returncode == 0
    again = run_pipeline(input_path, tmp_path / "out", env, "--no-evaluate", "--top_k", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    warned = [line for line in again.stderr.splitlines() if "finished lines were made with other settings" in line]
    assert warned and "run_pipeline: reformat: " in warned[0]
    assert sum(int(re.search(r": (\d) finished lines", line).group(1)) for line in warned) == 4
    assert all(re.search(r"costs about \$0\.\d{4}", line) for line in warned)
