"""Stage 5 of ReAlign: keep each rewrite, or fall back to the original, by a preset of rules.

Usage:
    python rewrite_data_selection.py \
        --input_original_data_path outputs/realign_examples_retrieval_clean_evidence.json \
        --input_rewrite_data_path outputs/realign_examples_merged.json \
        --output_path outputs/realign_examples_final.json

Reads the stage-3 input (the originals) and the merged file of stage 4, pairs their
records by id, and writes --output_path, a JSON list: every original record once, in
the order of the original file, with a top-level ``tag``: ``"rewrite"`` (the merged
record: the original with the rewritten ``items[1].value``) or ``"original"`` (the
original record, when a rule rejects the rewrite). With --keep_reasons a rejected
record also carries ``reject_reason``, the name of the rule that rejected it.

A record whose merged response equals its original is tagged original: reason
``no_candidate_passed`` when reformat kept the original because every candidate failed the
quality checks, ``request_failed`` when its request failed, else ``unchanged`` (passed
through, or copied by the model). The other rules come in presets
(--rules), applied in order; the first rule that decides wins:

    open_platypus  single_letter, true_false, exam_result, code, length (the original's set
                   plus the exam rule the paper states)
    alpaca         code, length
    no_robots      default_category, leaked_marker, planning, code, length
    gsm8k, math    final_answer
    none           no rule

Lengths are counted in --tokenizer_path's tokens (batched), or in words without it.

Before the preset, the quality checks of realign/quality.py (--quality_checks, on by
default) reject a rewrite that lost content or kept the prompt's words. A rewrite whose
merged record holds reformat.py's ``checks_passed`` for the same texts under the same
checks is not read again (the checks cost about 0.4 ms a record; the hash a few µs).

Exit status: 0 written; 2 bad input (a malformed record, or files whose ids differ),
nothing written. No environment variables.
"""

import argparse
import logging
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from realign import (
    InputError,
    exits_cleanly,
    iter_records,
    positive_int,
    refuse_overwriting_input,
    setup_logging,
    write_json_list_atomic,
)
from realign.cli import ArgumentParser
from realign.lengths import load_length_counter
from realign.quality import (TEXT_CHECKS, checked_batches, default_processes, final_answer_kept, has_code, has_letter,
                             last_number, numbers_in, problems_of, record_texts)
from realign.quality import texts_to_check as quality_texts

logger = logging.getLogger("rewrite_data_selection")

PLAN_RE = re.compile(r"\bplan(?:s|ned|ning|ner|ners)?\b", re.IGNORECASE)
LEAKED_MARKER_RE = re.compile(r"revised\s+response", re.IGNORECASE)
TRUE_FALSE = ("True", "False")

ACCEPT, REJECT = "accept", "reject"
# Every preset ends with "length" when it has it: the one rule that needs counted lengths.
PRESETS = {
    "open_platypus": ("single_letter", "true_false", "exam_result", "code", "length"),
    "alpaca": ("code", "length"),
    "no_robots": ("default_category", "leaked_marker", "planning", "code", "length"),
    "gsm8k": ("final_answer",),
    "math": ("final_answer",),
    "none": (),
}
DEFAULT_PRESET = "open_platypus"  # the set the original code ran, plus the paper's exam rule
RECORDS_PER_BATCH = 2048  # records per length-counting job (one job counts while the next batch is read)


def exam_result_kept(original, rewrite):
    """Whether the original's last number (its result), when it has one, is a number of the rewrite."""
    result = last_number(original)
    return result is None or result in numbers_in(rewrite)


def mentions_plan(question):
    return PLAN_RE.search(question) is not None


def is_too_short(original_length, rewrite_length, threshold):
    """The length rule: the rewrite is at most ``threshold`` times the original's length."""
    return rewrite_length <= threshold * original_length


# Each text rule: (question, category, original, rewrite) -> ACCEPT (keep the rewrite,
# skip the rules after it), REJECT, or None (no decision, go on).
def _single_letter(question, category, original, rewrite):
    letter = original.strip()
    if len(letter) != 1:
        return None
    return ACCEPT if has_letter(letter, rewrite) else REJECT


def _true_false(question, category, original, rewrite):
    return ACCEPT if original.strip() in TRUE_FALSE else None


def _exam_result(question, category, original, rewrite):
    if category != "exam_problem_solving_tutor":
        return None
    return None if exam_result_kept(original, rewrite) else REJECT


def _code(question, category, original, rewrite):
    return REJECT if has_code(original) != has_code(rewrite) else None


def _planning(question, category, original, rewrite):
    return REJECT if category == "planning" and not mentions_plan(question) else None


def _default_category(question, category, original, rewrite):
    return REJECT if category == "default" else None


def _leaked_marker(question, category, original, rewrite):
    return REJECT if LEAKED_MARKER_RE.search(rewrite) else None


def _final_answer(question, category, original, rewrite):
    return None if final_answer_kept(original, rewrite) else REJECT


TEXT_RULES = {
    "single_letter": _single_letter,
    "true_false": _true_false,
    "exam_result": _exam_result,
    "code": _code,
    "planning": _planning,
    "default_category": _default_category,
    "leaked_marker": _leaked_marker,
    "final_answer": _final_answer,
}


def judge_text(rules, question, category, original, rewrite, problems=()):
    """Run the rules that need no length, in order: the quality checks' ``problems`` first
    (see :func:`texts_to_check`; a rewrite that lost the original's answer is rejected
    before any rule of the preset can accept it), then the preset's.

    Returns ``(True, None)`` to keep the rewrite, ``(False, rule)`` to keep the original,
    or ``(None, None)`` when the length rule must decide.
    """
    if rewrite == original:
        return False, "unchanged"
    if problems:
        return False, problems[0]
    for name in rules:
        if name == "length":
            return None, None
        verdict = TEXT_RULES[name](question, category, original, rewrite)
        if verdict == ACCEPT:
            return True, None
        if verdict == REJECT:
            return False, name
    return True, None


def texts_to_check(passed):
    """``(record, rewrite) -> find_problems' arguments``, or None where the quality checks
    need not run (realign.quality.texts_to_check; ``passed``: see :func:`read_rewrites`)."""
    def texts(pair):
        record, rewrite = pair
        return quality_texts(rewrite, *record_texts(record), passed.get(record["id"]))
    return texts


def judge_texts(batch, rules, problems=None):
    """Text-rule verdicts for ``[(record, rewrite)]`` (``problems``: the quality checks'
    findings of each, or None when they were not run), and the indexes the length rule must
    decide."""
    verdicts, pending = [], []
    for i, (record, rewrite) in enumerate(batch):
        items = record["items"]
        verdict = judge_text(rules, items[0]["value"], items[0].get("category"), items[1]["value"], rewrite,
                             problems[i] if problems is not None else ())
        if verdict[0] is None:
            pending.append(len(verdicts))
        verdicts.append(verdict)
    return verdicts, pending


def texts_to_count(batch, pending):
    """The originals, then the rewrites, of the pending records: one tokenizer call for both."""
    return [batch[i][0]["items"][1]["value"] for i in pending] + [batch[i][1] for i in pending]


def apply_lengths(verdicts, pending, lengths, threshold):
    for j, i in enumerate(pending):
        too_short = is_too_short(lengths[j], lengths[len(pending) + j], threshold)
        verdicts[i] = (False, "length") if too_short else (True, None)
    return verdicts


def judge_batch(batch, rules, threshold, count_lengths, quality=True):
    """``[(keep, rule)]`` for ``[(record, rewrite)]``, counting lengths once for the batch."""
    problems = None
    if quality:
        texts = texts_to_check({})
        problems = problems_of([texts(pair) for pair in batch])
    verdicts, pending = judge_texts(batch, rules, problems)
    if pending:
        apply_lengths(verdicts, pending, count_lengths(texts_to_count(batch, pending)), threshold)
    return verdicts


def paired_batches(records, rewrites, rewrite_path, stats, batch_size):
    """``[(record, rewrite)]`` lists of up to ``batch_size``; ``rewrites`` (id -> merged response)
    loses the ids it pairs, and must be empty at the end."""
    batch = []
    for index, record in enumerate(records):
        stats["in"] += 1
        record_id = record["id"]
        if record_id not in rewrites:
            raise InputError(
                f"{rewrite_path}: no record with id {record_id!r} (record {index} of the original file); "
                "the two files must come from the same run"
            )
        batch.append((record, rewrites.pop(record_id)))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
    if rewrites:
        shown = ", ".join(repr(i) for i in list(rewrites)[:5])
        raise InputError(
            f"{rewrite_path}: {len(rewrites)} record(s) whose id is not in the original file (ids {shown})"
        )


def tag_records(batch, verdicts, stats, keep_reasons, kept_by_reformat):
    for (record, rewrite), (keep, rule) in zip(batch, verdicts):
        if rule == "unchanged":
            rule = kept_by_reformat.get(record["id"], rule)
        if keep:
            record["items"][1]["value"] = rewrite
            record["tag"] = "rewrite"
            stats["rewrite"] += 1
        else:
            record["tag"] = "original"
            if keep_reasons:
                record["reject_reason"] = rule
            stats["original"] += 1
            stats[rule] += 1
        yield record


def select_records(records, rewrites, rules, threshold, count_lengths, stats, keep_reasons,
                   rewrite_path, batch_size=RECORDS_PER_BATCH, quality=True, kept_by_reformat=None, passed=None,
                   processes=1):
    """Yield every original record tagged ``rewrite`` (with the merged response) or ``original``
    (``kept_by_reformat``, ``passed``: see :func:`read_rewrites`).

    The quality checks (with ``quality``) of the batches run in ``processes`` worker
    processes (realign.quality.checked_batches). Lengths of one batch are counted in a
    worker thread (tokenizers release the GIL) while the next batch is read and judged and
    the previous one written.
    """
    def finish(batch, verdicts, pending, lengths):
        if lengths is not None:
            apply_lengths(verdicts, pending, lengths.result(), threshold)
        return tag_records(batch, verdicts, stats, keep_reasons, kept_by_reformat or {})

    with ThreadPoolExecutor(max_workers=1) as pool:
        previous = None
        batches = paired_batches(records, rewrites, rewrite_path, stats, batch_size)
        texts = texts_to_check(passed or {}) if quality else lambda pair: None
        for batch, problems in checked_batches(batches, texts, processes if quality else 1):
            verdicts, pending = judge_texts(batch, rules, problems)
            lengths = pool.submit(count_lengths, texts_to_count(batch, pending)) if pending else None
            if previous is not None:
                yield from finish(*previous)
            previous = (batch, verdicts, pending, lengths)
        if previous is not None:
            yield from finish(*previous)


# Why a merged record kept its original, from reformat (parallel_data_merge.py's "reformat" note).
KEPT_BY_REFORMAT = {"rejected": "no_candidate_passed", "failed": "request_failed"}


def read_rewrites(path):
    """``({id: items[1].value}, {id: why reformat kept the original}, {id: checks_passed})``
    of the merged file, streamed: a record whose candidates all failed the checks, or whose
    request failed, has its original there, and the filter names that instead of
    "unchanged"; a rewrite that passed the checks has reformat's stamp of its texts
    (realign.quality.passed_stamp)."""
    rewrites, kept, passed = {}, {}, {}
    for record in iter_records(path, require_response=True):
        rewrites[record["id"]] = record["items"][1]["value"]
        note = record.get("reformat")
        if not isinstance(note, dict):
            continue
        if note.get("status") in KEPT_BY_REFORMAT:
            kept[record["id"]] = KEPT_BY_REFORMAT[note["status"]]
        elif isinstance(note.get("checks_passed"), str):
            passed[record["id"]] = note["checks_passed"]
    return rewrites, kept, passed


def summary(stats, rules, unit, quality=True):
    checks = TEXT_CHECKS if quality else ()
    named = ("unchanged", *KEPT_BY_REFORMAT.values(), *checks, *rules)
    reasons = ", ".join(f"{rule}: {stats[rule]}" for rule in named if rule != "true_false")
    counted = f"; lengths in {unit}" if "length" in rules else ""
    return (f"#in: {stats['in']}, #rewrite kept: {stats['rewrite']}, #original kept: {stats['original']} "
            f"(rejected by {reasons}{counted})")


def parse_threshold(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text!r}")
    return value


def parse_args(argv=None):
    parser = ArgumentParser(description="Tag each record rewrite or original by a preset of filter rules.")
    parser.add_argument("--input_original_data_path", "--input_data_path", dest="input_original_data_path",
                        required=True,
                        help="the stage-3 input: the original records (JSON list or JSONL)")
    parser.add_argument("--input_rewrite_data_path", required=True,
                        help="the merged file written by parallel_data_merge.py; paired with the originals by id")
    parser.add_argument("--output_path", required=True, help="filtered JSON list to write (atomically)")
    parser.add_argument("--rules", choices=list(PRESETS), default=DEFAULT_PRESET,
                        help=f"rule preset (default {DEFAULT_PRESET}, the set the original code ran); "
                             "alpaca, no_robots, gsm8k/math (final answer only), none")
    parser.add_argument("--tokenizer_path", default=None,
                        help="Hugging Face tokenizer to count lengths in tokens (e.g. meta-llama/Llama-2-7b-chat-hf); "
                             "(default: none, lengths are counted in words)")
    parser.add_argument("--length_threshold", type=parse_threshold, default=0.5,
                        help="reject a rewrite at most this many times the original's length (default 0.5)")
    parser.add_argument("--quality_checks", action=argparse.BooleanOptionalAction, default=True,
                        help="before the preset's rules, reject a rewrite that fails a quality check of "
                             f"realign/quality.py ({', '.join(TEXT_CHECKS)}), whatever the preset (default: on)")
    parser.add_argument("--processes", type=positive_int, default=default_processes(),
                        help="processes that run the quality checks of a large file (default: the CPUs this process "
                             "may use, here %(default)s)")
    parser.add_argument("--keep_reasons", action=argparse.BooleanOptionalAction, default=False,
                        help="add 'reject_reason' (the name of the rule or check) to records tagged original (default: off)")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False, help="log debug messages (default: off)")
    return parser.parse_args(argv)


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    refuse_overwriting_input(args.input_original_data_path, args.output_path)
    refuse_overwriting_input(args.input_rewrite_data_path, args.output_path)
    rules = PRESETS[args.rules]
    count_lengths, unit = None, "words"
    if "length" in rules:
        count_lengths = load_length_counter(args.tokenizer_path)
        unit = count_lengths.unit
    elif args.tokenizer_path:
        logger.info("the %s preset has no length rule: --tokenizer_path is not used", args.rules)
    rewrites, kept_by_reformat, passed = read_rewrites(args.input_rewrite_data_path)
    stats = Counter()
    records = iter_records(args.input_original_data_path, require_response=True)
    write_json_list_atomic(args.output_path, select_records(
        records, rewrites, rules, args.length_threshold, count_lengths, stats, args.keep_reasons,
        args.input_rewrite_data_path, quality=args.quality_checks, kept_by_reformat=kept_by_reformat,
        passed=passed, processes=args.processes,
    ))
    logger.info("%s -> %s", summary(stats, rules, unit, args.quality_checks), args.output_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
