"""retrieval.py and its Serper client (realign/search.py), against the fake Serper on loopback."""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import asyncio

import pytest
from fake_servers import DEFAULT_SERPER_KEY, FakeSerperServer

import retrieval
from realign import FatalError
from realign.engine import Options, Request, run_requests
from realign.pool import Stopper
from realign.search import SerperTransport, search_body

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDER = "No good Google Search Result was found"

# A reply with every kind of evidence, more than 5 strings in all.
FULL_REPLY = {
    "searchParameters": {"q": "Who wrote Dune?", "gl": "us", "hl": "en"},
    "answerBox": {"answer": "Frank Herbert", "snippet": "not used: the answer wins"},
    "knowledgeGraph": {"title": "Dune", "type": "Novel by Frank Herbert",
                       "description": "Dune is a 1965 science fiction novel.",
                       "attributes": {"Author": "Frank Herbert", "Published": "1965"}},
    "organic": [{"title": "Dune", "link": "https://example.com/1", "snippet": "Organic snippet 1.",
                 "attributes": {"Pages": "412"}, "position": 1},
                {"title": "Dune 2", "link": "https://example.com/2", "snippet": "Organic snippet 2.",
                 "position": 2}],
}


def record(record_id, value, category=None, turns=1):
    human = {"from": "human", "value": value}
    if category is not None:
        human["category"] = category
    items = [human, {"from": "gpt", "value": f"answer to {value}"}]
    for turn in range(1, turns):
        items += [{"from": "human", "value": f"follow-up {turn}"}, {"from": "gpt", "value": f"reply {turn}"}]
    return {"id": record_id, "items": items}


def write_input(tmp_path, records, name="classified.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def run(input_path, output_path, server, *extra):
    return retrieval.main(["--input_data_path", input_path, "--output_path", output_path,
                           "--search_url", server.search_url, *extra])


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def queries_sent(server):
    return [request.body["q"] for request in server.requests]


@pytest.fixture(autouse=True)
def serper_key(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", DEFAULT_SERPER_KEY)


# -- evidence extraction and cleaning ----------------------------------------------------


def test_extraction_order_and_five_item_cut():
    assert retrieval.extract_evidence(FULL_REPLY) == [
        "Frank Herbert",
        "Dune: Novel by Frank Herbert",
        "Dune is a 1965 science fiction novel.",
        "Author: Frank Herbert",
        "Published: 1965",
    ]
    without_box = {key: value for key, value in FULL_REPLY.items() if key != "answerBox"}
    assert retrieval.extract_evidence(without_box)[3:] == ["Published: 1965", "Organic snippet 1."]
    organic_only = {"organic": FULL_REPLY["organic"]}
    assert retrieval.extract_evidence(organic_only) == ["Organic snippet 1.", "Pages: 412", "Organic snippet 2."]


def test_answer_box_falls_back_to_snippet_then_highlighted():
    snippet = {"answerBox": {"snippet": "Line one\nline two"}, "organic": []}
    assert retrieval.extract_evidence(snippet) == ["Line one line two"]
    highlighted = {"answerBox": {"snippetHighlighted": ["8,849 m", "29,032 ft"]}, "organic": []}
    assert retrieval.extract_evidence(highlighted) == ["8,849 m 29,032 ft"]


def test_knowledge_graph_without_type_and_reply_without_organic():
    reply = {"knowledgeGraph": {"title": "Kilimanjaro", "description": "A mountain.",
                                "attributes": {"Elevation": "5,895 m"}}}
    assert retrieval.extract_evidence(reply) == ["A mountain.", "Elevation: 5,895 m"]


def test_nothing_found_gives_the_placeholder_and_only_ten_organic_results_count():
    assert retrieval.extract_evidence({"organic": []}) == [PLACEHOLDER]
    assert retrieval.extract_evidence({}) == [PLACEHOLDER]
    eleven = [{"title": f"t{i}", "link": "l"} for i in range(10)] + [{"title": "t", "snippet": "the 11th"}]
    assert retrieval.extract_evidence({"organic": eleven}) == [PLACEHOLDER]


@pytest.mark.parametrize("dropped", [PLACEHOLDER, "Missing: tallest", "Duration: 3:12", "Posted: Jan 3, 2020"])
def test_each_cleaning_rule(dropped):
    kept = ["Kilimanjaro is 5,895 m high.", "Note Missing: inside is kept"]
    assert retrieval.clean_evidence([kept[0], dropped, kept[1]]) == kept
    assert retrieval.clean_evidence([dropped]) == []


def test_needs_retrieval_and_output_paths():
    assert retrieval.needs_retrieval(record(1, "Who?", "open_qa"))
    assert not retrieval.needs_retrieval(record(1, "Who?", "open_qa", turns=2))
    assert not retrieval.needs_retrieval(record(1, "A poem", "poem_generation"))
    assert not retrieval.needs_retrieval(record(1, "Who?"))
    assert retrieval.output_paths("out/ret.json") == {
        "raw": "out/ret.json", "clean": "out/ret_clean_evidence.json",
        "progress": "out/ret_progress.jsonl", "failures": "out/ret_failures.json"}


# -- the Serper transport, through the engine ----------------------------------------------


def search(url, query="q", key=DEFAULT_SERPER_KEY, *, timeout=30.0, max_retries=5, gl="us", hl="en", stopper=None):
    """One search through the engine: ``(reply or None, RequestFailed or None, usage)``."""
    replies, errors = [], []
    request = Request(search_body(query, gl, hl), on_reply=lambda reply: replies.append(reply) or True,
                      on_error=errors.append)
    options = Options(concurrency=1, max_retries=max_retries, search_price=0.001)
    usage = asyncio.run(run_requests([request], SerperTransport(url, key, timeout), options, "test",
                                     stopper or Stopper()))
    return (replies or [None])[0], (errors or [None])[0], usage


def test_search_sends_query_key_and_locale(fake_serper):
    reply, error, usage = search(fake_serper.search_url, "Who wrote Dune?", gl="de", hl="fr")
    assert reply["organic"][0]["snippet"] == "Result 1 about Who wrote Dune?." and error is None
    (request,) = fake_serper.requests
    assert request.body == {"q": "Who wrote Dune?", "gl": "de", "hl": "fr"}
    assert request.headers["x-api-key"] == DEFAULT_SERPER_KEY
    assert usage.spend.searches == 1 and usage.spend.cost == pytest.approx(0.001)


def test_search_honours_retry_after_and_retries_5xx_malformed_and_timeouts(fake_serper, waits):
    fake_serper.add_fault(429, retry_after=7)
    fake_serper.add_fault(503)
    fake_serper.add_fault(kind="malformed")
    fake_serper.add_fault(delay=1.5)  # answers after the client's timeout
    reply, error, usage = search(fake_serper.search_url, timeout=0.5)
    assert reply["organic"] and error is None
    assert waits[0] == 7.0  # the server's Retry-After, not the backoff
    assert len(waits) == 4 and all(0.5 * 2 ** i <= wait <= 2 ** i for i, wait in enumerate(waits) if i)
    assert (usage.stats["requests"], usage.stats["retries"]) == (5, 4)


def test_a_429_without_retry_after_backs_off_exponentially(fake_serper, waits):
    fake_serper.add_fault(429, times=4)  # no Retry-After and no rate-limit headers
    reply, _, _ = search(fake_serper.search_url)
    assert reply is not None and len(waits) == 4
    assert all(0.5 * 2 ** i <= wait <= 2 ** i for i, wait in enumerate(waits))  # growing, with jitter


def test_search_gives_up_after_max_retries(fake_serper, waits):
    fake_serper.add_fault(500, times=None)
    reply, error, _ = search(fake_serper.search_url, max_retries=2)
    assert reply is None and str(error) == "failed after 3 attempts: HTTP 500" and not error.refused
    assert fake_serper.request_count == 3


def test_search_does_not_retry_a_rejected_query(fake_serper):
    fake_serper.add_fault(400)
    with pytest.raises(FatalError, match="every request was refused .HTTP 400: Bad request"):
        search(fake_serper.search_url)  # the only request, refused: the settings are wrong
    assert fake_serper.request_count == 1


def test_search_connection_errors_are_retried_then_reported(waits):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, error, _ = search(f"http://127.0.0.1:{port}/search", max_retries=1)
    assert str(error) == "failed after 2 attempts: connection error (ConnectError)"
    assert len(waits) == 1


def test_search_refused_key_is_fatal_and_never_quoted(fake_serper):
    secret = "sk-secret-key-12345"
    with pytest.raises(FatalError) as caught:
        search(fake_serper.search_url, key=secret)
    assert "HTTP 403" in str(caught.value) and "SERPER_API_KEY" in str(caught.value)
    assert secret not in str(caught.value)
    with pytest.raises(FatalError, match="--search_url"):
        search(fake_serper.url + "/wrong")


def test_search_stops_waiting_when_the_run_stops(fake_serper):
    fake_serper.add_fault(429, retry_after=60)
    stopper = Stopper()
    threading.Timer(0.2, stopper.stop, args=("signal",)).start()
    started = time.monotonic()
    reply, error, usage = search(fake_serper.search_url, stopper=stopper)
    assert reply is None and error is None and usage.stopped == "signal"
    assert time.monotonic() - started < 5 and fake_serper.request_count == 1


# -- the script --------------------------------------------------------------------------


def mixed_records():
    return [
        record(7, "Who wrote Dune?", "open_qa"),
        record("ex-1", "How do I bake bread?", "how_to_generation"),
        record(12, "Write a poem about rain.", "poem_generation"),
        record(40, "Who painted the Mona Lisa?", "open_qa", turns=2),
        record(41, "Is the sky green?", "fact_verification"),
        record(1000, "Why does ice float?", "explain_answer"),
        record(3, "What is a good hiking boot?"),  # no category yet
        record("7", "What should I read next?", "recommendations"),  # a string twin of id 7
    ]


def test_end_to_end_writes_raw_and_clean_in_input_order(fake_serper, tmp_path, capsys):
    records = mixed_records()
    fake_serper.responses = {
        "Who wrote Dune?": FULL_REPLY,
        "How do I bake bread?": {"organic": [{"title": "t", "link": "l", "snippet": "Missing: bread"},
                                             {"title": "t", "link": "l", "snippet": "Knead the dough."}]},
        "Is the sky green?": {"organic": []},
        "Why does ice float?": {"organic": [{"title": "t", "link": "l", "snippet": "Duration: 2:01"}]},
    }
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out" / "retrieved.json")
    assert run(input_path, output, fake_serper, "--batch_size", "3") == 0

    assert sorted(queries_sent(fake_serper)) == sorted(
        ["Who wrote Dune?", "How do I bake bread?", "Is the sky green?", "Why does ice float?",
         "What should I read next?"])
    assert all(r.body["gl"] == "us" and r.body["hl"] == "en" for r in fake_serper.requests)

    raw = read_json(output)
    clean = read_json(str(tmp_path / "out" / "retrieved_clean_evidence.json"))
    assert [r["id"] for r in raw] == [r["id"] for r in clean] == [r["id"] for r in records]
    raw_by_id = {(type(r["id"]), r["id"]): r for r in raw}
    clean_by_id = {(type(r["id"]), r["id"]): r for r in clean}

    assert raw_by_id[(int, 7)]["items"][0]["evidence"] == retrieval.extract_evidence(FULL_REPLY)
    assert clean_by_id[(int, 7)]["items"][0]["evidence"] == retrieval.extract_evidence(FULL_REPLY)
    assert raw_by_id[(str, "ex-1")]["items"][0]["evidence"] == ["Missing: bread", "Knead the dough."]
    assert clean_by_id[(str, "ex-1")]["items"][0]["evidence"] == ["Knead the dough."]
    assert raw_by_id[(int, 41)]["items"][0]["evidence"] == [PLACEHOLDER]
    assert "evidence" not in clean_by_id[(int, 41)]["items"][0]
    assert raw_by_id[(int, 1000)]["items"][0]["evidence"] == ["Duration: 2:01"]
    assert "evidence" not in clean_by_id[(int, 1000)]["items"][0]
    assert clean_by_id[(str, "7")]["items"][0]["evidence"] == ["Result 1 about What should I read next?.",
                                                               "Result 2 about What should I read next?.",
                                                               "Result 3 about What should I read next?."]
    # Non-RAG, multi-turn and uncategorised records are copied untouched.
    for key, original in [((int, 12), records[2]), ((int, 40), records[3]), ((int, 3), records[6])]:
        assert raw_by_id[key] == clean_by_id[key] == original
    # Searched records change only by their evidence.
    for a, b in zip(records, clean):
        assert {k: v for k, v in b["items"][0].items() if k != "evidence"} == a["items"][0]
        assert b["items"][1:] == a["items"][1:]

    assert len(read_lines(str(tmp_path / "out" / "retrieved_progress.jsonl"))) == 5
    assert not os.path.exists(tmp_path / "out" / "retrieved_failures.json")
    err = capsys.readouterr().err
    assert "searched: 5" in err and "cleaned away: 2" in err and "skipped as non-RAG: 2" in err
    assert "skipped as multi-turn: 1" in err


def test_rate_limit_then_success(fake_serper, tmp_path):
    fake_serper.add_fault(429, retry_after=0)
    input_path = write_input(tmp_path, [record(1, "Who wrote Dune?", "open_qa")])
    output = str(tmp_path / "out.json")
    assert run(input_path, output, fake_serper) == 0
    assert queries_sent(fake_serper) == ["Who wrote Dune?", "Who wrote Dune?"]
    assert read_json(output)[0]["items"][0]["evidence"][0] == "Result 1 about Who wrote Dune?."


def test_a_failing_query_is_reported_exits_1_and_is_retried_next_run(fake_serper, tmp_path, capsys):
    records = [record(5, "Good query?", "open_qa"), record("bad-1", "Bad query?", "open_qa"),
               record(9, "Another good one?", "recommendations")]
    outage = {"on": True}
    fake_serper.add_fault(503, retry_after=0, times=None, match=lambda body: outage["on"] and body["q"] == "Bad query?")
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out.json")
    failures_path = tmp_path / "out_failures.json"

    assert run(input_path, output, fake_serper, "--max_retries", "2") == 1
    assert queries_sent(fake_serper).count("Bad query?") == 3
    assert read_json(str(failures_path)) == ["bad-1"]
    assert "'bad-1'" in capsys.readouterr().err
    for path in (output, str(tmp_path / "out_clean_evidence.json")):
        written = read_json(path)
        assert [r["id"] for r in written] == [5, "bad-1", 9]
        assert "evidence" not in written[1]["items"][0]
        assert written[0]["items"][0]["evidence"] and written[2]["items"][0]["evidence"]
    assert {line["id"] for line in read_lines(str(tmp_path / "out_progress.jsonl"))} == {5, 9}

    outage["on"] = False
    fake_serper.requests.clear()
    assert run(input_path, output, fake_serper) == 0
    assert queries_sent(fake_serper) == ["Bad query?"]
    assert read_json(output)[1]["items"][0]["evidence"] == ["Result 1 about Bad query?.",
                                                            "Result 2 about Bad query?.",
                                                            "Result 3 about Bad query?."]
    assert not failures_path.exists()  # the stale list is removed


def test_a_query_refused_for_good_is_recorded_and_not_sent_again(fake_serper, tmp_path, capsys):
    records = [record(1, "Fine?", "open_qa"), record(2, "Refused?", "open_qa")]
    fake_serper.add_fault(400, times=None, match=lambda body: body["q"] == "Refused?")
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out.json")
    assert run(input_path, output, fake_serper) == 0  # recorded, with a warning: not a failure
    err = capsys.readouterr().err
    assert "1 queries were refused by the search server for good (e.g. id 2: HTTP 400: Bad request.)" in err
    assert sorted(queries_sent(fake_serper)) == ["Fine?", "Refused?"]  # a 400 is not retried (order varies)
    assert "evidence" not in read_json(output)[1]["items"][0]
    assert {line["id"]: line for line in read_lines(str(tmp_path / "out_progress.jsonl"))}[2] == {
        "id": 2, "fingerprint": retrieval.search_fingerprint("Refused?", "us", "en"), "refused": True,
        "error": "HTTP 400: Bad request."}
    assert not os.path.exists(tmp_path / "out_failures.json")

    fake_serper.requests.clear()
    assert run(input_path, output, fake_serper) == 0
    assert queries_sent(fake_serper) == []  # the rerun does not pay for it again
    fake_serper._faults.clear()
    assert run(input_path, output, fake_serper, "--retry_failed") == 0
    assert queries_sent(fake_serper) == ["Refused?"]
    assert read_json(output)[1]["items"][0]["evidence"][0] == "Result 1 about Refused?."


def test_a_server_that_refuses_every_query_stops_the_run_and_records_nothing(fake_serper, tmp_path, capsys):
    records = [record(i, f"Query {i}?", "open_qa") for i in range(12)]
    fake_serper.add_fault(400, times=None)  # e.g. a --gl the server does not know
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out.json")
    assert run(input_path, output, fake_serper, "--batch_size", "1") == 1
    err = capsys.readouterr().err
    assert "error: the first 8 requests were all refused (HTTP 400: Bad request.); check --gl, --hl" in err
    # one worker with one query queued behind it: the queued one may start before the 8th refusal is settled
    assert 8 <= len(queries_sent(fake_serper)) <= 9 and not os.path.exists(output)
    progress = tmp_path / "out_progress.jsonl"
    assert not progress.exists() or read_lines(str(progress)) == []  # not recorded as refused for good


def test_the_cache_answers_a_rerun_into_a_fresh_folder(fake_serper, tmp_path):
    records = [record(i, f"Query {i}?", "open_qa") for i in range(6)]
    input_path = write_input(tmp_path, records)
    assert run(input_path, str(tmp_path / "a" / "out.json"), fake_serper) == 0
    fake_serper.requests.clear()
    assert run(input_path, str(tmp_path / "b" / "out.json"), fake_serper) == 0
    assert queries_sent(fake_serper) == []
    assert read_json(str(tmp_path / "b" / "out.json")) == read_json(str(tmp_path / "a" / "out.json"))
    fake_serper.requests.clear()
    assert run(input_path, str(tmp_path / "c" / "out.json"), fake_serper, "--refresh_cache") == 0
    assert len(queries_sent(fake_serper)) == 6


def test_dry_run_counts_the_searches_and_max_cost_stops_before_the_cap(fake_serper, tmp_path, capsys):
    records = [record(i, f"Query {i}?", "open_qa") for i in range(10)] + [record(99, "Query 0?", "open_qa")]
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out.json")
    assert run(input_path, output, fake_serper, "--dry_run") == 0
    report = capsys.readouterr().out
    assert "searches to send: 10 (Serper credits)" in report  # two records share one query
    assert "expected cost: $0.0100" in report
    assert fake_serper.requests == [] and os.listdir(tmp_path) == ["classified.json"]

    assert run(input_path, output, fake_serper, "--max_cost", "0.0045", "--batch_size", "1") == 1
    err = capsys.readouterr().err
    assert "budget reached: $0.0040 of $0.0045" in err
    assert len(queries_sent(fake_serper)) == 4 and not os.path.exists(output)
    fake_serper.requests.clear()
    assert run(input_path, output, fake_serper) == 0
    assert len(queries_sent(fake_serper)) == 6


@pytest.mark.slow
def test_sigterm_saves_the_finished_searches_and_a_rerun_sends_only_the_rest(tmp_path):
    records = [record(i, f"Query {i}?", "open_qa") for i in range(60)]
    input_path = write_input(tmp_path, records)
    output = tmp_path / "out.json"
    progress = tmp_path / "out_progress.jsonl"
    with FakeSerperServer(latency=0.2) as server:
        command = [sys.executable, os.path.join(ROOT, "retrieval.py"), "--input_data_path", input_path,
                   "--output_path", str(output), "--search_url", server.search_url, "--batch_size", "4",
                   "--no-cache"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while (not progress.exists() or len(progress.read_text().splitlines()) < 8) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        saved = read_lines(str(progress))
        sent_first = len(server.requests)
        assert 8 <= len(saved) < 60 and sent_first == len(saved)  # the searches in flight were saved too
        assert not output.exists()

        server.requests.clear()
        assert run(input_path, str(output), server, "--no-cache") == 0
        assert len(server.requests) == 60 - len(saved)
        assert [r["id"] for r in read_json(str(output))] == list(range(60))


def test_resume_after_a_crash_searches_nothing_twice(fake_serper, tmp_path, capsys):
    fake_serper.latency = 0.05
    records = [record(100 + 10 * i, f"Question {i}?", "open_qa") for i in range(8)]
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out.json")
    progress = tmp_path / "out_progress.jsonl"
    # The key is revoked while the 4th query is on its way: the run stops at once.
    fake_serper.add_fault(403, match=lambda body: body["q"] == "Question 3?")
    assert run(input_path, output, fake_serper, "--batch_size", "2") == 1
    err = capsys.readouterr().err
    assert "HTTP 403" in err and DEFAULT_SERPER_KEY not in err
    assert not os.path.exists(output)
    first_run = queries_sent(fake_serper)
    saved = [line["id"] for line in read_lines(str(progress))]
    # Every query answered before the stop is saved, the refused one is not.
    assert sorted(saved) == sorted(100 + 10 * int(q.split()[1][:-1]) for q in first_run if q != "Question 3?")
    assert 130 not in saved and len(first_run) < 8

    with open(progress, "a", encoding="utf-8") as f:
        f.write('{"id": 170, "evid')  # a line torn by a kill
    fake_serper.requests.clear()
    assert run(input_path, output, fake_serper, "--batch_size", "2") == 0
    second_run = queries_sent(fake_serper)
    assert "Question 3?" in second_run and "Question 7?" in second_run
    assert not set(first_run) - {"Question 3?"} & set(second_run)
    counts = collections.Counter(first_run + second_run)
    assert counts == {f"Question {i}?": 2 if i == 3 else 1 for i in range(8)}
    assert all(r["items"][0]["evidence"] for r in read_json(output))
    assert sorted(line["id"] for line in read_lines(str(progress))) == [r["id"] for r in records]


def test_records_sharing_a_query_share_one_search(fake_serper, tmp_path):
    records = [record(1, "Who wrote Dune?", "open_qa"), record(2, "Who wrote Dune?", "explain_answer"),
               record(3, "Who wrote Emma?", "open_qa")]
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out.json")
    assert run(input_path, output, fake_serper) == 0
    assert sorted(queries_sent(fake_serper)) == ["Who wrote Dune?", "Who wrote Emma?"]
    written = read_json(output)
    assert written[0]["items"][0]["evidence"] == written[1]["items"][0]["evidence"]
    assert written[0]["items"][0]["evidence"][0] == "Result 1 about Who wrote Dune?."
    assert sorted(line["id"] for line in read_lines(str(tmp_path / "out_progress.jsonl"))) == [1, 2, 3]


def test_finished_progress_is_used_as_saved(fake_serper, tmp_path):
    records = [record(1, "One?", "open_qa"), record("two", "Two?", "open_qa")]
    input_path = write_input(tmp_path, records)
    output = str(tmp_path / "out.json")
    key = retrieval.search_fingerprint("Two?", "us", "en")
    (tmp_path / "out_progress.jsonl").write_text(
        json.dumps({"id": "two", "fingerprint": key, "evidence": ["Saved earlier.", "Posted: yesterday"]}) + "\n"
        + json.dumps({"id": 2, "fingerprint": key, "evidence": ["Another input's record."]}) + "\n"
        + json.dumps({"id": 1, "fingerprint": retrieval.search_fingerprint("An older text of One?", "us", "en"),
                      "evidence": ["Evidence for a question since edited."]}) + "\n", encoding="utf-8")
    assert run(input_path, output, fake_serper) == 0
    assert queries_sent(fake_serper) == ["One?"]  # the edited question is searched again
    assert read_json(output)[0]["items"][0]["evidence"] == ["Result 1 about One?.", "Result 2 about One?.",
                                                           "Result 3 about One?."]
    assert read_json(output)[1]["items"][0]["evidence"] == ["Saved earlier.", "Posted: yesterday"]
    assert read_json(str(tmp_path / "out_clean_evidence.json"))[1]["items"][0]["evidence"] == ["Saved earlier."]


def test_nothing_to_search_needs_no_key(fake_serper, tmp_path, monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY")
    records = [record(1, "A poem", "poem_generation")]
    input_path = write_input(tmp_path, records)
    assert run(input_path, str(tmp_path / "out.json"), fake_serper) == 0
    assert read_json(str(tmp_path / "out_clean_evidence.json")) == records
    assert fake_serper.request_count == 0


def test_missing_key_stops_before_writing(fake_serper, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SERPER_API_KEY")
    input_path = write_input(tmp_path, [record(1, "Who?", "open_qa")])
    assert run(input_path, str(tmp_path / "out.json"), fake_serper) == 2
    assert "SERPER_API_KEY is not set" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["classified.json"]


def test_a_refused_key_is_never_logged_or_written(tmp_path, monkeypatch, capsys, caplog):
    secret = "sk-wrong-key-98765"
    monkeypatch.setenv("SERPER_API_KEY", secret)
    input_path = write_input(tmp_path, [record(1, "Who?", "open_qa"), record(2, "What?", "open_qa")])
    with FakeSerperServer() as server:
        assert run(input_path, str(tmp_path / "out.json"), server, "--verbose") == 1
    captured = capsys.readouterr()
    assert "refused the API key (HTTP 403)" in captured.err
    assert secret not in captured.err + captured.out + caplog.text
    for name in os.listdir(tmp_path):
        assert secret not in (tmp_path / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ('[{"id": 1, "items": [{"from": "human", "value": "Who?", "category": "open_qa"}]}, {"id": 2}]',
     "record 1 (id 2): field 'items' is missing"),
    ('[{"id": "a", "items": [{"from": "human", "value": "Who?", "category": 5}]}]',
     "record 0 (id 'a'): field 'items[0].category' must be a string"),
    ("[{oops", "invalid JSON"),
])
def test_bad_input_stops_with_one_line_and_clobbers_nothing(fake_serper, tmp_path, capsys, content, message):
    input_path = tmp_path / "classified.json"
    if content is not None:
        input_path.write_text(content, encoding="utf-8")
    output = tmp_path / "out.json"
    output.write_text("earlier output", encoding="utf-8")
    assert run(str(input_path), str(output), fake_serper) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(input_path) in err and len(err.splitlines()) == 1
    assert output.read_text(encoding="utf-8") == "earlier output"
    assert sorted(os.listdir(tmp_path)) == sorted(["out.json"] + (["classified.json"] if content else []))
    assert fake_serper.request_count == 0


def test_output_that_would_overwrite_the_input_is_refused(fake_serper, tmp_path, capsys):
    input_path = write_input(tmp_path, [record(1, "Who?", "open_qa")], name="data_clean_evidence.json")
    before = (tmp_path / "data_clean_evidence.json").read_text(encoding="utf-8")
    assert run(input_path, str(tmp_path / "data.json"), fake_serper) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "data_clean_evidence.json").read_text(encoding="utf-8") == before
    assert fake_serper.request_count == 0


@pytest.mark.slow
def test_a_second_signal_cancels_the_searches_in_flight_and_a_rerun_repeats_at_most_those(tmp_path):
    records = [record(i, f"Query {i}?", "open_qa") for i in range(20)]
    input_path = write_input(tmp_path, records)
    output, progress = tmp_path / "out.json", tmp_path / "out_progress.jsonl"
    with FakeSerperServer() as server:
        slow = server.add_fault(delay=8, times=None, match=lambda body: int(body["q"].split()[1][:-1]) >= 4)
        command = [sys.executable, os.path.join(ROOT, "retrieval.py"), "--input_data_path", input_path,
                   "--output_path", str(output), "--search_url", server.search_url, "--batch_size", "4",
                   "--no-cache"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "SERPER_API_KEY": DEFAULT_SERPER_KEY})
        deadline = time.monotonic() + 30
        while len(server.requests) < 8 and time.monotonic() < deadline:  # 4 answered, 4 slow ones in flight
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        time.sleep(1.5)
        stopped = time.monotonic()
        process.send_signal(signal.SIGINT)  # again: the slow ones are cancelled, not waited for
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        assert time.monotonic() - stopped < 5
        saved = [line["id"] for line in read_lines(str(progress))]
        sent_first = len(server.requests)
        assert sorted(saved) == [0, 1, 2, 3] and sent_first == 8

        slow.times = 0
        server.requests.clear()
        assert run(input_path, str(output), server, "--no-cache") == 0
        assert len(server.requests) == 20 - len(saved)  # the 4 cancelled in flight, and the 12 never sent


def test_the_search_endpoint_comes_from_serper_base_url(fake_serper, tmp_path, monkeypatch):
    monkeypatch.setenv("SERPER_BASE_URL", fake_serper.search_url)
    input_path = write_input(tmp_path, [record(1, "Who wrote Dune?", "open_qa")])
    assert retrieval.main(["--input_data_path", input_path, "--output_path", str(tmp_path / "out.json")]) == 0
    assert queries_sent(fake_serper) == ["Who wrote Dune?"]
