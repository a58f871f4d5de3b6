"""Reading, validating and writing ReAlign records.

A record is ``{"id": ..., "items": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}``.
Ids are identifiers (int or str, any start, gaps allowed), never positions.

Whole-file outputs are written atomically, with the permissions a plain ``open()`` would
give; progress files are append-only JSONL, flushed per line, and read back by id,
tolerating a torn last line. One process's chunk of a big input is read in one streaming
pass (:func:`count_records`, :func:`iter_records_range`); :class:`OutputLock` keeps a
second process off an output another one is writing.
"""

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import socket
import stat
import sys
import time
from json.encoder import encode_basestring

logger = logging.getLogger(__name__)


# The batch files of reformat.py, one per process: the one rule for their names.
BATCH_FILE = "rewrite_data_{batch_id}_of_{batch_num}_batch.jsonl"
BATCH_FILE_RE = re.compile(r"rewrite_data_(0|[1-9]\d*)_of_([1-9]\d*)_batch\.jsonl")
UNUSED_REPLIES_FILE = "rewrite_data_{batch_id}_of_{batch_num}_unused_replies.jsonl"  # beside its batch file
SHOWN_NAMES = 5  # how many other file names a log line lists


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
        with open(path, encoding="utf-8-sig") as f:
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


def _open_temporary(path, binary):
    """Create a new file under a random name next to ``path``; return ``(tmp_path, file)``.

    It gets the permissions a plain ``open(path, "w")`` would give: 0o666 less the umask
    (applied by the kernel, with the folder's default ACL if it has one) for a new file,
    the current mode bits when ``path`` already exists (open() rewriting a file keeps them).
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    while True:
        tmp = os.path.join(directory, f".{name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        return tmp, os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_files(paths, binary=False):
    """``with atomic_files([a, b]) as (fa, fb):`` write several outputs in one pass, atomically.

    Each file is a temporary file next to its target (UTF-8 text, or bytes when
    ``binary``). When the block ends normally, every file is flushed and fsync-ed, then each
    is renamed over its target, in order; if the block raises, the temporary files are
    removed and no target changes. The commit is one rename per file: a crash between
    two renames (a window of microseconds) leaves the first target new and the second old.
    """
    paths = list(paths)
    if len({os.path.realpath(path) for path in paths}) != len(paths):
        raise ValueError(f"the same output path given twice: {paths}")
    opened = []  # (path, tmp, file), in the order of paths
    renamed = 0
    try:
        for path in paths:
            opened.append((path, *_open_temporary(path, binary)))
        yield [f for _, _, f in opened]
        for _, _, f in opened:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for path, tmp, _ in opened:
            os.replace(tmp, path)
            renamed += 1
    except BaseException:
        for _, tmp, f in opened[renamed:]:
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def write_atomic(path, write, binary=False):
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it over ``path``.

    ``f`` is a UTF-8 text file, or a binary one when ``binary``. If ``write`` raises
    (including an error found while a generator is being written), the temporary file is
    removed and ``path`` keeps its old content. The new file has the permissions a plain
    ``open()`` would give it (see :func:`atomic_files`).
    """
    with atomic_files([path], binary) as (f,):
        write(f)


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON (indent 4, UTF-8) so that ``path`` is either old or new, never torn."""

    def write(f):
        json.dump(obj, f, indent=4, ensure_ascii=False)
        f.write("\n")

    write_atomic(path, write)


def indented_json(value, pad=""):
    """``json.dumps(value, indent=4, ensure_ascii=False)`` with every line after the first
    indented by ``pad``, the same text, about twice as fast for records: json's indenting
    encoder is written in Python and makes a call per value; here strings and numbers go to
    json's C escaping, and only containers recurse. Dicts with keys other than strings, and
    values json converts (subclasses, tuples inside others), are left to json."""
    if type(value) is str:
        return encode_basestring(value)
    if type(value) is dict and all(type(key) is str for key in value):
        if not value:
            return "{}"
        inner = pad + "    "
        members = [f"{inner}{encode_basestring(key)}: {indented_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(members) + f"\n{pad}}}"
    if type(value) is list:
        if not value:
            return "[]"
        inner = pad + "    "
        return "[\n" + ",\n".join([inner + indented_json(item, inner) for item in value]) + f"\n{pad}]"
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        return int.__repr__(value)
    # json's strings escape newlines, so every newline here is indentation.
    return json.dumps(value, indent=4, ensure_ascii=False).replace("\n", "\n" + pad)


class _JsonListWriter:
    """Writes a JSON list one element at a time, in the layout of ``json.dump(indent=4)``."""

    def __init__(self, f):
        self.f = f
        self.separator = "[\n    "

    def write(self, item):
        self.f.write(self.separator)
        self.f.write(indented_json(item, "    "))
        self.separator = ",\n    "

    def close(self):
        self.f.write("[]\n" if self.separator.startswith("[") else "\n]\n")


def write_json_lists_atomic(paths, rows):
    """Write several JSON lists in one pass over ``rows``: each row is a tuple holding one
    element per path, in the order of ``paths``. E.g. retrieval's raw and cleaned outputs::

        write_json_lists_atomic([raw_path, clean_path], ((raw(r), clean(r)) for r in records))

    The lists are never held in memory. If iterating ``rows`` raises, no target changes
    (see :func:`atomic_files`).
    """
    paths = list(paths)
    with atomic_files(paths) as files:
        writers = [_JsonListWriter(f) for f in files]
        for row in rows:
            if len(row) != len(writers):
                raise ValueError(f"a row of {len(row)} elements for {len(writers)} output files")
            for writer, item in zip(writers, row):
                writer.write(item)
        for writer in writers:
            writer.close()


def write_json_list_atomic(path, items):
    """Write the JSON list of ``items`` (any iterable, consumed lazily) atomically.

    The text is the same as ``write_json_atomic(path, list(items))`` writes, but the
    list is never held in memory; if iterating ``items`` raises, nothing is written.
    """
    write_json_lists_atomic([path], ((item,) for item in items))


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


def _iter_items(path, chunk_size=1 << 20, start=0, end=None, parse_lines=True):
    """Yield the values at positions ``[start, end)`` of a JSON list or JSONL file, streaming.

    A JSON list's elements are all decoded (its element boundaries are only known that
    way), but only the wanted ones are kept; a JSONL file's skipped lines are not parsed,
    and with ``parse_lines=False`` no line is (the raw lines are yielded). Positions count
    values: a JSONL file's blank lines are not values. Reading stops at ``end``.
    """
    try:
        f = open(path, encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
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
            first = len(buf) - len(buf.lstrip())
            if buf[first] == "[":
                yield from itertools.islice(_iter_json_list(f, path, buf, first + 1, chunk_size), start, end)
                return
            f.seek(0)
            lines = ((lineno, line) for lineno, line in enumerate(f, 1) if not line.isspace())
            for lineno, line in itertools.islice(lines, start, end):
                if not parse_lines:
                    yield line
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: invalid JSON on line {lineno}: {e.msg}") from None
                yield value
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read: {e}") from None


def batched(values, size):
    """Lists of ``size`` consecutive values (the last one shorter), taken lazily."""
    iterator = iter(values)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def iter_json_values(path, chunk_size=1 << 20):
    """Yield the elements of a JSON list file, or the values of a JSONL file, one at a time.

    The streaming counterpart of :func:`read_json_or_jsonl` (same errors), for files
    too big to hold twice in memory: only one element and one chunk are held at once.
    """
    return _iter_items(path, chunk_size)


def count_records(path, chunk_size=1 << 20):
    """The number of values in a JSON list or JSONL file, read in one streaming pass,
    holding one value at a time: the ``n_records`` of :func:`chunk_bounds`.

    A JSON list is parsed whole (so a broken one raises the :func:`iter_json_values`
    error); a JSONL file's non-blank lines are counted without being parsed, so a broken
    line is only reported by whatever reads it (:func:`iter_records_range` for the
    chunk that holds it, the merge for the whole file).
    """
    return sum(1 for _ in _iter_items(path, chunk_size, parse_lines=False))


def iter_records(path, require_response=False, chunk_size=1 << 20):
    """Yield the records of a JSON list or JSONL file one at a time, each validated.

    Same checks and messages as :func:`load_records` (duplicate ids included), but the
    file is never held in memory whole: for files of a million records. The duplicate
    check keeps every id seen (a dict of id -> index): about 100 bytes a record.
    """
    seen = {}
    for index, record in enumerate(iter_json_values(path, chunk_size)):
        check_record(record, index, path, require_response, seen)
        yield record


def iter_records_range(path, start, end, require_response=False, chunk_size=1 << 20):
    """Yield the records at positions ``[start, end)`` of a JSON list or JSONL file (one
    process's chunk, from :func:`chunk_bounds` and :func:`count_records`), streaming.

    Each record is validated like :func:`iter_records`, messages naming its index in the
    whole file; duplicate ids are checked within the range only (the merge checks the
    whole file). The file is read once, up to ``end``, and no further. Records before
    ``start`` are skipped unchecked: a JSONL line is not even parsed (a JSON list's
    elements must be decoded to find where each ends). Like a slice, a file with fewer
    than ``end`` records yields what it has. An empty range reads nothing.
    """
    if not 0 <= start <= end:
        raise ValueError(f"not a range of record positions: [{start}, {end})")

    def records():
        if start == end:
            return
        seen = {}
        for index, record in enumerate(_iter_items(path, chunk_size, start, end), start):
            check_record(record, index, path, require_response, seen)
            yield record

    return records()


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


def fingerprint(*parts):
    """A short hash of what made a progress line (the request, and what reads its reply): a
    line whose fingerprint no longer matches was made with other settings and is redone."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:24]


def read_progress_lines(path, fingerprints=None):
    """``({id: entry}, stale)``: the last line of each id of a progress file (a torn or bad
    line skipped, see :func:`iter_progress`). With ``fingerprints`` (``{id: fingerprint}``)
    only the ids it names whose last line carries that ``fingerprint``; ``stale`` counts the
    ids whose last line carries another (made with other settings)."""
    last = {}
    for entry in iter_progress(path):
        record_id = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(record_id, bool) or not isinstance(record_id, (int, str)):
            continue
        if fingerprints is None or record_id in fingerprints:
            last[record_id] = entry
    if fingerprints is None:
        return last, 0
    current = {i: e for i, e in last.items() if e.get("fingerprint") == fingerprints[i]}
    return current, len(last) - len(current)


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

    @property
    def size(self):
        """Bytes in the file now."""
        return self._file.seek(0, os.SEEK_END)

    def close(self):
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SECRET_FLAG = re.compile(r"(?:^|[-_])(?:key|token|secret|password|passwd)$", re.IGNORECASE)
_SECRET_VARIABLES = ("OPENAI_API_KEY", "SERPER_API_KEY")
_MAX_SHOWN_COMMAND = 200  # characters of the other process's command line in the message


def _redacted_command(argv):
    """``argv`` as a shell line (the interpreter by its base name) with the values of secret
    flags (``--openai_key X``, ``--api-key=X``) and of the API-key variables as ``***``."""
    words, hide_next = [], False
    for position, word in enumerate(argv):
        name, equals, _ = word.partition("=")
        if position == 0:
            words.append(shlex.quote(os.path.basename(word)))
        elif hide_next:
            words.append("***")
            hide_next = False
        elif name.startswith("-") and _SECRET_FLAG.search(name.lstrip("-")):
            words.append(shlex.quote(name) + "=***" if equals else shlex.quote(word))
            hide_next = not equals
        else:
            words.append(shlex.quote(word))
    line = " ".join(words)
    for variable in _SECRET_VARIABLES:
        secret = os.environ.get(variable, "").strip()
        if len(secret) >= 4:
            line = line.replace(secret, "***")
    return line


def _describe_holder(text):
    """`` (pid 4242 on node07, since 12:03:04: python reformat.py ...)`` from a lock file's
    content, or "" when it cannot be read (the holder may be writing it right now)."""
    try:
        holder = json.loads(text)
        pid, host, since, command = holder["pid"], holder["host"], float(holder["since"]), holder["command"]
    except (ValueError, TypeError, KeyError):
        return ""
    started = time.localtime(since)
    shown = time.strftime("%H:%M:%S" if started[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S", started)
    command = " ".join(str(command).splitlines())  # the refusal stays one line
    if len(command) > _MAX_SHOWN_COMMAND:
        command = command[:_MAX_SHOWN_COMMAND] + " ..."
    return f" (pid {pid} on {host}, since {shown}: {command})"


class OutputLock:
    """One writer per output: ``with OutputLock(path):`` holds an exclusive lock on ``path``
    for as long as the block runs, or raises :class:`InputError` at once when another
    process holds it.

    The lock is ``flock(LOCK_EX | LOCK_NB)`` on a companion file ``<dir>/.<name>.lock``,
    created when missing and never deleted (deleting a lock file lets two processes lock
    two different files of one name). The holder writes its pid, host name, start time and
    command line (secrets masked) into it, so the refusal can name it. The kernel drops the
    lock when the holder exits, however it exits (a kill -9 included): a lock file left
    behind never blocks anyone. The descriptor is not inherited by programs the holder
    starts (subprocess), but a ``fork()`` without ``exec`` (multiprocessing's fork start
    method) shares it, and the lock lasts until both processes have closed it.

    Across machines: on Linux NFS, ``flock`` is emulated with POSIX byte-range locks sent
    to the server, so it holds between nodes on NFSv4 (and v3 with a lock manager) when
    the server supports locking; a share mounted ``nolock`` or ``local_lock=flock`` only
    locks within one node. A node that dies holding the lock keeps it until the server's
    lease expires (NFSv4: about 90 s).
    """

    def __init__(self, path):
        self.path = path
        directory, name = os.path.split(os.path.abspath(path))
        self.lock_path = os.path.join(directory, f".{name}.lock")
        self._fd = None
        self._writable = False

    def acquire(self):
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this lock is already held")
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        try:
            fd, writable = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # another user's lock file: it can still be locked, read-only
            try:
                fd, writable = os.open(self.lock_path, os.O_RDONLY), False
            except OSError as e:
                raise InputError(f"{self.path}: cannot open the lock file {self.lock_path}: {e.strerror}") from None
        except OSError as e:
            raise InputError(f"{self.path}: cannot create the lock file {self.lock_path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = _describe_holder(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
            except OSError:
                holder = ""
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise InputError(f"{self.path} is being written by another process{holder}; "
                                 "wait for it to finish or stop it") from None
            raise InputError(f"{self.path}: cannot lock {self.lock_path}: {e.strerror}") from None
        if writable:
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                      "command": _redacted_command(getattr(sys, "orig_argv", None) or sys.argv)}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder, ensure_ascii=False) + "\n").encode("utf-8"), 0)
            except OSError:  # a full disk: the lock holds all the same, the refusal just says less
                pass
        self._fd, self._writable = fd, writable
        return self

    def release(self):
        """Let the next writer in (also done by the holder's exit, whatever the cause)."""
        if self._fd is None:
            return
        if self._writable:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no stale holder for the next refusal to name
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    @property
    def held(self):
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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


def batch_file_path(directory, batch_id, batch_num):
    """``<directory>/rewrite_data_{i}_of_{N}_batch.jsonl``: process ``batch_id``'s batch file."""
    return os.path.join(directory, BATCH_FILE.format(batch_id=batch_id, batch_num=batch_num))


def unused_replies_path(directory, batch_id, batch_num):
    """The file of the replies process ``batch_id`` did not use, beside its batch file."""
    return os.path.join(directory, UNUSED_REPLIES_FILE.format(batch_id=batch_id, batch_num=batch_num))


def find_batch_files(directory):
    """``(N, {batch_id: path})`` for the batch files of one run in ``directory``.

    Other files are ignored; batch files of two different N are an error naming both.
    """
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        raise InputError(f"{directory}: directory not found") from None
    except OSError as e:
        raise InputError(f"{directory}: cannot list: {e}") from None
    batches, first_of_n, ignored = {}, {}, []
    for name in names:
        match = BATCH_FILE_RE.fullmatch(name)
        if not match or not os.path.isfile(os.path.join(directory, name)):
            ignored.append(name)
            continue
        batch_id, batch_num = int(match.group(1)), int(match.group(2))
        first_of_n.setdefault(batch_num, name)
        if batch_id >= batch_num:
            raise InputError(
                f"{os.path.join(directory, name)}: batch id {batch_id} is not below the batch count {batch_num}"
            )
        batches[batch_id] = os.path.join(directory, name)
    if len(first_of_n) > 1:
        (n1, name1), (n2, name2) = sorted(first_of_n.items())[:2]
        raise InputError(
            f"{directory}: batch files of two runs, {name1} (N={n1}) and {name2} (N={n2}); "
            "move the files of the stale run away"
        )
    if not first_of_n:
        raise InputError(f"{directory}: no rewrite_data_{{i}}_of_{{N}}_batch.jsonl files (run reformat.py first)")
    if ignored:
        logger.info("ignoring %d other file(s) in %s: %s", len(ignored), directory, ", ".join(ignored[:SHOWN_NAMES]))
    return next(iter(first_of_n)), batches
