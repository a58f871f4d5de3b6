"""Reading, validating and writing ReAlign records.

A record is ``{"id": ..., "items": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}``.
Ids are identifiers (int or str, any start, gaps allowed), never positions.

Whole-file outputs are written atomically; progress files are append-only JSONL,
flushed per line, and read back by id, tolerating a torn last line.
"""

import json
import logging
import os
import re
import tempfile

logger = logging.getLogger(__name__)


class InputError(Exception):
    """Bad input: the message is one line naming the file, record and field."""


def describe_record(path, index, record_id=None):
    """``"data.json: record 3 (id 'x7')"``: the prefix every validation message uses."""
    where = f"{path}: record {index}"
    if record_id is not None:
        where += f" (id {record_id!r})"
    return where


def read_json_or_jsonl(path):
    """Return the list stored in ``path``: a JSON list, or one JSON value per line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if stripped[0] == "[":
            raise InputError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        if isinstance(data, list):
            return data
        if isinstance(data, dict):  # a JSONL file holding a single record
            return [data]
        raise InputError(f"{path}: expected a JSON list of records or one JSON record per line")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON on line {lineno}: {e.msg}") from None
    return records


def _check_turn(path, index, record_id, items, position, speaker, field_name):
    where = describe_record(path, index, record_id)
    if len(items) <= position:
        raise InputError(f"{where}: field 'items[{position}]' is missing (expected a {speaker} turn)")
    turn = items[position]
    if not isinstance(turn, dict) or turn.get("from") != speaker:
        raise InputError(f"{where}: field 'items[{position}].from' must be {speaker!r}")
    if not isinstance(turn.get("value"), str):
        raise InputError(f"{where}: field 'items[{position}].value' must be a string")
    if field_name and field_name in turn and not isinstance(turn[field_name], str):
        raise InputError(f"{where}: field 'items[{position}].{field_name}' must be a string")


def check_record(record, index, path, require_response, seen):
    """Check one record (see :func:`validate_records`); ``seen`` maps the ids met so far to their index."""
    if not isinstance(record, dict):
        raise InputError(f"{describe_record(path, index)}: expected an object")
    if "id" not in record:
        raise InputError(f"{describe_record(path, index)}: field 'id' is missing")
    record_id = record["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (int, str)):
        raise InputError(f"{describe_record(path, index)}: field 'id' must be an integer or a string")
    if record_id in seen:
        raise InputError(
            f"{describe_record(path, index, record_id)}: field 'id' duplicates record {seen[record_id]}"
        )
    seen[record_id] = index
    items = record.get("items")
    if not isinstance(items, list):
        what = "is missing" if items is None else "must be a list"
        raise InputError(f"{describe_record(path, index, record_id)}: field 'items' {what}")
    _check_turn(path, index, record_id, items, 0, "human", "category")
    if require_response:
        _check_turn(path, index, record_id, items, 1, "gpt", None)


def validate_records(records, path, require_response=False):
    """Raise :class:`InputError` on the first malformed record.

    ``require_response`` adds the check of stages 3-5: a second item that is a gpt
    turn with a string ``value``.
    """
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of records")
    seen = {}
    for index, record in enumerate(records):
        check_record(record, index, path, require_response, seen)
    return records


def load_records(path, require_response=False):
    """Read and validate records from a JSON list or JSONL file."""
    return validate_records(read_json_or_jsonl(path), path, require_response)


def _write_atomic(path, write):
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it over ``path``.

    If ``write`` raises (including an error found while a generator is being written),
    the temporary file is removed and ``path`` keeps its old content.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON (indent 4, UTF-8) so that ``path`` is either old or new, never torn."""

    def write(f):
        json.dump(obj, f, indent=4, ensure_ascii=False)
        f.write("\n")

    _write_atomic(path, write)


def write_json_list_atomic(path, items):
    """Write the JSON list of ``items`` (any iterable, consumed lazily) atomically.

    The text is the same as ``write_json_atomic(path, list(items))`` writes, but the
    list is never held in memory; if iterating ``items`` raises, nothing is written.
    """

    def write(f):
        separator = "[\n    "
        for item in items:
            f.write(separator)
            # json's strings escape newlines, so every newline here is indentation.
            f.write(json.dumps(item, indent=4, ensure_ascii=False).replace("\n", "\n    "))
            separator = ",\n    "
        f.write("[]\n" if separator.startswith("[") else "\n]\n")

    _write_atomic(path, write)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _iter_json_list(f, path, buf, pos, chunk_size):
    """Yield the elements of the JSON list whose ``[`` is at ``buf[pos - 1]``, reading ``f`` on."""
    decoder = json.JSONDecoder()
    lines_before = 0  # newlines in the text already dropped from ``buf``
    eof = False
    expect_value, first = True, True

    def read_more(buf, pos, lines_before):
        # Keep the unread tail; read at least as much again so a big value costs O(size).
        lines_before += buf.count("\n", 0, pos)
        tail = buf[pos:]
        data = f.read(max(chunk_size, len(tail)))
        return tail + data, 0, lines_before, not data

    def error(message, at):
        line = lines_before + buf.count("\n", 0, at) + 1
        return InputError(f"{path}: invalid JSON at line {line}: {message}")

    while True:
        pos = _JSON_SPACE.match(buf, pos).end()
        if pos == len(buf):
            if eof:
                raise error("the list is not closed (a truncated file?)", pos)
            buf, pos, lines_before, eof = read_more(buf, pos, lines_before)
            continue
        if not expect_value:
            if buf[pos] == "]":
                pos += 1
                break
            if buf[pos] != ",":
                raise error("expected ',' or ']' after a list element", pos)
            pos += 1
            expect_value = True
            continue
        if first and buf[pos] == "]":
            pos += 1
            break
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            if not eof:
                buf, pos, lines_before, eof = read_more(buf, pos, lines_before)
                continue
            raise error(e.msg, e.pos) from None
        if end == len(buf) and not eof:  # a number may go on in the next chunk
            buf, pos, lines_before, eof = read_more(buf, pos, lines_before)
            continue
        yield value
        pos, expect_value, first = end, False, False
    while buf:
        rest = buf[pos:].lstrip(" \t\n\r")
        if rest:
            raise error("extra data after the list", len(buf) - len(rest))
        lines_before += buf.count("\n")
        buf, pos = f.read(chunk_size), 0


def iter_json_values(path, chunk_size=1 << 20):
    """Yield the elements of a JSON list file, or the values of a JSONL file, one at a time.

    The streaming counterpart of :func:`read_json_or_jsonl` (same errors), for files
    too big to hold twice in memory: only one element and one chunk are held at once.
    """
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    with f:
        try:
            buf = ""
            while not buf.strip():
                data = f.read(chunk_size)
                if not data:
                    raise InputError(f"{path}: file is empty")
                buf += data
            start = len(buf) - len(buf.lstrip())
            if buf[start] == "[":
                yield from _iter_json_list(f, path, buf, start + 1, chunk_size)
                return
            f.seek(0)
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: invalid JSON on line {lineno}: {e.msg}") from None
                yield value
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read: {e}") from None


def iter_records(path, require_response=False, chunk_size=1 << 20):
    """Yield the records of a JSON list or JSONL file one at a time, each validated.

    Same checks and messages as :func:`load_records` (duplicate ids included), but the
    file is never held in memory whole: for files of a million records.
    """
    seen = {}
    for index, record in enumerate(iter_json_values(path, chunk_size)):
        check_record(record, index, path, require_response, seen)
        yield record


def iter_progress(path):
    """Yield the JSON objects of a JSONL progress file, in file order, streaming.

    A torn last line (a kill mid-write) is skipped with a warning; a missing file is
    empty progress. A bad line elsewhere is skipped with a warning too: losing one
    finished result costs one repeated request, stopping would cost the whole run.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):
                    logger.warning("%s: ignoring a torn last line (an interrupted write)", path)
                else:
                    logger.warning("%s: ignoring unreadable line %d", path, lineno)


def read_progress(path):
    """The entries of a JSONL progress file as a list (see :func:`iter_progress`)."""
    return list(iter_progress(path))


def read_done_ids(path, key="id"):
    """The set of ``key`` values already present in a progress file."""
    return {entry[key] for entry in read_progress(path) if isinstance(entry, dict) and key in entry}


class ProgressWriter:
    """Append-only JSONL writer: one line per finished unit of work, flushed at once.

    On opening, a torn tail left by a killed run is cut off so the next line starts
    cleanly.
    """

    def __init__(self, path, fsync=False):
        self.path = path
        self.fsync = fsync
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(path, "a+b")  # noqa: SIM115 - kept open until close()
        self._drop_torn_tail()

    def _drop_torn_tail(self):
        f = self._file
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Find the last newline and truncate after it.
        pos = size
        chunk = 65536
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            cut = block.rfind(b"\n")
            if cut != -1:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)

    def write(self, obj):
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self):
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def refuse_overwriting_input(input_path, *output_paths):
    """Raise :class:`InputError` when an output path is the input file (the data paid for)."""
    source = os.path.realpath(input_path)
    for output_path in output_paths:
        if os.path.realpath(output_path) == source:
            raise InputError(f"{input_path}: output {output_path} would overwrite the input; "
                             "choose another output path")


def chunk_bounds(n_records, batch_num, batch_id):
    """``[start, end)`` of chunk ``batch_id`` when ``n_records`` are cut into ``batch_num``
    contiguous chunks whose sizes differ by at most one, earlier chunks larger."""
    if batch_num < 1 or not 0 <= batch_id < batch_num:
        raise ValueError(f"batch id {batch_id} is outside 0..{batch_num - 1}")
    k, m = divmod(n_records, batch_num)
    return batch_id * k + min(batch_id, m), (batch_id + 1) * k + min(batch_id + 1, m)
