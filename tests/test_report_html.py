"""Tests of realign/report_html.py: the record sample (pure), the page's data, and the page as
a user sees it, opened from disk in headless Chromium (skipped where `chromium` is absent)."""

import json
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from realign.report_html import TOKEN_RE, RecordSample, is_flagged, render_page, rewrite_ops


def make_record(record_id, task="open_qa", **fields):
    record = {"id": record_id, "task": task, "question": f"question {record_id}", "original": "an answer",
              "rewrite": "an answer", "tag": "rewrite", "reject_reason": None, "evidence": [], "edit_rate": 0.0,
              "length_before": 2, "length_after": 2, "substantially_rewritten": False, "checks": []}
    record.update(fields)
    return record


def chosen_ids(records, **settings):
    sample = RecordSample(**settings)
    for record in records:
        sample.offer(record)
    return [r["id"] for r in sample.records()], sample


TASKS = ("open_qa", "math_puzzles", "fact_verification")
MANY = [make_record(i, TASKS[i % 3]) for i in range(600)]


# -- the sample ----------------------------------------------------------------------------

def test_sample_is_seeded_and_independent_of_order():
    in_order, _ = chosen_ids(MANY, per_task=5, seed=0)
    shuffled = MANY[:]
    random.Random(1).shuffle(shuffled)
    assert chosen_ids(shuffled, per_task=5, seed=0)[0] == in_order
    assert chosen_ids(reversed(MANY), per_task=5, seed=0)[0] == in_order
    assert set(chosen_ids(MANY, per_task=5, seed=1)[0]) != set(in_order)
    # A random draw, not the first records of each task.
    assert max(in_order) > 100


def test_sample_keeps_per_task_records_and_nests():
    ids, sample = chosen_ids(MANY, per_task=5, seed=0)
    tasks = [MANY[i]["task"] for i in ids]
    assert {t: tasks.count(t) for t in TASKS} == {t: 5 for t in TASKS}
    bigger, _ = chosen_ids(MANY, per_task=12, seed=0)
    assert set(ids) < set(bigger)  # the smallest keys: the sample of 5 is part of the sample of 12
    assert sample.counts()["offered"] == 600 and sample.counts()["shown"] == 15
    few, _ = chosen_ids(MANY[:4], per_task=5, seed=0)
    assert sorted(few) == [0, 1, 2, 3]


def test_flagged_records_are_all_shown_below_the_bound():
    records = [make_record(i, TASKS[i % 3]) for i in range(300)]
    for i in (10, 20, 30):
        records[i]["checks"] = ["loop"]
    for i in (40, 50):
        records[i].update(tag="original", reject_reason="lost_number")
    for i in range(60, 90):
        records[i].update(tag="original", reject_reason="unchanged")  # not flagged
    ids, sample = chosen_ids(records, per_task=2, seed=0, max_flagged=100)
    assert {10, 20, 30, 40, 50} <= set(ids)
    assert len(ids) <= 2 * 3 + 5
    assert [is_flagged(r) for r in records].count(True) == 5
    counts = sample.counts()
    assert (counts["flagged_offered"], counts["flagged_shown"], counts["shown"]) == (5, 5, len(ids))
    assert "plus all 5 flagged records" in sample.note()


def test_flagged_records_above_the_bound_are_a_seeded_sample():
    records = [make_record(i, TASKS[i % 3], checks=["lost_name"] if i % 4 == 0 else []) for i in range(400)]
    ids, sample = chosen_ids(records, per_task=0, seed=0, max_flagged=7)
    assert len(ids) == 7 and all(i % 4 == 0 for i in ids)
    assert chosen_ids(records[::-1], per_task=0, seed=0, max_flagged=7)[0] == ids
    counts = sample.counts()
    assert (counts["offered"], counts["flagged_offered"], counts["flagged_shown"]) == (400, 100, 7)
    assert "7 of the 100 flagged records" in sample.note()
    assert "of 400 evaluated" in sample.note()


def test_kept_texts_are_cut_and_the_offered_record_is_left_alone():
    long_text = "word " * 10_000
    record = make_record(1, original=long_text, rewrite=long_text + "more", evidence=["e" * 30_000, "short"])
    _, sample = chosen_ids([record], per_task=1, max_chars=1_000)
    kept = sample.records()[0]
    assert len(kept["original"]) == len(kept["rewrite"]) == 1_000
    assert kept["evidence"] == ["e" * 1_000, "short"]
    assert kept["cut"] == {"original": 50_000, "rewrite": 50_004, "evidence 1": 30_000}
    assert record["original"] == long_text and "cut" not in record


# -- the page's data -----------------------------------------------------------------------

def rebuild(original, ops):
    tokens = TOKEN_RE.findall(original)
    return "".join(op if isinstance(op, str) else "".join(tokens[op[0]:op[1]]) for op in ops)


def test_rewrite_ops_rebuild_the_rewrite_and_are_small():
    words = [f"w{i}" for i in range(300)]
    original = " ".join(words)
    changed = words[:]
    for i in range(0, 300, 10):
        changed[i] = "NEW"
    rewrite = "**Answer**\n\n" + " ".join(changed)
    ops = rewrite_ops(original, rewrite)
    assert rebuild(original, ops) == rewrite
    assert len(json.dumps(ops)) < len(rewrite) / 2
    tricky = "  lead\tand\u00a0nbsp 😀 emoji\n\nend  "
    ops = rewrite_ops(tricky * 5, (tricky * 5).replace("emoji", "EMOJI 🎉"))
    assert rebuild(tricky * 5, ops) == (tricky * 5).replace("emoji", "EMOJI 🎉")
    assert rewrite_ops("short", "a wholly different text") is None  # plain text is shorter


STATS = {"records": 2, "rewritten": 1, "share_rewritten": 0.5, "changed": 2, "share_changed": 1.0,
         "mean_edit_rate": 0.3, "length_before": {"mean": 10.0, "median": 10.0},
         "length_after": {"mean": 11.0, "median": 11.0}, "length_ratio": 1.1,
         "ratio_distribution": {"records": 2, "undefined": 0, "p5": 1.0, "p25": 1.0, "median": 1.1, "p75": 1.2,
                                "p95": 1.2},
         "tags": {"rewrite": 1, "original": 1}, "reject_reasons": {"lost_number": 1}, "checks": {},
         "failing_checks": 0}
HEADLINE = ("substantially rewritten 40.0% (edit rate > 0.2) of 5; mean length 10.0 -> 11.0 words; changed 80.0%; "
            "checks: 1 rewrites rejected by a check, 0 kept rewrites fail one")
DOCUMENT = {
    "headline": HEADLINE,
    "inputs": {"original_path": "in.json", "rewritten_path": "final.json", "length_unit": "words",
               "rewrite_threshold": 0.2},
    "unpaired": {"only_in_original": 0, "only_in_rewritten": 0},
    "overall": {**STATS, "records": 5},
    "groups": {"Conversation": STATS, "Specialized Educational Dialog": STATS},
    "tasks": {"open_qa": {"group": "Conversation", **STATS},
              "math_puzzles": {"group": "Specialized Educational Dialog", **STATS},
              "fact_verification": {"group": "Conversation", **STATS}},
}
SCRIPT_BREAKER = "</script><b>x</b>"
SHARED = " ".join(f"fact{i} is\tstated here" for i in range(60))
UNICODE_ORIGINAL = "Yes:\u00a0it is true 😀 because " + SHARED
UNICODE_REWRITE = "**Verdict:** True 🎉\n\n" + UNICODE_ORIGINAL.replace("because", "since") + "\n"
RECORDS = [
    make_record(1, "open_qa", original="Paris is the capital.", rewrite="**Paris** is the capital.",
                edit_rate=0.25, substantially_rewritten=True),
    make_record(2, "open_qa", question=f"Why does {SCRIPT_BREAKER} stay text?", original="It is escaped.",
                rewrite="It is escaped, always."),
    make_record(3, "math_puzzles", original="The train leaves at 9 and arrives at 11.",
                rewrite="The train leaves at nine and arrives at eleven.", tag="original",
                reject_reason="lost_number", checks=["lost_number"], edit_rate=0.25, length_before=9,
                length_after=9, substantially_rewritten=True),
    make_record(4, "math_puzzles", original="42", rewrite="42", tag="original", reject_reason="unchanged"),
    make_record("q 6", "fact_verification", original=UNICODE_ORIGINAL, rewrite=UNICODE_REWRITE,
                evidence=["Some evidence."], edit_rate=0.05),
]
SVG = '<?xml version="1.0"?>\n<!DOCTYPE svg>\n<svg xmlns="http://www.w3.org/2000/svg"><text>the charts</text></svg>'


def page_data(page):
    found = re.search(r'<script type="application/json" id="rx-data">(.*?)</script>', page, re.DOTALL)
    return json.loads(found.group(1))


def test_page_data_cannot_end_its_script_and_the_page_fetches_nothing():
    page = render_page(DOCUMENT, RECORDS, "All 5 evaluated records are on this page.", SVG)
    data = page_data(page)
    assert [r["id"] for r in data["records"]] == [1, 2, 3, 4, "q 6"]
    assert SCRIPT_BREAKER in data["records"][1]["question"]
    assert SCRIPT_BREAKER not in page and "<?xml" not in page
    assert "rewrite_ops" in data["records"][4]  # the test below decodes them in the browser
    assert re.search(r"\ssrc=|<link\b|@import|url\(", page) is None


def test_page_stays_within_its_text_budget():
    big = [make_record(i, original="a " * 25_000, rewrite="b " * 25_000) for i in range(10)]
    page = render_page(DOCUMENT, big, "note", max_page_chars=100_000)
    data = page_data(page)
    cut = data["max_chars"]
    assert 4_900 < cut <= 5_000  # 20 long texts and 10 short questions share 100,000 characters
    assert all(len(r["original"]) == len(r["rewrite"]) == cut for r in data["records"])
    assert data["records"][0]["cut"] == {"original": 50_000, "rewrite": 50_000}
    assert f"its texts are cut at {cut:,} characters" in page
    assert len(page) < 200_000  # uncut: 10 records x 2 texts x 20,000 characters


# -- the page in a browser -----------------------------------------------------------------

class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find_all(self, tag=None, **attrs):
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and all(attr_matches(n.attrs.get(k.rstrip("_").replace("_", "-")), v) for k, v in attrs.items())]

    def find(self, tag=None, **attrs):
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]


def attr_matches(value, wanted):
    if wanted is True:
        return value is not None
    return value is not None and (value == wanted or wanted in value.split())


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#root", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, attrs, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(markup):
    builder = TreeBuilder()
    builder.feed(markup)
    return builder.root


def dump_dom(tmp_path, page, fragments):
    """The DOM of ``page`` after its script ran, opened from disk at each ``#fragment``
    (one headless Chromium each, run side by side)."""
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    runs = []
    for n, fragment in enumerate(fragments):
        command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / f'profile{n}'}",
                   "--virtual-time-budget=5000", "--dump-dom", f"{path.as_uri()}#{fragment}"]
        runs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    doms = []
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0 and "<html" in out, err[-2000:]
        doms.append(parse(out))
    return doms


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH (apt-get install chromium)")
def test_page_in_headless_chromium(tmp_path):
    note = "All 5 evaluated records are on this page."
    page = render_page(DOCUMENT, RECORDS, note, SVG)
    opened, by_task = dump_dom(tmp_path, page, ["id=3", "task=fact_verification&id=q%206"])

    # The headline, the sample note and the charts, inline.
    assert opened.find(id="headline").text() == HEADLINE
    assert note in opened.find(id="sample-note").text()
    assert opened.find("svg").text() == "the charts"

    # #id=3 opens the rejected record: its reason, and the word diff of its two texts.
    rows = opened.find_all("tr", class_="row")
    assert [r.attrs["data-id"] for r in rows] == ["1", "2", "3", "4", "q 6"]
    assert not any("hidden" in r.attrs for r in rows)
    assert opened.find(id="rx-status").text().startswith("Showing 5 of the 5 records")
    detail = opened.find(id="rx-detail")
    assert detail.attrs["data-id"] == "3"
    assert detail.find(class_="rx-choice").text() == "original kept; reason: lost_number"
    original, rewrite = detail.find(class_="rx-original"), detail.find(class_="rx-rewrite")
    assert [d.text() for d in original.find_all("del")] == ["9", "11."]
    assert [i.text() for i in rewrite.find_all("ins")] == ["nine", "eleven."]
    assert not original.find_all("ins") and not rewrite.find_all("del")
    assert original.find(class_="diff").text() == "The train leaves at 9 and arrives at 11."
    assert "lost_number" in detail.find(class_="flag").text()

    # A text that would end the script is shown as text, not markup.
    question = opened.find("tr", data_id="2").find(class_="question")
    assert SCRIPT_BREAKER in question.text()
    assert not opened.find_all("b")

    # #task=... hides the records of the other tasks; &id=... opens a record whose id is a string.
    rows = by_task.find_all("tr", class_="row")
    assert {r.attrs["data-id"] for r in rows if "hidden" not in r.attrs} == {"q 6"}
    assert all("hidden" in r.attrs for r in rows if r.attrs["data-task"] != "fact_verification")
    assert by_task.find(id="rx-status").text().startswith("Showing 1 of the 5 records")
    detail = by_task.find(id="rx-detail")
    assert detail.attrs["data-id"] == "q 6"
    # The rewrite stored as edits of the original comes back whole.
    assert detail.find(class_="rx-rewrite").find(class_="diff").text() == UNICODE_REWRITE
    assert detail.find(class_="rx-original").find(class_="diff").text() == UNICODE_ORIGINAL
    assert [i.text() for i in detail.find_all("ins")][:2] == ["**Verdict:** True 🎉", "since"]
