"""The one OpenAI-compatible client used by every stage that calls an LLM API.

reformat.py, classify.py (``--backend openai`` and ``openai_chat``) and evaluate.py say
*what* to ask; this client decides *when* and *how*:

- **the body**: the output cap goes in the field the server accepts
  (``max_completion_tokens`` on chat, ``max_tokens`` on text completions); a request the
  server refuses because of one parameter (HTTP 400 naming it in ``param`` or in the
  message) is adapted once for the whole run and sent again: ``max_tokens`` <->
  ``max_completion_tokens``, a refused ``temperature`` / ``top_p`` / ``service_tier`` /
  ``reasoning_effort`` / ``response_format`` / ``--extra_body`` field is left out (one
  warning), a refused ``n > 1`` becomes ``n`` requests of one candidate merged into one
  reply, and a default reasoning effort the model refuses moves up to the next level;
- **the model check** at start-up (``GET /models/{model}``, else the list);
- **pacing** by the rate-limit headers (:mod:`realign.pacing`);
- **retries** of what is transient (429, 5xx, timeouts, connection errors), honouring
  ``retry-after-ms`` and ``retry-after``; errors that will not heal stop the run;
- **the cache** (:mod:`realign.cache`): a reply is looked up before it is paid for, and
  stored once it is complete and the caller found it usable;
- **tokens and spend** from every reply's ``usage``, and ``--max_cost``
  (:mod:`realign.pricing`).

The HTTP requests go through the ``openai`` SDK's low-level ``post``/``get`` (its auth,
base URL, connection pool and error mapping, without building typed objects: about 2.6 ms
of CPU per request), imported on first use so that ``--help`` stays instant. The API key
is never logged and never part of a message raised here.
"""

import asyncio
import collections
import datetime
import json
import logging
import os
import re
from dataclasses import dataclass, field

from realign.cache import request_key
from realign.cli import FatalError
from realign.pacing import Pacer
from realign.pool import sleep_unless_stopped
from realign.pricing import CHARS_PER_TOKEN, Budget, Spend, without_date_suffix
from realign.records import InputError
from realign.retry import is_transient_status, parse_retry_after_ms, retry_delay

logger = logging.getLogger(__name__)

NO_KEY = "EMPTY"  # sent to a --base_url server when no key is set (local servers ignore it)
OPENAI_BASE_URL = "https://api.openai.com/v1"
CHAT = "/chat/completions"
COMPLETIONS = "/completions"
FLEX_TIMEOUT = 900.0  # flex requests may wait for capacity: 15 minutes
DEFAULT_OUTPUT_CAP = 4096  # what a server counts against the token limit when no cap is sent
MAX_ADAPTATIONS = 8  # parameter adaptations tried for one request
MAX_LISTED_MODELS = 10
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
SERVICE_TIERS = ("auto", "default", "flex", "priority")
# Fields a request can do without: a refusal of one leaves it out for the rest of the run.
OPTIONAL_FIELDS = ("temperature", "top_p", "reasoning_effort", "service_tier", "response_format",
                   "structured_outputs", "guided_choice", "seed", "stop", "presence_penalty",
                   "frequency_penalty", "logprobs", "top_logprobs", "user", "metadata", "store")


class RequestRejected(Exception):
    """The server refused this one request on its merits (HTTP 4xx other than the ones
    that stop the run, and no adaptation helps): the caller records it on the record."""

    def __init__(self, status, message):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class RetriesExhausted(Exception):
    """A transient failure that outlived ``max_retries``."""


class UnreadableReply(Exception):
    """A 200 reply whose body is not the JSON object expected: a server glitch, retried."""


class Refusal(Exception):
    """HTTP 400/413/422 for one body: maybe a parameter to adapt (online, or a batch line's error)."""

    def __init__(self, status, error):
        self.status = status
        self.error = error if isinstance(error, dict) else {}
        super().__init__(self.message)

    @property
    def message(self):
        return str(self.error.get("message") or f"HTTP {self.status}")


@dataclass
class Sampling:
    """What every request of a run asks for (sampling settings travel as one object)."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    extra_body: dict = field(default_factory=dict)
    response_format: dict | None = None
    effort_is_default: bool = False  # reasoning_effort chosen for the model, not by the user

    def fields(self):
        """The body fields of these settings, in the logical form (the cap as ``max_output_tokens``)."""
        body = {"model": self.model, "n": self.n}
        for name in ("temperature", "top_p", "reasoning_effort", "service_tier", "response_format"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.max_output_tokens is not None:
            body["max_output_tokens"] = self.max_output_tokens
        body.update(self.extra_body)
        return body


Answer = collections.namedtuple("Answer", "reply cached key usable")


def reply_text(reply):
    """The text of the first choice of a chat or text-completion reply, or None."""
    choices = reply.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else None


# -- settings from the command line ------------------------------------------------------


def add_client_arguments(parser, *, default_concurrency=16, default_max_retries=8, default_timeout=600.0,
                         cache=True, budget=True, base_url_default="$OPENAI_BASE_URL, else OpenAI"):
    """The flags every stage that uses this client shares (one place, one meaning)."""
    from realign.cli import non_negative_int, positive_float, positive_int

    group = parser.add_argument_group("API client")
    group.add_argument("--base_url", default=None,
                       help="base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1 "
                            f"(default: {base_url_default})")
    group.add_argument("--concurrency", type=positive_int, default=default_concurrency,
                       help=f"requests in flight at once (default: {default_concurrency})")
    group.add_argument("--max_retries", type=non_negative_int, default=default_max_retries,
                       help="retries of a request after a rate limit, server error, timeout or connection "
                            f"error, with backoff honouring Retry-After (default: {default_max_retries})")
    group.add_argument("--request_timeout", type=positive_float, default=None,
                       help=f"seconds to wait for one reply (default: {default_timeout:g}; "
                            f"{FLEX_TIMEOUT:g} with --service_tier flex)")
    group.add_argument("--max_requests_per_minute", type=positive_float, default=None,
                       help="pace requests under this limit (default: learn the limit from the server's "
                            "x-ratelimit-* headers)")
    group.add_argument("--max_tokens_per_minute", type=positive_float, default=None,
                       help="pace requests under this token limit; a request counts its prompt plus n x its "
                            "output cap, as OpenAI counts it (default: learn it from the headers)")
    group.add_argument("--reasoning_effort", choices=REASONING_EFFORTS, default=None,
                       help="reasoning effort of a reasoning model (default: not sent, except the lowest "
                            "effort for the models of constant.LOWEST_REASONING_EFFORT)")
    group.add_argument("--service_tier", choices=SERVICE_TIERS, default=None,
                       help="OpenAI service tier; flex costs half, may wait longer (default: not sent)")
    group.add_argument("--extra_body", type=json_object, default=None,
                       help="a JSON object merged into every request body, e.g. "
                            "'{\"chat_template_kwargs\": {\"enable_thinking\": false}}'")
    if cache:
        add_cache_arguments(group)
    if budget:
        group.add_argument("--dry_run", action=argparse_bool(), default=False,
                           help="send nothing: print the requests, tokens, cost and time the run would take")
        group.add_argument("--max_cost", type=positive_float, default=None,
                           help="stop starting requests before the spend of this run would pass this many USD")
        group.add_argument("--price_input", type=positive_float, default=None,
                           help="USD per million prompt tokens (default: constant.MODEL_PRICES)")
        group.add_argument("--price_cached_input", type=positive_float, default=None,
                           help="USD per million cached prompt tokens (default: the table, else --price_input)")
        group.add_argument("--price_output", type=positive_float, default=None,
                           help="USD per million completion tokens (default: constant.MODEL_PRICES)")
    return group


def add_cache_arguments(group):
    """--cache_dir, --cache/--no-cache, --refresh_cache: the request cache of every paid call."""
    group.add_argument("--cache_dir", default=None,
                       help="folder of the request cache (default: $REALIGN_CACHE_DIR, else ~/.cache/realign)")
    group.add_argument("--cache", action=argparse_bool(), default=True,
                       help="answer repeated requests from the cache and store new replies "
                            "(--no-cache: neither; default: on)")
    group.add_argument("--refresh_cache", action=argparse_bool(), default=False,
                       help="do not answer from the cache, but store the new replies (default: off)")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def json_object(text):
    """argparse type of ``--extra_body``: a JSON object, else a usage error (exit 2)."""
    import argparse

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"seed\": 1}'")
    return value


def optional_float(text):
    """argparse type of ``--temperature`` / ``--top_p``: a number, or ``none`` (not sent)."""
    if text.strip().lower() in ("none", "null", ""):
        return None
    return float(text)


def default_reasoning_effort(model, given):
    """``(effort, is_default)``: the flag when given, else the lowest effort the model is
    known to accept (constant.LOWEST_REASONING_EFFORT), else None (not sent)."""
    import constant

    if given is not None:
        return given, False
    lowest = constant.LOWEST_REASONING_EFFORT.get(model)
    if lowest is None:
        lowest = constant.LOWEST_REASONING_EFFORT.get(without_date_suffix(model))
    return lowest, lowest is not None


def client_usage(client):
    """The client's part of a stage's ``--usage_path`` file (zeros when no client was made)."""
    if client is None:
        return {"requests": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None}
    return {"requests": client.stats["requests"], "cache_hits": client.stats["cache_hits"],
            "prompt_tokens": client.spend.prompt_tokens, "completion_tokens": client.spend.completion_tokens,
            "cost_usd": client.spend.cost if client.spend.priced else None}


def limits_key(base_url, model):
    """Under which name the cache remembers the rate limits a server reported for a model."""
    return f"{(base_url or OPENAI_BASE_URL).rstrip('/')} {model}"


def dry_run_limits(cache, base_url, model, rpm=None, tpm=None):
    """The per-minute limits a dry run reckons with: the flags, else those the cache remembers."""
    known = cache.known_limits(limits_key(base_url, model)) if cache is not None else {}
    return {"requests": rpm or known.get("requests"), "tokens": tpm or known.get("tokens")}


def resolve_base_url(flag_value):
    """``--base_url``, else ``$OPENAI_BASE_URL``, else None (OpenAI); a usage error when it is
    not an http(s) URL."""
    url = flag_value or os.environ.get("OPENAI_BASE_URL") or None
    if url and not url.startswith(("http://", "https://")):
        raise InputError(f"--base_url must start with http:// or https://, got {url!r}")
    return url.rstrip("/") if url else None


def resolve_api_key(flag_key=None, base_url=None):
    """The key: ``OPENAI_API_KEY`` first, then the flag (with a warning). None when neither
    is set and ``base_url`` points at a server of the user's (local servers need none);
    an error when the request would go to OpenAI without a key. Never logged."""
    env_key = os.environ.get("OPENAI_API_KEY", "").strip()
    flag_key = (flag_key or "").strip()
    if env_key:
        if flag_key and flag_key != env_key:
            logger.warning("--openai_key is ignored: OPENAI_API_KEY is set and is read first")
        return env_key
    if flag_key:
        logger.warning("the key was given with --openai_key; prefer the environment variable OPENAI_API_KEY "
                       "(a command-line key shows in the process list and shell history)")
        return flag_key
    if base_url:
        return None
    raise InputError("OPENAI_API_KEY is not set: export your API key, or point --base_url at a server "
                     "that needs none")


# -- adapting the body to what the server accepts ---------------------------------------


class Adapter:
    """What one endpoint of the server accepts, learned from its refusals, once per run."""

    def __init__(self, path):
        self.path = path
        # The legacy text-completions API knows only max_tokens; chat knows both.
        self.token_field = "max_completion_tokens" if path == CHAT else "max_tokens"
        self.dropped = set()
        self.split_n = False
        self.effort = None  # a default reasoning effort moved up because the model refused a lower one
        self.notes = []  # what was adapted, for the summary line

    def apply(self, logical):
        """The bodies to send for the logical body (several when ``n`` is split)."""
        body = {}
        for name, value in logical.items():
            if name in self.dropped:
                continue
            if name == "max_output_tokens":
                body[self.token_field] = value
            elif name == "reasoning_effort" and self.effort is not None:
                body[name] = self.effort
            else:
                body[name] = value
        n = body.get("n", 1)
        if self.split_n and isinstance(n, int) and n > 1:
            single = {**body, "n": 1}
            return [dict(single) for _ in range(n)]
        return [body]

    def learn(self, body, refusal, effort_is_default=False):
        """Adapt to a refusal of ``body``; True when the request should be sent again."""
        name = refused_field(body, refusal)
        if name is None:
            return False
        code = str(refusal.error.get("code") or "")
        if name == "max_tokens":
            return self._note_token_field("max_completion_tokens")
        if name == "max_completion_tokens":
            return self._note_token_field("max_tokens")
        if name == "n":
            if body.get("n", 1) > 1 and not self.split_n:
                self.split_n = True
                self._note(f"n={body['n']} refused: {body['n']} requests of one candidate each")
                return True
            return False
        if name == "reasoning_effort" and effort_is_default and code == "unsupported_value":
            current = body.get("reasoning_effort")
            higher = REASONING_EFFORTS[REASONING_EFFORTS.index(current) + 1:] if current in REASONING_EFFORTS else ()
            if higher:
                self.effort = higher[0]
                self._note(f"reasoning_effort {current!r} refused: using {higher[0]!r}")
                return True
        if name in body and name not in ("model", "messages", "prompt"):
            self.dropped.add(name)
            if name == "max_output_tokens":  # pragma: no cover - never in a sent body
                return False
            self._note(f"{name}={json.dumps(body[name])[:60]} refused ({refusal.message[:120]}): left out, "
                       "the server's default is used")
            return True
        return False

    def _note_token_field(self, field_name):
        if self.token_field == field_name:
            return False
        self._note(f"{self.token_field} refused: the output cap is sent as {field_name}")
        self.token_field = field_name
        return True

    def _note(self, text):
        self.notes.append(text)
        logger.warning("%s: %s", self.path.lstrip("/"), text)


def refused_field(body, refusal):
    """The body field a refusal names: its ``param`` when that is a field of the body, else
    the first field of the body the message mentions by name."""
    param = refusal.error.get("param")
    if isinstance(param, str):
        base = param.split(".")[0].split("[")[0]
        if base in body:
            return base
    message = refusal.message
    found = []
    for name in body:
        if name in ("model", "messages", "prompt"):
            continue
        match = re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message)
        if match:
            found.append((match.start(), name))
    return min(found)[1] if found else None


def merge_replies(replies):
    """One reply holding the choices (re-indexed) and the summed usage of several replies."""
    merged = dict(replies[0])
    choices, usage = [], collections.Counter()
    for reply in replies:
        for choice in reply.get("choices") or []:
            choices.append({**choice, "index": len(choices)} if isinstance(choice, dict) else choice)
        for name, value in (reply.get("usage") or {}).items():
            if isinstance(value, (int, float)):
                usage[name] += value
    merged["choices"] = choices
    merged["usage"] = dict(usage)
    return merged


# -- the client ----------------------------------------------------------------------


def _raw_response_class():
    try:
        import httpx2

        return httpx2.Response
    except ImportError:  # openai < 3 builds on httpx
        import httpx

        return httpx.Response


def _error_body(error):
    """The ``{"message", "type", "param", "code"}`` object of an SDK status error."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        return inner if isinstance(inner, dict) else body
    return {}


def parse_date(value):
    """A ``shutdown_date``: "YYYY-MM-DD", an ISO timestamp, or Unix seconds; None otherwise."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).date()
    try:
        return datetime.date.fromisoformat(str(value)[:10])
    except ValueError:
        return None


class Client:
    """One per process and server. ``await client.chat(messages, sampling)``."""

    def __init__(self, base_url=None, api_key=None, *, timeout=600.0, max_retries=8, rpm=None, tpm=None,
                 cache=None, price=None, max_cost=None, stopper=None):
        import openai

        self._openai = openai
        self.base_url = base_url
        self.server = (base_url or OPENAI_BASE_URL).rstrip("/")
        self.max_retries = max_retries
        self.sdk = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or NO_KEY, timeout=timeout, max_retries=0)
        self.pacer = Pacer(rpm, tpm)
        self.cache = cache
        self.spend = Spend(price)
        self.budget = Budget(max_cost, self.spend)
        self.adapters = {CHAT: Adapter(CHAT), COMPLETIONS: Adapter(COMPLETIONS)}
        self.stats = collections.Counter()
        self.prompt_ratio = None  # usage's prompt tokens over our estimate, learned from replies
        self.stopper = stopper  # realign.pool.Stopper: no new request once it is set
        self._raw = _raw_response_class()

    # -- keys and estimates ------------------------------------------------------------

    def key(self, path, logical):
        """The cache key of a logical request (endpoint and the whole body)."""
        return request_key(self.server + path, logical)

    @staticmethod
    def key_of(base_url, path, logical):
        """:meth:`key` without a client (for fingerprints and dry runs)."""
        return request_key((base_url or OPENAI_BASE_URL).rstrip("/") + path, logical)

    @staticmethod
    def logical_chat(messages, sampling):
        return {"messages": messages, **sampling.fields()}

    @staticmethod
    def logical_completion(prompt, sampling):
        return {"prompt": prompt, **sampling.fields()}

    def is_cached(self, key):
        return self.cache is not None and self.cache.contains(key)

    def estimate_prompt_tokens(self, logical):
        text = logical.get("prompt")
        if text is None:
            text = "".join(str(m.get("content") or "") for m in logical.get("messages") or [])
        raw = len(text) / CHARS_PER_TOKEN + 4 * len(logical.get("messages") or [None])
        return raw * (self.prompt_ratio or 1.0), raw

    # -- the model check ---------------------------------------------------------------

    async def _get_json(self, path):
        """``(status, JSON or None)`` of a GET, retrying what is transient a few times."""
        openai = self._openai
        for attempt in range(min(self.max_retries, 3) + 1):
            try:
                response = await self.sdk.get(path, cast_to=self._raw)
            except openai.APIStatusError as e:
                if e.status_code in (401, 403):
                    raise FatalError(f"the API server refused the credentials (HTTP {e.status_code}); "
                                     "check OPENAI_API_KEY") from None
                if is_transient_status(e.status_code) and attempt < min(self.max_retries, 3):
                    await asyncio.sleep(retry_delay(attempt, e.response.headers.get("retry-after")))
                    continue
                return e.status_code, None
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                if attempt < min(self.max_retries, 3):
                    await asyncio.sleep(retry_delay(attempt))
                    continue
                raise FatalError(f"cannot reach the API server at {self.server} ({e.__class__.__name__})") from None
            try:
                return response.status_code, json.loads(response.content)
            except ValueError:
                return response.status_code, None
        return None, None  # pragma: no cover

    async def check_model(self, model, today=None):
        """Stop at once (FatalError) when the server does not offer ``model`` or its
        ``shutdown_date`` has passed; warn when one is coming. A server without a models
        endpoint is not checked. Decides from the list when ``GET /models/{model}`` fails
        (``vllm serve`` answers 404 there for the models it serves)."""
        today = today or datetime.datetime.now(datetime.timezone.utc).date()
        status, info = await self._get_json(f"/models/{model}")
        if not (status == 200 and isinstance(info, dict) and info.get("id")):
            status, listing = await self._get_json("/models")
            data = listing.get("data") if isinstance(listing, dict) else None
            if status != 200 or not isinstance(data, list):
                logger.info("%s has no models endpoint (HTTP %s): %s is not checked", self.server, status, model)
                return None
            offered = {entry.get("id"): entry for entry in data if isinstance(entry, dict)}
            if model not in offered:
                shown = ", ".join(sorted(str(i) for i in offered)[:MAX_LISTED_MODELS])
                more = f" and {len(offered) - MAX_LISTED_MODELS} more" if len(offered) > MAX_LISTED_MODELS else ""
                raise FatalError(f"model {model!r} is not offered by {self.server}; it offers: {shown or 'none'}{more} "
                                 "(choose one with --model)")
            info = offered[model]
        shutdown = parse_date(info.get("shutdown_date"))
        if shutdown is not None:
            if shutdown <= today:
                raise FatalError(f"model {model!r} was shut down on {shutdown.isoformat()}; choose a current "
                                 "model with --model (e.g. gpt-6-luna)")
            logger.warning("model %r is deprecated: it shuts down on %s", model, shutdown.isoformat())
        return info

    # -- asking --------------------------------------------------------------------------

    async def chat(self, messages, sampling, *, expected_output=None, accept=None, use_cache=True):
        """Ask a chat completion; see :meth:`ask`."""
        return await self.ask(CHAT, self.logical_chat(messages, sampling), sampling,
                              expected_output=expected_output, accept=accept, use_cache=use_cache)

    async def complete(self, prompt, sampling, *, expected_output=None, accept=None, use_cache=True):
        """Ask a text completion; see :meth:`ask`."""
        return await self.ask(COMPLETIONS, self.logical_completion(prompt, sampling), sampling,
                              expected_output=expected_output, accept=accept, use_cache=use_cache)

    async def ask(self, path, logical, sampling, *, expected_output=None, accept=None, use_cache=True):
        """An :class:`Answer` for the logical request: from the cache when it holds a usable
        reply, else from the server (paced, adapted, retried, priced, under the budget).

        ``accept(reply) -> bool`` says whether a reply is usable; only usable replies are
        cached, so that asking again (a re-ask) sends a new request. ``expected_output``
        is the completion tokens the caller expects (for ``--max_cost``; default: the cap).
        Raises :class:`RequestRejected`, :class:`RetriesExhausted`, ``BudgetReached`` or
        FatalError.
        """
        key = self.key(path, logical)
        if use_cache and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None and (accept is None or accept(hit)):
                self.stats["cache_hits"] += 1
                return Answer(hit, True, key, True)
        prompt_estimate, raw_estimate = self.estimate_prompt_tokens(logical)
        if expected_output is None:
            expected_output = (sampling.max_output_tokens or DEFAULT_OUTPUT_CAP) * max(1, sampling.n)
        ticket = self.budget.reserve(prompt_estimate, expected_output)
        completion = None
        try:
            reply = await self._send(path, logical, sampling, prompt_estimate)
            prompt, completion = self.spend.add_usage(reply.get("usage"))
            if prompt and raw_estimate:
                ratio = prompt / raw_estimate
                self.prompt_ratio = ratio if self.prompt_ratio is None else 0.9 * self.prompt_ratio + 0.1 * ratio
        finally:
            self.budget.settle(ticket, expected_output, completion)
        usable = accept is None or accept(reply)
        if usable and self.cache is not None:
            self.cache.put(key, reply)
        return Answer(reply, False, key, usable)

    async def _send(self, path, logical, sampling, prompt_estimate):
        """Send the logical body as the server accepts it; one reply (merged when ``n`` is split)."""
        adapter = self.adapters[path]
        for _ in range(MAX_ADAPTATIONS):
            bodies = adapter.apply(logical)
            try:
                if len(bodies) == 1:
                    return await self._post(path, bodies[0], prompt_estimate)
                results = await asyncio.gather(*(self._post(path, body, prompt_estimate) for body in bodies),
                                               return_exceptions=True)
                failure = next((r for r in results if isinstance(r, BaseException)), None)
                if failure is not None:
                    for result in results:  # the parts that were answered were paid for
                        if isinstance(result, dict):
                            self.spend.add_usage(result.get("usage"))
                    raise failure
                return merge_replies(results)
            except Refusal as refusal:
                if adapter.apply(logical) != bodies:  # adapted meanwhile (another request's refusal)
                    continue
                if adapter.learn(bodies[0], refusal, sampling.effort_is_default):
                    self.stats["adapted_resends"] += 1
                    continue
                raise RequestRejected(refusal.status, refusal.message) from None
        raise RequestRejected(400, "the server kept refusing the request after adapting it")

    def _token_cost(self, body, prompt_estimate):
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_OUTPUT_CAP
        n = body.get("n") or 1
        return prompt_estimate + n * cap

    async def _post(self, path, body, prompt_estimate):
        """POST one body, paced and retried; the reply as a dict."""
        openai = self._openai
        attempt = 0
        while True:
            self._check_stop()
            sent_at = await self.pacer.acquire(self._token_cost(body, prompt_estimate), self._stopping)
            self._check_stop()
            self.stats["requests"] += 1
            retry_after = None
            try:
                response = await self.sdk.post(path, body=body, cast_to=self._raw)
            except openai.APIStatusError as e:
                headers = e.response.headers if e.response is not None else {}
                self.pacer.observe(headers, sent_at)
                retry_after, problem = self._status_problem(e, headers, sent_at)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                self.pacer.failed()
                problem = e.__class__.__name__
            else:
                self.pacer.observe(response.headers, sent_at)
                try:
                    reply = json.loads(response.content)
                except ValueError:
                    reply = None
                if isinstance(reply, dict) and isinstance(reply.get("choices"), list):
                    return reply
                problem = "a reply without a list of choices"
            if attempt >= self.max_retries:
                raise RetriesExhausted(f"failed after {attempt + 1} attempts: {problem}")
            delay = retry_delay(attempt, retry_after)
            logger.debug("%s: %s, retry %d in %.2fs", path, problem, attempt + 1, delay)
            self.stats["retries"] += 1
            attempt += 1
            await sleep_unless_stopped(self.stopper, delay)

    def _stopping(self):
        return self.stopper is not None and self.stopper.requests_blocked()

    def _check_stop(self):
        if self.stopper is not None:
            self.stopper.check()

    def _status_problem(self, error, headers, sent_at):
        """``(retry_after, description)`` of a transient HTTP error; raises for the others."""
        status = error.status_code
        body = _error_body(error)
        code = str(body.get("code") or "")
        if status in (401, 403):
            # The server's message may quote part of the key: do not repeat it.
            raise FatalError(f"the API server refused the credentials (HTTP {status}); check OPENAI_API_KEY") from None
        if status == 404:
            message = str(body.get("message") or "not found")[:300]
            raise FatalError(f"the API server answered HTTP 404: {message} (check --model and --base_url)") from None
        if status == 429 and code == "insufficient_quota":
            raise FatalError("the API account has no quota left (HTTP 429 insufficient_quota); check its billing") from None
        if status in (400, 413, 422):
            raise Refusal(status, body)
        if not is_transient_status(status):
            raise RequestRejected(status, str(body.get("message") or f"HTTP {status}")) from None
        retry_after = parse_retry_after_ms(headers)
        if status == 429:
            rate_limited = code == "rate_limit_exceeded" or body.get("type") in ("requests", "tokens")
            if rate_limited:
                self.stats["rate_limited"] += 1
                self.pacer.refused(sent_at, retry_after)
                if retry_after is None:
                    retry_after = 0.0  # the pacer waits for the bucket: no extra backoff
            else:
                self.stats["unavailable"] += 1  # e.g. flex capacity ("resource_unavailable")
        return retry_after, f"HTTP {status}{' ' + code if code else ''}"

    # -- reporting ------------------------------------------------------------------

    def adaptations(self):
        notes = [note for adapter in self.adapters.values() for note in adapter.notes]
        return "; ".join(notes) if notes else "none"

    def describe(self):
        """The client's part of a summary line."""
        cache_hits = self.stats["cache_hits"]
        limits = self.pacer.limits()
        paced = ", ".join(f"{int(v):,} {dim}/min" for dim, v in limits.items() if v) or "no limits seen"
        return (f"requests: {self.stats['requests']:,}, retries: {self.stats['retries']:,} "
                f"(429 rate limit: {self.stats['rate_limited']:,}), cache hits: {cache_hits:,}, "
                f"pacing: {paced}, adaptations: {self.adaptations()}, {self.spend.describe()}")

    def remember_limits(self, model):
        if self.cache is not None:
            limits = self.pacer.limits()
            if self.pacer.headers_seen:
                self.cache.remember_limits(limits_key(self.server, model), limits["requests"], limits["tokens"])

    async def close(self):
        await self.sdk.close()
