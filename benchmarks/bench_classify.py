"""Benchmark classify.py: --help start-up, the openai backend against a fake server, and
real vLLM (CPU build) on the tiny test model, chunked versus one call per query.

Usage:
    .venv/bin/python benchmarks/bench_classify.py
    .venv/bin/python benchmarks/bench_classify.py --latency 0.1 --concurrency 1 32 128 --seconds 10 --no-vllm

Prints:
- `--help`: median wall time of 5 runs of `python classify.py --help` (target: < 1 s).
- openai: for each --concurrency, classify.py runs in a subprocess against
  `tests/fake_servers.py openai` (each request answered after --latency s; with --faults,
  5% 429 with Retry-After 0.2 s and 2% 500), on synthetic records sized so a run lasts
  about --seconds. Columns: records/s of the classification phase (from classify.py's
  log), the ceiling concurrency / latency, requests, retries, and the client's CPU ms per
  request (getrusage of the subprocess, minus a one-record run's start-up cost).
- vllm: one engine (tiny random Llama, float32, CPU); records/s of classify.main with
  one generate call per chunk, against the original's one generate call per query.
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fake_servers import spawn, stop_spawned

RATE_RE = re.compile(r"classified (?P<n>\d+) records in (?P<elapsed>[\d.]+) s \((?P<rate>[\d.]+) records/s")
CLASSIFIER = "GAIR/ReAlign-Task-Classifier"  # the served model name classify.py asks for by default
REQUESTS_RE = re.compile(r"openai: requests: (?P<requests>[\d,]+), retries: (?P<retries>[\d,]+)")
FAULTS = {"429": 0.05, "500": 0.02}
CPU_BOUND_RATE = 600.0  # records/s one client process sustains here; caps the input size
TOPICS = ("a poem about the sea", "the capital of Peru", "a plan for a week of study", "a bug in this loop",
          "a summary of the article", "a polite email to my landlord", "the sentiment of this review")


def synthetic_records(n):
    return [{"id": 5000 + 2 * i,
             "items": [{"from": "human", "value": f"Request {i}: please help with {TOPICS[i % len(TOPICS)]}."},
                       {"from": "gpt", "value": "..."}]} for i in range(n)]


def time_help(runs=5):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "classify.py"), "--help"], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)



def run_openai(workdir, name, n, port, concurrency):
    """Run classify.py --backend openai on ``n`` records; return (log matches, client CPU s)."""
    source = os.path.join(workdir, f"{name}.json")
    with open(source, "w", encoding="utf-8") as f:
        json.dump(synthetic_records(n), f)
    command = [sys.executable, os.path.join(ROOT, "classify.py"), "--backend", "openai",
               "--base_url", f"http://127.0.0.1:{port}/v1", "--concurrency", str(concurrency),
               "--input_data_path", source, "--output_path", os.path.join(workdir, f"{name}_out.json"), "--no-cache"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env={**os.environ, "OPENAI_API_KEY": "bench-key"},
                          capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate, requests = RATE_RE.search(done.stderr), REQUESTS_RE.search(done.stderr)
    if done.returncode != 0 or rate is None or requests is None:
        raise SystemExit(f"classify.py exited {done.returncode}:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {k: float(v.replace(",", "")) for k, v in {**rate.groupdict(), **requests.groupdict()}.items()}, cpu


def bench_openai(args):
    print(f"\nopenai backend, fake server latency {args.latency:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_classify_") as workdir:
        server, port = spawn("openai", models=[CLASSIFIER])
        try:
            _, startup_cpu = run_openai(workdir, "startup", 1, port, 1)
        finally:
            stop_spawned(server)
        print(f"{'conc':>4} {'faults':>6} {'records':>7} {'rec/s':>7} {'ceiling':>7} {'requests':>8} "
              f"{'retries':>7} {'CPU ms/req':>10}", flush=True)
        for concurrency in args.concurrency:
            ceiling = concurrency / args.latency
            n = max(20, int(args.seconds * min(ceiling, CPU_BOUND_RATE)))
            for faults in args.faults:
                server, port = spawn("openai", args.latency, FAULTS if faults == "on" else None,
                                     0.2 if faults == "on" else None, models=[CLASSIFIER])
                try:
                    result, cpu = run_openai(workdir, f"c{concurrency}_{faults}", n, port, concurrency)
                finally:
                    stop_spawned(server)
                cpu_per_request = max(cpu - startup_cpu, 0.0) / result["requests"] * 1000
                print(f"{concurrency:>4} {faults:>6} {n:>7} {result['rate']:>7.1f} {ceiling:>7.0f} "
                      f"{int(result['requests']):>8} {int(result['retries']):>7} {cpu_per_request:>10.2f}",
                      flush=True)


def bench_vllm(args):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tiny_model import build_tiny_model

    import classify

    with tempfile.TemporaryDirectory(prefix="bench_classify_vllm_") as workdir:
        model = build_tiny_model(os.path.join(workdir, "tiny"))
        base = ["--model", model, "--dtype", "float32", "--enforce_eager", "--max_model_len", "2048"]
        started = time.perf_counter()
        llm = classify.start_vllm_engine(classify.parse_args(base + ["--input_data_path", "-", "--output_path", "-"]))
        start_s = time.perf_counter() - started
        classify.start_vllm_engine = lambda _: llm  # reuse the engine for the runs below

        source = os.path.join(workdir, "in.json")
        with open(source, "w", encoding="utf-8") as f:
            json.dump(synthetic_records(args.vllm_records), f)
        rates = {}
        for constrained in ("--constrained", "--no-constrained"):
            started = time.perf_counter()
            rc = classify.main(base + [constrained, "--input_data_path", source,
                                       "--output_path", os.path.join(workdir, f"out{constrained}.json")])
            assert rc == 0, rc
            rates[constrained] = args.vllm_records / (time.perf_counter() - started)

        # The original README: one generate call per query.
        prompts = [classify.build_prompt(r["items"][0]["value"]) for r in synthetic_records(args.vllm_per_query)]
        params = classify.vllm_sampling_params(classify.task_names(), constrained=True)
        started = time.perf_counter()
        for prompt in prompts:
            llm.generate([prompt], params, use_tqdm=False)
        per_query = len(prompts) / (time.perf_counter() - started)

    print(f"\nvllm backend, tiny model on CPU (engine start {start_s:.1f} s, not counted):")
    print(f"  chunked, constrained:      {rates['--constrained']:7.1f} records/s ({args.vllm_records} records)")
    print(f"  chunked, unconstrained:    {rates['--no-constrained']:7.1f} records/s")
    print(f"  one call per query (orig): {per_query:7.1f} records/s ({args.vllm_per_query} records)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Speed of classify.py: --help, openai backend, vllm backend.")
    parser.add_argument("--latency", type=float, default=0.1, help="fake server seconds per request (default: 0.1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128],
                        help="classify.py --concurrency values (default: 1 32 128)")
    parser.add_argument("--faults", choices=["off", "on"], nargs="+", default=["off", "on"],
                        help="run without and/or with injected 429/500 faults (default: off on)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="approximate length of each openai run; sizes the input (default: 8)")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True,
                        help="also benchmark the vllm backend with the tiny model on CPU (default: on)")
    parser.add_argument("--vllm_records", type=int, default=512, help="records of the chunked vllm runs")
    parser.add_argument("--vllm_per_query", type=int, default=64, help="records of the one-call-per-query run")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"classify.py --help: {time_help():.3f} s (median of 5; target < 1 s)", flush=True)
    bench_openai(args)
    if args.vllm:
        bench_vllm(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
