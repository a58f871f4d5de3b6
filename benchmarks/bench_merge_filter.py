"""Benchmark parallel_data_merge.py and rewrite_data_selection.py: time and peak memory.

Usage:
    .venv/bin/python benchmarks/bench_merge_filter.py
    .venv/bin/python benchmarks/bench_merge_filter.py --records 100000 --token_records 20000

Writes, in a temporary folder (--workdir to choose it, --keep to leave it there), a
synthetic stage-3 input of --records classified records (questions of 50-150 characters,
responses of 200-600; ids with gaps and some string ids) as a JSON list with indent 4, and
--batches batch files as reformat.py writes them (two candidates per record; 10% passed
through, 1% failed; ``checks_passed`` on each chosen rewrite that passes the quality checks,
computed by the checks themselves in a process pool while the files are written; with
--no-stamps none, as from a tool that does not stamp, and the filter runs every check).
Then it runs, each in its own process:

1. the merge of the whole input;
2. the filter (open_platypus rules) of the whole input, lengths counted in words;
3. the filter of the first --token_records records with a tokenizer (a small BPE built by
   tests/tiny_model.py), and, on the same records, the original implementation's way of
   counting: one tokenizer call per text, two per record.

It prints wall time and peak RSS (the child's ru_maxrss from os.wait4) for each, and the
peak as a multiple of the input file's size. Targets: merge and word-counting filter of
1M records within 120 s and under 3x the input size; token counting at least 2x faster
than one call per record.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from synthetic import POOL, WORDS, mib, run_measured

from realign import chunk_bounds, iter_records, write_json_list_atomic

CATEGORIES = ("open_qa", "planning", "default", "exam_problem_solving_tutor", "general_classification",
              "how_to_generation", "explain_code", "roleplay", "math_puzzles", "closed_qa")


def make_pool(rng_seed, low, high):
    """``POOL`` word texts of ``low``-``high`` characters (a cheap LCG, so generation is fast)."""
    texts, state = [], rng_seed
    for _ in range(POOL):
        state = (state * 1103515245 + 12345) % 2**31
        target = low + state % (high - low + 1)
        words, size = [], 0
        while size < target:
            state = (state * 1103515245 + 12345) % 2**31
            word = WORDS[state % len(WORDS)]
            words.append(word)
            size += len(word) + 1
        texts.append(" ".join(words)[:target])
    return texts


def synthetic_records(n):
    """Yield ``n`` stage-3 input records, and with each its batch line, as reformat.py writes it."""
    questions, responses = make_pool(1, 50, 150), make_pool(2, 200, 600)
    for i in range(n):
        record_id = f"s-{i}" if i % 50 == 0 else 3 * i + (i % 2)
        category = CATEGORIES[i % len(CATEGORIES)]
        response = responses[(i * 31) % POOL]
        if i % 100 == 1:
            response = "BC"[i % 2]  # a one-letter answer (Open-Platypus)
        elif i % 40 == 3:
            response = f"Here it is:\n```python\ndef f(x):\n    return x + {i}\n```\n{response[:200]}"
        record = {"id": record_id, "items": [
            {"from": "human", "value": f"Question {i}: {questions[(i * 17) % POOL]}?", "category": category},
            {"from": "gpt", "value": response if len(response) == 1 else f"{response} ({i})"}]}
        original = record["items"][1]["value"]
        if i % 10 == 7 or category == "roleplay":
            candidates, chosen = [], {"reason": "no format for this task", "revised_response": original}
        else:
            extra = responses[(i * 7) % POOL]
            long = f"Analysis: the question asks for this.\n\n1. {original}\n2. {extra}\n\nConclusion."
            short = original if i % 25 else "Too short."
            candidates = [{"reason": "the format fits", "revised_response": long},
                          {"reason": "a second sample", "revised_response": short}]
            chosen = candidates[0] if i % 25 else candidates[1]
        line = json.loads(json.dumps(record))
        line["items"][1]["revised_response_list"] = candidates
        line["items"][1]["revised_response"] = chosen
        if i % 100 == 9:
            line["status"], line["error"] = "failed", "no 'Revised response:' in 3 replies"
        yield record, line


def stamp_passing(pairs):
    """``pairs`` (record, batch line) with reformat.py's ``checks_passed`` on each chosen
    rewrite that passes the quality checks."""
    from realign.quality import check_record, passed_stamp, record_texts

    for record, line in pairs:
        turn = line["items"][1]
        chosen = turn["revised_response"]["revised_response"]
        if turn["revised_response_list"] and "status" not in line and not check_record(record, chosen):
            line["checks_passed"] = passed_stamp(chosen, *record_texts(record))
    return pairs


def stamped(generated, chunk=1000):
    """:func:`stamp_passing` over ``generated`` in a process pool, in order."""
    import itertools
    import multiprocessing

    chunks = iter(lambda: list(itertools.islice(generated, chunk)), [])
    with multiprocessing.Pool() as pool:
        for pairs in pool.imap(stamp_passing, chunks):
            yield from pairs


def write_inputs(directory, n, batch_num, stamps=True):
    """Write input.json and the batch files; return the input's path."""
    input_path = os.path.join(directory, "input.json")
    batch_dir = os.path.join(directory, "rewrite")
    os.makedirs(batch_dir, exist_ok=True)
    generated = stamped(synthetic_records(n)) if stamps else synthetic_records(n)

    def records():
        for batch_id in range(batch_num):
            start, end = chunk_bounds(n, batch_num, batch_id)
            name = f"rewrite_data_{batch_id}_of_{batch_num}_batch.jsonl"
            with open(os.path.join(batch_dir, name), "w", encoding="utf-8") as f:
                for _ in range(start, end):
                    record, line = next(generated)
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    yield record

    write_json_list_atomic(input_path, records())
    return input_path, batch_dir


def first_records(path, n, out_path):
    """Write the first ``n`` records of ``path`` to ``out_path``."""
    def records():
        for index, record in enumerate(iter_records(path)):
            if index >= n:
                return
            yield record

    write_json_list_atomic(out_path, records())


# The original filter's way, as a whole run: both files loaded whole, records paired by
# position, two tokenizer calls per record, the result dumped at the end.
ORIGINAL_WAY = """
import json, sys
from transformers import AutoTokenizer
tokenizer_dir, original_path, merged_path, out_path = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
with open(original_path) as f:
    originals = json.load(f)
with open(merged_path) as f:
    merged = json.load(f)
out = []
for i, record in enumerate(originals):
    original, rewrite = record["items"][1]["value"], merged[i]["items"][1]["value"]
    original_length = len(tokenizer(original)["input_ids"]) - 1
    rewrite_length = len(tokenizer(rewrite)["input_ids"]) - 1
    chosen = merged[i] if rewrite_length > 0.5 * original_length else record
    chosen["tag"] = "rewrite" if chosen is merged[i] else "original"
    out.append(chosen)
with open(out_path, "w") as f:
    f.write(json.dumps(out, indent=4, ensure_ascii=False))
print("done", file=sys.stderr)
"""


def count_one_call_per_text(tokenizer_dir, original_path, merged_path):
    """The original filter's counting: ``len(tokenizer(text)['input_ids'])`` per text. Seconds."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    merged = {r["id"]: r["items"][1]["value"] for r in iter_records(merged_path)}
    pairs = [(r["items"][1]["value"], merged[r["id"]]) for r in iter_records(original_path)]
    start = time.perf_counter()
    for original, rewrite in pairs:
        len(tokenizer(original)["input_ids"]) - 1
        len(tokenizer(rewrite)["input_ids"]) - 1
    return time.perf_counter() - start


def count_batched(tokenizer_dir, original_path, merged_path):
    """The same texts through realign.LengthCounter (batched calls). Seconds."""
    from realign import LengthCounter

    counter = LengthCounter(tokenizer_dir)
    merged = {r["id"]: r["items"][1]["value"] for r in iter_records(merged_path)}
    pairs = [(r["items"][1]["value"], merged[r["id"]]) for r in iter_records(original_path)]
    start = time.perf_counter()
    for at in range(0, len(pairs), 4096):
        chunk = pairs[at:at + 4096]
        counter([o for o, _ in chunk] + [r for _, r in chunk])
    return time.perf_counter() - start


def report(name, seconds, peak, input_size, last_line):
    print(f"{name}: {seconds:.1f} s, peak RSS {mib(peak)} = {peak / input_size:.2f}x the input file")
    print(f"    {last_line.split(': ', 1)[-1]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time and peak memory of the merge and the filter.")
    parser.add_argument("--records", type=int, default=1_000_000, help="records of the synthetic input")
    parser.add_argument("--batches", type=int, default=10, help="batch files (reformat.py's --dataset_batch_num)")
    parser.add_argument("--token_records", type=int, default=100_000,
                        help="records for the tokenizer comparison (0 to skip it)")
    parser.add_argument("--stamps", action=argparse.BooleanOptionalAction, default=True,
                        help="stamp the chosen rewrites that pass the checks, as reformat.py does (default: on)")
    parser.add_argument("--workdir", default=None, help="folder for the synthetic files (default: a temporary one)")
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=False,
                        help="leave the synthetic files in place")
    args = parser.parse_args(argv)

    directory = args.workdir or tempfile.mkdtemp(prefix="bench_merge_filter_")
    os.makedirs(directory, exist_ok=True)
    python = sys.executable
    try:
        start = time.perf_counter()
        input_path, batch_dir = write_inputs(directory, args.records, args.batches, args.stamps)
        input_size = os.path.getsize(input_path)
        batch_size = sum(os.path.getsize(os.path.join(batch_dir, n)) for n in os.listdir(batch_dir))
        print(f"synthetic data: {args.records:,} records, input {mib(input_size)}, {args.batches} batch files "
              f"{mib(batch_size)} ({time.perf_counter() - start:.0f} s to write)")

        merged_path = os.path.join(directory, "merged.json")
        seconds, peak, line = run_measured([python, "parallel_data_merge.py", "--input_data_path", input_path,
                                            "--output_directory", batch_dir, "--final_output_path", merged_path])
        report("merge", seconds, peak, input_size, line)

        final_path = os.path.join(directory, "final.json")
        seconds, peak, line = run_measured([python, "rewrite_data_selection.py", "--input_original_data_path",
                                            input_path, "--input_rewrite_data_path", merged_path,
                                            "--output_path", final_path])
        report("filter, lengths in words", seconds, peak, input_size, line)

        if args.token_records:
            from tiny_model import build_tiny_tokenizer

            n = min(args.token_records, args.records)
            tokenizer_dir = os.path.join(directory, "tokenizer")
            build_tiny_tokenizer(tokenizer_dir)
            small_input = os.path.join(directory, "input_small.json")
            small_merged = os.path.join(directory, "merged_small.json")
            first_records(input_path, n, small_input)
            first_records(merged_path, n, small_merged)
            small_size = os.path.getsize(small_input)
            seconds, peak, line = run_measured([python, "rewrite_data_selection.py", "--input_original_data_path",
                                                small_input, "--input_rewrite_data_path", small_merged,
                                                "--output_path", os.path.join(directory, "final_small.json"),
                                                "--tokenizer_path", tokenizer_dir])
            report(f"filter, lengths in tokens, {n:,} records", seconds, peak, small_size, line)
            original_seconds, original_peak, _ = run_measured([
                python, "-c", ORIGINAL_WAY, tokenizer_dir, small_input, small_merged,
                os.path.join(directory, "final_original_way.json")])
            print(f"the original's way (one tokenizer call per text), {n:,} records: {original_seconds:.1f} s, "
                  f"peak RSS {mib(original_peak)} = {original_peak / small_size:.2f}x the input file; "
                  f"the filter is {original_seconds / seconds:.1f}x faster")
            batched = count_batched(tokenizer_dir, small_input, small_merged)
            one_by_one = count_one_call_per_text(tokenizer_dir, small_input, small_merged)
            print(f"counting alone, {2 * n:,} texts: one call per text {one_by_one:.1f} s, realign.LengthCounter "
                  f"{batched:.1f} s ({one_by_one / batched:.1f}x); the whole filter run takes "
                  f"{seconds / one_by_one:.2f}x the time of one-call-per-text counting alone")
    finally:
        if args.keep:
            print(f"files kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
