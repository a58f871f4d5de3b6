"""The evaluation as one self-contained HTML page: figures, charts and the records themselves.

evaluate.py measures every record; this module turns its document (the figures of
--output_path, without "records"), its chart (an SVG string) and a bounded sample of
records into one page that opens from disk with no network: no CDN, no external font,
script or image. The page shows the headline, the tables per task and per group, the
charts, and the records: question, task, the task's format (constant.STRUCTURE), the
original and the rewrite side by side with a word-level diff, the evidence, the filter's
choice and reason, the edit rate and the length ratio; with filters by task, by choice,
by reason and by failed quality check, and a text search.

Use (what evaluate.py does):
    sample = RecordSample(per_task=20, seed=0, max_flagged=1000)
    for record in records:  # every evaluated record, streamed
        sample.offer(record)
    page = render_page(document, sample.records(), sample.note(), figure_svg(figure))

Address of a view (the part after "#", ``&``-separated, values URL-encoded):
    report.html#id=155                      opens record 155
    report.html#task=open_qa&choice=original  the records of open_qa whose original was kept
    keys: id, task, choice (rewrite | original | none), reason, check (a check name or
    "any"), q (text search, case-insensitive).

The records on the page are a sample, so the page stays small at a million records: the
``per_task`` records of each task with the smallest seeded key (blake2b of the JSON of
``[seed, id]``, evaluate.py's key, so the sample does not depend on the order of the
files), plus the flagged records (a quality check failed, or the filter rejected the
rewrite for a reason other than "unchanged"), up to ``max_flagged`` of them by the same
key. Texts are cut at ``max_chars`` characters, and the page says so.
"""

import difflib
import html
import json
import re

import constant
from realign.metrics import Sampler, plural, sample_key
from realign.quality import CHECKS, TEXT_CHECKS

__all__ = ["MAX_PAGE_CHARS", "MAX_TEXT_CHARS", "RecordSample", "figure_svg", "is_flagged", "render_page", "sample_key"]

PER_TASK = 20  # records of each task on the page
MAX_FLAGGED = 1000  # flagged records on the page, beyond the per-task sample
MAX_TEXT_CHARS = 20_000  # each text is cut here: a looping rewrite may run to megabytes
MAX_PAGE_CHARS = 8_000_000  # the texts of all records on a page together (then cut shorter)
DELTA_MAX_TOKENS = 2_000  # longer texts are stored whole: the token diff grows as their product
UNCHANGED = "unchanged"  # the filter's reason when the model returned the original: not flagged
TEXT_FIELDS = ("question", "original", "rewrite")
SNIPPET_CHARS = 160  # the question's start, in the list of records

TOKEN_RE = re.compile(r"^[ \t\n\r\f\v]+|[^ \t\n\r\f\v]+[ \t\n\r\f\v]*")  # the script's TOKEN_RE
SCRIPT_BREAK_RE = re.compile(r"<(?=[/!])")  # "</script", "<!--": what could end or confuse a script element
SVG_START_RE = re.compile(r"<svg[\s>]")


# -- choosing the records ------------------------------------------------------------------

def is_flagged(record):
    """Whether a record needs a look: a quality check failed, or the filter rejected the
    rewrite for a reason other than "unchanged"."""
    return bool(record.get("checks")) or record.get("reject_reason") not in (None, UNCHANGED)


def cut_record(record, max_chars=MAX_TEXT_CHARS):
    """A copy of ``record`` whose texts (question, original, rewrite, each evidence) are at
    most ``max_chars`` long; ``"cut"`` maps each cut field to its full length (characters)."""
    kept = dict(record)
    cut = dict(record.get("cut") or {})
    for field in TEXT_FIELDS:
        text = record.get(field)
        if isinstance(text, str) and len(text) > max_chars:
            kept[field] = text[:max_chars]
            cut[field] = len(text)
    evidence = list(record.get("evidence") or ())
    for i, text in enumerate(evidence):
        if isinstance(text, str) and len(text) > max_chars:
            evidence[i] = text[:max_chars]
            cut[f"evidence {i + 1}"] = len(text)
    kept["evidence"] = evidence
    if cut:
        kept["cut"] = cut
    return kept


class RecordSample:
    """The records that go on the page, chosen while streaming over all of them.

    Keeps, per task, the ``per_task`` records with the smallest :func:`sample_key`, and,
    of the flagged records (:func:`is_flagged`), the ``max_flagged`` with the smallest
    key: a heap each, so memory holds at most ``per_task`` x tasks + ``max_flagged``
    records (texts cut at ``max_chars``) and the choice depends on the ids and the seed,
    not on the order of the records.
    """

    def __init__(self, per_task=PER_TASK, seed=0, max_flagged=MAX_FLAGGED, max_chars=MAX_TEXT_CHARS):
        self.per_task, self.seed, self.max_flagged, self.max_chars = per_task, seed, max_flagged, max_chars
        self.offered = 0
        self.flagged_offered = 0
        self._by_task = {}  # task -> Sampler of per_task records
        self._flagged = Sampler(max_flagged, seed)

    def offer(self, record):
        """Consider one record: a dict with "id", "task", "question", "original", "rewrite"
        (the model's rewrite, as the merged file holds it, even when the filter kept the
        original), "tag", "reject_reason", "evidence", "edit_rate", "length_before",
        "length_after", "substantially_rewritten" and "checks" (what the rewrite fails)."""
        self.offered += 1
        key = sample_key(self.seed, record["id"])
        cut = []

        def kept():  # the cut copy, made at most once per record
            if not cut:
                cut.append(cut_record(record, self.max_chars))
            return cut[0]

        sampler = self._by_task.get(record["task"])
        if sampler is None:
            sampler = self._by_task[record["task"]] = Sampler(self.per_task, self.seed)
        sampler.offer_key(key, kept)
        if is_flagged(record):
            self.flagged_offered += 1
            self._flagged.offer_key(key, kept)

    def records(self):
        """The chosen records, each once: by task, then by key."""
        chosen = {}
        for sampler in (*self._by_task.values(), self._flagged):
            for key, record in sampler.keyed_items():
                chosen.setdefault(key, record)
        ordered = sorted(chosen.items(), key=lambda item: (str(item[1]["task"]), item[0]))
        return [record for _, record in ordered]

    def counts(self):
        """``{"offered", "shown", "tasks", "flagged_offered", "flagged_shown"}`` and the settings."""
        records = self.records()
        return {"offered": self.offered, "shown": len(records), "tasks": len(self._by_task),
                "flagged_offered": self.flagged_offered, "flagged_shown": sum(map(is_flagged, records)),
                "per_task": self.per_task, "seed": self.seed, "max_flagged": self.max_flagged,
                "max_chars": self.max_chars}

    def note(self):
        """The page's sentence on what it shows, e.g. "20 records per task (seed 0) of
        1,000,000 evaluated, plus 1,000 of the 5,321 flagged records ..."."""
        c = self.counts()
        if c["shown"] == c["offered"]:
            head = f"All {c['offered']:,} evaluated records are on this page"
        else:
            if not c["flagged_offered"]:
                flagged = "no record is flagged"
            elif c["flagged_offered"] <= c["max_flagged"]:
                flagged = f"plus all {c['flagged_offered']:,} flagged records"
            else:
                flagged = (f"plus {c['max_flagged']:,} of the {c['flagged_offered']:,} flagged records "
                           f"(chosen by the same seed)")
            head = (f"On this page: {c['per_task']:,} {plural(c['per_task'], 'record')} per task "
                    f"(seed {c['seed']}) of {c['offered']:,} evaluated, {flagged}; {c['shown']:,} records in all")
        return (f"{head}; {c['flagged_shown']:,} of them flagged (a quality check failed, or the filter "
                f"rejected the rewrite for a reason other than \"{UNCHANGED}\"). The figures and charts cover "
                f"all {c['offered']:,} records. Texts longer than {c['max_chars']:,} characters are cut.")


# -- the page ------------------------------------------------------------------------------

def figure_svg(figure):
    """A matplotlib Figure as an SVG string for :func:`render_page`: text stays text (no
    glyph paths: smaller, selectable), no date (the same figure gives the same bytes)."""
    import io

    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "realign"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def inline_svg(svg):
    """``svg`` from its ``<svg`` element on (an XML prolog and doctype do not belong in HTML)."""
    found = SVG_START_RE.search(svg)
    return svg[found.start():] if found else ""


def script_json(value):
    """JSON for a ``<script type="application/json">`` element: no text in it can end the
    element or open a comment ("</" and "<!" are written "\\u003c/", "\\u003c!")."""
    return SCRIPT_BREAK_RE.sub(r"\\u003c", json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def esc(value):
    return html.escape(str(value), quote=True)


def percent(share):
    return "n/a" if share is None else f"{100 * share:.1f}%"


def number(value, digits=1):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def counts_text(counter):
    return ", ".join(f"{name} {n:,}" for name, n in counter.items()) or "none"


def task_href(task):
    from urllib.parse import quote

    return "#task=" + quote(str(task), safe="")


def table(header, rows, css_class="figures"):
    """An HTML table; every cell is escaped text unless given as ``("html", markup)``."""
    def cell(value, tag):
        if isinstance(value, tuple) and value[0] == "html":
            return f"<{tag}>{value[1]}</{tag}>"
        return f"<{tag}>{esc(value)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "\n".join("<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def figure_cells(stats):
    """The cells shared by the overall, group and task rows."""
    tags = stats.get("tags", {})
    others = {t: n for t, n in tags.items() if t not in ("rewrite", "original")}
    choice = f"{tags.get('rewrite', 0):,} / {tags.get('original', 0):,}"
    if others:
        choice += " (" + counts_text(others) + ")"
    return [
        f"{stats['records']:,}",
        f"{stats['rewritten']:,} ({percent(stats['share_rewritten'])})",
        percent(stats["share_changed"]),
        f"{number(stats['length_before']['mean'])} → {number(stats['length_after']['mean'])}",
        number(stats["length_ratio"], 2),
        choice,
        counts_text(stats.get("reject_reasons", {})),
        counts_text(stats.get("checks", {})),
    ]


def figure_header(threshold, unit):
    return ["records", f"substantially rewritten (edit rate > {threshold:g})", "changed at all",
            f"mean length ({unit}) before → after", "length ratio", "filter: rewrite kept / original kept",
            "reject reasons", "quality checks failed by kept responses"]


def checks_rows(document):
    """Per check: candidates failing it (reformat), rewrites the filter rejected for it, kept
    responses failing it (evaluate.py's checks table)."""
    candidates = document.get("candidate_checks")
    overall = document["overall"]
    names = TEXT_CHECKS if candidates is None else CHECKS
    return [[name, f"{candidates['problems'].get(name, 0):,}" if candidates else "n/a",
             f"{overall['reject_reasons'].get(name, 0):,}", f"{overall['checks'].get(name, 0):,}"]
            for name in names]


def judges_html(judges):
    parts = []
    f = judges.get("factuality")
    if f:
        parts.append(f"<p>Factuality (judge {esc(f.get('model'))}, 1-10 against the reference): "
                     f"original {esc(number(f.get('mean_original'), 2))}, rewrite "
                     f"{esc(number(f.get('mean_rewrite'), 2))}, mean difference "
                     f"{esc(number(f.get('mean_difference'), 2))}, {f.get('scored', 0):,} record(s) scored.</p>")
    r = judges.get("readability")
    if r:
        parts.append(f"<p>Readability (judge {esc(r.get('model'))}, rewrite vs original, both orders): win "
                     f"{esc(percent(r.get('win_share')))}, tie {esc(percent(r.get('tie_share')))}, loss "
                     f"{esc(percent(r.get('loss_share')))} of {r.get('counted', 0):,} pair(s); consistent "
                     f"{esc(percent(r.get('consistent_share')))}.</p>")
    return "\n".join(parts)


def rewrite_ops(original, rewrite):
    """The rewrite as edits of the original, when that is shorter: a list whose items are
    ``[i, j]`` (the original's tokens i to j-1) or a string (new text); None otherwise.

    A token is a run of non-whitespace with the whitespace after it (ASCII whitespace only,
    so the page's script splits the original into the very same tokens). Most rewrites
    change the format and keep most words, so this about halves the page.
    """
    a, b = TOKEN_RE.findall(original), TOKEN_RE.findall(rewrite)
    if not a or len(a) > DELTA_MAX_TOKENS or len(b) > DELTA_MAX_TOKENS:
        return None
    ops = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes():
        if tag == "equal":
            ops.append([i1, i2])
        elif j2 > j1:
            ops.append("".join(b[j1:j2]))
    if "".join(op if isinstance(op, str) else "".join(a[op[0]:op[1]]) for op in ops) != rewrite:
        return None  # cannot happen (the opcodes cover both lists); the plain text is always right
    return ops if len(json.dumps(ops, ensure_ascii=False)) < len(rewrite) else None


def fitting_cut(lengths, budget, max_chars):
    """The largest cut (at most ``max_chars``) at which texts of these lengths total at most
    ``budget`` characters."""
    low, high = 0, max_chars
    while low < high:
        middle = (low + high + 1) // 2
        if sum(min(n, middle) for n in lengths) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def text_lengths(record):
    texts = [record.get(f) for f in TEXT_FIELDS] + list(record.get("evidence") or ())
    return [len(t) for t in texts if isinstance(t, str)]


def page_record(record, max_chars):
    """What the page's script needs of one record, texts cut at ``max_chars``. The rewrite is
    null when it equals the original, else plain text ("rewrite") or edits of the original
    ("rewrite_ops", see :func:`rewrite_ops`)."""
    record = cut_record(record, max_chars)
    original = record.get("original") or ""
    rewrite = record.get("rewrite")
    same = rewrite is None or (rewrite == original and "rewrite" not in record.get("cut", {}))
    ops = None if same else rewrite_ops(original, rewrite)
    entry = {
        "id": record["id"], "task": record.get("task"), "question": record.get("question") or "",
        "original": original, "rewrite": None if same or ops else rewrite,
        "tag": record.get("tag"), "reason": record.get("reject_reason"),
        "evidence": [e for e in record.get("evidence") or () if isinstance(e, str)],
        "edit_rate": record.get("edit_rate"), "before": record.get("length_before"),
        "after": record.get("length_after"), "rewritten": bool(record.get("substantially_rewritten")),
        "checks": list(record.get("checks") or ()), "cut": record.get("cut") or {},
        "note": record.get("reformat_reason"),
    }
    if ops:
        entry["rewrite_ops"] = ops
    return entry


def render_page(document, records, sample_note, charts_svg=None, max_chars=MAX_TEXT_CHARS,
                max_page_chars=MAX_PAGE_CHARS):
    """The whole HTML page (a str): ``document`` is evaluate.py's JSON document without
    "records"; ``records`` the records to show (e.g. :meth:`RecordSample.records`);
    ``sample_note`` the sentence saying which records those are; ``charts_svg`` the charts
    as an SVG string (:func:`figure_svg`), inlined. Each text is cut at ``max_chars``, and
    shorter when the records' texts would exceed ``max_page_chars`` characters in all."""
    inputs, overall = document["inputs"], document["overall"]
    threshold, unit = inputs["rewrite_threshold"], inputs["length_unit"]
    lengths = [n for r in records for n in text_lengths(r)]
    cut_at = max_chars if sum(min(n, max_chars) for n in lengths) <= max_page_chars \
        else fitting_cut(lengths, max_page_chars, max_chars)
    shown = [page_record(r, cut_at) for r in records]
    on_page = {}
    for r in shown:
        on_page[r["task"]] = on_page.get(r["task"], 0) + 1
    tasks = document.get("tasks", {})
    data = {
        "threshold": threshold, "unit": unit, "max_chars": cut_at, "snippet": SNIPPET_CHARS,
        "evaluated": overall["records"],
        "groups": {t: s.get("group") for t, s in tasks.items()},
        "formats": {t: constant.STRUCTURE.get(t) for t in sorted({str(r["task"]) for r in shown})},
        "task_order": list(tasks),
        "records": shown,
    }
    header = figure_header(threshold, unit)
    task_rows = [[("html", "<strong>all tasks</strong>"), "", *figure_cells(overall), f"{len(shown):,}"]]
    for task, stats in tasks.items():
        count = on_page.get(task, 0)
        link = ("html", f'<a href="{esc(task_href(task))}">{count:,}</a>') if count else "0"
        task_rows.append([task, stats.get("group", ""), *figure_cells(stats), link])
    group_rows = [[group, *figure_cells(stats)] for group, stats in document.get("groups", {}).items()]
    unpaired = document.get("unpaired") or {}
    left_out = ""
    if unpaired.get("only_in_original") or unpaired.get("only_in_rewritten"):
        left_out = (f"<p>Left out (--allow_unpaired): {unpaired.get('only_in_original', 0):,} record(s) only in "
                    f"the originals, {unpaired.get('only_in_rewritten', 0):,} only in the rewrites.</p>")
    candidates = document.get("candidate_checks")
    candidates_note = (f"Candidates: {candidates['candidates']:,} from reformat's batch files, "
                       f"{candidates['failing']:,} failing at least one check; {candidates['kept_original']:,} "
                       "record(s) kept the original because none passed." if candidates
                       else "Candidates: not counted (evaluate.py --rewrite_directory counts them).")
    page_cut = (f" To keep this page small, its texts are cut at {cut_at:,} characters (each record says what was "
                "cut)." if cut_at < max_chars else "")
    charts = (f'<figure class="charts">{inline_svg(charts_svg)}</figure>' if charts_svg
              else "<p>(No charts were passed to this page.)</p>")
    body = f"""<h1>ReAlign evaluation</h1>
<p id="headline"><strong>{esc(document["headline"])}</strong></p>
<nav><a href="#terms">terms</a><a href="#sample-note">which records</a><a href="#charts">charts</a>
<a href="#by-task">by task</a><a href="#checks">quality checks</a><a href="#records">records</a></nav>
<p class="inputs">Originals <code>{esc(inputs.get("original_path"))}</code>, rewrites
<code>{esc(inputs.get("rewritten_path"))}</code>, paired by id; lengths in {esc(unit)}.</p>
{left_out}
<section id="terms">
<h2>Two different things</h2>
<dl>
<dt>Substantially rewritten (the paper's measure)</dt>
<dd>The word-level edit distance between the original response and the rewrite, divided by the longer
word count, is above {threshold:g}. It says how much the model changed the text, not whether the change
was kept.</dd>
<dt>The filter's choice: rewrite kept / original kept</dt>
<dd>What rewrite_data_selection.py put in the final data: the rewrite, or the original with the reason
(the rule) that rejected the rewrite. "unchanged" means the model returned the original.</dd>
<dt>Quality checks</dt>
<dd>What a rewrite lost or broke (realign/quality.py): {esc(", ".join(TEXT_CHECKS))}.</dd>
</dl>
<p>A record can be substantially rewritten and have its original kept, or changed a little and have its
rewrite kept.</p>
</section>
<p id="sample-note" class="note">{esc(sample_note)}{esc(page_cut)}</p>
<h2 id="charts">Charts</h2>
{charts}
<h2 id="by-task">By task</h2>
{table(["task", "group", *header, "records on this page"], task_rows)}
<h2>By task group</h2>
{table(["group", *header], group_rows)}
<h2 id="checks">Quality checks</h2>
<p>{esc(candidates_note)}</p>
{table(["check", "candidates failing", "rewrites rejected (original kept)", "kept responses failing"],
       checks_rows(document))}
{"<h2>Judges</h2>" + judges_html(document["judges"]) if document.get("judges") else ""}
<h2 id="records">Records</h2>
<p class="note">{esc(sample_note)}{esc(page_cut)}</p>
<p>In the diff, <del>struck-through red words</del> are in the original only, <ins>green words</ins> in the
rewrite only. Open a record by its id; the address (e.g. <code>#id=155</code>, <code>#task=open_qa&amp;choice=original</code>)
opens the same view again.</p>
<form id="rx-filters" onsubmit="return false">
<label>task <select id="rx-task" data-facet="task"></select></label>
<label>filter's choice <select id="rx-choice" data-facet="choice"></select></label>
<label>reject reason <select id="rx-reason" data-facet="reason"></select></label>
<label>quality check <select id="rx-check" data-facet="check"></select></label>
<label>search <input id="rx-q" type="search" placeholder="words in the question or texts"></label>
</form>
<p id="rx-status" class="status"></p>
<p id="rx-missing" class="status" hidden></p>
<noscript><p>The list of records needs JavaScript; the figures above do not.</p></noscript>
<table id="rx-list" class="records"><thead><tr><th>id</th><th>task</th><th>filter's choice</th>
<th>reject reason</th><th>checks failed</th><th>edit rate</th><th>length ({esc(unit)}) before → after</th>
<th>question</th></tr></thead><tbody></tbody></table>
"""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ReAlign evaluation</title>
<style>{CSS}</style>
</head>
<body>
{body}
<script type="application/json" id="rx-data">{script_json(data)}</script>
<script>{SCRIPT}</script>
</body>
</html>
"""


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h4 { margin: .8em 0 .3em; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; }
.note { background: #f4f4f0; padding: .5em .8em; border-left: 3px solid #999; }
dt { font-weight: bold; } dd { margin: 0 0 .5em 1.5em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; } dl.facts dd { margin: 0; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
thead th { background: #f0f0f0; position: sticky; top: 0; }
table.figures td { white-space: nowrap; }
figure.charts { margin: 0; } figure.charts svg { max-width: 100%; height: auto; }
#rx-filters label { margin-right: 1em; white-space: nowrap; }
#rx-filters select, #rx-filters input { max-width: 22em; }
.status { font-weight: bold; }
table.records { table-layout: fixed; width: 100%; }  /* widths from the header: no pass over 2,000 rows */
table.records th:nth-child(1) { width: 6em; } table.records th:nth-child(2) { width: 16em; }
table.records th:nth-child(3), table.records th:nth-child(4), table.records th:nth-child(5) { width: 8em; }
table.records th:nth-child(6) { width: 10em; } table.records th:nth-child(7) { width: 10em; }
table.records td { overflow-wrap: anywhere; }
table.records tr.row { cursor: pointer; } table.records tr.row:hover { background: #f7f7ff; }
table.records tr.open { background: #eef; }
table.records td.question { max-width: 40em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.record { padding: .5em; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, Menlo, Consolas, monospace;
        font-size: 13px; background: #fafafa; border: 1px solid #e4e4e4; padding: .5em; max-height: 40em;
        overflow: auto; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
@media (max-width: 900px) { .columns { grid-template-columns: 1fr; } }
del { color: #b00; background: #fde8e8; text-decoration: line-through; }
ins { color: #060; background: #e3f6e3; text-decoration: none; }
.flag { color: #b00; font-weight: bold; }
"""

# The page's script: builds the list, the filters and the diff from the JSON above. Every
# text of a record is set with textContent, never parsed as HTML.
SCRIPT = r"""
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("rx-data").textContent);
  const RECORDS = DATA.records;
  const MAX_D = 2000;  // edit steps beyond which the word diff gives up (memory grows as its square)
  const CHOICES = {rewrite: "rewrite kept", original: "original kept", none: "no choice (not tagged)"};
  const FACETS = ["task", "choice", "reason", "check"];
  const KEYS = ["task", "choice", "reason", "check", "q", "id"];
  const state = {task: "", choice: "", reason: "", check: "", q: "", id: ""};
  const fmt = (n) => Number(n).toLocaleString("en-US");
  const TOKEN_RE = /^[ \t\n\r\f\v]+|[^ \t\n\r\f\v]+[ \t\n\r\f\v]*/g;  // report_html.TOKEN_RE
  const isSame = (r) => r.rewrite == null && !r.rewrite_ops;
  function rewriteOf(r) {
    if (r._rewrite === undefined) {
      if (r.rewrite_ops) {
        const tokens = r.original.match(TOKEN_RE) || [];
        r._rewrite = r.rewrite_ops.map((op) => typeof op === "string" ? op : tokens.slice(op[0], op[1]).join("")).join("");
      } else {
        r._rewrite = r.rewrite == null ? r.original : r.rewrite;
      }
    }
    return r._rewrite;
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const child of [].concat(children === undefined ? [] : children)) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }
  const choiceOf = (r) => (r.tag === "rewrite" || r.tag === "original") ? r.tag : "none";
  const reasonOf = (r) => r.reason == null ? "(none)" : r.reason;
  function values(r, facet) {
    if (facet === "task") return [String(r.task)];
    if (facet === "choice") return [choiceOf(r)];
    if (facet === "reason") return [reasonOf(r)];
    return r.checks.length ? ["any"].concat(r.checks) : ["(none)"];
  }
  const passes = (r, facet) => !state[facet] || values(r, facet).includes(state[facet]);
  function hay(r) {
    if (r._hay === undefined) {
      r._hay = [String(r.id), r.question, r.original, rewriteOf(r)].concat(r.evidence).join("\n").toLowerCase();
    }
    return r._hay;
  }

  // -- the address: #key=value&key=value ---------------------------------------------------
  // A plain anchor (#records) only scrolls; a view is key=value pairs.
  const isView = () => !location.hash || location.hash.includes("=");
  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    for (const key of KEYS) state[key] = params.get(key) || "";
  }
  function hashOf(s) {
    const parts = [];
    for (const key of KEYS) if (s[key]) parts.push(key + "=" + encodeURIComponent(s[key]));
    return "#" + parts.join("&");
  }

  // -- the controls ------------------------------------------------------------------------
  const ORDER = {task: DATA.task_order};
  const LABELS = {choice: (v) => CHOICES[v], check: (v) => v === "any" ? "any check failed" : v === "(none)" ? "no check failed" : v,
                  reason: (v) => v === "(none)" ? "no reason" : v};
  const options = {};
  for (const facet of FACETS) {
    const seen = new Set();
    for (const r of RECORDS) for (const v of values(r, facet)) seen.add(v);
    const order = ORDER[facet] || [];
    options[facet] = [...seen].sort((a, b) => {
      const ia = order.indexOf(a), ib = order.indexOf(b);
      return (ia < 0) - (ib < 0) || ia - ib || (a === "any" ? -1 : b === "any" ? 1 : a < b ? -1 : a > b ? 1 : 0);
    });
  }
  const select = (facet) => document.getElementById("rx-" + facet);
  for (const facet of FACETS) {
    select(facet).addEventListener("change", () => { state[facet] = select(facet).value; writeHash(); update(); });
  }
  const search = document.getElementById("rx-q");
  search.addEventListener("input", () => { state.q = search.value; writeHash(); update(); });
  function writeHash() {
    history.replaceState(null, "", hashOf(state));
  }

  // -- the list ----------------------------------------------------------------------------
  const tbody = document.querySelector("#rx-list tbody");
  const rows = new Map();
  const byId = new Map();
  for (const r of RECORDS) {
    const id = String(r.id);
    byId.set(id, r);
    const ratio = r.before ? (r.after / r.before).toFixed(2) : "n/a";
    const link = el("a", {href: hashOf({id: id})}, id);
    link.addEventListener("click", (event) => {
      event.preventDefault();
      const next = Object.assign({}, state, {id: state.id === id ? "" : id});
      history.pushState(null, "", hashOf(next));
      apply();
    });
    const row = el("tr", {"class": "row", "data-id": id, "data-task": String(r.task)}, [
      el("td", {}, link), el("td", {}, String(r.task)), el("td", {"class": "choice"}, CHOICES[choiceOf(r)]),
      el("td", {"class": "reason"}, r.reason == null ? "" : r.reason),
      el("td", {"class": r.checks.length ? "flag" : ""}, r.checks.join(", ")),
      el("td", {}, r.edit_rate == null ? "n/a" : r.edit_rate.toFixed(2) + (r.rewritten ? " (substantially)" : "")),
      el("td", {}, fmt(r.before) + " → " + fmt(r.after) + " (×" + ratio + ")"),
      el("td", {"class": "question"}, r.question.slice(0, DATA.snippet)),
    ]);
    row.addEventListener("click", (event) => { if (event.target === row || event.target.tagName === "TD") link.click(); });
    rows.set(id, row);
    tbody.append(row);
  }

  function update() {
    const q = state.q.toLowerCase();
    const found = q ? RECORDS.filter((r) => hay(r).includes(q)) : RECORDS;
    for (const facet of FACETS) {
      const base = found.filter((r) => FACETS.every((f) => f === facet || passes(r, f)));
      const tally = new Map();
      for (const r of base) for (const v of values(r, facet)) tally.set(v, (tally.get(v) || 0) + 1);
      const node = select(facet);
      const label = LABELS[facet] || ((v) => v);
      node.replaceChildren(el("option", {value: ""}, "all (" + fmt(base.length) + ")"));
      const present = options[facet].slice();
      if (state[facet] && !present.includes(state[facet])) present.push(state[facet]);
      for (const v of present) node.append(el("option", {value: v}, label(v) + " (" + fmt(tally.get(v) || 0) + ")"));
      node.value = state[facet];
    }
    if (search.value !== state.q) search.value = state.q;
    let visible = 0;
    const shown = new Set(found.filter((r) => FACETS.every((f) => passes(r, f))).map((r) => String(r.id)));
    for (const [id, row] of rows) {
      row.hidden = !shown.has(id);
      visible += !row.hidden;
    }
    document.getElementById("rx-status").textContent =
      "Showing " + fmt(visible) + " of the " + fmt(RECORDS.length) + " records on this page (" +
      fmt(DATA.evaluated) + " evaluated; see the note above).";
  }

  // -- one record --------------------------------------------------------------------------
  function words(text) {
    const parts = text.split(/(\s+)/);
    const list = [], gaps = [];
    let gap = "";
    parts.forEach((part, i) => {
      if (i % 2) gap += part;
      else if (part !== "") { gaps.push(gap); list.push(part); gap = ""; }
    });
    return {list: list, gaps: gaps, tail: gap};
  }

  // Myers' O(ND) diff of two word lists: which words of a are deleted, which of b inserted.
  // Returns null when the lists need more than MAX_D edits.
  function diff(a, b) {
    const deleted = new Uint8Array(a.length), inserted = new Uint8Array(b.length);
    let start = 0;
    while (start < a.length && start < b.length && a[start] === b[start]) start++;
    let endA = a.length, endB = b.length;
    while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) { endA--; endB--; }
    const n = endA - start, m = endB - start;
    const A = (i) => a[start + i], B = (j) => b[start + j];
    if (n === 0 || m === 0) {
      deleted.fill(1, start, endA); inserted.fill(1, start, endB);
      return {deleted: deleted, inserted: inserted};
    }
    const max = Math.min(n + m, MAX_D), off = max + 1;
    const v = new Int32Array(2 * max + 3);
    const trace = [];
    let D = -1;
    for (let d = 0; d <= max && D < 0; d++) {
      trace.push(v.slice(off - d, off + d + 1));
      for (let k = -d; k <= d; k += 2) {
        let x = (k === -d || (k !== d && v[off + k - 1] < v[off + k + 1])) ? v[off + k + 1] : v[off + k - 1] + 1;
        let y = x - k;
        while (x < n && y < m && A(x) === B(y)) { x++; y++; }
        v[off + k] = x;
        if (x >= n && y >= m) { D = d; break; }
      }
    }
    if (D < 0) return null;
    let x = n, y = m;
    for (let d = D; d > 0; d--) {
      const prev = trace[d], k = x - y;
      const at = (kk) => prev[kk + d];
      const down = k === -d || (k !== d && at(k - 1) < at(k + 1));
      const prevK = down ? k + 1 : k - 1;
      const prevX = at(prevK), prevY = prevX - prevK;
      while (x > prevX && y > prevY) { x--; y--; }
      if (down) inserted[start + prevY] = 1; else deleted[start + prevX] = 1;
      x = prevX; y = prevY;
    }
    return {deleted: deleted, inserted: inserted};
  }

  // The text with its marked words in <del>/<ins> (runs of marked words in one element).
  function marked(split, marks, tag) {
    const box = el("div", {"class": "text diff"});
    let run = null;
    split.list.forEach((word, i) => {
      if (marks[i] && run && marks[i - 1]) { run.append(split.gaps[i] + word); return; }
      box.append(split.gaps[i]);
      if (marks[i]) { run = el(tag, {}, word); box.append(run); } else { run = null; box.append(word); }
    });
    box.append(split.tail);
    return box;
  }

  function field(label, value) {
    return [el("dt", {}, label), el("dd", {}, value)];
  }

  function detail(r) {
    const box = el("div", {"class": "record", id: "rx-record"});
    const group = DATA.groups[r.task];
    box.append(el("h3", {}, "Record " + String(r.id) + " · " + String(r.task) + (group ? " (" + group + ")" : "")));
    const choice = choiceOf(r) === "original" && r.reason != null
      ? "original kept; reason: " + r.reason : CHOICES[choiceOf(r)];
    const rate = r.edit_rate == null ? "n/a" : r.edit_rate.toFixed(4);
    const ratio = r.before ? (r.after / r.before).toFixed(2) : "n/a";
    box.append(el("dl", {"class": "facts"}, [].concat(
      field("filter's choice", el("span", {"class": "rx-choice"}, choice)),
      field("substantially rewritten", (r.rewritten ? "yes" : "no") + " (edit rate " + rate +
            (r.rewritten ? " > " : " ≤ ") + DATA.threshold + ")"),
      field("length (" + DATA.unit + ")", fmt(r.before) + " → " + fmt(r.after) + " (ratio " + ratio + ")"),
      field("quality checks the rewrite fails", el("span", {"class": r.checks.length ? "flag" : ""},
            r.checks.length ? r.checks.join(", ") : "none")))));
    box.append(el("h4", {}, "Question"), el("div", {"class": "text"}, r.question));
    const format = DATA.formats[String(r.task)];
    box.append(el("h4", {}, "The task's format (constant.STRUCTURE)"),
               el("div", {"class": "text"}, format || "none: reformat.py does not rewrite this task"));
    if (r.evidence.length) {
      box.append(el("h4", {}, "Evidence"), el("ol", {}, r.evidence.map((e) => el("li", {}, el("div", {"class": "text"}, e)))));
    }
    const original = words(r.original);
    const rewrite = words(rewriteOf(r));
    let result = isSame(r) ? {deleted: new Uint8Array(original.list.length), inserted: new Uint8Array(rewrite.list.length)}
      : diff(original.list, rewrite.list);
    const notes = [];
    if (r.note) {
      notes.push("reformat.py " + r.note + ". The replies it did not use are in the rewrite folder's " +
                 "*_unused_replies.jsonl files.");
    } else if (isSame(r)) {
      notes.push(choiceOf(r) === "original" && r.reason !== "unchanged" && r.reason != null
        ? "The rewrite the filter rejected is not in this page's data: it was given the final text, which is the original."
        : "The rewrite is the original, word for word.");
    }
    if (result === null) {
      notes.push("The texts differ in more than " + fmt(MAX_D) + " words: the word diff is not shown.");
      result = {deleted: new Uint8Array(original.list.length), inserted: new Uint8Array(rewrite.list.length)};
    }
    for (const [name, full] of Object.entries(r.cut)) {
      notes.push(name + " cut at " + fmt(DATA.max_chars) + " of its " + fmt(full) + " characters.");
    }
    const rewriteLabel = choiceOf(r) === "original"
      ? "Rewrite (as the model wrote it; the filter kept the original)" : "Rewrite (as the model wrote it)";
    box.append(el("div", {"class": "columns"}, [
      el("div", {"class": "rx-original"}, [el("h4", {}, "Original"), marked(original, result.deleted, "del")]),
      el("div", {"class": "rx-rewrite"}, [el("h4", {}, rewriteLabel), marked(rewrite, result.inserted, "ins")]),
    ]));
    for (const note of notes) box.append(el("p", {"class": "note"}, note));
    return box;
  }

  function openRecord() {
    const old = document.getElementById("rx-detail");
    if (old) old.remove();
    for (const row of document.querySelectorAll("tr.open")) row.classList.remove("open");
    const missing = document.getElementById("rx-missing");
    missing.hidden = true;
    if (!state.id) return;
    const r = byId.get(state.id);
    if (!r) {
      missing.textContent = "Record " + state.id + " is not on this page (the page shows a sample; see the note above).";
      missing.hidden = false;
      return;
    }
    const row = rows.get(state.id);
    row.classList.add("open");
    const cell = el("td", {colspan: "8"}, detail(r));
    const line = el("tr", {id: "rx-detail", "class": "detail", "data-id": state.id}, cell);
    row.after(line);
    line.scrollIntoView({block: "start"});
  }

  function apply(first) {
    if (!isView()) {
      if (first === true) update();
      return;
    }
    readHash();
    update();
    openRecord();
    if (!state.id && KEYS.some((key) => state[key])) document.getElementById("records").scrollIntoView();
  }
  window.addEventListener("hashchange", apply);
  window.addEventListener("popstate", apply);
  apply(true);
})();
"""
