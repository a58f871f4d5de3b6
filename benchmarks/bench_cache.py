"""Benchmark the request cache: the CPU cost of a hit, and a rerun of 100k cached records.

Usage:
    .venv/bin/python benchmarks/bench_cache.py
    .venv/bin/python benchmarks/bench_cache.py --records 20000

1. A hit: a request the engine (``realign.engine.send_requests``) answers from the cache
   (building the request, key of the whole request body, SQLite lookup off the event loop,
   decompression, JSON), timed with ``time.process_time`` over --hits requests on a cache of
   --records entries: once with the reply handed on as it is, once judged as reformat.py
   does (its two candidates' verdicts read from the reply, where a run stores them), and
   once judged from a reply without verdicts (the quality checks run: a reply cached by an
   older version, or under other checks).
2. A rerun into a fresh folder: the fake OpenAI server is started in its own process, the
   cache is filled with the replies it would give to reformat.py's requests for --records
   synthetic records (the same keys reformat.py computes, and the verdicts its reply handler
   adds before the engine stores a reply), then ``reformat.py`` runs on them
   into a new output folder. Printed: its wall time, and the chat requests the server got
   (0 when every record was answered by the cache).
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
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from fake_servers import default_chat_reply, spawn, stop_spawned  # noqa: E402
from synthetic import rewrite_records  # noqa: E402


def synthetic_records(n):
    return rewrite_records(n, 120)


def fake_reply(body):
    """What the fake server answers to a chat request (two candidates)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": default_chat_reply(body, i)},
                "finish_reason": "stop"} for i in range(body.get("n", 1))]
    return {"id": "cached", "object": "chat.completion", "model": body["model"], "choices": choices,
            "usage": {"prompt_tokens": 300, "completion_tokens": 250, "total_tokens": 550}}


def rewrite_request(args, sampling, record):
    """The logical body reformat.py sends for ``record`` (see ``reformat.Chunk``)."""
    import reformat

    messages = reformat.build_rewrite_messages(record, args.adaptive, args.is_retrieval, args.reply_format)
    return {"messages": messages, **sampling.fields()}


def fill_cache(cache_dir, records, base_url, verdicts=True):
    """Store the fake's reply to each record's request under the key reformat.py looks up,
    with the checks' verdicts of its candidates as reformat.py's reply handler adds them
    before the engine stores a reply (unless not ``verdicts``: a reply as the server sent it)."""
    import reformat
    from realign.cache import Cache
    from realign.client import OpenAITransport

    args = reformat.parse_args(["--input_data_path", "x", "--output_directory", "y", "--base_url", base_url])
    sampling = reformat.make_sampling(args)
    transport = OpenAITransport(base_url, "bench-key", model=args.model)
    with Cache(cache_dir) as cache:
        for record in records:
            body = rewrite_request(args, sampling, record)
            reply = fake_reply(body)
            if verdicts:
                reformat.judge_reply(record, reply)
            cache.put(transport.key(body), reply)
    return args, sampling


def time_hits(cache_dir, records, base_url, args, sampling, hits, judge=True):
    """CPU per request the engine answers from the cache, the reply judged as reformat.py does
    (unless not ``judge``: then the reply is handed on as it is)."""
    import reformat
    from realign.cache import Cache
    from realign.client import OpenAITransport
    from realign.engine import Options, Request, send_requests

    used = []

    def request(record):
        def on_reply(reply):
            used.append(reformat.judge_reply(record, reply) if judge else reply)
            return True
        return Request(rewrite_request(args, sampling, record), on_reply)

    transport = OpenAITransport(base_url, "bench-key", model=args.model, check_model=False)
    with Cache(cache_dir) as cache:
        options = Options(concurrency=64, cache=cache, check_first=False)
        start = time.process_time()
        usage = send_requests((request(record) for record in records[:hits]), transport, options, "bench")
        cpu = time.process_time() - start
    if usage.stats["cache_hits"] != hits or len(used) != hits:
        raise SystemExit(f"expected {hits} cache hits, got {usage.stats['cache_hits']} ({len(used)} replies used)")
    return cpu / hits


def main(argv=None):
    parser = argparse.ArgumentParser(description="Request cache: hit cost and a cached rerun.")
    parser.add_argument("--records", type=int, default=100_000, help="records of the rerun (default: 100,000)")
    parser.add_argument("--hits", type=int, default=10_000, help="hits timed for the CPU figure (default: 10,000)")
    args = parser.parse_args(argv)
    records = synthetic_records(args.records)
    with tempfile.TemporaryDirectory() as workdir:
        server, port = spawn("openai")
        base_url = f"http://127.0.0.1:{port}/v1"
        cache_dir = os.path.join(workdir, "cache")
        started = time.perf_counter()
        args_, sampling = fill_cache(cache_dir, records, base_url)
        print(f"filled the cache with {len(records):,} replies in {time.perf_counter() - started:.1f} s "
              f"({os.path.getsize(os.path.join(cache_dir, 'requests.sqlite3')) / 2**20:.0f} MiB)", flush=True)
        hits = min(args.hits, len(records))
        bare = time_hits(cache_dir, records, base_url, args_, sampling, hits, judge=False)
        per_hit = time_hits(cache_dir, records, base_url, args_, sampling, hits)
        raw_dir = os.path.join(workdir, "without_verdicts")
        fill_cache(raw_dir, records[:hits], base_url, verdicts=False)
        checked = time_hits(raw_dir, records, base_url, args_, sampling, hits)
        print(f"cache hit through the engine: {bare * 1000:.3f} ms of CPU per hit, the reply handed on as it is; "
              f"{per_hit * 1000:.3f} ms judged by reformat (the verdicts of its two candidates read from the "
              f"reply); {checked * 1000:.3f} ms judged from a reply without verdicts (the checks run) "
              f"({hits:,} hits each)", flush=True)

        input_path = os.path.join(workdir, "input.json")
        with open(input_path, "w", encoding="utf-8") as f:
            json.dump(records, f)
        env = {**os.environ, "OPENAI_API_KEY": "bench-key", "REALIGN_CACHE_DIR": cache_dir}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "reformat.py"), "--input_data_path", input_path,
                               "--output_directory", os.path.join(workdir, "fresh"), "--base_url", base_url,
                               "--concurrency", "64"], env=env, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        stats = stop_spawned(server)
        if done.returncode != 0:
            raise SystemExit(f"reformat.py exited {done.returncode}:\n{done.stderr[-3000:]}")
        summary = [line for line in done.stderr.splitlines() if "#chunk:" in line][-1]
        chat_requests = stats["main_requests"]  # not the model check
        print(f"rerun of {len(records):,} cached records into a fresh folder: {elapsed:.1f} s end to end, "
              f"{chat_requests} chat requests sent", flush=True)
        print("  " + summary.split("reformat: ", 1)[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
