"""Run the whole ReAlign pipeline on one dataset: classify, retrieve, reformat, merge, filter, evaluate.

Usage:
    python run_pipeline.py --demo        # no key, no network: local stand-ins answer
    export OPENAI_API_KEY=...            # or OPENAI_BASE_URL=http://localhost:8000/v1 for a local server
    export SERPER_API_KEY=...            # optional: without it retrieval is skipped
    python run_pipeline.py --input_data_path data.json --output_directory outputs/data \
        --classifier_backend openai_chat --dry_run
    python run_pipeline.py --input_data_path data.json --output_directory outputs/data \
        --classifier_backend openai_chat --num_processes 4

Inputs -> outputs (all under --output_directory):
    input_realign.json                                 the input converted, when it is not in ReAlign's format
    classified.json                                    stage 1, only when a record has no task label
    retrieval.json, retrieval_clean_evidence.json      stage 2, only when SERPER_API_KEY is set
    rewrite/rewrite_data_{i}_of_{N}_batch.jsonl        stage 3, one file per process
    merged.json                                        stage 4
    final.json                                         stage 5: every record, tagged rewrite/original
    final_<format>.jsonl                               with --output_format: final.json in that format
    evaluation.json, evaluation.md, evaluation.png     the measures: share substantially rewritten, lengths
    report.html                                        one page to browse originals and rewrites
    logs/<stage>.log, logs/<stage>.usage.json          each stage's log, requests, tokens and spend

Every record of the input is checked before anything is sent or written (a bad one stops
the run with one line naming the file, the record and the field, exit status 2); so are
the flags and the keys. Stage 1 runs when a record has no task label (no category, or one
that is not among the 46 tasks), with --classifier_backend: by default the released 13B
classifier on vLLM where a GPU is visible; with none visible the run stops at once and
names what to pass instead (openai_chat: a chat model through the API; openai: a served
classifier). Each stage is the stand-alone script of the same name, run as a child
process with that script's own defaults unless a flag here says otherwise; each resumes
where it stopped, so rerunning this command continues instead of starting over. The
console shows one progress line per running stage (done of total, rate, ETA, spend so
far) and the stages' warnings; the logs keep the detail. A stop signal (Ctrl-C, SIGTERM)
reaches each stage once: the stages then save what finished.

Environment: OPENAI_API_KEY, OPENAI_BASE_URL, SERPER_API_KEY, SERPER_BASE_URL (never
logged, never put on a command line), REALIGN_CACHE_DIR (the request cache).
"""

import argparse
import importlib.util
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

from classify import API_BACKENDS, BACKENDS, needs_label, task_names
from constant import DEFAULT_MODEL
from realign import (
    FatalError,
    InputError,
    batch_file_path,
    chunk_bounds,
    count_records,
    exits_cleanly,
    iter_records,
    iter_records_range,
    positive_float,
    positive_int,
    read_progress_lines,
    setup_logging,
    write_json_list_atomic,
)
from realign.cli import LOG_REFRESH_SECONDS, ArgumentParser, non_negative_float
from realign.client import REASONING_EFFORTS, SERVICE_TIERS, json_object, optional_float, resolve_api_key
from realign.formats import FORMATS

logger = logging.getLogger("run_pipeline")

HERE = os.path.dirname(os.path.abspath(__file__))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEMO_INPUT = os.path.join(HERE, "datasets", "examples", "realign_examples.json")
DEMO_OUTPUT = os.path.join("outputs", "demo")
DEMO_KEY = "demo-key-not-a-secret"  # the stand-ins take any key; nothing real is ever sent
UPPER_BOUND_TASK = "open_qa"  # a dry run's stand-in task for unlabelled records: searched and rewritten
TTY_REFRESH_SECONDS = 1.0  # the progress line on a terminal
SHOWN_IDS = 5


class StageFailed(Exception):
    """A stage exited non-zero: the message names the stage (and the batch ids)."""


# -- the input, the flags and the machine, checked before anything runs ------------------------


def gpu_visible():
    """Whether PyTorch sees a GPU here (False without PyTorch: the API-only install)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.device_count() > 0


def check_input(path):
    """Read every record of the pipeline's input once: ``(records, unlabelled, ids with an
    empty response)``; a bad record stops the run (InputError naming the file, record and field)."""
    names = set(task_names())
    total, unlabelled, empty = 0, 0, []
    for record in iter_records(path, require_response=True):
        total += 1
        unlabelled += needs_label(record, names, overwrite=False)
        if not record["items"][1]["value"].strip():
            empty.append(record["id"])
    if empty:
        shown = ", ".join(repr(i) for i in empty[:SHOWN_IDS]) + (", ..." if len(empty) > SHOWN_IDS else "")
        logger.warning("%s: %d record(s) have an empty response (ids %s): they are left as they are", path,
                       len(empty), shown)
    return total, unlabelled, empty


def choose_classifier(args, unlabelled):
    """The backend of stage 1: the flag, else vLLM where a GPU is visible; with none visible
    the run stops before anything is sent or written (a 13B model does not fit a laptop)."""
    if not unlabelled or args.classifier_backend is not None:
        return args.classifier_backend
    if gpu_visible():
        return "vllm"
    raise InputError(f"{unlabelled} records have no task label and no GPU is visible for the 13B classifier "
                     "(--classifier_backend vllm): pass --classifier_backend openai_chat to label them with a chat "
                     f"model through the API (--classifier_model, default {DEFAULT_MODEL}), or --classifier_backend "
                     "openai --classifier_base_url URL for a served classifier")


def check_keys(args, env):
    """The key the stages need (reformat, a chat classifier), before anything is sent (never logged)."""
    resolve_api_key(None, args.base_url or env.get("OPENAI_BASE_URL"), environ=env)


# -- running the stages ---------------------------------------------------------------------


class ProgressLine:
    """One line on the console for a running stage: records done of total, rate, ETA and
    spend so far, added up over its processes' usage files (which the stages keep current).
    On a terminal it is redrawn in place; elsewhere it is a log line at most every 30 s."""

    def __init__(self, stage, usage_paths, stream=sys.stderr):
        self.stage = stage
        self.usage_paths = usage_paths
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.first = None  # (time, done) of the first reading: the rate counts this run's work
        self.shown = self.started if not self.tty else 0.0  # a log file gets its first line after 30 s
        self.drawn = False
        self.lock = threading.Lock()

    def reading(self):
        done = total = cost = 0
        seen = False
        for path in self.usage_paths:
            usage = read_usage(path)
            if usage.get("running") or usage.get("done") is not None:
                seen = True
                done += usage.get("done") or 0
                total += usage.get("total") or 0
                cost += usage.get("cost_usd") or 0.0
        return (done, total, cost) if seen else None

    def text(self, final=False):
        reading = self.reading()
        now = time.monotonic()
        if reading is None:
            return f"{self.stage}: starting ({format_duration(now - self.started)})"
        done, total, cost = reading
        if self.first is None:
            self.first = (now, done)
        share = f" ({100 * done / total:.0f}%)" if total else ""
        if final:
            return (f"{self.stage}: {done:,} of {total:,} records{share} in {format_duration(now - self.started)}, "
                    f"spend ${cost:.4f}")
        rate = (done - self.first[1]) / (now - self.first[0]) if now > self.first[0] else 0.0
        left = max(0, total - done)
        eta = f"ETA {format_duration(left / rate)}" if rate > 0 else "ETA unknown"
        return f"{self.stage}: {done:,} of {total:,} records{share}, {rate:.1f} records/s, {eta}, spend ${cost:.4f}"

    def update(self, final=False):
        """Show the line (at most every second on a terminal, every 30 s elsewhere); ``final``:
        the stage ended, its last figures stay."""
        now = time.monotonic()
        if not self.usage_paths or (not final and now - self.shown < (TTY_REFRESH_SECONDS if self.tty
                                                                        else LOG_REFRESH_SECONDS)):
            return
        self.shown = now
        with self.lock:
            text = self.text(final)
            if final and self.first is None:  # the stage never said how far it got
                text = None
            if self.tty:
                self.stream.write("\r\033[K" + (text or "") + ("\n" if final and text else ""))
                self.stream.flush()
                self.drawn = not final
            elif text:
                logger.info("%s", text)

    def note(self, text):
        """A line from a stage (its warnings) above the progress line."""
        with self.lock:
            if self.tty and self.drawn:
                self.stream.write("\r\033[K")
            logger.warning("%s", text)
            self.drawn = False


def format_duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def read_usage(path):
    """A stage's ``--usage_path`` JSON, or {} when it wrote none."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class Runner:
    """Starts stage scripts as children, logs each to its own file, shows their progress and
    warnings on the console, and passes a stop signal on once.

    Children run in a session of their own, so that Ctrl-C in the terminal reaches only this
    launcher, which passes it on once (a stage that got two signals would cancel the
    requests in flight instead of saving them).
    """

    def __init__(self, python, log_dir, env):
        self.python = python
        self.log_dir = log_dir
        self.env = env
        self.children = []
        self.stopping = None

    def run(self, stage, jobs):
        """Run ``jobs`` (``(script, args, log name, usage path)``) side by side; a list of
        ``(exit status, stdout, log path)`` in their order."""
        self.check_stopped()  # a signal between two stages: do not start the next one
        os.makedirs(self.log_dir, exist_ok=True)
        for _, _, _, usage in jobs:
            if usage and os.path.exists(usage):
                os.remove(usage)  # an earlier run's figures never count for this one
        line = ProgressLine(stage, [usage for _, _, _, usage in jobs if usage])
        started = [self.start(script, args, log_name, stage, line) for script, args, log_name, _ in jobs]
        while any(child.poll() is None for child, _, _, _ in started):
            line.update()
            time.sleep(0.2)
        for _, _, threads, _ in started:
            for thread in threads:
                thread.join()
        line.update(final=True)
        self.children = []
        self.check_stopped()
        return [(child.returncode, "".join(out), log_path) for child, out, _, log_path in started]

    def start(self, script, args, log_name, stage, line):
        log_path = os.path.join(self.log_dir, f"{log_name}.log")
        command = [self.python, os.path.join(HERE, script), *map(str, args)]
        log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the stderr reader
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 env=self.env, start_new_session=True, text=True, bufsize=1)
        self.children.append(child)
        out = []

        def read_stdout():
            for text in child.stdout:
                out.append(text)

        def read_stderr():
            with log:
                for text in child.stderr:
                    log.write(text)
                    log.flush()
                    if " WARNING " in text or " ERROR " in text or ": error: " in text:
                        line.note(f"{stage}: {text.rstrip().split(': ', 1)[-1]}")

        threads = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
        for thread in threads:
            thread.start()
        return child, out, threads, log_path

    def forward(self, signum, _frame):
        """Pass a stop signal on to every child (once per signal received here); with no
        stage running (converting the input, between stages) stop at once."""
        self.stopping = signum
        running = [child for child in self.children if child.poll() is None]
        for child in running:
            child.send_signal(signum)
        if not running:
            raise KeyboardInterrupt

    def check_stopped(self):
        if self.stopping is not None:
            raise KeyboardInterrupt


# -- the flags passed on to the stages -----------------------------------------------------


def flag_values(args, names):
    """``--name value`` for each of ``names`` given on this command line (None: the stage's default)."""
    out = []
    for name in names:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, dict):
            out += [f"--{name}", json.dumps(value)]
        else:
            out += [f"--{name}", value]
    return out


def cost_flags(args, cap=None, tokens=True):
    """The cache, dry-run and budget flags every paid stage takes, and the token prices for the
    stages that pay by the token (retrieval pays by the search: constant.SEARCH_PRICE)."""
    out = flag_values(args, ("cache_dir", "cache", "refresh_cache") + (("price_input", "price_output") if tokens
                                                                        else ()))
    if args.dry_run:
        out.append("--dry_run")
    if cap is not None:
        out += ["--max_cost", f"{max(cap, 1e-9):.6f}"]
    return out


def reformat_args(args, input_path, rewrite_dir, batch_id, cap):
    command = ["--input_data_path", input_path, "--output_directory", rewrite_dir,
               "--dataset_batch_id", batch_id, "--dataset_batch_num", args.num_processes,
               "--model", args.model, "--usage_path", usage_path(args, f"reformat_{batch_id}")]
    command += flag_values(args, ("base_url", "concurrency", "top_k", "temperature", "top_p", "target_length",
                                  "tokenizer_path", "adaptive", "retry_failed", "reasoning_effort",
                                  "service_tier", "extra_body", "reply_format", "batch_api", "batch_max_requests",
                                  "batch_max_bytes", "poll_interval", "batch_fallback_online", "model_check"))
    # A limit of the key is shared by the processes: each paces itself under its part.
    for name in ("max_requests_per_minute", "max_tokens_per_minute"):
        if getattr(args, name):
            command += [f"--{name}", getattr(args, name) / args.num_processes]
    return command + cost_flags(args, cap)


def usage_path(args, stage):
    return os.path.join(args.output_directory, "logs", f"{stage}.usage.json")


class PipelineSpend:
    """What the stages of the pipeline spent (their usage files), and what each may still
    spend of ``--max_cost``."""

    def __init__(self, cap):
        self.cap = cap
        self.spent = 0.0
        self.dry = []  # the usage files of a dry run, for the total

    def left(self, share=1):
        return None if self.cap is None else max(0.0, self.cap - self.spent) / share

    def add(self, usage):
        if usage.get("dry_run"):
            self.dry.append(usage)
            return
        if isinstance(usage.get("cost_usd"), (int, float)):
            self.spent += usage["cost_usd"]
        if usage.get("stopped") == "budget":
            raise FatalError(f"budget reached: ${self.spent:.4f} of ${self.cap:.4f}; the finished work is kept: "
                             "rerun with a higher --max_cost to continue")

    def dry_total(self):
        """The dry run's one line over every stage: requests, tokens, searches, cost and time."""
        figures = {name: sum(u.get(name) or 0 for u in self.dry)
                   for name in ("requests", "prompt_tokens", "completion_tokens", "searches")}
        costs = [u.get("cost_usd") for u in self.dry]
        cost = "unknown (a price is missing)" if None in costs else f"${sum(costs):,.4f}"
        minutes = [u["minutes"] for u in self.dry if u.get("minutes")]
        time_part = f"{sum(minutes):,.1f} min at the known rate limits" if minutes else "time unknown"
        return (f"dry run total: {figures['requests']:,} requests, {figures['prompt_tokens']:,.0f} prompt tokens, "
                f"{figures['completion_tokens']:,.0f} expected completion tokens, {figures['searches']:,} searches, "
                f"expected cost {cost}, {time_part}")


# -- the stages ------------------------------------------------------------------------


def run_paid_stage(runner, args, spend, stage, script, command):
    """Run a stage that may spend; what it spent (its usage file) counts against --max_cost
    also when it failed (a budget stop says so there). A dry run's report is printed."""
    path = usage_path(args, stage)
    ((code, output, log_path),) = runner.run(stage, [(script, command, stage, path)])
    if args.dry_run:
        print(output, end="")
    spend.add(read_usage(path))
    if code != 0:
        raise StageFailed(f"stage '{stage}' failed with exit status {code}; see {log_path}")


def run_reformat(args, runner, input_path, out, spend):
    """Run one reformat process per batch id side by side, and name the ones that failed."""
    rewrite_dir = os.path.join(out, "rewrite")
    logger.info("stage reformat: %d process%s", args.num_processes, "" if args.num_processes == 1 else "es")
    cap = spend.left(args.num_processes)
    jobs = [("reformat.py", reformat_args(args, input_path, rewrite_dir, batch_id, cap), f"reformat_{batch_id}",
             usage_path(args, f"reformat_{batch_id}")) for batch_id in range(args.num_processes)]
    results = runner.run("reformat", jobs)
    for batch_id, (_, output, _) in enumerate(results):
        if args.dry_run and output:
            print(output, end="")
        spend.add(read_usage(usage_path(args, f"reformat_{batch_id}")))
    unsuccessful = [(batch_id, code, log_path) for batch_id, (code, _, log_path) in enumerate(results) if code]
    if args.dry_run:
        if unsuccessful:
            raise StageFailed("stage 'reformat' (dry run) failed: batch ids " +
                              "; ".join(f"{i} (see {log})" for i, _, log in unsuccessful))
        return rewrite_dir, False
    crashed, with_failed_records = [], []
    total = count_records(input_path) if unsuccessful else 0  # a 1M-record input is not read again for nothing
    for batch_id, code, log_path in unsuccessful:
        missing = missing_ids(input_path, total, batch_file_path(rewrite_dir, batch_id, args.num_processes),
                              args.num_processes, batch_id)
        if missing:
            crashed.append(f"{batch_id} (exit status {code}, {len(missing)} records not done; see {log_path})")
        else:
            with_failed_records.append(batch_id)
    if crashed:
        raise StageFailed("stage 'reformat' failed: batch ids " + "; ".join(crashed))
    if with_failed_records:
        logger.warning(
            "reformat: batch ids %s hold records whose request failed; they keep the original response. "
            "Rerun with --retry_failed to ask again.", ", ".join(map(str, with_failed_records)))
    return rewrite_dir, bool(with_failed_records)


def missing_ids(path, total, batch_file, batch_num, batch_id):
    """The ids of chunk ``batch_id`` that its batch file lacks (streamed)."""
    start, end = chunk_bounds(total, batch_num, batch_id)
    done = read_progress_lines(batch_file)[0]
    return [record["id"] for record in iter_records_range(path, start, end) if record["id"] not in done]


def convert_input(args, out):
    """The input in ReAlign's record format: the file itself, or its conversion."""
    from realign.formats import convert_file, detect_file_format, summary_line

    fmt = args.input_format
    if fmt == "auto":
        fmt, found = detect_file_format(args.input_data_path)
        logger.info("input format: %s", found)
    if fmt == "realign":
        return args.input_data_path
    converted = os.path.join(out, "input_realign.json")
    stats = convert_file(args.input_data_path, converted, fmt, "realign")
    logger.info("converted the input: %s", summary_line(stats))
    return converted


def upper_bound_input(data_path, folder):
    """A copy of the input whose unlabelled records carry the task ``UPPER_BOUND_TASK`` (searched
    and rewritten): what a dry run estimates stages 2 and 3 with before the tasks are known."""
    names = set(task_names())

    def labelled():
        for record in iter_records(data_path):
            if needs_label(record, names, overwrite=False):
                record["items"][0]["category"] = UPPER_BOUND_TASK
            yield record

    path = os.path.join(folder, "upper_bound.json")
    write_json_list_atomic(path, labelled())
    return path


def classify_command(args, data_path, classified, spend):
    command = ["--input_data_path", data_path, "--output_path", classified, "--backend", args.classifier_backend,
               "--usage_path", usage_path(args, "classify")]
    if args.classifier_model:
        command += ["--model", args.classifier_model]
    if args.classifier_base_url:
        command += ["--base_url", args.classifier_base_url]
    if args.classifier_backend == "openai_chat":  # a chat model of the price table
        command += cost_flags(args, spend.left())
    elif args.classifier_backend in API_BACKENDS:  # a served classifier: its own server, no price
        command += cost_flags(args, tokens=False)
    return command + shlex.split(args.classify_args)


def run_stages(args, runner, out, unlabelled, scratch, started):
    spend = PipelineSpend(args.max_cost)
    realign_input = args.realign_input
    data_path = realign_input

    if unlabelled:
        classified = os.path.join(out, "classified.json")
        if args.dry_run and args.classifier_backend not in API_BACKENDS:
            print(f"dry run of classify: {unlabelled:,} queries for the local {args.classifier_backend} classifier "
                  "(no API request, no cost; it needs a GPU)")
        else:
            run_paid_stage(runner, args, spend, "classify", "classify.py",
                           classify_command(args, data_path, classified, spend))
        if args.dry_run:
            data_path = upper_bound_input(data_path, scratch)
            print(f"(stages 2 and 3 below are an upper bound: {unlabelled:,} records have no task yet and are "
                  f"counted as {UPPER_BOUND_TASK}, searched and rewritten)")
        else:
            data_path = classified
    else:
        logger.info("stage classify: skipped, every record already has a task label")

    if runner.env.get("SERPER_API_KEY"):
        retrieval = os.path.join(out, "retrieval.json")
        clean = os.path.join(out, "retrieval_clean_evidence.json")
        command = ["--input_data_path", data_path, "--output_path", retrieval, "--usage_path",
                   usage_path(args, "retrieval")]
        command += flag_values(args, ("search_url",))
        if args.retrieval_batch_size:
            command += ["--batch_size", args.retrieval_batch_size]
        command += cost_flags(args, spend.left(), tokens=False)
        retrieval_started = time.time()
        try:
            run_paid_stage(runner, args, spend, "retrieval", "retrieval.py", command)
        except StageFailed:
            if not args.allow_retrieval_failures:
                raise
            logger.warning("retrieval: some searches failed; going on without their evidence")
        if args.dry_run:
            pass
        elif os.path.exists(clean) and os.path.getmtime(clean) >= retrieval_started:
            data_path = clean
        else:  # a fatal failure wrote nothing: an evidence file there is an earlier run's
            logger.warning("retrieval wrote no evidence in this run: reformatting without evidence")
    else:
        logger.warning("stage retrieval: skipped, SERPER_API_KEY is not set (records are reformatted without evidence)")

    rewrite_dir, had_failed_records = run_reformat(args, runner, data_path, out, spend)
    if args.dry_run:
        print(spend.dry_total() + (" (stages 2 and 3: an upper bound)" if unlabelled else ""))
        return 0

    merged = os.path.join(out, "merged.json")
    run_free_stage(runner, "merge", "parallel_data_merge.py", [
        "--input_data_path", data_path, "--output_directory", rewrite_dir, "--final_output_path", merged])

    final = os.path.join(out, "final.json")
    command = ["--input_data_path", data_path, "--input_rewrite_data_path", merged,
               "--output_path", final, "--rules", args.rules, "--length_threshold", args.length_threshold,
               "--keep_reasons" if args.keep_reasons else "--no-keep_reasons"]
    if args.tokenizer_path:
        command += ["--tokenizer_path", args.tokenizer_path]
    run_free_stage(runner, "filter", "rewrite_data_selection.py", command)

    if args.output_format != "realign":
        from realign.formats import convert_file, summary_line

        converted = os.path.join(out, f"final_{args.output_format}.jsonl")
        stats = convert_file(final, converted, "realign", args.output_format, keep_original=args.keep_original,
                             original_path=realign_input if args.keep_original else None)
        logger.info("wrote %s: %s", converted, summary_line(stats))

    report = None
    if args.evaluate:
        evaluation = os.path.join(out, "evaluation.json")
        report = os.path.join(out, "report.html")
        command = ["--input_data_path", data_path, "--rewritten_path", final, "--merged_path", merged,
                   "--rewrite_directory", rewrite_dir, "--output_path", evaluation,
                   "--report_path", os.path.join(out, "evaluation.md"),
                   "--plot_path", os.path.join(out, "evaluation.png"), "--html_path", report]
        if args.tokenizer_path:
            command += ["--tokenizer_path", args.tokenizer_path]
        run_free_stage(runner, "evaluate", "evaluate.py", command)
        headline = read_usage(evaluation).get("headline")
        if headline:
            logger.info("%s", headline)
    took = time.monotonic() - started
    if args.demo:
        logger.info("done in %.1f s: %s; spend: $0 (the stand-ins are free; at %s's prices this run would cost "
                    "$%.4f)", took, final, args.model, spend.spent)
    else:
        logger.info("done in %.1f s: %s; spend this run: $%.4f", took, final, spend.spent)
    if report:
        logger.info("browse the originals and rewrites: open %s in a browser", report)
    return 1 if had_failed_records else 0


def run_free_stage(runner, stage, script, command):
    ((code, _, log_path),) = runner.run(stage, [(script, command, stage, None)])
    if code != 0:
        raise StageFailed(f"stage '{stage}' failed with exit status {code}; see {log_path}")


# -- command line --------------------------------------------------------------------


def number_or_none(text):
    """A sampling value passed on as written: a number, or ``none`` (leave the field out)."""
    optional_float(text)
    return text


def parse_args(argv=None):
    p = ArgumentParser(description="Run the whole ReAlign pipeline on one dataset (see the module docstring: "
                                   "python -c 'import run_pipeline; help(run_pipeline)').")
    p.add_argument("--input_data_path", default=None,
                   help="dataset: JSON list, JSONL or Parquet, in ReAlign's, Alpaca's, ShareGPT's or the "
                        "messages format (see --input_format) (default: none; required without --demo)")
    p.add_argument("--output_directory", default=None,
                   help=f"folder for every stage's output and logs (default: none; required without --demo, "
                        f"{DEMO_OUTPUT} with it)")
    p.add_argument("--demo", action="store_true",
                   help="run the whole pipeline on datasets/examples with local stand-ins for OpenAI and Serper "
                        f"(no key, no network, nothing billed) into {DEMO_OUTPUT} (default: off)")
    p.add_argument("--input_format", choices=("auto", *FORMATS), default="auto",
                   help="format of the input records (default: auto, detected from the first records)")
    p.add_argument("--output_format", choices=FORMATS, default="realign",
                   help="also write final.json in this format, as final_<format>.jsonl (default: realign only)")
    p.add_argument("--keep_original", action="store_true",
                   help="with --output_format: keep the original response as an extra field (default: off)")
    g = p.add_argument_group("stage 1: classify (when a record has no task label)")
    g.add_argument("--classifier_backend", choices=BACKENDS, default=None,
                   help="how to label the tasks: vllm (the released 13B classifier, needs a GPU), openai (a served "
                        "classifier, --classifier_base_url), openai_chat (any chat model through the API, no GPU), "
                        "transformers (default: vllm where a GPU is visible; with none the run stops and says so)")
    g.add_argument("--classifier_model", default=None,
                   help="classifier: Hugging Face name or local folder, served model name, or chat model "
                        "(default: classify.py's for the backend)")
    g.add_argument("--classifier_base_url", default=None,
                   help="with --classifier_backend openai/openai_chat: the endpoint, e.g. a vllm serve URL "
                        "(default: classify.py's)")
    g.add_argument("--classify_args", default="",
                   help="extra flags for classify.py, as one string, e.g. \"--dtype float32 --enforce_eager\" "
                        "(default: none)")
    g = p.add_argument_group("stage 2: retrieval (only when SERPER_API_KEY is set)")
    g.add_argument("--retrieval_batch_size", type=positive_int, default=None,
                   help="searches in flight at once (default: retrieval.py's, 10)")
    g.add_argument("--search_url", default=None,
                   help="search endpoint (default: $SERPER_BASE_URL, else Serper's)")
    g.add_argument("--allow_retrieval_failures", action="store_true",
                   help="go on when some searches still failed after retries; those records get no evidence "
                        "(default: off)")
    g = p.add_argument_group("stage 3: reformat (unset flags take reformat.py's defaults)")
    g.add_argument("--num_processes", type=positive_int, default=1,
                   help="reformat processes, one per batch id (default: 1)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"the rewriting model (default: {DEFAULT_MODEL})")
    g.add_argument("--base_url", default=None,
                   help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    g.add_argument("--concurrency", type=positive_int, default=None,
                   help="requests in flight per process (default: reformat.py's, 16)")
    g.add_argument("--top_k", type=positive_int, default=None, help="candidates sampled per record (default: 2)")
    g.add_argument("--temperature", type=number_or_none, default=None,
                   help="sampling temperature, or none to leave it out (default: 0.3)")
    g.add_argument("--top_p", type=number_or_none, default=None, help="nucleus sampling, or none (default: 1)")
    g.add_argument("--target_length", type=positive_int, default=None, help="output cap per candidate (default: 2048)")
    g.add_argument("--reply_format", choices=("json", "text"), default=None,
                   help="how the model lays out its reply (default: reformat.py's, json)")
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer to count lengths (reformat, filter, evaluation) (default: none, words)")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="let the model keep a response whose format does not fit; --no-adaptive forces it "
                        "(default: on)")
    g.add_argument("--retry_failed", action="store_true", default=None,
                   help="ask again for records whose request failed or whose candidates all failed the checks "
                        "(default: off)")
    g.add_argument("--reasoning_effort", choices=REASONING_EFFORTS, default=None,
                   help="reasoning effort (default: reformat.py's: not sent, or the model's lowest)")
    g.add_argument("--service_tier", choices=SERVICE_TIERS, default=None,
                   help="OpenAI service tier, flex: half price (default: not sent)")
    g.add_argument("--extra_body", type=json_object, default=None,
                   help="JSON object merged into every request (default: none)")
    g.add_argument("--model_check", action=argparse.BooleanOptionalAction, default=None,
                   help="check that the server offers the model; --no-model_check for a gateway with aliases "
                        "(default: on)")
    g.add_argument("--max_requests_per_minute", type=positive_float, default=None,
                   help="the key's request limit, shared by the processes (default: learned from the headers)")
    g.add_argument("--max_tokens_per_minute", type=positive_float, default=None,
                   help="the key's token limit, shared by the processes (default: learned from the headers)")
    g.add_argument("--batch_api", action=argparse.BooleanOptionalAction, default=None,
                   help="send the reformat requests through OpenAI's Batch API: half price, results within 24 h "
                        "(default: off)")
    g.add_argument("--batch_max_requests", type=positive_int, default=None,
                   help="lines per Batch API request file (default: 50,000)")
    g.add_argument("--batch_max_bytes", type=positive_int, default=None,
                   help="bytes per Batch API request file (default: 200,000,000)")
    g.add_argument("--poll_interval", type=positive_float, default=None,
                   help="seconds between Batch API polls (default: 60)")
    g.add_argument("--batch_fallback_online", action=argparse.BooleanOptionalAction, default=None,
                   help="with --batch_api: the last try of a failed line goes online (default: off)")
    g = p.add_argument_group("stage 5: filter")
    g.add_argument("--rules", default="open_platypus",
                   choices=["open_platypus", "alpaca", "no_robots", "gsm8k", "math", "none"],
                   help="filter preset; the quality checks run first in every one (default: open_platypus)")
    g.add_argument("--length_threshold", type=non_negative_float, default=0.5,
                   help="reject a rewrite at most this many times the original's length (default: 0.5)")
    g.add_argument("--keep_reasons", action=argparse.BooleanOptionalAction, default=True,
                   help="name the rule or quality check that rejected each rewrite in final.json's reject_reason "
                        "(default: on; the report counts them)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the result into evaluation.json/.md/.png and report.html (default: on)")
    g = p.add_argument_group("cost")
    g.add_argument("--cache_dir", default=None,
                   help="request cache folder (default: $REALIGN_CACHE_DIR, else ~/.cache/realign)")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="use the request cache (default: on)")
    g.add_argument("--refresh_cache", action="store_true", default=None,
                   help="do not answer from the cache, but store the new replies (default: off)")
    g.add_argument("--dry_run", action="store_true",
                   help="send nothing: print per stage and in total the requests, searches, tokens, cost and time "
                        "it would take (default: off)")
    g.add_argument("--max_cost", type=positive_float, default=None,
                   help="USD this run may spend over all stages; each stage stops starting requests before it "
                        "(default: no cap)")
    g.add_argument("--price_input", type=positive_float, default=None,
                   help="USD per million prompt tokens (default: constant.MODEL_PRICES)")
    g.add_argument("--price_output", type=positive_float, default=None,
                   help="USD per million completion tokens (default: constant.MODEL_PRICES)")
    p.add_argument("--python", default=sys.executable,
                   help="Python interpreter that runs the stages (default: this one)")
    args = p.parse_args(argv)
    if args.demo:
        args.input_data_path = args.input_data_path or DEMO_INPUT
        args.output_directory = args.output_directory or DEMO_OUTPUT
    elif not args.input_data_path or not args.output_directory:
        p.error("--input_data_path and --output_directory are required (or --demo)")
    return args


def demo_environment(args, stack):
    """Start the stand-ins for OpenAI and Serper in this process; the stages' environment."""
    from realign.demo import StandIn

    openai = stack.enter_context(StandIn("openai"))
    serper = stack.enter_context(StandIn("serper"))
    args.base_url = None
    env = dict(os.environ)
    env.update(OPENAI_API_KEY=DEMO_KEY, OPENAI_BASE_URL=openai.url, SERPER_API_KEY=DEMO_KEY,
               SERPER_BASE_URL=serper.url, REALIGN_CACHE_DIR=os.path.join(args.output_directory, "cache"))
    env.pop("OPENAI_ORG_ID", None)
    logger.warning("demo: the answers come from local stand-ins for OpenAI (%s) and Serper (%s) "
                   "(realign/demo.py), not from a model: each rewrite is the original response under an "
                   "'**Answer**' heading, each search finds three made-up results. Nothing leaves this machine, "
                   "and nothing is billed.", openai.url, serper.url)
    return env


@exits_cleanly
def main(argv=None):
    import contextlib

    args = parse_args(argv)
    setup_logging()
    out = args.output_directory
    started = time.monotonic()
    if not os.path.exists(args.input_data_path):
        raise InputError(f"{args.input_data_path}: file not found")  # before any folder is made
    with contextlib.ExitStack() as stack:
        env = demo_environment(args, stack) if args.demo else dict(os.environ)
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="realign-"))
        # Everything that can be checked is checked before anything is sent or written.
        args.realign_input = convert_input(args, scratch if args.input_format != "realign" else out)
        total, unlabelled, _ = check_input(args.realign_input)
        args.classifier_backend = choose_classifier(args, unlabelled)
        if not args.dry_run:
            check_keys(args, env)
        os.makedirs(out, exist_ok=True)
        if args.realign_input.startswith(scratch):  # the converted input is kept with the outputs
            converted = os.path.join(out, "input_realign.json")
            os.replace(args.realign_input, converted)
            args.realign_input = converted
        logger.info("%s: %d records, %d without a task label", args.input_data_path, total, unlabelled)
        runner = Runner(args.python, os.path.join(out, "logs"), env)
        previous = {s: signal.signal(s, runner.forward) for s in STOP_SIGNALS}
        try:
            status = run_stages(args, runner, out, unlabelled, scratch, started)
        except StageFailed as e:
            logger.error("%s (after %.1f s)", e, time.monotonic() - started)
            return 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return status


if __name__ == "__main__":
    sys.exit(main())
