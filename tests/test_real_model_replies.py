"""The checks' decisions on replies a real model wrote.

tests/fixtures/smollm2_replies.json holds replies of SmolLM2-135M-Instruct (served by vLLM on
CPU) to reformat.py's requests on datasets/examples, captured and chosen by
``benchmarks/bench_real_model.py --write_fixture`` (or ``--fixture_from OUT``): for each check
a few replies that fail it, and some that pass every check. Each was read: the rejected ones
lost content, looped, kept the reply protocol or never parsed; the passing ones keep their
original's content. A change to the checks that moves one of these decisions fails here; if
the change is meant, read the reply again and rewrite the fixture with the script.
"""

import json
import os

import pytest

from realign.quality import CHECKS
from reformat import judge_candidate

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "smollm2_replies.json")

with open(FIXTURE, encoding="utf-8") as f:
    CAPTURED = json.load(f)


def label(entry):
    return f"{entry['arm']}-{entry['id']}-{'+'.join(entry['problems']) or 'passes'}"


@pytest.mark.parametrize("entry", CAPTURED["replies"], ids=[label(e) for e in CAPTURED["replies"]])
def test_each_captured_reply_gets_the_decision_it_was_pinned_with(entry):
    record = CAPTURED["records"][str(entry["id"])]
    candidate, problems = judge_candidate(record, entry["reply"], entry["finish_reason"])
    assert problems == entry["problems"]
    if not problems:  # a passing reply is a rewrite reformat.py could keep: text, not protocol
        assert candidate["revised_response"].strip()
        assert "revised_response" not in candidate["revised_response"]


def test_the_fixture_holds_failing_replies_for_every_check_and_passing_ones():
    failed = {name for entry in CAPTURED["replies"] for name in entry["problems"]}
    assert failed == set(CHECKS)  # the small model tripped every check at least once
    assert sum(1 for entry in CAPTURED["replies"] if not entry["problems"]) >= 5
