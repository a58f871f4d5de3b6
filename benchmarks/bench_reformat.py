"""Benchmark reformat.py against a local fake OpenAI-compatible server: records/s and client CPU.

Usage:
    .venv/bin/python benchmarks/bench_reformat.py
    .venv/bin/python benchmarks/bench_reformat.py --latency 0.2 --concurrency 64 --faults on --seconds 15

For every combination of --latency, --concurrency and --faults it starts the fake server
(`tests/fake_servers.py openai`) in its own process, writes a synthetic stage-3 input sized so
the run lasts about --seconds, runs `reformat.py --top_k 2` on it in a subprocess and prints:
records/s of the request phase (from reformat.py's summary line) and end to end (process
start to exit), requests and retries, failed and lost records (ids missing from the batch
file), and the client's CPU time per request (the subprocess's user+sys time from
getrusage(RUSAGE_CHILDREN), minus the start-up cost measured on a one-record run; shown
for runs of at least 900 requests). "lost" counts ids missing from the batch file or
written twice; "failed" records are in the file, marked failed (with faults, a record whose
three asks all got a malformed reply: about 0.05^3 of the records).
With faults the server answers 10% of requests 429 (Retry-After: --retry_after seconds),
5% 500 (no Retry-After: reformat.py backs off 0.5-1 s, then 1-2 s, ...) and 5% with a reply
that has no "Revised response:" (re-asked). The original implementation did 4.1 records/s
per process on this setup (one request at a time).
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fake_servers import spawn, stop_spawned

FAULT_RATES = {"429": 0.10, "500": 0.05, "malformed": 0.05}
MIN_REQUESTS_FOR_CPU = 900  # fewer, and the start-up cost's jitter swamps the per-request CPU
CPU_BOUND_RATE = 250.0  # records/s one client process sustains here; caps the input size
SUMMARY_RE = re.compile(r"reformatted: (?P<rewritten>\d+), .*?, failed: (?P<failed>\d+), "
                        r"re-asks: (?P<reasks>\d+), .*?requests: (?P<requests>[\d,]+), retries: (?P<retries>[\d,]+) .*?"
                        r"(?P<elapsed>[\d.]+) s \((?P<rate>[\d.]+) records/s\)")
TEXT = ("the format of an answer matters as much as its content when a reader scans it for the one "
        "fact they need so every response is checked against the task and rewritten with care")


def synthetic_records(n, seed=0):
    """``n`` classified single-turn records of rewrite tasks, ~150-word responses, some with evidence."""
    from constant import RAG_TASKS, REWRITE_TASK

    vocabulary = TEXT.split()
    records = []
    for i in range(n):
        task = REWRITE_TASK[(i + seed) % len(REWRITE_TASK)]
        words = [vocabulary[(i * 7 + j) % len(vocabulary)] for j in range(150)]
        human = {"from": "human", "value": f"Question {i}: explain how {' '.join(words[:15])}?", "category": task}
        if task in RAG_TASKS:
            human["evidence"] = [f"Evidence {k} about {' '.join(words[k:k + 20])}." for k in range(3)]
        records.append({"id": 1000 + 3 * i, "items": [human, {"from": "gpt", "value": " ".join(words)}]})
    return records




def run_reformat(workdir, name, records, port, concurrency, tokenizer_path):
    """Run reformat.py on ``records``; return (summary dict, wall s, CPU s, batch file lines)."""
    input_path = os.path.join(workdir, f"{name}.json")
    output_directory = os.path.join(workdir, name)
    with open(input_path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    command = [sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", input_path,
               "--output_directory", output_directory, "--dataset_batch_id", "0", "--dataset_batch_num", "1",
               "--top_k", "2", "--temperature", "0.3", "--top_p", "1",
               "--target_length", "4096", "--concurrency", str(concurrency),
               "--base_url", f"http://127.0.0.1:{port}/v1", "--no-cache"]
    if tokenizer_path:
        command += ["--tokenizer_path", tokenizer_path]
    env = {**os.environ, "OPENAI_API_KEY": "bench-key"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    match = SUMMARY_RE.search(done.stderr)
    if done.returncode not in (0, 1) or match is None:
        raise SystemExit(f"reformat.py exited {done.returncode}:\n{done.stderr[-3000:]}")
    summary = {key: float(value.replace(",", "")) for key, value in match.groupdict().items()}
    with open(os.path.join(output_directory, "rewrite_data_0_of_1_batch.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    return summary, wall, cpu, lines


def build_tokenizer(workdir):
    from tiny_model import build_tiny_tokenizer

    path = os.path.join(workdir, "tokenizer")
    build_tiny_tokenizer(path)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Records/s and client CPU of reformat.py against a fake server.")
    parser.add_argument("--latency", type=float, nargs="+", default=[1.0, 0.2],
                        help="simulated seconds per request (default: 1.0 0.2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64],
                        help="reformat.py --concurrency values (default: 1 64)")
    parser.add_argument("--faults", choices=["off", "on"], nargs="+", default=["off", "on"],
                        help="run without and/or with injected faults (default: off on)")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="approximate length of each fault-free run; sizes the input (default: 15)")
    parser.add_argument("--retry_after", type=float, default=0.25,
                        help="Retry-After seconds of the injected 429s (default: 0.25; each 429 then costs "
                             "a latency plus this wait, each 500 a latency plus the client's 0.5-1 s backoff)")
    parser.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=True,
                        help="measure candidates with a (tiny, locally built) Hugging Face tokenizer, as a "
                             "real run does; --no-tokenizer counts words (default: on)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, rates = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_reformat_") as workdir:
        tokenizer_path = build_tokenizer(workdir) if args.tokenizer else None
        server, port = spawn("openai")
        try:  # the fixed cost of a run (start-up, imports, tokenizer load, one request); it varies, take the median
            costs = sorted(run_reformat(workdir, f"startup{i}", synthetic_records(1), port, 1, tokenizer_path)[2]
                           for i in range(3))
        finally:
            stop_spawned(server)
        startup_cpu = costs[1]
        print(f"client start-up CPU (one-record runs): {startup_cpu:.2f} s (of {costs[0]:.2f}-{costs[2]:.2f}); "
              f"lengths counted in {'tokens (tiny BPE tokenizer)' if tokenizer_path else 'words'}", flush=True)
        header = (f"{'latency':>7} {'conc':>4} {'faults':>6} {'records':>7} {'rec/s':>7} {'e2e/s':>7} "
                  f"{'requests':>8} {'retries':>7} {'re-asks':>7} {'failed':>6} {'lost':>4} {'CPU ms/req':>10}")
        print(header, flush=True)
        for latency in args.latency:
            for concurrency in args.concurrency:
                expected = min(concurrency / latency, CPU_BOUND_RATE)
                n = max(10, int(args.seconds * expected))
                records = synthetic_records(n)
                for faults in args.faults:
                    name = f"l{latency}_c{concurrency}_{faults}"
                    server, port = spawn("openai", latency, FAULT_RATES if faults == "on" else None,
                                         args.retry_after if faults == "on" else None, seed=1)
                    try:
                        summary, wall, cpu, lines = run_reformat(workdir, name, records, port, concurrency,
                                                                 tokenizer_path)
                    finally:
                        server_stats = stop_spawned(server)
                    ids = [line["id"] for line in lines]
                    lost = len({r["id"] for r in records} - set(ids)) + (len(ids) - len(set(ids)))
                    failed = sum(1 for line in lines if line.get("status") == "failed")
                    requests = summary["requests"]
                    if requests >= MIN_REQUESTS_FOR_CPU:
                        cpu_per_request = f"{max(cpu - startup_cpu, 0.0) / (requests - 1) * 1000:.2f}"
                    else:  # the start-up cost varies by more than the requests cost
                        cpu_per_request = "n/a"
                    rate = summary["rate"]
                    rates[(latency, concurrency, faults)] = rate
                    row = (f"{latency:>7g} {concurrency:>4} {faults:>6} {n:>7} {rate:>7.1f} {n / wall:>7.1f} "
                           f"{int(requests):>8} {int(summary['retries']):>7} {int(summary['reasks']):>7} "
                           f"{failed:>6} {lost:>4} {cpu_per_request:>10}")
                    rows.append(row)
                    print(row, f"  server: {server_stats.get('faults', {})}, max in flight "
                               f"{server_stats.get('max_in_flight')}", flush=True)

    print("\ntargets (one process, --top_k 2, --concurrency 64):")
    checks = [
        ((1.0, 64, "off"), "1 s latency: >= 90% of 64 records/s", lambda r: r >= 0.9 * 64),
        ((0.2, 64, "off"), "200 ms latency: >= 150 records/s", lambda r: r >= 150),
    ]
    for latency in args.latency:
        if (latency, 64, "off") in rates:
            fault_free = rates[(latency, 64, "off")]
            label = f"{latency:g} s latency with faults: >= half the fault-free {fault_free:.1f} records/s"
            checks.append(((latency, 64, "on"), label, lambda r, f=fault_free: r >= f / 2))
    for key, label, ok in checks:
        if key in rates:
            print(f"  {'PASS' if ok(rates[key]) else 'FAIL'}  {label}: {rates[key]:.1f} records/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
