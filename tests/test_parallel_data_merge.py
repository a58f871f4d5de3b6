"""parallel_data_merge.py: merge by id, only batch files of one run, missing ids named by batch."""

import json
import logging
import os
from pathlib import Path

import pytest

import parallel_data_merge as merge
from realign import InputError, chunk_bounds, iter_records

def record(record_id, response, category="open_qa", **extra):
    return {"id": record_id, "items": [
        {"from": "human", "value": f"question {record_id}", "category": category, **extra},
        {"from": "gpt", "value": response}]}


def rewritten(rec, text):
    """A batch line as reformat.py writes it for a rewritten record."""
    line = json.loads(json.dumps(rec))
    chosen = {"reason": "the format fits", "revised_response": text}
    line["items"][1]["revised_response_list"] = [{"reason": "shorter", "revised_response": "x"}, chosen]
    line["items"][1]["revised_response"] = chosen
    return line


def passed_through(rec, reason="no format for this task"):
    line = json.loads(json.dumps(rec))
    line["items"][1]["revised_response_list"] = []
    line["items"][1]["revised_response"] = {"reason": reason, "revised_response": rec["items"][1]["value"]}
    return line


def failed(rec):
    line = passed_through(rec, "not rewritten: no 'Revised response:' in 3 replies")
    line["status"] = "failed"
    line["error"] = "no 'Revised response:' in 3 replies"
    return line


RECORDS = [record(7, "seven"), record("a-1", "alpha"), record(12, "twelve"), record(40, "forty"),
           record("z", "zed", category="roleplay"), record(41, "forty-one")]


def write_input(tmp_path, records=RECORDS, name="input.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    return str(path)


def write_batches(directory, lines, batch_num, skip=()):
    """Cut ``lines`` as reformat.py does and write one file per batch id not in ``skip``."""
    directory.mkdir(exist_ok=True)
    for batch_id in range(batch_num):
        if batch_id in skip:
            continue
        start, end = chunk_bounds(len(lines), batch_num, batch_id)
        with open(directory / f"rewrite_data_{batch_id}_of_{batch_num}_batch.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines[start:end])
    return str(directory)


def default_lines():
    return [rewritten(r, r["items"][1]["value"].upper()) if r["items"][0]["category"] != "roleplay"
            else passed_through(r) for r in RECORDS]


def run(tmp_path, *extra, input_path=None, directory=None):
    out = tmp_path / "merged.json"
    argv = ["--input_data_path", input_path or write_input(tmp_path),
            "--output_directory", directory or str(tmp_path / "rw"),
            "--final_output_path", str(out), *extra]
    return merge.main(argv), out


def values(path):
    return [(r["id"], r["items"][1]["value"]) for r in json.loads(path.read_text(encoding="utf-8"))]


def test_merges_by_id_with_string_ids_gaps_and_input_order(tmp_path):
    lines = default_lines()
    # Batch lines in another order than the input: matching is by id, output order is the input's.
    lines[0], lines[1] = lines[1], lines[0]
    write_batches(tmp_path / "rw", lines, batch_num=3)
    code, out = run(tmp_path)
    assert code == 0
    assert values(out) == [(7, "SEVEN"), ("a-1", "ALPHA"), (12, "TWELVE"), (40, "FORTY"), ("z", "zed"),
                           (41, "FORTY-ONE")]
    merged = json.loads(out.read_text(encoding="utf-8"))
    # Only items[1].value changes: no revised_response keys, the human turn kept as it was.
    assert merged[0] == {**RECORDS[0], "items": [RECORDS[0]["items"][0], {"from": "gpt", "value": "SEVEN"}]}
    # Same text as write_json_atomic would write (indent 4, trailing newline).
    assert out.read_text(encoding="utf-8") == json.dumps(merged, indent=4, ensure_ascii=False) + "\n"


def test_passed_through_and_failed_records_keep_the_original(tmp_path):
    lines = default_lines()
    lines[2] = failed(RECORDS[2])
    lines[3] = passed_through(RECORDS[3])
    lines[3]["items"][1]["revised_response"]["revised_response"] = "must not be used"
    write_batches(tmp_path / "rw", lines, batch_num=2)
    code, out = run(tmp_path)
    assert code == 0
    assert dict(values(out))[12] == "twelve"
    assert dict(values(out))[40] == "forty"
    assert dict(values(out))[7] == "SEVEN"


def test_the_stamp_of_a_rewrite_that_passed_the_checks_goes_to_the_filter(tmp_path):
    lines = default_lines()
    lines[0]["checks_passed"] = "0123abcd"  # reformat.py's passed_stamp of the chosen rewrite
    write_batches(tmp_path / "rw", lines, batch_num=1)
    code, out = run(tmp_path)
    assert code == 0
    merged = {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))}
    assert merged[7]["reformat"] == {"checks_passed": "0123abcd"}
    assert "reformat" not in merged["a-1"]  # no stamp, no note


def test_stray_files_are_ignored(tmp_path):
    directory = write_batches(tmp_path / "rw", default_lines(), batch_num=2)
    (tmp_path / "rw" / "notes.txt").write_text("not json at all")
    (tmp_path / "rw" / "rewrite_data_0_of_2_batch.jsonl.tmp").write_text("{broken")
    (tmp_path / "rw" / "merged_old.json").write_text("[]")
    code, out = run(tmp_path, directory=directory)
    assert code == 0
    assert len(values(out)) == len(RECORDS)


def test_missing_batch_names_its_id_and_writes_nothing(tmp_path, capsys):
    write_batches(tmp_path / "rw", default_lines(), batch_num=3, skip={1})
    out = tmp_path / "merged.json"
    out.write_text("old content")
    code, _ = run(tmp_path)
    assert code == 1
    err = capsys.readouterr().err
    # Batch 1 of 3 over 6 records holds positions 2 and 3: ids 12 and 40.
    assert "missing 2 ids" in err
    assert "rerun batch ids: 1 " in err
    assert "12, 40" in err
    assert out.read_text() == "old content"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_allow_partial_keeps_originals_of_missing_ids(tmp_path, caplog):
    write_batches(tmp_path / "rw", default_lines(), batch_num=3, skip={1})
    with caplog.at_level(logging.WARNING):
        code, out = run(tmp_path, "--allow_partial")
    assert code == 0
    assert values(out)[1:4] == [("a-1", "ALPHA"), (12, "twelve"), (40, "forty")]
    assert "rerun batch ids: 1" in caplog.text


def test_torn_last_line_counts_as_missing_and_names_its_batch(tmp_path, capsys):
    directory = write_batches(tmp_path / "rw", default_lines(), batch_num=2)
    path = tmp_path / "rw" / "rewrite_data_1_of_2_batch.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 20])  # a kill mid-write tears the last line (id 41)
    code, _ = run(tmp_path, directory=directory)
    assert code == 1
    err = capsys.readouterr().err
    assert "missing 1 ids (first: 41); rerun batch ids: 1 " in err


def test_duplicate_ids_keep_the_last_line_and_warn(tmp_path, caplog):
    lines = default_lines()
    lines.insert(1, failed(RECORDS[0]))  # a failed first try of id 7, then the retried line
    lines[0], lines[1] = lines[1], lines[0]
    lines.append(rewritten(RECORDS[2], "twelve, second try"))
    write_batches(tmp_path / "rw", lines, batch_num=1)
    with caplog.at_level(logging.WARNING):
        code, out = run(tmp_path)
    assert code == 0
    assert dict(values(out))[7] == "SEVEN"
    assert dict(values(out))[12] == "twelve, second try"
    assert "2 id(s) appear more than once" in caplog.text


def test_ids_not_in_the_input_are_ignored_with_a_warning(tmp_path, caplog):
    lines = default_lines() + [rewritten(record(999, "stale"), "STALE")]
    write_batches(tmp_path / "rw", lines, batch_num=2)
    with caplog.at_level(logging.WARNING):
        code, out = run(tmp_path)
    assert code == 0
    assert 999 not in dict(values(out))
    assert "1 id(s) in the batch files are not in" in caplog.text and "(ids 999)" in caplog.text


def test_batch_files_of_two_runs_are_an_error_naming_both(tmp_path, capsys):
    write_batches(tmp_path / "rw", default_lines(), batch_num=2)
    write_batches(tmp_path / "rw", default_lines(), batch_num=3)
    code, out = run(tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert "rewrite_data_0_of_2_batch.jsonl (N=2)" in err and "rewrite_data_0_of_3_batch.jsonl (N=3)" in err
    assert not out.exists()


def test_no_batch_files_is_an_error(tmp_path, capsys):
    (tmp_path / "rw").mkdir()
    code, out = run(tmp_path)
    assert code == 2
    assert "no rewrite_data_{i}_of_{N}_batch.jsonl files" in capsys.readouterr().err
    assert not out.exists()


def test_bad_input_record_names_file_id_and_field(tmp_path, capsys):
    records = [record(1, "one"), {"id": "b2", "items": [{"from": "human", "value": "q"}]}]
    write_batches(tmp_path / "rw", [rewritten(records[0], "ONE")], batch_num=1)
    input_path = write_input(tmp_path, records)
    out = tmp_path / "merged.json"
    out.write_text("old content")
    code, _ = run(tmp_path, input_path=input_path)
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].endswith("input.json: record 1 (id 'b2'): field 'items[1]' is missing (expected a gpt turn)")
    assert out.read_text() == "old content"


def test_batch_line_without_the_chosen_rewrite_is_an_error(tmp_path, capsys):
    lines = default_lines()
    del lines[4]["items"][1]["revised_response"]
    lines[4]["items"][1]["revised_response_list"] = [{"reason": "r", "revised_response": "t"}]
    write_batches(tmp_path / "rw", lines, batch_num=1)
    code, out = run(tmp_path)
    assert code == 2
    assert ("rewrite_data_0_of_1_batch.jsonl: line entry 5 (id 'z'): field "
            "'items[1].revised_response.revised_response' must be a string") in capsys.readouterr().err
    assert not out.exists()


def test_jsonl_input_is_read_too(tmp_path):
    write_batches(tmp_path / "rw", default_lines(), batch_num=2)
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    code, out = run(tmp_path, input_path=str(path))
    assert code == 0
    assert values(out)[0] == (7, "SEVEN")


# Batches as reformat.py cuts them (the chunk bounds themselves are tested in test_realign.py):
# 22 records in 3 batches are positions 0-7, 8-14 and 15-21; 3 records in 5 batches fill
# batches 0-2 with one record each and leave 3 and 4 empty.
@pytest.mark.parametrize("positions, n_records, batch_num, batch_ids", [
    ([7], 22, 3, [0]),
    ([8], 22, 3, [1]),
    ([14, 15], 22, 3, [1, 2]),
    ([21, 0, 8, 9], 22, 3, [0, 1, 2]),  # sorted, each batch once
    ([2], 3, 5, [2]),  # not the empty batches 3 and 4 that start at the same position
    ([0, 1, 2], 3, 5, [0, 1, 2]),
    ([4], 5, 1, [0]),
])
def test_batch_ids_of_positions(positions, n_records, batch_num, batch_ids):
    assert merge.batch_ids_of_positions(positions, n_records, batch_num) == batch_ids


def test_iter_records_streams_a_list_across_chunk_boundaries(tmp_path):
    records = [record(i, "é\n\"x" * (i % 7)) for i in range(50)] + [record("s", "")]
    path = write_input(tmp_path, records)
    for chunk_size in (1, 5, 64, 1 << 20):
        assert list(iter_records(path, require_response=True, chunk_size=chunk_size)) == records
    broken = tmp_path / "broken.json"
    broken.write_text('[\n' + json.dumps(records[0]) + ',\n{"id": 2,, }\n]')
    with pytest.raises(InputError, match=r"broken.json: invalid JSON at line 3"):
        list(iter_records(str(broken), chunk_size=4))
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps(records)[:-30])
    with pytest.raises(InputError, match="truncated.json: invalid JSON"):
        list(iter_records(str(truncated)))


def test_output_may_not_overwrite_the_input(tmp_path, capsys):
    source = write_input(tmp_path)
    before = Path(source).read_text(encoding="utf-8")
    argv = ["--input_data_path", source, "--output_directory", write_batches(tmp_path / "rw", default_lines(), 2),
            "--final_output_path", source]
    assert merge.main(argv) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert Path(source).read_text(encoding="utf-8") == before
