"""The helper package: record validation, atomic writes, progress files, exit codes, retries."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from realign import (
    FatalError,
    InputError,
    OutputLock,
    ProgressWriter,
    atomic_files,
    chunk_bounds,
    count_records,
    exits_cleanly,
    iter_records,
    iter_records_range,
    load_records,
    parse_retry_after,
    fingerprint,
    read_progress_lines,
    refuse_overwriting_input,
    retry_delay,
    write_atomic,
    write_json_atomic,
    write_json_list_atomic,
    write_json_lists_atomic,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        assert set(read_progress_lines(path)[0]) == {1, "two"}
    assert "torn last line" in caplog.text

    # Appending after the crash starts on a clean line: the torn tail is cut off.
    with ProgressWriter(path) as writer:
        writer.write({"id": 3, "v": "c"})
    assert list(read_progress_lines(path)[0]) == [1, "two", 3]
    assert read_progress_lines(str(tmp_path / "none.jsonl")) == ({}, 0)


def test_progress_lines_keep_the_last_line_of_an_id_and_count_other_fingerprints(tmp_path):
    path = str(tmp_path / "progress.jsonl")
    with ProgressWriter(path) as writer:
        for entry in ({"id": 1, "fingerprint": "old", "v": 1}, {"id": 1, "fingerprint": "new", "v": 2},
                      {"id": "1", "fingerprint": "new", "v": 3}, {"id": 2, "fingerprint": "other", "v": 4},
                      {"id": True, "fingerprint": "new"}, {"id": 9, "fingerprint": "new", "v": 5}):
            writer.write(entry)
    lines, stale = read_progress_lines(path, {1: "new", "1": "new", 2: "new"})
    assert {i: e["v"] for i, e in lines.items()} == {1: 2, "1": 3} and stale == 1  # 9 is not asked for
    assert fingerprint("a", 1) == fingerprint("a", 1) != fingerprint("a", 2) and len(fingerprint("a")) == 24


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


# The one home of the chunk-bound tests: reformat.py cuts its input with chunk_bounds,
# parallel_data_merge.py names the batch of a missing id with it. Worked out by hand:
# 22 = 3 * 7 + 1, so the first chunk gets one record more.
@pytest.mark.parametrize("n, parts, expected", [
    (22, 3, [(0, 8), (8, 15), (15, 22)]),
    (10, 3, [(0, 4), (4, 7), (7, 10)]),
    (57, 10, [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30), (30, 36), (36, 42), (42, 47), (47, 52), (52, 57)]),
    (6, 3, [(0, 2), (2, 4), (4, 6)]),
    (5, 1, [(0, 5)]),
    (3, 5, [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]),  # fewer records than chunks: the last ones are empty
    (0, 4, [(0, 0), (0, 0), (0, 0), (0, 0)]),  # no records
])
def test_chunk_bounds(n, parts, expected):
    assert [chunk_bounds(n, parts, i) for i in range(parts)] == expected


@pytest.mark.parametrize("parts, batch_id", [(3, 3), (3, -1), (0, 0)])
def test_chunk_bounds_refuses_a_batch_id_outside_the_run(parts, batch_id):
    with pytest.raises(ValueError, match="outside"):
        chunk_bounds(10, parts, batch_id)


def test_outputs_may_not_overwrite_the_input(tmp_path):
    source = write(tmp_path, [good_record(1)])
    refuse_overwriting_input(source, str(tmp_path / "out.json"))
    with pytest.raises(InputError, match="would overwrite the input"):
        refuse_overwriting_input(source, str(tmp_path / "out.json"), str(tmp_path / "." / "data.json"))


# -- atomic writes: permissions, several outputs in one pass -------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o022)``) and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_give_the_permissions_of_a_plain_open(tmp_path, umask, mask, expected):
    umask(mask)
    for name, write in [("a.json", lambda p: write_json_atomic(p, {"x": 1})),
                        ("b.json", lambda p: write_json_list_atomic(p, iter([1, 2]))),
                        ("c.bin", lambda p: write_atomic(p, lambda f: f.write(b"\x00\x01"), binary=True))]:
        path = str(tmp_path / name)
        write(path)
        assert oct(os.stat(path).st_mode & 0o777) == oct(expected), name
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"


def test_rewriting_an_existing_output_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "out.json"
    path.write_text("old", encoding="utf-8")
    os.chmod(path, 0o640)
    write_json_atomic(str(path), [1])
    assert path.read_text(encoding="utf-8") == "[\n    1\n]\n"
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"


def test_two_lists_are_written_in_one_pass(tmp_path):
    raw, clean = str(tmp_path / "raw.json"), str(tmp_path / "clean.json")
    rows = iter([({"id": 1, "e": ["x"]}, {"id": 1}), ({"id": 2}, {"id": 2})])
    write_json_lists_atomic([raw, clean], rows)
    with open(raw, encoding="utf-8") as f:
        assert f.read() == ('[\n    {\n        "id": 1,\n        "e": [\n            "x"\n        ]\n    },\n'
                            '    {\n        "id": 2\n    }\n]\n')
    with open(clean, encoding="utf-8") as f:
        assert f.read() == '[\n    {\n        "id": 1\n    },\n    {\n        "id": 2\n    }\n]\n'
    write_json_lists_atomic([raw, clean], iter([]))
    with open(clean, encoding="utf-8") as f:
        assert f.read() == "[]\n"


@pytest.mark.parametrize("value", [
    {"id": 1, "items": [{"from": "human", "value": "a \"quoted\"\nline, é, \u2028", "category": "open_qa",
                         "evidence": []}, {"from": "gpt", "value": ""}], "tag": "rewrite", "n": -3, "x": 1.5e300,
     "flags": [True, False, None, {}, [[]]]},
    [float("nan"), float("inf"), -0.0, 10**30, "\ud800"],
    {1: "a key json turns into a string", "t": (1, [2])},
    "plain", 7, None,
])
def test_records_are_written_as_json_writes_them_with_indent_4(value):
    # The list writer's own indenting (about twice as fast) writes json.dumps' very text.
    from realign.records import indented_json

    assert indented_json(value) == json.dumps(value, indent=4, ensure_ascii=False)
    assert indented_json(value, "    ") == json.dumps(value, indent=4, ensure_ascii=False).replace("\n", "\n    ")


def test_when_the_stream_fails_neither_output_changes(tmp_path):
    raw, clean = tmp_path / "raw.json", tmp_path / "clean.json"
    raw.write_text("old raw", encoding="utf-8")
    clean.write_text("old clean", encoding="utf-8")

    def rows():
        yield {"id": 1}, {"id": 1}
        raise InputError("data.json: record 1: field 'id' is missing")

    with pytest.raises(InputError, match="record 1"):
        write_json_lists_atomic([str(raw), str(clean)], rows())
    assert raw.read_text(encoding="utf-8") == "old raw"
    assert clean.read_text(encoding="utf-8") == "old clean"
    assert sorted(os.listdir(tmp_path)) == ["clean.json", "raw.json"]  # no temporary file left

    with pytest.raises(ZeroDivisionError):
        with atomic_files([str(raw), str(tmp_path / "new.txt")]) as (f, g):
            f.write("half")
            g.write("done")
            1 / 0  # noqa: B018 - the failure under test
    assert sorted(os.listdir(tmp_path)) == ["clean.json", "raw.json"]
    with atomic_files([str(raw), str(tmp_path / "new.txt")]) as (f, g):
        f.write("new raw")
        g.write("new text")
    assert raw.read_text(encoding="utf-8") == "new raw"
    assert (tmp_path / "new.txt").read_text(encoding="utf-8") == "new text"


# -- one writer per output ---------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from realign import OutputLock
    with OutputLock(sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def start_holder(tmp_path, output, *extra):
    """Start a process that locks ``tmp_path / output`` and holds it until a line on its stdin."""
    (tmp_path / "holder.py").write_text(HOLDER, encoding="utf-8")
    child = subprocess.Popen([sys.executable, "holder.py", ROOT, output, *extra], cwd=tmp_path,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "locked\n"
    return child


def test_a_second_writer_is_refused_naming_the_first_until_it_finishes(tmp_path, capsys, monkeypatch):
    output = str(tmp_path / "batch.jsonl")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    child = start_holder(tmp_path, "batch.jsonl", "--openai_key", "sk-very-secret", "--tokenizer_path", "tok",
                         "--note=sk-from-the-environment", "--api-key=sk-2")
    try:
        @exits_cleanly
        def main(argv=None):
            with OutputLock(output):
                return 0

        assert main([]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        prefix = (f"test_realign: error: {output} is being written by another process "
                  f"(pid {child.pid} on {socket.gethostname()}, since ")
        assert err.startswith(prefix), err
        python = os.path.basename(sys.executable)
        assert err.endswith(f": {python} holder.py {ROOT} batch.jsonl --openai_key *** --tokenizer_path tok "
                            "--note=*** --api-key=***); wait for it to finish or stop it\n"), err
        assert "sk-" not in err
    finally:
        child.stdin.write("done\n")
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    with OutputLock(output) as lock:  # the first writer has finished
        assert lock.held
        with open(lock.lock_path, encoding="utf-8") as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not lock.held
    assert os.path.exists(lock.lock_path)  # never deleted: a new lock file could be locked twice


def test_a_lock_left_by_a_killed_writer_does_not_block(tmp_path):
    output = str(tmp_path / "progress.jsonl")
    child = start_holder(tmp_path, "progress.jsonl")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    lock_file = tmp_path / ".progress.jsonl.lock"
    assert str(child.pid) in lock_file.read_text(encoding="utf-8")  # the dead holder's record is still there
    with OutputLock(output):
        assert str(os.getpid()) in lock_file.read_text(encoding="utf-8")


def test_the_same_output_cannot_be_locked_twice_in_one_process(tmp_path):
    output = str(tmp_path / "out.json")
    with OutputLock(output), pytest.raises(InputError, match=r"out\.json is being written by another process"):
        OutputLock(output).acquire()
    with OutputLock(output):  # released by the with above
        pass


# -- one chunk of a big input, streaming --------------------------------------------------

# Five records; strings with escaped quotes, brackets and braces, and one value spanning
# the small read chunks of the tests.
CHUNK_RECORDS = [
    {"id": 10, "items": [{"from": "human", "value": 'say "]" then {"x": [1]}'}, {"from": "gpt", "value": "ok"}]},
    {"id": "b", "items": [{"from": "human", "value": "a \\\" b ]}, ["}, {"from": "gpt", "value": "ok"}]},
    {"id": 30, "items": [{"from": "human", "value": "three"}, {"from": "gpt", "value": "x" * 40}]},
    {"id": 40, "items": [{"from": "human", "value": "four"}, {"from": "gpt", "value": "ok"}]},
    {"id": "e", "items": [{"from": "human", "value": "five"}, {"from": "gpt", "value": "ok"}]},
]


@pytest.fixture(params=["json", "jsonl"])
def chunk_file(request, tmp_path):
    if request.param == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(CHUNK_RECORDS, indent=4), encoding="utf-8")
    else:
        path = tmp_path / "data.jsonl"
        lines = [json.dumps(r) for r in CHUNK_RECORDS]
        path.write_text("\n".join(lines[:2] + ["", "  "] + lines[2:]) + "\n\n", encoding="utf-8")  # blank lines
    return str(path)


@pytest.mark.parametrize("chunk_size", [7, 1 << 20])
@pytest.mark.parametrize("start, end, ids", [
    (0, 2, [10, "b"]), (2, 4, [30, 40]), (3, 5, [40, "e"]), (0, 5, [10, "b", 30, 40, "e"]),
    (2, 2, []), (5, 5, []), (4, 9, ["e"]), (7, 9, []),
])
def test_a_range_of_records(chunk_file, chunk_size, start, end, ids):
    assert count_records(chunk_file, chunk_size=chunk_size) == 5
    records = list(iter_records_range(chunk_file, start, end, require_response=True, chunk_size=chunk_size))
    assert [r["id"] for r in records] == ids
    assert records == [r for r in CHUNK_RECORDS if r["id"] in ids]


def test_an_empty_range_reads_nothing_and_a_bad_range_is_refused(tmp_path):
    missing = str(tmp_path / "missing.json")
    assert list(iter_records_range(missing, 0, 0)) == []
    with pytest.raises(InputError, match="file not found"):
        list(iter_records_range(missing, 0, 1))
    with pytest.raises(ValueError):
        iter_records_range(missing, 3, 2)
    with pytest.raises(ValueError):
        iter_records_range(missing, -1, 2)


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_errors_in_a_range_name_the_record_index_in_the_file(tmp_path, suffix):
    records = [dict(r) for r in CHUNK_RECORDS]
    records[3] = {"items": records[3]["items"]}  # no id
    records[2] = {"id": 30, "items": records[2]["items"][:1]}  # no response
    records[1] = {"id": 10, "items": records[1]["items"]}  # the id of record 0
    path = tmp_path / f"data.{suffix}"
    text = json.dumps(records) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    path = str(path)
    with pytest.raises(InputError) as err:
        list(iter_records_range(path, 3, 5))
    assert str(err.value) == f"{path}: record 3: field 'id' is missing"
    with pytest.raises(InputError) as err:
        list(iter_records_range(path, 2, 3, require_response=True))
    assert str(err.value) == f"{path}: record 2 (id 30): field 'items[1]' is missing (expected a gpt turn)"
    with pytest.raises(InputError) as err:
        list(iter_records_range(path, 0, 2))
    assert str(err.value) == f"{path}: record 1 (id 10): field 'id' duplicates record 0"
    # Duplicates across ranges are the merge's to find; records before the range are not checked.
    assert [r["id"] for r in iter_records_range(path, 1, 2)] == [10]
    assert [r["id"] for r in iter_records_range(path, 4, 5)] == ["e"]


def test_a_broken_jsonl_line_is_found_by_the_range_that_holds_it_only(tmp_path):
    path = tmp_path / "data.jsonl"
    good = [json.dumps(r) for r in CHUNK_RECORDS]
    path.write_text("\n".join([good[0], "{oops}", good[2], good[3], "{torn"]) + "\n", encoding="utf-8")
    path = str(path)
    assert count_records(path) == 5  # lines are counted, not parsed
    assert [r["id"] for r in iter_records_range(path, 2, 4)] == [30, 40]  # neither line 2 nor 5 is read
    with pytest.raises(InputError) as err:
        list(iter_records_range(path, 0, 2))
    assert str(err.value) == f"{path}: invalid JSON on line 2: Expecting property name enclosed in double quotes"


def test_a_broken_json_list_fails_the_count_but_not_a_range_before_the_break(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(CHUNK_RECORDS[:2], indent=4)[:-2] + ',\n    {"id": 3,\n', encoding="utf-8")
    path = str(path)
    with pytest.raises(InputError) as err:
        count_records(path, chunk_size=16)
    assert str(err.value).startswith(f"{path}: invalid JSON at line ")
    assert [r["id"] for r in iter_records_range(path, 0, 2, chunk_size=16)] == [10, "b"]  # stops at its end
    with pytest.raises(InputError, match="invalid JSON at line"):
        list(iter_records_range(path, 2, 3))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="file is empty"):
        count_records(str(empty))


def test_a_second_signal_after_the_pool_ended_does_not_call_into_its_closed_loop(monkeypatch):
    import asyncio

    from realign import pool

    monkeypatch.setattr(pool, "DUPLICATE_SIGNAL_WINDOW", 0.0)  # two signals in a row: "stop at once"
    stopper = pool.Stopper()
    handled = []

    async def handle(job):
        handled.append(job)

    with stopper.signals_handled():
        asyncio.run(pool.run_pool(range(3), handle, 2, stopper))
        # e.g. Ctrl-C twice while the script writes its outputs, after its event loop closed
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert handled == [0, 1, 2]
    assert stopper.reason == "signal" and stopper.signals == 2


def test_a_utf8_byte_order_mark_is_read_not_refused(tmp_path):
    record = {"id": 1, "items": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    as_list, as_lines = tmp_path / "list.json", tmp_path / "lines.jsonl"
    as_list.write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    as_lines.write_bytes(b"\xef\xbb\xbf" + (json.dumps(record) + "\n" + json.dumps({**record, "id": 2})).encode())
    assert [r["id"] for r in iter_records(str(as_list))] == [1] and count_records(str(as_list)) == 1
    assert [r["id"] for r in iter_records(str(as_lines))] == [1, 2] and count_records(str(as_lines)) == 2
    assert [r["id"] for r in load_records(str(as_lines))] == [1, 2]
