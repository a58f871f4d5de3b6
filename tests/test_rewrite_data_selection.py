"""rewrite_data_selection.py: each rule and preset on literal inputs, pairing by id, bad input."""

import json
import logging
from pathlib import Path

import pytest

import rewrite_data_selection as sel
from realign import LengthCounter

LONG = "Paris is the capital of France and its largest city by far."  # 12 words


def judge(rules, original, rewrite, question="What is it?", category="open_qa", quality=False):
    """(keep, rule) with lengths counted in words, as main does without a tokenizer; the
    quality checks only with ``quality`` (the paper's rules are tested alone)."""
    record = {"id": 1, "items": [{"from": "human", "value": question, "category": category},
                                 {"from": "gpt", "value": original}]}
    return sel.judge_batch([(record, rewrite)], rules, 0.5, LengthCounter(), quality)[0]


# -- single rules -------------------------------------------------------------------------

@pytest.mark.parametrize("original, rewrite, kept", [
    ("B", "The answer is B.", True),
    ("B", "The answer is (B) because ...", True),
    (" B\n", "B", True),
    ("B", "Both options are wrong; see Bob.", False),  # only inside words
    ("B", "The answer is b.", False),  # case matters, as in the original
    ("B", "Option B2 is it", False),  # next to a digit
    ("3", "It is 3.", True),
    ("3", "It is 33.", False),
    (".", "no full stop here", False),  # escaped: '.' is not 'any character'
    (".", "ends with one .", True),
    ("(", "an open ( bracket", True),  # unescaped, this crashed the original
    ("*", "no star", False),
])
def test_single_letter_rule(original, rewrite, kept):
    assert sel._single_letter("q", "c", original, rewrite) == (sel.ACCEPT if kept else sel.REJECT)


def test_single_letter_accepts_before_the_length_rule():
    # A one-letter original is always much shorter; the letter rule decides alone.
    assert judge(sel.PRESETS["open_platypus"], "C", "C") == (False, "unchanged")
    assert judge(sel.PRESETS["open_platypus"], "C", "C is right") == (True, None)
    assert judge(sel.PRESETS["open_platypus"], "C", "Choice D is right") == (False, "single_letter")
    assert sel._single_letter("q", "c", "CD", "x") is None


@pytest.mark.parametrize("original", ["True", "False", " True\n"])
def test_true_false_originals_always_accept_the_rewrite(original):
    # Even a rewrite that the code and length rules would reject.
    rewrite = "```python\nprint(1)\n``` " + "x " * 40
    assert judge(sel.PRESETS["open_platypus"], original, rewrite) == (True, None)
    assert judge(sel.PRESETS["alpaca"], original * 10, "```x```") == (False, "code")


@pytest.mark.parametrize("text, expected", [
    ("```python\nx = 1\n```", True),
    ("def f(x):\n    return x", True),
    ("def f(x): pass", False),  # 'def ' without 'return '
    ("Return the book by Friday.", False),
    ("use ``` once", False),  # a single fence is no block
    ("plain text", False),
])
def test_has_code(text, expected):
    assert sel.has_code(text) is expected


def test_code_rule_rejects_when_exactly_one_side_has_code():
    code = "```python\nprint('hi')\n```"
    assert sel._code("q", "c", code, "Here it is:\n" + code) is None
    assert sel._code("q", "c", "no code", "still none") is None
    assert sel._code("q", "c", code, "print('hi') without a fence") == sel.REJECT
    assert sel._code("q", "c", "explain it", "def f():\n    return 1") == sel.REJECT


@pytest.mark.parametrize("question, kept", [
    ("Can you plan my week?", True),
    ("Plan a three-day trip to Rome.", True),  # the original's ' Plan' test missed this
    ("I need a study planner and some plans.", True),
    ("Make me a schedule for the week.", False),
    ("Which planet is largest?", False),  # the original's ' plan' test matched this
])
def test_planning_rule(question, kept):
    verdict = sel._planning(question, "planning", "o", "r")
    assert verdict == (None if kept else sel.REJECT)
    assert sel._planning(question, "open_qa", "o", "r") is None


def test_default_category_and_leaked_marker_rules():
    assert sel._default_category("q", "default", "o", "r") == sel.REJECT
    assert sel._default_category("q", "open_qa", "o", "r") is None
    assert sel._leaked_marker("q", "c", "o", "Revised response: the answer") == sel.REJECT
    assert sel._leaked_marker("q", "c", "o", "**revised  Response**: x") == sel.REJECT
    assert sel._leaked_marker("q", "c", "o", "The response was revised.") is None


@pytest.mark.parametrize("original, rewrite, kept", [
    ("So the speed is 72 km/h.", "Speed = 180 / 2.5 = 72 km/h.", True),
    ("The total is 1,200 dollars.", "Total: 1200.", True),
    ("x = 2.50", "x equals 2.5", True),
    ("So the speed is 72 km/h.", "The speed is 172 km/h.", False),  # not as a substring
    ("So the speed is 72 km/h.", "The speed is 7.2 km/h.", False),
    ("First 3 then 12.", "The result is 3.", False),  # the last number counts
    ("It is Paris.", "Paris, the capital.", True),  # no number: nothing to keep
])
def test_exam_result_rule(original, rewrite, kept):
    assert sel._exam_result("q", "exam_problem_solving_tutor", original, rewrite) == (None if kept else sel.REJECT)
    assert sel._exam_result("q", "open_qa", original, rewrite) is None


def test_length_boundary_is_rejected_at_exactly_the_threshold():
    original = " ".join(["w"] * 10)
    assert judge(("length",), original, "a b c d e") == (False, "length")  # 5 <= 0.5 * 10
    assert judge(("length",), original, "a b c d e f") == (True, None)  # 6 > 5
    assert sel.is_too_short(10, 5, 0.5) and not sel.is_too_short(10, 6, 0.5)
    assert sel.is_too_short(7, 3, 0.5) and not sel.is_too_short(7, 4, 0.5)


# -- presets --------------------------------------------------------------------------------

CODE = "```python\nprint('hi')\n```"


@pytest.mark.parametrize("preset, original, rewrite, category, question, expected", [
    ("open_platypus", "B", "The answer is B.", "open_qa", "Pick one.", (True, None)),
    ("open_platypus", LONG, "Paris.", "open_qa", "Capital?", (False, "length")),
    ("open_platypus", CODE + " " + LONG, LONG + " " + LONG, "open_qa", "Code?", (False, "code")),
    ("open_platypus", "Speed is 72.", "The speed is 70 km per hour, more or less.",
     "exam_problem_solving_tutor", "Speed?", (False, "exam_result")),
    ("open_platypus", LONG, "Plan:\n" + LONG, "default", "Do it", (True, None)),
    ("alpaca", "B", "The answer, as asked, is the letter D.", "open_qa", "Pick", (True, None)),
    ("alpaca", "Speed is 72.", "The speed is 70 km per hour.", "exam_problem_solving_tutor", "?", (True, None)),
    ("alpaca", LONG, "Paris.", "open_qa", "Capital?", (False, "length")),
    ("no_robots", LONG, LONG + " Indeed.", "default", "q", (False, "default_category")),
    ("no_robots", LONG, "Revised response: " + LONG, "open_qa", "q", (False, "leaked_marker")),
    ("no_robots", LONG, LONG + " Indeed.", "planning", "Organize my week.", (False, "planning")),
    ("no_robots", LONG, LONG + " Indeed.", "planning", "Plan my week.", (True, None)),
    ("no_robots", LONG, "Paris.", "open_qa", "q", (False, "length")),
    ("gsm8k", "2 + 2 = 4\n#### 4", "Four.", "math_puzzles", "q", (False, "final_answer")),
    ("gsm8k", "2 + 2 = 4\n#### 4", "1. Add.\n#### 4", "math_puzzles", "q", (True, None)),
    ("math", "$\\boxed{4}$", "So $\\boxed{4}$.", "math_puzzles", "q", (True, None)),
    ("math", LONG, "Paris.", "open_qa", "q", (True, None)),  # no length rule
    ("none", CODE, "Paris.", "default", "q", (True, None)),
    ("none", LONG, LONG, "open_qa", "q", (False, "unchanged")),
])
def test_presets(preset, original, rewrite, category, question, expected):
    assert judge(sel.PRESETS[preset], original, rewrite, question, category) == expected


@pytest.mark.parametrize("preset", list(sel.PRESETS))
def test_every_preset_runs_the_quality_checks_first_and_names_the_check(preset):
    # The paper's true/false rule accepts every rewrite of a True original: not one that says "false".
    assert judge(sel.PRESETS[preset], "True", "The claim is false.", "Is it true?", "fact_verification",
                 quality=True) == (False, "flipped_verdict")
    looping = LONG + "\n" + "The city lies on the Seine river.\n" * 4
    assert judge(sel.PRESETS[preset], LONG, looping, quality=True) == (False, "loop")
    assert judge(sel.PRESETS[preset], LONG, "This revised response follows the target format. " + LONG,
                 quality=True) == (False, "leftover")
    kept = judge(sel.PRESETS[preset], LONG, "**Answer**\n\n" + LONG, quality=True)
    assert kept == judge(sel.PRESETS[preset], LONG, "**Answer**\n\n" + LONG)  # a rewrite that keeps its content


# -- main -----------------------------------------------------------------------------------

def record(record_id, question, response, category="open_qa"):
    return {"id": record_id, "items": [{"from": "human", "value": question, "category": category},
                                       {"from": "gpt", "value": response}]}


ORIGINALS = [
    record(3, "Pick the right option.", "B", "general_classification"),
    record("x-7", "What is the capital of France?", LONG),
    record(10, "Write code that greets.", CODE),
    record(11, "Tell me a story.", "Once upon a time there was a fox.", "story_generation"),
    record(25, "Is the sky blue?", "True", "fact_verification"),
]
REWRITES = {
    3: "The correct option is B, because ...",
    "x-7": "Paris.",  # too short
    10: "Just call print('hi').",  # the code was lost
    11: "Once upon a time there was a fox.",  # passed through
    25: "True. The sky looks blue because of Rayleigh scattering.",
}


def write(path, records):
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    return str(path)


def merged(records, rewrites):
    out = json.loads(json.dumps(records))
    for r in out:
        r["items"][1]["value"] = rewrites[r["id"]]
    return out


def run(tmp_path, *extra, originals=ORIGINALS, merged_records=None):
    original_path = write(tmp_path / "original.json", originals)
    if merged_records is None:
        merged_records = list(reversed(merged(originals, REWRITES)))  # another order: pairing is by id
    merged_path = write(tmp_path / "merged.json", merged_records)
    out = tmp_path / "final.json"
    code = sel.main(["--input_original_data_path", original_path, "--input_rewrite_data_path", merged_path,
                     "--output_path", str(out), *extra])
    return code, out


def test_main_tags_every_record_in_original_order_paired_by_id(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        code, out = run(tmp_path, "--keep_reasons")
    assert code == 0
    final = json.loads(out.read_text(encoding="utf-8"))
    # The quality checks come first and name what the rewrite lost: "Paris." lost France,
    # the other one the code (without the checks, the length and code rules reject them).
    assert [(r["id"], r["tag"], r.get("reject_reason")) for r in final] == [
        (3, "rewrite", None), ("x-7", "original", "lost_name"), (10, "original", "lost_code"),
        (11, "original", "unchanged"), (25, "rewrite", None)]
    assert final[0]["items"][1]["value"] == REWRITES[3]
    assert final[1]["items"] == ORIGINALS[1]["items"]
    assert ("#in: 5, #rewrite kept: 2, #original kept: 3 (rejected by unchanged: 1, no_candidate_passed: 0, "
            "request_failed: 0, loop: 0, leftover: 0, flipped_verdict: 0, lost_answer: 0, lost_number: 0, "
            "lost_code: 1, lost_name: 1, lost_content: 0, ungrounded: 0, single_letter: 0, "
            "exam_result: 0, code: 0, length: 0; lengths in words)") in caplog.text
    assert caplog.text.count("lengths are counted in words") == 1


def test_reformats_stamp_spares_the_checks_only_for_the_texts_it_was_made_for(tmp_path):
    # reformat.py stamps the rewrite it chose (passed_stamp of the texts the checks read);
    # the merge keeps it in "reformat". A stamp of these very texts is read as passed: the
    # filter does not run the checks again (here a stamp made for a rewrite that lost France,
    # which the checks reject, shows it). A rewrite edited after the stamp, or a stamp of other
    # settings, is checked again.
    from realign.quality import passed_stamp, record_texts

    lost = merged(ORIGINALS, REWRITES)
    by_id = {r["id"]: r for r in lost}
    by_id["x-7"]["reformat"] = {"checks_passed": passed_stamp("Paris.", *record_texts(ORIGINALS[1]))}
    by_id[10]["reformat"] = {"checks_passed": passed_stamp("another rewrite", *record_texts(ORIGINALS[2]))}
    code, out = run(tmp_path, "--keep_reasons", "--rules", "none", merged_records=lost)
    assert code == 0
    final = {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))}
    assert final["x-7"]["tag"] == "rewrite"  # trusted: the stamp matches its texts
    assert (final[10]["tag"], final[10]["reject_reason"]) == ("original", "lost_code")  # checked again


def test_main_without_keep_reasons_adds_only_the_tag(tmp_path):
    code, out = run(tmp_path, "--rules", "none", "--no-quality_checks")
    assert code == 0
    final = json.loads(out.read_text(encoding="utf-8"))
    assert [r["tag"] for r in final] == ["rewrite", "rewrite", "rewrite", "original", "rewrite"]
    assert all(set(r) == {"id", "items", "tag"} for r in final)


def test_length_threshold_flag(tmp_path):
    code, out = run(tmp_path, "--length_threshold", "0.05", "--rules", "alpaca", "--no-quality_checks")
    assert code == 0
    assert [r["tag"] for r in json.loads(out.read_text())][1] == "rewrite"  # 1 word > 0.05 * 12


# One record aimed at each rule; what every preset makes of them, worked out by hand
# (None: the rewrite is kept). The summary line names the preset's rules in its order.
PRESET_RECORDS = [
    # id, category, question, original, rewrite
    ("letter", "general_classification", "Pick one.", "B", "The answer is D."),
    ("exam", "exam_problem_solving_tutor", "Speed?", "Speed is 72.", "The speed is 70 km per hour, more or less."),
    ("code", "open_qa", "Code?", CODE + " " + LONG, LONG + " " + LONG),
    ("short", "open_qa", "Capital?", LONG, "Paris."),
    ("default", "default", "Do it", LONG, LONG + " Indeed."),
    ("marker", "open_qa", "q", LONG, "Revised response: " + LONG),
    ("planning", "planning", "Organize my week.", LONG, LONG + " Indeed."),
    ("gsm8k", "math_puzzles", "2 + 2?", "2 + 2 = 4\n#### 4", "Four, as two and two make four."),
    ("same", "open_qa", "q", LONG, LONG),
    ("true", "fact_verification", "Is it?", "True", "```python\nprint(1)\n``` " + "x " * 40),
]
PRESET_VERDICTS = {
    "open_platypus": (["single_letter", "exam_result", "code", "length", None, None, None, None, "unchanged", None],
                      "#in: 10, #rewrite kept: 5, #original kept: 5 (rejected by unchanged: 1, no_candidate_passed: 0, request_failed: 0, single_letter: 1, "
                      "exam_result: 1, code: 1, length: 1; lengths in words)"),
    "alpaca": ([None, None, "code", "length", None, None, None, None, "unchanged", "code"],
               "#in: 10, #rewrite kept: 6, #original kept: 4 (rejected by unchanged: 1, no_candidate_passed: 0, request_failed: 0, code: 2, length: 1; lengths in words)"),
    "no_robots": ([None, None, "code", "length", "default_category", "leaked_marker", "planning", None, "unchanged",
                   "code"],
                  "#in: 10, #rewrite kept: 3, #original kept: 7 (rejected by unchanged: 1, no_candidate_passed: 0, request_failed: 0, default_category: 1, "
                  "leaked_marker: 1, planning: 1, code: 2, length: 1; lengths in words)"),
    "gsm8k": ([None, None, None, None, None, None, None, "final_answer", "unchanged", None],
              "#in: 10, #rewrite kept: 8, #original kept: 2 (rejected by unchanged: 1, no_candidate_passed: 0, request_failed: 0, final_answer: 1)"),
    "math": ([None, None, None, None, None, None, None, "final_answer", "unchanged", None],
             "#in: 10, #rewrite kept: 8, #original kept: 2 (rejected by unchanged: 1, no_candidate_passed: 0, request_failed: 0, final_answer: 1)"),
    "none": ([None, None, None, None, None, None, None, None, "unchanged", None],
             "#in: 10, #rewrite kept: 9, #original kept: 1 (rejected by unchanged: 1, no_candidate_passed: 0, "
             "request_failed: 0)"),
}


@pytest.mark.parametrize("preset", list(PRESET_VERDICTS))
def test_each_preset_through_main(tmp_path, caplog, preset):
    originals = [record(i, q, o, c) for i, c, q, o, _ in PRESET_RECORDS]
    rewrites = {i: r for i, _, _, _, r in PRESET_RECORDS}
    with caplog.at_level(logging.INFO):
        code, out = run(tmp_path, "--rules", preset, "--keep_reasons", "--no-quality_checks", originals=originals,
                        merged_records=merged(originals, rewrites))
    assert code == 0
    reasons, summary = PRESET_VERDICTS[preset]
    final = json.loads(out.read_text(encoding="utf-8"))
    assert [r.get("reject_reason") for r in final] == reasons
    assert [r["tag"] for r in final] == ["original" if reason else "rewrite" for reason in reasons]
    assert f"{summary} -> {out}" in caplog.text


def test_the_default_preset_is_open_platypus(tmp_path):
    originals = [record(i, q, o, c) for i, c, q, o, _ in PRESET_RECORDS]
    code, out = run(tmp_path, "--keep_reasons", "--no-quality_checks", originals=originals,
                    merged_records=merged(originals, {i: r for i, _, _, _, r in PRESET_RECORDS}))
    assert code == 0
    assert [r.get("reject_reason") for r in json.loads(out.read_text())] == PRESET_VERDICTS["open_platypus"][0]


@pytest.mark.slow
def test_lengths_in_tokens_with_a_tokenizer(tmp_path, tiny_tokenizer_dir, caplog):
    # 'zzzz...' is one word but many tokens of the tiny BPE: the unit decides the verdict.
    originals = [record(1, "q", "zqzqzqzqzqzqzqzqzqzqzqzqzqzqzq"), record(2, "q", "one two three four")]
    rewrites = {1: "zq zq", 2: "one, two, three and four"}
    merged_records = merged(originals, rewrites)
    with caplog.at_level(logging.INFO):
        code, out = run(tmp_path, "--keep_reasons", "--no-quality_checks", "--tokenizer_path", tiny_tokenizer_dir,
                        originals=originals, merged_records=merged_records)
    assert code == 0
    assert [r["tag"] for r in json.loads(out.read_text())] == ["original", "rewrite"]
    assert "lengths in tokens" in caplog.text and "counted in words" not in caplog.text
    code, out = run(tmp_path, "--no-quality_checks", originals=originals, merged_records=merged_records)
    assert [r["tag"] for r in json.loads(out.read_text())] == ["rewrite", "rewrite"]  # 2 words > 0.5 * 1


@pytest.mark.slow
def test_batched_lengths_match_one_call_per_record(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    counter = LengthCounter(tiny_tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = [LONG, "B", "", CODE, "zqzq " * 50]
    assert counter(texts) == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_select_records_over_many_batches_keeps_order_and_counts():
    # Batches of 2: the lengths of one batch are counted while the next is judged.
    originals = [record(i, "q", " ".join(["w"] * 10)) for i in range(7)]
    rewrites = {i: " ".join(["v"] * (3 if i % 3 == 0 else 8)) for i in range(7)}
    rewrites[5] = originals[5]["items"][1]["value"]
    calls = []

    def count(texts):
        calls.append(len(texts))
        return [len(text.split()) for text in texts]

    stats = sel.Counter()
    out = list(sel.select_records(iter(json.loads(json.dumps(originals))), dict(rewrites), ("length",), 0.5, count,
                                  stats, True, "merged.json", batch_size=2))
    assert [(r["id"], r["tag"], r.get("reject_reason")) for r in out] == [
        (0, "original", "length"), (1, "rewrite", None), (2, "rewrite", None), (3, "original", "length"),
        (4, "rewrite", None), (5, "original", "unchanged"), (6, "original", "length")]
    assert [r["items"][1]["value"] for r in out] == [
        originals[0]["items"][1]["value"], rewrites[1], rewrites[2], originals[3]["items"][1]["value"], rewrites[4],
        originals[5]["items"][1]["value"], originals[6]["items"][1]["value"]]
    assert calls == [4, 4, 2, 2]  # originals + rewrites per batch; the unchanged record is not counted
    assert (stats["in"], stats["rewrite"], stats["length"], stats["unchanged"]) == (7, 3, 3, 1)


def test_merged_file_lacking_an_id_is_bad_input(tmp_path, capsys):
    out = tmp_path / "final.json"
    out.write_text("old content")
    code, _ = run(tmp_path, merged_records=merged(ORIGINALS, REWRITES)[:-1])
    assert code == 2
    assert "merged.json: no record with id 25 (record 4 of the original file)" in capsys.readouterr().err
    assert out.read_text() == "old content"


def test_merged_file_with_an_extra_id_is_bad_input(tmp_path, capsys):
    extra = merged(ORIGINALS, REWRITES) + [record(99, "q", "r")]
    code, out = run(tmp_path, merged_records=extra)
    assert code == 2
    assert "merged.json: 1 record(s) whose id is not in the original file (ids 99)" in capsys.readouterr().err
    assert not out.exists()


def test_malformed_original_record_names_file_id_and_field(tmp_path, capsys):
    originals = ORIGINALS[:2] + [{"id": 10, "items": [{"from": "human", "value": "q"}, {"from": "gpt"}]}]
    code, out = run(tmp_path, originals=originals, merged_records=merged(ORIGINALS[:2], REWRITES))
    assert code == 2
    assert "original.json: record 2 (id 10): field 'items[1].value' must be a string" in capsys.readouterr().err
    assert not out.exists()


def test_bad_flags_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        sel.parse_args(["--input_original_data_path", "a", "--input_rewrite_data_path", "b", "--output_path", "c",
                        "--length_threshold", "-1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        sel.parse_args(["--input_original_data_path", "a", "--input_rewrite_data_path", "b", "--output_path", "c",
                        "--rules", "platypus"])


def test_output_may_not_overwrite_an_input(tmp_path, capsys):
    original_path = write(tmp_path / "original.json", ORIGINALS)
    merged_path = write(tmp_path / "merged.json", merged(ORIGINALS, REWRITES))
    before = Path(merged_path).read_text(encoding="utf-8")
    code = sel.main(["--input_original_data_path", original_path, "--input_rewrite_data_path", merged_path,
                     "--output_path", merged_path])
    assert code == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert Path(merged_path).read_text(encoding="utf-8") == before
