"""Benchmark evaluate.py's free measures: time and peak memory on a large synthetic run.

Usage:
    .venv/bin/python benchmarks/bench_evaluate.py
    .venv/bin/python benchmarks/bench_evaluate.py --records 200000

Writes, in a temporary folder (--workdir to choose it, --keep to leave it there), a
synthetic stage-3 input of --records classified records (responses of 50-300 words, tasks
drawn from all 46, ids with gaps and some string ids) as a JSON list with indent 4, and
the final file rewrite_data_selection.py would write for it, in the same order: about 30%
of the responses rewritten (edit rate > 0.2; longer or shorter), 5% changed a little, the
rest tagged original with a reject reason. Then it runs, in a child process, evaluate.py
with --output_path, --report_path and --plot_path, and prints its wall time and peak RSS
(the child's ru_maxrss from os.wait4), the headline, and the cost of the word-level edit
distance alone (rapidfuzz on --distance_pairs pairs, in this process), next to a
hand-written quadratic loop on a few pairs for scale. Last, the same evaluate.py run with
--html_path: its time against the first run's and the page's size.

Targets (issue 22), printed with PASS or FAIL: the page stays under 10 MB and the run with
it takes at most a third longer than without. The other figures have no target:
benchmarks/README.md lists those measured at 1M records. They depend on the machine, so
measure on a quiet one.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from synthetic import POOL, WORDS, mib, run_measured

import constant
from realign import write_json_lists_atomic
from realign.metrics import edit_rate_of_words, split_words

TASKS = list(constant.TASK_DESCRIPTION)
REASONS = ("unchanged", "length", "code", "single_letter")
PAGE_MAX_BYTES = 10_000_000  # issue 22: the page of 1M records stays under 10 MB
PAGE_MAX_EXTRA_TIME = 1 / 3  # ... built in the time of the figures plus at most a third more


def lcg(state):
    return (state * 1103515245 + 12345) % 2**31


def make_pool(seed, low, high):
    """``POOL`` texts of ``low``-``high`` words (a cheap LCG, so generation is fast)."""
    texts, state = [], seed
    for _ in range(POOL):
        state = lcg(state)
        n = low + state % (high - low + 1)
        words = []
        for _ in range(n):
            state = lcg(state)
            words.append(WORDS[state % len(WORDS)])
        texts.append(" ".join(words))
    return texts


def rewrite(text, i):
    """A reformatted version: headings and a list (longer), or a shortened one; edit rate > 0.2."""
    words = text.split()
    half = len(words) // 2
    if i % 4 == 0:  # shortened to 60%, with a heading
        return "**Answer**\n\n" + " ".join(words[: int(len(words) * 0.6)])
    extra = " ".join(words[: int(len(words) * 0.4)])
    return (f"**Analysis**\n\nThe question asks for this.\n\n1. {' '.join(words[:half])}\n"
            f"2. {' '.join(words[half:])}\n\n**Conclusion**\n\n{extra}")


def synthetic_pairs(n):
    """Yield ``(original record, final record)`` for ``n`` records."""
    responses = make_pool(2, 50, 300)
    for i in range(n):
        record_id = f"s-{i}" if i % 50 == 0 else 3 * i + (i % 2)
        task = TASKS[(i * 7) % len(TASKS)]
        response = f"{responses[(i * 31) % POOL]} ({i})"
        original = {"id": record_id, "items": [
            {"from": "human", "value": f"Question {i}: what about {WORDS[i % len(WORDS)]}?", "category": task},
            {"from": "gpt", "value": response}]}
        kind = i % 20
        if kind < 6:  # 30%: rewritten
            after, tag, reason = rewrite(response, i), "rewrite", None
        elif kind == 6:  # 5%: changed a little
            after, tag, reason = response.replace(" the ", " THE ", 1), "rewrite", None
        else:
            after, tag, reason = response, "original", REASONS[i % len(REASONS)]
        final = {"id": record_id, "items": [original["items"][0], {"from": "gpt", "value": after}], "tag": tag}
        if reason:
            final["reject_reason"] = reason
        yield original, final


def write_inputs(directory, n):
    original_path = os.path.join(directory, "original.json")
    final_path = os.path.join(directory, "final.json")
    write_json_lists_atomic([original_path, final_path], synthetic_pairs(n))
    return original_path, final_path


def quadratic_word_distance(a, b):
    """The hand-written dynamic programme the library replaces (for scale only)."""
    previous = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def time_distances(n_pairs, n_quadratic):
    pairs = [(o["items"][1]["value"], f["items"][1]["value"]) for o, f in synthetic_pairs(n_pairs)]
    start = time.perf_counter()
    for before, after in pairs:
        edit_rate_of_words(split_words(before), split_words(after))
    library = (time.perf_counter() - start) / len(pairs)
    changed = [(split_words(b), split_words(a)) for b, a in pairs if b != a][:n_quadratic]
    start = time.perf_counter()
    for before, after in changed:
        quadratic_word_distance(before, after)
    quadratic = (time.perf_counter() - start) / max(len(changed), 1)
    return library, quadratic, sum(1 for b, a in pairs if b != a) / len(pairs)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time and peak memory of evaluate.py's free measures.")
    parser.add_argument("--records", type=int, default=1_000_000, help="records of the synthetic run")
    parser.add_argument("--distance_pairs", type=int, default=20_000, help="pairs for the edit-distance timing")
    parser.add_argument("--quadratic_pairs", type=int, default=50, help="pairs for the hand-written loop (0 skips)")
    parser.add_argument("--workdir", default=None, help="folder for the synthetic files (default: a temporary one)")
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=False,
                        help="leave the synthetic files and outputs in place")
    args = parser.parse_args(argv)

    directory = args.workdir or tempfile.mkdtemp(prefix="bench_evaluate_")
    os.makedirs(directory, exist_ok=True)
    try:
        start = time.perf_counter()
        original_path, final_path = write_inputs(directory, args.records)
        sizes = os.path.getsize(original_path) + os.path.getsize(final_path)
        print(f"synthetic data: {args.records:,} records, original + final {mib(sizes)} "
              f"({time.perf_counter() - start:.0f} s to write)")
        out = os.path.join(directory, "evaluation.json")
        seconds, peak, line = run_measured([
            sys.executable, "evaluate.py", "--original_path", original_path, "--rewritten_path", final_path,
            "--output_path", out, "--report_path", os.path.join(directory, "evaluation.md"),
            "--plot_path", os.path.join(directory, "evaluation.png")])
        print(f"evaluate.py, free measures with JSON, report and chart: {seconds:.1f} s "
              f"({1e6 * seconds / args.records:.0f} us a record), peak RSS {mib(peak)} "
              f"({peak / sizes:.2f}x the two input files); output {mib(os.path.getsize(out))}")
        print(f"    {line.split(': ', 1)[-1]}")
        page = os.path.join(directory, "report.html")
        html_seconds, html_peak, _ = run_measured([
            sys.executable, "evaluate.py", "--original_path", original_path, "--rewritten_path", final_path,
            "--output_path", out, "--report_path", os.path.join(directory, "evaluation.md"),
            "--plot_path", os.path.join(directory, "evaluation.png"), "--html_path", page])
        size, extra = os.path.getsize(page), html_seconds / seconds - 1
        verdict = "PASS" if size < PAGE_MAX_BYTES and extra <= PAGE_MAX_EXTRA_TIME else "FAIL"
        print(f"the same with --html_path: {html_seconds:.1f} s ({extra:+.0%}; target at most "
              f"{PAGE_MAX_EXTRA_TIME:+.0%}), peak RSS {mib(html_peak)}, page {size / 1e6:.1f} MB "
              f"(target under {PAGE_MAX_BYTES / 1e6:.0f} MB): {verdict}")
        library, quadratic, changed = time_distances(args.distance_pairs, args.quadratic_pairs)
        print(f"edit rate alone (split + rapidfuzz Levenshtein on word lists, {changed:.0%} of pairs changed): "
              f"{1e6 * library:.1f} us a pair = {library * 1e6:.0f} s per million records")
        if args.quadratic_pairs:
            print(f"a hand-written quadratic loop on changed pairs: {1e3 * quadratic:.1f} ms a pair "
                  f"(~{quadratic * 1e6 / 3600 * (changed or 1):.0f} h per million records of this mix)")
    finally:
        if args.keep:
            print(f"files kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
