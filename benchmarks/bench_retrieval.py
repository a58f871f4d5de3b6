"""Benchmark retrieval.py against a local fake Serper: queries per second and total time.

Usage:
    .venv/bin/python benchmarks/bench_retrieval.py --latency 0.1 --batch_size 32 --sizes 1000 10000

Starts `tests/fake_servers.py serper --latency L` in its own process, writes N synthetic
single-turn records of the retrieval tasks (every one is searched) into a temporary
folder, runs `retrieval.py` as a subprocess pointed at the fake server, and prints the
wall time of the whole run (start-up, searching, writing both outputs) and N / time.
The targets: at least 250 queries/s at 0.1 s latency and --batch_size 32, and 10,000
records in at most about 10x the time of 1,000.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the fake servers live with the tests

from fake_servers import spawn, stop_spawned

FAKE_KEY = "test-serper-key"  # the fake server's default key


def make_records(n):
    """``n`` searchable records: RAG categories in turn, int ids with gaps, distinct queries."""
    from constant import RAG_TASKS

    return [{"id": 10 + 3 * i,
             "items": [{"from": "human", "category": RAG_TASKS[i % len(RAG_TASKS)],
                        "value": f"Question {i}: what is the tallest mountain in region {i}?"},
                       {"from": "gpt", "value": f"Answer {i}."}]}
            for i in range(n)]




def run_once(n, port, batch_size, workdir):
    input_path = os.path.join(workdir, f"input_{n}.json")
    output_path = os.path.join(workdir, f"retrieval_{n}.json")
    with open(input_path, "w", encoding="utf-8") as f:
        json.dump(make_records(n), f)
    env = {**os.environ, "SERPER_API_KEY": FAKE_KEY}
    command = [sys.executable, os.path.join(ROOT, "retrieval.py"), "--input_data_path", input_path,
               "--output_path", output_path, "--batch_size", str(batch_size),
               "--search_url", f"http://127.0.0.1:{port}/search", "--no-cache"]
    start = time.perf_counter()
    result = subprocess.run(command, check=False, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"retrieval.py exited {result.returncode}:\n{result.stderr[-3000:]}")
    with open(output_path, encoding="utf-8") as f:
        written = json.load(f)
    with_evidence = sum(1 for record in written if record["items"][0].get("evidence"))
    if len(written) != n or with_evidence != n:
        raise SystemExit(f"N={n}: wrote {len(written)} records, {with_evidence} with evidence")
    return elapsed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark retrieval.py against a local fake Serper.")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the fake server takes per query")
    parser.add_argument("--batch_size", type=int, default=32, help="retrieval.py --batch_size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="record counts to time")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    server, port = spawn("serper", args.latency)
    timings = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as workdir:
            for n in args.sizes:
                timings[n] = run_once(n, port, args.batch_size, workdir)
                print(f"N={n:>6}: {timings[n]:7.2f} s total, {n / timings[n]:7.1f} queries/s "
                      f"(latency {args.latency:g} s, --batch_size {args.batch_size}, "
                      f"ceiling {args.batch_size / args.latency:.0f} queries/s)", flush=True)
    finally:
        stats = stop_spawned(server)
    print(f"fake server: {stats.get('requests')} requests, at most {stats.get('max_in_flight')} in flight")
    if len(timings) > 1:
        small, large = min(timings), max(timings)
        print(f"time ratio N={large} / N={small}: {timings[large] / timings[small]:.2f} "
              f"(size ratio {large / small:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
