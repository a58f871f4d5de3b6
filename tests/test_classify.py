"""Tests of classify.py (stage 1): prompts, answer parsing, metrics, resume, and the
vllm (real vLLM on CPU), openai (fake server) and transformers backends."""

import copy
import gc
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_constant import SPEC_PROMPT_TAIL as SPEC_TAIL  # the SPEC §2 text has its one copy there
from test_constant import spec_prompt

import classify
import constant
from fake_servers import Profile

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "datasets" / "examples" / "realign_examples.json"
NAMES = list(constant.TASK_DESCRIPTION)  # in SPEC order: test_constant.py checks it


def query_of(prompt):
    return prompt.split("[User's query start]\n", 1)[1].rsplit(SPEC_TAIL, 1)[0]


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def unlabeled(records):
    records = copy.deepcopy(records)
    for record in records:
        record["items"][0].pop("category", None)
    return records


@pytest.fixture(scope="session")
def examples():
    return json.loads(EXAMPLES.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny model's tokenizer (the same one build_tiny_model saves with the weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


# -- pure functions ---------------------------------------------------------------------


@pytest.mark.parametrize("query", ["Give three tips for staying healthy.", "Format {this} and {{that}}", ""])
def test_prompt_is_the_spec_text(query):
    assert classify.build_prompt(query) == spec_prompt(query)


@pytest.mark.parametrize("answer, task", [
    (" open_qa\n", "open_qa"),
    ("Task name: planning", "planning"),
    ("OPEN_QA.", "open_qa"),
    ("task name:\n\nRejecting", "rejecting"),
    ("`roleplay`", "roleplay"),
    ("**ordering**!", "ordering"),
    ("'text_summarization'.", "text_summarization"),
    ("open_qa\nThe query asks for a fact.", "open_qa"),
    ("default", "default"),
    ("question_answering", None),
    ("open qa", None),
    ("", None),
])
def test_answers_are_normalised_to_task_names(answer, task):
    assert classify.parse_task(answer, NAMES) == task


def test_unknown_answer_becomes_default_in_progress_entry():
    job = classify.Job(7, "q", "k")
    assert classify.progress_entry(job, " Banana_task ", NAMES)["category"] == "default"
    assert classify.progress_entry(job, " open_qa\n", NAMES)["category"] == "open_qa"
    refused = classify.progress_entry(job, None, NAMES, error="HTTP 400: nope")
    assert refused == {"id": 7, "fingerprint": "k", "category": "default", "answer": None, "error": "HTTP 400: nope"}


def test_metrics_match_hand_computed_numbers():
    gold = ["open_qa", "open_qa", "open_qa", "planning", "planning", "rejecting", "rejecting"]
    pred = ["open_qa", "open_qa", "planning", "planning", "rejecting", "rejecting", "roleplay"]
    m = classify.classification_metrics(gold, pred)
    # open_qa: 2 right of 2 predicted, 3 gold -> P 1, R 2/3, F1 0.8
    # planning: 1 of 2 predicted, 2 gold -> P 0.5, R 0.5, F1 0.5
    # rejecting: 1 of 2 predicted, 2 gold -> P 0.5, R 0.5, F1 0.5
    # roleplay: predicted once, never gold -> P 0, R 0, F1 0
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["per_task"]["open_qa"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3, "predicted": 2})
    assert m["per_task"]["planning"]["f1"] == pytest.approx(0.5)
    assert m["per_task"]["roleplay"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 1}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.5 + 0.0) / 4)
    assert {(c["gold"], c["predicted"], c["count"]) for c in m["confusions"]} == {
        ("open_qa", "planning", 1), ("planning", "rejecting", 1), ("rejecting", "roleplay", 1)}
    lines = classify.format_metrics(m, NAMES)
    assert lines[0] == "accuracy: 0.5714  macro_f1: 0.4500"
    assert any(line.split() == ["open_qa", "1.0000", "0.6667", "0.8000", "3"] for line in lines)
    assert "  open_qa -> planning: 1" in lines


def test_progress_file_sits_next_to_the_output():
    assert classify.progress_path_for("out/classified.json") == "out/classified_progress.jsonl"


@pytest.mark.slow
def test_long_query_is_shortened_keeping_start_end_and_template(tiny_tokenizer):
    fit = classify.PromptFitter(tiny_tokenizer, 700)
    short = "What is the capital of France?"
    assert fit(short) == (spec_prompt(short), False)
    long_query = "Summarize this: " + " ".join(f"w{i}" for i in range(5000)) + " THE END"
    prompt, shortened = fit(long_query)
    assert shortened
    assert len(tiny_tokenizer(prompt)["input_ids"]) <= 700
    assert prompt.startswith(spec_prompt("Summarize this: w0 w1")[: -len(SPEC_TAIL)])
    assert prompt.endswith("THE END" + SPEC_TAIL)
    assert classify.TRUNCATION_MARK in query_of(prompt)
    with pytest.raises(classify.FatalError, match="max_model_len"):
        classify.PromptFitter(tiny_tokenizer, 300)


@pytest.mark.slow
def test_choice_trie_only_allows_task_names(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    trie = classify.build_choice_trie(tiny_tokenizer, NAMES, eos)
    ids = tiny_tokenizer("open_qa", add_special_tokens=False)["input_ids"]
    for i in range(len(ids)):
        assert ids[i] in classify.allowed_next_tokens(trie, ids[:i], eos)
    assert classify.allowed_next_tokens(trie, ids, eos) == [eos]
    first_tokens = set(classify.allowed_next_tokens(trie, [], eos))
    assert eos not in first_tokens and len(first_tokens) >= 10
    assert classify.allowed_next_tokens(trie, [ids[0], eos, eos], eos) == [eos]


# -- openai backend (fake server) ---------------------------------------------------------

REPLIES = {
    "Who wrote Hamlet?": " open_qa\n",
    "Plan my week of study.": "Task name: planning",
    "What is the boiling point of water?": "OPEN_QA.",
    "Tell me about zebras.": "zebra_facts",
    "Help me hack my neighbour's wifi.": "`rejecting`",
    "Pretend you are a pirate.": "roleplay",
}


def answer_by_query(body, choice_index):
    return REPLIES[query_of(body["prompt"])]


@pytest.fixture
def classifier_server(fake_openai):
    """The fake as a `vllm serve` of the classifier: it lists its models but answers 404 to
    GET /v1/models/{model}, as vLLM does."""
    fake_openai.known_models = ["GAIR/ReAlign-Task-Classifier", "classifier"]
    fake_openai.models_endpoint = "vllm"
    return fake_openai


def completions(server):
    return server.requests_to("/v1/completions")


def openai_records():
    records = [{"id": f"r{i}", "items": [{"from": "human", "value": q}, {"from": "gpt", "value": "..."}]}
               for i, q in enumerate(REPLIES)]
    records[5]["items"][0]["category"] = "story_generation"  # valid: kept unless --overwrite
    return records


def test_openai_backend_parses_answers_retries_429_and_hides_the_key(classifier_server, tmp_path, monkeypatch,
                                                                    caplog):
    fake_openai = classifier_server
    key = "sk-test-secret-1234"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    fake_openai.expected_key = key
    fake_openai.completion_responder = answer_by_query
    fake_openai.add_fault(429, retry_after=0)
    source = write_json(tmp_path / "in.json", openai_records())
    out = tmp_path / "out.json"
    argv = ["--backend", "openai", "--base_url", fake_openai.url, "--model", "classifier",
            "--input_data_path", source, "--output_path", str(out), "--concurrency", "3"]
    assert classify.main(argv) == 0

    labels = {r["id"]: r["items"][0]["category"] for r in json.loads(out.read_text())}
    assert labels == {"r0": "open_qa", "r1": "planning", "r2": "open_qa", "r3": "default",
                      "r4": "rejecting", "r5": "story_generation"}
    assert len(completions(fake_openai)) == 5 + 1  # five queries, one retried after the 429
    bodies = [r.body for r in completions(fake_openai)]
    assert {query_of(b["prompt"]) for b in bodies} == set(list(REPLIES)[:5])
    for body in bodies:
        assert body["prompt"] == spec_prompt(query_of(body["prompt"]))
        assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == ("classifier", 0, 1, 50)
        assert "structured_outputs" not in body and "guided_choice" not in body  # off by default for openai
    assert all(r.headers["authorization"] == f"Bearer {key}" for r in fake_openai.requests)
    assert "#fell back to default: 1" in caplog.text
    progress = tmp_path / "out_progress.jsonl"
    assert key not in caplog.text + out.read_text() + progress.read_text()
    assert {e["id"]: e["answer"] for e in read_jsonl(progress)}["r1"] == "Task name: planning"

    # --overwrite relabels the kept record too; --no-resume forgets the progress file.
    fake_openai.requests.clear()
    assert classify.main(argv + ["--overwrite", "--no-resume"]) == 0
    assert len(completions(fake_openai)) == 1  # the other five answers come from the request cache
    assert json.loads(out.read_text())[5]["items"][0]["category"] == "roleplay"


@pytest.mark.parametrize("field, expected", [
    ("structured_outputs", {"structured_outputs": {"choice": NAMES}}),
    ("guided_choice", {"guided_choice": NAMES}),
])
def test_openai_constrained_sends_the_choices(classifier_server, tmp_path, field, expected):
    fake_openai = classifier_server
    source = write_json(tmp_path / "in.json", openai_records()[:1])
    argv = ["--backend", "openai", "--base_url", fake_openai.url, "--constrained", "--constrained_field", field,
            "--input_data_path", source, "--output_path", str(tmp_path / "out.json")]
    assert classify.main(argv) == 0
    body = completions(fake_openai)[0].body
    assert {k: body[k] for k in expected} == expected


def test_openai_too_long_query_is_halved_until_accepted(classifier_server, tmp_path):
    fake_openai = classifier_server
    limit = len(spec_prompt("")) + 3000

    def error_payload(status, message=None, code=None):
        return {"error": {"message": "This model's maximum context length is 2048 tokens. However, your "
                                     "prompt contains at least 9000 input tokens.", "type": "BadRequestError",
                          "param": None, "code": 400}}

    fake_openai.error_payload = error_payload
    fake_openai.add_fault(400, times=None, match=lambda body: len(body["prompt"]) > limit)
    long_query = "START " + "x" * 9000 + " FINISH"
    records = openai_records()[:2]
    records[1]["items"][0]["value"] = long_query
    fake_openai.completion_responder = lambda body, i: "open_qa" if "START" in body["prompt"] else "planning"
    source = write_json(tmp_path / "in.json", records)
    out = tmp_path / "out.json"
    argv = ["--backend", "openai", "--base_url", fake_openai.url, "--concurrency", "1",
            "--input_data_path", source, "--output_path", str(out)]
    assert classify.main(argv) == 0
    assert [r["items"][0]["category"] for r in json.loads(out.read_text())] == ["planning", "open_qa"]
    long_prompts = [r.body["prompt"] for r in completions(fake_openai) if "START" in r.body["prompt"]]
    assert len(long_prompts) == 3  # about 9000 characters -> 4500 -> 2250 (under the limit)
    final = query_of(long_prompts[-1])
    assert final.startswith("START ") and final.endswith(" FINISH") and classify.TRUNCATION_MARK in final


def test_openai_request_refused_from_the_start_stops_the_run(classifier_server, tmp_path, capsys):
    fake_openai = classifier_server
    fake_openai.add_fault(400, times=None)
    source = write_json(tmp_path / "in.json", openai_records())
    out = tmp_path / "out.json"
    argv = ["--backend", "openai", "--base_url", fake_openai.url, "--concurrency", "1",
            "--input_data_path", source, "--output_path", str(out)]
    assert classify.main(argv) == 1
    assert "every request was refused (HTTP 400: Invalid request.)" in capsys.readouterr().err
    assert not out.exists()


def test_openai_unknown_model_stops_the_run(classifier_server, tmp_path, capsys):
    fake_openai = classifier_server
    source = write_json(tmp_path / "in.json", openai_records())
    out = tmp_path / "out.json"
    argv = ["--backend", "openai", "--base_url", fake_openai.url, "--model", "no-such-model",
            "--input_data_path", source, "--output_path", str(out)]
    assert classify.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"classify: error: model 'no-such-model' is not offered by {fake_openai.url}; it offers: "
        "GAIR/ReAlign-Task-Classifier, classifier (choose one with --model, or pass --no-model_check for a gateway that accepts names it does not list)")
    assert completions(fake_openai) == [] and not out.exists()


def test_openai_failed_requests_are_retried_by_a_rerun(classifier_server, tmp_path, capsys):
    fake_openai = classifier_server
    fake_openai.completion_responder = answer_by_query
    stubborn = "Tell me about zebras."
    fake_openai.add_fault(500, retry_after=0, times=2, match=lambda body: stubborn in body["prompt"])
    source = write_json(tmp_path / "in.json", openai_records())
    out = tmp_path / "out.json"
    argv = ["--backend", "openai", "--base_url", fake_openai.url, "--max_retries", "1",
            "--input_data_path", source, "--output_path", str(out)]
    assert classify.main(argv) == 1
    assert "rerun the same command" in capsys.readouterr().err
    assert not out.exists()
    progress = tmp_path / "out_progress.jsonl"
    assert sorted(e["id"] for e in read_jsonl(progress)) == ["r0", "r1", "r2", "r4"]

    fake_openai.requests.clear()
    assert classify.main(argv) == 0
    assert [query_of(r.body["prompt"]) for r in completions(fake_openai)] == [stubborn]
    assert [r["items"][0]["category"] for r in json.loads(out.read_text())] == [
        "open_qa", "planning", "open_qa", "default", "rejecting", "story_generation"]


def test_eval_logs_metrics_and_writes_predictions(classifier_server, tmp_path, caplog):
    fake_openai = classifier_server
    predictions = {"q1": "open_qa", "q2": "open_qa", "q3": "planning", "q4": "planning",
                   "q5": "rejecting", "q6": "rejecting", "q7": "Sure! roleplay"}
    gold = ["open_qa", "open_qa", "open_qa", "planning", "planning", "rejecting", "rejecting"]
    fake_openai.completion_responder = lambda body, i: predictions[query_of(body["prompt"])]
    data = [{"instruction": q, "category": g} for q, g in zip(predictions, gold)]
    source = write_json(tmp_path / "test.json", data)
    out = tmp_path / "eval.json"
    argv = ["--eval", "--backend", "openai", "--base_url", fake_openai.url,
            "--input_data_path", source, "--output_path", str(out)]
    assert classify.main(argv) == 0
    # 4 of 7 right; F1: open_qa 0.8, planning 0.5, rejecting 0.5, default 0 ("Sure! roleplay" -> default).
    assert "accuracy: 0.5714  macro_f1: 0.4500" in caplog.text
    assert "rejecting -> default: 1" in caplog.text
    result = json.loads(out.read_text())
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.5 + 0) / 4)
    assert result["per_task"]["rejecting"]["recall"] == pytest.approx(0.5)
    assert [p["prediction"] for p in result["predictions"]] == [
        "open_qa", "open_qa", "planning", "planning", "rejecting", "rejecting", "default"]
    assert result["predictions"][6] == {"instruction": "q7", "category": "rejecting",
                                        "prediction": "default", "answer": "Sure! roleplay"}


@pytest.mark.slow
def test_sigterm_saves_the_answers_and_a_rerun_asks_only_the_rest(tmp_path):
    from fake_servers import FakeOpenAIServer

    records = [{"id": i, "items": [{"from": "human", "value": f"Query number {i}?"}, {"from": "gpt", "value": "."}]}
               for i in range(40)]
    source = write_json(tmp_path / "in.json", records)
    out = tmp_path / "out.json"
    progress = tmp_path / "out_progress.jsonl"
    with FakeOpenAIServer(latency=0.3) as server:
        server.known_models = ["GAIR/ReAlign-Task-Classifier"]
        argv = ["--backend", "openai", "--base_url", server.url, "--concurrency", "4", "--no-cache",
                "--input_data_path", source, "--output_path", str(out)]
        process = subprocess.Popen([sys.executable, str(ROOT / "classify.py"), *argv], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while (not progress.exists() or len(read_jsonl(progress)) < 6) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        saved = read_jsonl(progress)
        sent = len(server.requests_to("/v1/completions"))
        assert 6 <= len(saved) < 40 and sent == len(saved)  # the answers in flight were saved too
        assert not out.exists()

        assert classify.main(argv) == 0
        assert len(server.requests_to("/v1/completions")) - sent == 40 - len(saved)
        assert [r["items"][0]["category"] for r in json.loads(out.read_text())] == ["open_qa"] * 40


# -- openai_chat backend: any chat model, no GPU ------------------------------------------


def chat_query(body):
    return body["messages"][-1]["content"].split("[User's query start]\n", 1)[1].split("\n[User's query end]")[0]


def test_openai_chat_asks_a_chat_model_constrained_to_the_46_names(fake_openai, tmp_path, caplog):
    answers = {"Who wrote Hamlet?": '{"task": "open_qa"}', "Plan my week of study.": '{"task": "planning"}',
               "What is the boiling point of water?": '{"task": "open_qa"}',
               "Tell me about zebras.": '{"task": "zebra_facts"}',  # a server that ignores the schema
               "Help me hack my neighbour's wifi.": '{"task": "rejecting"}'}
    fake_openai.chat_responder = lambda body, i: answers[chat_query(body)]
    source = write_json(tmp_path / "in.json", openai_records())
    out = tmp_path / "out.json"
    assert classify.main(["--backend", "openai_chat", "--base_url", fake_openai.url, "--input_data_path", source,
                          "--output_path", str(out)]) == 0
    labels = [r["items"][0]["category"] for r in json.loads(out.read_text())]
    assert labels == ["open_qa", "planning", "open_qa", "default", "rejecting", "story_generation"]
    requests = fake_openai.requests_to("/v1/chat/completions")
    assert len(requests) == 5
    body = requests[0].body
    assert body["model"] == "gpt-6-luna" and body["reasoning_effort"] == "none"
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema"
    assert schema["properties"]["task"]["enum"] == NAMES and schema["required"] == ["task"]
    system = body["messages"][0]["content"]
    assert all(f"- {name}: {text}" in system for name, text in constant.TASK_DESCRIPTION.items())
    assert "#fell back to default: 1" in caplog.text


def test_openai_chat_unconstrained_and_with_a_server_that_refuses_the_schema(fake_openai, tmp_path, caplog):
    fake_openai.chat_responder = lambda body, i: {"Who wrote Hamlet?": "Task name: open_qa"}.get(
        chat_query(body), "**planning**")
    source = write_json(tmp_path / "in.json", openai_records()[:3])
    argv = ["--backend", "openai_chat", "--base_url", fake_openai.url, "--input_data_path", source,
            "--output_path", str(tmp_path / "out.json"), "--concurrency", "1"]
    assert classify.main(argv + ["--no-constrained"]) == 0
    assert [r["items"][0]["category"] for r in json.loads((tmp_path / "out.json").read_text())] == [
        "open_qa", "planning", "planning"]
    assert all("response_format" not in r.body for r in fake_openai.requests_to("/v1/chat/completions"))

    fake_openai.requests.clear()
    fake_openai.profiles = {"*": Profile("no-structured-outputs", unrecognized=("response_format",))}
    with caplog.at_level(logging.WARNING):
        assert classify.main(argv + ["--no-resume", "--no-cache"]) == 0
    sent = fake_openai.requests_to("/v1/chat/completions")
    assert ["response_format" in r.body for r in sent] == [True, False, False, False]
    assert sum("response_format=" in r.getMessage() for r in caplog.records) == 1


def test_openai_chat_evaluates_with_eval(fake_openai, tmp_path, caplog):
    predictions = {"q1": '{"task": "open_qa"}', "q2": '{"task": "planning"}'}
    fake_openai.chat_responder = lambda body, i: predictions[chat_query(body)]
    source = write_json(tmp_path / "test.json", [{"instruction": "q1", "category": "open_qa"},
                                                 {"instruction": "q2", "category": "open_qa"}])
    out = tmp_path / "eval.json"
    assert classify.main(["--eval", "--backend", "openai_chat", "--base_url", fake_openai.url,
                          "--input_data_path", source, "--output_path", str(out)]) == 0
    assert "accuracy: 0.5000" in caplog.text
    assert [p["prediction"] for p in json.loads(out.read_text())["predictions"]] == ["open_qa", "planning"]


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("data, eval_mode, message", [
    ([{"id": 1, "items": [{"from": "human", "value": "hi"}]},
      {"id": "b7", "items": [{"from": "human"}, {"from": "gpt", "value": "x"}]}],
     False, "in.json: record 1 (id 'b7'): field 'items[0].value' must be a string"),
    ([{"instruction": "hi", "category": "open_qa"}, {"instruction": "yo"}],
     True, "in.json: item 1: field 'category' is missing"),
])
def test_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, capsys, data, eval_mode, message):
    source = write_json(tmp_path / "in.json", data)
    out = tmp_path / "out.json"
    out.write_text("previous result")
    argv = ["--backend", "openai", "--base_url", "http://127.0.0.1:9/v1",
            "--input_data_path", source, "--output_path", str(out)] + (["--eval"] if eval_mode else [])
    assert classify.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert out.read_text() == "previous result"
    assert not (tmp_path / "out_progress.jsonl").exists()


def test_output_may_not_overwrite_the_input(tmp_path, capsys):
    source = write_json(tmp_path / "in.json", openai_records())
    before = Path(source).read_text()
    assert classify.main(["--input_data_path", source, "--output_path", source]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert Path(source).read_text() == before


# -- transformers backend ------------------------------------------------------------------------


@pytest.mark.slow
def test_transformers_backend_constrained(tiny_model_dir, examples, tmp_path):
    records = unlabeled(examples[:7])
    source = write_json(tmp_path / "in.json", records)
    out = tmp_path / "out.json"
    argv = ["--backend", "transformers", "--model", tiny_model_dir, "--dtype", "float32", "--batch_size", "3",
            "--chunk_size", "4", "--input_data_path", source, "--output_path", str(out)]
    assert classify.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["id"] for r in result] == [r["id"] for r in records]
    assert all(r["items"][0]["category"] in NAMES for r in result)
    progress = read_jsonl(tmp_path / "out_progress.jsonl")
    assert len(progress) == 7
    # The random model's free text is noise; constrained, every raw answer is a task name.
    assert all(entry["answer"].strip() in NAMES for entry in progress)


# -- vllm backend: real vLLM (CPU build) with the tiny model; one engine for all tests --------------


@pytest.fixture(scope="module")
def vllm_engines():
    pytest.importorskip("vllm", reason="vLLM is not installed (requirements-dev.txt installs its CPU build)")
    engines = {}
    yield engines
    engines.clear()
    gc.collect()


@pytest.fixture
def vllm_spy(vllm_engines, monkeypatch):
    """Start the engine once (through classify's own code) and record every generate call."""
    from vllm import LLM

    real_start = classify.start_vllm_engine

    def start(args):
        key = (args.model, args.max_model_len, args.dtype)
        if key not in vllm_engines:
            vllm_engines[key] = real_start(args)
        return vllm_engines[key]

    # "answers": texts put in place of the engine's, one per prompt in turn (the random model's own
    # free text is noise), counted over the whole test in "answered".
    spy = {"calls": [], "outputs": [], "interrupt_at_call": None, "answers": None, "answered": 0}
    real_generate = LLM.generate

    def generate(self, prompts, sampling_params=None, **kwargs):
        # A copy: vLLM rewrites the choice list into a grammar in place.
        spy["calls"].append((list(prompts), copy.deepcopy(sampling_params)))
        if len(spy["calls"]) == spy["interrupt_at_call"]:
            raise KeyboardInterrupt
        outputs = real_generate(self, prompts, sampling_params, **kwargs)
        for output in outputs if spy["answers"] else ():
            output.outputs[0].text = spy["answers"][spy["answered"] % len(spy["answers"])]
            spy["answered"] += 1
        spy["outputs"].extend(outputs)
        return outputs

    monkeypatch.setattr(classify, "start_vllm_engine", start)
    monkeypatch.setattr(LLM, "generate", generate)
    return spy


def vllm_argv(model_dir, source, out, *extra):
    return ["--model", model_dir, "--dtype", "float32", "--enforce_eager", "--max_model_len", "2048",
            "--chunk_size", "16", "--input_data_path", source, "--output_path", str(out), *extra]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_classifies_with_spec_prompts(vllm_spy, tiny_model_dir, tiny_tokenizer, examples, tmp_path,
                                                   caplog):
    records = unlabeled(examples)
    kept = {100: "question_generation", "ex-a1": "open_qa", 160: "roleplay"}
    for record in records:
        if record["id"] in kept:
            record["items"][0]["category"] = kept[record["id"]]
    records[1]["items"][0]["category"] = "not_a_task"  # invalid: classified again
    long_query = "Summarize this: " + " ".join(f"w{i}" for i in range(6000)) + " THE END"
    records[3]["items"][0]["value"] = long_query
    source = write_json(tmp_path / "in.json", records)
    out = tmp_path / "out.json"

    assert classify.main(vllm_argv(tiny_model_dir, source, out)) == 0

    to_classify = [r for r in records if r["id"] not in kept]
    assert len(to_classify) == 54
    assert [len(prompts) for prompts, _ in vllm_spy["calls"]] == [16, 16, 16, 6]  # one call per chunk
    sent = [p for prompts, _ in vllm_spy["calls"] for p in prompts]
    for record, prompt in zip(to_classify, sent):
        if record["items"][0]["value"] is long_query:
            assert prompt.startswith(spec_prompt("Summarize this: w0 w1")[: -len(SPEC_TAIL)])
            assert prompt.endswith(" THE END" + SPEC_TAIL)
            assert len(tiny_tokenizer(prompt)["input_ids"]) <= 2048 - 50
        else:
            assert prompt == spec_prompt(record["items"][0]["value"])
    assert [o.prompt for o in vllm_spy["outputs"]] == sent  # what reached the engine
    params = vllm_spy["calls"][0][1]
    assert (params.temperature, params.top_p, params.max_tokens) == (0.0, 1.0, 50)
    assert params.structured_outputs.choice == NAMES

    result = json.loads(out.read_text())
    assert [r["id"] for r in result] == [r["id"] for r in records]
    for r in result:
        if r["id"] in kept:
            assert r["items"][0]["category"] == kept[r["id"]]
        assert r["items"][0]["category"] in NAMES
    progress = read_jsonl(tmp_path / "out_progress.jsonl")
    assert len(progress) == 54
    assert all(entry["answer"] in NAMES for entry in progress)  # constrained: exact names only
    assert "#shortened: 1" in caplog.text


# Free-text answers (unconstrained) and the task each one must give, worked out by hand.
FREE_TEXT_ANSWERS = [(" Open_QA.\n", "open_qa"), ("Task name: planning", "planning"), ("banana bread", "default"),
                     ("**rejecting**\nIt asks for something harmful.", "rejecting")]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_resume_after_interrupt(vllm_spy, tiny_model_dir, examples, tmp_path):
    records = unlabeled(examples)
    source = write_json(tmp_path / "in.json", records)
    out = tmp_path / "out.json"
    argv = vllm_argv(tiny_model_dir, source, out, "--no-constrained")

    vllm_spy["answers"] = [text for text, _ in FREE_TEXT_ANSWERS]
    vllm_spy["interrupt_at_call"] = 2  # killed while the second chunk runs
    assert classify.main(argv) == 130
    assert not out.exists()
    progress_path = tmp_path / "out_progress.jsonl"
    first = read_jsonl(progress_path)
    assert [e["id"] for e in first] == [r["id"] for r in records[:16]]
    with open(progress_path, "a", encoding="utf-8") as f:
        f.write('{"id": 118, "key": "torn')  # a write cut short by the kill

    vllm_spy.update(calls=[], outputs=[], interrupt_at_call=None)
    assert classify.main(argv) == 0
    sent = [p for prompts, _ in vllm_spy["calls"] for p in prompts]
    assert sent == [spec_prompt(r["items"][0]["value"]) for r in records[16:]]  # only what was missing
    assert vllm_spy["calls"][0][1].structured_outputs is None

    result = json.loads(out.read_text())
    assert [r["id"] for r in result] == [r["id"] for r in records]
    assert [r["items"][0]["category"] for r in result[:16]] == [e["category"] for e in first]
    # Record p (in input order) got answer p % 4: the first 16 in the first run, the rest in the rerun.
    assert vllm_spy["answered"] == len(records) == 57
    assert [r["items"][0]["category"] for r in result] == [FREE_TEXT_ANSWERS[p % 4][1] for p in range(57)]
    entries = {e["id"]: e for e in read_jsonl(progress_path)}
    assert len(entries) == len(records)
    assert [entries[r["id"]]["answer"] for r in records] == [FREE_TEXT_ANSWERS[p % 4][0] for p in range(57)]
