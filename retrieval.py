"""Stage 2 of ReAlign: add Google search evidence (Serper) to knowledge-intensive records.

Usage:
    export SERPER_API_KEY=...
    python retrieval.py --input_data_path datasets/examples/realign_examples.json \
        --output_path outputs/realign_examples_retrieval.json --batch_size 10

Searches the instruction (``items[0].value``, as written) of every single-turn record
whose category is in ``RAG_TASKS``; every other record is copied unchanged. Input: a
classified dataset (JSON list or JSONL), streamed: the dataset is never held in memory.
Outputs, all records in input order:

    OUT                              items[0].evidence: at most 5 raw strings
    <OUT stem>_clean_evidence<ext>   the same, cleaned (the input of reformat.py)
    <OUT stem>_progress.jsonl        one line per finished query, with a fingerprint of the
                                     query, gl and hl; a rerun skips the lines that match
    <OUT stem>_failures.json         ids whose search still failed (only when some did)

A query the server refuses for good (HTTP 400 and other 4xx) is recorded in the progress
file with its error and not sent again unless --retry_failed; it leaves the record without
evidence and the exit status 0, with a warning. Every reply is kept in the request cache
(--cache_dir), so a rerun into another folder searches nothing twice. --dry_run says how
many searches (Serper credits) the run would send; --max_cost stops before the spend
would pass a cap.

Environment:
    SERPER_API_KEY      the Serper API key (read only from here, never logged)
    REALIGN_CACHE_DIR   the request cache (or --cache_dir; default ~/.cache/realign)

Exit status: 0 all done; 1 some searches failed (rerun the same command to retry
them), the budget was reached, or the key was refused; 2 bad input, or another process
is writing the same progress file; 130 interrupted (finished searches are kept).
"""

import argparse
import collections
import logging
import os
import sys

from constant import RAG_TASKS, SEARCH_PRICE
from realign import (
    ConfigError,
    OutputLock,
    ProgressWriter,
    check_constants,
    exits_cleanly,
    fingerprint,
    iter_records,
    positive_float,
    positive_int,
    read_progress_lines,
    refuse_overwriting_input,
    setup_logging,
    write_json_atomic,
    write_json_lists_atomic,
)
from realign.cache import open_cache
from realign.cli import ArgumentParser, progress_bar
from realign.engine import Options, Request, add_engine_arguments, send_requests
from realign.search import SEARCH_URL_VARIABLE, SERPER_URL, SerperTransport, search_body

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


def search_fingerprint(query, gl, hl):
    """The fingerprint of a search's progress line: progress made for another text or locale is
    not reused."""
    return fingerprint("search", query, gl, hl)


def read_finished(progress_path, fingerprints):
    """``({id: raw evidence}, {id: error of a refused query}, stale)`` from a progress file,
    for the ids of ``fingerprints`` whose fingerprint still matches (``stale`` counts the others)."""
    lines, stale = read_progress_lines(progress_path, fingerprints)
    finished, refused = {}, {}
    for record_id, entry in lines.items():
        evidence = entry.get("evidence")
        if isinstance(evidence, list) and all(isinstance(text, str) for text in evidence):
            finished[record_id] = evidence
        elif entry.get("refused") and isinstance(entry.get("error"), str):
            refused[record_id] = entry["error"]
    return finished, refused, stale


# -- searching -----------------------------------------------------------------------


class Searches:
    """The requests of one run: one per distinct query (records sharing a query share its
    search); each answer is appended to the progress file for every record that asked."""

    def __init__(self, pending, keys, args, progress):
        self.pending = pending
        self.keys = keys
        self.args = args
        self.progress = progress
        self.found, self.failed, self.refused = {}, {}, {}
        self.bar = None

    def requests(self):
        ids_by_query = {}
        for record_id, query in self.pending.items():
            ids_by_query.setdefault(query, []).append(record_id)
        for query, record_ids in ids_by_query.items():
            yield Request(search_body(query, self.args.gl, self.args.hl),
                          on_reply=lambda reply, ids=record_ids: self.save(ids, reply),
                          on_error=lambda error, ids=record_ids: self.record_failure(ids, error))

    def save(self, record_ids, reply):
        evidence = extract_evidence(reply)
        for record_id in record_ids:
            self.progress.write({"id": record_id, "fingerprint": self.keys[record_id], "evidence": evidence})
            self.found[record_id] = evidence
        self.bar.update(len(record_ids))
        return True

    def record_failure(self, record_ids, error):
        """A query refused for good is written to the progress file (not sent again unless
        --retry_failed); one that failed for now is only reported (a rerun retries it)."""
        for record_id in record_ids:
            logger.warning("id %r: search %s: %s", record_id, "refused" if error.refused else "failed", error)
            if error.refused:
                self.refused[record_id] = str(error)
                self.progress.write({"id": record_id, "fingerprint": self.keys[record_id], "refused": True,
                                     "error": str(error)})
            else:
                self.failed[record_id] = str(error)
        self.bar.update(len(record_ids))


def search_options(args, cache, price, progress=None):
    """The engine's options: --batch_size searches at once (the original's flag), billed by the search."""
    return Options(concurrency=args.batch_size, max_retries=args.max_retries, cache=cache, search_price=price,
                   max_cost=args.max_cost, dry_run=args.dry_run, usage_path=args.usage_path, progress=progress,
                   refusal_hint="check --gl, --hl, --search_url and the key's Serper credits")


# -- command line --------------------------------------------------------------------


def parse_args(argv=None):
    parser = ArgumentParser(
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
    parser.add_argument("--search_url", default=None,
                        help=f"search endpoint, POSTed {{q, gl, hl}} as JSON (default: ${SEARCH_URL_VARIABLE}, "
                             f"else {SERPER_URL})")
    parser.add_argument("--timeout", type=positive_float, default=30.0,
                        help="seconds to wait for one reply (default: 30)")
    parser.add_argument("--retry_failed", action=argparse.BooleanOptionalAction, default=False,
                        help="search again the queries the server refused for good in an earlier run "
                             "(default: off)")
    parser.add_argument("--price_per_search", type=positive_float, default=None,
                        help=f"USD per search (default: constant.SEARCH_PRICE, {SEARCH_PRICE})")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="log every retry (default: off)")
    group = parser.add_argument_group("requests")
    add_engine_arguments(group, default_max_retries=5, concurrency=False,
                         usage_help="also write this run's searches and spend (with --dry_run: the estimate) as "
                                    "JSON to this file (default: not written)")
    args = parser.parse_args(argv)
    args.search_url = args.search_url or os.environ.get(SEARCH_URL_VARIABLE) or SERPER_URL
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

    # First pass, streaming: validate every record and note the queries; nothing is held
    # but the queries of the records to search.
    wanted, total, multi_turn = {}, 0, 0
    for record in iter_records(args.input_data_path):
        total += 1
        multi_turn += len(record["items"]) > 2
        if needs_retrieval(record):
            wanted[record["id"]] = record["items"][0]["value"]
    keys = {record_id: search_fingerprint(query, args.gl, args.hl) for record_id, query in wanted.items()}
    price = SEARCH_PRICE if args.price_per_search is None else args.price_per_search
    evidence, refused, stale = read_finished(paths["progress"], keys)
    if args.retry_failed and refused:
        logger.info("--retry_failed: searching again %d queries the server refused before", len(refused))
        refused = {}
    pending = {record_id: query for record_id, query in wanted.items()
               if record_id not in evidence and record_id not in refused}
    cache = open_cache(args)  # an unusable cache stops here, before anything is written
    if args.dry_run:
        return dry_run(args, paths, wanted, evidence, pending, cache, price)
    api_key = serper_api_key(len(pending)) if pending else None  # before anything is written
    with OutputLock(paths["progress"]):
        return search_and_write(args, paths, wanted, keys, evidence, refused, stale, pending, cache, price, total,
                                multi_turn, api_key)


def serper_api_key(queries):
    """``$SERPER_API_KEY``; a ConfigError when it is not set and ``queries`` are to be searched."""
    api_key = os.environ.get("SERPER_API_KEY", "").strip()
    if not api_key:
        raise ConfigError("SERPER_API_KEY is not set: export your Serper API key (https://serper.dev) "
                          f"to search {queries} queries of the records of RAG_TASKS")
    return api_key


def search_and_write(args, paths, wanted, keys, evidence, refused, stale, pending, cache, price, total, multi_turn,
                     api_key):
    if stale:
        logger.warning("%s: %d lines were made for another query text or locale: searching them again",
                       paths["progress"], stale)
    logger.info("%d records, %d to search: %d finished in %s, %d refused before (not sent again; "
                "--retry_failed to try them), %d to go", total, len(wanted), len(evidence), paths["progress"],
                len(refused), len(pending))
    resumed = len(evidence)
    usage, failed = None, {}
    if pending:
        with ProgressWriter(paths["progress"]) as progress, \
                progress_bar(total=len(wanted) - len(refused), initial=resumed, desc="search", unit="rec") as bar:
            searches = Searches(pending, keys, args, progress)
            searches.bar = bar
            transport = SerperTransport(args.search_url, api_key, args.timeout, args.batch_size)
            options = search_options(args, cache, price, progress=lambda: (bar.n, bar.total))
            usage = send_requests(searches.requests(), transport, options, "retrieval")
        evidence.update(searches.found)
        refused.update(searches.refused)
        failed = searches.failed
    if cache is not None:
        cache.close()
    summary = (f"searched now: {len(evidence) - resumed}, from progress: {resumed}, refused: {len(refused)}, "
               f"failed: {len(failed)}, {usage.describe() if usage else 'requests: 0'}")
    if usage is not None:
        usage.write(args.usage_path)
        if usage.stopped:
            logger.info("stopped (%s): %s; outputs not written: rerun to continue", usage.stopped, summary)
            usage.finish(paths["progress"])

    counts = collections.Counter()

    def rows():
        for record in iter_records(args.input_data_path):
            if record["id"] not in wanted:
                yield record, record
                continue
            raw = evidence.get(record["id"])  # None: no result (failed or refused)
            clean = clean_evidence(raw) if raw is not None else None
            counts["with evidence"] += bool(clean)
            counts["cleaned away"] += raw is not None and not clean
            yield with_evidence(record, raw), with_evidence(record, clean or None)

    write_json_lists_atomic([paths["raw"], paths["clean"]], rows())

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
    if refused:
        logger.warning("%d queries were refused by the search server for good (e.g. id %r: %s); they have no "
                       "evidence and are not sent again (rerun with --retry_failed to try them)", len(refused),
                       next(iter(refused)), next(iter(refused.values())))

    logger.info("#in: %d, searched: %d, with evidence: %d, cleaned away: %d, skipped as non-RAG: %d, "
                "skipped as multi-turn: %d, %s", total, len(evidence), counts["with evidence"],
                counts["cleaned away"], total - len(wanted) - multi_turn, multi_turn, summary)
    logger.info("wrote %s and %s", paths["raw"], paths["clean"])
    return 1 if failed_ids else 0


def dry_run(args, paths, wanted, evidence, pending, cache, price):
    """Send nothing; say how many searches the run would send and what they cost."""
    searches = Searches(pending, {}, args, None)
    transport = SerperTransport(args.search_url, None, args.timeout)
    usage = send_requests(searches.requests(), transport, search_options(args, cache, price), "retrieval")
    for line in usage.dry.lines(extra=f"{len(wanted)} records to search, {len(evidence)} in {paths['progress']}"):
        print(line)
    usage.write(args.usage_path)
    if cache is not None:
        cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
