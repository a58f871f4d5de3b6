"""How much a rewrite changed a response: the word-level edit rate, lengths, and their aggregates.

The paper's "% rewritten" (Fan et al. 2024, section 7): the edit distance between the
original and the rewritten response, counted in words (whitespace-separated tokens;
substitutions, deletions and insertions each cost 1), divided by the longer of the two
word counts; a response whose rate is above 0.2 counts as rewritten. Two empty texts have
rate 0. The distance is rapidfuzz's Levenshtein (C++, bit-parallel) on the two word lists.

:class:`MeasureStats` keeps, per record, two lengths and one flag in compact arrays (9
bytes a record), so the figures of a million records, medians included, fit in ~10 MB.
Scripts keep one per task and merge them into groups and the total.
"""

import hashlib
import heapq
import json
from array import array
from collections import Counter

from rapidfuzz.distance import Levenshtein

REWRITE_THRESHOLD = 0.2  # the paper's rule: rewritten when the edit rate is above this
QUANTILES = {"p5": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}

# Per-record kind, as stored in MeasureStats.kinds.
UNCHANGED, CHANGED, REWRITTEN = 0, 1, 2


def split_words(text):
    """The words of ``text``: its whitespace-separated tokens."""
    return text.split()


def edit_rate_of_words(before_words, after_words):
    """The edit distance of two word lists divided by the longer length; 0 when both are empty."""
    longer = max(len(before_words), len(after_words))
    if longer == 0:
        return 0.0
    return Levenshtein.distance(before_words, after_words) / longer


def edit_rate(before, after):
    """The paper's word-level edit rate of two texts (see the module docstring)."""
    if before == after:
        return 0.0
    return edit_rate_of_words(split_words(before), split_words(after))


def is_rewritten(rate, threshold=REWRITE_THRESHOLD):
    """The paper's rule: a response is rewritten when its edit rate is above ``threshold``."""
    return rate > threshold


def quantile(sorted_values, q):
    """The ``q`` quantile of a sorted sequence, interpolating linearly between neighbours."""
    if not sorted_values:
        return None
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _share(part, whole):
    return part / whole if whole else None


def _mean(total, count):
    return total / count if count else None


class MeasureStats:
    """Running figures of a set of records: counts, edit rates, lengths, tags, reject reasons."""

    def __init__(self):
        self.records = 0
        self.rewritten = 0
        self.changed = 0
        self.edit_rate_sum = 0.0
        self.before = array("I")  # lengths (words or tokens) of the originals
        self.after = array("I")  # and of the rewrites, same order
        self.kinds = bytearray()  # UNCHANGED, CHANGED or REWRITTEN, same order
        self.tags = Counter()
        self.reject_reasons = Counter()
        self.checks = Counter()  # quality checks (realign/quality.py) the shipped responses fail
        self.failing_checks = 0  # records whose shipped response fails one

    def add(self, rate, rewritten, changed, length_before, length_after, tag=None, reject_reason=None, problems=()):
        """Count one record. ``tag`` None counts as ``"(none)"`` (a merged file has no tags);
        ``problems`` are the quality checks its response fails."""
        self.records += 1
        self.rewritten += bool(rewritten)
        self.changed += bool(changed)
        self.edit_rate_sum += rate
        self.before.append(length_before)
        self.after.append(length_after)
        self.kinds.append(REWRITTEN if rewritten else CHANGED if changed else UNCHANGED)
        self.tags["(none)" if tag is None else tag] += 1
        if reject_reason is not None:
            self.reject_reasons[reject_reason] += 1
        self.checks.update(problems)
        self.failing_checks += bool(problems)

    @classmethod
    def merged(cls, parts):
        """One MeasureStats holding the records of all ``parts`` (e.g. the tasks of a group)."""
        total = cls()
        for part in parts:
            total.records += part.records
            total.rewritten += part.rewritten
            total.changed += part.changed
            total.edit_rate_sum += part.edit_rate_sum
            total.before.extend(part.before)
            total.after.extend(part.after)
            total.kinds.extend(part.kinds)
            total.tags.update(part.tags)
            total.reject_reasons.update(part.reject_reasons)
            total.checks.update(part.checks)
            total.failing_checks += part.failing_checks
        return total

    def ratios(self, kinds=(UNCHANGED, CHANGED, REWRITTEN)):
        """Per-record length ratios (after / before) of the records of the given kinds;
        records whose original has length 0 have no ratio and are left out."""
        return [after / before for before, after, kind in zip(self.before, self.after, self.kinds)
                if before and kind in kinds]

    def summary(self):
        """Every figure as a JSON-ready dict (shares are fractions, 0 to 1)."""
        before, after = sorted(self.before), sorted(self.after)
        ratios = sorted(self.ratios())
        mean_before = _mean(sum(before), len(before))
        mean_after = _mean(sum(after), len(after))
        distribution = {"records": len(ratios), "undefined": self.records - len(ratios)}
        distribution.update({name: quantile(ratios, q) for name, q in QUANTILES.items()})
        return {
            "records": self.records,
            "rewritten": self.rewritten,
            "share_rewritten": _share(self.rewritten, self.records),
            "changed": self.changed,
            "share_changed": _share(self.changed, self.records),
            "mean_edit_rate": _mean(self.edit_rate_sum, self.records),
            "length_before": {"mean": mean_before, "median": quantile(before, 0.5)},
            "length_after": {"mean": mean_after, "median": quantile(after, 0.5)},
            "length_ratio": mean_after / mean_before if mean_before else None,
            "ratio_distribution": distribution,
            "tags": dict(self.tags.most_common()),
            "reject_reasons": dict(self.reject_reasons.most_common()),
            "checks": dict(self.checks.most_common()),
            "failing_checks": self.failing_checks,
        }


# -- seeded samples of records ---------------------------------------------------------------


def plural(n, word):
    """``word`` for one, ``word + "s"`` for any other count (the reports' "1 record", "3 records")."""
    return word if n == 1 else word + "s"


def sample_key(seed, record_id):
    """A pseudo-random 64-bit key of ``(seed, id)`` (blake2b of the JSON of ``[seed, id]``),
    the same on every machine and run."""
    if type(record_id) is int and type(seed) is int:
        text = f"[{seed}, {record_id}]"  # what json.dumps writes, without its cost
    else:
        text = json.dumps([seed, record_id])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class Sampler:
    """A seeded random sample of ``k`` records, drawn while streaming (``k`` None keeps all).

    Keeps the ``k`` records whose :func:`sample_key` is smallest (a heap of ``k``), so the
    sample depends on the ids and the seed, not on the order of the files, and samples of
    one seed nest: the sample of 50 is part of the sample of 100. The judges of evaluate.py
    and the records of its HTML page are sampled this way.
    """

    def __init__(self, k, seed):
        self.k, self.seed = k, seed
        self._heap = []  # (-key, order, item): the largest key on top, to be pushed out
        self.offered = 0

    def offer(self, record_id, make_item):
        """Consider one record; ``make_item()`` builds what is kept, only when it is kept."""
        self.offer_key(sample_key(self.seed, record_id), make_item)

    def offer_key(self, key, make_item):
        """:meth:`offer` of a record whose key is known already."""
        self.offered += 1
        if self.k is None or len(self._heap) < self.k:
            heapq.heappush(self._heap, (-key, self.offered, make_item()))
        elif self.k and key < -self._heap[0][0]:
            heapq.heapreplace(self._heap, (-key, self.offered, make_item()))

    def keyed_items(self):
        """``(key, item)`` of the sample, smallest key first."""
        return [(-negative, item) for negative, _, item in sorted(self._heap, key=lambda e: (-e[0], e[1]))]

    def items(self):
        """The sampled items, smallest key first."""
        return [item for _, item in self.keyed_items()]
