"""Run the whole ReAlign pipeline on one dataset: classify, retrieve, reformat, merge, filter.

Usage:
    export OPENAI_API_KEY=...        # or OPENAI_BASE_URL=http://localhost:8000/v1 for a local server
    export SERPER_API_KEY=...        # optional: without it retrieval is skipped
    python run_pipeline.py --input_data_path datasets/examples/realign_examples.json \
        --output_directory outputs/examples --num_processes 4

Inputs -> outputs (all under --output_directory):
    classified.json                                    stage 1, only when a record lacks a category
    retrieval.json, retrieval_clean_evidence.json      stage 2, only when SERPER_API_KEY is set
    rewrite/rewrite_data_{i}_of_{N}_batch.jsonl        stage 3, one file per process
    merged.json                                        stage 4
    final.json                                         stage 5: every record, tagged rewrite/original
    logs/<stage>.log                                   each stage's log (one per reformat process)

Each stage is the stand-alone script of the same name, run as a child process; each resumes
where it stopped, so rerunning this command after an interruption continues instead of
starting over (finished requests are never sent again).

Environment: OPENAI_API_KEY, OPENAI_BASE_URL, SERPER_API_KEY (never logged, never put on a
command line).
"""

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

from constant import DEFAULT_MODEL
from realign import chunk_bounds, exits_cleanly, iter_progress, load_records, positive_int, setup_logging

logger = logging.getLogger("run_pipeline")

HERE = os.path.dirname(os.path.abspath(__file__))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StageFailed(Exception):
    """A stage exited non-zero: the message names the stage (and the batch ids)."""


def needs_classification(records):
    return any(not isinstance(r["items"][0].get("category"), str) for r in records)


def missing_batch_ids(records, batch_file, batch_num, batch_id):
    """How many ids of chunk ``batch_id`` are absent from its batch file."""
    start, end = chunk_bounds(len(records), batch_num, batch_id)
    done = {entry.get("id") for entry in iter_progress(batch_file) if isinstance(entry, dict)}
    return sum(1 for record in records[start:end] if record["id"] not in done)


class Runner:
    """Starts stage scripts as children, logs each to its own file, stops them on a signal."""

    def __init__(self, python, log_dir):
        self.python = python
        self.log_dir = log_dir
        self.children = []
        self.stopping = None

    def start(self, script, args, log_name):
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{log_name}.log")
        command = [self.python, os.path.join(HERE, script), *map(str, args)]
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.children.append(child)
        return child, log_path

    def wait(self, child):
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
        self.children.remove(child)
        return code

    def run(self, stage, script, args):
        logger.info("stage %s: %s", stage, script)
        child, log_path = self.start(script, args, stage)
        code = self.wait(child)
        self.check_stopped()
        if code != 0:
            raise StageFailed(f"stage '{stage}' failed with exit status {code}; see {log_path}")
        return log_path

    def forward(self, signum, _frame):
        """Pass a stop signal on to every child; their progress files are already on disk."""
        self.stopping = signum
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    def check_stopped(self):
        if self.stopping is not None:
            raise KeyboardInterrupt


def reformat_args(args, input_path, rewrite_dir, batch_id):
    command = [
        "--input_data_path", input_path,
        "--output_directory", rewrite_dir,
        "--dataset_batch_id", batch_id,
        "--dataset_batch_num", args.num_processes,
        "--model", args.model,
        "--concurrency", args.concurrency,
        "--top_k", args.top_k,
        "--temperature", args.temperature,
        "--top_p", args.top_p,
        "--target_length", args.target_length,
        "--adaptive" if args.adaptive else "--no-adaptive",
    ]
    if args.base_url:
        command += ["--base_url", args.base_url]
    if args.tokenizer_path:
        command += ["--tokenizer_path", args.tokenizer_path]
    if args.retry_failed:
        command.append("--retry_failed")
    return command


def run_reformat(args, runner, records, input_path, out):
    """Start one reformat process per batch id, wait for all, and name the ones that failed."""
    rewrite_dir = os.path.join(out, "rewrite")
    started = []
    logger.info("stage reformat: %d processes", args.num_processes)
    for batch_id in range(args.num_processes):
        child, log_path = runner.start("reformat.py", reformat_args(args, input_path, rewrite_dir, batch_id),
                                       f"reformat_{batch_id}")
        started.append((batch_id, child, log_path))
    results = [(batch_id, runner.wait(child), log_path) for batch_id, child, log_path in started]
    runner.check_stopped()

    crashed, with_failed_records = [], []
    for batch_id, code, log_path in results:
        if code == 0:
            continue
        batch_file = os.path.join(rewrite_dir, f"rewrite_data_{batch_id}_of_{args.num_processes}_batch.jsonl")
        missing = missing_batch_ids(records, batch_file, args.num_processes, batch_id)
        if missing:
            crashed.append(f"{batch_id} (exit status {code}, {missing} records not done; see {log_path})")
        else:
            with_failed_records.append(batch_id)
    if crashed:
        raise StageFailed("stage 'reformat' failed: batch ids " + "; ".join(crashed))
    if with_failed_records:
        logger.warning(
            "reformat: batch ids %s hold records whose rewrite failed; they keep the original response. "
            "Rerun with --retry_failed to ask again.", ", ".join(map(str, with_failed_records)))
    return rewrite_dir, bool(with_failed_records)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input_data_path", required=True, help="dataset: JSON list or JSONL of records")
    p.add_argument("--output_directory", required=True, help="folder for every stage's output and logs")
    g = p.add_argument_group("stage 1: classify (only when a record lacks a category)")
    g.add_argument("--classifier_backend", choices=["vllm", "openai", "transformers"], default="vllm",
                   help="how to run the task classifier")
    g.add_argument("--classifier_model", default="GAIR/ReAlign-Task-Classifier",
                   help="classifier: Hugging Face name or local folder (or served model name)")
    g.add_argument("--classifier_base_url", default=None,
                   help="with --classifier_backend openai: the completions endpoint, e.g. a vllm serve URL")
    g.add_argument("--classify_args", default="",
                   help="extra flags for classify.py, as one string, e.g. \"--dtype float32 --enforce_eager\"")
    g = p.add_argument_group("stage 2: retrieval (only when SERPER_API_KEY is set)")
    g.add_argument("--retrieval_batch_size", type=int, default=32, help="searches in flight at once")
    g.add_argument("--search_url", default=None, help="search endpoint (default: Serper's)")
    g.add_argument("--allow_retrieval_failures", action="store_true",
                   help="go on when some searches still failed after retries (those records get no evidence)")
    g = p.add_argument_group("stage 3: reformat")
    g.add_argument("--num_processes", type=positive_int, default=1, help="reformat processes, one per batch id")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"the rewriting model (default: {DEFAULT_MODEL})")
    g.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL or OpenAI)")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight per process")
    g.add_argument("--top_k", type=int, default=2, help="candidates sampled per record")
    g.add_argument("--temperature", type=float, default=0.3, help="sampling temperature")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--target_length", type=int, default=2048, help="max tokens per candidate")
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer to count lengths (reformat and filter); words when not given")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="let the model keep a response whose format does not fit (--no-adaptive forces it)")
    g.add_argument("--retry_failed", action="store_true", help="ask again for records whose rewrite failed")
    g = p.add_argument_group("stage 5: filter")
    g.add_argument("--rules", default="open_platypus",
                   choices=["open_platypus", "alpaca", "no_robots", "gsm8k", "math", "none"], help="filter preset")
    g.add_argument("--length_threshold", type=float, default=0.5, help="reject rewrites at most this x original length")
    g.add_argument("--keep_reasons", action="store_true", help="name the rule that rejected each rewrite")
    p.add_argument("--python", default=sys.executable, help="Python interpreter that runs the stages")
    return p.parse_args(argv)


@exits_cleanly
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    out = args.output_directory
    os.makedirs(out, exist_ok=True)
    records = load_records(args.input_data_path)
    runner = Runner(args.python, os.path.join(out, "logs"))
    previous = {s: signal.signal(s, runner.forward) for s in STOP_SIGNALS}
    started = time.monotonic()
    try:
        return run_stages(args, runner, records, out)
    except StageFailed as e:
        logger.error("%s", e)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        logger.info("pipeline ran %.1fs", time.monotonic() - started)


def run_stages(args, runner, records, out):
    data_path = args.input_data_path

    if needs_classification(records):
        classified = os.path.join(out, "classified.json")
        command = ["--input_data_path", data_path, "--output_path", classified,
                   "--backend", args.classifier_backend, "--model", args.classifier_model]
        if args.classifier_base_url:
            command += ["--base_url", args.classifier_base_url]
        runner.run("classify", "classify.py", command + shlex.split(args.classify_args))
        data_path = classified
    else:
        logger.info("stage classify: skipped, every record already has a category")

    if os.environ.get("SERPER_API_KEY"):
        retrieval = os.path.join(out, "retrieval.json")
        command = ["--input_data_path", data_path, "--output_path", retrieval,
                   "--batch_size", args.retrieval_batch_size]
        if args.search_url:
            command += ["--search_url", args.search_url]
        try:
            runner.run("retrieval", "retrieval.py", command)
        except StageFailed:
            if not args.allow_retrieval_failures:
                raise
            logger.warning("retrieval: some searches failed; going on without their evidence")
        data_path = os.path.join(out, "retrieval_clean_evidence.json")
    else:
        logger.warning("stage retrieval: skipped, SERPER_API_KEY is not set (records are reformatted without evidence)")

    stage3_records = load_records(data_path, require_response=True)
    rewrite_dir, had_failed_records = run_reformat(args, runner, stage3_records, data_path, out)

    merged = os.path.join(out, "merged.json")
    runner.run("merge", "parallel_data_merge.py", [
        "--input_data_path", data_path, "--output_directory", rewrite_dir, "--final_output_path", merged])

    final = os.path.join(out, "final.json")
    command = ["--input_original_data_path", data_path, "--input_rewrite_data_path", merged,
               "--output_path", final, "--rules", args.rules, "--length_threshold", args.length_threshold]
    if args.tokenizer_path:
        command += ["--tokenizer_path", args.tokenizer_path]
    if args.keep_reasons:
        command.append("--keep_reasons")
    runner.run("filter", "rewrite_data_selection.py", command)
    logger.info("done: %s", final)
    return 1 if had_failed_records else 0


if __name__ == "__main__":
    sys.exit(main())
