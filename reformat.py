"""Stage 3 of ReAlign: reformat each response to its task's format with an OpenAI-compatible model.

Usage:
    export OPENAI_API_KEY=...
    python reformat.py --input_data_path outputs/realign_examples_retrieval_clean_evidence.json \
        --output_directory outputs/rewrite --tokenizer_path meta-llama/Llama-2-7b-chat-hf \
        --dataset_batch_id 0 --dataset_batch_num 10 --top_k 2 --model gpt-3.5-turbo-1106 \
        --temperature 0.3 --top_p 1 --target_length 4096

Input: the stage-3 input (``*_clean_evidence.json``, a JSON list or JSONL of classified
records). It is cut into ``--dataset_batch_num`` contiguous chunks (earlier chunks one
larger); this process handles chunk ``--dataset_batch_id`` and appends one JSON line per
record, as each finishes, to ``<output_directory>/rewrite_data_{i}_of_{N}_batch.jsonl``:
the whole input record plus ``items[1].revised_response_list`` (every usable candidate,
``{"reason", "revised_response"}``) and ``items[1].revised_response`` (the longest).
Records that are not reformatted (tasks outside ``REWRITE_TASK``, unknown categories,
multi-turn records) are written through with the original response as
``revised_response``; records that could not be rewritten are written the same way plus
top-level ``"status": "failed"`` and ``"error"``. A rerun skips the ids already in the
file; ``--retry_failed`` asks again for the failed ones.

Environment:
    OPENAI_API_KEY           the API key (read first; ``--openai_key`` is accepted but not recommended)
    OPENAI_BASE_URL          any OpenAI-compatible server (or ``--base_url``)
    SLURM_ARRAY_TASK_ID      with SLURM_ARRAY_TASK_COUNT, the batch id and number when the
                             flags are not given (``sbatch --array=0-9`` runs ten chunks)

Exit status: 0 every record of the chunk written and none failed; 1 the batch file holds
failed records, or the server refused the key, model or every request; 2 bad input;
130 interrupted (finished records are kept; rerun to continue).
"""

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from constant import REFORMAT_PROMPTS, REWRITE_TASK, STRUCTURE, TASK_DESCRIPTION
from realign import (
    FatalError,
    InputError,
    LengthCounter,
    ProgressWriter,
    check_constants,
    chunk_bounds,
    exits_cleanly,
    iter_progress,
    load_records,
    non_negative_int,
    positive_float,
    positive_int,
    setup_logging,
)
from realign.llm import (
    RequestRejected,
    RetriesExhausted,
    call_with_retries,
    create_chat_completion,
    make_async_client,
)

logger = logging.getLogger("reformat")

BATCH_FILE = "rewrite_data_{batch_id}_of_{batch_num}_batch.jsonl"
REJECTION_LIMIT = 8  # this many HTTP 400s before any success: the settings are wrong, stop
NO_KEY = "EMPTY"  # sent to a --base_url server when no key is set (local servers ignore it)

# "Revised response:" as models write it: any case, optionally wrapped in markdown emphasis
# ("**Revised response:**", "__Revised Response__:"). The closing emphasis must match the
# opening one, so the "**" of a response that starts with bold text is left alone.
REVISED_MARKER_RE = re.compile(r"(?P<em>[*_]{0,3})[ \t]*revised[ \t]+response[ \t]*(?:(?P=em)[ \t]*:|:[ \t]*(?P=em))",
                               re.IGNORECASE)
REASONING_MARKER_RE = re.compile(r"(?P<em>[*_]{0,3})[ \t]*reasoning[ \t]*(?:(?P=em)[ \t]*:|:[ \t]*(?P=em))",
                                 re.IGNORECASE)
MARKUP_CHARS = "*_# \t\n"  # heading and emphasis debris around a marker


@dataclass
class Sampling:
    """What every request asks for (the original's flags)."""

    model: str
    n: int
    temperature: float
    top_p: float
    max_tokens: int


# -- pure functions ------------------------------------------------------------------


def batch_path(output_directory, batch_id, batch_num):
    return os.path.join(output_directory, BATCH_FILE.format(batch_id=batch_id, batch_num=batch_num))


def skip_reason(record, rewrite_tasks=REWRITE_TASK):
    """Why a record is written through without a request, or None when it is reformatted."""
    items = record["items"]
    if len(items) > 2:
        return f"multi-turn record ({len(items)} items): only single-turn records are reformatted"
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


def build_rewrite_messages(record, adaptive=True, use_evidence=True, prompts=REFORMAT_PROMPTS,
                           structures=STRUCTURE):
    """The chat messages asking to reformat the record's first response to its task's format.

    The evidence variant is used when the record has evidence and ``use_evidence`` is on;
    ``adaptive`` lets the model keep the response when the format does not suit it
    (forced mode, used for GSM8K and MATH, always reformats).
    """
    human, gpt = record["items"][0], record["items"][1]
    evidence = human.get("evidence") if use_evidence else None
    template = prompts["adaptive" if adaptive else "forced"]["evidence" if evidence else "plain"]
    fields = {"question": human["value"], "response": gpt["value"],
              "format": structures[human["category"]].strip()}
    if evidence:
        fields["evidence"] = format_evidence(evidence)
    return [{"role": "system", "content": template["system"].strip()},
            {"role": "user", "content": template["user"].format(**fields).strip()}]


def parse_revised_response(text):
    """``{"reason", "revised_response"}`` from a "Reasoning: ... Revised response: ..." reply,
    or None when the reply has no "Revised response:" marker or nothing after it."""
    if not text:
        return None
    marker = REVISED_MARKER_RE.search(text)
    if marker is None:
        return None
    revised = text[marker.end():].strip()
    if not revised:
        return None
    before = text[:marker.start()]
    reasoning = REASONING_MARKER_RE.search(before)
    reason = before[reasoning.end():] if reasoning else before
    return {"reason": reason.strip(MARKUP_CHARS), "revised_response": revised}


def choice_text(choice):
    """``(content, finish_reason)`` of one choice of a chat completion reply (a dict)."""
    if not isinstance(choice, dict):
        return None, None
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return (content if isinstance(content, str) else None), choice.get("finish_reason")


def usable_candidates(choices):
    """Parse ``(content, finish_reason)`` pairs; return (usable candidates, Counter of problems).

    A candidate cut off at the token limit is dropped even when it parses: its end is missing.
    """
    candidates, problems = [], collections.Counter()
    for content, finish_reason in choices:
        if finish_reason == "length":
            problems["cut off at --target_length"] += 1
            continue
        parsed = parse_revised_response(content)
        if parsed is None:
            problems["no 'Revised response:'"] += 1
            continue
        candidates.append(parsed)
    return candidates, problems


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
    line = passthrough(record, f"not rewritten: {error}")
    line["status"] = "failed"
    line["error"] = error
    return line


def describe_problems(problems):
    return ", ".join(f"{count} {what}" for what, count in problems.most_common())


def redact(text, secret):
    """``text`` with every occurrence of ``secret`` masked."""
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


def check_evidence(records, path):
    """``items[0].evidence``, where present, must be a list of strings."""
    for index, record in enumerate(records):
        evidence = record["items"][0].get("evidence")
        if evidence is not None and not (isinstance(evidence, list) and all(isinstance(e, str) for e in evidence)):
            raise InputError(f"{path}: record {index} (id {record['id']!r}): field 'items[0].evidence' "
                             "must be a list of strings")


def slurm_default(flag_value, variable, array_index=False):
    """``flag_value`` when given, else the Slurm array variable, else None.

    A task id is turned into a 0-based index with SLURM_ARRAY_TASK_MIN and _STEP, so
    ``--array=1-10`` and ``--array=0-18:2`` also give chunks 0..9.
    """
    if flag_value is not None:
        return flag_value
    value = os.environ.get(variable)
    if value is None:
        return None
    try:
        number = int(value)
        if array_index:
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
            number = (number - first) // step
    except ValueError:
        raise InputError(f"environment variable {variable}={value!r} is not an integer") from None
    return number


# -- the run -------------------------------------------------------------------------


class Run:
    """State of one run: settings, the batch file, counters, and the requests in flight."""

    def __init__(self, args, api_key, client, count_lengths):
        self.args = args
        self.api_key = api_key
        self.client = client
        self.count_lengths = count_lengths
        self.writer = self.bar = None  # set by main while the batch file is open
        self.request_kwargs = asdict(Sampling(args.model, args.top_k, args.temperature, args.top_p,
                                              args.target_length))
        self.stats = collections.Counter()  # call_with_retries counts "requests" and "retries"
        self.answered = 0  # requests that got a reply
        self.held = []  # records refused with HTTP 400 before any reply: wrong settings or bad records?
        self.interrupted = False

    def write(self, line, outcome=None):
        self.writer.write(line)
        self.bar.update(1)
        self.stats[outcome or ("failed" if line.get("status") == "failed" else "rewritten")] += 1

    async def request(self, messages, record_id):
        """``(content, finish_reason)`` of every choice of one request, retried as the policy says."""

        async def send():
            return await create_chat_completion(self.client, messages=messages, **self.request_kwargs)

        reply = await call_with_retries(send, self.args.max_retries, self.stats, what=f"id {record_id!r}")
        self.answered += 1
        usage = reply.get("usage") or {}
        self.stats["prompt_tokens"] += usage.get("prompt_tokens") or 0
        self.stats["completion_tokens"] += usage.get("completion_tokens") or 0
        return [choice_text(choice) for choice in reply["choices"]]

    async def rewrite(self, record):
        """The batch line of one record: rewritten, failed, or None while a 400 is held back."""
        messages = build_rewrite_messages(record, self.args.adaptive, self.args.is_retrieval)
        problems = collections.Counter()
        asks = self.args.max_parse_retries + 1
        for attempt in range(asks):
            if attempt:
                self.stats["reasks"] += 1
            try:
                choices = await self.request(messages, record["id"])
            except RetriesExhausted as e:
                return failed(record, redact(str(e), self.api_key))
            except RequestRejected as e:
                return self.rejected(record, redact(str(e), self.api_key))
            candidates, new_problems = usable_candidates(choices)
            problems.update(new_problems)
            if len(candidates) == 1:
                return with_revision(record, candidates, candidates[0])
            if candidates:
                lengths = self.count_lengths([c["revised_response"] for c in candidates])
                return with_revision(record, candidates, candidates[longest(lengths)])
        return failed(record, f"no usable candidate in {asks} requests ({describe_problems(problems)})")

    def rejected(self, record, error):
        line = failed(record, error)
        if self.answered:
            return line
        self.held.append(line)
        if len(self.held) >= REJECTION_LIMIT:
            raise FatalError(f"the first {REJECTION_LIMIT} requests were all refused ({error}); "
                             "check --model, --target_length, --temperature and --top_p")
        return None

    def release_held(self):
        """Once a request got a reply, the 400s before it were about their records: write them."""
        if self.held and self.answered:
            for line in self.held:
                self.write(line)
            self.held.clear()

    async def worker(self, todo):
        for record in todo:  # one shared iterator: each record goes to exactly one worker
            line = await self.rewrite(record)
            if line is not None:
                self.write(line)
            self.release_held()

    async def rewrite_all(self, records):
        """Send the requests of ``records``, ``--concurrency`` at a time, writing each line as it is done."""
        todo = iter(records)
        workers = [asyncio.create_task(self.worker(todo))
                   for _ in range(min(self.args.concurrency, len(records)))]

        def stop():
            self.interrupted = True
            for task in workers:
                task.cancel()

        loop = asyncio.get_running_loop()
        handled = []
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop)
                handled.append(signum)
        try:
            done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            errors = [task.exception() for task in done if not task.cancelled()]  # retrieve them all
            errors = [error for error in errors if error is not None]
            if errors:
                raise errors[0]
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            await self.client.close()
        if self.held and not self.interrupted:  # not a single reply: every request was refused
            raise FatalError(f"every request was refused ({self.held[0]['error']}); "
                             "check --model, --target_length, --temperature and --top_p")


def api_key_from(args):
    """The key: OPENAI_API_KEY first, then --openai_key. Never logged."""
    env_key = os.environ.get("OPENAI_API_KEY", "").strip()
    flag_key = (args.openai_key or "").strip()
    if env_key:
        if flag_key and flag_key != env_key:
            logger.warning("--openai_key is ignored: OPENAI_API_KEY is set and is read first")
        return env_key
    if flag_key:
        logger.warning("the key was given with --openai_key; prefer the environment variable OPENAI_API_KEY "
                       "(a command-line key shows in the process list and shell history)")
        return flag_key
    if args.base_url:
        return None
    raise InputError("OPENAI_API_KEY is not set: export your API key, or point --base_url at a server "
                     "that needs none")


def read_batch_file(path, chunk_ids, retry_failed):
    """(ids already in the batch file, ids in it as failed); with ``retry_failed`` the failed
    lines are removed first, so those ids are asked again.

    Lines of ids outside this chunk mean the input or the chunking changed: stop rather
    than mix two runs in one file.
    """
    done, failed_ids, foreign = set(), set(), []
    for entry in iter_progress(path):
        record_id = entry.get("id") if isinstance(entry, dict) else None
        if record_id not in chunk_ids:
            foreign.append(record_id)
            continue
        done.add(record_id)
        if entry.get("status") == "failed":
            failed_ids.add(record_id)
        else:
            failed_ids.discard(record_id)
    if foreign:
        raise InputError(f"{path}: holds {len(foreign)} lines whose id is not in this chunk (first: {foreign[0]!r}); "
                         "was the input or --dataset_batch_num changed? Use another --output_directory")
    if retry_failed and failed_ids:
        drop_failed_lines(path)
        done -= failed_ids
        failed_ids = set()
    return done, failed_ids


def drop_failed_lines(path):
    """Rewrite the batch file without its failed lines (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for entry in iter_progress(path):
            if entry.get("status") != "failed":
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Let SIGTERM (Slurm's scancel, kill) stop the run as Ctrl-C does: between two lines."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- command line --------------------------------------------------------------------




def parse_args(argv=None):
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--dataset_batch_id", type=int, default=None,
                        help="which chunk this process handles, 0-based (default: $SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--dataset_batch_num", type=positive_int, default=None,
                        help="number of chunks the input is cut into (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    parser.add_argument("--openai_key", default=None,
                        help="API key, kept for compatibility with the original; prefer the environment "
                             "variable OPENAI_API_KEY, which is read first (a key on the command line is "
                             "visible in the process list and shell history)")
    parser.add_argument("--base_url", default=None,
                        help="base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1 "
                             "(default: $OPENAI_BASE_URL, else OpenAI)")
    parser.add_argument("--model", default="gpt-3.5-turbo-1106", help="model name (default: gpt-3.5-turbo-1106)")
    parser.add_argument("--top_k", type=positive_int, default=2,
                        help="candidates sampled per request (the API's n); the longest usable one is kept "
                             "(default: 2)")
    parser.add_argument("--temperature", type=float, default=0.3, help="sampling temperature (default: 0.3)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling top_p (default: 1)")
    parser.add_argument("--target_length", type=positive_int, default=2048,
                        help="max tokens of each candidate; a candidate cut off there is dropped (default: 2048)")
    parser.add_argument("--is_retrieval", action=argparse.BooleanOptionalAction, default=True,
                        help="put a record's evidence into its request when it has some (default: on)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="let the model keep a response whose format does not suit the question; "
                             "--no-adaptive always reformats (forced mode, used for GSM8K and MATH) "
                             "(default: on)")
    parser.add_argument("--concurrency", type=positive_int, default=16,
                        help="requests in flight at once (default: 16)")
    parser.add_argument("--max_retries", type=non_negative_int, default=8,
                        help="retries of a request after a rate limit, server error, timeout or connection "
                             "error, with backoff honouring Retry-After (default: 8)")
    parser.add_argument("--max_parse_retries", type=non_negative_int, default=2,
                        help="requests asked again when no candidate of a reply is usable; then the record "
                             "is written as failed (default: 2)")
    parser.add_argument("--request_timeout", type=positive_float, default=600.0,
                        help="seconds to wait for one reply (default: 600)")
    parser.add_argument("--retry_failed", action=argparse.BooleanOptionalAction, default=False,
                        help="ask again for the records the batch file holds as failed (default: off)")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="log every retry (default: off)")
    args = parser.parse_args(argv)

    try:
        args.dataset_batch_num = slurm_default(args.dataset_batch_num, "SLURM_ARRAY_TASK_COUNT") or 1
        batch_id = slurm_default(args.dataset_batch_id, "SLURM_ARRAY_TASK_ID", array_index=True)
    except InputError as e:
        parser.error(str(e))
    args.dataset_batch_id = 0 if batch_id is None else batch_id
    if args.dataset_batch_num < 1 or not 0 <= args.dataset_batch_id < args.dataset_batch_num:
        parser.error(f"--dataset_batch_id must be in 0..{args.dataset_batch_num - 1} "
                     f"(--dataset_batch_num {args.dataset_batch_num}), got {args.dataset_batch_id}")
    args.base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or None
    if args.base_url and not args.base_url.startswith(("http://", "https://")):
        parser.error(f"--base_url must start with http:// or https://, got {args.base_url!r}")
    return args


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    check_constants()
    records = load_records(args.input_data_path, require_response=True)
    check_evidence(records, args.input_data_path)
    api_key = api_key_from(args)

    start, end = chunk_bounds(len(records), args.dataset_batch_num, args.dataset_batch_id)
    chunk = records[start:end]
    path = batch_path(args.output_directory, args.dataset_batch_id, args.dataset_batch_num)
    done, old_failed = read_batch_file(path, {record["id"] for record in chunk}, args.retry_failed)
    todo = [record for record in chunk if record["id"] not in done]
    reasons = {record["id"]: skip_reason(record) for record in todo}
    to_rewrite = [record for record in todo if reasons[record["id"]] is None]
    logger.info("%d records; chunk %d of %d: records %d..%d (%d), %d already in %s, %d to pass through, "
                "%d to rewrite with %s%s (%s mode, %d at once)",
                len(records), args.dataset_batch_id, args.dataset_batch_num, start, end - 1, len(chunk),
                len(done), path, len(todo) - len(to_rewrite), len(to_rewrite), args.model,
                f" at {args.base_url}" if args.base_url else "", "adaptive" if args.adaptive else "forced",
                args.concurrency)
    unknown = collections.Counter(r["items"][0].get("category") for r in todo
                                  if (reasons[r["id"]] or "").startswith("unknown category"))
    if unknown:
        logger.warning("passing through %d records of unknown categories: %s", sum(unknown.values()),
                       ", ".join(f"{name!r} ({count})" for name, count in unknown.most_common()))

    client = None
    if to_rewrite:
        count_lengths = LengthCounter(args.tokenizer_path)
        client = make_async_client(args.base_url, api_key or NO_KEY, args.request_timeout)
    run = Run(args, api_key, client, count_lengths if to_rewrite else None)
    started = time.perf_counter()
    try:
        with sigterm_as_interrupt(), ProgressWriter(path) as run.writer, \
                tqdm(total=len(chunk), initial=len(done), unit="rec", dynamic_ncols=True,
                     desc=f"chunk {args.dataset_batch_id}") as run.bar:
            for record in todo:
                if reasons[record["id"]] is not None:
                    run.write(passthrough(record, reasons[record["id"]]), "passed")
            if to_rewrite:
                asyncio.run(run.rewrite_all(to_rewrite))
    finally:  # also after a fatal error or an interrupt: say what was done
        elapsed = time.perf_counter() - started
        stats = run.stats
        logger.info("#chunk: %d, already done: %d, rewritten: %d, passed through: %d, failed: %d, requests: %d, "
                    "retries: %d, re-asks: %d, prompt tokens: %d, completion tokens: %d, %.1f s (%.1f records/s)",
                    len(chunk), len(done), stats["rewritten"], stats["passed"], stats["failed"], stats["requests"],
                    stats["retries"], stats["reasks"], stats["prompt_tokens"], stats["completion_tokens"], elapsed,
                    (stats["rewritten"] + stats["failed"]) / elapsed if elapsed > 0 else 0.0)
    if run.interrupted:
        raise KeyboardInterrupt
    failed_total = len(old_failed) + stats["failed"]
    if failed_total:
        logger.warning("%s holds %d failed records (%d from earlier runs); rerun with --retry_failed to ask "
                       "again for them", path, failed_total, len(old_failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
