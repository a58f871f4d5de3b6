"""The helper package: record validation, atomic writes, progress files, exit codes, retries."""

import itertools
import json
import logging
import os

import pytest

from realign import (
    FatalError,
    InputError,
    ProgressWriter,
    chunk_bounds,
    exits_cleanly,
    load_records,
    parse_retry_after,
    read_done_ids,
    read_progress,
    refuse_overwriting_input,
    retry_delay,
    write_json_atomic,
)


def good_record(record_id=0, **human):
    return {
        "id": record_id,
        "items": [{"from": "human", "value": "Q?", **human}, {"from": "gpt", "value": "A."}],
    }


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def test_reads_json_and_jsonl_with_any_ids(tmp_path):
    records = [good_record(7), good_record("x-1"), good_record(1000)]
    assert load_records(write(tmp_path, records)) == records
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")
    assert load_records(str(jsonl), require_response=True) == records


BAD = [
    ([{"items": []}], "record 0: field 'id' is missing"),
    ([good_record(1), good_record(1)], "record 1 (id 1): field 'id' duplicates record 0"),
    ([{"id": 3.5, "items": []}], "record 0: field 'id' must be an integer or a string"),
    ([{"id": "a"}], "record 0 (id 'a'): field 'items' is missing"),
    ([{"id": "a", "items": {"from": "human"}}], "record 0 (id 'a'): field 'items' must be a list"),
    ([good_record(0), {"id": 5, "items": [{"from": "gpt", "value": "x"}]}], "record 1 (id 5): field 'items[0].from' must be 'human'"),
    ([{"id": 5, "items": [{"from": "human", "value": 3}]}], "record 0 (id 5): field 'items[0].value' must be a string"),
    ([good_record(9, category=["open_qa"])], "record 0 (id 9): field 'items[0].category' must be a string"),
    ("not a list", "expected a JSON list of records or one JSON record per line"),
    ([good_record(0), 5], "record 1: expected an object"),
]


@pytest.mark.parametrize("records, message", BAD)
def test_validation_names_file_record_and_field(tmp_path, records, message):
    path = write(tmp_path, records)
    with pytest.raises(InputError) as err:
        load_records(path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "item, message",
    [
        (None, "field 'items[1]' is missing (expected a gpt turn)"),
        ({"from": "human", "value": "x"}, "field 'items[1].from' must be 'gpt'"),
        ({"from": "gpt", "value": None}, "field 'items[1].value' must be a string"),
    ],
)
def test_response_is_required_for_later_stages(tmp_path, item, message):
    record = good_record("r1")
    record["items"] = record["items"][:1] + ([item] if item else [])
    path = write(tmp_path, [record])
    assert load_records(path)  # fine for classification and retrieval
    with pytest.raises(InputError, match=r"record 0 \(id 'r1'\): " + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_records(path, require_response=True)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_records(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,', encoding="utf-8")
    with pytest.raises(InputError, match="invalid JSON"):
        load_records(str(broken))
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"id": 1, "items": []}\n{oops}\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        load_records(str(lines))


def test_bad_input_through_a_script_main_is_one_line_and_exit_2(tmp_path, capsys):
    path = write(tmp_path, [good_record(1), good_record(1)])
    out = tmp_path / "out.json"

    @exits_cleanly
    def main(argv=None):
        records = load_records(path)
        write_json_atomic(str(out), records)
        return 0

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: record 1 (id 1): field 'id' duplicates record 0" in err
    assert not out.exists()


def test_fatal_error_exits_1(capsys):
    @exits_cleanly
    def main(argv=None):
        raise FatalError("the API server refused the credentials (HTTP 401)")

    assert main([]) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "out.json")
    write_json_atomic(path, [{"id": 1, "text": "héllo"}])
    with open(path, encoding="utf-8") as f:
        first = f.read()
    assert "héllo" in first and '    "id": 1' in first  # indent 4, not ASCII-escaped

    with pytest.raises(TypeError):
        write_json_atomic(path, [{"id": 2, "bad": object()}])
    with open(path, encoding="utf-8") as f:
        assert f.read() == first
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind


def test_progress_resume_ignores_a_torn_last_line(tmp_path, caplog):
    path = str(tmp_path / "progress.jsonl")
    with ProgressWriter(path) as writer:
        writer.write({"id": 1, "v": "a"})
        writer.write({"id": "two", "v": "b"})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": 3, "v": "c')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        assert read_done_ids(path) == {1, "two"}
    assert "torn last line" in caplog.text

    # Appending after the crash starts on a clean line: the torn tail is cut off.
    with ProgressWriter(path) as writer:
        writer.write({"id": 3, "v": "c"})
    assert [e["id"] for e in read_progress(path)] == [1, "two", 3]
    assert read_progress(str(tmp_path / "none.jsonl")) == []


def test_progress_tolerates_a_file_that_is_one_torn_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"id": 1', encoding="utf-8")
    with ProgressWriter(str(path)) as writer:
        writer.write({"id": 1})
    assert path.read_text(encoding="utf-8") == '{"id": 1}\n'


def test_retry_delay_honours_retry_after_and_backs_off():
    assert retry_delay(0, "2") == 2.0
    assert retry_delay(5, "0") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert parse_retry_after("soon") is None
    assert 0.5 <= retry_delay(0) <= 1.0
    assert 4.0 <= retry_delay(3) <= 8.0
    assert retry_delay(20) <= 30.0


@pytest.mark.parametrize("n, parts", [(10, 3), (0, 4), (3, 5), (1000, 7), (57, 10)])
def test_chunks_cover_every_record_once_earlier_chunks_larger(n, parts):
    bounds = [chunk_bounds(n, parts, i) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [end - start for start, end in bounds]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


def test_chunk_bounds_literal_cases():
    assert [chunk_bounds(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        chunk_bounds(10, 3, 3)


def test_outputs_may_not_overwrite_the_input(tmp_path):
    source = write(tmp_path, [good_record(1)])
    refuse_overwriting_input(source, str(tmp_path / "out.json"))
    with pytest.raises(InputError, match="would overwrite the input"):
        refuse_overwriting_input(source, str(tmp_path / "out.json"), str(tmp_path / "." / "data.json"))
