"""evaluate.py and realign/metrics.py: the edit-rate rule, the tables, verdicts, both orders,
sampling, the judges' orchestration (an async stub for the client), outputs, bad input."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate
from realign.client import Sampling
from realign.engine import Options, Response, run_requests
from realign.metrics import MeasureStats, Sampler, edit_rate, is_rewritten, quantile
from realign.pool import Stopper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEN = "a b c d e f g h i j"


# -- the edit-rate rule -------------------------------------------------------------------

@pytest.mark.parametrize("before, after, rate", [
    (TEN, TEN, 0.0),  # identical
    (TEN, "a b c d e f g h i X", 0.1),  # one word of ten substituted
    (TEN, "a b c d e g h i j", 0.1),  # one word of ten deleted (longer: 10)
    (TEN, TEN + " k l m n o", 5 / 15),  # five words inserted after ten
    ("one two three four five", "two three four five one", 0.4),  # rotated: one deletion, one insertion
    ("a b c d", "b a c d", 0.5),  # two words swapped: two substitutions
    ("a b c d e", "e d c b a", 0.8),  # reversed: the middle word stays
    ("", "", 0.0),  # both empty
    ("", "x y z", 1.0),  # one empty
    ("x y", "", 1.0),
    ("a b", "a\n\n  b ", 0.0),  # only whitespace changed: the same words
    ("   ", "", 0.0),  # no words on either side
])
def test_edit_rate_on_hand_made_pairs(before, after, rate):
    assert edit_rate(before, after) == pytest.approx(rate)


def test_rewritten_means_above_the_threshold():
    assert not is_rewritten(edit_rate("a b c d e", "a b c d X"))  # exactly 0.2 is not above it
    assert is_rewritten(edit_rate("a b c d", "a b c X"))  # 0.25
    assert not is_rewritten(0.25, threshold=0.3)


def test_quantile_interpolates_between_neighbours():
    assert quantile([0.0, 1.0, 1.0, 2.0], 0.25) == pytest.approx(0.75)
    assert quantile([0.0, 1.0, 1.0, 2.0], 0.95) == pytest.approx(1.85)
    assert quantile([3], 0.5) == 3
    assert quantile([], 0.5) is None


# -- the tables ---------------------------------------------------------------------------

def rec(record_id, before, category=None, question="q?"):
    first = {"from": "human", "value": question}
    if category is not None:
        first["category"] = category
    return {"id": record_id, "items": [first, {"from": "gpt", "value": before}]}


def final(record, after, tag, reason=None):
    out = json.loads(json.dumps(record))
    out["items"][1]["value"] = after
    out["tag"] = tag
    if reason:
        out["reject_reason"] = reason
    return out


# Five records whose figures are worked out by hand in test_main_end_to_end.
ORIGINALS = [
    rec(10, TEN, "open_qa", "What is ten?"),
    rec(11, "one two three four five", "open_qa", "Count to five?"),
    rec("s1", "plan the trip now", "planning", "Plan a trip?"),
    rec(13, "x y", "roleplay", "Play a part?"),
    rec(14, "", None, "Say nothing?"),
]
FINALS = [
    final(ORIGINALS[0], "a b c d e f g h i X", "rewrite"),  # 0.1: changed, not rewritten
    final(ORIGINALS[1], "one two three four five six seven eight nine ten", "rewrite"),  # 0.5
    final(ORIGINALS[2], "plan the trip now", "original", "unchanged"),  # 0
    final(ORIGINALS[3], "", "rewrite"),  # 1.0, ratio 0
    final(ORIGINALS[4], "", "original", "length"),  # 0, ratio undefined
]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return str(path)


def inputs(tmp_path, originals=ORIGINALS, finals=FINALS):
    # The final file in another order (and JSONL): pairing is by id.
    return (write_json(tmp_path / "original.json", originals),
            write_jsonl(tmp_path / "final.jsonl", [finals[i] for i in (3, 0, 4, 2, 1)] + finals[5:]))


def test_task_tables_add_up_to_the_totals_and_groups_follow_task_groups(tmp_path):
    original_path, final_path = inputs(tmp_path)
    summary, _ = evaluate.measure_files(original_path, final_path)
    tasks, groups, overall = summary["tasks"], summary["groups"], summary["overall"]
    assert list(tasks) == ["open_qa", "(none)", "planning", "roleplay"]  # by size, then name
    assert {t: s["group"] for t, s in tasks.items()} == {
        "open_qa": "Conversation", "planning": "Brainstorming", "roleplay": "Conversation", "(none)": "(no group)"}
    assert list(groups) == ["Brainstorming", "Conversation", "(no group)"]  # TASK_GROUPS order, then the rest
    assert [groups[g]["records"] for g in groups] == [1, 3, 1]
    assert [groups[g]["rewritten"] for g in groups] == [0, 2, 0]
    assert groups["Conversation"]["length_before"]["mean"] == pytest.approx((10 + 5 + 2) / 3)
    for table in (tasks, groups):
        for key in ("records", "rewritten", "changed"):
            assert sum(s[key] for s in table.values()) == overall[key]
        for field in ("tags", "reject_reasons"):
            total = {}
            for s in table.values():
                for name, n in s[field].items():
                    total[name] = total.get(name, 0) + n
            assert total == overall[field]
    assert overall["tags"] == {"rewrite": 3, "original": 2}
    assert overall["reject_reasons"] == {"unchanged": 1, "length": 1}


def test_a_rewrite_stamped_by_reformat_is_not_checked_again(tmp_path):
    # The merged file's "reformat.checks_passed" (reformat.py's stamp of the texts it
    # checked) stands for the checks; a stamp of other texts does not.
    from realign.quality import passed_stamp, record_texts

    original_path, final_path = inputs(tmp_path)

    def fails(merged_records):
        merged_path = write_json(tmp_path / "merged.json", merged_records)
        summary, _ = evaluate.measure_files(original_path, final_path, merged_path=merged_path)
        return evaluate.headline(summary).split("checks: ")[1]

    stamped = [{**r, "reformat": {"checks_passed": passed_stamp(r["items"][1]["value"], *record_texts(o))}}
               for r, o in zip(FINALS, ORIGINALS)]
    assert fails(FINALS) == "0 rewrites rejected by a check, 1 kept rewrites fail one"
    assert fails(stamped) == "0 rewrites rejected by a check, 0 kept rewrites fail one"
    other = [{**r, "reformat": {"checks_passed": passed_stamp("other", *record_texts(o))}}
             for r, o in zip(FINALS, ORIGINALS)]
    assert fails(other) == "0 rewrites rejected by a check, 1 kept rewrites fail one"


def test_a_merged_file_without_tags_counts_them_as_none(tmp_path):
    merged = [{k: v for k, v in r.items() if k not in ("tag", "reject_reason")} for r in FINALS]
    original_path, final_path = inputs(tmp_path, finals=merged)
    summary, _ = evaluate.measure_files(original_path, final_path)
    assert summary["overall"]["tags"] == {"(none)": 5}
    assert summary["overall"]["reject_reasons"] == {}
    assert summary["overall"]["rewritten"] == 2


def test_merging_stats_keeps_every_record():
    a, b = MeasureStats(), MeasureStats()
    a.add(0.5, True, True, 4, 8, "rewrite")
    b.add(0.0, False, False, 2, 2, "original", "unchanged")
    b.add(0.1, False, True, 0, 3)
    total = MeasureStats.merged([a, b]).summary()
    assert total["records"] == 3 and total["rewritten"] == 1 and total["changed"] == 2
    assert total["length_before"] == {"mean": 2.0, "median": 2}
    assert total["length_after"] == {"mean": pytest.approx(13 / 3), "median": 3}
    assert total["ratio_distribution"]["records"] == 2 and total["ratio_distribution"]["undefined"] == 1
    assert total["tags"] == {"rewrite": 1, "original": 1, "(none)": 1}


def test_lengths_in_tokens_keep_edit_rates_in_words(tmp_path):
    class Counter:  # a stand-in tokenizer: every word is two tokens
        unit = "tokens"

        def __call__(self, texts):
            return [2 * len(t.split()) for t in texts]

    original_path, final_path = inputs(tmp_path)
    summary, _ = evaluate.measure_files(original_path, final_path, count_lengths=Counter())
    assert summary["inputs"]["length_unit"] == "tokens"
    assert summary["overall"]["length_before"]["mean"] == pytest.approx(8.4)
    assert summary["overall"]["rewritten"] == 2
    assert evaluate.headline(summary).startswith(
        "substantially rewritten 40.0% (edit rate > 0.2) of 5; mean length 8.4 -> 9.6 tokens")


# -- verdicts -----------------------------------------------------------------------------

@pytest.mark.parametrize("reply, score", [
    ("Good answer. [[7]]", 7),
    ("Rating: [[ 10 ]]", 10),
    ("The format is [[n]], e.g. [[5]]. My rating: [[8]]", 8),  # the last verdict counts
    ("first [[3]] then, on reflection, [[1]]", 1),
    ("[[7]] ... no, [[11]]", None),  # the last one is out of range: rejected
    ("[[0]]", None),
    ("[[-3]]", None),
    ("[[7.5]]", None),  # not a whole number: not a verdict
    ("Rating: 7", None),
    ("[7]", None),
    ("", None),
    (None, None),
])
def test_parse_score(reply, score):
    assert evaluate.parse_score(reply) == score


@pytest.mark.parametrize("reply, choice", [
    ("A reads better. [[A]]", "A"),
    ("Verdict: [[ b ]]", "B"),
    ("Not [[A]], not [[B]]: [[C]]", "C"),
    ("[[A]] ... [[D]]", None),  # the last letter is not a verdict
    ("[[AB]]", None),
    ("A", None),
    ("", None),
])
def test_parse_choice(reply, choice):
    assert evaluate.parse_choice(reply) == choice


@pytest.mark.parametrize("original_first, rewrite_first, expected", [
    ("B", "A", ("win", True)),  # the rewrite wins in both orders
    ("A", "B", ("loss", True)),
    ("C", "C", ("tie", True)),
    ("A", "A", ("tie", False)),  # the first answer always wins: a flip, a tie
    ("B", "B", ("tie", False)),
    ("B", "C", ("tie", False)),  # a win in one order only
    ("C", "B", ("tie", False)),
])
def test_both_orders_rule(original_first, rewrite_first, expected):
    assert evaluate.combine_orders(original_first, rewrite_first) == expected


def test_messages_fill_the_judge_templates():
    factuality = evaluate.build_factuality_messages("Who wrote it?", "Ann {x}", "Bob")
    assert [m["role"] for m in factuality] == ["system", "user"]
    assert "[Question start]\nWho wrote it?\n[Question end]" in factuality[1]["content"]
    assert "[Reference answer start]\nAnn {x}\n[Reference answer end]" in factuality[1]["content"]
    assert "[Assistant's answer start]\nBob\n[Assistant's answer end]" in factuality[1]["content"]
    readability = evaluate.build_readability_messages("Q", "first", "second")
    assert "[Answer A start]\nfirst\n[Answer A end]" in readability[1]["content"]
    assert "[Answer B start]\nsecond\n[Answer B end]" in readability[1]["content"]
    reask = evaluate.build_reask_messages(readability, "no idea", "readability")
    assert reask[:2] == readability
    assert reask[2] == {"role": "assistant", "content": "no idea"}
    assert reask[3]["role"] == "user" and "[[A]]" in reask[3]["content"]


# -- the sample ---------------------------------------------------------------------------

def sample_records(records, k, seed):
    sampler = Sampler(k, seed)
    for record in records:
        sampler.offer(record["id"], lambda record=record: record)
    return sampler.items()


def test_the_sample_is_seeded_and_reproducible():
    records = [{"id": i} for i in range(1000)] + [{"id": f"s{i}"} for i in range(50)]
    ids = [r["id"] for r in sample_records(records, 20, seed=1)]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert [r["id"] for r in sample_records(records, 20, seed=1)] == ids
    assert [r["id"] for r in sample_records(records[::-1], 20, seed=1)] == ids  # order does not matter
    assert {r["id"] for r in sample_records(records, 20, seed=2)} != set(ids)
    assert [r["id"] for r in sample_records(records, 10, seed=1)] == ids[:10]  # samples nest
    assert len(sample_records(records, 5000, seed=1)) == len(records)
    assert len(sample_records(records, None, seed=1)) == len(records)


# -- the judges' requests, through the engine (a stub transport stands in for the server) ----

class StubJudge:
    """A transport answering by the question, recording every conversation; a reply of None
    stands for a server that never answers (the request fails)."""

    name = "the stub judge"
    server = "stub://judge"
    limits_key = None

    def __init__(self, replies):
        self.replies = replies  # question -> function(messages) -> reply
        self.calls = []

    def key(self, body):
        return json.dumps(body, sort_keys=True)

    def wire(self, body):
        return [body]

    @staticmethod
    def estimate_prompt(body):
        return 10.0

    @staticmethod
    def token_cost(wire, prompt):
        return prompt

    @staticmethod
    def is_reply(body):
        return isinstance(body, dict)

    @staticmethod
    def adaptations():
        return "none"

    async def post(self, wire):
        messages = wire["messages"]
        self.calls.append(messages)
        question = messages[1]["content"].split("[Question start]\n", 1)[1].split("\n[Question end]", 1)[0]
        reply = self.replies[question](messages)
        if reply is None:
            return Response(500, {}, {"error": {"message": "down"}})
        return Response(200, {}, {"choices": [{"message": {"content": reply}, "finish_reason": "stop"}]})

    async def prepare(self, run):
        return None

    async def close(self):
        return None


def shown(messages, label):
    text = messages[1]["content"]
    return text.split(f"[{label} start]\n", 1)[1].split(f"\n[{label} end]", 1)[0]


def prefer_rewrite(messages):
    return "[[A]]" if shown(messages, "Answer A").startswith("rewrite") else "[[B]]"


def item(number, original, rewrite, reference=None):
    return evaluate.JudgeItem(number, number, f"q{number}", original, rewrite, reference)


def run_judges(items, stub, judge, max_retries):
    """The judges' results by line, asked through the engine."""
    sampling = Sampling(model="judge-x", n=1, temperature=0.0)
    judging = evaluate.Judging([judge], sampling, max_retries)
    options = Options(concurrency=4, max_retries=0)
    asyncio.run(run_requests(judging.requests((judge, i) for i in items), stub, options, "test", Stopper()))
    return judging.results[judge]


def test_readability_judges_both_orders_and_counts_a_flip_as_a_tie():
    stub = StubJudge({
        "q1": prefer_rewrite,
        "q2": lambda m: "The first one. [[A]]",  # position bias: flips with the order
        "q3": lambda m: "I like it." if len(m) == 2 else prefer_rewrite(m),  # verdict only when re-asked
        "q4": lambda m: "Both are fine.",  # never a verdict
        "q5": prefer_rewrite,  # identical texts: never asked
        "q6": lambda m: None,  # the client gave up
    })
    items = [item(1, "original 1", "rewrite 1"), item(2, "original 2", "rewrite 2"),
             item(3, "original 3", "rewrite 3"), item(4, "original 4", "rewrite 4"),
             item(5, "same", "same"), item(6, "original 6", "rewrite 6")]
    results = run_judges(items, stub, "readability", max_retries=2)
    assert results[1] == {"original_first": "B", "rewrite_first": "A", "status": "ok", "asks": 2,
                          "outcome": "win", "consistent": True}
    assert results[2]["outcome"] == "tie" and results[2]["consistent"] is False
    assert results[3]["outcome"] == "win" and results[3]["asks"] == 4  # each order re-asked once
    assert results[4]["status"] == "unparsed" and results[4]["asks"] == 6 and "outcome" not in results[4]
    assert results[5] == {"outcome": "tie", "consistent": True, "identical": True, "status": "ok", "asks": 0}
    assert results[6]["status"] == "no_reply" and results[6]["asks"] == 2
    # Both orders were shown: the original once as A, once as B.
    q1 = [m for m in stub.calls if "q1" in m[1]["content"]]
    assert sorted(shown(m, "Answer A") for m in q1) == ["original 1", "rewrite 1"]
    assert not any("same" in m[1]["content"] for m in stub.calls)
    # A re-ask shows the unparsable reply and asks again for the verdict.
    reasks = [m for m in stub.calls if len(m) == 4 and "q3" in m[1]["content"]]
    assert len(reasks) == 2 and reasks[0][2] == {"role": "assistant", "content": "I like it."}
    assert reasks[0][3]["content"] == evaluate.REASK["readability"]

    summary = evaluate.summarize_readability(results, eligible=6, model="judge-x")
    assert {k: summary[k] for k in ("sampled", "counted", "win", "tie", "loss", "identical", "consistent",
                                    "unparsed", "no_reply")} == {
        "sampled": 6, "counted": 4, "win": 2, "tie": 2, "loss": 0, "identical": 1, "consistent": 2,
        "unparsed": 1, "no_reply": 1}
    assert summary["win_share"] == 0.5 and summary["tie_share"] == 0.5 and summary["loss_share"] == 0.0
    assert summary["consistent_share"] == pytest.approx(2 / 3)  # of the 3 pairs asked and answered


def test_factuality_rates_both_answers_and_counts_unparsed_apart():
    replies = {"o1": "[[4]]", "r1": "Correct. [[7]]", "o2": "Score [[8]]",
               "r2": "From [[1]] to [[10]]: [[6]]", "same": "[[9]]", "o4": "[[5]]", "r4": "[[12]]"}
    stub = StubJudge({q: (lambda m: replies[shown(m, "Assistant's answer")]) for q in ("q1", "q2", "q3", "q4")})
    items = [item(1, "o1", "r1", "ref"), item(2, "o2", "r2", "ref"), item(3, "same", "same", "ref"),
             item(4, "o4", "r4", "ref")]
    results = run_judges(items, stub, "factuality", max_retries=1)
    assert results[1] == {"original": 4, "rewrite": 7, "status": "ok", "asks": 2}
    assert results[2]["rewrite"] == 6
    assert results[3] == {"original": 9, "rewrite": 9, "status": "ok", "asks": 1, "identical": True}
    assert results[4] == {"original": 5, "rewrite": None, "status": "unparsed", "asks": 3}
    assert all("[Reference answer start]\nref\n" in m[1]["content"] for m in stub.calls)

    summary = evaluate.summarize_factuality(results, eligible=4, model="judge-x")
    assert summary["scored"] == 3 and summary["unparsed"] == 1 and summary["identical"] == 1
    assert summary["mean_original"] == pytest.approx(7.0)  # (4 + 8 + 9) / 3
    assert summary["mean_rewrite"] == pytest.approx(22 / 3)  # (7 + 6 + 9) / 3
    assert summary["mean_difference"] == pytest.approx(1 / 3)
    assert (summary["rewrite_higher"], summary["equal"], summary["rewrite_lower"]) == (1, 1, 1)
    assert summary["scores_original"]["9"] == 1 and summary["scores_rewrite"]["6"] == 1


# -- end to end ---------------------------------------------------------------------------

def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_png(path):
    from matplotlib.image import imread
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 800 and height > 300
    assert imread(path).shape[:2] == (height, width)


@pytest.mark.slow
def test_main_end_to_end(tmp_path, caplog):
    original_path, final_path = inputs(tmp_path)
    out, report, plot = tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.md", tmp_path / "out" / "eval.png"
    caplog.set_level("INFO")
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path, "--output_path", str(out),
                          "--report_path", str(report), "--plot_path", str(plot)]) == 0
    line = ("substantially rewritten 40.0% (edit rate > 0.2) of 5; mean length 4.2 -> 4.8 words; changed 60.0%; "
            "checks: 0 rewrites rejected by a check, 1 kept rewrites fail one")
    assert caplog.records[-1].getMessage().startswith(line)
    data = read_json(out)
    assert data["headline"] == line
    overall = data["overall"]
    assert (overall["records"], overall["rewritten"], overall["changed"]) == (5, 2, 3)
    assert overall["share_rewritten"] == pytest.approx(0.4) and overall["share_changed"] == pytest.approx(0.6)
    assert overall["mean_edit_rate"] == pytest.approx(0.32)  # (0.1 + 0.5 + 0 + 1 + 0) / 5
    assert overall["length_before"] == {"mean": pytest.approx(4.2), "median": 4}  # 10, 5, 4, 2, 0
    assert overall["length_after"] == {"mean": pytest.approx(4.8), "median": 4}  # 10, 10, 4, 0, 0
    assert overall["length_ratio"] == pytest.approx(4.8 / 4.2)
    # Per-record ratios 1, 2, 1, 0 (and one original of length 0, without a ratio).
    assert overall["ratio_distribution"] == {"records": 4, "undefined": 1, "p5": pytest.approx(0.15),
                                             "p25": pytest.approx(0.75), "median": 1.0,
                                             "p75": pytest.approx(1.25), "p95": pytest.approx(1.85)}
    records = {r["id"]: r for r in data["records"]}
    assert set(records) == {10, 11, "s1", 13, 14}
    assert records[10] == {"id": 10, "task": "open_qa", "edit_rate": 0.1, "rewritten": False, "changed": True,
                           "length_before": 10, "length_after": 10, "tag": "rewrite"}
    assert records[14] == {"id": 14, "task": "(none)", "edit_rate": 0.0, "rewritten": False, "changed": False,
                           "length_before": 0, "length_after": 0, "tag": "original", "reject_reason": "length"}
    assert records[13]["edit_rate"] == 1.0 and records[13]["rewritten"] is True
    assert records[13]["checks"] == ["lost_answer"]  # "x y" became empty
    text = report.read_text(encoding="utf-8")
    assert f"**{line}**" in text
    assert "| open_qa | Conversation | 2 | 50.0% | 100.0% | 7.5 | 10.0 | 1.33 | 1.50 |" in text
    assert "| Conversation | 3 | 66.7% | 100.0% |" in text
    assert "| length | 1 | 20.0% |" in text
    assert "![charts](eval.png)" in text
    check_png(plot)


def judge_reply(body, choice_index):
    """The fake judge: factuality 9 for the longer rewrite of record 11, else 5; readability
    prefers the text "one two three four five six" wherever it is shown."""
    text = body["messages"][1]["content"]
    if "[Reference answer start]" in text:
        return "Reasonable. [[9]]" if "six seven" in text else "[[5]]"
    return "[[B]]" if "Answer B start]\none two three four five six" in text else "[[A]]"


@pytest.mark.slow
def test_main_with_judges_against_the_fake_server(tmp_path, fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-secret-77")
    original_path, final_path = inputs(tmp_path)
    reference_path = write_json(tmp_path / "reference.json", [rec(10, "ten letters"), rec(11, "five"), rec(99, "x")])
    fake_openai.chat_responder = judge_reply
    out, report, plot = tmp_path / "eval.json", tmp_path / "eval.md", tmp_path / "eval.png"
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path,
                          "--judge", "factuality", "--judge", "readability", "--reference_path", reference_path,
                          "--base_url", fake_openai.url, "--output_path", str(out), "--report_path", str(report),
                          "--plot_path", str(plot)]) == 0
    data = read_json(out)
    factuality, readability = data["judges"]["factuality"], data["judges"]["readability"]
    assert (factuality["eligible"], factuality["sampled"], factuality["scored"]) == (2, 2, 2)
    assert factuality["mean_original"] == 5.0 and factuality["mean_rewrite"] == 7.0
    # 11's rewrite wins in both orders (B when shown second, A when shown first); 10 and 13 get
    # [[A]] in both orders: flips, ties; s1 and 14 are identical: ties without asking.
    assert {k: readability[k] for k in ("sampled", "counted", "win", "tie", "loss", "identical", "consistent")} == {
        "sampled": 5, "counted": 5, "win": 1, "tie": 4, "loss": 0, "identical": 2, "consistent": 1}
    records = {r["id"]: r for r in data["records"]}
    assert records[11]["factuality"] == {"original": 5, "rewrite": 9, "status": "ok", "asks": 2}
    assert records[11]["readability"] == {"original_first": "B", "rewrite_first": "A", "status": "ok", "asks": 2,
                                          "outcome": "win", "consistent": True}
    assert records[10]["readability"]["outcome"] == "tie" and records[10]["readability"]["consistent"] is False
    assert "factuality" not in records[13]  # no reference for 13
    assert data["headline"].endswith("; factuality 5.00 -> 7.00 (2 judged); readability win/tie/loss 20%/80%/0%")
    text = report.read_text(encoding="utf-8")
    assert "### Factuality (judge gpt-6-sol" in text and "### Readability (judge gpt-6-sol" in text
    check_png(plot)
    chats = fake_openai.requests_to("/v1/chat/completions")
    assert len(chats) == 2 * 2 + 3 * 2  # factuality: 2 records x 2 answers; readability: 3 pairs x 2 orders
    assert {r.body["model"] for r in chats} == {"gpt-6-sol"} and all(r.body["temperature"] == 0 for r in chats)
    for path in (out, report):
        assert "sk-judge-secret-77" not in path.read_text(encoding="utf-8")

    # The same run again: every verdict comes from the request cache.
    fake_openai.requests.clear()
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path, "--judge", "readability",
                          "--base_url", fake_openai.url, "--output_path", str(out)]) == 0
    assert fake_openai.requests_to("/v1/chat/completions") == []


def test_an_unparsable_verdict_is_asked_again_then_counted_apart(tmp_path, fake_openai):
    original_path, final_path = inputs(tmp_path)
    # Record 11's pair (its rewrite says "six") never gets a verdict, even when asked again.
    fake_openai.chat_responder = lambda body, i: "I cannot decide." if "six" in body["messages"][1]["content"] \
        else "[[C]]"
    out = tmp_path / "eval.json"
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path, "--judge", "readability",
                          "--base_url", fake_openai.url, "--max_judge_retries", "1", "--output_path", str(out)]) == 0
    readability = read_json(out)["judges"]["readability"]
    assert readability["unparsed"] == 1 and readability["counted"] == 4
    record = {r["id"]: r for r in read_json(out)["records"]}[11]["readability"]
    assert record["status"] == "unparsed" and record["asks"] == 4  # both orders, each asked twice


def test_judge_sample_limits_the_records_judged(tmp_path, fake_openai):
    original_path, final_path = inputs(tmp_path)
    fake_openai.chat_responder = lambda body, i: "[[C]]"
    out = tmp_path / "eval.json"
    args = ["--original_path", original_path, "--rewritten_path", final_path, "--judge", "readability",
            "--judge_sample", "2", "--seed", "3", "--output_path", str(out), "--base_url", fake_openai.url]
    assert evaluate.main(args) == 0
    first = read_json(out)
    judged = sorted(str(r["id"]) for r in first["records"] if "readability" in r)
    assert len(judged) == 2 and first["judges"]["readability"]["sampled"] == 2
    assert evaluate.main(args) == 0
    assert sorted(str(r["id"]) for r in read_json(out)["records"] if "readability" in r) == judged


def test_the_judges_dry_run_sends_nothing_and_counts_what_the_run_sends(tmp_path, fake_openai, capsys):
    original_path, final_path = inputs(tmp_path)
    fake_openai.chat_responder = lambda body, i: "[[C]]"
    out = tmp_path / "eval.json"
    args = ["--original_path", original_path, "--rewritten_path", final_path, "--judge", "readability",
            "--output_path", str(out), "--base_url", fake_openai.url]
    assert evaluate.main(args + ["--dry_run"]) == 0
    assert fake_openai.requests == [] and not out.exists()
    assert "requests to send: 6 (answered by the cache: 0)" in capsys.readouterr().out
    assert evaluate.main(args) == 0
    assert len(fake_openai.requests_to("/v1/chat/completions")) == 6


# -- bad input ----------------------------------------------------------------------------

def run_script(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


@pytest.mark.parametrize("case", ["id_only_in_original", "id_only_in_rewritten", "missing_value", "bad_tag"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    originals, finals = json.loads(json.dumps(ORIGINALS)), json.loads(json.dumps(FINALS))
    if case == "id_only_in_original":
        finals[2]["id"] = 12
        expected = "original.json: 1 record(s) whose id is not in"
    elif case == "id_only_in_rewritten":
        finals.append(final(rec(77, "z"), "z", "original"))
        expected = "final.jsonl: 1 record(s) whose id is not in"
    elif case == "missing_value":
        del finals[1]["items"][1]["value"]
        expected = "field 'items[1].value' must be a string"
    else:
        finals[0]["tag"] = 3
        expected = "field 'tag' must be a string"
    original_path, final_path = inputs(tmp_path, originals, finals)
    out, report, plot = tmp_path / "e.json", tmp_path / "e.md", tmp_path / "e.png"
    result = run_script("--original_path", original_path, "--rewritten_path", final_path, "--output_path", str(out),
                        "--report_path", str(report), "--plot_path", str(plot))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not report.exists() and not plot.exists()
    assert sorted(os.listdir(tmp_path)) == ["final.jsonl", "original.json"]  # no temporary file left


def test_allow_unpaired_measures_the_paired_records(tmp_path):
    finals = json.loads(json.dumps(FINALS))
    finals[2]["id"] = 12
    original_path, final_path = inputs(tmp_path, finals=finals)
    out = tmp_path / "e.json"
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path, "--output_path", str(out),
                          "--allow_unpaired"]) == 0
    data = read_json(out)
    assert data["unpaired"] == {"only_in_original": 1, "only_in_rewritten": 1}
    assert data["overall"]["records"] == 4 and len(data["records"]) == 4


def test_factuality_needs_references_and_outputs_must_not_overwrite_inputs(tmp_path, capsys):
    original_path, final_path = inputs(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--original_path", original_path, "--rewritten_path", final_path,
                             "--judge", "factuality"])
    assert e.value.code == 2 and "--reference_path" in capsys.readouterr().err
    before = Path(final_path).read_text(encoding="utf-8")
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path,
                          "--report_path", final_path]) == 2
    assert Path(final_path).read_text(encoding="utf-8") == before


@pytest.mark.slow
def test_tokenizer_path_counts_lengths_in_tokens(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    original_path, final_path = inputs(tmp_path)
    out = tmp_path / "e.json"
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path, "--output_path", str(out),
                          "--tokenizer_path", tiny_tokenizer_dir]) == 0
    data = read_json(out)
    assert data["inputs"]["length_unit"] == "tokens" and "tokens; changed 60.0%; checks:" in data["headline"]
    record = next(r for r in data["records"] if r["id"] == 11)
    assert record["length_after"] == len(tokenizer(FINALS[1]["items"][1]["value"], add_special_tokens=False)["input_ids"])
    assert record["length_after"] != 10  # not the word count
    assert record["edit_rate"] == 0.5  # edit rates stay in words


@pytest.mark.slow
def test_a_tokenizer_that_cannot_load_is_bad_input(tmp_path, capsys):
    original_path, final_path = inputs(tmp_path)
    out = tmp_path / "e.json"
    assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path,
                          "--tokenizer_path", str(tmp_path / "no_such_tokenizer"), "--output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_tokenizer: cannot load the tokenizer" in err
    assert not out.exists()


@pytest.mark.slow
def test_a_second_signal_during_the_judges_exits_130_and_a_rerun_repeats_at_most_what_was_in_flight(tmp_path):
    from fake_servers import FakeOpenAIServer

    originals = [rec(i, f"original answer {i}", "open_qa") for i in range(12)]
    finals = [final(r, f"rewritten answer {r['id']}", "rewrite") for r in originals]
    original_path = write_json(tmp_path / "original.json", originals)
    final_path = write_json(tmp_path / "final.json", finals)
    cache = tmp_path / "cache"
    with FakeOpenAIServer() as server:
        server.chat_responder = lambda body, i: "[[C]]"
        slow = server.add_fault(delay=8, times=None, match=lambda body: "answer 3" in body["messages"][1]["content"]
                                or "answer 4" in body["messages"][1]["content"])
        command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--original_path", original_path,
                   "--rewritten_path", final_path, "--judge", "readability", "--base_url", server.url,
                   "--concurrency", "4", "--cache_dir", str(cache), "--output_path", str(tmp_path / "eval.json")]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OPENAI_API_KEY": "sk-test"})
        deadline = time.monotonic() + 30
        while len(server.requests_to("/v1/chat/completions")) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        time.sleep(1.5)
        stopped = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        assert time.monotonic() - stopped < 5
        sent_first = len(server.requests_to("/v1/chat/completions"))
        assert not (tmp_path / "eval.json").exists()

        slow.times = 0
        server.requests.clear()
        assert evaluate.main(["--original_path", original_path, "--rewritten_path", final_path, "--judge",
                              "readability", "--base_url", server.url, "--cache_dir", str(cache),
                              "--output_path", str(tmp_path / "eval.json")]) == 0
        sent_again = len(server.requests_to("/v1/chat/completions"))
        assert sent_first + sent_again <= 24 + 4  # 12 pairs x 2 orders; at most the 4 in flight twice
        assert read_json(tmp_path / "eval.json")["judges"]["readability"]["counted"] == 12
