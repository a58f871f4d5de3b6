"""Converting datasets between ReAlign records and the formats trainers read.

Formats (``FORMATS``):

- ``realign``: ``{"id", "items": [{"from": "human"|"gpt", "value"}, ...]}``, the pipeline's own;
- ``alpaca``: ``{"instruction", "input", "output"}``, with LLaMA-Factory's optional
  ``system`` and ``history`` (``[[instruction, response], ...]`` of the earlier turns);
- ``sharegpt``: ``{"conversations": [{"from", "value"}], "system"?}``;
- ``messages``: ``{"messages": [{"role", "content"}]}`` (OpenAI chat, TRL).

Files by extension: ``.json`` (a JSON list), ``.jsonl`` (one record a line), ``.parquet``
(needs pyarrow). Input other than ``.parquet`` may be either JSON form. Every file is
read and written streaming (Parquet in row batches), so a million records are never held
in memory: only their ids are (and, with ``original_path``, the original responses).

To realign:

- Alpaca: the human turn is ``instruction + "\\n\\n" + input`` (the instruction, a blank
  line, the input, as the Stanford Alpaca prompt lays them out), or ``instruction`` alone
  when ``input`` is absent, empty or null; ``output`` is the gpt turn. The pairs of
  ``history`` come first, as earlier turns.
- ShareGPT and messages: every turn is kept. Roles: ``human``/``user`` and
  ``gpt``/``assistant``; turns may use ``from``/``value`` or ``role``/``content`` keys
  (both variants occur in ShareGPT files). Leading ``system`` turns (or ShareGPT's
  top-level ``system``) go to the record's top-level ``system`` (several are joined with a
  blank line), never into ``items``. Bad input: an empty conversation, one that does not
  start with a user turn after its system turns, does not alternate, has no assistant
  turn, a system turn later on, tool or function turns (ReAlign has no place for them),
  content that is not a string (multimodal parts).
- ``id`` is the record's ``id``, else ``idx``, else ``uuid``, else its 0-based position in
  the file; a duplicated id is bad input. ``category`` (or ``task``) goes to
  ``items[0].category`` when it is one of the 46 task names, and stays a source field
  otherwise.
- Everything the realign record cannot hold is kept in its top-level ``source_fields``
  (``SOURCE_KEY``): the source format, where the id and category came from, the other
  top-level fields verbatim, Alpaca's original ``instruction`` and ``input``, the
  original system turns and the per-turn keys (``name``, ``weight``, role labels, ...).
  The pipeline's stages pass unknown top-level keys through untouched, so nothing in
  ``items`` changes shape.

From realign:

- The turns are the ``items``: in the pipeline's final file, ``items[1].value`` is the
  rewrite where it was accepted. ``keep_original`` adds ``original_response`` (``ORIGINAL_KEY``): the
  last response as it was before rewriting (only single-turn records are rewritten; a
  multi-turn record's is its last response). The final file holds it for records tagged
  ``original``; for records tagged ``rewrite`` it comes from an ``original_path`` file
  (the pipeline's input, any format), paired by id.
- The record's other top-level fields (``tag``, ``reject_reason``, ...), its id,
  ``items[0].category`` and ``items[0].evidence`` become top-level fields; other keys
  on turns go onto the ShareGPT/messages turns (Alpaca has no place for them: they are
  dropped and counted).
- Alpaca: the last human/gpt pair is ``instruction``/``output``, the earlier pairs
  ``history`` (LLaMA-Factory's convention); a conversation ending with a human turn is
  bad input. ``input`` is ``""`` unless ``source_fields`` still matches the human turn,
  in which case the original ``instruction`` and ``input`` come back.
- A round trip ``X -> realign -> X`` gives back every field of the ``X`` record (ids
  come back under their own key, and not at all when they were positions). Parquet cannot
  tell a null from an absent key (a column has every key, null where a record had none):
  a Parquet file is read with its null keys dropped.
"""

import itertools
import json
import logging
import os
import tempfile
from collections import Counter

from realign.records import (
    InputError,
    batched,
    check_record,
    describe_record,
    iter_json_values,
    refuse_overwriting_input,
    write_atomic,
    write_json_list_atomic,
)

logger = logging.getLogger(__name__)

FORMATS = ("realign", "alpaca", "sharegpt", "messages")
FILE_TYPES = ("json", "jsonl", "parquet")
SOURCE_KEY = "source_fields"  # on a realign record: what the source record had beyond items
ORIGINAL_KEY = "original_response"  # added by keep_original
ID_KEYS = ("id", "idx", "uuid")  # the first one present is the record's id
CATEGORY_KEYS = ("category", "task")
ALPACA_INPUT_SEPARATOR = "\n\n"  # instruction, blank line, input: the Stanford Alpaca prompt's layout
SYSTEM_SEPARATOR = "\n\n"  # between several leading system turns
DETECT_SAMPLE = 100  # records auto-detection looks at
PARQUET_BATCH_ROWS = 1024  # rows per Parquet read batch and row group

CONVERSATION_KEY = {"sharegpt": "conversations", "messages": "messages"}
TURN_KEYS = {"sharegpt": ("from", "value"), "messages": ("role", "content")}  # (role key, content key)
LABELS = {
    "sharegpt": {"human": "human", "gpt": "gpt", "system": "system"},
    "messages": {"human": "user", "gpt": "assistant", "system": "system"},
}
ROLE_OF_LABEL = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}
TOOL_LABELS = ("tool", "function", "function_call", "observation", "ipython")
TOOL_TURN_KEYS = ("tool_calls", "function_call", "tool_call_id")
ITEM_KEYS = ("from", "value")
FIRST_ITEM_FIELDS = ("category", "evidence")  # items[0] keys that become top-level fields
SHAPE_MARKERS = {
    "realign": "'items'",
    "alpaca": "'instruction' and 'output'",
    "sharegpt": "'conversations'",
    "messages": "'messages'",
}


class RecordError(ValueError):
    """One record cannot be converted: ``field`` names the field, ``problem`` says why."""

    def __init__(self, field, problem):
        super().__init__(f"field '{field}' {problem}" if field else problem)
        self.field = field


# ---------------------------------------------------------------- shapes and detection


def record_shapes(record):
    """The formats whose marker fields ``record`` has (see ``SHAPE_MARKERS``)."""
    if not isinstance(record, dict):
        return []
    shapes = [fmt for fmt, key in (("realign", "items"), ("sharegpt", "conversations"), ("messages", "messages"))
              if isinstance(record.get(key), list)]
    if "instruction" in record and "output" in record:
        shapes.append("alpaca")
    return shapes


def source_id(record):
    """The id a message should name: the first of ``ID_KEYS`` that is an int or a string."""
    if not isinstance(record, dict):
        return None
    for key in ID_KEYS:
        value = record.get(key)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
    return None


def _turn_key_style(record, fmt):
    turns = record.get(CONVERSATION_KEY[fmt]) or [{}]
    role_key, content_key = _turn_keys(turns, fmt)
    return f", turns keyed {role_key}/{content_key}"


def detect_format(records, path="input"):
    """``(format, what was found)`` from ``records`` (the first records of ``path``).

    Raises :class:`InputError` naming the record and its fields when one has no known
    shape, has the marker fields of two formats, or differs from the records before it.
    """
    found, count = None, 0
    for index, record in enumerate(records):
        count += 1
        where = describe_record(path, index, source_id(record))
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object")
        shapes = record_shapes(record)
        if not shapes:
            fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            raise InputError(
                f"{where}: unknown record shape (fields: {fields}); expected 'instruction' and 'output' "
                "(alpaca), 'conversations' (sharegpt), 'messages' (messages) or 'items' (realign)"
            )
        if len(shapes) > 1:
            both = " and ".join(f"{SHAPE_MARKERS[s]} ({s})" for s in shapes)
            raise InputError(f"{where}: ambiguous record shape: it has {both}; pass --from")
        if found is None:
            found = (shapes[0], index, record)
        elif shapes[0] != found[0]:
            raise InputError(
                f"{where}: field {SHAPE_MARKERS[shapes[0]]}: a {shapes[0]} record, but record {found[1]} "
                f"is {found[0]}: mixed formats in one file"
            )
    if found is None:
        raise InputError(f"{path}: no records to detect the format from")
    fmt, _, first = found
    style = _turn_key_style(first, fmt) if fmt in CONVERSATION_KEY else ""
    return fmt, f"{fmt} (all of the first {count} records have {SHAPE_MARKERS[fmt]}{style})"


# ---------------------------------------------------------------- to realign


def _take_id(fields, index):
    """``(id, key it came from or None)``; the key is removed from ``fields``."""
    for key in ID_KEYS:
        value = fields.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RecordError(key, "must be an integer or a string")
        del fields[key]
        return value, key
    return index, None


def task_names():
    """The 46 task names of ``constant.py`` (read at first use: the data lives there)."""
    from constant import TASK_DESCRIPTION

    return frozenset(TASK_DESCRIPTION)


def _take_category(fields, names):
    """``(category, key)`` when a category field holds one of the task ``names`` (removed from
    ``fields``), else ``(None, None)``: an unknown category stays a source field."""
    for key in CATEGORY_KEYS:
        value = fields.get(key)
        if isinstance(value, str) and value in names:
            del fields[key]
            return value, key
    return None, None


def _take_system_field(fields):
    """A top-level ``system`` that is a non-empty string, removed from ``fields``; else None."""
    value = fields.get("system")
    if value is None or value == "":
        return None  # kept verbatim as a source field
    if not isinstance(value, str):
        raise RecordError("system", "must be a string")
    return fields.pop("system")


def alpaca_prompt(instruction, input_text):
    """The human turn of an Alpaca record: ``instruction``, a blank line, ``input`` (when any)."""
    return f"{instruction}{ALPACA_INPUT_SEPARATOR}{input_text}" if input_text else instruction


def _alpaca_to_realign(fields):
    """``(items, system, source)`` of an Alpaca record; ``fields`` keeps the other fields."""
    for key in ("instruction", "output"):
        if key not in fields:
            raise RecordError(key, "is missing")
        if not isinstance(fields[key], str):
            raise RecordError(key, "must be a string")
    instruction, output = fields.pop("instruction"), fields.pop("output")
    source = {}
    if "input" in fields:
        if fields["input"] is not None and not isinstance(fields["input"], str):
            raise RecordError("input", "must be a string")
        source["input"] = fields.pop("input")
        if source["input"]:  # without an input the human turn is the instruction: no copy needed
            source["instruction"] = instruction
    system = _take_system_field(fields)
    items = []
    history = fields.get("history")
    if history is not None and not isinstance(history, list):
        raise RecordError("history", "must be a list of [instruction, response] pairs")
    if history:  # an empty or null history stays a source field, as it was
        for i, pair in enumerate(history):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(text, str) for text in pair)):
                raise RecordError(f"history[{i}]", "must be a pair of strings [instruction, response]")
            items += [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}]
        del fields["history"]
    items += [{"from": "human", "value": alpaca_prompt(instruction, source.get("input"))},
              {"from": "gpt", "value": output}]
    return items, system, source


def _turn_keys(turns, fmt):
    """``(role key, content key)``: ``from``/``value`` or ``role``/``content``, by the first turn."""
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    for keys in (("from", "value"), ("role", "content")):
        if any(key in first for key in keys):
            return keys
    return TURN_KEYS[fmt]


def _conversation_to_realign(fields, fmt):
    """``(items, system, source)`` of a ShareGPT or messages record."""
    key = CONVERSATION_KEY[fmt]
    turns = fields.pop(key, None)
    if turns is None:
        raise RecordError(key, "is missing")
    if not isinstance(turns, list):
        raise RecordError(key, "must be a list of turns")
    if not turns:
        raise RecordError(key, "is empty")
    role_key, content_key = _turn_keys(turns, fmt)
    labels = LABELS[fmt]
    system_turns, items, kept = [], [], []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, "must be an object")
        label = turn.get(role_key)
        tool_key = next((k for k in TOOL_TURN_KEYS if turn.get(k) is not None), None)
        if label in TOOL_LABELS or tool_key:
            field = f"{where}.{tool_key}" if tool_key else f"{where}.{role_key}"
            raise RecordError(field, "is a tool/function turn: ReAlign records hold only user and assistant turns")
        role = ROLE_OF_LABEL.get(label)
        if role is None:
            raise RecordError(f"{where}.{role_key}", f"must be one of {', '.join(map(repr, ROLE_OF_LABEL))}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            extra = " (multimodal content parts are not supported)" if isinstance(content, list) else ""
            raise RecordError(f"{where}.{content_key}", f"must be a string{extra}")
        if role == "system":
            if items:
                raise RecordError(f"{where}.{role_key}", "is a system turn after the conversation started; "
                                  "system turns must come first")
            system_turns.append(turn)
            continue
        expected = "human" if len(items) % 2 == 0 else "gpt"
        if role != expected:
            first = " after the system turns" if system_turns and not items else ""
            raise RecordError(f"{where}.{role_key}", f"must be a {labels[expected]} turn{first} (turns alternate "
                              f"{labels['human']}, {labels['gpt']}, starting with {labels['human']})")
        items.append({"from": role, "value": content})
        kept.append({k: v for k, v in turn.items() if k != content_key})
    if len(items) < 2:
        raise RecordError(key, f"has no {labels['gpt']} turn")
    source = {}
    if (role_key, content_key) != TURN_KEYS[fmt]:
        source["turn_keys"] = [role_key, content_key]
    if any(k != {role_key: labels[item["from"]]} for k, item in zip(kept, items)):
        source["turns"] = kept
    system = _take_system_field(fields) if fmt == "sharegpt" else None
    if system_turns:
        if system is not None:
            raise RecordError("system", f"is set and {key} has system turns too; keep one of them")
        source["system_turns"] = system_turns
        system = SYSTEM_SEPARATOR.join(turn[content_key] for turn in system_turns) or None
    return items, system, source


def _to_realign(record, fmt, index, notes, names):
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise RecordError(None, "expected an object")
    if fmt == "realign":
        if "items" not in record:
            raise RecordError("items", "is missing")
        return record  # check_record does the rest
    fields = dict(record)
    record_id, id_key = _take_id(fields, index)
    if fmt == "alpaca":
        items, system, source = _alpaca_to_realign(fields)
    else:
        items, system, source = _conversation_to_realign(fields, fmt)
    category, category_key = _take_category(fields, names)
    if category is not None:
        items[0]["category"] = category
    elif notes is not None and any(isinstance(fields.get(k), str) for k in CATEGORY_KEYS):
        notes["unknown_category"] += 1
    if id_key is None and notes is not None:
        notes["positional_id"] += 1
    out = {"id": record_id, "items": items}
    if system is not None:
        out["system"] = system
    out[SOURCE_KEY] = {"format": fmt, "id_key": id_key, **source}
    if category_key is not None:
        out[SOURCE_KEY]["category_key"] = category_key
    if fields:  # never an empty object: Parquet cannot store a struct without fields
        out[SOURCE_KEY]["fields"] = fields
    return out


def to_realign(record, fmt, index, names=None):
    """The realign record of one ``fmt`` record at 0-based position ``index`` of its file.

    ``names``: the task names a category must be one of (default: the 46 of ``constant.py``).
    ``fmt`` ``"realign"`` returns the record as it is. Raises :class:`RecordError` on bad
    input. The result passes ``check_record(..., require_response=True)``.
    """
    return _to_realign(record, fmt, index, None, task_names() if names is None else names)


# ---------------------------------------------------------------- from realign


def _check_items(record):
    """Every turn of a realign record: alternating human/gpt, string values."""
    items = record.get("items")
    if not isinstance(items, list) or len(items) < 2:
        raise RecordError("items", "must be a list of at least a human and a gpt turn")
    for i, item in enumerate(items):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(item, dict) or item.get("from") != expected:
            raise RecordError(f"items[{i}].from", f"must be {expected!r} (turns alternate human, gpt)")
        if not isinstance(item.get("value"), str):
            raise RecordError(f"items[{i}].value", "must be a string")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("system", "must be a string")
    source = record.get(SOURCE_KEY)
    if source is not None and not (isinstance(source, dict) and source.get("format") in FORMATS):
        raise RecordError(SOURCE_KEY, "must be an object with a 'format' (as convert.py writes it)")
    return items


def last_response(items):
    """The value of the last gpt turn of ``items``."""
    return items[-1]["value"] if len(items) % 2 == 0 else items[-2]["value"]


def original_of(record, original_response=None):
    """The record's last response as it was before rewriting, for ``keep_original``.

    Only single-turn records are rewritten, so this is the original of ``items[1].value``;
    a multi-turn record's last response is its original. ``original_response`` (from a
    paired original file) wins; else a record tagged ``original`` still holds it. A record
    tagged ``rewrite`` (or not tagged at all) does not: :class:`RecordError`.
    """
    if original_response is not None:
        return original_response
    items = record["items"]
    tag = record.get("tag")
    if tag == "original" or len(items) > 2:
        return last_response(items)
    what = "holds the rewritten response" if tag == "rewrite" else "may hold a rewrite (the record has no 'tag')"
    raise RecordError("items[1].value", f"{what} and the original is not in this file: "
                      "pass the pipeline's input as --original_path")


def _turn_extras(record, source):
    """Per-turn extra keys: from ``source_fields`` (a conversation source) and from the items."""
    items = record["items"]
    extras = [{} for _ in items]
    turns = source.get("turns") if source and source.get("format") in CONVERSATION_KEY else None
    if isinstance(turns, list) and len(turns) == len(items):
        role_key = (source.get("turn_keys") or TURN_KEYS[source["format"]])[0]
        for extra, turn in zip(extras, turns):
            if isinstance(turn, dict):
                extra.update((k, v) for k, v in turn.items() if k != role_key)
    for i, item in enumerate(items):
        skip = ITEM_KEYS + (FIRST_ITEM_FIELDS if i == 0 else ())
        extras[i].update((k, v) for k, v in item.items() if k not in skip)
    return extras


def _source_labels(record, source, fmt):
    """The role labels of the source turns when the target is the source format, else None."""
    if not source or source.get("format") != fmt or not isinstance(source.get("turns"), list):
        return None
    role_key = (source.get("turn_keys") or TURN_KEYS[fmt])[0]
    turns = source["turns"]
    if len(turns) != len(record["items"]):
        return None
    labels = [turn.get(role_key) if isinstance(turn, dict) else None for turn in turns]
    if any(ROLE_OF_LABEL.get(label) != item["from"] for label, item in zip(labels, record["items"])):
        return None
    return labels


def _to_alpaca(record, source, dropped):
    items = record["items"]
    if len(items) % 2:
        raise RecordError(f"items[{len(items) - 1}]", "is a human turn with no response: alpaca needs an output")
    prompt, output = items[-2]["value"], items[-1]["value"]
    core = {"instruction": prompt, "input": ""}
    if source and source.get("format") == "alpaca":
        split = isinstance(source.get("instruction"), str) and alpaca_prompt(
            source["instruction"], source.get("input")) == prompt  # the human turn is unchanged
        if split or "instruction" not in source:  # split it back, or it had no input
            core = {"instruction": source["instruction"] if split else prompt}
            if "input" in source:
                core["input"] = source["input"]
    core["output"] = output
    if len(items) > 2:
        core["history"] = [[items[i]["value"], items[i + 1]["value"]] for i in range(0, len(items) - 2, 2)]
    if record.get("system") is not None:
        core["system"] = record["system"]
    for extra in _turn_extras(record, source):
        dropped.update(extra.keys())
    return core


def _to_conversation(record, source, fmt):
    same = bool(source) and source.get("format") == fmt
    role_key, content_key = TURN_KEYS[fmt]
    if same and isinstance(source.get("turn_keys"), list) and len(source["turn_keys"]) == 2:
        role_key, content_key = source["turn_keys"]
    labels = _source_labels(record, source, fmt) or [LABELS[fmt][item["from"]] for item in record["items"]]
    core, turns = {}, []
    system = record.get("system")
    system_turns = source.get("system_turns") if same else None
    if (isinstance(system_turns, list) and all(isinstance(t, dict) for t in system_turns)
            and SYSTEM_SEPARATOR.join(str(t.get(content_key)) for t in system_turns) == (system or "")):
        turns += [dict(turn) for turn in system_turns]
    elif system:
        if fmt == "sharegpt" and not system_turns:
            core["system"] = system  # ShareGPT's top-level field (LLaMA-Factory)
        else:
            turns.append({role_key: LABELS[fmt]["system"], content_key: system})
    for item, label, extra in zip(record["items"], labels, _turn_extras(record, source)):
        turn = {role_key: label, content_key: item["value"]}
        turn.update((k, v) for k, v in extra.items() if k not in turn)
        turns.append(turn)
    return {CONVERSATION_KEY[fmt]: turns, **core}


def _from_realign(record, fmt, keep_original, original_response, dropped):
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise RecordError(None, "expected an object")
    if fmt == "realign":  # already checked as the pipeline checks its input
        if not keep_original:
            return record
        return {**record, ORIGINAL_KEY: original_of(record, original_response)}
    items = _check_items(record)
    source = record.get(SOURCE_KEY)
    # Extra fields: the source's, then the pipeline's (tag, reject_reason, ...), then the
    # first turn's category and evidence; the format's own keys win over all of them.
    extras = dict(source.get("fields") or {}) if source else {}
    extras.update((k, v) for k, v in record.items() if k not in ("id", "items", "system", SOURCE_KEY))
    if "category" in items[0]:
        extras[(source or {}).get("category_key") or "category"] = items[0]["category"]
    if "evidence" in items[0]:
        extras["evidence"] = items[0]["evidence"]
    out = {}
    id_key = source.get("id_key") if source else "id"  # None: the id was a position
    if id_key:
        out[id_key] = record["id"]
    out.update(_to_alpaca(record, source, dropped) if fmt == "alpaca" else _to_conversation(record, source, fmt))
    out.update((k, v) for k, v in extras.items() if k not in out)
    if keep_original:
        out[ORIGINAL_KEY] = original_of(record, original_response)
    return out


def from_realign(record, fmt, keep_original=False, original_response=None):
    """The ``fmt`` record of one realign record (see the module docstring).

    With ``keep_original``, adds ``original_response``: ``original_response`` when given
    (from a paired original file), else what :func:`original_of` finds on the record.
    Raises :class:`RecordError` on a record ``fmt`` cannot hold.
    """
    return _from_realign(record, fmt, keep_original, original_response, Counter())


# ---------------------------------------------------------------- files


def _import_pyarrow(path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: Parquet needs pyarrow, which is not installed (pip install pyarrow)") from None
    return pa, pq


def file_type(path):
    """``"json"``, ``"jsonl"`` or ``"parquet"`` by the extension of ``path``, else None."""
    extension = os.path.splitext(path)[1].lower()
    return next((kind for kind in FILE_TYPES if extension == f".{kind}"), None)


def _iter_parquet(path):
    pa, pq = _import_pyarrow(path)
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            rows = batch.to_pylist()
            yield from (_without_nulls(row) for row in rows)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read Parquet: {str(e).strip().splitlines()[0]}") from None


def _without_nulls(value):
    """``value`` without the keys whose value is null, at every depth: a Parquet struct has
    every key of its column, null where the record had none, and cannot say which it was."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def iter_file_records(path):
    """Yield the values of a ``.parquet`` file's rows, or of a JSON list or JSONL file, streaming."""
    if file_type(path) == "parquet":
        return _iter_parquet(path)
    return iter_json_values(path)


def _write_parquet(path, records):
    """Write ``records`` as Parquet atomically: one pass spools them (JSONL) and learns the
    schema that fits them all, the second writes row groups; memory holds one batch."""
    pa, pq = _import_pyarrow(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        with tempfile.TemporaryFile("w+", encoding="utf-8", dir=directory, prefix=".spool-") as spool:
            schema = None
            for batch in batched(records, PARQUET_BATCH_ROWS):
                batch_schema = pa.schema(list(pa.array(batch).type))  # every row's keys (from_pylist: the first's)
                schema = batch_schema if schema is None else pa.unify_schemas(
                    [schema, batch_schema], promote_options="permissive")
                spool.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in batch)
            spool.seek(0)

            def write(f):
                writer = pq.ParquetWriter(f, schema if schema is not None else pa.schema([]))
                for lines in batched(spool, PARQUET_BATCH_ROWS):
                    writer.write_table(pa.Table.from_pylist([json.loads(line) for line in lines], schema=schema))
                writer.close()

            write_atomic(path, write, binary=True)
    except pa.ArrowException as e:
        raise InputError(f"{path}: cannot write Parquet: {str(e).strip().splitlines()[0]}") from None


def write_records(path, records):
    """Write ``records`` (any iterable, consumed once) atomically, in the file type of ``path``'s
    extension: a JSON list (indent 4, as the pipeline writes), JSONL, or Parquet."""
    kind = file_type(path)
    if kind == "json":
        write_json_list_atomic(path, records)
    elif kind == "jsonl":
        write_atomic(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif kind == "parquet":
        _write_parquet(path, records)
    else:
        raise InputError(f"{path}: unknown output file type; use .json (a JSON list), .jsonl or .parquet")


def detect_file_format(path, sample_size=DETECT_SAMPLE):
    """``(format, what was found)`` from the first ``sample_size`` records of ``path``."""
    return detect_format(itertools.islice(iter_file_records(path), sample_size), path)


def _with_hint(error, record, fmt):
    shapes = [s for s in record_shapes(record) if s != fmt]
    if len(shapes) == 1:
        return f"{error} (it looks like a {shapes[0]} record; the file is read as {fmt})"
    return str(error)


def iter_realign(values, fmt, path, stats):
    """Yield the realign record of each of ``values`` (``fmt`` records of ``path``), each checked
    as the pipeline checks its input (duplicate ids included); counts go to ``stats``."""
    seen, names = {}, task_names()
    for index, value in enumerate(values):
        stats["in"] += 1
        try:
            record = _to_realign(value, fmt, index, stats, names)
        except RecordError as e:
            raise InputError(f"{describe_record(path, index, source_id(value))}: {_with_hint(e, value, fmt)}") from None
        if fmt != "realign" and record[SOURCE_KEY]["id_key"] is None and stats["positional_id"] == 1:
            logger.info("%s: records without 'id', 'idx' or 'uuid' get their 0-based position as id "
                        "(first: record %d)", path, index)
        check_record(record, index, path, True, seen)
        yield record


def read_originals(path):
    """``{id: last response}`` of a file in any format (auto-detected), for keep_original."""
    fmt, found = detect_file_format(path)
    logger.info("%s: original responses read as %s", path, found)
    return {record["id"]: last_response(record["items"])
            for record in iter_realign(iter_file_records(path), fmt, path, Counter())}


def iter_converted(records, fmt, path, stats, keep_original=False, originals=None):
    """Yield each realign record of ``path`` converted to ``fmt``; counts go to ``stats``."""
    dropped = stats["dropped_fields"]
    for index, record in enumerate(records):
        original = None
        if keep_original and originals is not None:
            original = originals.get(record["id"])
            if original is None:
                raise InputError(f"{describe_record(path, index, record['id'])}: field 'id' is not in the original "
                                 "file (--original_path)")
        try:
            out = _from_realign(record, fmt, keep_original, original, dropped)
        except RecordError as e:
            raise InputError(f"{describe_record(path, index, record['id'])}: {e}") from None
        stats["out"] += 1
        yield out


def convert_file(input_path, output_path, from_format="auto", to_format="realign",
                 keep_original=False, original_path=None):
    """Convert ``input_path`` to ``output_path`` (file types by extension), streaming, atomically.

    ``from_format`` is one of ``FORMATS`` or ``"auto"``; ``to_format`` one of ``FORMATS``.
    Bad input raises :class:`InputError` (one line: file, record, field) before the output
    is replaced. Returns the counts for :func:`summary_line`: ``in``, ``out``, ``from``,
    ``to``, ``detected`` (what auto-detection found, or None), ``positional_id`` (records
    whose id is their position), ``unknown_category``, ``dropped_fields`` (a Counter of the
    per-turn keys Alpaca could not hold) and ``output_path``.
    """
    if from_format not in ("auto", *FORMATS) or to_format not in FORMATS:
        raise ValueError(f"formats: from {from_format!r}, to {to_format!r}; expected {', '.join(FORMATS)}")
    if file_type(output_path) is None:
        raise InputError(f"{output_path}: unknown output file type; use .json (a JSON list), .jsonl or .parquet")
    refuse_overwriting_input(input_path, output_path)
    if original_path:
        refuse_overwriting_input(original_path, output_path)
    stats = {"in": 0, "out": 0, "positional_id": 0, "unknown_category": 0, "dropped_fields": Counter()}
    values = iter_file_records(input_path)
    first = list(itertools.islice(values, DETECT_SAMPLE))
    detected = None
    if from_format == "auto":
        from_format, detected = detect_format(first, input_path)
        logger.info("%s: detected %s", input_path, detected)
    originals = None
    if keep_original and to_format == "realign":
        logger.warning("--keep_original applies to conversions out of realign records; ignored")
        keep_original = False
    elif keep_original and original_path:
        originals = read_originals(original_path)
    records = iter_realign(itertools.chain(first, values), from_format, input_path, stats)
    write_records(output_path, iter_converted(records, to_format, input_path, stats, keep_original, originals))
    stats.update({"from": from_format, "to": to_format, "detected": detected, "output_path": output_path})
    return stats


def summary_line(stats):
    """``#in: N, #out: M, format: X -> Y ...`` for the counts :func:`convert_file` returns."""
    line = f"#in: {stats['in']}, #out: {stats['out']}, format: {stats['from']} -> {stats['to']}"
    if stats.get("detected"):
        line += " (input format detected)"
    if stats.get("positional_id"):
        line += f", #ids from position: {stats['positional_id']}"
    if stats.get("unknown_category"):
        line += f", #categories not among the 46 tasks (kept as source fields): {stats['unknown_category']}"
    dropped = stats.get("dropped_fields")
    if dropped:
        line += f", #per-turn fields alpaca cannot hold (dropped): {sum(dropped.values())} ({', '.join(dropped)})"
    return f"{line} -> {stats['output_path']}"
