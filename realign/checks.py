"""Start-up check that ``constant.py`` is consistent after a user's edit.

Scripts call :func:`check_constants` before reading any data, so a broken edit stops
the run at once with a message naming the task or template, never a KeyError mid-run.
"""

import string


class ConfigError(Exception):
    """``constant.py`` is inconsistent: the message names the table and the task."""


# The fields each template is formatted with by the scripts.
REFORMAT_USER_FIELDS = {
    "plain": {"question", "response", "format"},
    "evidence": {"question", "response", "format", "evidence"},
}
REPLY_FORMAT_NAMES = ("text", "json")  # reformat.py --reply_format
JUDGE_USER_FIELDS = {
    "factuality": {"question", "reference", "answer"},
    "readability": {"question", "answer_a", "answer_b"},
}


def template_fields(template, where):
    """The set of named fields in a ``str.format`` template."""
    if not isinstance(template, str):
        raise ConfigError(f"constant.py: {where} must be a string")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"constant.py: {where} is not a valid format template ({e}); write literal braces as {{{{ and }}}}") from None
    return fields


def check_template(template, expected, where):
    fields = template_fields(template, where)
    if fields != set(expected):
        extra = ", ".join(sorted(fields - set(expected))) or "none"
        missing = ", ".join(sorted(set(expected) - fields)) or "none"
        raise ConfigError(
            f"constant.py: {where} must use exactly the fields {sorted(expected)} "
            f"(unknown: {extra}; missing: {missing})"
        )
    try:
        template.format(**{name: "" for name in expected})
    except (IndexError, KeyError, ValueError, AttributeError) as e:
        raise ConfigError(f"constant.py: {where} does not format: {e!r}") from None


def _check_known(tasks, known, table):
    for task in tasks:
        if task not in known:
            raise ConfigError(f"constant.py: {table} names task {task!r}, which is not in TASK_DESCRIPTION")


def check_constants(module=None):
    """Raise :class:`ConfigError` if the task tables or templates of ``module`` disagree."""
    if module is None:
        import constant as module

    for name in ("TASK_DESCRIPTION", "TASK_GROUPS", "RAG_TASKS", "REWRITE_TASK", "STRUCTURE",
                 "PROMPT_INPUT_FOR_TASK_CLS", "REFORMAT_PROMPTS", "REPLY_FORMATS", "JUDGE_PROMPTS"):
        if not hasattr(module, name):
            raise ConfigError(f"constant.py: {name} is missing")

    known = module.TASK_DESCRIPTION
    if not isinstance(known, dict) or not known:
        raise ConfigError("constant.py: TASK_DESCRIPTION must be a non-empty dict of task name -> description")
    if "default" not in known:
        raise ConfigError("constant.py: TASK_DESCRIPTION must keep the task 'default' (the classifier's fallback)")
    for task, description in known.items():
        if not isinstance(task, str) or not isinstance(description, str):
            raise ConfigError(f"constant.py: TASK_DESCRIPTION entry {task!r} must map a name to a string")

    for group, tasks in module.TASK_GROUPS.items():
        _check_known(tasks, known, f"TASK_GROUPS[{group!r}]")
    _check_known(module.RAG_TASKS, known, "RAG_TASKS")
    _check_known(module.REWRITE_TASK, known, "REWRITE_TASK")
    _check_known(module.STRUCTURE, known, "STRUCTURE")
    for task in module.REWRITE_TASK:
        structure = module.STRUCTURE.get(task)
        if not isinstance(structure, str) or not structure.strip():
            raise ConfigError(f"constant.py: REWRITE_TASK names task {task!r}, which has no STRUCTURE entry")

    check_template(module.PROMPT_INPUT_FOR_TASK_CLS, {"input"}, "PROMPT_INPUT_FOR_TASK_CLS")
    chat = getattr(module, "CHAT_CLASSIFIER_PROMPTS", None)
    if chat is not None:
        try:
            system, user = chat["system"], chat["user"]
        except (KeyError, TypeError):
            raise ConfigError("constant.py: CHAT_CLASSIFIER_PROMPTS needs 'system' and 'user' templates") from None
        check_template(system, {"tasks"}, "CHAT_CLASSIFIER_PROMPTS['system']")
        check_template(user, {"input"}, "CHAT_CLASSIFIER_PROMPTS['user']")
    for mode in ("adaptive", "forced"):
        for variant, fields in REFORMAT_USER_FIELDS.items():
            try:
                prompts = module.REFORMAT_PROMPTS[mode][variant]
                system, user = prompts["system"], prompts["user"]
            except (KeyError, TypeError):
                raise ConfigError(
                    f"constant.py: REFORMAT_PROMPTS[{mode!r}][{variant!r}] needs 'system' and 'user' templates"
                ) from None
            where = f"REFORMAT_PROMPTS[{mode!r}][{variant!r}]"
            check_template(system, set(), f"{where}['system']")
            check_template(user, fields, f"{where}['user']")
    for reply_format in REPLY_FORMAT_NAMES:
        try:
            system, user = module.REPLY_FORMATS[reply_format]["system"], module.REPLY_FORMATS[reply_format]["user"]
        except (KeyError, TypeError):
            raise ConfigError(f"constant.py: REPLY_FORMATS[{reply_format!r}] needs 'system' and 'user' texts") from None
        check_template(system, set(), f"REPLY_FORMATS[{reply_format!r}]['system']")
        check_template(user, set(), f"REPLY_FORMATS[{reply_format!r}]['user']")
    for judge, fields in JUDGE_USER_FIELDS.items():
        try:
            system, user = module.JUDGE_PROMPTS[judge]["system"], module.JUDGE_PROMPTS[judge]["user"]
        except (KeyError, TypeError):
            raise ConfigError(f"constant.py: JUDGE_PROMPTS[{judge!r}] needs 'system' and 'user' templates") from None
        check_template(system, set(), f"JUDGE_PROMPTS[{judge!r}]['system']")
        check_template(user, fields, f"JUDGE_PROMPTS[{judge!r}]['user']")
