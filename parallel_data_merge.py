"""Stage 4 of ReAlign: merge the reformat batch files back into one dataset, by id.

Usage:
    python parallel_data_merge.py --input_data_path outputs/realign_examples_retrieval_clean_evidence.json \
        --output_directory outputs/rewrite --final_output_path outputs/realign_examples_merged.json

Reads the stage-3 input (JSON list or JSONL) and the files
``rewrite_data_{i}_of_{N}_batch.jsonl`` that reformat.py wrote in --output_directory
(every other file there is ignored). Writes --final_output_path, a JSON list: every
input record, in input order, with ``items[1].value`` replaced by the chosen rewrite
(``items[1].revised_response.revised_response`` of the batch line with the same id);
everything else in the record is kept. Passed-through and failed records keep their
original response.

Ids missing from the batch files stop the merge with exit status 1 and name the batch
ids to rerun (reformat.py continues a batch where it stopped); --allow_partial merges
anyway, keeping the original response of the missing records.

Exit status: 0 merged; 1 ids missing, nothing written; 2 bad input (a malformed record or
batch line, batch files of two runs), nothing written. No environment variables.
"""

import argparse
import bisect
import logging
import sys
from collections import Counter

from realign import (
    FatalError,
    find_batch_files,
    InputError,
    chunk_bounds,
    exits_cleanly,
    iter_progress,
    iter_records,
    refuse_overwriting_input,
    setup_logging,
    write_json_list_atomic,
)
from realign.cli import ArgumentParser

logger = logging.getLogger("parallel_data_merge")

SHOWN_IDS = 5  # how many example ids a message lists


def batch_ids_of_positions(positions, n_records, batch_num):
    """The sorted batch ids whose chunks (reformat.py's cut) hold the given input positions."""
    starts = [chunk_bounds(n_records, batch_num, i)[0] for i in range(batch_num)]
    # A chunk can be empty when N exceeds the record count; bisect_right picks the last
    # chunk starting at or before the position, which is the non-empty one.
    return sorted({bisect.bisect_right(starts, p) - 1 for p in positions})


def reformat_note(entry):
    """What the merged record keeps of a line whose record kept its original because its
    request failed or no candidate passed the checks: ``{"status", "reason",
    "candidate_checks"}`` (the filter names it, the report shows it); of a rewrite that
    passed the checks: ``{"checks_passed"}`` (the filter need not check it again); None
    otherwise."""
    if entry.get("status") not in ("failed", "rejected"):
        stamp = entry.get("checks_passed")
        return {"checks_passed": stamp} if isinstance(stamp, str) else None
    items = entry.get("items")
    chosen = items[1].get("revised_response") if isinstance(items, list) and len(items) > 1 and \
        isinstance(items[1], dict) else None
    note = {"status": entry["status"], "reason": chosen.get("reason") if isinstance(chosen, dict) else None}
    if isinstance(entry.get("candidate_checks"), dict):
        note["candidate_checks"] = entry["candidate_checks"]
    return note


def chosen_rewrite(entry, where):
    """``(id, text)`` of one batch line; ``text`` is None when the record keeps its original
    response (``status: failed``, or passed through: an empty ``revised_response_list``)."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object")
    record_id = entry.get("id")
    if isinstance(record_id, bool) or not isinstance(record_id, (int, str)):
        raise InputError(f"{where}: field 'id' is missing or not an integer or a string")
    where = f"{where} (id {record_id!r})"
    if entry.get("status") == "failed":
        return record_id, None
    items = entry.get("items")
    turn = items[1] if isinstance(items, list) and len(items) > 1 else None
    if not isinstance(turn, dict):
        raise InputError(f"{where}: field 'items[1]' is missing")
    if turn.get("revised_response_list") == []:
        return record_id, None
    chosen = turn.get("revised_response")
    text = chosen.get("revised_response") if isinstance(chosen, dict) else None
    if not isinstance(text, str):
        raise InputError(f"{where}: field 'items[1].revised_response.revised_response' must be a string")
    return record_id, text


def read_rewrites(batch_paths, stats):
    """``{id: (text or None, note or None)}`` from the batch files, streamed (see
    :func:`reformat_note`); a repeated id keeps its last line."""
    rewrites, failed, repeated = {}, set(), []
    for path in batch_paths:
        for number, entry in enumerate(iter_progress(path), 1):
            record_id, text = chosen_rewrite(entry, f"{path}: line entry {number}")
            if record_id in rewrites:
                repeated.append(record_id)
            rewrites[record_id] = (text, reformat_note(entry))
            if entry.get("status") == "failed":
                failed.add(record_id)
            else:
                failed.discard(record_id)
    if repeated:
        shown = ", ".join(repr(i) for i in repeated[:SHOWN_IDS])
        logger.warning(
            "%d id(s) appear more than once in the batch files (an interrupted run?); "
            "keeping the last line of each (ids %s)", len(repeated), shown,
        )
    stats["failed"] = len(failed)
    stats["repeated"] = len(repeated)
    return rewrites


def merge_records(records, rewrites, stats, missing):
    """Yield each input record with its rewrite in ``items[1].value``; record the positions
    of ids without a batch line in ``missing``. Matched ids are removed from ``rewrites``."""
    for position, record in enumerate(records):
        stats["in"] += 1
        record_id = record["id"]
        if record_id not in rewrites:
            missing.append((position, record_id))
            yield record
            continue
        text, note = rewrites.pop(record_id)
        turn = record["items"][1]
        if text is not None and text != turn["value"]:
            turn["value"] = text
            stats["rewritten"] += 1
        if note is not None:  # why the record kept its original, or that its rewrite passed the checks
            record["reformat"] = note
        yield record


def missing_message(missing, n_records, batch_num):
    ids = ", ".join(repr(record_id) for _, record_id in missing[:SHOWN_IDS])
    batch_ids = batch_ids_of_positions([p for p, _ in missing], n_records, batch_num)
    return (
        f"missing {len(missing)} ids (first: {ids}); rerun batch ids: {', '.join(map(str, batch_ids))} "
        f"(reformat.py --dataset_batch_num {batch_num} --dataset_batch_id <id>)"
    )


def parse_args(argv=None):
    parser = ArgumentParser(description="Merge reformat.py's batch files into one dataset, by id.")
    parser.add_argument("--input_data_path", required=True,
                        help="the stage-3 input that reformat.py read (JSON list or JSONL)")
    parser.add_argument("--output_directory", required=True,
                        help="folder holding rewrite_data_{i}_of_{N}_batch.jsonl; other files there are ignored")
    parser.add_argument("--final_output_path", required=True, help="merged JSON list to write (atomically)")
    parser.add_argument("--allow_partial", action=argparse.BooleanOptionalAction, default=False,
                        help="merge even when ids are missing from the batch files, keeping their original "
                             "response (default: stop with exit status 1 and name the batches to rerun)")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False, help="log debug messages (default: off)")
    return parser.parse_args(argv)


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    refuse_overwriting_input(args.input_data_path, args.final_output_path)
    batch_num, batches = find_batch_files(args.output_directory)
    absent = [i for i in range(batch_num) if i not in batches]
    if absent:
        logger.warning("no file for batch id(s) %s of %d", ", ".join(map(str, absent)), batch_num)
    stats = Counter()
    rewrites = read_rewrites([batches[i] for i in sorted(batches)], stats)
    logger.info("read %d rewrites from %d batch file(s) of %d", len(rewrites), len(batches), batch_num)
    missing = []

    def merged():
        yield from merge_records(iter_records(args.input_data_path, require_response=True), rewrites, stats, missing)
        # Still inside the atomic write: raising here leaves no output behind.
        if missing:
            message = missing_message(missing, stats["in"], batch_num)
            if not args.allow_partial:
                raise FatalError(f"{message}; or pass --allow_partial to keep their original responses")
            logger.warning("%s; --allow_partial: keeping their original responses", message)

    write_json_list_atomic(args.final_output_path, merged())
    if rewrites:
        shown = ", ".join(repr(i) for i in list(rewrites)[:SHOWN_IDS])
        logger.warning("%d id(s) in the batch files are not in %s; ignored (ids %s)",
                       len(rewrites), args.input_data_path, shown)
    logger.info(
        "#in: %d, #out: %d, #with a rewrite: %d, #with the original: %d (request failed: %d, missing: %d) -> %s",
        stats["in"], stats["in"], stats["rewritten"], stats["in"] - stats["rewritten"],
        stats["failed"], len(missing), args.final_output_path,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
