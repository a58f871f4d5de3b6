"""The OpenAI-compatible API as a transport of the request engine (:mod:`realign.engine`).

reformat.py, classify.py (``--backend openai`` and ``openai_chat``) and evaluate.py's judges
build requests; :func:`realign.engine.send_requests` sends them through
:class:`OpenAITransport`, which knows this one wire:

- **the body**: the output cap goes in the field the server accepts
  (``max_completion_tokens`` on chat, ``max_tokens`` on text completions); a request the
  server refuses because of one parameter (HTTP 400 naming it in ``param`` or in the
  message) is adapted once for the whole run and sent again: ``max_tokens`` <->
  ``max_completion_tokens``, a refused ``temperature`` / ``top_p`` / ``service_tier`` /
  ``reasoning_effort`` / ``response_format`` / ``--extra_body`` field is left out (one
  warning), a refused ``n > 1`` becomes ``n`` requests of one candidate merged into one
  reply, and a default reasoning effort the model refuses moves up to the next level. The
  engine lets a running job adapt only to an ``unsupported_parameter`` / ``unsupported_value``
  refusal (any refusal before the first success);
- **the model check** before the first request (``GET /models/{model}``, else the list;
  ``--no-model_check`` skips it, for a gateway that accepts names it does not list);
- **the usage** of a reply (tokens), and what the errors of this server mean.

The HTTP requests go through the ``openai`` SDK's low-level ``post``/``get`` (its auth,
base URL, connection pool and error mapping, without building typed objects), imported on
first use so that ``--help`` stays instant. The API key is never logged and never part of
a message raised here.
"""

import collections
import datetime
import json
import logging
import os
import re
from dataclasses import dataclass, field

from realign.cache import request_key
from realign.cli import FatalError
from realign.engine import RequestFailed, Response, TransportError, call_with_retries
from realign.pricing import CHARS_PER_TOKEN, usage_tokens, without_date_suffix
from realign.records import InputError

logger = logging.getLogger(__name__)

NO_KEY = "EMPTY"  # sent to a --base_url server when no key is set (local servers ignore it)
OPENAI_BASE_URL = "https://api.openai.com/v1"
CHAT = "/chat/completions"
COMPLETIONS = "/completions"
FLEX_TIMEOUT = 900.0  # flex requests may wait for capacity: 15 minutes
DEFAULT_OUTPUT_CAP = 4096  # what a server counts against the token limit when no cap is sent
MAX_LISTED_MODELS = 10
MODEL_CHECK_STATUSES = (200, 400, 404, 405, 422, 501)  # answers of a GET /models that say "not checked here"
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
SERVICE_TIERS = ("auto", "default", "flex", "priority")
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


def reply_text(reply):
    """The text of the first choice of a chat or text-completion reply, or None."""
    choices = reply.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else None


# -- settings from the command line ------------------------------------------------------


def add_client_arguments(parser, *, default_concurrency=16, default_max_retries=8, default_timeout=600.0,
                         base_url_default="$OPENAI_BASE_URL, else OpenAI", usage_help=None):
    """The flags of every stage that calls an OpenAI-compatible API: this transport's and the
    engine's (one place, one meaning)."""
    from realign.cli import positive_float
    from realign.engine import add_engine_arguments

    group = parser.add_argument_group("API client")
    group.add_argument("--base_url", default=None,
                       help="base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1 "
                            f"(default: {base_url_default})")
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
                            "effort for the models of constant.LOWEST_REASONING_EFFORT; vLLM ignores it)")
    group.add_argument("--service_tier", choices=SERVICE_TIERS, default=None,
                       help="OpenAI service tier; flex costs half, may wait longer (default: not sent; vLLM "
                            "ignores it)")
    group.add_argument("--extra_body", type=json_object, default=None,
                       help="a JSON object merged into every request body, e.g. "
                            "'{\"chat_template_kwargs\": {\"enable_thinking\": false}}' (default: none)")
    group.add_argument("--model_check", action=argparse_bool(), default=True,
                       help="ask the server whether it offers the model before the first request; "
                            "--no-model_check for a gateway that accepts names it does not list (default: on)")
    group.add_argument("--price_input", type=positive_float, default=None,
                       help="USD per million prompt tokens (default: constant.MODEL_PRICES)")
    group.add_argument("--price_cached_input", type=positive_float, default=None,
                       help="USD per million cached prompt tokens (default: the table, else --price_input)")
    group.add_argument("--price_output", type=positive_float, default=None,
                       help="USD per million completion tokens (default: constant.MODEL_PRICES)")
    add_engine_arguments(group, default_concurrency=default_concurrency, default_max_retries=default_max_retries,
                         usage_help=usage_help)
    return group


def finish_client_arguments(parser, args, default_timeout=600.0):
    """After parsing: ``--base_url`` (else $OPENAI_BASE_URL) checked, and the timeout of one
    reply (15 minutes with ``--service_tier flex``, which may wait for capacity)."""
    try:
        args.base_url = resolve_base_url(args.base_url)
    except InputError as e:
        parser.error(str(e))
    if args.request_timeout is None:
        args.request_timeout = FLEX_TIMEOUT if args.service_tier == "flex" else default_timeout


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


def limits_key(base_url, model):
    """Under which name the cache remembers the rate limits a server reported for a model."""
    return f"{(base_url or OPENAI_BASE_URL).rstrip('/')} {model}"


def resolve_base_url(flag_value):
    """``--base_url``, else ``$OPENAI_BASE_URL``, else None (OpenAI); a usage error when it is
    not an http(s) URL."""
    url = flag_value or os.environ.get("OPENAI_BASE_URL") or None
    if url and not url.startswith(("http://", "https://")):
        raise InputError(f"--base_url must start with http:// or https://, got {url!r}")
    return url.rstrip("/") if url else None


def resolve_api_key(flag_key=None, base_url=None, environ=None):
    """The key: ``OPENAI_API_KEY`` first, then the flag (with a warning). None when neither
    is set and ``base_url`` points at a server of the user's (local servers need none);
    an error when the request would go to OpenAI without a key. Never logged. ``environ``:
    the environment the request is sent from (default: this process's)."""
    environ = os.environ if environ is None else environ
    env_key = environ.get("OPENAI_API_KEY", "").strip()
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

    def __init__(self, path, effort_is_default=False):
        self.path = path
        # The legacy text-completions API knows only max_tokens; chat knows both.
        self.token_field = "max_completion_tokens" if path == CHAT else "max_tokens"
        self.token_field_learned = False  # learned once: a message naming both fields cannot flip it back
        self.effort_is_default = effort_is_default  # reasoning_effort chosen for the model, not by the user
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

    def learn(self, body, refusal):
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
        if name == "reasoning_effort" and self.effort_is_default and code == "unsupported_value":
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
        if self.token_field == field_name or self.token_field_learned:
            return False
        self._note(f"{self.token_field} refused: the output cap is sent as {field_name}")
        self.token_field = field_name
        self.token_field_learned = True
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




def http_module():
    """The HTTP library the openai SDK builds on (httpx2 for openai 3, httpx before)."""
    try:
        import httpx2

        return httpx2
    except ImportError:  # openai < 3 builds on httpx
        import httpx

        return httpx


def json_body(response):
    """The JSON value of an HTTP response, or None when its body is not JSON."""
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def sdk_error_response(error):
    """An SDK status error as the engine's :class:`~realign.engine.Response`."""
    response = getattr(error, "response", None)
    body = getattr(error, "body", None)
    if response is not None and not isinstance(body, dict):
        body = json_body(response)
    if isinstance(body, dict) and "error" not in body and ("message" in body or "code" in body):
        body = {"error": body}  # the SDK hands over the inner error object
    return Response(error.status_code, response.headers if response is not None else {}, body)


class OpenAITransport:
    """The online OpenAI-compatible API, one endpoint (chat or text completions), for the engine."""

    name = "the API server"

    def __init__(self, base_url, api_key, *, path=CHAT, model=None, timeout=600.0, check_model=True,
                 effort_is_default=False, max_retries=3):
        import openai

        self._openai = openai
        self.base_url = base_url
        self.server = (base_url or OPENAI_BASE_URL).rstrip("/")
        self.path = path
        self.model = model
        self.check = check_model and model is not None
        self.max_retries = max_retries
        self.sdk = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or NO_KEY, timeout=timeout, max_retries=0)
        self.adapter = Adapter(path, effort_is_default)
        self.limits_key = limits_key(base_url, model)
        self._raw = _raw_response_class()

    # -- what the engine asks of every transport --------------------------------------------

    def key(self, body):
        """The cache key of a logical request (endpoint and the whole body)."""
        return request_key(self.server + self.path, body)

    def wire(self, body):
        return self.adapter.apply(body)

    def learn(self, wire, refusal):
        return self.adapter.learn(wire, refusal)

    def merge(self, replies):
        return merge_replies(replies)

    def adaptations(self):
        return "; ".join(self.adapter.notes) if self.adapter.notes else "none"

    @staticmethod
    def estimate_prompt(body):
        """Prompt tokens of a logical body, estimated at 4 characters a token."""
        text = body.get("prompt")
        if text is None:
            text = "".join(str(m.get("content") or "") for m in body.get("messages") or [])
        return len(text) / CHARS_PER_TOKEN + 4 * len(body.get("messages") or [None])

    @staticmethod
    def token_cost(wire, prompt):
        """What a request counts against a tokens-per-minute limit: its prompt plus n x its cap."""
        cap = wire.get("max_completion_tokens") or wire.get("max_tokens") or DEFAULT_OUTPUT_CAP
        return prompt + (wire.get("n") or 1) * cap

    @staticmethod
    def is_reply(body):
        return isinstance(body, dict) and isinstance(body.get("choices"), list)

    @staticmethod
    def usage(reply):
        return usage_tokens(reply.get("usage"))

    @staticmethod
    def fatal_message(verdict, status, error):
        if verdict == "bad_key":
            # The server's message may quote part of the key: do not repeat it.
            return f"the API server refused the credentials (HTTP {status}); check OPENAI_API_KEY"
        if verdict == "no_quota":
            return "the API account has no quota left (HTTP 429 insufficient_quota); check its billing"
        message = str(error.get("message") or "not found")[:300]
        return f"the API server answered HTTP 404: {message} (check --model and --base_url)"

    async def post(self, wire):
        return await self.call(lambda: self.sdk.post(self.path, body=wire, cast_to=self._raw))

    async def call(self, request):
        """``await request()`` (an SDK call) as a :class:`~realign.engine.Response`; a timeout
        or a lost connection raises :class:`~realign.engine.TransportError`."""
        openai = self._openai
        try:
            result = await request()
        except openai.APIStatusError as e:
            return sdk_error_response(e)
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise TransportError(e.__class__.__name__) from None
        if isinstance(result, self._raw):
            return Response(result.status_code, result.headers, json_body(result))
        return Response(200, {}, result)

    async def prepare(self, run):
        if self.check:
            await self.check_model(self.model, stopper=run.stopper)

    async def close(self):
        await self.sdk.close()

    # -- the model check --------------------------------------------------------------------

    async def get_json(self, path, stopper=None):
        """``(status, JSON or None)`` of a GET, retrying what is transient a few times."""
        try:
            response = await call_with_retries(
                lambda: self.call(lambda: self.sdk.get(path, cast_to=self._raw)), self, what=f"GET {path}",
                max_retries=self.max_retries, stopper=stopper, accept=MODEL_CHECK_STATUSES)
        except RequestFailed as e:
            if not e.refused:
                raise FatalError(f"cannot reach the API server at {self.server} ({e})") from None
            return e.status, None
        return response.status, response.body

    async def check_model(self, model, today=None, stopper=None):
        """Stop at once (FatalError) when the server does not offer ``model`` or its
        ``shutdown_date`` has passed; warn when one is coming. A server without a models
        endpoint is not checked. Decides from the list when ``GET /models/{model}`` fails
        (``vllm serve`` answers 404 there for the models it serves)."""
        today = today or datetime.datetime.now(datetime.timezone.utc).date()
        status, info = await self.get_json(f"/models/{model}", stopper)
        if not (status == 200 and isinstance(info, dict) and info.get("id")):
            status, listing = await self.get_json("/models", stopper)
            data = listing.get("data") if isinstance(listing, dict) else None
            if status != 200 or not isinstance(data, list):
                logger.info("%s has no models endpoint (HTTP %s): %s is not checked", self.server, status, model)
                return None
            offered = {entry.get("id"): entry for entry in data if isinstance(entry, dict)}
            if model not in offered:
                shown = ", ".join(sorted(str(i) for i in offered)[:MAX_LISTED_MODELS])
                more = f" and {len(offered) - MAX_LISTED_MODELS} more" if len(offered) > MAX_LISTED_MODELS else ""
                raise FatalError(f"model {model!r} is not offered by {self.server}; it offers: {shown or 'none'}{more} "
                                 "(choose one with --model, or pass --no-model_check for a gateway that accepts "
                                 "names it does not list)")
            info = offered[model]
        shutdown = parse_date(info.get("shutdown_date"))
        if shutdown is not None:
            if shutdown <= today:
                raise FatalError(f"model {model!r} was shut down on {shutdown.isoformat()}; choose a current "
                                 "model with --model (e.g. gpt-6-luna)")
            logger.warning("model %r is deprecated: it shuts down on %s", model, shutdown.isoformat())
        return info
