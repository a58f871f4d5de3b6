"""What the benchmarks share: synthetic records (no real data is needed or committed), and
running a stage with its time and peak memory measured."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXT = ("the format of an answer matters as much as its content when a reader scans it for the one "
        "fact they need so every response is checked against the task and rewritten with care")


# Words of the synthetic texts, and how many distinct texts a pool holds (records combine them with their id).
WORDS = ["the", "a", "of", "to", "and", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
         "this", "be", "are", "or", "an", "it", "which", "have", "has", "one", "answer", "question", "format",
         "river", "mountain", "city", "function", "value", "result", "step", "list", "table", "plan", "data",
         "explain", "because", "therefore", "first", "second", "finally", "example", "number"]
POOL = 4099


def run_measured(command):
    """Run ``command`` in the project folder; return (wall seconds, peak RSS in bytes, stderr's last line).
    A failure ends the benchmark with the command's stderr."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr}")
    return elapsed, usage.ru_maxrss * 1024, stderr.strip().splitlines()[-1]


def mib(size):
    return f"{size / 2**20:,.0f} MiB"


def rewrite_records(n, response_words):
    """``n`` single-turn records of rewrite tasks without evidence, responses of
    ``response_words`` words, ids 0..n-1."""
    from constant import RAG_TASKS, REWRITE_TASK

    tasks = [task for task in REWRITE_TASK if task not in RAG_TASKS]
    words = TEXT.split()
    return [{"id": i, "items": [
        {"from": "human", "value": f"Question {i}: how does {' '.join(words[i % 9:i % 9 + 8])} work?",
         "category": tasks[i % len(tasks)]},
        {"from": "gpt", "value": " ".join(words[(i + j) % len(words)] for j in range(response_words))}]}
        for i in range(n)]
