"""Benchmark the rate-limit pacing of reformat.py against a fake that enforces RPM and TPM as OpenAI does.

Usage:
    .venv/bin/python benchmarks/bench_rate_limit.py
    .venv/bin/python benchmarks/bench_rate_limit.py --cases shared --processes 2 4 8
    .venv/bin/python benchmarks/bench_rate_limit.py --cases requests --records 300

The fake (`tests/fake_servers.py openai --rpm ... --tpm ... --rate-initial 0`) keeps one token
bucket per limit for everyone who uses the key: it refills at limit/60 per second, starts
empty (the steady state of a long job: 600 requests at 1,200 requests/minute take 30 s at
best), counts every arrival against the limit, refused ones too, answers a refused request
429 at once, and sends x-ratelimit-limit/remaining/reset headers on every reply. It runs in
its own process; so does each reformat.py (--top_k 2, --concurrency 64, no cache).

Cases:
    requests   one process, 1,200 requests/minute, --latency 0.2
    tokens     one process, bound by tokens/minute (a request counts its prompt words plus
               n x --target_length, as the fake counts it), --latency 0.2
    shared     N processes by batch id sharing one key's 1,200 requests/minute, once for
               each N of --processes (default 4)

Printed per case: the time of the requests, from the first process's start of its request
phase to the last one's end (each process's summary line gives the length of its phase,
and the moment the line arrives its end; processes start seconds apart on a busy machine,
and the key is to be used all that time), as a share of the limit (ideal time / time), and
the share of requests answered 429 (from the fake's counts), against the case's target:
requests and tokens >= 90% with <= 5% 429 (issue "Today's APIs"); shared >= 95% with
<= 1% 429 (issue "Pacing: N processes on one key"). Last, all cases as one JSON line.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the fake servers live with the tests
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from fake_servers import spawn, stop_spawned
from synthetic import rewrite_records

SUMMARY_RE = re.compile(r", ([\d.]+) s \([\d.]+ records/s\)")  # reformat.py's summary: its request phase
TARGETS = {"requests": (0.90, 0.05), "tokens": (0.90, 0.05), "shared": (0.95, 0.01)}  # share of the limit, of 429


def synthetic_records(n):
    return rewrite_records(n, 60)


def token_cost(records, n, cap):
    """What the fake counts against the token limit for one request per record: the words of
    the messages (as its usage counts them) plus n x the output cap."""
    import reformat

    total = 0
    for record in records:
        messages = reformat.build_rewrite_messages(record)
        total += sum(len(m["content"].split()) for m in messages) + n * cap
    return total


def _read_lines(stream, lines):
    """Keep each line of a child's stderr with the moment it arrived."""
    for line in stream:
        lines.append((time.perf_counter(), line))


def run_case(name, records, processes, rpm, tpm, latency, concurrency, target_length, workdir):
    server, port = spawn("openai", latency=latency, rpm=rpm, tpm=tpm, rate_initial=0)
    label = f"{name}{processes}"
    input_path = os.path.join(workdir, f"{label}.json")
    with open(input_path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    env = {**os.environ, "OPENAI_API_KEY": "bench-key", "REALIGN_CACHE_DIR": os.path.join(workdir, "cache")}
    commands = [[sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", input_path,
                 "--output_directory", os.path.join(workdir, label), "--dataset_batch_id", str(i),
                 "--dataset_batch_num", str(processes), "--top_k", "2", "--concurrency", str(concurrency),
                 "--target_length", str(target_length), "--base_url", f"http://127.0.0.1:{port}/v1",
                 "--no-cache"] for i in range(processes)]
    started = time.perf_counter()
    children = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for command in commands]
    outputs = [[] for _ in children]
    readers = [threading.Thread(target=_read_lines, args=(child.stderr, lines), daemon=True)
               for child, lines in zip(children, outputs)]
    for reader in readers:
        reader.start()
    for child, reader in zip(children, readers):
        child.wait()
        reader.join()
    elapsed = time.perf_counter() - started
    stats = stop_spawned(server)
    for child, lines in zip(children, outputs):
        if child.returncode != 0:
            err = "".join(line for _, line in lines)
            raise SystemExit(f"{name}: reformat.py exited {child.returncode}:\n{err[-2000:]}")
    # Each process's request phase, as its summary line says, ending when the line arrived.
    phases = []
    for lines in outputs:
        found = [(at, float(m.group(1))) for at, line in lines for m in [SUMMARY_RE.search(line)] if m]
        if found:
            phases.append((found[-1][0] - found[-1][1], found[-1][0]))
    # The key is in use from the first process's start of requests to the last one's end.
    phase = max(end for _, end in phases) - min(start for start, _ in phases) if phases else elapsed
    requests = stats["main_requests"]  # the completion requests: not the model checks
    refused = sum((stats.get("rate_limited") or {}).values())
    ideal = max(len(records) / (rpm / 60.0) if rpm else 0.0,
                token_cost(records, 2, target_length) / (tpm / 60.0) if tpm else 0.0)
    target_share, target_429 = TARGETS[name]
    share, share_429 = ideal / phase, refused / max(1, requests)
    return {"case": name, "records": len(records), "processes": processes, "rpm": rpm, "tpm": tpm,
            "ideal_s": ideal, "elapsed_s": elapsed, "request_phase_s": phase,
            "longest_process_s": max((end - start for start, end in phases), default=elapsed),
            "share_of_limit": share, "requests": requests, "refused_429": refused, "share_429": share_429,
            "target_share": target_share, "target_429": target_429,
            "meets_target": share >= target_share and share_429 <= target_429}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pacing under OpenAI-style rate limits.")
    parser.add_argument("--records", type=int, default=600, help="records per case (default: 600)")
    parser.add_argument("--rpm", type=int, default=1200, help="requests per minute of the fake (default: 1200)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per reply (default: 0.2)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight per process (default: 64)")
    parser.add_argument("--target_length", type=int, default=512, help="output cap per candidate (default: 512)")
    parser.add_argument("--processes", type=int, nargs="+", default=[4],
                        help="processes sharing the key in the shared case; one case per number (default: 4)")
    parser.add_argument("--cases", nargs="+", choices=("requests", "tokens", "shared"),
                        default=["requests", "tokens", "shared"], help="which cases to run")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    records = synthetic_records(args.records)
    # The token case: a limit that allows the same 600 records in 30 s as the request limit,
    # with requests nearly unlimited, so that the tokens bind.
    tpm = int(token_cost(records, 2, args.target_length) / (len(records) / (args.rpm / 60.0)) * 60)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for case in args.cases:
            if case == "requests":
                runs = [(1, args.rpm, None)]
            elif case == "tokens":
                runs = [(1, 100 * args.rpm, tpm)]
            else:
                runs = [(n, args.rpm, None) for n in args.processes]
            for processes, rpm, case_tpm in runs:
                result = run_case(case, records, processes, rpm, case_tpm, args.latency, args.concurrency,
                                  args.target_length, workdir)
                results.append(result)
                limit = f"{result['rpm']:,} requests/min" if case != "tokens" else f"{tpm:,} tokens/min"
                verdict = "meets" if result["meets_target"] else "MISSES"
                print(f"{case:9s} {result['processes']} process(es), {result['records']} records, {limit}, "
                      f"latency {args.latency:g} s, concurrency {args.concurrency}: {result['request_phase_s']:.1f} s "
                      f"of requests (longest process {result['longest_process_s']:.1f} s), "
                      f"{result['elapsed_s']:.1f} s end to end (ideal {result['ideal_s']:.1f} s) = "
                      f"{result['share_of_limit']:.1%} of the limit; "
                      f"429: {result['refused_429']} of {result['requests']} requests = {result['share_429']:.1%}; "
                      f"{verdict} the target (>= {result['target_share']:.0%}, <= {result['target_429']:.0%} 429)",
                      flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
