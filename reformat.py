"""Stage 3 of ReAlign: reformat each response to its task's format with an OpenAI-compatible model.

Usage:
    export OPENAI_API_KEY=...
    python reformat.py --input_data_path outputs/realign_examples_retrieval_clean_evidence.json \
        --output_directory outputs/rewrite --dataset_batch_id 0 --dataset_batch_num 10 --top_k 2

    # the seed's command (the paper's model was shut down on 2026-10-23: it now stops
    # at once with a clear message; leave out --model to use today's default)
    python reformat.py --input_data_path outputs/realign_examples_retrieval_clean_evidence.json \
        --output_directory outputs/rewrite --tokenizer_path meta-llama/Llama-2-7b-chat-hf \
        --dataset_batch_id 0 --dataset_batch_num 10 --top_k 2 --model gpt-3.5-turbo-1106 \
        --temperature 0.3 --top_p 1 --target_length 4096

Input: the stage-3 input (``*_clean_evidence.json``, a JSON list or JSONL of classified
records). It is cut into ``--dataset_batch_num`` contiguous chunks (earlier chunks one
larger); this process reads only chunk ``--dataset_batch_id`` (streaming: it never holds
the dataset) and appends one JSON line per record, as each finishes, to
``<output_directory>/rewrite_data_{i}_of_{N}_batch.jsonl``: the whole input record plus
``items[1].revised_response_list`` (every usable candidate, ``{"reason",
"revised_response"}``), ``items[1].revised_response`` (the longest) and a top-level
``fingerprint`` of the request that made it. Records that are not reformatted (tasks
outside ``REWRITE_TASK``, unknown categories, multi-turn records) are written through with
the original response as ``revised_response``; records that could not be rewritten are
written the same way plus top-level ``"status": "failed"`` and ``"error"``. A rewritten
record's line also holds ``candidate_checks`` (what the quality checks found among its
candidates) and ``checks_passed`` (:func:`realign.quality.passed_stamp` of the chosen one).

A rerun continues: it skips the lines whose fingerprint still matches (the model, the
prompt, the task's format, the evidence, the sampling and the length counting are all in
it) and redoes the others; ``--retry_failed`` asks again for the failed ones. Every reply
is kept in the request cache (``--cache_dir``), so redoing a line whose request did not
change costs nothing. ``--dry_run`` prints what the run would send and cost, and sends
nothing; ``--max_cost`` stops before the spend would pass a cap.

Batch API (``--batch_api``; :mod:`realign.batch_api`): the same requests, parsing and
batch-file lines, sent through OpenAI's Batch API at half the price, results within 24 h:

    python reformat.py --input_data_path data_clean_evidence.json --output_directory outputs/rewrite \
        --dataset_batch_id 0 --dataset_batch_num 2 --batch_api

The requests go into ``<output_directory>/batches_{i}_of_{N}/requests_0001.jsonl``, ... of
at most ``--batch_max_requests`` (50,000) lines and ``--batch_max_bytes`` (200 MB); every
upload and batch is recorded the moment it exists in ``<output_directory>/batches_{i}_of_{N}.json``;
the process polls every ``--poll_interval`` seconds (60) until its batches are done, writing
the lines as each batch finishes. Lines that failed or did not parse are sent again in new
batches (``--max_retries``, ``--max_parse_retries``); ``--batch_fallback_online`` sends
their last try online. Rerun the same command after a kill at any moment: it carries on
with the recorded batches and never pays twice for a line. ``--batch_cancel`` cancels the
chunk's running batches; a later run keeps what they answered. The dry run and
``--max_cost`` use batch prices.

Environment:
    OPENAI_API_KEY           the API key (read first; ``--openai_key`` is accepted but not recommended)
    OPENAI_BASE_URL          any OpenAI-compatible server (or ``--base_url``)
    REALIGN_CACHE_DIR        the request cache (or ``--cache_dir``; default ~/.cache/realign)
    SLURM_ARRAY_TASK_ID      with SLURM_ARRAY_TASK_COUNT/_MIN/_MAX/_STEP, the batch id and
                             number when the flags are not given (``sbatch --array=0-9`` runs
                             ten chunks; a resubmitted index, ``--array=3``, takes the chunk
                             count from the batch files already in the folder)

Exit status: 0 every record of the chunk written and none failed; 1 the batch file holds
failed records, the budget was reached, or the server refused the key, the model or every
request; 2 bad input, or another process is writing the same batch file; 130 interrupted
(finished records are kept; rerun to continue).
"""

import argparse
import collections
import json
import logging
import os
import re
import sys
import time

from constant import DEFAULT_MODEL, REFORMAT_PROMPTS, REPLY_FORMATS, REWRITE_TASK, STRUCTURE, TASK_DESCRIPTION
from realign import (
    InputError,
    LengthCounter,
    OutputLock,
    ProgressWriter,
    batch_api,
    check_constants,
    chunk_bounds,
    count_records,
    exits_cleanly,
    fingerprint,
    iter_progress,
    iter_records_range,
    non_negative_int,
    positive_int,
    read_progress_lines,
    setup_logging,
    write_atomic,
    write_json_atomic,
)
from realign.cache import open_cache, request_key
from realign.cli import ArgumentParser, progress_bar
from realign.client import (
    CHAT,
    OpenAITransport,
    Sampling,
    add_client_arguments,
    default_reasoning_effort,
    finish_client_arguments,
    optional_float,
    resolve_api_key,
)
from realign.engine import Request, options_from_args, send_requests
from realign.pricing import CHARS_PER_TOKEN, price_of_run
from realign.records import BATCH_FILE_RE, batch_file_path, unused_replies_path
from realign.quality import (CUT_OFF, REASONING_MARKER_RE, REVISED_MARKER_RE, UNPARSABLE, check_record, passed_stamp,
                             record_texts)

logger = logging.getLogger("reformat")

ARRAY_LAYOUT = "slurm_array.json"  # the layout of the Slurm array that started the run
REFUSAL_HINT = "check --model, --target_length, --temperature, --top_p and --extra_body"

MARKUP_CHARS = "*_# \t\n"  # heading and emphasis debris around a marker
REPLY_FORMAT_CHOICES = tuple(REPLY_FORMATS)
DEFAULT_REPLY_FORMAT = "json"  # chosen on a real small model: see benchmarks/README.md
RETRIED_STATUSES = ("failed", "rejected")  # lines --retry_failed asks again for
# --reply_format json: the reply's JSON schema, which OpenAI and vLLM enforce (response_format).
REVISION_SCHEMA = {"type": "json_schema",
                   "json_schema": {"name": "revision", "strict": True,
                                   "schema": {"type": "object",
                                              "properties": {"reasoning": {"type": "string"},
                                                             "revised_response": {"type": "string"}},
                                              "required": ["reasoning", "revised_response"],
                                              "additionalProperties": False}}}
JSON_FENCE_RE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
UNUSED_FILE_MAX_BYTES = 20_000_000  # the replies not used are kept up to this size, then only counted
UNUSED_REPLY_MAX_CHARS = 8_000  # a kept reply longer than this is cut (a loop can fill the cap)


# -- pure functions ------------------------------------------------------------------


def skip_reason(record, rewrite_tasks=REWRITE_TASK):
    """Why a record is written through without a request, or None when it is reformatted."""
    items = record["items"]
    if len(items) > 2:
        return f"multi-turn record ({len(items)} items): only single-turn records are reformatted"
    if not items[1]["value"].strip():
        return "empty response: nothing to reformat"
    category = items[0].get("category")
    if category is None:
        return "no category: run classify.py first"
    if category not in rewrite_tasks:
        if category in TASK_DESCRIPTION:
            return f"task {category!r} is not reformatted (not in REWRITE_TASK)"
        return f"unknown category {category!r}"
    return None


def format_evidence(evidence):
    """Numbered evidence, one blank line apart: "1. ...\\n\\n2. ..." (as the original)."""
    return "\n\n".join(f"{i}. {text}" for i, text in enumerate(evidence, 1)).strip()


def build_rewrite_messages(record, adaptive=True, use_evidence=True, reply_format="text",
                           prompts=REFORMAT_PROMPTS, structures=STRUCTURE, reply_formats=REPLY_FORMATS):
    """The chat messages asking to reformat the record's first response to its task's format.

    The evidence variant is used when the record has evidence and ``use_evidence`` is on;
    ``adaptive`` lets the model keep the response when the format does not suit it
    (forced mode, used for GSM8K and MATH, always reformats). Both messages end with the
    part of ``reply_formats`` that ``reply_format`` names (how to lay out the reply).
    """
    human, gpt = record["items"][0], record["items"][1]
    evidence = human.get("evidence") if use_evidence else None
    template = prompts["adaptive" if adaptive else "forced"]["evidence" if evidence else "plain"]
    layout = reply_formats[reply_format]
    fields = {"question": human["value"], "response": gpt["value"],
              "format": structures[human["category"]].strip()}
    if evidence:
        fields["evidence"] = format_evidence(evidence)
    return [{"role": "system", "content": template["system"].strip() + "\n\n" + layout["system"].strip()},
            {"role": "user", "content": template["user"].format(**fields).strip() + "\n\n" + layout["user"].strip()}]


def strip_leading_protocol(text):
    """``text`` without a well-formed protocol block at its start: "Revised response:"
    again, or "Reasoning: ... Revised response:" (weak models nest the protocol). A
    "Reasoning:" with no "Revised response:" after it stays (the check reports it)."""
    while True:
        text = text.lstrip()
        marker = REVISED_MARKER_RE.match(text)
        if marker is None:
            reasoning = REASONING_MARKER_RE.match(text)
            marker = REVISED_MARKER_RE.search(text, reasoning.end()) if reasoning else None
        if marker is None:
            return text.strip()
        text = text[marker.end():]


def parse_json_reply(text):
    """``{"reason", "revised_response"}`` of a JSON reply (bare or in a code fence), or None."""
    text = text.strip()
    fenced = JSON_FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("revised_response"), str):
        return None
    reasoning = value.get("reasoning")
    return {"reason": reasoning.strip() if isinstance(reasoning, str) else "",
            "revised_response": value["revised_response"]}


def parse_text_reply(text):
    """``{"reason", "revised_response"}`` of a "Reasoning: ... Revised response: ..." reply,
    or None when it has no "Revised response:" marker."""
    marker = REVISED_MARKER_RE.search(text)
    if marker is None:
        return None
    before = text[:marker.start()]
    reasoning = REASONING_MARKER_RE.search(before)
    reason = before[reasoning.end():] if reasoning else before
    return {"reason": reason.strip(MARKUP_CHARS), "revised_response": text[marker.end():]}


def parse_revised_response(text):
    """``{"reason", "revised_response"}`` from a reply in either layout (a JSON object, or
    "Reasoning: ... Revised response: ..."), with a nested protocol block taken off the
    response; None when the reply follows neither or leaves the response empty."""
    if not text:
        return None
    parsed = parse_json_reply(text) or parse_text_reply(text)
    if parsed is None:
        return None
    revised = strip_leading_protocol(parsed["revised_response"])
    if not revised:
        return None
    return {"reason": parsed["reason"], "revised_response": revised}


def choice_text(choice):
    """``(content, finish_reason)`` of one choice of a chat completion reply (a dict)."""
    if not isinstance(choice, dict):
        return None, None
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return (content if isinstance(content, str) else None), choice.get("finish_reason")


def judge_candidate(record, content, finish_reason, verdicts=None):
    """``(candidate or None, problems)``: the parsed candidate and the names of the checks
    (realign/quality.py) it fails; a candidate cut off at the cap is not read further (its
    end is missing), one that does not parse is ``unparsable``.

    ``verdicts`` (``{stamp: problems}``, see :func:`judge_reply`) answers for texts judged
    before, and learns the new ones."""
    if finish_reason == "length":
        return None, [CUT_OFF]
    parsed = parse_revised_response(content)
    if parsed is None:
        return None, [UNPARSABLE]
    if verdicts is None:
        return parsed, check_record(record, parsed["revised_response"])
    stamp = passed_stamp(parsed["revised_response"], *record_texts(record))
    if not isinstance(verdicts.get(stamp), list):
        verdicts[stamp] = check_record(record, parsed["revised_response"])
    return parsed, verdicts[stamp]


def judge_candidates(record, choices, verdicts=None):
    """Judge ``(content, finish_reason)`` pairs: ``(passing candidates, [(content,
    finish_reason, problems)] of the others)``."""
    passing, rejected = [], []
    for content, finish_reason in choices:
        candidate, problems = judge_candidate(record, content, finish_reason, verdicts)
        if problems:
            rejected.append((content, finish_reason, problems))
        else:
            passing.append(candidate)
    return passing, rejected


# Where a reply keeps the checks' verdicts of its candidates (realign.quality.passed_stamp of
# the texts -> the checks they fail): the engine stores the reply with them once the stage
# has used it, so a rerun answered from the cache reads them instead of checking again.
VERDICTS_KEY = "realign_verdicts"


def judge_reply(record, reply):
    """``(choices, judge_candidates(...))`` of a chat completion reply (a dict), its
    verdicts kept in ``reply[VERDICTS_KEY]``."""
    verdicts = reply.get(VERDICTS_KEY)
    if not isinstance(verdicts, dict):
        verdicts = reply[VERDICTS_KEY] = {}
    choices = reply_choices(reply)
    return choices, judge_candidates(record, choices, verdicts)


def longest(lengths):
    """Index of the largest length; the first one on a tie."""
    best = 0
    for i, length in enumerate(lengths):
        if length > lengths[best]:
            best = i
    return best


def with_revision(record, revised_list, revised):
    """A copy of ``record`` with the two stage-3 keys on ``items[1]`` (``value`` unchanged)."""
    items = record["items"]
    gpt = {**items[1], "revised_response_list": revised_list, "revised_response": revised}
    return {**record, "items": [items[0], gpt, *items[2:]]}


def passthrough(record, reason):
    return with_revision(record, [], {"reason": reason, "revised_response": record["items"][1]["value"]})


def failed(record, error):
    """The line of a record whose request got no answer: the original, ``status: failed``."""
    line = passthrough(record, f"not rewritten: {error}")
    line["status"] = "failed"
    line["error"] = error
    return line


def rejected(record, state):
    """The line of a record none of whose candidates passed the checks: the original,
    ``status: rejected``, and what the checks found (``state``: a request's tally)."""
    line = passthrough(record, "kept the original: no candidate passed the checks "
                               f"({describe_problems(collections.Counter(state['problems']))})")
    line["status"] = "rejected"
    line["candidate_checks"] = candidate_checks(state)
    return line


def candidate_checks(state):
    """``{"candidates": n, "failing": k, "problems": {check: count}}``: what the checks found
    among the candidates of a record, over its asks (a candidate may fail several checks)."""
    problems = collections.Counter(state["problems"])
    return {"candidates": state["candidates"], "failing": state["failing"], "problems": dict(problems.most_common())}


def describe_problems(problems):
    return ", ".join(f"{what} {count}" for what, count in problems.most_common())


def check_evidence(record, index, path):
    """``items[0].evidence``, where present, must be a list of strings."""
    evidence = record["items"][0].get("evidence")
    if evidence is not None and not (isinstance(evidence, list) and all(isinstance(e, str) for e in evidence)):
        raise InputError(f"{path}: record {index} (id {record['id']!r}): field 'items[0].evidence' "
                         "must be a list of strings")


def estimate_tokens(text):
    return len(text) / CHARS_PER_TOKEN  # no tokenizer: the client's estimate


# -- which chunk (Slurm arrays) --------------------------------------------------------


def _env_int(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def batch_numbers_in(directory):
    """The N of the batch files ``rewrite_data_*_of_{N}_batch.jsonl`` in ``directory``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return set()
    return {int(m.group(2)) for m in map(BATCH_FILE_RE.fullmatch, names) if m}


def resolve_chunk(batch_id, batch_num, output_directory):
    """``(batch id, batch number, how it was found)`` from the flags, the Slurm array
    variables and the batch files already in the output folder.

    A whole array (``--array=0-9``, or 1-10, or 0-18:2) tells both numbers; its layout is
    then kept in ``<output_directory>/slurm_array.json``. A resubmitted index (``sbatch
    --array=3`` sets SLURM_ARRAY_TASK_COUNT=1) or a subset (``--array=3,5``) cannot tell the
    count: the task id is mapped to its chunk with the layout kept by the first run (else it
    is the chunk id, as in an array numbered from 0), and the count comes from
    ``--dataset_batch_num``, the kept layout, or the batch files in the folder (one N
    there); otherwise the run refuses. A count that disagrees with the batch files in the
    folder is refused too: the process never works on a chunk other than the one the user
    meant. Returns ``(batch id, batch number, how, layout to keep or None)``.
    """
    found = batch_numbers_in(output_directory)
    task_id = _env_int("SLURM_ARRAY_TASK_ID")
    how, layout = "flags", None
    if batch_id is None and task_id is not None:
        count, first = _env_int("SLURM_ARRAY_TASK_COUNT"), _env_int("SLURM_ARRAY_TASK_MIN")
        last, step = _env_int("SLURM_ARRAY_TASK_MAX"), _env_int("SLURM_ARRAY_TASK_STEP") or 1
        first = task_id if first is None else first
        last = first + (count - 1) * step if last is None and count else last
        whole = (count is not None and last is not None and count == (last - first) // step + 1
                 and (count > 1 or first == 0))
        kept = read_array_layout(output_directory)
        if whole:
            batch_id, how = (task_id - first) // step, "Slurm array"
            if batch_num is None:
                batch_num = count
            layout = {"first": first, "step": step, "count": count}
        elif kept is not None and (task_id - kept["first"]) % kept["step"] == 0 \
                and 0 <= (task_id - kept["first"]) // kept["step"] < kept["count"]:
            batch_id = (task_id - kept["first"]) // kept["step"]
            how = (f"resubmitted Slurm index of the array {kept['first']}..., step {kept['step']}, "
                   f"{kept['count']} tasks, kept in {os.path.join(output_directory, ARRAY_LAYOUT)}")
            if batch_num is None:
                batch_num = kept["count"]
        else:
            batch_id, how = task_id, "resubmitted Slurm index"
            if batch_num is None:
                if len(found) != 1:
                    where = (f"the batch files in {output_directory} have N = {sorted(found)}" if found
                             else f"there are no batch files in {output_directory}")
                    raise InputError(
                        f"SLURM_ARRAY_TASK_ID={task_id} (SLURM_ARRAY_TASK_COUNT={count}): the array's variables "
                        f"cannot tell how many chunks the input is cut into, and {where}; pass "
                        "--dataset_batch_num N (and --dataset_batch_id)")
                batch_num = next(iter(found))
                how += f"; N from the batch files in {output_directory}"
    if batch_num is None:
        batch_num = 1
    batch_id = 0 if batch_id is None else batch_id
    if not 0 <= batch_id < batch_num:
        raise InputError(f"--dataset_batch_id must be in 0..{batch_num - 1} (--dataset_batch_num {batch_num}), "
                         f"got {batch_id}")
    others = found - {batch_num}
    if others:
        raise InputError(f"{output_directory} holds batch files of N = {', '.join(map(str, sorted(others)))}, "
                         f"but this run cuts the input into {batch_num} chunks ({how}); pass the same "
                         "--dataset_batch_num as before, or use another --output_directory")
    return batch_id, batch_num, how, layout


def read_array_layout(output_directory):
    """The Slurm array layout ``{"first", "step", "count"}`` a whole array kept, or None."""
    try:
        with open(os.path.join(output_directory, ARRAY_LAYOUT), encoding="utf-8") as f:
            layout = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(layout, dict) and all(isinstance(layout.get(k), int) for k in ("first", "step", "count")) \
            and layout["step"] >= 1 and layout["count"] >= 1:
        return layout
    return None


# -- the batch file ------------------------------------------------------------------


def read_batch_file(path):
    """``{id: (fingerprint, status)}`` of the last line of each id in the batch file
    (status: "failed", "rejected", or None for a rewrite or a pass-through)."""
    return {record_id: (entry.get("fingerprint"), entry.get("status"))
            for record_id, entry in read_progress_lines(path)[0].items()}


def is_done(line, fp, retry_failed):
    """Whether a batch line ``(fingerprint, status)`` still stands for a record whose
    request now has fingerprint ``fp`` (``--retry_failed`` asks again for failed and
    rejected ones)."""
    return line is not None and line[0] == fp and not (line[1] in RETRIED_STATUSES and retry_failed)


def rewrite_batch_file(path, keep_ids):
    """Rewrite the batch file keeping only the last line of each id in ``keep_ids``
    (atomically: :func:`realign.write_atomic`)."""
    last = {}
    for number, entry in enumerate(iter_progress(path)):
        if isinstance(entry, dict):
            last[entry.get("id")] = number

    def write(out):
        for number, entry in enumerate(iter_progress(path)):
            if isinstance(entry, dict) and entry.get("id") in keep_ids and last[entry.get("id")] == number:
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")

    write_atomic(path, write)


# -- the run -------------------------------------------------------------------------


class Chunk:
    """One process's chunk of the input, as requests for the engine: the request of each record
    still to rewrite (re-read from the input at each pass, so nothing is held), what each reply
    makes of the record's batch line, and the counters. It never sees the wire: the engine
    sends the requests online or through the Batch API transport."""

    def __init__(self, args, sampling, start, end, batch_lines):
        self.args = args
        self.sampling = sampling
        self.start, self.end = start, end
        self.batch_lines = batch_lines
        self.length_unit = "tokens" if args.tokenizer_path else "words"
        self.count_lengths = None  # a LengthCounter, loaded before anything is sent
        self.transport = None  # the online transport: its adapter says when the JSON schema was refused
        self.writer = self.bar = self.unused = None  # set while the batch file is open
        self.stats = collections.Counter()
        self.finished = set()  # ids whose line this run wrote
        self.max_asks = args.max_parse_retries + 1

    def plan(self, record):
        """``(reason to pass through or None, messages or None, fingerprint)`` of a record.

        The fingerprint is of the request the flags ask for; the messages are in the text
        layout once the server has refused ``response_format`` (``--reply_format json``
        adapts to text for the rest of the run)."""
        reason = skip_reason(record)
        if reason is not None:
            return reason, None, fingerprint("passthrough", reason, record["items"][1]["value"])
        asked = build_rewrite_messages(record, self.args.adaptive, self.args.is_retrieval, self.args.reply_format)
        # The whole request body but not the server's address: the same request through
        # another URL (a proxy, a moved server) still stands for the same line.
        request = request_key(CHAT, self.body(asked))
        fp = fingerprint("rewrite", request, self.length_unit, self.args.tokenizer_path)
        layout = self.reply_layout()
        if layout != self.args.reply_format:
            return None, build_rewrite_messages(record, self.args.adaptive, self.args.is_retrieval, layout), fp
        return None, asked, fp

    def body(self, messages):
        return {"messages": messages, **self.sampling.fields()}

    def reply_layout(self):
        """``--reply_format``, or "text" once the server refused the JSON schema."""
        if self.transport is not None and "response_format" in self.transport.adapter.dropped:
            return "text"
        return self.args.reply_format

    def __iter__(self):
        """The requests of the chunk's records still to rewrite, in input order: not those
        whose batch line stands or that this run finished. The lines of the records that are
        not reformatted are written on the way (not in a dry run)."""
        for record in iter_records_range(self.args.input_data_path, self.start, self.end, require_response=True):
            if record["id"] in self.finished:
                continue
            reason, messages, fp = self.plan(record)
            if is_done(self.batch_lines.get(record["id"]), fp, self.args.retry_failed):
                continue
            if reason is not None:
                if self.writer is not None:
                    self.write(with_fingerprint(passthrough(record, reason), fp), "passed")
                continue
            yield self.request(record, messages, fp)

    def request(self, record, messages, fp, state=None):
        """The request of one record; ``state`` (the Batch API keeps it across rounds) tallies
        its asks and what the checks found among their candidates."""
        state = state if state is not None else {"asks": 0, "candidates": 0, "failing": 0, "problems": {}}

        def on_reply(reply):
            line = self.line_from_reply(record, fp, reply, state)
            if line is not None:
                self.write(line)
                return True
            state["asks"] += 1
            if state["asks"] < self.max_asks:
                self.stats["reasks"] += 1
                return self.request(record, self.plan(record)[1], fp, state)  # the same request again
            self.write(with_fingerprint(rejected(record, state), fp))
            return False

        def on_error(error):
            self.write(with_fingerprint(failed(record, str(error)), fp))

        return Request(self.body(messages), on_reply, on_error, expected_output=self.expected_output(record),
                       name=batch_api.custom_id(record["id"], fp), state=state)

    def write(self, line, outcome=None):
        self.writer.write(line)
        self.finished.add(line["id"])
        self.bar.update(1)
        self.stats[outcome or line.get("status") or "reformatted"] += 1

    def expected_output(self, record):
        """The completion tokens a request is expected to use: n x the original's length."""
        return self.sampling.n * max(1, int(estimate_tokens(record["items"][1]["value"])))

    def line_from_reply(self, record, fp, reply, state):
        """The batch line of a reply: the candidates that pass the checks and the longest of
        them; None when none passes. ``state`` adds up the candidates and their problems over
        the record's asks; the replies not used go to the unused-replies file."""
        choices, (passing, failing) = judge_reply(record, reply)
        state["candidates"] += len(choices)
        state["failing"] += len(failing)
        for content, finish_reason, problems in failing:
            for name in problems:
                state["problems"][name] = state["problems"].get(name, 0) + 1
            self.stats.update(f"check {name}" for name in problems)
            self.unused.keep(record["id"], fp, content, finish_reason, problems)
        self.stats["candidates"] += len(choices)
        self.stats["failing candidates"] += len(failing)
        if not passing:
            return None
        best = 0
        if len(passing) > 1:
            best = longest(self.count_lengths([c["revised_response"] for c in passing]))
        line = with_revision(record, passing, passing[best])
        line["candidate_checks"] = candidate_checks(state)
        line["checks_passed"] = passed_stamp(passing[best]["revised_response"], *record_texts(record))
        return with_fingerprint(line, fp)


class UnusedReplies:
    """The replies a run did not use (cut off, unparsable, or failing a check), each with
    why, appended to a file beside the batch file until it holds ``max_bytes``; past that
    they are only counted (a weak model can fail on most records)."""

    def __init__(self, path, max_bytes=UNUSED_FILE_MAX_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self.writer = None
        self.kept = self.dropped = 0

    def keep(self, record_id, fp, content, finish_reason, problems):
        if self.writer is None:
            self.writer = ProgressWriter(self.path)
        reply = content if isinstance(content, str) else None
        entry = {"id": record_id, "fingerprint": fp, "problems": problems, "finish_reason": finish_reason,
                 "reply": reply[:UNUSED_REPLY_MAX_CHARS] if reply is not None else None}
        if reply is not None and len(reply) > UNUSED_REPLY_MAX_CHARS:
            entry["reply_chars"] = len(reply)  # cut here; the whole length for the record
        if self.writer.size + len(json.dumps(entry, ensure_ascii=False)) >= self.max_bytes:
            if not self.dropped:
                logger.warning("%s holds %d bytes: further unused replies are counted, not kept", self.path,
                               self.writer.size)
            self.dropped += 1
            return
        self.writer.write(entry)
        self.kept += 1

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def describe_checks(stats, unused=None):
    """``candidates: 12, failing a check: loop 2, leftover 1 (kept in <file>)`` for the summary."""
    found = collections.Counter({name[len("check "):]: n for name, n in stats.items() if name.startswith("check ")})
    text = (f"candidates: {stats['candidates']:,}, failing a check: {stats['failing candidates']:,}"
            f"{' (' + describe_problems(found) + ')' if found else ''}")
    if unused is not None and unused.kept:
        text += f" (unused replies in {unused.path})"
    return text


def reply_choices(reply):
    return [choice_text(choice) for choice in reply.get("choices") or []]


def with_fingerprint(line, fp):
    line["fingerprint"] = fp
    return line


# -- command line --------------------------------------------------------------------


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Reformat responses to their task's format with an OpenAI-compatible model (ReAlign "
                    "stage 3). The API key is read from the environment variable OPENAI_API_KEY.")
    parser.add_argument("--input_data_path", required=True,
                        help="stage-3 input: classified records, with evidence from retrieval.py "
                             "(*_clean_evidence.json; JSON list or JSONL)")
    parser.add_argument("--output_directory", required=True,
                        help="folder of the batch files rewrite_data_{i}_of_{N}_batch.jsonl (created if missing)")
    parser.add_argument("--tokenizer_path", default=None,
                        help="Hugging Face tokenizer (name or folder) that measures candidates; the longest "
                             "is kept (default: count words)")
    parser.add_argument("--dataset_batch_id", type=non_negative_int, default=None,
                        help="which chunk this process handles, 0-based (default: from $SLURM_ARRAY_TASK_ID, "
                             "else 0)")
    parser.add_argument("--dataset_batch_num", type=positive_int, default=None,
                        help="number of chunks the input is cut into (default: from the Slurm array, else "
                             "the batch files already in --output_directory, else 1)")
    parser.add_argument("--openai_key", default=None,
                        help="API key, kept for compatibility with the original; prefer the environment "
                             "variable OPENAI_API_KEY, which is read first (a key on the command line is "
                             "visible in the process list and shell history; default: $OPENAI_API_KEY)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name (default: {DEFAULT_MODEL}; the paper used gpt-3.5-turbo-1106, "
                             "shut down on 2026-10-23)")
    parser.add_argument("--top_k", type=positive_int, default=2,
                        help="candidates sampled per request (the API's n); the longest one that passes the "
                             "checks is kept (default: 2)")
    parser.add_argument("--temperature", type=optional_float, default=0.3,
                        help="sampling temperature, or none to leave it out (default: 0.3, the original "
                             "code's; a model that refuses it gets its default, with a warning)")
    parser.add_argument("--top_p", type=optional_float, default=1.0,
                        help="nucleus sampling top_p, or none to leave it out (default: 1)")
    parser.add_argument("--target_length", type=positive_int, default=2048,
                        help="output cap of each candidate, sent as max_completion_tokens (max_tokens where "
                             "a server wants that); a candidate cut off there is dropped (default: 2048)")
    parser.add_argument("--is_retrieval", action=argparse.BooleanOptionalAction, default=True,
                        help="put a record's evidence into its request when it has some (default: on)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="let the model keep a response whose format does not suit the question; "
                             "--no-adaptive always reformats (forced mode, used for GSM8K and MATH) "
                             "(default: on)")
    parser.add_argument("--reply_format", choices=REPLY_FORMAT_CHOICES, default=DEFAULT_REPLY_FORMAT,
                        help="how the model lays out its reply: json (a JSON object of reasoning and revised "
                             "response, its schema sent as response_format; a server that refuses it gets the "
                             "text layout, with a warning) or text (\"Reasoning: ... Revised response: ...\") "
                             f"(default: {DEFAULT_REPLY_FORMAT})")
    parser.add_argument("--max_parse_retries", type=non_negative_int, default=2,
                        help="requests asked again when no candidate of a reply passes the checks (cut off, "
                             "unparsable, a loop, protocol leftovers, lost facts, a flipped verdict, ungrounded "
                             "content); then the record keeps its original response, with the reasons "
                             "(default: 2)")
    parser.add_argument("--retry_failed", action=argparse.BooleanOptionalAction, default=False,
                        help="ask again for the records the batch file holds as failed (default: off)")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="log every retry (default: off)")
    add_client_arguments(parser, default_concurrency=16)
    batch_api.add_batch_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_cancel and args.dry_run:
        parser.error("--batch_cancel sends a cancel request: it does not go with --dry_run")
    args.batch_api = args.batch_api or args.batch_cancel
    finish_client_arguments(parser, args)
    return args


def make_sampling(args):
    effort, is_default = default_reasoning_effort(args.model, args.reasoning_effort)
    return Sampling(model=args.model, n=args.top_k, temperature=args.temperature, top_p=args.top_p,
                    max_output_tokens=args.target_length, reasoning_effort=effort,
                    service_tier=args.service_tier, extra_body=dict(args.extra_body or {}),
                    response_format=REVISION_SCHEMA if args.reply_format == "json" else None,
                    effort_is_default=is_default)


def scan_chunk(args, chunk):
    """The first pass over the chunk, before anything is written or sent: validate every
    record and note each one's fingerprint and the expected cost of its request
    (``{id: (fingerprint, pass-through reason, USD)}``; the cost of a record with a standing
    line is not estimated)."""
    plans = {}
    price = price_of_run(args, args.model, batch=args.batch_api)
    records = iter_records_range(args.input_data_path, chunk.start, chunk.end, require_response=True)
    for index, record in enumerate(records, chunk.start):
        check_evidence(record, index, args.input_data_path)
        reason, messages, fp = chunk.plan(record)
        line = chunk.batch_lines.get(record["id"])
        cost = 0.0
        if reason is None and price is not None and line is not None and line[0] != fp:
            cost = price.cost(OpenAITransport.estimate_prompt(chunk.body(messages)), chunk.expected_output(record))
        plans[record["id"]] = (fp, reason, cost)
    return plans


def tally(plans, batch_lines, retry_failed):
    """What is done, stale (made with other settings), to pass through and to rewrite, and
    the ids whose batch lines stand."""
    counts, unknown, keep = collections.Counter(), collections.Counter(), set()
    for record_id, (fp, reason, cost) in plans.items():
        line = batch_lines.get(record_id)
        if is_done(line, fp, retry_failed):
            counts["done"] += 1
            counts["old_failed"] += line[1] == "failed"
            keep.add(record_id)
            continue
        if line is not None:
            counts["stale" if line[0] != fp else "retry_failed"] += 1
            counts["stale cost"] += cost
        if reason is None:
            counts["rewrite"] += 1
        else:
            counts["passthrough"] += 1
            if reason.startswith("unknown category"):
                unknown[reason[len("unknown category "):].strip("'\"")] += 1
    foreign = [record_id for record_id in batch_lines if record_id not in plans]
    return counts, unknown, foreign, keep


def make_transport(args, api_key, sampling):
    """The transport of the run: the online API, or the Batch API in front of it; and the
    online one (whose adapter the chunk asks about the reply layout)."""
    online = OpenAITransport(args.base_url, api_key, model=args.model, timeout=args.request_timeout,
                             check_model=args.model_check and not args.dry_run,
                             effort_is_default=sampling.effort_is_default)
    if not args.batch_api:
        return online, online
    return batch_api.BatchTransport(online, batch_api.settings_from_args(args),
                                    price_of_run(args, args.model, batch=True)), online


def engine_options(args, cache, transport, **fields):
    count_prompt, counted = None, None
    if args.dry_run and args.tokenizer_path:
        count_prompt, counted = prompt_counter(args.tokenizer_path), f"counted with {args.tokenizer_path}"
    # The engine prices the online requests; the Batch API transport its batch lines (a dry run
    # counts every request at the batch price, as nearly all of them go into batches).
    price = price_of_run(args, args.model, batch=args.batch_api and args.dry_run)
    return options_from_args(args, cache=cache, price=price, limits_key=transport.limits_key,
                             count_prompt=count_prompt, counted=counted, refusal_hint=REFUSAL_HINT, **fields)


def prompt_counter(tokenizer_path):
    """A dry run's count of a request's prompt tokens with the tokenizer of ``--tokenizer_path``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def count(body):
        return sum(len(tokenizer(str(m.get("content") or ""), add_special_tokens=False)["input_ids"]) + 4
                   for m in body["messages"])

    return count


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    check_constants()
    sampling = make_sampling(args)
    batch_id, batch_num, how, layout = resolve_chunk(args.dataset_batch_id, args.dataset_batch_num,
                                                     args.output_directory)
    args.dataset_batch_id, args.dataset_batch_num = batch_id, batch_num
    path = batch_file_path(args.output_directory, batch_id, batch_num)
    if args.batch_cancel:
        return batch_api.cancel(args, resolve_api_key(args.openai_key, args.base_url), path)
    total = count_records(args.input_data_path)
    start, end = chunk_bounds(total, batch_num, batch_id)
    price_of_run(args, args.model, batch=args.batch_api)  # --max_cost without a price: a usage error, now
    api_key = None if args.dry_run else resolve_api_key(args.openai_key, args.base_url)
    chunk = Chunk(args, sampling, start, end, read_batch_file(path))
    plans = scan_chunk(args, chunk)  # bad input stops here, before anything is written
    cache = open_cache(args)  # a cache that cannot be used stops here, before anything is written
    try:
        if args.dry_run:
            return dry_run(args, chunk, plans, cache, api_key)
        os.makedirs(args.output_directory, exist_ok=True)
        if layout is not None and read_array_layout(args.output_directory) is None:
            # So that a resubmitted index of this array (sbatch --array=4) finds its chunk.
            write_json_atomic(os.path.join(args.output_directory, ARRAY_LAYOUT), layout)
        with OutputLock(path):
            chunk.batch_lines = read_batch_file(path)  # as it is now that this process holds it
            return run_chunk(args, chunk, plans, path, total, how, api_key, cache)
    finally:
        if cache is not None:
            cache.close()


def run_chunk(args, chunk, plans, path, total, how, api_key, cache):
    sampling = chunk.sampling
    counts, unknown, foreign, keep = tally(plans, chunk.batch_lines, args.retry_failed)
    del plans
    if foreign:
        raise InputError(f"{path}: holds {len(foreign)} lines whose id is not in this chunk (first: {foreign[0]!r}); "
                         "was the input or --dataset_batch_num changed? Use another --output_directory")
    redo = counts["stale"] + counts["retry_failed"]
    if redo:
        if counts["stale"]:
            logger.warning("%s: %d finished lines were made with other settings (model, prompt, format, evidence, "
                           "sampling or length counting): doing them again costs about $%.4f (the cache answers "
                           "what did not change)", path, counts["stale"], counts["stale cost"])
        rewrite_batch_file(path, keep)
    logger.info("%d records; chunk %d of %d (%s): records %d..%d (%d), %d already in %s, %d to pass through, "
                "%d to rewrite with %s%s (%s mode, n=%d, %d at once)", total, args.dataset_batch_id,
                args.dataset_batch_num, how, chunk.start, chunk.end - 1, chunk.end - chunk.start, counts["done"],
                path, counts["passthrough"], counts["rewrite"], args.model,
                f" at {args.base_url}" if args.base_url else "", "adaptive" if args.adaptive else "forced",
                sampling.n, args.concurrency)
    if unknown:
        logger.warning("passing through %d records of unknown categories: %s", sum(unknown.values()),
                       ", ".join(f"{name!r} ({count})" for name, count in unknown.most_common()))
    record = batch_api.record_path(args.output_directory, args.dataset_batch_id, args.dataset_batch_num)
    running = 0 if args.batch_api else batch_api.running_batches(record)
    if running:
        logger.warning("%s: %d batches of this chunk may still be running; their lines are asked online too. "
                       "Rerun with --batch_api to collect them, or --batch_cancel to cancel them", record, running)
    transport, chunk.transport = make_transport(args, api_key, sampling)
    chunk.count_lengths = LengthCounter(args.tokenizer_path if counts["rewrite"] else None)
    started = time.perf_counter()
    usage = None
    try:
        with ProgressWriter(path) as chunk.writer, \
                UnusedReplies(unused_replies_path(args.output_directory, args.dataset_batch_id,
                                                  args.dataset_batch_num)) as chunk.unused, \
                progress_bar(total=chunk.end - chunk.start, initial=counts["done"], unit="rec",
                             desc=f"chunk {args.dataset_batch_id}") as chunk.bar:
            # With nothing to rewrite, the pass-through lines only: no model check either.
            options = engine_options(args, cache, transport, check_first=counts["rewrite"] > 0,
                                     progress=lambda: (chunk.bar.n, chunk.bar.total))
            usage = send_requests(chunk, transport, options, "reformat")
    finally:  # also after a fatal error: say what was done
        elapsed = time.perf_counter() - started
        stats = chunk.stats
        asked = stats["reformatted"] + stats["rejected"] + stats["failed"]
        logger.info("#chunk: %d, already done: %d, redone (settings changed): %d, reformatted: %d, kept the original "
                    "(no candidate passed the checks): %d, passed through: %d, failed: %d, re-asks: %d, %s, %s, "
                    "%.1f s (%.1f records/s)",
                    chunk.end - chunk.start, counts["done"], counts["stale"], stats["reformatted"], stats["rejected"],
                    stats["passed"], stats["failed"], stats["reasks"], describe_checks(stats, chunk.unused),
                    usage.describe() if usage else "requests: 0", elapsed, asked / elapsed if elapsed > 0 else 0.0)
    usage.write(args.usage_path, records=dict(stats))
    usage.finish(path)
    failed_total = counts["old_failed"] + stats["failed"]
    if failed_total:
        logger.warning("%s holds %d failed records (%d from earlier runs); rerun with --retry_failed to ask "
                       "again for them", path, failed_total, counts["old_failed"])
        return 1
    return 0


def dry_run(args, chunk, plans, cache, api_key):
    """Send nothing; say what the run would send, use and cost (the engine's dry run: the same
    requests, counted instead of sent)."""
    counts, _, _, _ = tally(plans, chunk.batch_lines, args.retry_failed)
    transport, chunk.transport = make_transport(args, api_key, chunk.sampling)
    usage = send_requests(chunk, transport, engine_options(args, cache, transport), "reformat")
    lines = usage.dry.lines(extra=f"chunk {args.dataset_batch_id} of {args.dataset_batch_num}: "
                                  f"{chunk.end - chunk.start} records, {counts['done']} already done, "
                                  f"{counts['passthrough']} to pass through, {counts['rewrite']} to rewrite")
    if usage.extra is not None:  # the Batch API: the rate limits do not say how long batches take
        lines = [line for line in lines if not line.startswith("  expected time")] + usage.extra.report()
    for line in lines:
        print(line)
    usage.write(args.usage_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
