"""Run the whole ReAlign pipeline on one dataset: classify, retrieve, reformat, merge, filter, evaluate.

Usage:
    python run_pipeline.py --demo        # no key, no network: local stand-ins answer
    export OPENAI_API_KEY=...            # or OPENAI_BASE_URL=http://localhost:8000/v1 for a local server
    export SERPER_API_KEY=...            # optional: without it retrieval is skipped
    python run_pipeline.py --input_data_path datasets/examples/realign_examples.json \
        --output_directory outputs/examples --num_processes 4

Inputs -> outputs (all under --output_directory):
    input_realign.json                                 the input converted, when it is not in ReAlign's format
    classified.json                                    stage 1, only when a record lacks a category
    retrieval.json, retrieval_clean_evidence.json      stage 2, only when SERPER_API_KEY is set
    rewrite/rewrite_data_{i}_of_{N}_batch.jsonl        stage 3, one file per process
    merged.json                                        stage 4
    final.json                                         stage 5: every record, tagged rewrite/original
    final_<format>.jsonl                               with --output_format: final.json in that format
    evaluation.json, evaluation.md, evaluation.png     what ReAlign did: share rewritten, lengths
    logs/<stage>.log, logs/<stage>.usage.json          each stage's log, requests, tokens and spend

Each stage is the stand-alone script of the same name, run as a child process with that
script's own defaults unless a flag here says otherwise; each resumes where it stopped, so
rerunning this command after an interruption continues instead of starting over. A stop
signal (Ctrl-C, SIGTERM) reaches each stage once: the stages then save what finished.

Environment: OPENAI_API_KEY, OPENAI_BASE_URL, SERPER_API_KEY (never logged, never put on a
command line), REALIGN_CACHE_DIR (the request cache).
"""

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

from classify import API_BACKENDS, BACKENDS
from constant import DEFAULT_MODEL
from realign import (
    FatalError,
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
)
from realign.client import REASONING_EFFORTS, SERVICE_TIERS, json_object, optional_float
from realign.formats import FORMATS

logger = logging.getLogger("run_pipeline")

HERE = os.path.dirname(os.path.abspath(__file__))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEMO_INPUT = os.path.join(HERE, "datasets", "examples", "realign_examples.json")
DEMO_OUTPUT = os.path.join("outputs", "demo")
DEMO_KEY = "demo-key-not-a-secret"  # the stand-ins check it; nothing real is ever sent


class StageFailed(Exception):
    """A stage exited non-zero: the message names the stage (and the batch ids)."""


def needs_classification(path):
    """Whether a record of ``path`` lacks a category (streamed; stops at the first one)."""
    return any(not isinstance(r["items"][0].get("category"), str) for r in iter_records(path))


def missing_ids(path, total, batch_file, batch_num, batch_id):
    """The ids of chunk ``batch_id`` that its batch file lacks (streamed)."""
    start, end = chunk_bounds(total, batch_num, batch_id)
    done = read_progress_lines(batch_file)[0]
    return [record["id"] for record in iter_records_range(path, start, end) if record["id"] not in done]


def read_usage(path):
    """A stage's ``--usage_path`` JSON, or {} when it wrote none."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class Runner:
    """Starts stage scripts as children, logs each to its own file, passes a stop signal on once.

    Children run in a session of their own, so that Ctrl-C in the terminal reaches only this
    launcher, which passes it on once (a stage that got two signals would cancel the
    requests in flight instead of saving them).
    """

    def __init__(self, python, log_dir, env=None):
        self.python = python
        self.log_dir = log_dir
        self.env = env
        self.children = []
        self.stopping = None

    def start(self, script, args, log_name, capture=False):
        self.check_stopped()  # a signal between two stages: do not start the next one
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{log_name}.log")
        command = [self.python, os.path.join(HERE, script), *map(str, args)]
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            child = subprocess.Popen(command, stdout=subprocess.PIPE if capture else log, stderr=log,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                                     text=capture or None)
        self.children.append(child)
        return child, log_path

    def wait(self, child):
        output = child.communicate()[0]  # PEP 475: a signal handled here does not interrupt it
        self.children.remove(child)
        return child.returncode, output

    def run(self, stage, script, args, capture=False):
        logger.info("stage %s: %s", stage, script)
        child, log_path = self.start(script, args, stage, capture)
        code, output = self.wait(child)
        self.check_stopped()
        if code != 0:
            raise StageFailed(f"stage '{stage}' failed with exit status {code}; see {log_path}")
        return output

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


def cost_flags(args, budget=None, tokens=True):
    """The cache, dry-run and budget flags every paid stage takes, and the token prices for the
    stages that pay by the token (retrieval pays by the search: constant.SEARCH_PRICE)."""
    out = flag_values(args, ("cache_dir", "cache", "refresh_cache") + (("price_input", "price_output") if tokens
                                                                        else ()))
    if args.dry_run:
        out.append("--dry_run")
    if budget is not None:
        out += ["--max_cost", f"{max(budget, 1e-9):.6f}"]
    return out


def reformat_args(args, input_path, rewrite_dir, batch_id, budget):
    command = ["--input_data_path", input_path, "--output_directory", rewrite_dir,
               "--dataset_batch_id", batch_id, "--dataset_batch_num", args.num_processes,
               "--model", args.model, "--usage_path", usage_path(args, f"reformat_{batch_id}")]
    command += flag_values(args, ("base_url", "concurrency", "top_k", "temperature", "top_p", "target_length",
                                  "tokenizer_path", "adaptive", "retry_failed", "reasoning_effort",
                                  "service_tier", "extra_body", "batch_api", "batch_max_requests",
                                  "batch_max_bytes", "poll_interval", "batch_fallback_online"))
    # A limit of the key is shared by the processes: each paces itself under its part.
    for name in ("max_requests_per_minute", "max_tokens_per_minute"):
        if getattr(args, name):
            command += [f"--{name}", getattr(args, name) / args.num_processes]
    return command + cost_flags(args, budget)


def usage_path(args, stage):
    return os.path.join(args.output_directory, "logs", f"{stage}.usage.json")


class PipelineSpend:
    """What the stages of the pipeline spent (their usage files), and what each may still
    spend of ``--max_cost``."""

    def __init__(self, cap):
        self.cap = cap
        self.spent = 0.0

    def left(self, share=1):
        return None if self.cap is None else max(0.0, self.cap - self.spent) / share

    def add(self, usage):
        if isinstance(usage.get("cost_usd"), (int, float)) and not usage.get("dry_run"):
            self.spent += usage["cost_usd"]
        if usage.get("stopped") == "budget":
            raise FatalError(f"budget reached: ${self.spent:.4f} of ${self.cap:.4f}; the finished work is kept: "
                             "rerun with a higher --max_cost to continue")


# -- the stages ------------------------------------------------------------------------


def run_paid_stage(runner, args, budget, stage, script, command):
    """Run a stage that may spend; what it spent (its --usage_path file) counts against
    --max_cost also when it failed (a budget stop says so there). A dry run's report is printed."""
    try:
        output = runner.run(stage, script, command, capture=args.dry_run)
    except StageFailed:
        budget.add(read_usage(usage_path(args, stage)))
        raise
    if args.dry_run:
        print(output, end="")
    budget.add(read_usage(usage_path(args, stage)))


def run_reformat(args, runner, input_path, out, budget):
    """Start one reformat process per batch id, wait for all, and name the ones that failed."""
    rewrite_dir = os.path.join(out, "rewrite")
    started = []
    logger.info("stage reformat: %d process%s", args.num_processes, "" if args.num_processes == 1 else "es")
    share = budget.left(args.num_processes)
    for batch_id in range(args.num_processes):
        child, log_path = runner.start("reformat.py", reformat_args(args, input_path, rewrite_dir, batch_id, share),
                                       f"reformat_{batch_id}", capture=args.dry_run)
        started.append((batch_id, child, log_path))
    results = [(batch_id, *runner.wait(child), log_path) for batch_id, child, log_path in started]
    runner.check_stopped()
    for batch_id, _, output, _ in results:
        if args.dry_run and output:
            print(output, end="")
        budget.add(read_usage(usage_path(args, f"reformat_{batch_id}")))
    if args.dry_run:
        failed = [f"{batch_id} (see {log_path})" for batch_id, code, _, log_path in results if code]
        if failed:
            raise StageFailed("stage 'reformat' (dry run) failed: batch ids " + "; ".join(failed))
        return rewrite_dir, False

    crashed, with_failed_records = [], []
    unsuccessful = [(batch_id, code, log_path) for batch_id, code, _, log_path in results if code]
    total = count_records(input_path) if unsuccessful else 0  # a 1M-record input is not read again for nothing
    for batch_id, code, log_path in unsuccessful:
        batch_file = batch_file_path(rewrite_dir, batch_id, args.num_processes)
        missing = missing_ids(input_path, total, batch_file, args.num_processes, batch_id)
        if missing:
            crashed.append(f"{batch_id} (exit status {code}, {len(missing)} records not done; see {log_path})")
        else:
            with_failed_records.append(batch_id)
    if crashed:
        raise StageFailed("stage 'reformat' failed: batch ids " + "; ".join(crashed))
    if with_failed_records:
        logger.warning(
            "reformat: batch ids %s hold records whose rewrite failed; they keep the original response. "
            "Rerun with --retry_failed to ask again.", ", ".join(map(str, with_failed_records)))
    return rewrite_dir, bool(with_failed_records)


def convert_input(args, out):
    """The input in ReAlign's record format: the file itself, or its conversion."""
    from realign.formats import convert_file, detect_file_format, summary_line

    fmt = args.input_format
    if fmt == "auto":
        fmt, found = detect_file_format(args.input_data_path)
        logger.info("input format: %s (%s)", fmt, found)
    if fmt == "realign":
        return args.input_data_path
    converted = os.path.join(out, "input_realign.json")
    stats = convert_file(args.input_data_path, converted, fmt, "realign")
    logger.info("converted the input: %s", summary_line(stats))
    return converted


def run_stages(args, runner, out):
    budget = PipelineSpend(args.max_cost)
    realign_input = convert_input(args, out)
    data_path = realign_input

    if needs_classification(data_path):
        classified = os.path.join(out, "classified.json")
        api = args.classifier_backend in API_BACKENDS
        if args.dry_run and not api:
            logger.warning("stage classify (dry run): the %s backend runs locally and costs no API request; "
                           "records without a category are left out of the estimates below",
                           args.classifier_backend)
        else:
            command = ["--input_data_path", data_path, "--output_path", classified,
                       "--backend", args.classifier_backend, "--usage_path", usage_path(args, "classify")]
            if args.classifier_model:
                command += ["--model", args.classifier_model]
            if args.classifier_base_url:
                command += ["--base_url", args.classifier_base_url]
            if args.classifier_backend == "openai_chat":  # a chat model of the price table
                command += cost_flags(args, budget.left())
            elif api:  # a served classifier: its own server, no price; the cache and dry run apply
                command += cost_flags(args, tokens=False)
            run_paid_stage(runner, args, budget, "classify", "classify.py",
                           command + shlex.split(args.classify_args))
            if args.dry_run:
                logger.warning("dry run: records without a category are left out of the estimates below "
                               "(their task is known only once stage 1 has run)")
        if not args.dry_run or os.path.exists(classified):
            data_path = classified
    else:
        logger.info("stage classify: skipped, every record already has a category")

    if (runner.env or os.environ).get("SERPER_API_KEY"):
        retrieval = os.path.join(out, "retrieval.json")
        command = ["--input_data_path", data_path, "--output_path", retrieval,
                   "--usage_path", usage_path(args, "retrieval")]
        command += flag_values(args, ("search_url",))
        if args.retrieval_batch_size:
            command += ["--batch_size", args.retrieval_batch_size]
        command += cost_flags(args, budget.left(), tokens=False)
        try:
            run_paid_stage(runner, args, budget, "retrieval", "retrieval.py", command)
        except StageFailed:
            if not args.allow_retrieval_failures:
                raise
            logger.warning("retrieval: some searches failed; going on without their evidence")
        clean = os.path.join(out, "retrieval_clean_evidence.json")
        if not args.dry_run or os.path.exists(clean):
            data_path = clean
        else:
            logger.warning("dry run: the reformat estimate leaves out the evidence retrieval would add")
    else:
        logger.warning("stage retrieval: skipped, SERPER_API_KEY is not set (records are reformatted without evidence)")

    rewrite_dir, had_failed_records = run_reformat(args, runner, data_path, out, budget)
    if args.dry_run:
        logger.info("dry run: nothing was sent; the stages after reformat cost nothing")
        return 0

    merged = os.path.join(out, "merged.json")
    runner.run("merge", "parallel_data_merge.py", [
        "--input_data_path", data_path, "--output_directory", rewrite_dir, "--final_output_path", merged])

    final = os.path.join(out, "final.json")
    command = ["--input_original_data_path", data_path, "--input_rewrite_data_path", merged,
               "--output_path", final, "--rules", args.rules, "--length_threshold", args.length_threshold]
    if args.tokenizer_path:
        command += ["--tokenizer_path", args.tokenizer_path]
    command.append("--keep_reasons" if args.keep_reasons else "--no-keep_reasons")
    runner.run("filter", "rewrite_data_selection.py", command)

    if args.output_format != "realign":
        from realign.formats import convert_file, summary_line

        converted = os.path.join(out, f"final_{args.output_format}.jsonl")
        stats = convert_file(final, converted, "realign", args.output_format, keep_original=args.keep_original,
                             original_path=realign_input if args.keep_original else None)
        logger.info("wrote %s: %s", converted, summary_line(stats))

    if args.evaluate:
        evaluation = os.path.join(out, "evaluation.json")
        command = ["--original_path", data_path, "--rewritten_path", final, "--output_path", evaluation,
                   "--rewrite_directory", rewrite_dir,
                   "--report_path", os.path.join(out, "evaluation.md"),
                   "--plot_path", os.path.join(out, "evaluation.png")]
        if args.tokenizer_path:
            command += ["--tokenizer_path", args.tokenizer_path]
        runner.run("evaluate", "evaluate.py", command)
        headline = read_usage(evaluation).get("headline")
        if headline:
            logger.info("%s", headline)
    spent = f"; spend this run: ${budget.spent:.4f}" if budget.spent else ""
    logger.info("done: %s%s", final, spent)
    return 1 if had_failed_records else 0


# -- command line --------------------------------------------------------------------


def number_or_none(text):
    """A sampling value passed on as written: a number, or ``none`` (leave the field out)."""
    optional_float(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input_data_path", default=None,
                   help="dataset: JSON list, JSONL or Parquet, in ReAlign's, Alpaca's, ShareGPT's or the "
                        "messages format (see --input_format)")
    p.add_argument("--output_directory", default=None, help="folder for every stage's output and logs")
    p.add_argument("--demo", action="store_true",
                   help="run the whole pipeline on datasets/examples with local stand-ins for OpenAI and Serper "
                        f"(no key, no network) into {DEMO_OUTPUT} (or --output_directory)")
    p.add_argument("--input_format", choices=("auto", *FORMATS), default="auto",
                   help="format of the input records (default: auto, detected from the first records)")
    p.add_argument("--output_format", choices=FORMATS, default="realign",
                   help="also write final.json in this format, as final_<format>.jsonl (default: realign only)")
    p.add_argument("--keep_original", action="store_true",
                   help="with --output_format: keep the original response as an extra field")
    g = p.add_argument_group("stage 1: classify (only when a record lacks a category)")
    g.add_argument("--classifier_backend", choices=BACKENDS, default="vllm",
                   help="how to run the task classifier (openai_chat: any chat model, no GPU)")
    g.add_argument("--classifier_model", default=None,
                   help="classifier: Hugging Face name or local folder, served model name, or chat model "
                        "(default: classify.py's for the backend)")
    g.add_argument("--classifier_base_url", default=None,
                   help="with --classifier_backend openai/openai_chat: the endpoint, e.g. a vllm serve URL")
    g.add_argument("--classify_args", default="",
                   help="extra flags for classify.py, as one string, e.g. \"--dtype float32 --enforce_eager\"")
    g = p.add_argument_group("stage 2: retrieval (only when SERPER_API_KEY is set)")
    g.add_argument("--retrieval_batch_size", type=positive_int, default=None,
                   help="searches in flight at once (default: retrieval.py's, 10)")
    g.add_argument("--search_url", default=None, help="search endpoint (default: Serper's)")
    g.add_argument("--allow_retrieval_failures", action="store_true",
                   help="go on when some searches still failed after retries (those records get no evidence)")
    g = p.add_argument_group("stage 3: reformat (unset flags take reformat.py's defaults)")
    g.add_argument("--num_processes", type=positive_int, default=1, help="reformat processes, one per batch id")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"the rewriting model (default: {DEFAULT_MODEL})")
    g.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL or OpenAI)")
    g.add_argument("--concurrency", type=positive_int, default=None, help="requests in flight per process")
    g.add_argument("--top_k", type=positive_int, default=None, help="candidates sampled per record")
    g.add_argument("--temperature", type=number_or_none, default=None, help="sampling temperature (or none)")
    g.add_argument("--top_p", type=number_or_none, default=None, help="nucleus sampling (or none)")
    g.add_argument("--target_length", type=positive_int, default=None, help="output cap per candidate")
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer to count lengths (reformat, filter, evaluation); words when not given")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="let the model keep a response whose format does not fit (--no-adaptive forces it)")
    g.add_argument("--retry_failed", action="store_true", default=None,
                   help="ask again for records whose rewrite failed")
    g.add_argument("--reasoning_effort", choices=REASONING_EFFORTS, default=None, help="reasoning effort")
    g.add_argument("--service_tier", choices=SERVICE_TIERS, default=None, help="OpenAI service tier (flex: half price)")
    g.add_argument("--extra_body", type=json_object, default=None, help="JSON object merged into every request")
    g.add_argument("--max_requests_per_minute", type=positive_float, default=None,
                   help="the key's request limit, shared by the processes (default: learned from the headers)")
    g.add_argument("--max_tokens_per_minute", type=positive_float, default=None,
                   help="the key's token limit, shared by the processes (default: learned from the headers)")
    g.add_argument("--batch_api", action=argparse.BooleanOptionalAction, default=None,
                   help="send the reformat requests through OpenAI's Batch API: half price, results within 24 h")
    g.add_argument("--batch_max_requests", type=positive_int, default=None, help="lines per Batch API request file")
    g.add_argument("--batch_max_bytes", type=positive_int, default=None, help="bytes per Batch API request file")
    g.add_argument("--poll_interval", type=positive_float, default=None, help="seconds between Batch API polls")
    g.add_argument("--batch_fallback_online", action=argparse.BooleanOptionalAction, default=None,
                   help="with --batch_api: the last try of a failed line goes online")
    g = p.add_argument_group("stage 5: filter")
    g.add_argument("--rules", default="open_platypus",
                   choices=["open_platypus", "alpaca", "no_robots", "gsm8k", "math", "none"], help="filter preset")
    g.add_argument("--length_threshold", type=float, default=0.5, help="reject rewrites at most this x original length")
    g.add_argument("--keep_reasons", action=argparse.BooleanOptionalAction, default=True,
                   help="name the rule or quality check that rejected each rewrite in final.json's reject_reason "
                        "(default: on; the report counts them)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the result (share rewritten, lengths) into evaluation.json/.md/.png (default: on)")
    g = p.add_argument_group("cost")
    g.add_argument("--cache_dir", default=None, help="request cache folder (default: $REALIGN_CACHE_DIR or ~/.cache/realign)")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="use the request cache (default: on)")
    g.add_argument("--refresh_cache", action="store_true", default=None,
                   help="do not answer from the cache, but store the new replies")
    g.add_argument("--dry_run", action="store_true",
                   help="send nothing: print per stage the requests, searches, tokens, cost and time it would take")
    g.add_argument("--max_cost", type=positive_float, default=None,
                   help="USD this run may spend over all stages; each stage stops starting requests before it")
    g.add_argument("--price_input", type=positive_float, default=None, help="USD per million prompt tokens")
    g.add_argument("--price_output", type=positive_float, default=None, help="USD per million completion tokens")
    p.add_argument("--python", default=sys.executable, help="Python interpreter that runs the stages")
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
    with contextlib.ExitStack() as stack:
        env = demo_environment(args, stack) if args.demo else None
        os.makedirs(out, exist_ok=True)
        runner = Runner(args.python, os.path.join(out, "logs"), env)
        previous = {s: signal.signal(s, runner.forward) for s in STOP_SIGNALS}
        try:
            status = run_stages(args, runner, out)
        except StageFailed as e:
            logger.error("%s", e)
            return 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            logger.info("pipeline ran %.1fs", time.monotonic() - started)
        if args.demo:
            logger.info("demo done: %s and %s (stand-in answers, see above)", os.path.join(out, "final.json"),
                        os.path.join(out, "evaluation.md"))
        return status


if __name__ == "__main__":
    sys.exit(main())
