"""convert.py and realign/formats.py: each format both ways, round trips, ids, detection, Parquet."""

import json
import logging
import os
import sys

import pytest

import convert
from realign import load_records
from realign.formats import (
    FORMATS,
    RecordError,
    convert_file,
    detect_format,
    from_realign,
    summary_line,
    to_realign,
)


# Small literal datasets, one per format, with the fields each format can carry.
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "source": "math"},
    {"instruction": "Say hello.", "output": "Hello!"},  # no input field at all
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "Be brief.",
     "history": [["Hi", "Hello, how can I help?"]], "task": "open_qa"},
    {"instruction": "Tell me a joke.", "input": None, "output": "No.", "category": "brainstorm", "history": []},
]
SHAREGPT = [
    {"id": "c1", "source": "forum",
     "conversations": [{"from": "system", "value": "You are terse."},
                       {"from": "human", "value": "Capital of France?", "weight": 0},
                       {"from": "gpt", "value": "Paris.", "weight": 1},
                       {"from": "human", "value": "And of Spain?"},
                       {"from": "gpt", "value": "Madrid."}]},
    {"id": "c2", "system": "Answer in French.",
     "conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Bonjour"}]},
    {"id": "c3", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
]
MESSAGES = [
    {"uuid": "u-1", "meta": {"lang": "en"},
     "messages": [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
                  {"role": "user", "content": "What is 2+2?", "name": "bob"},
                  {"role": "assistant", "content": "4"}]},
    {"uuid": "u-2", "category": "open_qa",
     "messages": [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."},
                  {"role": "user", "content": "When?"}, {"role": "assistant", "content": "Around 1600."}]},
]
SOURCES = {"alpaca": ALPACA, "sharegpt": SHAREGPT, "messages": MESSAGES}

# A final file of the pipeline (no source_fields: the input was realign already).
FINAL = [
    {"id": 7, "tag": "rewrite",
     "items": [{"from": "human", "value": "Tips for sleep?", "category": "advice_giving",
                "evidence": ["Sleep 8 hours."]},
               {"from": "gpt", "value": "1. Keep a schedule.\n2. Avoid screens."}]},
    {"id": "x2", "tag": "original", "reject_reason": "length", "system": "Be kind.",
     "items": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
               {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2", "weight": 1}]},
]


def write(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return json.loads(text) if str(path).endswith(".json") else [json.loads(line) for line in text.splitlines()]


def run(input_path, output_path, *extra):
    return convert.main(["--input_path", str(input_path), "--output_path", str(output_path), *extra])


# ---------------------------------------------------------------- each format into realign


def test_alpaca_to_realign_joins_instruction_and_input_with_a_blank_line():
    assert to_realign(ALPACA[0], "alpaca", 0) == {
        "id": 0,
        "items": [{"from": "human", "value": "Add the numbers.\n\n2 and 3"}, {"from": "gpt", "value": "5"}],
        "source_fields": {"format": "alpaca", "id_key": None, "instruction": "Add the numbers.",
                          "input": "2 and 3", "fields": {"source": "math"}},
    }
    # Without input (absent, empty or null), the human turn is the instruction alone, and
    # source_fields keeps only whether (and how) there was an input field.
    without = to_realign(ALPACA[1], "alpaca", 1)
    assert without["items"][0] == {"from": "human", "value": "Say hello."}
    assert without["source_fields"] == {"format": "alpaca", "id_key": None}
    null_input = to_realign(ALPACA[3], "alpaca", 3)
    assert null_input["items"][0] == {"from": "human", "value": "Tell me a joke."}
    assert null_input["source_fields"]["input"] is None and "instruction" not in null_input["source_fields"]


def test_alpaca_system_and_history_become_the_system_field_and_earlier_turns():
    record = to_realign(ALPACA[2], "alpaca", 2)
    assert record["system"] == "Be brief."
    assert record["items"] == [
        {"from": "human", "value": "Hi", "category": "open_qa"},  # 'task' is one of the 46 names
        {"from": "gpt", "value": "Hello, how can I help?"},
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."},
    ]
    assert record["source_fields"]["category_key"] == "task"


def test_a_category_outside_the_46_tasks_stays_a_source_field():
    record = to_realign(ALPACA[3], "alpaca", 3)
    assert "category" not in record["items"][0]
    assert record["source_fields"]["fields"] == {"category": "brainstorm", "history": []}


def test_sharegpt_to_realign_keeps_every_turn_and_puts_the_system_turn_aside():
    record = to_realign(SHAREGPT[0], "sharegpt", 0)
    assert record["id"] == "c1"
    assert record["system"] == "You are terse."
    assert record["items"] == [
        {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And of Spain?"}, {"from": "gpt", "value": "Madrid."},
    ]
    source = record["source_fields"]
    assert source["turns"][0] == {"from": "human", "weight": 0}
    assert source["system_turns"] == [{"from": "system", "value": "You are terse."}]
    assert source["fields"] == {"source": "forum"}


def test_sharegpt_top_level_system_and_role_content_variant():
    assert to_realign(SHAREGPT[1], "sharegpt", 1)["system"] == "Answer in French."
    variant = to_realign(SHAREGPT[2], "sharegpt", 2)
    assert variant["items"] == [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]
    assert variant["source_fields"]["turn_keys"] == ["role", "content"]


def test_messages_to_realign_joins_leading_system_turns_and_keeps_multi_turn_whole():
    first = to_realign(MESSAGES[0], "messages", 0)
    assert first["id"] == "u-1" and first["source_fields"]["id_key"] == "uuid"
    assert first["system"] == "Rule one.\n\nRule two."
    assert first["items"] == [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]
    assert first["source_fields"]["turns"] == [{"role": "user", "name": "bob"}, {"role": "assistant"}]
    second = to_realign(MESSAGES[1], "messages", 1)
    assert [item["value"] for item in second["items"]] == ["Who wrote Hamlet?", "Shakespeare.", "When?", "Around 1600."]
    assert second["items"][0]["category"] == "open_qa"


# ---------------------------------------------------------------- realign into each format


def test_realign_to_alpaca_last_pair_is_the_instruction_earlier_pairs_the_history():
    assert from_realign(FINAL[0], "alpaca") == {
        "id": 7, "instruction": "Tips for sleep?", "input": "", "output": "1. Keep a schedule.\n2. Avoid screens.",
        "tag": "rewrite", "category": "advice_giving", "evidence": ["Sleep 8 hours."],
    }
    assert from_realign(FINAL[1], "alpaca") == {
        "id": "x2", "instruction": "Q2", "input": "", "output": "A2", "history": [["Q1", "A1"]],
        "system": "Be kind.", "tag": "original", "reject_reason": "length",
    }


def test_realign_to_sharegpt_and_messages_keep_extra_fields_on_records_and_turns():
    assert from_realign(FINAL[1], "sharegpt") == {
        "id": "x2", "system": "Be kind.", "tag": "original", "reject_reason": "length",
        "conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                          {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2", "weight": 1}],
    }
    assert from_realign(FINAL[1], "messages") == {
        "id": "x2", "tag": "original", "reject_reason": "length",
        "messages": [{"role": "system", "content": "Be kind."},
                     {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "weight": 1}],
    }


def test_the_rewritten_response_replaces_the_original_and_alpaca_input_comes_back():
    record = to_realign(ALPACA[0], "alpaca", 0)
    record["items"][1]["value"] = "The sum is 5."  # what merge and filter do
    record["tag"] = "rewrite"
    assert from_realign(record, "alpaca") == {"instruction": "Add the numbers.", "input": "2 and 3",
                                              "output": "The sum is 5.", "source": "math", "tag": "rewrite"}


def test_an_edited_human_turn_cannot_be_split_back_into_instruction_and_input():
    record = to_realign(ALPACA[0], "alpaca", 0)
    record["items"][0]["value"] = "Add 2 and 3."
    out = from_realign(record, "alpaca")
    assert (out["instruction"], out["input"]) == ("Add 2 and 3.", "")


def test_sharegpt_converts_to_messages_with_per_turn_keys():
    record = to_realign(SHAREGPT[0], "sharegpt", 0)
    assert from_realign(record, "messages") == {
        "id": "c1", "source": "forum",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Capital of France?", "weight": 0},
                     {"role": "assistant", "content": "Paris.", "weight": 1},
                     {"role": "user", "content": "And of Spain?"}, {"role": "assistant", "content": "Madrid."}],
    }


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_round_trip_through_realign_gives_every_field_back(fmt):
    for index, record in enumerate(SOURCES[fmt]):
        assert from_realign(to_realign(record, fmt, index), fmt) == record


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_round_trip_of_files_end_to_end(tmp_path, fmt):
    source = write_jsonl(tmp_path / f"{fmt}.jsonl", SOURCES[fmt])
    assert run(source, tmp_path / "realign.json", "--to", "realign") == 0
    assert load_records(str(tmp_path / "realign.json"), require_response=True)
    assert run(tmp_path / "realign.json", tmp_path / "back.jsonl", "--from", "realign", "--to", fmt) == 0
    assert read(tmp_path / "back.jsonl") == SOURCES[fmt]


def test_end_to_end_realign_final_file_to_each_format(tmp_path):
    final = write(tmp_path / "final.json", FINAL)
    for fmt in ("alpaca", "sharegpt", "messages"):
        assert run(final, tmp_path / f"out_{fmt}.json", "--to", fmt) == 0
        assert read(tmp_path / f"out_{fmt}.json") == [from_realign(r, fmt) for r in FINAL]
    assert read(tmp_path / "out_messages.json")[0]["messages"][1] == {
        "role": "assistant", "content": "1. Keep a schedule.\n2. Avoid screens."}


def test_alpaca_to_messages_directly(tmp_path):
    assert run(write(tmp_path / "a.json", ALPACA[:2]), tmp_path / "m.jsonl", "--to", "messages") == 0
    assert read(tmp_path / "m.jsonl") == [
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                      {"role": "assistant", "content": "5"}], "source": "math"},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
    ]


# ---------------------------------------------------------------- ids


def test_ids_absent_become_positions_said_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert run(write(tmp_path / "a.json", ALPACA), tmp_path / "r.json", "--to", "realign") == 0
    assert [r["id"] for r in read(tmp_path / "r.json")] == [0, 1, 2, 3]
    notes = [m for m in caplog.messages if "0-based position as id" in m]
    assert len(notes) == 1 and "first: record 0" in notes[0]
    assert "#ids from position: 4" in caplog.messages[-1]


@pytest.mark.parametrize("key", ["id", "idx", "uuid"])
def test_ids_present_are_kept_and_come_back_under_their_key(key):
    record = {key: "k-9", "instruction": "Q", "output": "A"}
    realign = to_realign(record, "alpaca", 5)
    assert realign["id"] == "k-9"
    assert from_realign(realign, "alpaca") == record


def test_duplicated_ids_are_bad_input_and_nothing_is_written(tmp_path, capsys):
    records = [{"id": 4, "instruction": "Q", "output": "A"}, {"id": 4, "instruction": "Q2", "output": "A2"}]
    out = tmp_path / "r.json"
    assert run(write(tmp_path / "a.json", records), out, "--to", "realign") == 2
    assert "a.json: record 1 (id 4): field 'id' duplicates record 0" in capsys.readouterr().err
    assert not out.exists()


def test_bad_input_leaves_an_existing_output_untouched(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old", encoding="utf-8")
    bad = [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": 3}]
    assert run(write(tmp_path / "a.json", bad), out, "--to", "realign") == 2
    assert out.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- bad conversations


BAD_CONVERSATIONS = [
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Q"}]},
     "field 'messages[0].role' must be a user turn"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hi"}]},
     "field 'messages[1].role' must be a user turn after the system turns"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q again"}]},
     "field 'messages[1].role' must be a assistant turn"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}]},
     "field 'messages[1].role' is a system turn after the conversation started"),
    ({"messages": [{"role": "user", "content": "Q"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]}]},
     "field 'messages[1].tool_calls' is a tool/function turn"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "42"}]},
     "field 'messages[1].role' is a tool/function turn"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}]},
     "field 'messages[0].content' must be a string (multimodal content parts are not supported)"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "field 'messages' has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "Q"}]}, "field 'messages[0].role' must be one of"),
]


@pytest.mark.parametrize("record, message", BAD_CONVERSATIONS)
def test_bad_conversations_are_bad_input(tmp_path, capsys, record, message):
    out = tmp_path / "r.json"
    records = [{"id": "ok", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
               {"id": "bad", **record}]
    assert run(write(tmp_path / "m.json", records), out, "--from", "messages", "--to", "realign") == 2
    err = capsys.readouterr().err
    assert "m.json: record 1 (id 'bad'): " + message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sharegpt_with_system_field_and_system_turns_is_bad_input():
    record = {"system": "A", "conversations": [{"from": "system", "value": "B"}, {"from": "human", "value": "Q"},
                                                {"from": "gpt", "value": "R"}]}
    with pytest.raises(RecordError, match="field 'system' is set and conversations has system turns"):
        to_realign(record, "sharegpt", 0)


def test_a_conversation_ending_with_a_human_turn_cannot_become_alpaca(tmp_path, capsys):
    records = [{"id": 1, "items": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                                   {"from": "human", "value": "More?"}]}]
    assert run(write(tmp_path / "r.json", records), tmp_path / "a.json", "--to", "alpaca") == 2
    assert "r.json: record 0 (id 1): field 'items[2]' is a human turn with no response" in capsys.readouterr().err
    # ShareGPT can hold it.
    assert run(tmp_path / "r.json", tmp_path / "s.json", "--to", "sharegpt") == 0


def test_realign_turns_that_do_not_alternate_are_bad_input():
    record = {"id": 1, "items": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                                 {"from": "gpt", "value": "B"}, {"from": "human", "value": "C"}]}
    with pytest.raises(RecordError, match=r"field 'items\[2\].from' must be 'human'"):
        from_realign(record, "messages")


# ---------------------------------------------------------------- auto-detection


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_detects_each_format(fmt):
    records = SOURCES.get(fmt, FINAL)
    found, description = detect_format(records, "in.json")
    assert found == fmt
    assert description.startswith(f"{fmt} (all of the first {len(records)} records have")


def test_auto_detection_says_which_turn_keys_it_found():
    assert detect_format(SHAREGPT[2:], "in.json")[1] == (
        "sharegpt (all of the first 1 records have 'conversations', turns keyed role/content)")


def test_mixed_shapes_are_bad_input(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run(write(tmp_path / "mixed.json", [ALPACA[0], SHAREGPT[1]]), out, "--to", "realign") == 2
    assert ("mixed.json: record 1 (id 'c2'): field 'conversations': a sharegpt record, but record 0 is alpaca: "
            "mixed formats in one file") in capsys.readouterr().err
    assert not out.exists()


def test_mixed_shapes_after_the_sampled_records_name_the_shape(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("realign.formats.DETECT_SAMPLE", 1)
    assert run(write(tmp_path / "mixed.json", [ALPACA[0], SHAREGPT[1]]), tmp_path / "r.json", "--to", "realign") == 2
    assert ("record 1 (id 'c2'): field 'instruction' is missing (it looks like a sharegpt record; "
            "the file is read as alpaca)") in capsys.readouterr().err


def test_unknown_and_ambiguous_shapes_are_bad_input():
    with pytest.raises(Exception, match=r"record 0: unknown record shape \(fields: 'prompt', 'completion'\)"):
        detect_format([{"prompt": "Q", "completion": "A"}], "in.json")
    with pytest.raises(Exception, match="ambiguous record shape: it has 'conversations' .sharegpt. and "
                                        "'instruction' and 'output' .alpaca.; pass --from"):
        detect_format([{"instruction": "Q", "output": "A", "conversations": []}], "in.json")


# ---------------------------------------------------------------- keep_original


def test_keep_original_takes_the_original_from_the_paired_input(tmp_path):
    source = write(tmp_path / "a.json", [{"id": 7, "instruction": "Tips for sleep?", "output": "Sleep more."}])
    assert run(source, tmp_path / "in.json", "--to", "realign") == 0
    final = to_realign({"id": 7, "instruction": "Tips for sleep?", "output": "Sleep more."}, "alpaca", 0)
    final["items"][1]["value"] = "1. Sleep more.\n2. Keep a schedule."
    final["tag"] = "rewrite"
    write(tmp_path / "final.json", [final])
    assert run(tmp_path / "final.json", tmp_path / "out.json", "--to", "alpaca", "--keep_original",
               "--original_path", source) == 0
    assert read(tmp_path / "out.json") == [{
        "id": 7, "instruction": "Tips for sleep?", "output": "1. Sleep more.\n2. Keep a schedule.",
        "tag": "rewrite", "original_response": "Sleep more."}]


def test_keep_original_without_the_input_works_only_for_records_tagged_original(tmp_path, capsys):
    # A multi-turn record is never rewritten: its last response is the original, tagged or not.
    assert from_realign(FINAL[1], "alpaca", keep_original=True)["original_response"] == "A2"
    untagged = {k: v for k, v in FINAL[1].items() if k != "tag"}
    assert from_realign(untagged, "messages", keep_original=True)["original_response"] == "A2"
    out = tmp_path / "out.json"
    assert run(write(tmp_path / "final.json", FINAL), out, "--to", "alpaca", "--keep_original") == 2
    assert ("final.json: record 0 (id 7): field 'items[1].value' holds the rewritten response and the original "
            "is not in this file: pass the pipeline's input as --original_path") in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- files


def test_parquet_in_and_out(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.Table.from_batches([pa.RecordBatch.from_struct_array(pa.array(MESSAGES))]),
                   tmp_path / "m.parquet")
    assert run(tmp_path / "m.parquet", tmp_path / "r.parquet", "--to", "realign") == 0
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [row["id"] for row in rows] == ["u-1", "u-2"]
    assert rows[1]["items"][2]["value"] == "When?"
    assert run(tmp_path / "r.parquet", tmp_path / "back.jsonl", "--to", "messages") == 0
    # Parquet cannot tell null from absent: keys only some rows or turns had are null there,
    # and are read back as absent, so the round trip gives the records back.
    assert pq.read_table(tmp_path / "r.parquet").to_pylist()[1]["items"][0]["category"] == "open_qa"
    assert pq.read_table(tmp_path / "r.parquet").to_pylist()[0]["items"][0]["category"] is None
    assert read(tmp_path / "back.jsonl") == MESSAGES
    assert sorted(os.listdir(tmp_path)) == ["back.jsonl", "m.parquet", "r.parquet"]  # no spool or temporary left


def test_parquet_without_pyarrow_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert run(write(tmp_path / "a.json", ALPACA), tmp_path / "r.parquet", "--to", "realign") == 2
    assert "r.parquet: Parquet needs pyarrow, which is not installed (pip install pyarrow)" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists()


def test_refuses_to_overwrite_the_input_and_unknown_output_types(tmp_path, capsys):
    source = write(tmp_path / "a.json", ALPACA)
    assert run(source, source, "--to", "realign") == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert run(source, tmp_path / "r.csv", "--to", "realign") == 2
    assert "r.csv: unknown output file type; use .json (a JSON list), .jsonl or .parquet" in capsys.readouterr().err
    assert read(source) == ALPACA


def test_convert_file_returns_the_counts_of_its_summary(tmp_path):
    stats = convert_file(write(tmp_path / "s.json", SHAREGPT), str(tmp_path / "r.jsonl"), "auto", "realign")
    assert (stats["in"], stats["out"], stats["from"], stats["to"]) == (3, 3, "sharegpt", "realign")
    assert summary_line(stats) == (f"#in: 3, #out: 3, format: sharegpt -> realign (input format detected) "
                                   f"-> {tmp_path / 'r.jsonl'}")
    stats = convert_file(str(tmp_path / "r.jsonl"), str(tmp_path / "a.json"), "realign", "alpaca")
    assert summary_line(stats).endswith(
        "#per-turn fields alpaca cannot hold (dropped): 2 (weight) -> " + str(tmp_path / "a.json"))
