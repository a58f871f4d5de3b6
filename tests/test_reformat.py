"""reformat.py: requests, parsing, choice of candidate, failures, chunking and resume, against a fake server."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from fake_servers import (
    ACCEPT_ALL,
    MALFORMED_REPLY,
    REASONING,
    FakeOpenAIServer,
    default_chat_reply,
    find_original_response,
)

import constant
import reformat
from realign.engine import REJECTION_LIMIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "datasets", "examples", "realign_examples.json")
KEY = "sk-test-5ecret-key-0042"


pytestmark = pytest.mark.usefixtures("api_env")  # no ambient OpenAI or Slurm variables; OPENAI_API_KEY=KEY


def record(record_id, category="open_qa", question=None, response="Paris is the capital of France.", **human):
    question = question or f"Question number {record_id}?"
    return {"id": record_id, "items": [{"from": "human", "value": question, "category": category, **human},
                                       {"from": "gpt", "value": response}]}


def examples():
    with open(EXAMPLES, encoding="utf-8") as f:
        return json.load(f)


def run(tmp_path, server, records, *extra, batch="0_of_1"):
    """Write ``records``, run main against ``server``; return (exit status, batch lines)."""
    input_path = tmp_path / "input.json"
    if not input_path.exists():
        input_path.write_text(json.dumps(records), encoding="utf-8")
    status = reformat.main(["--input_data_path", str(input_path), "--output_directory", str(tmp_path / "out"),
                            "--base_url", server.url, *extra])
    return status, read_batch(tmp_path / "out" / f"rewrite_data_{batch}_batch.jsonl")


def read_batch(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_id(lines):
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {line["id"]: line for line in lines}


def error_lines(err):
    """The lines of stderr that report an error (log lines and the progress bar share stderr)."""
    return [line for line in err.splitlines() if line.startswith("reformat: error:")]


def user_text_of(body):
    return body["messages"][-1]["content"]


def chats(server):
    """The chat requests a server received (not the model check)."""
    return server.requests_to("/v1/chat/completions")


def reply(revised, reason="The format fits."):
    return f"Reasoning: {reason}\nRevised response: {revised}"


# -- pure functions ------------------------------------------------------------------


@pytest.mark.parametrize("text, reason, revised", [
    ("Reasoning: fits.\nRevised response: The answer.", "fits.", "The answer."),
    ("reasoning: fits\nrevised response: The answer.", "fits", "The answer."),
    ("**Reasoning:** fits\n**Revised response:** **Answer**\n\nText", "fits", "**Answer**\n\nText"),
    ("**Reasoning**: fits\n**Revised Response**:\n1. one\n2. two", "fits", "1. one\n2. two"),
    ("### Reasoning:\nfits\n### REVISED RESPONSE:\nDone.", "fits", "Done."),
    ("__Revised response:__ Done.", "", "Done."),
    ("Some thoughts first.\nRevised response: Done.", "Some thoughts first.", "Done."),
    ("Reasoning: a\nRevised response: first\nRevised response: second", "a", "first\nRevised response: second"),
    ("Reasoning: fits\nRevised response: **Bold** start", "fits", "**Bold** start"),
])
def test_parse_revised_response_accepts_case_and_markdown(text, reason, revised):
    assert reformat.parse_revised_response(text) == {"reason": reason, "revised_response": revised}


@pytest.mark.parametrize("text", [MALFORMED_REPLY, "", None, "Reasoning: fits\nRevised response:   \n",
                                  "Reasoning: fits. Revised: x"])
def test_parse_revised_response_rejects_replies_without_a_response(text):
    assert reformat.parse_revised_response(text) is None


@pytest.mark.parametrize("text, revised", [
    ('{"reasoning": "fits", "revised_response": "The answer."}', "The answer."),
    ('```json\n{"reasoning": "fits", "revised_response": "The answer."}\n```', "The answer."),
    ("Revised response: Reasoning: fits\nRevised response: The answer.", "The answer."),
    ('{"reasoning": "x", "revised_response": "Reasoning: fits\\nRevised response: The answer."}', "The answer."),
    ("Reasoning: a\nRevised response: Revised response: The answer.", "The answer."),
    ("Reasoning: a\nRevised response: Reasoning: no marker after it", "Reasoning: no marker after it"),
])
def test_parse_takes_json_and_a_nested_leading_protocol_block_off(text, revised):
    assert reformat.parse_revised_response(text)["revised_response"] == revised


def test_judge_candidates_reject_cut_off_unparsable_and_failing_ones():
    kept = record(1)
    passing, failing = reformat.judge_candidates(kept, [
        (reply("**Answer**\n\nParis is the capital of France."), "stop"),
        (reply("Paris is the capital of France, cut off"), "length"),
        (MALFORMED_REPLY, "stop"), (None, None),
        (reply("Lyon is the capital."), "stop")])
    assert passing == [{"reason": "The format fits.", "revised_response": "**Answer**\n\nParis is the capital of France."}]
    assert [problems for _, _, problems in failing] == [["cut_off"], ["unparsable"], ["unparsable"],
                                                        ["lost_answer", "lost_name"]]


def test_longest_keeps_the_first_on_a_tie():
    assert reformat.longest([3, 7, 7, 2]) == 1
    assert reformat.longest([5, 5]) == 0
    assert reformat.longest([1]) == 0


def system_prompt(mode, variant, layout="text"):
    return (constant.REFORMAT_PROMPTS[mode][variant]["system"].strip() + "\n\n"
            + constant.REPLY_FORMATS[layout]["system"].strip())


def test_messages_carry_the_format_and_evidence_only_when_there_is_some():
    plain = reformat.build_rewrite_messages(record(1, "fact_verification"))
    assert plain[0] == {"role": "system", "content": system_prompt("adaptive", "plain")}
    assert plain[1]["content"].endswith(constant.REPLY_FORMATS["text"]["user"])
    assert constant.STRUCTURE["fact_verification"].strip() in plain[1]["content"]
    assert "Paris is the capital of France." in plain[1]["content"] and "Question number 1?" in plain[1]["content"]
    assert "[Evidence start]" not in plain[1]["content"]

    with_evidence = record(2, "open_qa", evidence=["First fact.", "Second fact."])
    messages = reformat.build_rewrite_messages(with_evidence)
    assert messages[0]["content"] == system_prompt("adaptive", "evidence")
    assert "[Evidence start]\n1. First fact.\n\n2. Second fact.\n[Evidence end]" in messages[1]["content"]
    assert "[Evidence start]" not in reformat.build_rewrite_messages(with_evidence, use_evidence=False)[1]["content"]
    assert "[Evidence start]" not in reformat.build_rewrite_messages(record(3, evidence=[]))[1]["content"]

    forced = reformat.build_rewrite_messages(with_evidence, adaptive=False)
    assert forced[0]["content"] == system_prompt("forced", "evidence")
    assert forced[0]["content"] != messages[0]["content"]

    as_json = reformat.build_rewrite_messages(with_evidence, reply_format="json")
    assert as_json[0]["content"] == system_prompt("adaptive", "evidence", "json")
    assert as_json[1]["content"].endswith(constant.REPLY_FORMATS["json"]["user"])


def test_skip_reasons():
    assert reformat.skip_reason(record(1, "open_qa")) is None
    assert "not reformatted" in reformat.skip_reason(record(1, "story_generation"))
    assert "not reformatted" in reformat.skip_reason(record(1, "default"))
    assert reformat.skip_reason(record(1, "mystery_task")) == "unknown category 'mystery_task'"
    multi = record(1)
    multi["items"] += [{"from": "human", "value": "And?"}, {"from": "gpt", "value": "More."}]
    assert reformat.skip_reason(multi).startswith("multi-turn record (4 items)")


# -- end to end against the fake server ------------------------------------------------


def seed_command(out, tokenizer_dir, *model):
    return ["--input_data_path", EXAMPLES, "--output_directory", str(out), "--tokenizer_path", tokenizer_dir,
            "--dataset_batch_id", "0", "--dataset_batch_num", "10", "--openai_key", KEY, "--top_k", "2",
            *model, "--temperature", "0.3", "--top_p", "1", "--target_length", "4096"]


@pytest.mark.slow
def test_the_seed_command_names_the_shut_down_model_and_works_with_the_default(
        tmp_path, fake_openai, tiny_tokenizer_dir, monkeypatch, caplog, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.url)
    fake_openai.expected_key = KEY
    out = tmp_path / "out"
    # The seed's model no longer exists: one line naming it and what the server offers, before any request.
    status = reformat.main(seed_command(out, tiny_tokenizer_dir, "--model", "gpt-3.5-turbo-1106"))
    assert status == 1
    (error,) = error_lines(capsys.readouterr().err)
    assert error == (f"reformat: error: model 'gpt-3.5-turbo-1106' is not offered by {fake_openai.url}; it offers: "
                     "gpt-4o-mini, gpt-6-luna, gpt-6-sol (choose one with --model, or pass --no-model_check for a gateway that accepts names it does not list)")
    assert chats(fake_openai) == []

    # The same command without --model uses today's default model.
    few_words_many_tokens = "Zqxjvkw" * 12  # one word, dozens of tokens of the tiny tokenizer

    def responder(body, i):
        original = find_original_response(user_text_of(body))
        return reply(original + "\n\n" + ["a b c d e f g h i", few_words_many_tokens][i])

    fake_openai.chat_responder = responder
    with caplog.at_level(logging.DEBUG):
        status = reformat.main(seed_command(out, tiny_tokenizer_dir))
    assert status == 0
    chunk = examples()[0:6]  # chunk 0 of 10 of the 57 examples: records 0..5
    lines = read_batch(out / "rewrite_data_0_of_10_batch.jsonl")
    assert sorted(by_id(lines)) == sorted(r["id"] for r in chunk)
    rewritten = [line for line in lines if line["items"][1]["revised_response_list"]]
    assert len(rewritten) == 3
    for line in rewritten:  # the tokenizer, not a word count, chose the longer candidate
        assert line["items"][1]["revised_response"]["revised_response"].endswith("\n\n" + few_words_many_tokens)
    body = chats(fake_openai)[0].body
    assert {k: body[k] for k in ("model", "n", "temperature", "top_p", "max_completion_tokens",
                                 "reasoning_effort")} == {
        "model": "gpt-6-luna", "n": 2, "temperature": 0.3, "top_p": 1.0, "max_completion_tokens": 4096,
        "reasoning_effort": "none"}
    assert "max_tokens" not in body
    assert chats(fake_openai)[0].headers["authorization"] == f"Bearer {KEY}"

    captured = capsys.readouterr()
    shown = caplog.text + captured.out + captured.err + (out / "rewrite_data_0_of_10_batch.jsonl").read_text()
    assert KEY not in shown
    assert "prefer the environment variable OPENAI_API_KEY" in caplog.text
    assert "reformatted: 3, kept the original (no candidate passed the checks): 0, passed through: 3, failed: 0" \
        in caplog.text


def test_a_reasoning_model_gets_requests_it_accepts_and_no_record_fails(tmp_path, fake_openai, caplog):
    fake_openai.profiles = {"*": dataclasses.replace(REASONING, max_n=1)}  # refuses temperature 0.3 and n=2
    records = [record(i) for i in range(5)]
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, "--concurrency", "1", "--top_k", "2")
    assert status == 0
    assert [len(line["items"][1]["revised_response_list"]) for line in lines] == [2] * 5
    sent = [r.body for r in chats(fake_openai)]
    # One refusal per adaptation (temperature, then n), then 2 single-candidate requests per record.
    assert len(sent) == 2 + 2 * 5
    assert "temperature" in sent[0] and sent[1]["n"] == 2 and "temperature" not in sent[1]
    assert all(body["n"] == 1 and "temperature" not in body and "max_tokens" not in body for body in sent[2:])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("temperature=0.3 refused" in w for w in warnings) == 1  # adapted once, for the whole run
    assert "adaptations: temperature=0.3 refused" in caplog.text and "n=2 refused: 2 requests" in caplog.text


def test_the_json_layout_adapts_once_to_text_where_the_server_refuses_the_schema(tmp_path, fake_openai, caplog):
    fake_openai.profiles = {"*": dataclasses.replace(ACCEPT_ALL, unrecognized=("response_format",))}
    records = [record(i) for i in range(4)]
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, "--concurrency", "1")
    assert status == 0 and all("status" not in line for line in lines)
    sent = [r.body for r in chats(fake_openai)]
    assert len(sent) == 1 + 4  # one refusal, then every record once
    assert sent[0]["response_format"] == reformat.REVISION_SCHEMA and sent[0]["messages"][0]["content"].endswith(
        constant.REPLY_FORMATS["json"]["system"])
    for body in sent[2:]:  # the records asked after the refusal: the text layout, no schema
        assert "response_format" not in body
        assert body["messages"][0]["content"].endswith(constant.REPLY_FORMATS["text"]["system"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("response_format" in w for w in warnings) == 1
    # A rerun finds every line standing: the fingerprint is of the request the flags ask for.
    fake_openai.requests.clear()
    status, _ = run(tmp_path, fake_openai, records)
    assert status == 0 and chats(fake_openai) == []


def test_every_task_an_unknown_category_and_a_multi_turn_record_go_through(tmp_path, fake_openai, caplog):
    records = examples() + [record("odd-1", "mystery_task")]
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, "--concurrency", "8")
    assert status == 0
    lines = by_id(lines)
    assert set(lines) == {r["id"] for r in records}
    assert {r["items"][0]["category"] for r in records} >= set(constant.TASK_DESCRIPTION)
    for original in records:
        line = lines[original["id"]]
        gpt = line["items"][1]
        assert gpt["value"] == original["items"][1]["value"]
        assert line["items"][0] == original["items"][0] and line["items"][2:] == original["items"][2:]
        assert set(gpt["revised_response"]) == {"reason", "revised_response"}
        if len(original["items"]) == 2 and original["items"][0]["category"] in constant.REWRITE_TASK:
            assert len(gpt["revised_response_list"]) == 2
            assert gpt["revised_response"]["revised_response"] == "**Answer**\n\n" + gpt["value"]
        else:
            assert gpt["revised_response_list"] == []
            assert gpt["revised_response"]["revised_response"] == gpt["value"]
    assert lines["odd-1"]["items"][1]["revised_response"]["reason"] == "unknown category 'mystery_task'"
    assert "unknown categories: 'mystery_task' (1)" in caplog.text
    # The 57 examples hold 44 single-turn records of rewrite tasks (datasets/examples).
    assert len(chats(fake_openai)) == 44
    assert "reformatted: 44, kept the original (no candidate passed the checks): 0, passed through: 14, failed: 0" \
        in caplog.text


def test_requests_carry_format_evidence_and_mode(tmp_path, fake_openai):
    records = [record(1, "open_qa", question="With evidence?", evidence=["Fact one.", "Fact two."]),
               record(2, "open_qa", question="Without evidence?"),
               record(3, "email_generation", question="Write an email?")]
    status, _ = run(tmp_path, fake_openai, records)
    assert status == 0
    sent = {user_text_of(r.body).split("\n")[1]: r.body for r in chats(fake_openai)}
    assert "1. Fact one.\n\n2. Fact two." in sent["With evidence?"]["messages"][1]["content"]
    assert "[Evidence start]" not in sent["Without evidence?"]["messages"][1]["content"]
    assert constant.STRUCTURE["email_generation"].strip() in sent["Write an email?"]["messages"][1]["content"]
    assert constant.STRUCTURE["open_qa"].strip() in sent["Without evidence?"]["messages"][1]["content"]
    assert sent["With evidence?"]["messages"][0]["content"] == system_prompt("adaptive", "evidence", "json")
    assert sent["With evidence?"]["response_format"] == reformat.REVISION_SCHEMA

    fake_openai.requests.clear()
    (tmp_path / "forced").mkdir()
    status, _ = run(tmp_path / "forced", fake_openai, records, "--no-adaptive", "--no-is_retrieval")
    assert status == 0
    assert len(chats(fake_openai)) == 3
    for request in chats(fake_openai):
        assert request.body["messages"][0]["content"] == system_prompt("forced", "plain", "json")
        assert "[Evidence start]" not in user_text_of(request.body)


PARIS = "Paris is the capital of France."  # the response of record()


def test_the_longest_candidate_that_passes_the_checks_is_kept(tmp_path, fake_openai):
    def responder(body, i):
        question = user_text_of(body)
        if "tie" in question:
            return reply([f"{PARIS} One.", f"{PARIS} Two."][i])
        if "malformed" in question:
            return [MALFORMED_REPLY, reply(f"{PARIS} The good one.")][i]
        if "truncated" in question:
            return [reply(f"{PARIS} Complete."), {"content": reply(f"{PARIS} Much longer but cut off at the"),
                                                   "finish_reason": "length"}][i]
        if "looping" in question:
            return reply([f"{PARIS} Short.", f"{PARIS}\n" + "The city is the seat of the government.\n" * 6][i])
        return reply([f"{PARIS} Short.", f"{PARIS} A much longer candidate."][i])

    fake_openai.chat_responder = responder
    records = [record(1, question="longest?"), record(2, question="tie?"), record(3, question="malformed?"),
               record(4, question="truncated?"), record(5, question="looping?")]
    status, lines = run(tmp_path, fake_openai, records, "--top_k", "2", "--reply_format", "text")
    assert status == 0
    chosen = {i: line["items"][1]["revised_response"]["revised_response"] for i, line in by_id(lines).items()}
    assert chosen == {1: f"{PARIS} A much longer candidate.", 2: f"{PARIS} One.", 3: f"{PARIS} The good one.",
                      4: f"{PARIS} Complete.", 5: f"{PARIS} Short."}  # 5: the longer one loops
    listed = {i: len(line["items"][1]["revised_response_list"]) for i, line in by_id(lines).items()}
    assert listed == {1: 2, 2: 2, 3: 1, 4: 1, 5: 1}
    checks = {i: line["candidate_checks"] for i, line in by_id(lines).items()}
    assert checks[5] == {"candidates": 2, "failing": 1, "problems": {"loop": 1}}
    assert checks[4] == {"candidates": 2, "failing": 1, "problems": {"cut_off": 1}}
    assert checks[1] == {"candidates": 2, "failing": 0, "problems": {}}
    # the chosen rewrite's stamp, which spares the filter the checks of the same texts
    from realign.quality import passed_stamp, record_texts
    stamps = {i: line["checks_passed"] for i, line in by_id(lines).items()}
    assert stamps == {r["id"]: passed_stamp(chosen[r["id"]], *record_texts(r)) for r in records}
    assert len(chats(fake_openai)) == 5  # one passing candidate is enough: no re-ask
    unused = read_batch(tmp_path / "out" / "rewrite_data_0_of_1_unused_replies.jsonl")
    assert sorted((entry["id"], entry["problems"]) for entry in unused) == [
        (3, ["unparsable"]), (4, ["cut_off"]), (5, ["loop"])]
    assert next(e for e in unused if e["id"] == 3)["reply"] == MALFORMED_REPLY


def test_rejected_replies_are_asked_again_a_bounded_number_of_times(tmp_path, fake_openai, caplog):
    fake_openai.add_fault(kind="truncated", match=lambda body: "Cut?" in user_text_of(body))
    fake_openai.add_fault(kind="malformed", times=None, match=lambda body: "Bad?" in user_text_of(body))
    records = [record(1, question="Cut?"), record(2, question="Bad?"), record(3, question="Fine?")]
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, "--max_parse_retries", "2")
    assert status == 0  # a record whose candidates all failed the checks keeps its original: not a failure
    lines = by_id(lines)
    assert "status" not in lines[1] and lines[1]["items"][1]["revised_response_list"]
    bad = lines[2]
    assert bad["status"] == "rejected" and "error" not in bad
    assert bad["candidate_checks"] == {"candidates": 6, "failing": 6, "problems": {"unparsable": 6}}
    assert bad["items"][1]["revised_response"] == {
        "reason": "kept the original: no candidate passed the checks (unparsable 6)",
        "revised_response": records[1]["items"][1]["value"]}
    assert bad["items"][1]["revised_response_list"] == []
    assert bad["items"][1]["value"] == records[1]["items"][1]["value"]
    assert sum("Bad?" in user_text_of(r.body) for r in chats(fake_openai)) == 3
    assert len(chats(fake_openai)) == 2 + 3 + 1
    assert "kept the original (no candidate passed the checks): 1" in caplog.text

    # A plain rerun asks nothing.
    fake_openai.requests.clear()
    status, again = run(tmp_path, fake_openai, records)
    assert status == 0 and chats(fake_openai) == [] and again == list(lines.values())

    # --retry_failed asks again for exactly the failed record.
    fake_openai._faults.clear()
    status, retried = run(tmp_path, fake_openai, records, "--retry_failed")
    assert status == 0
    assert [("Bad?" in user_text_of(r.body)) for r in chats(fake_openai)] == [True]
    retried = by_id(retried)
    assert set(retried) == {1, 2, 3} and not any("status" in line for line in retried.values())
    assert retried[1] == lines[1] and retried[3] == lines[3]


@pytest.mark.slow
def test_transient_errors_are_retried_honouring_retry_after(tmp_path, fake_openai, caplog):
    fake_openai.add_fault(429, retry_after=0)
    fake_openai.add_fault(500)  # no Retry-After: exponential backoff (0.5-1 s)
    fake_openai.add_fault(503, retry_after=0)
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, [record(1)], "--max_retries", "3")
    assert status == 0
    assert lines[0]["items"][1]["revised_response"]["revised_response"].startswith("**Answer**")
    assert len(chats(fake_openai)) == 4
    assert "requests: 4, retries: 3" in caplog.text


def test_transient_errors_past_the_bound_fail_the_record(tmp_path, fake_openai):
    fake_openai.add_fault(503, retry_after=0, times=None, match=lambda body: "Down?" in user_text_of(body))
    status, lines = run(tmp_path, fake_openai, [record(1, question="Down?"), record(2)], "--max_retries", "2")
    assert status == 1
    lines = by_id(lines)
    assert lines[1]["status"] == "failed" and lines[1]["error"] == "failed after 3 attempts: HTTP 503"
    assert "status" not in lines[2]


def test_a_refused_key_stops_the_run_at_once(tmp_path, fake_openai, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-but-secret-9999")
    fake_openai.expected_key = KEY
    records = [record(i) for i in range(30)] + [record(99, "story_generation")]
    status, lines = run(tmp_path, fake_openai, records, "--concurrency", "4")
    assert status == 1
    err = capsys.readouterr().err
    refused = "reformat: error: the API server refused the credentials (HTTP 401); check OPENAI_API_KEY"
    assert error_lines(err) == [refused]
    assert "sk-wrong-but-secret-9999" not in err
    assert chats(fake_openai) == []  # the model check at start-up already met the refusal
    assert lines == []


def test_http_400_on_every_request_stops_the_run(tmp_path, fake_openai, capsys):
    fake_openai.add_fault(400, times=None)
    status, lines = run(tmp_path, fake_openai, [record(i) for i in range(40)], "--concurrency", "4")
    assert status == 1
    err = capsys.readouterr().err
    assert "the first 8 requests were all refused (HTTP 400: Invalid request.)" in err
    assert REJECTION_LIMIT <= len(chats(fake_openai)) <= REJECTION_LIMIT + 4
    assert lines == []  # the refused records were held back, so a rerun with fixed settings asks them


def test_http_400_on_one_record_fails_only_that_record(tmp_path, fake_openai):
    fake_openai.add_fault(400, match=lambda body: "Too long?" in user_text_of(body))
    records = [record(1, question="Too long?")] + [record(i) for i in range(2, 6)]
    status, lines = run(tmp_path, fake_openai, records, "--concurrency", "1")
    assert status == 1
    lines = by_id(lines)
    assert set(lines) == {1, 2, 3, 4, 5}
    assert lines[1]["status"] == "failed" and lines[1]["error"].startswith("HTTP 400")
    assert all("status" not in lines[i] for i in range(2, 6))


def test_chunks_of_a_run_cover_the_input_once(tmp_path, fake_openai):
    expected = {0: [0, 1, 2, 3, 4, 5, 6, 7], 1: [8, 9, 10, 11, 12, 13, 14], 2: [15, 16, 17, 18, 19, 20, 21]}
    records = [record(i) for i in range(22)]  # 22 = 8 + 7 + 7: earlier chunks one larger
    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps(records), encoding="utf-8")
    for batch_id in range(3):
        status = reformat.main(["--input_data_path", str(input_path), "--output_directory", str(tmp_path / "out"),
                                "--base_url", fake_openai.url, "--dataset_batch_id", str(batch_id),
                                "--dataset_batch_num", "3", "--concurrency", "8"])
        assert status == 0
        lines = read_batch(tmp_path / "out" / f"rewrite_data_{batch_id}_of_3_batch.jsonl")
        assert sorted(by_id(lines)) == expected[batch_id]


def test_slurm_array_variables_pick_the_chunk(tmp_path, fake_openai, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "2")
    records = [record(i) for i in range(10)]
    status, lines = run(tmp_path, fake_openai, records, batch="2_of_3")
    assert status == 0
    assert sorted(by_id(lines)) == [7, 8, 9]
    assert sorted(os.listdir(tmp_path / "out")) == [".rewrite_data_2_of_3_batch.jsonl.lock",
                                                    "rewrite_data_2_of_3_batch.jsonl", "slurm_array.json"]
    # --array=1-5:2: task ids 1, 3, 5 are chunks 0, 1, 2 of 3
    for name, value in (("ID", "5"), ("MIN", "1"), ("MAX", "5"), ("STEP", "2")):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", value)
    assert reformat.resolve_chunk(None, None, str(tmp_path / "elsewhere"))[:2] == (2, 3)
    assert reformat.resolve_chunk(0, None, str(tmp_path / "elsewhere"))[:2] == (0, 1)  # the flag wins


def test_a_resubmitted_slurm_index_takes_its_chunk_of_the_folders_batch_count(tmp_path, fake_openai, monkeypatch,
                                                                               capsys):
    """``sbatch --array=3`` sets SLURM_ARRAY_TASK_COUNT=1: it must not take the whole input."""
    records = [record(i) for i in range(40)]
    for name, value in (("ID", "3"), ("COUNT", "1"), ("MIN", "3"), ("MAX", "3")):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", value)
    status, lines = run(tmp_path, fake_openai, records)  # no batch files yet: it cannot tell N
    assert status == 2 and lines == [] and chats(fake_openai) == []
    (error,) = error_lines(capsys.readouterr().err)
    assert error == (f"reformat: error: SLURM_ARRAY_TASK_ID=3 (SLURM_ARRAY_TASK_COUNT=1): the array's variables "
                     f"cannot tell how many chunks the input is cut into, and there are no batch files in "
                     f"{tmp_path / 'out'}; pass --dataset_batch_num N (and --dataset_batch_id)")
    assert not (tmp_path / "out").exists()

    (tmp_path / "out").mkdir()
    for i in (0, 1, 2, 4, 5, 6, 7, 8, 9):  # the other chunks of a run of N=10 are there
        (tmp_path / "out" / f"rewrite_data_{i}_of_10_batch.jsonl").write_text("", encoding="utf-8")
    status, lines = run(tmp_path, fake_openai, records, batch="3_of_10")
    assert status == 0
    assert sorted(by_id(lines)) == [12, 13, 14, 15]  # chunk 3 of 10 of 40 records
    assert len(chats(fake_openai)) == 4


def test_a_resubmitted_index_of_a_one_based_array_finds_its_chunk(tmp_path, fake_openai, monkeypatch):
    records = [record(i) for i in range(40)]
    for name, value in (("ID", "1"), ("COUNT", "10"), ("MIN", "1"), ("MAX", "10"), ("STEP", "1")):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", value)  # sbatch --array=1-10: task 1 is chunk 0
    status, lines = run(tmp_path, fake_openai, records, batch="0_of_10")
    assert status == 0 and sorted(by_id(lines)) == [0, 1, 2, 3]
    assert json.loads((tmp_path / "out" / "slurm_array.json").read_text()) == {"first": 1, "step": 1, "count": 10}
    for name, value in (("ID", "4"), ("COUNT", "1"), ("MIN", "4"), ("MAX", "4")):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", value)  # sbatch --array=4: chunk 3, not chunk 4
    status, lines = run(tmp_path, fake_openai, records, batch="3_of_10")
    assert status == 0 and sorted(by_id(lines)) == [12, 13, 14, 15]


def test_resume_never_asks_again_for_a_finished_id(tmp_path, fake_openai):
    records = [record(i * 3 + 1) for i in range(30)]
    status, first = run(tmp_path, fake_openai, records, "--concurrency", "4")
    assert status == 0
    path = tmp_path / "out" / "rewrite_data_0_of_1_batch.jsonl"
    kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:12]
    torn = json.dumps(first[12])[:40]  # a kill in the middle of a line
    path.write_text("".join(kept) + torn, encoding="utf-8")
    done = {json.loads(line)["id"] for line in kept}

    fake_openai.requests.clear()
    status, second = run(tmp_path, fake_openai, records, "--concurrency", "4", "--no-cache")
    assert status == 0
    asked = {int(user_text_of(r.body).split("\n")[1].split()[-1].rstrip("?")) for r in chats(fake_openai)}
    assert asked == {r["id"] for r in records} - done
    assert len(chats(fake_openai)) == len(asked) == 18
    assert set(by_id(second)) == {r["id"] for r in records}


def test_a_rerun_in_a_fresh_folder_is_answered_by_the_cache(tmp_path, fake_openai, caplog, monkeypatch):
    records = [record(i) for i in range(12)] + [record(100, "story_generation")]
    status, first = run(tmp_path, fake_openai, records, "--concurrency", "4")
    assert status == 0 and len(chats(fake_openai)) == 12
    fake_openai.requests.clear()
    (tmp_path / "fresh").mkdir()
    # The cached replies hold the checks' verdicts of their candidates: the rerun reads them
    # and checks nothing again.
    checked = []
    monkeypatch.setattr(reformat, "check_record", lambda *texts: checked.append(texts) or [])
    with caplog.at_level(logging.INFO):
        status, second = run(tmp_path / "fresh", fake_openai, records, "--concurrency", "4")
    assert status == 0
    assert chats(fake_openai) == []
    assert "requests: 0, retries: 0 (429 rate limit: 0), cache hits: 12" in caplog.text
    assert {line["id"]: line for line in second} == {line["id"]: line for line in first}
    assert checked == []


def test_verdicts_read_from_a_reply_are_those_of_the_same_texts_only():
    kept = record(1)
    text = reply("**Answer**\n\nParis is the capital of France.")
    verdicts = {}
    assert reformat.judge_candidates(kept, [(text, "stop")], verdicts)[1] == []
    assert list(verdicts.values()) == [[]]
    # a verdict learnt for this record's texts does not answer for another record's
    other = record(1)
    other["items"][1]["value"] = "Lyon is the capital of France."
    passing, failing = reformat.judge_candidates(other, [(text, "stop")], verdicts)
    assert passing == [] and [problems for _, _, problems in failing] == [["lost_answer"]]
    assert len(verdicts) == 2


def copy_of_the_project(tmp_path):
    """The scripts, the helper package and constant.py in a folder of the test's own."""
    target = tmp_path / "project"
    target.mkdir()
    for name in ("reformat.py", "constant.py"):
        shutil.copy(os.path.join(ROOT, name), target / name)
    shutil.copytree(os.path.join(ROOT, "realign"), target / "realign",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.mark.slow
def test_a_changed_format_redoes_only_its_task_and_changed_sampling_redoes_everything(tmp_path, fake_openai,
                                                                                      caplog):
    records = [record(i, "open_qa") for i in range(4)] + [record(i, "email_generation") for i in range(4, 8)]
    status, _ = run(tmp_path, fake_openai, records, "--concurrency", "4")
    assert status == 0 and len(chats(fake_openai)) == 8

    project = copy_of_the_project(tmp_path)
    source = (project / "constant.py").read_text(encoding="utf-8")
    edited = source.replace('    "open_qa": (\n', '    "open_qa": (\n        "0. Start with a one-line summary.\\n"\n', 1)
    assert edited != source
    (project / "constant.py").write_text(edited, encoding="utf-8")
    fake_openai.requests.clear()
    done = subprocess.run([sys.executable, str(project / "reformat.py"), "--input_data_path",
                           str(tmp_path / "input.json"), "--output_directory", str(tmp_path / "out"),
                           "--base_url", fake_openai.url], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    asked = sorted(int(user_text_of(r.body).split("\n")[1].split()[-1].rstrip("?")) for r in chats(fake_openai))
    assert asked == [0, 1, 2, 3]  # only the open_qa records, whose format changed
    assert "4 finished lines were made with other settings" in done.stderr
    lines = read_batch(tmp_path / "out" / "rewrite_data_0_of_1_batch.jsonl")
    assert sorted(line["id"] for line in lines) == list(range(8))  # one line per id, none of the old settings

    fake_openai.requests.clear()
    status, lines = run(tmp_path, fake_openai, records, "--top_k", "3")
    assert status == 0 and len(chats(fake_openai)) == 8  # n is part of every request
    assert all(len(line["items"][1]["revised_response_list"]) == 3 for line in lines)

    fake_openai.requests.clear()
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, "--top_k", "3", "--model", "gpt-6-sol")
    assert status == 0 and len(chats(fake_openai)) == 8
    assert {r.body["model"] for r in chats(fake_openai)} == {"gpt-6-sol"}
    assert "8 finished lines were made with other settings" in caplog.text
    assert sorted(line["id"] for line in lines) == list(range(8))


def test_the_dry_run_reckons_with_the_rate_limits_the_last_run_was_told(tmp_path, fake_openai, capsys):
    fake_openai.set_rate_limits(rpm=6000, tpm=10_000_000)
    status, _ = run(tmp_path, fake_openai, [record(i) for i in range(4)])
    assert status == 0
    (tmp_path / "next").mkdir()
    capsys.readouterr()
    status, _ = run(tmp_path / "next", fake_openai, [record(i) for i in range(8)], "--dry_run")
    assert status == 0
    assert "expected time at the rate limits (6,000 requests/min, 10,000,000 tokens/min)" in capsys.readouterr().out


def test_the_dry_run_sends_nothing_and_predicts_the_requests_of_the_real_run(tmp_path, fake_openai, capsys):
    records = [record(i) for i in range(10)] + [record(i, "story_generation") for i in range(10, 13)]
    status, _ = run(tmp_path, fake_openai, records[:4])  # 4 of them are then in the cache
    assert status == 0
    fake_openai.requests.clear()
    (tmp_path / "next").mkdir()
    capsys.readouterr()
    status, lines = run(tmp_path / "next", fake_openai, records, "--dry_run", "--max_requests_per_minute", "60",
                        "--usage_path", str(tmp_path / "usage.json"))
    assert status == 0 and lines == [] and fake_openai.requests == []
    assert not (tmp_path / "next" / "out").exists()
    report = capsys.readouterr().out
    assert "requests to send: 6 (answered by the cache: 4)" in report
    assert "estimated at 4 characters a token" in report
    assert "expected time at the rate limits (60 requests/min): 0.1 min" in report
    usage = json.loads((tmp_path / "usage.json").read_text())
    assert (usage["requests"], usage["cache_hits"]) == (6, 4)
    # gpt-6-luna at $0.10 in and $0.50 out per million tokens, from the counted tokens
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 0.10 + usage["completion_tokens"] * 0.50)
                                              / 1e6, rel=1e-3)

    status, _ = run(tmp_path / "next", fake_openai, records)
    assert status == 0 and len(chats(fake_openai)) == 6


def test_max_cost_stops_near_the_cap_and_a_higher_cap_finishes(tmp_path, fake_openai, caplog, capsys):
    records = [record(i, response=" ".join(["word"] * 50)) for i in range(40)]
    price = ["--price_input", "100", "--price_output", "100"]  # USD per million tokens: a few cents a request
    with caplog.at_level(logging.INFO):
        status, lines = run(tmp_path, fake_openai, records, "--max_cost", "0.5", "--concurrency", "2", *price,
                            "--usage_path", str(tmp_path / "usage.json"))
    assert status == 1
    (error,) = error_lines(capsys.readouterr().err)
    assert error.startswith("reformat: error: budget reached: $") and error.endswith(
        "rerun with a higher --max_cost to continue")
    usage = json.loads((tmp_path / "usage.json").read_text())
    per_request = usage["cost_usd"] / usage["requests"]
    assert usage["cost_usd"] <= 0.5 + per_request
    assert 0 < len(lines) < 40 and usage["stopped"] == "budget"

    status, lines = run(tmp_path, fake_openai, records, "--max_cost", "100", *price)
    assert status == 0 and sorted(line["id"] for line in lines) == list(range(40))


@pytest.mark.slow
def test_sigterm_leaves_whole_lines_and_a_rerun_finishes(tmp_path):
    records = [record(i) for i in range(40)]
    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    batch = out / "rewrite_data_0_of_1_batch.jsonl"
    with FakeOpenAIServer(latency=0.3) as server:
        command = [sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", str(input_path),
                   "--output_directory", str(out), "--base_url", server.url, "--concurrency", "4", "--no-cache"]
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OPENAI_API_KEY": KEY})
        deadline = time.monotonic() + 30
        while len(read_batch(batch)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        assert "interrupted; progress so far is saved" in err
        first = read_batch(batch)  # every line parses
        assert 6 <= len(first) < 40
        first_requests = len(chats(server))
        assert first_requests == len(first)  # the requests in flight finished and were saved

        status = reformat.main(["--input_data_path", str(input_path), "--output_directory", str(out),
                                "--base_url", server.url, "--concurrency", "8", "--no-cache"])
        assert status == 0
        assert set(by_id(read_batch(batch))) == set(range(40))
        assert len(chats(server)) - first_requests == 40 - len(first)  # finished ids are not asked again
        assert server.max_in_flight >= 4  # requests really run concurrently


@pytest.mark.slow
def test_a_second_process_on_the_same_batch_file_refuses_at_once(tmp_path):
    records = [record(i) for i in range(30)]
    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    gate = threading.Event()  # the first process finishes record 0, then waits until the second has tried

    def responder(body, choice_index):
        if "Question number 0?" not in user_text_of(body):
            gate.wait(60)
        return default_chat_reply(body, choice_index)

    with FakeOpenAIServer() as server:
        server.chat_responder = responder
        command = [sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", str(input_path),
                   "--output_directory", str(out), "--base_url", server.url, "--concurrency", "2"]
        first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not read_batch(out / "rewrite_data_0_of_1_batch.jsonl") and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        finally:
            gate.set()
        _, first_err = first.communicate(timeout=60)
    assert second.returncode == 2
    (error,) = [line for line in second.stderr.splitlines() if line.startswith("reformat.py: error:")]
    assert f"{out / 'rewrite_data_0_of_1_batch.jsonl'} is being written by another process (pid {first.pid}" in error
    assert first.returncode == 0, first_err
    assert sorted(by_id(read_batch(out / "rewrite_data_0_of_1_batch.jsonl"))) == list(range(30))


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ({"id": 7, "items": [{"from": "human", "value": "Q", "category": "open_qa"}]},
     "record 1 (id 7): field 'items[1]' is missing"),
    (record(8, evidence="not a list"), "record 1 (id 8): field 'items[0].evidence' must be a list of strings"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, fake_openai, capsys, bad, message):
    status, _ = run(tmp_path, fake_openai, [record(1), bad])
    assert status == 2
    err = capsys.readouterr().err
    (error,) = error_lines(err)
    assert err.endswith(error + "\n") and message in error and "input.json" in error
    assert not (tmp_path / "out").exists()
    assert fake_openai.requests == []


def test_no_key_for_openai_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps([record(1)]), encoding="utf-8")
    status = reformat.main(["--input_data_path", str(input_path), "--output_directory", str(tmp_path / "out")])
    assert status == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert error.startswith("reformat: error: OPENAI_API_KEY is not set: export your API key")
    assert not (tmp_path / "out").exists()


def test_a_batch_file_from_another_chunking_is_refused(tmp_path, fake_openai, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rewrite_data_0_of_1_batch.jsonl").write_text(json.dumps(record(999)) + "\n", encoding="utf-8")
    status, lines = run(tmp_path, fake_openai, [record(1)])
    assert status == 2
    assert "holds 1 lines whose id is not in this chunk (first: 999)" in capsys.readouterr().err
    assert [line["id"] for line in lines] == [999]


def test_batch_id_outside_the_range_is_a_usage_error(tmp_path, fake_openai, capsys):
    status, _ = run(tmp_path, fake_openai, [record(1)], "--dataset_batch_id", "3", "--dataset_batch_num", "3")
    assert status == 2
    assert error_lines(capsys.readouterr().err) == [
        "reformat: error: --dataset_batch_id must be in 0..2 (--dataset_batch_num 3), got 3"]
