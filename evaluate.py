"""Measure what ReAlign did to a dataset: the paper's share substantially rewritten, lengths,
what the quality checks found, an HTML page to browse the records, and optional judges.

Usage:
    python evaluate.py \
        --original_path outputs/realign_examples_retrieval_clean_evidence.json \
        --rewritten_path outputs/realign_examples_final.json \
        --output_path outputs/evaluation.json --report_path outputs/evaluation.md \
        --plot_path outputs/evaluation.png --html_path outputs/report.html

Reads the stage-3 input (the originals) and the final file of rewrite_data_selection.py
(or the merged file of parallel_data_merge.py), both JSON lists or JSONL, streamed, and
pairs their records by id. An id found in one file only is bad input (exit 2, nothing
written), unless --allow_unpaired, which measures the paired records and reports how many
were left out.

Free measures (no network), overall, per task group (constant.TASK_GROUPS) and per task
(items[0].category), each with its record count:
    - substantially rewritten: the word-level edit distance of items[1].value before and after, divided
      by the longer word count, is above --rewrite_threshold (0.2, the paper's rule); words
      are whitespace-separated tokens; two empty texts have rate 0;
    - changed: the texts differ at all;
    - mean and median response length before and after, in words (or --tokenizer_path
      tokens), the length ratio (mean after / mean before) and the quantiles of the
      per-record ratios;
    - the filter's tags and reject reasons (counts);
    - the quality checks (realign/quality.py) each kept rewrite fails; with
      --rewrite_directory, also what they found among reformat.py's candidates (its batch
      files' candidate_checks) and how many records kept their original for it.

Judges (optional; --judge factuality and/or readability, an OpenAI-compatible model):
    - factuality rates the original and the rewrite, each 1 to 10 against the reference
      answer (items[1].value of the --reference_path record with the same id, e.g. the NQ
      file of the original work), and reports both means and their difference;
    - readability asks for the better-readable answer in both orders (original first, then
      rewrite first); a verdict that flips with the order counts as a tie; reports win /
      tie / loss of the rewrite and the share of consistent pairs. A record whose rewrite
      equals its original is a tie without asking (and factuality asks once for it).
    --judge_sample K judges K records drawn by --seed (the same ids whatever the file
    order). A reply without a well-formed verdict is re-asked up to --max_judge_retries
    times, then counted apart as unparsed.

Outputs (each written atomically, only after every check passed):
    --output_path  JSON: "headline", "inputs", "unpaired", "overall", "groups", "tasks",
                   "judges" (when asked) and "records", one compact line per record: id,
                   task, edit_rate (4 decimals), rewritten, changed, length_before,
                   length_after, tag, reject_reason (when the file has it) and verdicts.
    --report_path  Markdown: the headline and the tables.
    --plot_path    one PNG with several panels: the share substantially rewritten per task,
                   the length ratios of the changed records, and the judge results.
    --html_path    one self-contained page (no network): the same figure, the tables, and
                   the records (a seeded sample per task, --html_sample, plus every flagged
                   one up to --html_flagged), original and rewrite side by side with a
                   word-level diff; --merged_path adds the rewrites the filter rejected.
The last log line is the headline, e.g.
    substantially rewritten 29.9% (edit rate > 0.2) of 52,002; mean length 65.5 -> 72.4
    words; changed 31.2%; checks: 0 rewrites rejected by a check, 0 kept rewrites fail one

Exit status: 0 done; 1 the judges stopped early (--max_cost reached, or a fatal error),
nothing written; 2 bad input (a malformed record, ids in one file only, a bad tokenizer),
nothing written; 130 stopped by Ctrl-C or SIGTERM. Environment: OPENAI_API_KEY and OPENAI_BASE_URL for the
judges (never logged).
"""

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
from collections import Counter, defaultdict, namedtuple

from constant import JUDGE_PROMPTS, TASK_GROUPS
from realign import (
    InputError,
    check_constants,
    exits_cleanly,
    iter_records,
    non_negative_int,
    positive_int,
    refuse_overwriting_input,
    setup_logging,
)
from realign.cli import ArgumentParser
from realign.metrics import (
    CHANGED,
    REWRITE_THRESHOLD,
    REWRITTEN,
    MeasureStats,
    Sampler,
    edit_rate_of_words,
    is_rewritten,
    plural,
    split_words,
)
from realign.cache import open_cache
from realign.client import (
    OpenAITransport,
    Sampling,
    add_client_arguments,
    default_reasoning_effort,
    finish_client_arguments,
    reply_text,
    resolve_api_key,
)
from realign.engine import Request, options_from_args, send_requests
from realign.lengths import load_length_counter
from realign.pricing import price_of_run
from realign.quality import TEXT_CHECKS, checked_batches, default_processes, find_problems
from realign.quality import texts_to_check as quality_texts
from realign.report_html import MAX_FLAGGED, PER_TASK, RecordSample, figure_svg, render_page
from realign.records import batched, write_atomic  # the one atomic writer (see write_text_atomic)

logger = logging.getLogger("evaluate")

JUDGES = ("factuality", "readability")
DEFAULT_JUDGE_MODEL = "gpt-6-sol"  # the paper judged with GPT-4; today's strong OpenAI model
JUDGE_MAX_TOKENS = 1024  # a short explanation, then the verdict
JUDGE_EXPECTED_TOKENS = 200  # what one verdict costs, for --max_cost and the dry run
NO_TASK = "(none)"  # records without items[0].category
# One word per meaning: the filter's choice (its tag) is "rewrite kept" or "original kept";
# "substantially rewritten" is the paper's measure (edit rate above the threshold).
CHOICE_WORDS = {"rewrite": "rewrite kept", "original": "original kept", "(none)": "no choice (not filtered)"}
NO_GROUP = "(no group)"  # tasks that TASK_GROUPS does not list
RECORDS_PER_BATCH = 2048  # records per length-counting call (a tokenizer counts a batch at once)
SHOWN_IDS = 5  # example ids an error message lists

# A verdict is [[n]] or [[X]]; the last one in a reply counts (judges may quote the format first).
SCORE_RE = re.compile(r"\[\[\s*(-?\d+)\s*\]\]")
CHOICE_RE = re.compile(r"\[\[\s*([A-Za-z])\s*\]\]")
SCORES = range(1, 11)
CHOICES = ("A", "B", "C")
# What a re-ask adds after the unparsable reply. A different conversation, so a request
# cache cannot hand back the same reply.
REASK = {
    "factuality": "Your reply did not give the rating in the required form. Give your rating again: "
                  "a whole number from 1 to 10, written strictly as [[n]], for example [[7]].",
    "readability": "Your reply did not give the verdict in the required form. Give your verdict again, "
                   "written strictly as [[A]], [[B]] or [[C]].",
}
# Readability verdicts, from the rewrite's side: A is the first answer shown.
OUTCOME_ORIGINAL_FIRST = {"A": "loss", "B": "win", "C": "tie"}
OUTCOME_REWRITE_FIRST = {"A": "win", "B": "loss", "C": "tie"}
OUTCOMES = ("win", "tie", "loss")

Original = namedtuple("Original", "id index task question response evidence")
Rewritten = namedtuple("Rewritten", "id index task response tag reject_reason merged reformat", defaults=(None, None))
JudgeItem = namedtuple("JudgeItem", "id line question original rewrite reference")


# -- pairing and free measures ------------------------------------------------------------

def slim_originals(records):
    """The fields evaluation needs of each original record (a waiting record costs only these)."""
    for index, record in enumerate(records):
        first, second = record["items"][0], record["items"][1]
        evidence = first.get("evidence")
        yield Original(record["id"], index, first.get("category"), first["value"], second["value"],
                       tuple(evidence) if isinstance(evidence, list) else ())


def optional_string(record, field, path, index):
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        raise InputError(f"{path}: record {index} (id {record['id']!r}): field {field!r} must be a string")
    return value


def slim_rewrites(records, path):
    for index, record in enumerate(records):
        yield Rewritten(record["id"], index, record["items"][0].get("category"), record["items"][1]["value"],
                        optional_string(record, "tag", path, index),
                        optional_string(record, "reject_reason", path, index))


def pair_by_id(originals, rewrites, unpaired):
    """Yield ``(original, rewritten)`` with the same id, reading both streams in step.

    Both files normally list the ids in the same order, so a pair is complete as soon as
    both halves are read; a record whose partner is not read yet waits in a dict (the
    cost of files in different orders). At the end ``unpaired`` holds the records found
    in one file only: ``{"original": [...], "rewritten": [...]}``.
    """
    waiting = ({}, {})  # id -> record read from that side, partner not met yet
    streams = [iter(originals), iter(rewrites)]
    while any(streams):
        for side, stream in enumerate(streams):
            if stream is None:
                continue
            record = next(stream, None)
            if record is None:
                streams[side] = None
                continue
            partner = waiting[1 - side].pop(record.id, None)
            if partner is None:
                waiting[side][record.id] = record
            else:
                yield (record, partner) if side == 0 else (partner, record)
    unpaired["original"] = list(waiting[0].values())
    unpaired["rewritten"] = list(waiting[1].values())


def unpaired_message(left_out, path, other_path):
    shown = ", ".join(f"record {r.index} (id {r.id!r})" for r in left_out[:SHOWN_IDS])
    more = ", ..." if len(left_out) > SHOWN_IDS else ""
    return f"{path}: {len(left_out):,} record(s) whose id is not in {other_path}: {shown}{more}"


def task_of(original, rewritten):
    task = original.task if isinstance(original.task, str) else rewritten.task
    return task if isinstance(task, str) else NO_TASK


def texts_to_check(pair):
    """find_problems' arguments for an ``(Original, Rewritten)`` pair, or None where the
    checks need not run (realign.quality.texts_to_check: the stamp is the merged record's)."""
    original, rewritten = pair
    note = rewritten.reformat if isinstance(rewritten.reformat, dict) else {}
    return quality_texts(rewritten.response, original.response, original.question, original.evidence,
                         task_of(original, rewritten), note.get("checks_passed"))


def measure_pairs(pairs, count_lengths=None, threshold=REWRITE_THRESHOLD, on_record=None, processes=1):
    """``{task: MeasureStats}`` of ``(Original, Rewritten)`` pairs.

    Lengths are word counts, or ``count_lengths(texts)`` (one call per batch) when given;
    the edit rate is always in words; the quality checks run in ``processes`` processes
    (realign.quality.checked_batches). ``on_record(entry, original, rewritten)`` gets each
    record's JSON entry.
    """
    stats = defaultdict(MeasureStats)
    for batch, found in checked_batches(batched(pairs, RECORDS_PER_BATCH), texts_to_check, processes):
        counted = None
        if count_lengths is not None:
            counted = count_lengths([o.response for o, _ in batch] + [r.response for _, r in batch])
        for j, (original, rewritten) in enumerate(batch):
            task = task_of(original, rewritten)
            changed = original.response != rewritten.response
            before_words, after_words = split_words(original.response), split_words(rewritten.response)
            rate = edit_rate_of_words(before_words, after_words) if changed else 0.0
            rewrote = is_rewritten(rate, threshold)
            if counted is None:
                length_before, length_after = len(before_words), len(after_words)
            else:
                length_before, length_after = counted[j], counted[len(batch) + j]
            problems = found[j]
            stats[task].add(rate, rewrote, changed, length_before, length_after,
                            rewritten.tag, rewritten.reject_reason, problems)
            if on_record is not None:
                entry = {"id": original.id, "task": task, "edit_rate": round(rate, 4), "rewritten": rewrote,
                         "changed": changed, "length_before": length_before, "length_after": length_after,
                         "tag": rewritten.tag}
                if rewritten.reject_reason is not None:
                    entry["reject_reason"] = rewritten.reject_reason
                if problems:
                    entry["checks"] = problems
                on_record(entry, original, rewritten)
    return dict(stats)


def group_of_task():
    return {task: group for group, tasks in TASK_GROUPS.items() for task in tasks}


def summarize(task_stats):
    """``{"overall", "groups", "tasks"}`` summaries; groups in TASK_GROUPS order, tasks by size."""
    groups = group_of_task()
    by_group = defaultdict(list)
    for task, stats in task_stats.items():
        by_group[groups.get(task, NO_GROUP)].append(stats)
    group_order = [g for g in (*TASK_GROUPS, NO_GROUP) if g in by_group]
    tasks = sorted(task_stats, key=lambda t: (-task_stats[t].records, t))
    overall = MeasureStats.merged(task_stats.values())
    return {
        "overall": overall.summary(),
        "groups": {g: MeasureStats.merged(by_group[g]).summary() for g in group_order},
        "tasks": {t: {"group": groups.get(t, NO_GROUP), **task_stats[t].summary()} for t in tasks},
    }, overall


def with_merged(rewrites, merged_path, unpaired):
    """The rewrites of the final file, each with the model's rewrite from the merged file
    (``merged``): what the filter chose from, also where it kept the original."""
    merged = (Rewritten(r["id"], index, None, r["items"][1]["value"], None, None, None, r.get("reformat"))
              for index, r in enumerate(iter_records(merged_path, require_response=True)))
    for final, model in pair_by_id(rewrites, merged, unpaired):
        yield final._replace(merged=model.response, reformat=model.reformat)


def measure_files(original_path, rewritten_path, count_lengths=None, allow_unpaired=False,
                  threshold=REWRITE_THRESHOLD, on_record=None, rewrite_directory=None, merged_path=None,
                  processes=1):
    """The free measures of two files: ``(summary, overall MeasureStats)``.

    ``summary`` holds "inputs", "unpaired", "overall", "groups" and "tasks" (see
    :func:`headline`). Raises :class:`InputError` on a malformed record, on ids found in
    one file only (unless ``allow_unpaired``) and when no record pairs.
    """
    unpaired = {}
    originals = slim_originals(iter_records(original_path, require_response=True))
    rewrites = slim_rewrites(iter_records(rewritten_path, require_response=True), rewritten_path)
    unpaired_merged = {}
    if merged_path:
        rewrites = with_merged(rewrites, merged_path, unpaired_merged)
    task_stats = measure_pairs(pair_by_id(originals, rewrites, unpaired), count_lengths, threshold, on_record,
                               processes)
    if merged_path and (unpaired_merged["original"] or unpaired_merged["rewritten"]):
        left, path, other = ((unpaired_merged["original"], rewritten_path, merged_path) if unpaired_merged["original"]
                             else (unpaired_merged["rewritten"], merged_path, rewritten_path))
        raise InputError(unpaired_message(left, path, other) + "; the files must come from the same run")
    for side, path, other in (("original", original_path, rewritten_path),
                              ("rewritten", rewritten_path, original_path)):
        if unpaired[side]:
            message = unpaired_message(unpaired[side], path, other)
            if not allow_unpaired:
                raise InputError(f"{message}; the two files must come from the same run (or pass --allow_unpaired)")
            logger.warning("%s; left out (--allow_unpaired)", message)
    if not task_stats:
        raise InputError(f"{original_path}: no record to evaluate (no id is in both files)")
    tables, overall = summarize(task_stats)
    summary = {
        "inputs": {"original_path": original_path, "rewritten_path": rewritten_path,
                   "length_unit": getattr(count_lengths, "unit", "words"), "rewrite_threshold": threshold},
        "unpaired": {"only_in_original": len(unpaired["original"]),
                     "only_in_rewritten": len(unpaired["rewritten"])},
        **tables,
    }
    if rewrite_directory:
        summary["candidate_checks"] = read_candidate_checks(rewrite_directory)
    return summary, overall


def read_candidate_checks(directory):
    """What reformat's checks found among the candidates, added up over the batch files of
    ``directory`` (their lines' ``candidate_checks``): ``{"records", "candidates", "rejected",
    "kept_original"}``."""
    from realign import find_batch_files, read_progress_lines

    _, batches = find_batch_files(directory)
    totals = {"records": 0, "candidates": 0, "failing": 0, "problems": Counter(), "kept_original": 0}
    lines = (entry for path in batches.values() for entry in read_progress_lines(path)[0].values())
    for entry in lines:  # a rerun appends a record's line again: its last line counts
        checks, status = entry.get("candidate_checks"), entry.get("status")
        if not isinstance(checks, dict):
            continue
        totals["records"] += 1
        totals["candidates"] += int(checks.get("candidates") or 0)
        totals["failing"] += int(checks.get("failing") or 0)
        totals["problems"].update({k: int(v) for k, v in (checks.get("problems") or {}).items()})
        totals["kept_original"] += status == "rejected"
    totals["problems"] = dict(totals["problems"].most_common())
    return totals


def checks_headline(summary):
    """The headline's part on the quality checks (realign/quality.py), e.g. ``checks: 22 of 98
    candidates failed (3 records kept the original), 11 rewrites rejected by a check, 0 kept
    rewrites fail one``."""
    overall = summary["overall"]
    parts = []
    candidates = summary.get("candidate_checks")
    if candidates:
        kept = candidates["kept_original"]
        parts.append(f"{candidates['failing']:,} of {candidates['candidates']:,} candidates failed "
                     f"({kept:,} {plural(kept, 'record')} kept the original)")
    rejected = sum(n for reason, n in overall["reject_reasons"].items() if reason in TEXT_CHECKS)
    if overall["reject_reasons"] or overall["tags"].get("original"):
        parts.append(f"{rejected:,} rewrites rejected by a check")
    parts.append(f"{overall['failing_checks']:,} kept rewrites fail one")
    return "checks: " + ", ".join(parts)


def percent(share, digits=1):
    return "n/a" if share is None else f"{100 * share:.{digits}f}%"


def headline(summary):
    """One line for logs and run_pipeline.py, e.g.
    ``rewritten 29.9% (edit rate > 0.2) of 52,002; mean length 65.5 -> 72.4 words; changed 31.2%``."""
    overall = summary["overall"]
    threshold = summary["inputs"]["rewrite_threshold"]
    parts = [
        (f"substantially rewritten {percent(overall['share_rewritten'])} (edit rate > {threshold:g}) of "
         f"{overall['records']:,}"),
        (f"mean length {overall['length_before']['mean']:.1f} -> {overall['length_after']['mean']:.1f} "
         f"{summary['inputs']['length_unit']}"),
        f"changed {percent(overall['share_changed'])}",
        checks_headline(summary),
    ]
    judges = summary.get("judges", {})
    factuality = judges.get("factuality")
    if factuality and factuality["scored"]:
        parts.append(f"factuality {factuality['mean_original']:.2f} -> {factuality['mean_rewrite']:.2f} "
                     f"({factuality['scored']:,} judged)")
    readability = judges.get("readability")
    if readability and readability["counted"]:
        parts.append(f"readability win/tie/loss {percent(readability['win_share'], 0)}/"
                     f"{percent(readability['tie_share'], 0)}/{percent(readability['loss_share'], 0)}")
    return "; ".join(parts)


# -- judges: prompts, verdicts, sampling --------------------------------------------------

def chat(judge, **fields):
    prompt = JUDGE_PROMPTS[judge]
    return [{"role": "system", "content": prompt["system"]},
            {"role": "user", "content": prompt["user"].format(**fields)}]


def build_factuality_messages(question, reference, answer):
    """The chat messages asking the judge to rate ``answer`` 1-10 against ``reference``."""
    return chat("factuality", question=question, reference=reference, answer=answer)


def build_readability_messages(question, answer_a, answer_b):
    """The chat messages asking which of two answers reads better ([[A]], [[B]] or [[C]])."""
    return chat("readability", question=question, answer_a=answer_a, answer_b=answer_b)


def build_reask_messages(messages, reply, judge):
    """The first request again, followed by the unparsable reply and a request for the verdict."""
    return [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": REASK[judge]}]


def parse_score(reply):
    """The last ``[[n]]`` of a reply as an int 1..10; None when there is none or it is out of range."""
    found = SCORE_RE.findall(reply or "")
    if not found:
        return None
    score = int(found[-1])
    return score if score in SCORES else None


def parse_choice(reply):
    """The last ``[[A]]``/``[[B]]``/``[[C]]`` of a reply; None when there is none or it is another letter."""
    found = CHOICE_RE.findall(reply or "")
    if not found:
        return None
    choice = found[-1].upper()
    return choice if choice in CHOICES else None


PARSERS = {"factuality": parse_score, "readability": parse_choice}


def combine_orders(original_first, rewrite_first):
    """``(outcome, consistent)`` of the rewrite from the verdicts of both orders.

    ``original_first`` is the verdict when the original is answer A, ``rewrite_first``
    when the rewrite is. The same outcome in both orders stands; any other pair (one that
    flips with the order, or a win against a tie) is a tie and not consistent.
    """
    first, second = OUTCOME_ORIGINAL_FIRST[original_first], OUTCOME_REWRITE_FIRST[rewrite_first]
    return (first, True) if first == second else ("tie", False)


# -- judges: the requests, through the request engine --------------------------------------

def status_of(*answers):
    """The status of a record from those of its requests: any failure marks the record."""
    statuses = {answer["status"] for answer in answers}
    for status in ("no_reply", "unparsed"):
        if status in statuses:
            return status
    return "ok"


class Judging:
    """The judges' requests, built one sampled record at a time (nothing else is held), and
    their results: ``results[judge][spool line]``. A reply without a well-formed verdict is
    asked again (the first conversation, the reply and a request for the verdict) up to
    ``max_retries`` times, then counted apart as unparsed; no reply at all is ``no_reply``."""

    def __init__(self, judges, sampling, max_retries):
        self.sampling = sampling
        self.max_retries = max_retries
        self.results = {judge: {} for judge in judges}

    def requests(self, items):
        """The requests of ``items``, an iterable of ``(judge, JudgeItem)`` read lazily."""
        for judge, item in items:
            yield from (self.factuality if judge == "factuality" else self.readability)(item)

    def factuality(self, item):
        """Rate the original and the rewrite (once when they are the same text)."""
        sides = ("original",) if item.original == item.rewrite else ("original", "rewrite")
        answers = {}

        def settle(side, answer):
            answers[side] = answer
            if len(answers) < len(sides):
                return
            original, rewrite = answers["original"], answers.get("rewrite", answers["original"])
            result = {"original": original["verdict"], "rewrite": rewrite["verdict"],
                      "status": status_of(original, rewrite),
                      "asks": original["asks"] + (rewrite["asks"] if len(sides) == 2 else 0)}
            if len(sides) == 1:
                result["identical"] = True
            self.results["factuality"][item.line] = result

        for side in sides:
            messages = build_factuality_messages(item.question, item.reference, getattr(item, side))
            yield self.verdict_request(messages, "factuality", lambda answer, side=side: settle(side, answer))

    def readability(self, item):
        """Compare the original and the rewrite in both orders (a tie without asking when they
        are the same text)."""
        if item.original == item.rewrite:
            self.results["readability"][item.line] = {"outcome": "tie", "consistent": True, "identical": True,
                                                      "status": "ok", "asks": 0}
            return
        answers = {}

        def settle(order, answer):
            answers[order] = answer
            if len(answers) < 2:
                return
            first, second = answers["original_first"], answers["rewrite_first"]
            result = {"original_first": first["verdict"], "rewrite_first": second["verdict"],
                      "status": status_of(first, second), "asks": first["asks"] + second["asks"]}
            if result["status"] == "ok":
                result["outcome"], result["consistent"] = combine_orders(first["verdict"], second["verdict"])
            self.results["readability"][item.line] = result

        yield self.verdict_request(build_readability_messages(item.question, item.original, item.rewrite),
                                   "readability", lambda answer: settle("original_first", answer))
        yield self.verdict_request(build_readability_messages(item.question, item.rewrite, item.original),
                                   "readability", lambda answer: settle("rewrite_first", answer))

    def verdict_request(self, messages, judge, settle, asks=1, first=None):
        """The request of one verdict; ``settle({"verdict", "status", "asks"})`` once it is known.
        ``first``: the first conversation, which every re-ask repeats."""
        first = first or messages

        def on_reply(reply):
            text = reply_text(reply)
            verdict = PARSERS[judge](text) if text is not None else None
            if verdict is not None or text is None or asks > self.max_retries:
                status = "ok" if verdict is not None else "no_reply" if text is None else "unparsed"
                settle({"verdict": verdict, "status": status, "asks": asks})
                return text is not None
            return self.verdict_request(build_reask_messages(first, text, judge), judge, settle, asks + 1, first)

        def on_error(error):
            logger.warning("a judge request got no reply: %s", error)
            settle({"verdict": None, "status": "no_reply", "asks": asks})

        return Request({"messages": messages, **self.sampling.fields()}, on_reply, on_error,
                       expected_output=JUDGE_EXPECTED_TOKENS)


def judge_sampling(args):
    effort, is_default = default_reasoning_effort(args.judge_model, args.reasoning_effort)
    return Sampling(model=args.judge_model, n=1, temperature=0.0, max_output_tokens=JUDGE_MAX_TOKENS,
                    reasoning_effort=effort, service_tier=args.service_tier, extra_body=dict(args.extra_body or {}),
                    effort_is_default=is_default)


def send_judge_requests(args, judging, items):
    """The judges' requests through the request engine (one chat request each, temperature
    0, at most --concurrency at once; retries, pacing, the cache, the spend, --max_cost and
    the dry run are the engine's); its Usage."""
    api_key = None if args.dry_run else resolve_api_key(None, args.base_url)
    cache = open_cache(args)
    transport = OpenAITransport(args.base_url, api_key, model=args.judge_model, timeout=args.request_timeout,
                                check_model=args.model_check, effort_is_default=judging.sampling.effort_is_default)
    options = options_from_args(args, cache=cache, price=price_of_run(args, args.judge_model),
                                limits_key=transport.limits_key,
                                completion_note=f"about {JUDGE_EXPECTED_TOKENS} tokens a verdict")
    try:
        return send_requests(judging.requests(items), transport, options, "evaluate (judges)")
    finally:
        if cache is not None:
            cache.close()


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize_factuality(results, eligible, model):
    """Means of the records whose two answers were both scored; statuses counted apart."""
    scored = [r for r in results.values() if r["status"] == "ok"]
    statuses = Counter(r["status"] for r in results.values())
    differences = [r["rewrite"] - r["original"] for r in scored]
    return {
        "model": model,
        "eligible": eligible,
        "sampled": len(results),
        "scored": len(scored),
        "unparsed": statuses["unparsed"],
        "no_reply": statuses["no_reply"],
        "identical": sum(1 for r in results.values() if r.get("identical")),
        "mean_original": _mean([r["original"] for r in scored]),
        "mean_rewrite": _mean([r["rewrite"] for r in scored]),
        "mean_difference": _mean(differences),
        "rewrite_higher": sum(1 for d in differences if d > 0),
        "equal": sum(1 for d in differences if d == 0),
        "rewrite_lower": sum(1 for d in differences if d < 0),
        "scores_original": {str(s): sum(1 for r in scored if r["original"] == s) for s in SCORES},
        "scores_rewrite": {str(s): sum(1 for r in scored if r["rewrite"] == s) for s in SCORES},
    }


def summarize_readability(results, eligible, model):
    """Win / tie / loss of the rewrite over the pairs with both verdicts; consistency over the
    pairs actually asked (identical pairs are ties that were never asked)."""
    counted = [r for r in results.values() if r["status"] == "ok"]
    asked = [r for r in counted if not r.get("identical")]
    outcomes = Counter(r["outcome"] for r in counted)
    statuses = Counter(r["status"] for r in results.values())
    consistent = sum(1 for r in asked if r["consistent"])
    summary = {"model": model, "eligible": eligible, "sampled": len(results), "counted": len(counted)}
    for outcome in OUTCOMES:
        summary[outcome] = outcomes[outcome]
    for outcome in OUTCOMES:
        summary[f"{outcome}_share"] = outcomes[outcome] / len(counted) if counted else None
    summary.update({
        "identical": len(counted) - len(asked),
        "consistent": consistent,
        "consistent_share": consistent / len(asked) if asked else None,
        "unparsed": statuses["unparsed"],
        "no_reply": statuses["no_reply"],
    })
    return summary


SUMMARIZERS = {"factuality": summarize_factuality, "readability": summarize_readability}


# -- report and charts --------------------------------------------------------------------

def number(value, digits=1):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def cell(text):
    return str(text).replace("|", "\\|")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def breakdown_row(name, stats):
    ratios = stats["ratio_distribution"]
    return [name, f"{stats['records']:,}", percent(stats["share_rewritten"]), percent(stats["share_changed"]),
            number(stats["length_before"]["mean"]), number(stats["length_after"]["mean"]),
            number(stats["length_ratio"], 2), number(ratios["median"], 2)]


def render_report(summary, plot_link=None):
    """The Markdown report: headline, overall table, groups, tasks, tags and reasons, judges."""
    inputs, overall, unit = summary["inputs"], summary["overall"], summary["inputs"]["length_unit"]
    threshold = inputs["rewrite_threshold"]
    ratios = overall["ratio_distribution"]
    parts = [
        "# ReAlign evaluation",
        f"**{summary['headline']}**",
        (f"Originals `{inputs['original_path']}`, rewrites `{inputs['rewritten_path']}`, paired by id. "
         f"A response counts as rewritten when its word-level edit distance divided by the longer length is "
         f"above {threshold:g} (the paper's rule); lengths are counted in {unit}."),
    ]
    unpaired = summary["unpaired"]
    if unpaired["only_in_original"] or unpaired["only_in_rewritten"]:
        parts.append(f"Left out (--allow_unpaired): {unpaired['only_in_original']:,} record(s) only in the "
                     f"originals, {unpaired['only_in_rewritten']:,} only in the rewrites.")
    if plot_link:
        parts.append(f"![charts]({plot_link})")
    parts += ["## Overall", table(["measure", "value"], [
        ["records", f"{overall['records']:,}"],
        [f"substantially rewritten (edit rate > {threshold:g})",
         f"{overall['rewritten']:,} ({percent(overall['share_rewritten'])})"],
        ["changed at all", f"{overall['changed']:,} ({percent(overall['share_changed'])})"],
        ["mean edit rate", number(overall["mean_edit_rate"], 3)],
        [f"mean length before -> after ({unit})",
         f"{number(overall['length_before']['mean'])} -> {number(overall['length_after']['mean'])}"],
        [f"median length before -> after ({unit})",
         f"{number(overall['length_before']['median'])} -> {number(overall['length_after']['median'])}"],
        ["length ratio (mean after / mean before)", number(overall["length_ratio"], 2)],
        ["per-record length ratio: median [p25, p75]",
         f"{number(ratios['median'], 2)} [{number(ratios['p25'], 2)}, {number(ratios['p75'], 2)}]"],
        ["per-record length ratio: p5, p95", f"{number(ratios['p5'], 2)}, {number(ratios['p95'], 2)}"],
    ])]
    header = ["records", "substantially rewritten", "changed", f"mean before ({unit})", "mean after", "length ratio",
              "median ratio"]
    group_rows = [breakdown_row(group, stats) for group, stats in summary["groups"].items()]
    parts += ["## By task group", table(["group", *header], group_rows)]
    parts += ["## By task", table(["task", "group", *header], [
        [task, stats["group"], *breakdown_row(task, stats)[1:]] for task, stats in summary["tasks"].items()])]
    records = overall["records"]
    parts += ["## The filter's choices and reject reasons",
              table(["choice (tag)", "records", "share"],
                    [[CHOICE_WORDS.get(tag, tag), f"{n:,}", percent(n / records)] for tag, n in overall["tags"].items()])]
    if overall["reject_reasons"]:
        parts.append(table(["reject reason", "records", "share"],
                           [[r, f"{n:,}", percent(n / records)] for r, n in overall["reject_reasons"].items()]))
    parts += ["## Quality checks", checks_table(summary)]
    judges = summary.get("judges", {})
    if judges:
        parts.append("## Judges")
    if "factuality" in judges:
        f = judges["factuality"]
        parts += [
            f"### Factuality (judge {f['model']}, 1-10 against the reference)",
            table(["", "original", "rewrite"], [
                ["mean score", number(f["mean_original"], 2), number(f["mean_rewrite"], 2)],
            ]),
            table(["measure", "value"], [
                ["records with a reference", f"{f['eligible']:,}"],
                ["sampled", f"{f['sampled']:,}"],
                ["both answers scored", f"{f['scored']:,}"],
                ["mean difference (rewrite - original)", number(f["mean_difference"], 2)],
                ["rewrite higher / equal / lower",
                 f"{f['rewrite_higher']:,} / {f['equal']:,} / {f['rewrite_lower']:,}"],
                ["identical texts (asked once)", f"{f['identical']:,}"],
                ["unparsed after re-asking", f"{f['unparsed']:,}"],
                ["no reply", f"{f['no_reply']:,}"],
            ]),
        ]
    if "readability" in judges:
        r = judges["readability"]
        parts += [
            f"### Readability (judge {r['model']}, rewrite vs original, both orders)",
            table(["win", "tie", "loss", "pairs", "consistent pairs"], [[
                f"{r['win']:,} ({percent(r['win_share'])})", f"{r['tie']:,} ({percent(r['tie_share'])})",
                f"{r['loss']:,} ({percent(r['loss_share'])})", f"{r['counted']:,}",
                f"{r['consistent']:,} ({percent(r['consistent_share'])})"]]),
            (f"Sampled {r['sampled']:,} of {r['eligible']:,}; a verdict that flips with the order counts as a tie; "
             f"{r['identical']:,} identical pair(s) counted as ties without asking (left out of the consistency "
             f"share); {r['unparsed']:,} unparsed after re-asking, {r['no_reply']:,} without a reply."),
        ]
    return "\n\n".join(parts) + "\n"


def checks_table(summary):
    """Per check: the candidates that failed it (reformat), the rewrites the filter rejected
    for it, and the kept rewrites that still fail it."""
    candidates = summary.get("candidate_checks")
    overall = summary["overall"]
    rows = []
    for name in TEXT_CHECKS if candidates is None else ("cut_off", "unparsable", *TEXT_CHECKS):
        rows.append([name, f"{candidates['problems'].get(name, 0):,}" if candidates else "n/a",
                     f"{overall['reject_reasons'].get(name, 0):,}", f"{overall['checks'].get(name, 0):,}"])
    note = (f"Candidates: {candidates['candidates']:,} from reformat's batch files, {candidates['failing']:,} "
            f"failing at least one check; {candidates['kept_original']:,} record(s) kept the original because "
            "none passed." if candidates else "Candidates: not counted (pass --rewrite_directory).")
    return note + "\n\n" + table(["check", "candidates failing", "rewrites rejected", "kept rewrites failing"], rows)


def readable(task):
    return task.replace("_", " ")


def draw_task_panel(ax, summary):
    tasks = sorted(summary["tasks"].items(), key=lambda kv: (-(kv[1]["share_rewritten"] or 0), kv[0]))
    groups = [*TASK_GROUPS, NO_GROUP]
    colors = {g: f"C{i % 10}" for i, g in enumerate(TASK_GROUPS)}
    colors[NO_GROUP] = "#bbbbbb"
    names = [f"{readable(t)}  (n={s['records']:,})" for t, s in tasks]
    shares = [100 * (s["share_rewritten"] or 0) for _, s in tasks]
    positions = range(len(tasks))
    ax.barh(positions, shares, color=[colors[s["group"]] for _, s in tasks])
    ax.set_yticks(list(positions), names, fontsize=9)
    ax.invert_yaxis()
    for y, share in zip(positions, shares):
        ax.text(share + 1, y, f"{share:.1f}%", va="center", fontsize=8)
    overall = 100 * summary["overall"]["share_rewritten"]
    ax.axvline(overall, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, 112)
    ax.set_xlabel("records substantially rewritten (%)")
    threshold = summary["inputs"]["rewrite_threshold"]
    ax.set_title(f"Share substantially rewritten per task (word edit rate > {threshold:g})\n"
                 f"dashed: all records, {overall:.1f}%")
    from matplotlib.patches import Patch

    present = [g for g in groups if any(s["group"] == g for _, s in tasks)]
    ax.legend(handles=[Patch(color=colors[g], label=g) for g in present], title="task group",
              loc="lower right", fontsize=8, title_fontsize=8)


RATIO_LIMIT = 16.0  # the histogram spans 1/16 .. 16; ratios beyond are drawn at the edges


def draw_ratio_panel(ax, summary, overall_stats):
    import math

    rewritten = overall_stats.ratios((REWRITTEN,))
    lightly = overall_stats.ratios((CHANGED,))
    unchanged = summary["overall"]["records"] - summary["overall"]["changed"]
    unit = summary["inputs"]["length_unit"]
    title = f"Length ratio of the changed records (after / before, in {unit})"
    ax.set_title(f"{title}\n{unchanged:,} unchanged record(s), ratio 1, not shown")
    ax.set_xlabel(f"length after / length before ({unit}), log scale")
    ax.set_ylabel("records")
    values = rewritten + lightly
    if not values:
        ax.text(0.5, 0.5, "no changed record", ha="center", va="center", transform=ax.transAxes)
        return
    low, high = 1 / RATIO_LIMIT, RATIO_LIMIT
    span = max(abs(math.log2(max(min(values), low))), abs(math.log2(min(max(values), high))), 1.0)
    edges = [2 ** (-span + 2 * span * i / 40) for i in range(41)]

    def clip(ratios):
        return [min(max(r, edges[0]), edges[-1]) for r in ratios]

    ax.hist([clip(rewritten), clip(lightly)], bins=edges, stacked=True, color=["C0", "C1"],
            label=[f"substantially rewritten (edit rate > {summary['inputs']['rewrite_threshold']:g}): "
                   f"{len(rewritten):,}",
                   f"changed a little: {len(lightly):,}"])
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xscale("log", base=2)
    ax.axvline(1, color="black", linestyle="--", linewidth=1)
    ticks = [2 ** k for k in range(-int(span), int(span) + 1)]
    ax.set_xticks(ticks, [f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
    ax.legend(fontsize=8)


def draw_factuality_panel(ax, f):
    ax.set_title(f"Factuality (judge {f['model']}), {f['scored']:,} record(s) scored\n"
                 f"mean difference {number(f['mean_difference'], 2)}")
    if not f["scored"]:
        ax.text(0.5, 0.5, "no scored record", ha="center", va="center", transform=ax.transAxes)
        return
    values = [f["mean_original"], f["mean_rewrite"]]
    bars = ax.bar(["original", "rewrite"], values, color=["C7", "C0"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.15, f"{value:.2f}", ha="center")
    ax.set_ylim(0, 10.9)
    ax.set_ylabel("mean score (1-10)")


def draw_readability_panel(ax, r):
    ax.set_title(f"Readability (judge {r['model']}): rewrite vs original, {r['counted']:,} pair(s)\n"
                 f"both orders; consistent {percent(r['consistent_share'])}")
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("pairs (%)")
    if not r["counted"]:
        ax.text(0.5, 0.5, "no verdict", ha="center", va="center", transform=ax.transAxes)
        return
    left = 0.0
    for outcome, color in zip(OUTCOMES, ("C2", "C7", "C3")):
        width = 100 * r[f"{outcome}_share"]
        ax.barh([0], [width], left=left, color=color, height=0.5,
                label=f"{outcome}: {r[outcome]:,} ({width:.0f}%)")
        if width >= 6:
            ax.text(left + width / 2, 0, f"{outcome}\n{width:.0f}%", ha="center", va="center", color="white")
        left += width
    ax.set_ylim(-0.5, 0.9)
    ax.legend(loc="upper center", ncols=3, fontsize=8, frameon=False)


def draw_key_figures(ax, summary):
    overall, unit = summary["overall"], summary["inputs"]["length_unit"]
    threshold = summary["inputs"]["rewrite_threshold"]

    def counts(counter):
        return ", ".join(f"{name} {n:,}" for name, n in counter.items()) or "none"

    rows = [
        ("records", f"{overall['records']:,}"),
        (f"substantially rewritten (edit rate > {threshold:g})",
         f"{overall['rewritten']:,} ({percent(overall['share_rewritten'])})"),
        ("changed at all", f"{overall['changed']:,} ({percent(overall['share_changed'])})"),
        (f"mean length ({unit})", (f"{number(overall['length_before']['mean'])} -> "
                                   f"{number(overall['length_after']['mean'])} "
                                   f"(x{number(overall['length_ratio'], 2)})")),
        (f"median length ({unit})",
         f"{number(overall['length_before']['median'])} -> {number(overall['length_after']['median'])}"),
        ("the filter's choices", counts({CHOICE_WORDS.get(tag, tag): n for tag, n in overall["tags"].items()})),
        ("reject reasons", counts(overall["reject_reasons"])),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [label.ljust(width) + value for label, value in rows]
    ax.axis("off")
    ax.set_title("Key figures")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9,
            transform=ax.transAxes, wrap=True)


def render_charts(summary, overall_stats):
    """A matplotlib Figure: tasks on the left; ratios and judge results on the right."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    judges = [j for j in JUDGES if j in summary.get("judges", {})]
    heights = [4.0] + [3.2] * len(judges) + [2.2]  # ratios, judges, key figures (inches)
    height = max(0.26 * len(summary["tasks"]) + 2.2, sum(heights) + 0.6)
    figure = Figure(figsize=(16, height), layout="constrained")
    grid = figure.add_gridspec(len(heights), 2, width_ratios=[1.15, 1], height_ratios=heights)
    draw_task_panel(figure.add_subplot(grid[:, 0]), summary)
    draw_ratio_panel(figure.add_subplot(grid[0, 1]), summary, overall_stats)
    for row, judge in enumerate(judges, 1):
        draw = draw_factuality_panel if judge == "factuality" else draw_readability_panel
        draw(figure.add_subplot(grid[row, 1]), summary["judges"][judge])
    draw_key_figures(figure.add_subplot(grid[-1, 1]), summary)
    figure.suptitle(textwrap.fill(summary["headline"], 150), fontsize=11)  # 150 characters fit 16 inches
    return figure


# -- writing ------------------------------------------------------------------------------

def write_text_atomic(path, text):
    write_atomic(path, lambda f: f.write(text))


def write_bytes_atomic(path, data):
    write_atomic(path, lambda f: f.write(data), binary=True)


def png_bytes(figure):
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_output(path, document, spool, verdicts):
    """The JSON output: ``document``'s figures, then "records", one compact line each, copied
    from ``spool`` (with the verdicts of judged lines added)."""
    def write(f):
        head = json.dumps(document, indent=4, ensure_ascii=False)
        f.write(head[:-2] + ',\n    "records": [')  # head ends with "\n}"
        spool.seek(0)
        separator = "\n        "
        for line_number, line in enumerate(spool):
            line = line.rstrip("\n")
            if line_number in verdicts:
                entry = json.loads(line)
                entry.update(verdicts[line_number])
                line = json.dumps(entry, ensure_ascii=False)
            f.write(separator + line)
            separator = ",\n        "
        f.write("\n    ]\n}\n")

    write_atomic(path, write)


# -- command line -------------------------------------------------------------------------

def rate_threshold(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def parse_args(argv=None):
    parser = ArgumentParser(description="Measure what ReAlign did to a dataset (the paper's measures).")
    parser.add_argument("--original_path", "--input_data_path", "--input_original_data_path", dest="original_path",
                        required=True,
                        help="the stage-3 input: the original records (JSON list or JSONL)")
    parser.add_argument("--rewritten_path", "--input_rewrite_data_path", dest="rewritten_path", required=True,
                        help="final.json of rewrite_data_selection.py (or the merged file); paired by id")
    parser.add_argument("--output_path", default=None, help="JSON to write: every figure and one entry per record (default: not written)")
    parser.add_argument("--report_path", default=None, help="Markdown report to write (default: not written)")
    parser.add_argument("--plot_path", default=None, help="PNG to write: one image with all the charts (default: not written)")
    parser.add_argument("--html_path", default=None,
                        help="HTML page to write: the figures, the charts and a sample of the records, original and "
                             "rewrite side by side; one file, opened from disk with no network (default: not written)")
    parser.add_argument("--merged_path", default=None,
                        help="the merged file of parallel_data_merge.py, paired by id: the page then shows the "
                             "rewrites the filter rejected too (default: none)")
    parser.add_argument("--html_sample", type=positive_int, default=PER_TASK,
                        help=f"records of each task on the page, a sample drawn with --seed (default: {PER_TASK})")
    parser.add_argument("--html_flagged", type=non_negative_int, default=MAX_FLAGGED,
                        help="records on the page, beyond the sample, that a quality check flagged or the filter "
                             f"rejected (default: at most {MAX_FLAGGED:,})")
    parser.add_argument("--tokenizer_path", default=None,
                        help="Hugging Face tokenizer to count lengths in tokens; edit rates stay in words (default: none, lengths "
                             "in words)")
    parser.add_argument("--rewrite_directory", default=None,
                        help="the folder of reformat.py's batch files: also count what the quality checks found "
                             "among the candidates (default: not counted)")
    parser.add_argument("--rewrite_threshold", type=rate_threshold, default=REWRITE_THRESHOLD,
                        help=f"edit rate above which a response counts as rewritten (default {REWRITE_THRESHOLD}, "
                             "the paper's)")
    parser.add_argument("--processes", type=positive_int, default=default_processes(),
                        help="processes that run the quality checks of a large file (default: the CPUs this process "
                             "may use, here %(default)s)")
    parser.add_argument("--allow_unpaired", action=argparse.BooleanOptionalAction, default=False,
                        help="measure the paired records when some ids are in one file only (default: exit 2)")
    parser.add_argument("--judge", action="append", choices=JUDGES, default=[],
                        help="add a model judge (repeatable): factuality (needs --reference_path), readability (default: "
                             "none)")
    parser.add_argument("--judge_model", default=DEFAULT_JUDGE_MODEL,
                        help=f"judge model (default {DEFAULT_JUDGE_MODEL}; the paper judged with GPT-4)")
    parser.add_argument("--reference_path", default=None,
                        help="records whose items[1].value is the reference answer, paired by id (factuality; default: none)")
    parser.add_argument("--judge_sample", type=positive_int, default=None,
                        help="judge a seeded random sample of this many records (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --judge_sample and of the records on the --html_path page (default: 0)")
    parser.add_argument("--max_judge_retries", type=non_negative_int, default=2,
                        help="re-ask a reply without a well-formed verdict this many times, then count it "
                             "apart (default 2)")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False, help="log debug messages (default: off)")
    add_client_arguments(parser, default_concurrency=16)
    args = parser.parse_args(argv)
    finish_client_arguments(parser, args)
    args.judge = list(dict.fromkeys(args.judge))
    if "factuality" in args.judge and not args.reference_path:
        parser.error("--judge factuality needs --reference_path (the reference answers)")
    return args


def load_references(path):
    """``{id: reference answer}``: items[1].value of each record of ``path``."""
    return {record["id"]: record["items"][1]["value"] for record in iter_records(path, require_response=True)}


def plot_link(report_path, plot_path):
    """The chart's path relative to the report's folder, for the Markdown image link."""
    if not plot_path:
        return None
    report_dir = os.path.dirname(os.path.abspath(report_path))
    return os.path.relpath(os.path.abspath(plot_path), report_dir).replace(os.sep, "/")


def check_paths(args):
    outputs = [p for p in (args.output_path, args.report_path, args.plot_path, args.html_path) if p]
    if len({os.path.realpath(p) for p in outputs}) < len(outputs):
        raise InputError("--output_path, --report_path, --plot_path and --html_path must be different files")
    for path in (args.original_path, args.rewritten_path, args.merged_path, args.reference_path):
        if path:
            refuse_overwriting_input(path, *outputs)


def page_record(entry, original, rewritten):
    """What the HTML page shows of a record: the model's rewrite (from the merged file, also
    where the filter kept the original) against the original, with its edit rate, lengths
    and the quality checks it fails."""
    shown = rewritten.merged if rewritten.merged is not None else rewritten.response
    record = {"id": original.id, "task": entry["task"], "question": original.question,
              "original": original.response, "rewrite": shown, "tag": rewritten.tag,
              "reject_reason": rewritten.reject_reason, "evidence": list(original.evidence),
              "edit_rate": entry["edit_rate"], "length_before": entry["length_before"],
              "length_after": entry["length_after"], "substantially_rewritten": entry["rewritten"],
              "checks": entry.get("checks", [])}
    if shown != rewritten.response:  # the filter kept the original: describe the rejected rewrite
        before, after = split_words(original.response), split_words(shown)
        rate = edit_rate_of_words(before, after) if shown != original.response else 0.0
        record.update(edit_rate=round(rate, 4), length_after=len(after), substantially_rewritten=is_rewritten(rate),
                      checks=find_problems(shown, original.response, original.question, original.evidence,
                                           entry["task"]))
        if record["length_before"] != len(before):  # lengths in tokens: the page's pair in words
            record["length_before"] = len(before)
    note = rewritten.reformat
    if isinstance(note, dict):  # reformat kept the original: what its candidates failed
        record["checks"] = sorted((note.get("candidate_checks") or {}).get("problems") or {})
        record["reformat_reason"] = note.get("reason")
    return record


def show_unused_replies(records, directory):
    """For the page's records whose original reformat kept (no candidate passed the checks),
    the first reply it did not use, from the unused-replies files beside the batch files:
    the page then shows what the model wrote and which checks it failed."""
    from reformat import parse_revised_response
    from realign import find_batch_files, iter_progress
    from realign.records import BATCH_FILE_RE, unused_replies_path

    wanted = {json.dumps(r["id"]): r for r in records if r.get("reformat_reason")}
    if not wanted:
        return
    _, batches = find_batch_files(directory)
    for path in batches.values():
        batch_id, batch_num = BATCH_FILE_RE.fullmatch(os.path.basename(path)).groups()
        for entry in iter_progress(unused_replies_path(directory, batch_id, batch_num)):
            record = wanted.pop(json.dumps(entry.get("id")), None) if isinstance(entry, dict) else None
            if record is None or not isinstance(entry.get("reply"), str):
                continue
            parsed = parse_revised_response(entry["reply"])
            shown = parsed["revised_response"] if parsed else entry["reply"]
            before, after = split_words(record["original"]), split_words(shown)
            rate = edit_rate_of_words(before, after)
            record.update(rewrite=shown, checks=list(entry.get("problems") or []), edit_rate=round(rate, 4),
                          length_after=len(after), substantially_rewritten=is_rewritten(rate))
            record["reformat_reason"] += " (shown: the first reply it did not use)"


def judged_items(args, references, chosen):
    """``(judge, JudgeItem)`` of the records to judge, streamed from the two files again (a
    second pass: only the sampled lines are built; ``chosen[judge]`` None judges them all)."""
    originals = slim_originals(iter_records(args.original_path, require_response=True))
    rewrites = slim_rewrites(iter_records(args.rewritten_path, require_response=True), args.rewritten_path)
    for line, (original, rewritten) in enumerate(pair_by_id(originals, rewrites, {})):
        for judge in args.judge:
            reference = references.get(original.id)
            if judge == "factuality" and reference is None:
                continue
            if chosen[judge] is None or line in chosen[judge]:
                yield judge, JudgeItem(original.id, line, original.question, original.response, rewritten.response,
                                       reference)


def judge_samples(args, eligible, samplers, references, summary):
    """Run the judges; add their figures to ``summary["judges"]`` and return ``{spool line:
    {judge: result}}`` for the per-record entries (None for a dry run)."""
    if "factuality" in args.judge and not eligible["factuality"]:
        raise InputError(f"{args.reference_path}: no id in common with {args.original_path}")
    chosen = {judge: set(sampler.items()) if sampler else None for judge, sampler in samplers.items()}
    logger.info("judging with %s: %s", args.judge_model,
                ", ".join(f"{judge} {len(lines) if lines is not None else eligible[judge]:,} record(s)"
                          for judge, lines in chosen.items()))
    judging = Judging(args.judge, judge_sampling(args), args.max_judge_retries)
    usage = send_judge_requests(args, judging, judged_items(args, references, chosen))
    usage.write(args.usage_path)
    if args.dry_run:
        for line in usage.dry.lines(extra=f"judge model {args.judge_model}"):
            print(line)
        return None
    logger.info("judges: %s", usage.describe())
    usage.finish("the request cache")
    summary["judges"], verdicts = {}, defaultdict(dict)
    for judge, by_line in judging.results.items():
        summary["judges"][judge] = SUMMARIZERS[judge](by_line, eligible[judge], args.judge_model)
        for line, result in by_line.items():
            verdicts[line][judge] = result
    return verdicts


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    check_constants()
    check_paths(args)
    if args.reference_path and "factuality" not in args.judge:
        logger.info("--reference_path is only read by --judge factuality; ignoring it")
    if args.judge and not args.dry_run:  # no key: stop before the files are read
        resolve_api_key(None, args.base_url)
    count_lengths = load_length_counter(args.tokenizer_path) if args.tokenizer_path else None
    references = load_references(args.reference_path) if "factuality" in args.judge else {}
    # With --judge_sample, a seeded sample of lines (their numbers only); else every line.
    samplers = {judge: Sampler(args.judge_sample, args.seed) if args.judge_sample else None for judge in args.judge}
    eligible = Counter()
    page = RecordSample(args.html_sample, args.seed, args.html_flagged) if args.html_path else None
    # The per-record entries wait in an anonymous temporary file (next to the output when its
    # folder exists) until the figures that precede them in the JSON are known.
    spool_dir = os.path.dirname(os.path.abspath(args.output_path)) if args.output_path else None
    with tempfile.TemporaryFile("w+", encoding="utf-8", dir=spool_dir if spool_dir and os.path.isdir(spool_dir)
                                else None) as spool:
        lines = 0

        def on_record(entry, original, rewritten):
            nonlocal lines
            if args.output_path:
                spool.write(json.dumps(entry, ensure_ascii=False) + "\n")
            for judge, sampler in samplers.items():
                if judge == "factuality" and original.id not in references:
                    continue
                eligible[judge] += 1
                if sampler is not None:
                    sampler.offer(original.id, lambda line=lines: line)
            if page is not None:
                page.offer(page_record(entry, original, rewritten))
            lines += 1

        summary, overall_stats = measure_files(args.original_path, args.rewritten_path, count_lengths,
                                               args.allow_unpaired, args.rewrite_threshold, on_record,
                                               args.rewrite_directory, args.merged_path, args.processes)
        verdicts = judge_samples(args, eligible, samplers, references, summary) if args.judge else {}
        if args.dry_run:
            free = {key: value for key, value in summary.items() if key != "judges"}
            logger.info("dry run: nothing was sent and nothing written (%s)", headline(free))
            return 0
        document = {"headline": headline(summary), **summary}
        # Render everything before writing anything: a failure leaves no half set of outputs.
        report = render_report(document, plot_link(args.report_path, args.plot_path)) if args.report_path else None
        # One chart implementation: the PNG and the page's charts are the same figure.
        figure = render_charts(document, overall_stats) if args.plot_path or args.html_path else None
        image = png_bytes(figure) if args.plot_path else None
        html_page = None
        if page is not None:
            records_shown = page.records()
            if args.rewrite_directory:
                show_unused_replies(records_shown, args.rewrite_directory)
            html_page = render_page(document, records_shown, page.note(), figure_svg(figure))
        if args.output_path:
            spool.flush()
            write_output(args.output_path, document, spool, verdicts)
    if report is not None:
        write_text_atomic(args.report_path, report)
    if image is not None:
        write_bytes_atomic(args.plot_path, image)
    if html_page is not None:
        write_text_atomic(args.html_path, html_page)
    written = ", ".join(p for p in (args.output_path, args.report_path, args.plot_path, args.html_path)
                        if p) or "nothing written"
    logger.info("%s -> %s", document["headline"], written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
