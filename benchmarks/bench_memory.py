"""Benchmark the peak memory (RSS) of reformat.py and retrieval.py on a big input.

Usage:
    .venv/bin/python benchmarks/bench_memory.py                      # 1M records, about 1.3 GB
    .venv/bin/python benchmarks/bench_memory.py --records 100000 --keep

Writes a synthetic stage-3 input (a JSON list, indent 4, as retrieval.py writes it): ids
from 1000, questions of 20-80 words, responses of 50-300 words, the categories cycling
through the 46 task names of constant.py (35 in REWRITE_TASK, 5 in RAG_TASKS), evidence on
half of the RAG records, one record in 50 multi-turn. Then runs, each as a child process:

    reformat.py --input_data_path IN --output_directory D --dataset_batch_id 0
        --dataset_batch_num 10 --base_url <fake OpenAI server, latency 0>
    retrieval.py --input_data_path IN --output_path OUT   (SERPER_API_KEY set; the
        progress file pre-filled with evidence for every query, so nothing is searched;
        --search_url points at a closed local port and --max_retries 0, so a search
        that happened anyway fails at once instead of leaving the machine)

and prints each child's peak RSS (ru_maxrss from os.wait4) next to the input file's size
and the targets of issue 13: reformat.py, chunk 0 of 10, at most a tenth of the input
plus the interpreter and libraries; retrieval.py below the input's size.

"Interpreter and libraries" (the baseline) is measured as the same command on a
100-record input: the same imports, client, tokenizer-free length counting (no
--tokenizer_path: lengths in words, transformers is not imported) and fixed costs, with
no data to speak of. An import-only figure (``python -c "import reformat, openai"``) is
printed beside it for reference.

The fake server runs in its own process (fake_servers.spawn). A child's ru_maxrss
also counts the RSS of this process at the moment it was started (Linux carries the
parent's high-water mark through fork/vfork + exec), so the input is generated streaming
and this process stays small; its own peak is printed last: a child figure near it is
this process's, not the child's. Figures vary with the machine's load: re-measure on a
quiet machine before quoting them.
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the fake servers live with the tests

from constant import RAG_TASKS, TASK_DESCRIPTION  # noqa: E402
from realign import write_json_list_atomic  # noqa: E402
from fake_servers import spawn, stop_spawned  # noqa: E402
from retrieval import search_fingerprint  # noqa: E402

BASELINE_RECORDS = 100  # the baseline run's input
CHUNKS = 10  # reformat.py --dataset_batch_num
WORD_POOL = 200_000  # words drawn once; texts are slices of it
VOCABULARY = ("the a of to and in is it that for on with as was at by be this an are from or have not "
              "one all can has but more will when which their time about would there use each how make "
              "water form data list step rule text word line code test case note point value order part "
              "first second answer question reason method result format table model task input output "
              "simple clear short long early late small large good best true false check write read").split()
REQUESTS_RE = re.compile(r"requests: (\d+(?:,\d{3})*)")


def mib(kib):
    return kib / 1024


def synthetic_records(n, progress_file, seed=0):
    """``n`` stage-3 records; writes the retrieval progress line of every searched one."""
    rng = random.Random(seed)
    pool = [rng.choice(VOCABULARY) for _ in range(WORD_POOL)]
    tasks = list(TASK_DESCRIPTION)

    def text(low, high):
        length = rng.randint(low, high)
        start = rng.randrange(WORD_POOL - length)
        return " ".join(pool[start:start + length])

    for i in range(n):
        task = tasks[i % len(tasks)]
        human = {"from": "human", "value": text(20, 80) + "?", "category": task}
        items = [human, {"from": "gpt", "value": text(50, 300) + "."}]
        if i % 50 == 49:
            items += [{"from": "human", "value": text(10, 30) + "?"}, {"from": "gpt", "value": text(30, 100)}]
        if task in RAG_TASKS and len(items) == 2:
            evidence = [text(20, 40) for _ in range(5)]
            key = search_fingerprint(human["value"], "us", "en")  # the fingerprint retrieval.py checks
            progress_file.write(json.dumps({"id": 1000 + i, "fingerprint": key, "evidence": evidence}) + "\n")
            if i % 2:
                human["evidence"] = evidence[:rng.randint(1, 5)]
        yield {"id": 1000 + i, "items": items}


def write_input(directory, name, n):
    """Write ``<name>.json`` and the progress file of ``<name>_retrieval.json``; return their paths."""
    input_path = os.path.join(directory, f"{name}.json")
    output_path = os.path.join(directory, f"{name}_retrieval.json")
    with open(os.path.join(directory, f"{name}_retrieval_progress.jsonl"), "w", encoding="utf-8") as progress:
        write_json_list_atomic(input_path, synthetic_records(n, progress))
    return input_path, output_path


def run_child(command, env, log_path):
    """Run ``command``; return (exit status, peak RSS in KiB, wall seconds)."""
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss, time.perf_counter() - started


def tail(path, lines=6):
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def reformat_command(input_path, output_directory, port):
    return [sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", input_path,
            "--output_directory", output_directory, "--dataset_batch_id", "0",
            "--dataset_batch_num", str(CHUNKS), "--base_url", f"http://127.0.0.1:{port}/v1"]


def retrieval_command(input_path, output_path):
    return [sys.executable, os.path.join(ROOT, "retrieval.py"), "--input_data_path", input_path,
            "--output_path", output_path, "--search_url", "http://127.0.0.1:9/search", "--max_retries", "0"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Peak RSS of reformat.py (chunk 0 of 10) and retrieval.py.")
    parser.add_argument("--records", type=int, default=1_000_000, help="records in the input (default: 1000000)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the input and outputs (default: a new temporary folder, removed at the end "
                             "unless --keep; a folder given here is never removed)")
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=False,
                        help="keep the generated files (default: remove them)")
    parser.add_argument("--scripts", nargs="+", choices=["reformat", "retrieval"], default=["reformat", "retrieval"],
                        help="which scripts to measure (default: both)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_memory_")
    os.makedirs(workdir, exist_ok=True)
    env = {**os.environ, "OPENAI_API_KEY": "bench-key", "SERPER_API_KEY": "bench-key",
           "PYTHONPATH": ROOT, "REALIGN_CACHE_DIR": os.path.join(workdir, "cache")}
    try:
        started = time.perf_counter()
        tiny_input, tiny_output = write_input(workdir, "tiny", BASELINE_RECORDS)
        input_path, output_path = write_input(workdir, "input", args.records)
        size = os.path.getsize(input_path)
        print(f"input: {args.records} records, {size / 2**20:.0f} MiB ({size / args.records:.0f} bytes a record), "
              f"written in {time.perf_counter() - started:.0f} s: {input_path}", flush=True)

        rows = []
        server, port = spawn("openai", latency=0)
        try:
            for script in args.scripts:
                imports = {"reformat": "import reformat, openai", "retrieval": "import retrieval, openai"}[script]
                _, import_rss, _ = run_child([sys.executable, "-c", imports], env,
                                             os.path.join(workdir, f"{script}_imports.log"))
                if script == "reformat":
                    tiny = reformat_command(tiny_input, os.path.join(workdir, "tiny_rewrite"), port)
                    full = reformat_command(input_path, os.path.join(workdir, "rewrite"), port)
                else:
                    tiny, full = retrieval_command(tiny_input, tiny_output), retrieval_command(input_path, output_path)
                tiny_status, base_rss, _ = run_child(tiny, env, os.path.join(workdir, f"{script}_tiny.log"))
                log_path = os.path.join(workdir, f"{script}.log")
                status, peak_rss, wall = run_child(full, env, log_path)
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    requests = REQUESTS_RE.findall(f.read())
                print(f"{script}.py: exit {status} (100-record run: exit {tiny_status}) after {wall:.0f} s, "
                      f"peak RSS {mib(peak_rss):.0f} MiB, requests in its summary: "
                      f"{requests[-1] if requests else 'n/a'}", flush=True)
                if status != 0 or tiny_status != 0:
                    print(f"  last lines of {log_path}:\n" + "  " + tail(log_path).replace("\n", "\n  "), flush=True)
                rows.append((script, peak_rss, base_rss, import_rss, status == 0 and tiny_status == 0))
        finally:
            stop_spawned(server)

        size_kib = size / 1024
        print(f"\npeak RSS, MiB (input file {mib(size_kib):.0f} MiB, a tenth of it {mib(size_kib) / 10:.0f} MiB):")
        print(f"{'script':<13} {'peak':>7} {'baseline':>9} {'imports':>8} {'allowance':>10}  verdict")
        for script, peak_rss, base_rss, import_rss, exited_cleanly in rows:
            if script == "reformat":  # chunk 0 of 10: a tenth of the input plus the interpreter and libraries
                allowance, rule = base_rss + size_kib / CHUNKS, "<= baseline + input/10"
            else:
                allowance, rule = size_kib, "< input size"
            ok = peak_rss <= allowance if script == "reformat" else peak_rss < allowance
            if not exited_cleanly:
                ok, rule = False, "the run failed"
            print(f"{script + '.py':<13} {mib(peak_rss):>7.0f} {mib(base_rss):>9.0f} {mib(import_rss):>8.0f} "
                  f"{mib(allowance):>10.0f}  {'PASS' if ok else 'FAIL'} ({rule})")
        print(f"(baseline: the same command on {BASELINE_RECORDS} records; imports: the script's module and its "
              f"HTTP library imported, nothing run; this benchmark's own peak RSS: "
              f"{mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss):.0f} MiB)")
    finally:
        if args.keep:
            print(f"files kept in {workdir}")
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
