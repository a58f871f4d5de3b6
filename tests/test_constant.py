"""constant.py: the byte-exact classifier prompt, the task tables, and the start-up check."""

import copy
import os
import subprocess
import sys
import types

import pytest

import constant
from realign import ConfigError, check_constants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The 46 names in SPEC §6 order, typed out here independently of constant.py.
SPEC_TASKS = ["question_generation", "story_generation", "poem_generation", "email_generation", "data_generation", "advice_giving", "recommendations", "how_to_generation", "planning", "instructional_rewriting", "language_polishing", "paraphrasing", "text_correction", "code_correction", "code_simplification", "information_extraction", "keywords_extraction", "table_extraction", "title_generation", "text_summarization", "note_summarization", "explain_code", "explain_answer", "text_to_text_translation", "text_to_code_translation", "code_to_code_translation", "code_to_text_translation", "open_qa", "closed_qa", "fill_in_the_blank", "fact_verification", "math_puzzles", "language_learning_questions", "natural_language_learning_tutor", "exam_problem_solving_tutor", "ml_ai_language_model_tutor", "general_classification", "ordering", "sentiment_analysis", "code_language_classification", "language_classification", "topic_classification", "value_judgement", "rejecting", "roleplay", "default"]

SPEC_RAG = ["recommendations", "how_to_generation", "explain_answer", "open_qa", "fact_verification"]
SPEC_NOT_REWRITTEN = [
    "story_generation", "poem_generation", "advice_giving", "paraphrasing", "code_simplification",
    "table_extraction", "title_generation", "text_summarization", "note_summarization", "roleplay",
    "default",
]


# SPEC §2, the classifier prompt, typed out here: the one copy the tests hold. test_classify.py
# imports spec_prompt and SPEC_PROMPT_TAIL to check the prompts that reach the model.
SPEC_CLASSIFIER_PROMPT = "\n".join([
    "",
    "You will receive a user's query. Additionally, you are given some pre-defined tasks below: ",
    "",
    "[Existing tasks start]",
    *SPEC_TASKS,
    "[Existing tasks end]",
    "",
    (
        "You objective is to choose the most appropriate task that can reflect the high-level intention "
        "of this query. You should first clearly give out your choice. Your choice should exactly match "
        "one of the task names provided above, without any modification. Do not include the task "
        "description in your choice."
    ),
    "",
    "Your output should be just the task name.",
    "",
    "User's query is below:",
    "[User's query start]",
    "{input}",
    "[User's query end]",
    "",
    "Task name:",
    "",
    "",
])
SPEC_PROMPT_TAIL = "\n[User's query end]\n\nTask name:\n\n"  # what follows the query


def spec_prompt(query):
    """The SPEC §2 prompt for ``query`` (put in by hand, so braces in the query stay as they are)."""
    head, tail = SPEC_CLASSIFIER_PROMPT.split("{input}")
    return head + query + tail


def test_classifier_prompt_is_byte_exact():
    assert len(SPEC_TASKS) == 46
    assert constant.PROMPT_INPUT_FOR_TASK_CLS == SPEC_CLASSIFIER_PROMPT
    filled = constant.PROMPT_INPUT_FOR_TASK_CLS.format(input="Who wrote Hamlet?")
    assert filled.startswith("\nYou will receive")
    assert filled.endswith("[User's query start]\nWho wrote Hamlet?" + SPEC_PROMPT_TAIL)


def test_task_tables_follow_the_spec():
    assert list(constant.TASK_DESCRIPTION) == SPEC_TASKS
    assert all(isinstance(d, str) and d.strip() for d in constant.TASK_DESCRIPTION.values())
    assert sorted(constant.RAG_TASKS) == sorted(SPEC_RAG)
    assert constant.REWRITE_TASK == [t for t in SPEC_TASKS if t not in SPEC_NOT_REWRITTEN]
    assert len(constant.REWRITE_TASK) == 35
    assert list(constant.STRUCTURE) == [t for t in SPEC_TASKS if t in constant.REWRITE_TASK or t == "default"]
    assert len(constant.TASK_GROUPS) == 10
    grouped = [t for tasks in constant.TASK_GROUPS.values() for t in tasks]
    assert sorted(grouped) == sorted(SPEC_TASKS)
    assert "language_learning_questions" in constant.TASK_GROUPS["Code"]
    assert "explain_answer" in constant.TASK_GROUPS["Conversation"]


def test_reformat_prompts_keep_the_output_protocol():
    for mode in ("adaptive", "forced"):
        for variant in ("plain", "evidence"):
            system = constant.REFORMAT_PROMPTS[mode][variant]["system"]
            assert "without any additional information" in system  # the original prompt's demand
    text = constant.REPLY_FORMATS["text"]["system"]
    assert "Reasoning:" in text and "Revised response:" in text
    json_layout = constant.REPLY_FORMATS["json"]["system"]
    assert '"reasoning"' in json_layout and '"revised_response"' in json_layout
    user = constant.REFORMAT_PROMPTS["adaptive"]["evidence"]["user"].format(
        question="Q?", response="R.", format="F", evidence="1. E"
    )
    assert "Q?" in user and "R." in user and "1. E" in user
    # Forced mode does not ask the model whether the format fits.
    assert constant.REFORMAT_PROMPTS["forced"]["plain"]["system"] != constant.REFORMAT_PROMPTS["adaptive"]["plain"]["system"]


def test_check_passes_on_the_shipped_file():
    check_constants()


def edited_constant(**changes):
    """A copy of constant.py's tables with some entries changed, as a user's edit would."""
    module = types.ModuleType("constant_edit")
    for name in dir(constant):
        if name.isupper():
            setattr(module, name, copy.deepcopy(getattr(constant, name)))
    for name, edit in changes.items():
        value = getattr(module, name)
        setattr(module, name, edit(value) if callable(edit) else edit)
    return module


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"REWRITE_TASK": lambda v: v + ["story_generation"]}, "'story_generation', which has no STRUCTURE"),
        ({"RAG_TASKS": lambda v: v + ["web_search"]}, "RAG_TASKS names task 'web_search'"),
        ({"STRUCTURE": lambda v: {**v, "poetry": "x"}}, "STRUCTURE names task 'poetry'"),
        ({"TASK_GROUPS": lambda v: {**v, "Extra": ["nonexistent"]}}, "TASK_GROUPS['Extra'] names task 'nonexistent'"),
        ({"PROMPT_INPUT_FOR_TASK_CLS": "Classify: {query}"}, "PROMPT_INPUT_FOR_TASK_CLS must use exactly the fields"),
        (
            {"REFORMAT_PROMPTS": lambda v: {**v, "forced": {**v["forced"], "plain": {"system": "s", "user": "{question} {format}"}}}},
            "REFORMAT_PROMPTS['forced']['plain']['user']",
        ),
        (
            {"REFORMAT_PROMPTS": lambda v: {**v, "adaptive": {**v["adaptive"], "plain": {"system": "use {json}", "user": v["adaptive"]["plain"]["user"]}}}},
            "REFORMAT_PROMPTS['adaptive']['plain']['system']",
        ),
        ({"JUDGE_PROMPTS": lambda v: {**v, "readability": {"system": "s", "user": "{question"}}}, "not a valid format template"),
        ({"TASK_DESCRIPTION": lambda v: {k: d for k, d in v.items() if k != "default"}}, "'default'"),
    ],
)
def test_check_rejects_a_broken_edit(changes, message):
    with pytest.raises(ConfigError) as err:
        check_constants(edited_constant(**changes))
    assert message in str(err.value)
    assert str(err.value).startswith("constant.py: ")


def test_import_has_no_side_effects(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import constant"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True, text=True, check=True,
    )
    assert result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_a_broken_edit_stops_a_script_at_start_up(tmp_path, monkeypatch, capsys):
    import reformat

    monkeypatch.setattr(constant, "REWRITE_TASK", [*constant.REWRITE_TASK, "story_generation"])
    out = tmp_path / "out"
    code = reformat.main(["--input_data_path", str(tmp_path / "never_read.json"), "--output_directory", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "constant.py: REWRITE_TASK names task 'story_generation', which has no STRUCTURE entry" in err
    assert "Traceback" not in err
    assert not out.exists()
