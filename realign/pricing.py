"""Prices, spend and the spending cap.

Prices come from the dated table ``MODEL_PRICES`` of ``constant.py`` (USD per million
tokens: input, cached input, output; Batch API and Flex at their own, half, price), or
from ``--price_input`` / ``--price_output`` / ``--price_cached_input``, which win.

:class:`Spend` adds up what the replies' ``usage`` says was used (re-asks and retries
included) and prices it. :class:`Budget` is ``--max_cost``: before a request starts it
checks that what was spent, plus the estimated cost of the requests in flight, plus this
request's estimate would stay under the cap; the estimate of a reply's length learns from
the replies seen so far (a rewrite is often longer than its original).
"""

import re
import threading
from dataclasses import dataclass

import constant
from realign.records import InputError

PER_MILLION = 1_000_000
CHARS_PER_TOKEN = 4.0  # the usual estimate for English text, where no tokenizer counts
_DATE_SUFFIX_RE = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class BudgetReached(Exception):
    """The next request would take the spend past ``--max_cost``."""


@dataclass(frozen=True)
class Price:
    """USD per token."""

    input: float
    cached_input: float
    output: float
    source: str  # where it came from, for the log

    def cost(self, prompt_tokens=0, completion_tokens=0, cached_tokens=0):
        cached_tokens = min(cached_tokens, prompt_tokens)
        return ((prompt_tokens - cached_tokens) * self.input + cached_tokens * self.cached_input
                + completion_tokens * self.output)


def without_date_suffix(model):
    """``gpt-6-luna-2026-09-22`` -> ``gpt-6-luna``: a dated snapshot is looked up as its model."""
    return _DATE_SUFFIX_RE.sub("", model or "")


def find_price(model, tier="online", price_input=None, price_output=None, price_cached_input=None,
               table=None):
    """The :class:`Price` of ``model`` at ``tier`` ("online", "flex" or "batch"), or None.

    The flags (USD per million tokens) override the table; a model with a date suffix is
    looked up without it.
    """
    table = constant.MODEL_PRICES if table is None else table
    entry = table.get(model) or table.get(without_date_suffix(model))
    half = tier in ("flex", "batch")
    listed = {}
    if entry:
        prefix = "batch_" if half else ""
        listed = {name: entry.get(prefix + name) for name in ("input", "cached_input", "output")}
        if half and listed["input"] is None:  # no batch price in the table: half the online one
            listed = {name: entry.get(name) / 2 if entry.get(name) is not None else None
                      for name in ("input", "cached_input", "output")}
    given = {"input": price_input, "output": price_output, "cached_input": price_cached_input}
    chosen = {name: given[name] if given[name] is not None else listed.get(name) for name in given}
    if chosen["input"] is None or chosen["output"] is None:
        return None
    if chosen["cached_input"] is None:
        chosen["cached_input"] = chosen["input"]
    if any(given.values()):
        source = "--price_* flags" + (f" and constant.MODEL_PRICES ({constant.PRICES_AS_OF})" if entry else "")
    else:
        source = f"constant.MODEL_PRICES, {constant.PRICES_AS_OF}, {tier} price of {model}"
    return Price(chosen["input"] / PER_MILLION, chosen["cached_input"] / PER_MILLION,
                 chosen["output"] / PER_MILLION, source)


def price_of_run(args, model, batch=False):
    """The :class:`Price` a run's flags ask for: the Batch API's when ``batch``, Flex's with
    ``--service_tier flex``, else the online one, with the ``--price_*`` flags; None when unknown.
    With ``--max_cost`` an unknown price is a usage error (:class:`InputError`)."""
    tier = "batch" if batch else "flex" if args.service_tier == "flex" else "online"
    price = find_price(model, tier, args.price_input, args.price_output, args.price_cached_input)
    if getattr(args, "max_cost", None) is not None and price is None:
        raise InputError(f"--max_cost needs a price for {model!r}, which constant.MODEL_PRICES does not list: "
                         "pass --price_input and --price_output (USD per million tokens)")
    return price


def usage_tokens(usage):
    """``(prompt, cached prompt, completion)`` tokens of a reply's ``usage`` (missing: 0)."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return int(usage.get("prompt_tokens") or 0), int(cached or 0), int(usage.get("completion_tokens") or 0)


class Spend:
    """Tokens used and their cost, added up from replies (thread-safe)."""

    def __init__(self, price=None):
        self.price = price
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.searches = 0
        self.search_price = None
        self.cost = 0.0
        self._lock = threading.Lock()

    def add_reply(self, reply, transport):
        """Add what one reply of ``transport`` used: a search's price, or the tokens its usage
        names; ``(prompt, completion)`` tokens."""
        if self.search_price is not None:
            self.add_search(self.search_price)
            return 0, 0
        return self.add_usage(reply.get("usage") if isinstance(reply, dict) else None)

    def add_usage(self, usage):
        prompt, cached, completion = usage_tokens(usage)
        with self._lock:
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.completion_tokens += completion
            if self.price is not None:
                self.cost += self.price.cost(prompt, completion, cached)
        return prompt, completion

    def add_search(self, price):
        with self._lock:
            self.searches += 1
            self.search_price = price
            if price is not None:
                self.cost += price

    @property
    def priced(self):
        return self.price is not None or self.search_price is not None

    def describe(self):
        """``"prompt tokens: 1,234 (0 cached), completion tokens: 567, spend: $0.0012"``."""
        parts = []
        if self.prompt_tokens or self.completion_tokens or self.search_price is None:
            parts.append(f"prompt tokens: {self.prompt_tokens:,} ({self.cached_tokens:,} cached), "
                         f"completion tokens: {self.completion_tokens:,}")
        if self.searches or self.search_price is not None:
            parts.append(f"searches paid: {self.searches:,}")
        parts.append(f"spend: ${self.cost:.4f}" if self.priced else "spend: unknown (no price for this model)")
        return ", ".join(parts)


class Budget:
    """``--max_cost``: refuse to start a request whose estimate would take the spend past the cap."""

    def __init__(self, cap, spend):
        self.cap = cap
        self.spend = spend
        self.in_flight = {}  # ticket -> estimated USD
        self._next = 0
        self.expected_completion = 0  # what the estimates said the replies seen so far would use
        self.actual_completion = 0  # what they did use
        self._lock = threading.Lock()

    def ratio(self):
        """Actual over expected completion tokens of the replies seen so far (1 before any):
        the estimates follow what the replies really use, longer or shorter, so the run stops
        within about one request's price of the cap."""
        if self.expected_completion <= 0:
            return 1.0
        return self.actual_completion / self.expected_completion

    def estimate(self, prompt_tokens, completion_tokens):
        if self.spend.price is None:
            return 0.0
        return self.spend.price.cost(prompt_tokens, completion_tokens * self.ratio())

    def reserve(self, prompt_tokens, completion_tokens, fixed=None):
        """A ticket for a request estimated at ``prompt_tokens`` in and ``completion_tokens``
        out (or ``fixed`` USD, e.g. a search); raises :class:`BudgetReached` past the cap."""
        with self._lock:
            estimate = fixed if fixed is not None else self.estimate(prompt_tokens, completion_tokens)
            if self.cap is not None and self.spend.cost + sum(self.in_flight.values()) + estimate > self.cap:
                raise BudgetReached(self.message())
            self._next += 1
            self.in_flight[self._next] = estimate
            return self._next

    def settle(self, ticket, expected_completion=None, actual_completion=None):
        """The request of ``ticket`` ended (its usage is already in the spend, if it had one)."""
        with self._lock:
            self.in_flight.pop(ticket, None)
        self.learn(expected_completion, actual_completion)

    def learn(self, expected_completion, actual_completion):
        """A reply used ``actual_completion`` tokens where ``expected_completion`` were expected."""
        if expected_completion and actual_completion is not None:
            with self._lock:
                self.expected_completion += expected_completion
                self.actual_completion += actual_completion

    def message(self):
        return f"budget reached: ${self.spend.cost:.4f} of ${self.cap:.4f}"
