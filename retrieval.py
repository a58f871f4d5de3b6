"""Stage 2 of ReAlign: add Google search evidence (Serper) to knowledge-intensive records.

Usage:
    export SERPER_API_KEY=...
    python retrieval.py --input_data_path datasets/examples/realign_examples.json \
        --output_path outputs/realign_examples_retrieval.json --batch_size 10

Searches the instruction (``items[0].value``, as written) of every single-turn record
whose category is in ``RAG_TASKS``; every other record is copied unchanged. Input: a
classified dataset (JSON list or JSONL). Outputs, all records in input order:

    OUT                              items[0].evidence: at most 5 raw strings
    <OUT stem>_clean_evidence<ext>   the same, cleaned (the input of reformat.py)
    <OUT stem>_progress.jsonl        one line per finished query; a rerun skips those
    <OUT stem>_failures.json         ids whose search still failed (only when some did)

Environment:
    SERPER_API_KEY   the Serper API key (read only from here, never logged)

Exit status: 0 all done; 1 some searches failed (rerun the same command to retry
them) or the key was refused; 2 bad input.
"""

import argparse
import logging
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from tqdm import tqdm

from constant import RAG_TASKS
from realign import (
    ConfigError,
    ProgressWriter,
    check_constants,
    exits_cleanly,
    iter_progress,
    load_records,
    non_negative_int,
    positive_float,
    positive_int,
    refuse_overwriting_input,
    setup_logging,
    write_json_atomic,
)
from realign.search import SERPER_URL, SearchFailed, make_session, search

logger = logging.getLogger("retrieval")

PLACEHOLDER = "No good Google Search Result was found"  # evidence of a search that found nothing
MAX_EVIDENCE = 5  # strings kept per query
ORGANIC_RESULTS = 10  # organic results read per reply
CLEAN_PREFIXES = ("Missing:", "Duration:", "Posted:")  # page furniture, not evidence
MAX_LOGGED_FAILURES = 50  # ids named in the log; the failures file has them all


# -- pure functions ------------------------------------------------------------------


def needs_retrieval(record):
    """Single-turn records of a knowledge-intensive task are searched."""
    return len(record["items"]) <= 2 and record["items"][0].get("category") in RAG_TASKS


def _is_text(value):
    return isinstance(value, str) and value != ""


def _attribute_lines(attributes):
    if not isinstance(attributes, dict):
        return []
    return [f"{name}: {value}" for name, value in attributes.items()]


def extract_evidence(reply):
    """The evidence strings of a Serper reply, in order, at most ``MAX_EVIDENCE``.

    The answer box (its answer, else its snippet with newlines as spaces, else its
    highlighted snippet), then the knowledge graph ("title: type", description, one
    "attribute: value" each), then the first ``ORGANIC_RESULTS`` organic results (snippet,
    then one "attribute: value" each). Nothing found gives ``[PLACEHOLDER]``.
    """
    found = []
    box = reply.get("answerBox")
    if isinstance(box, dict):
        highlighted = box.get("snippetHighlighted")
        if isinstance(highlighted, list):  # Serper sends a list of highlighted phrases
            highlighted = " ".join(part for part in highlighted if isinstance(part, str))
        if _is_text(box.get("answer")):
            found.append(box["answer"])
        elif _is_text(box.get("snippet")):
            found.append(box["snippet"].replace("\n", " "))
        elif _is_text(highlighted):
            found.append(highlighted)
    graph = reply.get("knowledgeGraph")
    if isinstance(graph, dict):
        if _is_text(graph.get("type")):
            found.append(f"{graph.get('title')}: {graph['type']}")
        if _is_text(graph.get("description")):
            found.append(graph["description"])
        found.extend(_attribute_lines(graph.get("attributes")))
    organic = reply.get("organic")
    for result in organic[:ORGANIC_RESULTS] if isinstance(organic, list) else []:
        if not isinstance(result, dict):
            continue
        if _is_text(result.get("snippet")):
            found.append(result["snippet"])
        found.extend(_attribute_lines(result.get("attributes")))
    return found[:MAX_EVIDENCE] or [PLACEHOLDER]


def clean_evidence(evidence):
    """Drop the placeholder and the strings starting with a ``CLEAN_PREFIXES`` entry."""
    return [text for text in evidence if text != PLACEHOLDER and not text.startswith(CLEAN_PREFIXES)]


def with_evidence(record, evidence):
    """A copy of ``record`` whose ``items[0].evidence`` is ``evidence``, or has no
    ``evidence`` key when ``evidence`` is None. The input record is not changed."""
    first = dict(record["items"][0])
    first.pop("evidence", None)
    if evidence is not None:
        first["evidence"] = evidence
    return {**record, "items": [first, *record["items"][1:]]}


def output_paths(output_path):
    """The four files of a run, from ``--output_path``."""
    stem, ext = os.path.splitext(output_path)
    return {"raw": output_path, "clean": f"{stem}_clean_evidence{ext}",
            "progress": f"{stem}_progress.jsonl", "failures": f"{stem}_failures.json"}


def read_finished(progress_path, wanted):
    """``{id: raw evidence}`` from a progress file, for the ids in ``wanted``.

    Lines for other ids (another input) or without a list of strings are ignored: those
    queries are searched again.
    """
    finished = {}
    for entry in iter_progress(progress_path):
        if not isinstance(entry, dict):
            continue
        record_id, evidence = entry.get("id"), entry.get("evidence")
        if isinstance(record_id, (int, str)) and not isinstance(record_id, bool) and record_id in wanted \
                and isinstance(evidence, list) and all(isinstance(text, str) for text in evidence):
            finished[record_id] = evidence
    return finished


# -- searching -----------------------------------------------------------------------


def run_searches(pending, args, api_key, progress_path, stats):
    """Search the queries of ``pending`` (``{id: query}``), ``--batch_size`` at a time;
    records that share a query share one search.

    Each finished record is appended to the progress file at once (from this thread
    only). Returns ``({id: evidence}, {id: error})``. A :class:`FatalError` or Ctrl-C
    stops the run: queued queries are dropped, the ones already sent are waited for and
    saved, so that nothing paid for is searched again.
    """
    found, failed = {}, {}
    stop = threading.Event()
    session = make_session(args.batch_size)

    def search_one(query):
        reply = search(session, query, api_key, url=args.search_url, gl=args.gl, hl=args.hl,
                       timeout=args.timeout, max_retries=args.max_retries, stop=stop, stats=stats)
        return extract_evidence(reply)

    ids_by_query = {}
    for record_id, query in pending.items():
        ids_by_query.setdefault(query, []).append(record_id)
    queue = iter(ids_by_query.items())
    in_flight = {}  # future -> the ids waiting for its query
    window = 2 * args.batch_size  # queued ahead so no worker waits for the main thread
    pool = ThreadPoolExecutor(max_workers=args.batch_size, thread_name_prefix="search")
    try:
        with ProgressWriter(progress_path) as progress, \
                tqdm(total=len(pending), desc="search", unit="query", dynamic_ncols=True) as bar:

            def submit_next():
                item = next(queue, None)
                if item is not None:
                    in_flight[pool.submit(search_one, item[0])] = item[1]

            def save(record_ids, evidence):
                for record_id in record_ids:
                    progress.write({"id": record_id, "evidence": evidence})
                    found[record_id] = evidence

            try:
                for _ in range(window):
                    submit_next()
                while in_flight:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        record_ids = in_flight.pop(future)
                        try:
                            evidence = future.result()
                        except SearchFailed as e:
                            for record_id in record_ids:
                                failed[record_id] = str(e)
                                logger.warning("id %r: search failed: %s", record_id, e)
                        else:
                            save(record_ids, evidence)
                        bar.update(len(record_ids))
                        submit_next()
            except BaseException:
                stop.set()  # no new request is sent; retry waits end at once
                pool.shutdown(wait=True, cancel_futures=True)
                for future, record_ids in in_flight.items():
                    if not future.cancelled() and future.exception() is None:
                        save(record_ids, future.result())
                raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        session.close()
    return found, failed


# -- command line --------------------------------------------------------------------




def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Add Google search evidence (Serper) to the records of knowledge-intensive tasks. "
                    "The API key is read from the environment variable SERPER_API_KEY.")
    parser.add_argument("--input_data_path", required=True,
                        help="classified dataset (JSON list or JSONL of records with items[0].category)")
    parser.add_argument("--output_path", required=True,
                        help="raw-evidence output (JSON); the cleaned copy, progress and failures files "
                             "are written next to it as <stem>_clean_evidence<ext>, <stem>_progress.jsonl "
                             "and <stem>_failures.json")
    parser.add_argument("--batch_size", type=positive_int, default=10,
                        help="searches in flight at once (default: 10)")
    parser.add_argument("--gl", default="us", help="Google country code sent with every query (default: us)")
    parser.add_argument("--hl", default="en", help="Google interface language sent with every query (default: en)")
    parser.add_argument("--search_url", default=SERPER_URL,
                        help=f"search endpoint, POSTed {{q, gl, hl}} as JSON (default: {SERPER_URL})")
    parser.add_argument("--max_retries", type=non_negative_int, default=5,
                        help="retries of a query after a rate limit, server error, timeout or connection "
                             "error, with backoff honouring Retry-After (default: 5)")
    parser.add_argument("--timeout", type=positive_float, default=30.0,
                        help="seconds to wait for one reply (default: 30)")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="log every retry (default: off)")
    args = parser.parse_args(argv)
    if not args.search_url.startswith(("http://", "https://")):
        parser.error(f"--search_url must start with http:// or https://, got {args.search_url!r}")
    return args


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    check_constants()
    paths = output_paths(args.output_path)
    refuse_overwriting_input(args.input_data_path, *paths.values())
    records = load_records(args.input_data_path)

    wanted = {record["id"]: record["items"][0]["value"] for record in records if needs_retrieval(record)}
    evidence = read_finished(paths["progress"], wanted)
    pending = {record_id: query for record_id, query in wanted.items() if record_id not in evidence}
    logger.info("%d records, %d to search: %d finished in %s, %d to go",
                len(records), len(wanted), len(evidence), paths["progress"], len(pending))

    resumed = len(evidence)
    stats, failed = {}, {}
    if pending:
        api_key = os.environ.get("SERPER_API_KEY", "").strip()
        if not api_key:
            raise ConfigError("SERPER_API_KEY is not set: export your Serper API key (https://serper.dev) "
                              f"to search {len(pending)} queries")
        found, failed = run_searches(pending, args, api_key, paths["progress"], stats)
        evidence.update(found)

    raw_records, clean_records = [], []
    cleaned_away = 0
    for record in records:
        if record["id"] not in wanted:
            raw_records.append(record)
            clean_records.append(record)
            continue
        raw = evidence.get(record["id"])  # None: the search failed
        clean = clean_evidence(raw) if raw is not None else None
        if raw is not None and not clean:
            cleaned_away += 1
        raw_records.append(with_evidence(record, raw))
        clean_records.append(with_evidence(record, clean or None))
    write_json_atomic(paths["raw"], raw_records)
    write_json_atomic(paths["clean"], clean_records)

    failed_ids = [record_id for record_id in wanted if record_id in failed]
    if failed_ids:
        write_json_atomic(paths["failures"], failed_ids)
        shown = ", ".join(repr(record_id) for record_id in failed_ids[:MAX_LOGGED_FAILURES])
        more = f" and {len(failed_ids) - MAX_LOGGED_FAILURES} more" if len(failed_ids) > MAX_LOGGED_FAILURES else ""
        logger.warning("%d searches failed: ids %s%s (listed in %s); these records have no "
                       "evidence; rerun the same command to retry them",
                       len(failed_ids), shown, more, paths["failures"])
    elif os.path.exists(paths["failures"]):
        os.remove(paths["failures"])  # stale: every earlier failure has now been searched
        logger.info("removed %s: no search failed", paths["failures"])

    multi_turn = sum(1 for record in records if len(record["items"]) > 2)
    logger.info("#in: %d, searched: %d (now: %d, from progress: %d), with evidence: %d, cleaned away: %d, "
                "failed: %d, skipped as non-RAG: %d, skipped as multi-turn: %d, requests: %d, retries: %d",
                len(records), len(evidence), len(evidence) - resumed, resumed, len(evidence) - cleaned_away,
                cleaned_away, len(failed_ids), len(records) - len(wanted) - multi_turn, multi_turn,
                stats.get("requests", 0), stats.get("retries", 0))
    logger.info("wrote %s and %s", paths["raw"], paths["clean"])
    return 1 if failed_ids else 0


if __name__ == "__main__":
    sys.exit(main())
