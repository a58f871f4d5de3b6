"""Fake OpenAI and Serper HTTP servers: offline stand-ins for the tests and the benchmarks.

(The demo's much smaller stand-ins are realign/demo.py.)

Each server is a real HTTP/1.1 server (keep-alive) on 127.0.0.1 and a random port,
served from a daemon thread, so the real clients (the `openai` SDK, `requests`) talk
to it unchanged. The module uses the standard library only. Both servers record every
request and can be told to misbehave:

- `add_fault(...)` queues a scripted fault: an HTTP error status (with `Retry-After`
  for a 429 when `retry_after` is given), a wrong 200 reply (`kind=`), and/or a slow
  reply (`delay=` seconds). Faults are consumed in order, one per request, by the
  first request they `match`; `times=None` keeps a fault forever. Without `path=` a
  fault applies to the server's main endpoints only (OpenAI: chat/completions and
  completions, and the lines of a batch, which are answered the same way; Serper:
  /search); `path="/v1/files"` (exact, no query; optionally `method="POST"`) aims it
  at another endpoint.
- `fault_rates = {"429": 0.1, "500": 0.05, "malformed": 0.05}` draws a fault at
  random for each request to a main endpoint that no scripted fault caught (seeded,
  for benchmarks; never for batch lines).
- `latency` seconds are slept by every request before it is answered (except a
  FakeOpenAIServer rate-limit 429, which is answered at once).

A request that is itself wrong (unknown path, bad key, unknown model, refused
parameter) is refused before any fault is taken. Every request is recorded in
`requests` (RecordedRequest: path with its query, lower-cased headers, parsed JSON
body, method); `max_in_flight` tells how many were answered at once.

FakeOpenAIServer serves chat/completions, completions, models, files and batches,
with opt-in parameter profiles (REASONING, LEGACY, Profile), rate limits and flex
unavailability; FakeSerperServer serves `POST /search`. See their docstrings.

Usage (a separate process for benchmarks; prints one line `PORT <n>`, then serves until
killed, and writes a `STATS {...}` line to stderr on SIGTERM or Ctrl-C):
    python tests/fake_servers.py openai --latency 0.2 --fault-rate 429=0.1 \
        --fault-rate 500=0.05 --fault-rate malformed=0.05
    python tests/fake_servers.py openai --rpm 1200 --tpm 2000000 --rate-initial 0 \
        --profile reasoning --refuse-n --model gpt-6-luna --model gpt-4o-mini:2027-01-14
    python tests/fake_servers.py serper --latency 0.05
"""

import argparse
import collections
import dataclasses
import datetime
import json
import math
import random
import re
import signal
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"
MALFORMED_REPLY = "Sure, here is a better answer, though not in the format you asked for."
REWRITE_HEADING = "**Answer**"  # marks a reply of the default chat responder
DEFAULT_SERPER_KEY = "test-serper-key"

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_OUTPUT_CAP = 4096  # output tokens a request is charged for when it sets no cap
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
REASONING_TOKENS = {"none": 0, "minimal": 8, "low": 32, "medium": 128, "high": 512}  # per choice
DEFAULT_REASONING_EFFORT = "medium"
SERVICE_TIERS = ("auto", "default", "flex", "priority")
# Listed by GET /v1/models when neither `models` nor `known_models` is set (never enforced).
DEFAULT_MODELS = {"gpt-6-luna": {}, "gpt-6-sol": {}, "gpt-4o-mini": {"shutdown_date": "2027-01-14"}}
MODEL_CREATED = 1764547200  # 2025-12-01: `created` of a listed model unless its fields say otherwise
VLLM_MAX_MODEL_LEN = 32768
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_WINDOW_S = 24 * 3600
QUEUED = ("validating", "in_progress", "finalizing")  # batch states whose tokens count as enqueued
FILE_TTL_S = 30 * 24 * 3600  # batch files expire after 30 days
RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
FLEX_UNAVAILABLE_MESSAGE = ("Resource unavailable: there is no flex capacity for this request right now. "
                            "Please retry later, or send it with service_tier 'default'.")
BATCH_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
DUPLICATE_ID_MESSAGE = ("The custom_id for this request is a duplicate of another request. "
                        "The custom_id parameter must be unique for each request in a batch.")

# Where the reformat request (constant.REFORMAT_PROMPTS) holds the original response.
_ORIGINAL_RESPONSE_RE = re.compile(
    r"^\[Original response start\]\n(.*?)\n\[Original response end\]$",
    re.IGNORECASE | re.DOTALL | re.MULTILINE)
_DATE_SUFFIX_RE = re.compile(r"^(?P<id>.+):(?P<date>\d{4}-\d{2}-\d{2})$")


@dataclass
class Fault:
    """One scripted misbehaviour; see `add_fault`."""

    status: int | None = None  # reply with this HTTP error status
    kind: str | None = None  # or reply 200 wrongly, e.g. "malformed"
    retry_after: float | None = None  # Retry-After header of the error reply
    delay: float = 0.0  # seconds to sleep before replying
    times: int | None = 1  # requests it applies to; None = forever
    match: Callable[[dict], bool] | None = None  # which request bodies; None = all
    path: str | None = None  # which endpoint (exact, no query); None = the main ones
    method: str | None = None  # with `path`: which method; None = any
    error: dict | None = None  # the error body's message / code / param, where not the status's default


@dataclass
class RecordedRequest:
    path: str  # as sent, with any query string
    headers: dict  # header names lower-cased
    body: dict | list | None  # parsed JSON (an upload: its form fields); None when not JSON
    method: str = "POST"


@dataclass(frozen=True)
class Profile:
    """Which request fields a model refuses, and how its replies bill and cap output.

    The defaults accept everything, as an unconfigured server does. Combine with
    `dataclasses.replace`, e.g. `replace(REASONING, max_n=1)`.
    """

    name: str = "accept-all"
    unrecognized: tuple = ()  # fields refused as unknown arguments: 400, param null (LEGACY)
    refuse_max_tokens: bool = False  # 400 "Use 'max_completion_tokens' instead"
    default_sampling_only: bool = False  # temperature / top_p other than 1: 400
    reasoning_efforts: tuple = ()  # accepted reasoning_effort values; () = any, no reasoning tokens
    service_tiers: tuple = ()  # accepted service_tier values; replies carry service_tier; () = any
    max_n: int | None = None  # n above it: 400 param "n"
    enforce_cap: bool = False  # reasoning + visible tokens stop at the output cap (finish "length")


ACCEPT_ALL = Profile()
REASONING = Profile("reasoning", refuse_max_tokens=True, default_sampling_only=True,
                    reasoning_efforts=REASONING_EFFORTS, service_tiers=SERVICE_TIERS, enforce_cap=True)
LEGACY = Profile("legacy", unrecognized=("max_completion_tokens", "reasoning_effort", "service_tier"))
PROFILES = {"accept-all": ACCEPT_ALL, "reasoning": REASONING, "legacy": LEGACY}


def openai_duration(seconds):
    """A duration as OpenAI's reset headers and messages write it: "12ms", "1s", "6m0s",
    "1m30.5s" (rounded to the millisecond)."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    return f"{hours}h" + text if hours else text


class _FakeServer:
    """Serving, recording and fault machinery shared by both fake servers."""

    FAULT_KINDS = ()  # the `kind=` values a server understands
    METHODS = ("POST",)  # others are answered 501, unrecorded
    MAIN_PATHS = ()  # where faults without `path=` and `fault_rates` apply

    def __init__(self, latency=0.0, fault_rates=None, fault_retry_after=None, seed=0):
        self.latency = latency
        self.fault_rates = dict(fault_rates or {})
        self.fault_retry_after = fault_retry_after  # Retry-After of random 429s
        self.rng = random.Random(seed)
        self.requests = []
        self.fault_counts = collections.Counter()  # faults served, by label ("429", "malformed")
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = None
        self._faults = []
        self._lock = threading.Lock()
        self._httpd = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self, port=0):
        self._httpd = _HTTPServer((HOST, port), _Handler)
        self._httpd.fake = self
        self.port = self._httpd.server_address[1]
        # A short poll interval makes stop() quick (the default waits up to 0.5 s).
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def request_count(self):
        return len(self.requests)

    def requests_to(self, *paths):
        """The recorded requests to these paths (query ignored); default: the main ones."""
        paths = paths or self.MAIN_PATHS
        return [r for r in self.requests if urllib.parse.urlsplit(r.path).path in paths]

    def stats(self):
        """Counts for a benchmark's summary line."""
        return {"requests": self.request_count, "main_requests": len(self.requests_to()),
                "faults": dict(self.fault_counts), "max_in_flight": self.max_in_flight}

    # -- faults ------------------------------------------------------------------

    def add_fault(self, status=None, *, kind=None, retry_after=None, delay=0.0, times=1,
                  match=None, path=None, method=None, message=None, code=None, param=None):
        """Queue a fault for the next request(s) whose JSON body satisfies `match`.

        Give an error `status`, a wrong-reply `kind` (one of FAULT_KINDS), or only a
        `delay` (a slow but normal reply). `path` (exact, without query) and `method`
        aim it at another endpoint than the main ones. Returns the Fault; its `times`
        counts down.
        """
        error = {name: value for name, value in (("message", message), ("code", code), ("param", param))
                 if value is not None}
        fault = Fault(status, kind, retry_after, delay, times, match, path, method, error or None)
        self._check_fault(fault)
        with self._lock:
            self._faults.append(fault)
        return fault

    def _check_fault(self, fault):
        if fault.status is not None and fault.kind is not None:
            raise ValueError("a fault has a status or a kind, not both")
        if fault.kind is not None and fault.kind not in self.FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; known: {self.FAULT_KINDS}")
        if fault.kind is not None and fault.path is not None and fault.path not in self.MAIN_PATHS:
            raise ValueError(f"a fault kind applies to {', '.join(self.MAIN_PATHS)} only")
        if fault.method is not None and fault.path is None:
            raise ValueError("method= needs path=")

    def fault_from_label(self, label):
        """The fault a `fault_rates` key stands for: "429", "500", "malformed", ..."""
        if label.isdigit():
            retry_after = self.fault_retry_after if label == "429" else None
            fault = Fault(status=int(label), retry_after=retry_after)
        else:
            fault = Fault(kind=label)
        self._check_fault(fault)
        return fault

    def _aims_at(self, fault, route, method):
        if fault.path is None:
            return route in self.MAIN_PATHS
        return fault.path == route and (fault.method is None or fault.method == method)

    def _next_fault(self, body, route, method="POST", draw=True):
        """Take the first queued fault aimed at `route` whose `match` accepts `body`, else
        (when `draw` and `route` is a main path) draw one from fault_rates."""
        with self._lock:
            for fault in self._faults:
                if self._aims_at(fault, route, method) and (fault.match is None or fault.match(body)):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
            if not draw or route not in self.MAIN_PATHS:
                return None
            draw = self.rng.random()
        for label, rate in self.fault_rates.items():
            draw -= rate
            if draw < 0:
                return self.fault_from_label(label)
        return None

    def _count_fault(self, fault):
        with self._lock:
            self.fault_counts[str(fault.status or fault.kind or "delay")] += 1

    def _record(self, method, path, headers, body):
        with self._lock:
            self.requests.append(RecordedRequest(path, headers, body, method))

    # -- one request -------------------------------------------------------------

    def handle(self, method, path, headers, body, raw=b""):
        """Record one request and answer it: returns (status, payload, extra headers).

        A str payload is sent as it is (a broken reply), bytes as they are (with the
        Content-Type of the extra headers), anything else as JSON.
        """
        self._record(method, path, headers, body)
        time.sleep(self.latency)
        refusal = self.refuse(path, headers, body)
        if refusal is not None:
            return refusal
        fault = self._next_fault(body, urllib.parse.urlsplit(path).path, method)
        if fault is None:
            return 200, self.reply(path, body, kind=None), {}
        self._count_fault(fault)
        time.sleep(fault.delay)
        if fault.status is None:
            return 200, self.reply(path, body, kind=fault.kind), {}
        return fault.status, self.error_payload(fault.status, **(fault.error or {})), _retry_after(fault)

    def refuse(self, path, headers, body):
        """(status, payload, headers) when the request itself is wrong, else None."""
        raise NotImplementedError

    def reply(self, path, body, kind):
        """The 200 payload, made wrong in the way `kind` says."""
        raise NotImplementedError

    def error_payload(self, status, message=None, code=None, **fields):
        raise NotImplementedError


def _retry_after(fault):
    return {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 resets connections under load
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every reply has a Content-Length
    disable_nagle_algorithm = True

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")

    def _serve(self, method):
        fake = self.server.fake
        if method not in fake.METHODS:
            self.send_error(501, f"Unsupported method ({method!r})")
            return
        with fake._lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            raw = self._read_body()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                status, payload, extra = fake.handle(method, self.path, headers, body, raw)
            except Exception as e:  # noqa: BLE001 -- a broken responder: fail loudly, but answer
                traceback.print_exc()
                status, payload, extra = 500, fake.error_payload(500, f"fake server: {e!r}"), {}
            self._send(status, payload, extra)
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _send(self, status, payload, extra_headers):
        extra_headers = dict(extra_headers)
        content_type = extra_headers.pop("Content-Type", "application/json")
        if isinstance(payload, bytes):
            data = payload
        else:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra_headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout) while we slept
            self.close_connection = True

    def log_message(self, *args):  # silence the per-request log on stderr
        pass


# -- OpenAI ------------------------------------------------------------------------


def _text(content):
    """The text of a message's content: a str or a list of content parts."""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content or [])


def _count_words(text):
    return len(text.split())


def _first_words(text, count):
    """`text` cut after its first `count` whitespace-separated words (layout kept)."""
    if count <= 0:
        return ""
    match = re.match(r"\s*(?:\S+\s+){%d}" % (count - 1) + r"\S+", text)
    return match.group(0) if match else text


def find_original_response(text):
    """The text between "[Original response start]" and "[Original response end]" lines,
    else the whole text."""
    match = _ORIGINAL_RESPONSE_RE.search(text)
    return (match.group(1) if match else text).strip()


def default_chat_reply(body, choice_index):
    """Accept the format and echo the original response under REWRITE_HEADING: a JSON object
    when the request asks for one by a JSON schema (reformat.py --reply_format json)."""
    user_texts = [_text(m.get("content")) for m in body["messages"] if m.get("role") == "user"]
    original = find_original_response(user_texts[-1] if user_texts else "")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return json.dumps({"reasoning": "The format fits the question.",
                           "revised_response": f"{REWRITE_HEADING}\n\n{original}"})
    return ("Reasoning: The format fits the question.\n"
            f"Revised response: {REWRITE_HEADING}\n\n{original}")


def default_completion_reply(body, choice_index):
    return " open_qa"


def _positive_int(value, default):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def output_cap(body):
    """The output cap a request sets: max_completion_tokens, else max_tokens, else None."""
    for name in ("max_completion_tokens", "max_tokens"):
        cap = _positive_int(body.get(name), None)
        if cap is not None:
            return cap
    return None


def _quoted_list(values):
    quoted = [f"'{v}'" for v in values]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 2 else " and ".join(quoted)


def _shown(value):
    """A request value as OpenAI's messages quote it: 0.3, 'extreme'."""
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)


def _new_id(prefix):
    return prefix + uuid.uuid4().hex[:24]


def parse_form(raw, content_type):
    """A multipart/form-data body: ({name: str}, {name: (filename, bytes)})."""
    from email import policy
    from email.parser import BytesParser

    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart():
        raise ValueError("the body is not multipart/form-data")
    fields, files = {}, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None:
            fields[name] = data.decode("utf-8", "replace")
        else:
            files[name] = (filename, data)
    return fields, files


class _Bucket:
    """A token bucket refilled continuously at limit/60 per second (see set_rate_limits)."""

    def __init__(self, limit, burst_seconds, initial, debt_seconds):
        self.limit = int(limit)
        self.rate = limit / 60.0
        self.capacity = max(limit * burst_seconds / 60.0, 1.0)
        self.floor = -limit * debt_seconds / 60.0
        self.level = initial * self.capacity
        self.stamp = None  # the first arrival starts the clock

    def refill(self, now):
        if self.stamp is not None and now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        if self.stamp is None or now > self.stamp:
            self.stamp = now

    def wait(self, cost):
        """Seconds until the bucket holds `cost`; inf when it never can."""
        if cost > self.capacity:
            return math.inf
        return max(0.0, (cost - self.level) / self.rate)

    def take(self, cost):
        self.level = max(self.level - cost, self.floor)

    def headers(self, dimension):
        return {f"x-ratelimit-limit-{dimension}": str(self.limit),
                f"x-ratelimit-remaining-{dimension}": str(max(0, math.floor(self.level))),
                f"x-ratelimit-reset-{dimension}": openai_duration((self.capacity - self.level) / self.rate)}


@dataclass
class StoredFile:
    """A file of the fake Files API (uploaded, or a batch's output or error file)."""

    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    deleted: bool = False

    def to_json(self):
        expires_at = self.created_at + FILE_TTL_S if self.purpose.startswith("batch") else None
        return {"id": self.id, "object": "file", "bytes": len(self.content), "created_at": self.created_at,
                "expires_at": expires_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "status_details": None}


@dataclass
class StoredBatch:
    """A batch of the fake Batch API; its state moves on when it is looked at."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict | None
    created: float  # clock time
    timing: dict  # validate_s, per_line_s, finalize_s, cancel_s, expire_after_s, expire_after_lines
    lines: list  # (custom_id, body) of a valid file
    errors: list  # validation errors; the batch fails when any
    order: list  # the (seeded, shuffled) order in which the lines are answered
    model: str | None = None
    tokens: int = 0  # prompt tokens of its lines, what the enqueued-token limit counts
    status: str = "validating"
    stamps: dict = field(default_factory=dict)  # in_progress_at, ... (clock time)
    cancel_at: float | None = None
    done: int = 0  # lines answered so far
    outputs: list = field(default_factory=list)  # output-file lines, in answering order
    failures: list = field(default_factory=list)  # error-file lines
    usage: collections.Counter = field(default_factory=collections.Counter)
    output_file_id: str | None = None
    error_file_id: str | None = None


class FakeOpenAIServer(_FakeServer):
    """A fake OpenAI API: `POST {url}/chat/completions`, `POST {url}/completions`, the
    models endpoints and the Batch API (files and batches).

    `url` is "http://127.0.0.1:PORT/v1", the SDK's `base_url`. Replies have the real
    shape: `id`, `object`, `created`, `model` (echoed), `n` choices (index 0..n-1,
    each with a `finish_reason`) and `usage` (whitespace-separated words, with
    `prompt_tokens_details: {"cached_tokens": 0}`).

    Script replies with `chat_responder` / `completion_responder`, each
    `fn(body, choice_index) -> str | {"content": str, "finish_reason": str}`; for a
    list `prompt` the completion responder sees one prompt at a time in
    `body["prompt"]`. The defaults: `default_chat_reply` answers
    "Reasoning: The format fits the question.\\nRevised response: **Answer**\\n\\n"
    followed by the original response found in the last user message (see
    `find_original_response`); `default_completion_reply` answers " open_qa".

    Fault kinds: "malformed" (200, content without "Revised response:") and
    "truncated" (200, the reply cut in half, finish_reason "length"); both apply
    to every choice. Set `expected_key` to demand `Authorization: Bearer <key>` on
    every endpoint (else 401) and `known_models` to reject other models (404
    model_not_found).

    Opt-in behaviour (attributes; the defaults keep a plain accept-all server):

    - `profiles`: {model: Profile or profile name, "*": for every other model}; None
      (default) = ACCEPT_ALL. REASONING refuses `max_tokens` (400 unsupported_parameter)
      and temperature/top_p other than 1 (400 unsupported_value), checks
      `reasoning_effort` (none, minimal, low, medium, high) and `service_tier` (auto,
      default, flex, priority; the reply carries "service_tier", auto -> "default"),
      bills `completion_tokens_details.reasoning_tokens` per choice (REASONING_TOKENS,
      medium when absent) inside `completion_tokens`, and stops reasoning + content at
      the output cap (max_completion_tokens, else max_tokens; finish_reason "length").
      LEGACY refuses max_completion_tokens, reasoning_effort and service_tier with 400
      "Unrecognized request argument(s) supplied: ..." (param null). `Profile(max_n=1)`
      refuses n > 1 (400 param "n", unsupported_value). Both completion endpoints and
      batch lines obey the profile.
    - `models`: {id: extra fields, e.g. {"shutdown_date": "2027-01-14"}} listed by
      GET /v1/models[/{id}] (fields "created", "owned_by" override the defaults
      MODEL_CREATED, "system"); a model on or after its shutdown_date is gone from
      both and its requests get 404 model_not_found. When set, other models are unknown
      (404) too. None (default): the list shows `known_models`, else DEFAULT_MODELS,
      and nothing is enforced.
    - `today`: the date shutdown dates are compared with (date or "YYYY-MM-DD"); None = today.
    - `models_endpoint`: "openai" (default), "vllm" (like `vllm serve`: the list has
      owned_by "vllm", root, parent, max_model_len; GET /v1/models/{id} is 404
      {"detail": "Not Found"}), "none" (both routes 404).
    - `set_rate_limits(rpm, tpm, ...)` (or the constructor's rpm=, tpm=,
      rate_burst_seconds=, rate_initial=, rate_debt_seconds=): OpenAI-like limits on
      the two completion endpoints; see its docstring. `rate_limit_retry_after`
      (default False): send retry-after-ms and retry-after with rate-limit 429s.
      `rate_limited` counts them by dimension ("requests", "tokens").
    - `flex_unavailable`: a probability (seeded draw) or `fn(body) -> bool`; a request
      with service_tier "flex" it picks gets 429 code "resource_unavailable". Default 0.
    - `clock`: the time source (seconds; default time.time) of rate limits and batches.

    Batch API (always served unless `batch_api = False`, which makes its routes 404):
    POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content,
    POST/GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel. The
    uploads and the output/error files are in `files` ({id: StoredFile}), the batches
    in `batches` ({id: StoredBatch}), in creation order. A batch is "validating" when
    created; each look at it moves it on by the clock: `batch_validate_s` (0), then
    "failed" (a bad input file: errors.data with code, message, param, line) or
    "in_progress" with one line answered every `batch_seconds_per_line` (0; or
    `batch_duration_s` for all lines, when set), then "finalizing" for
    `batch_finalize_s` (0), then "completed". Lines are answered in a seeded shuffled
    order, like online requests (profiles, known models, scripted faults; no
    latency, rate limits, flex or fault_rates), and written in that order to the
    output file (200s) or the error file (other statuses). `batch_failures`: a
    fraction or `fn(custom_id) -> bool | status` of lines that fail with 500.
    `batch_expire_after_s` (after creation) / `batch_expire_after_lines`: the batch
    "expired", unanswered lines in the error file with code "batch_expired".
    Cancelling: "cancelling" for `batch_cancel_s` (0), then "cancelled" with the lines
    answered so far. `batch_token_limit`: the enqueued-token limit (prompt tokens of the
    validating, in-progress and finalizing batches); a batch that would pass it fails
    with code "token_limit_exceeded". The timing attributes are read when a batch is
    created; `seed` also seeds `batch_rng` (line order, batch_failures draws).

    `stats()` adds "rate_limited" ({dimension: count}), "uploads" (files with purpose
    "batch") and "batches" (batches created).
    """

    FAULT_KINDS = ("malformed", "truncated")
    METHODS = ("GET", "POST", "DELETE")
    MAIN_PATHS = COMPLETION_PATHS

    def __init__(self, rpm=None, tpm=None, rate_burst_seconds=60.0, rate_initial=1.0,
                 rate_debt_seconds=1.0, seed=0, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.chat_responder = default_chat_reply
        self.completion_responder = default_completion_reply
        self.expected_key = None
        self.known_models = None
        self.models = None
        self.today = None
        self.models_endpoint = "openai"
        self.profiles = None
        self.flex_unavailable = 0.0
        self.rate_limit_retry_after = False
        self.rate_limited = collections.Counter()
        self.clock = time.time
        self.batch_api = True
        self.batch_validate_s = 0.0
        self.batch_seconds_per_line = 0.0
        self.batch_duration_s = None
        self.batch_finalize_s = 0.0
        self.batch_cancel_s = 0.0
        self.batch_expire_after_s = None
        self.batch_expire_after_lines = None
        self.batch_failures = None
        self.batch_token_limit = None
        self.batch_rng = random.Random(seed)  # batch line order and batch_failures draws
        self.files = {}
        self.batches = {}
        self._rate_limits = None
        self._rate_lock = threading.Lock()
        self._batch_lock = threading.RLock()
        self.set_rate_limits(rpm, tpm, rate_burst_seconds, rate_initial, rate_debt_seconds)

    @property
    def url(self):
        return f"http://{HOST}:{self.port}/v1"

    def stats(self):
        stats = super().stats()
        with self._batch_lock:
            uploads = sum(f.purpose == "batch" for f in self.files.values())
            batches = len(self.batches)
        return {**stats, "rate_limited": dict(self.rate_limited), "uploads": uploads, "batches": batches}

    # -- configuration -----------------------------------------------------------------

    def set_rate_limits(self, rpm=None, tpm=None, burst_seconds=60.0, initial=1.0, debt_seconds=1.0):
        """Limit the completion endpoints to `rpm` requests and `tpm` tokens a minute
        (None: that dimension unlimited; both None: no limits, no headers).

        One key for the whole server. Each dimension is a bucket refilled at limit/60
        per second up to limit*burst_seconds/60 (at least 1), starting `initial` full
        (a fraction) at the first arrival. A request costs 1 request and prompt words
        + n x prompts x output cap tokens (prompts: of a list `prompt`, else 1; cap:
        max_completion_tokens, else max_tokens, else DEFAULT_OUTPUT_CAP), checked when it arrives: admitted when both buckets
        hold its cost, else 429 (code rate_limit_exceeded, type "requests"/"tokens",
        at once). Every arrival takes its cost, down to -(limit*debt_seconds/60). Every
        reply after the key check carries x-ratelimit-limit/remaining/reset-* of the
        limited dimensions (remaining: floor of the level after the arrival, >= 0;
        reset: until full, e.g. "1m30.5s"). A bad key or a body that is not a JSON
        object is refused before, without headers.
        """
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if not burst_seconds > 0 or not 0 <= initial <= 1 or not debt_seconds >= 0:
            raise ValueError("need burst_seconds > 0, 0 <= initial <= 1 and debt_seconds >= 0")
        buckets = {dimension: _Bucket(limit, burst_seconds, initial, debt_seconds)
                   for dimension, limit in (("requests", rpm), ("tokens", tpm)) if limit is not None}
        with self._rate_lock:
            self._rate_limits = buckets or None

    def _profile(self, model):
        profiles = self.profiles or {}
        profile = profiles.get(model, profiles.get("*", ACCEPT_ALL))
        return PROFILES[profile] if isinstance(profile, str) else profile

    def _today(self):
        if self.today is None:
            return datetime.date.today()
        if isinstance(self.today, str):
            return datetime.date.fromisoformat(self.today)
        return self.today

    def _shut_down(self, fields):
        date = (fields or {}).get("shutdown_date")
        return date is not None and datetime.date.fromisoformat(date) <= self._today()

    def _catalogue(self):
        """{id: extra fields} of the models listed, shut-down ones left out."""
        if self.models is not None:
            return {m: f for m, f in self.models.items() if not self._shut_down(f)}
        if self.known_models is not None:
            return {m: {} for m in sorted(self.known_models)}
        return dict(DEFAULT_MODELS)

    # -- one request -------------------------------------------------------------------

    def handle(self, method, path, headers, body, raw=b""):
        split = urllib.parse.urlsplit(path)
        route, query = split.path, dict(urllib.parse.parse_qsl(split.query))
        form = None
        if headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = parse_form(raw, headers["content-type"])
            except ValueError:
                form = None
            else:
                fields, files = form
                body = {**fields, **{name: {"filename": fn, "bytes": len(data)}
                                     for name, (fn, data) in files.items()}}
        self._record(method, path, headers, body)
        if method == "POST" and route in COMPLETION_PATHS:
            return self._online(route, headers, body)
        time.sleep(self.latency)
        return self._resource(method, route, query, headers, body, form)

    def _authorized(self, headers):
        return self.expected_key is None or headers.get("authorization") == f"Bearer {self.expected_key}"

    def _online(self, route, headers, body):
        early = None
        if not isinstance(body, dict):
            early = 400, self.error_payload(400, "The body is not a JSON object."), {}
        elif not self._authorized(headers):
            early = 401, self.error_payload(401), {}
        limit_headers = {}
        if early is None:
            refusal, limit_headers = self._admit(route, body)
            if refusal is not None:
                return refusal
        time.sleep(self.latency)
        if early is not None:
            return early
        status, payload, extra = self._answer(route, body, online=True)
        return status, payload, {**limit_headers, **extra}

    def _answer(self, route, body, online, fail_status=None, reply_id=None):
        """(status, payload, headers) of one completion request or batch line."""
        refusal = self._refuse_model(body) or self._refuse_params(body)
        if refusal is not None:
            return refusal
        if online and body.get("service_tier") == "flex" and self._flex_refused(body):
            with self._lock:
                self.fault_counts["resource_unavailable"] += 1
            return 429, self.error_payload(429, FLEX_UNAVAILABLE_MESSAGE, "resource_unavailable",
                                           type="server_error"), {}
        if fail_status is not None:
            return fail_status, self.error_payload(fail_status), {}
        fault = self._next_fault(body, route, "POST", draw=online)
        if fault is None:
            return 200, self.reply(route, body, kind=None, reply_id=reply_id), {}
        self._count_fault(fault)
        if online:
            time.sleep(fault.delay)
        if fault.status is None:
            return 200, self.reply(route, body, kind=fault.kind, reply_id=reply_id), {}
        return fault.status, self.error_payload(fault.status, **(fault.error or {})), _retry_after(fault)

    def _flex_refused(self, body):
        rule = self.flex_unavailable
        if callable(rule):
            return bool(rule(body))
        with self._lock:
            return bool(rule) and self.rng.random() < rule

    def _refuse_model(self, body):
        model = body.get("model")
        known = ((self.known_models is None or model in self.known_models)
                 and (self.models is None or model in self.models))
        if not known:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return 404, self.error_payload(404, message, "model_not_found"), {}
        if self.models is not None and self._shut_down(self.models[model]):
            message = (f"The model `{model}` has been deprecated, learn more here: "
                       "https://platform.openai.com/docs/deprecations")
            return 404, self.error_payload(404, message, "model_not_found"), {}
        return None

    def _refuse_params(self, body):
        profile = self._profile(body.get("model"))

        def refused(message, param, code):
            return 400, self.error_payload(400, message, code, param=param), {}

        unknown = [name for name in profile.unrecognized if name in body]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            return refused(f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}", None, None)
        if profile.refuse_max_tokens and body.get("max_tokens") is not None:
            return refused("Unsupported parameter: 'max_tokens' is not supported with this model. "
                           "Use 'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
        if profile.default_sampling_only:
            for name in ("temperature", "top_p"):
                value = body.get(name)
                if value is not None and value != 1:
                    return refused(f"Unsupported value: '{name}' does not support {_shown(value)} with "
                                   "this model. Only the default (1) value is supported.",
                                   name, "unsupported_value")
        for name, accepted in (("reasoning_effort", profile.reasoning_efforts),
                               ("service_tier", profile.service_tiers)):
            value = body.get(name)
            if accepted and value is not None and value not in accepted:
                return refused(f"Unsupported value: '{name}' does not support {_shown(value)} with this "
                               f"model. Supported values are: {_quoted_list(accepted)}.", name, "unsupported_value")
        n = body.get("n")
        if profile.max_n is not None and isinstance(n, int) and n > profile.max_n:
            supported = "Only 1 is supported." if profile.max_n == 1 else f"At most {profile.max_n} are supported."
            return refused(f"Unsupported value: 'n' does not support {n} with this model. {supported}",
                           "n", "unsupported_value")
        return None

    # -- rate limits -------------------------------------------------------------------

    @staticmethod
    def _prompt_texts(route, body):
        if route == "/v1/chat/completions":
            return [_text(m.get("content")) for m in body.get("messages", [])]
        prompts = body.get("prompt", "")
        return prompts if isinstance(prompts, list) else [prompts]

    def _token_cost(self, route, body):
        try:
            texts = self._prompt_texts(route, body)
            prompt_tokens = sum(_count_words(t) for t in texts)
        except (AttributeError, TypeError):
            texts, prompt_tokens = [""], 0
        prompts = len(texts) if route == "/v1/completions" else 1
        return prompt_tokens + _positive_int(body.get("n"), 1) * prompts * (output_cap(body) or DEFAULT_OUTPUT_CAP)

    def _admit(self, route, body):
        """Charge one arrival to the rate limits: (a 429 reply or None, the limit headers)."""
        with self._rate_lock:
            buckets = self._rate_limits
            if buckets is None:
                return None, {}
            costs = {"requests": 1, "tokens": self._token_cost(route, body)}
            now = self.clock()
            for bucket in buckets.values():
                bucket.refill(now)
            short = next((d for d, b in buckets.items() if b.level + 1e-9 < costs[d]), None)  # float noise
            if short is not None:
                bucket, cost = buckets[short], costs[short]
                message, wait = self._limit_message(short, bucket, cost, body.get("model")), bucket.wait(cost)
                self.rate_limited[short] += 1
            for dimension, bucket in buckets.items():
                bucket.take(costs[dimension])
            headers = {}
            for dimension, bucket in buckets.items():
                headers.update(bucket.headers(dimension))
        if short is None:
            return None, headers
        if self.rate_limit_retry_after and wait != math.inf:
            ms = math.ceil(round(wait * 1000, 6))  # rounded first: float noise is not a millisecond
            headers.update({"retry-after-ms": str(ms), "retry-after": str(math.ceil(ms / 1000))})
        payload = self.error_payload(429, message, "rate_limit_exceeded", type=short)
        return (429, payload, headers), headers

    @staticmethod
    def _limit_message(dimension, bucket, cost, model):
        unit = "requests per min (RPM)" if dimension == "requests" else "tokens per min (TPM)"
        where = f"{model} in organization org-standin on {unit}"
        if cost > bucket.capacity:
            return (f"Request too large for {where}: Limit {bucket.limit}, Requested {cost}. The input or "
                    f"output tokens must be reduced in order to run successfully. Visit {RATE_LIMITS_URL} "
                    "to learn more.")
        used = max(0, math.ceil(bucket.capacity - bucket.level))
        return (f"Rate limit reached for {where}: Limit {bucket.limit}, Used {used}, Requested {cost}. "
                f"Please try again in {openai_duration(bucket.wait(cost))}. Visit {RATE_LIMITS_URL} to learn more.")

    # -- replies -----------------------------------------------------------------------

    def reply(self, path, body, kind, reply_id=None):
        n = body.get("n") or 1
        profile = self._profile(body.get("model"))
        prompt_texts = self._prompt_texts(path, body)
        if path == "/v1/chat/completions":
            jobs = [(body, i) for i in range(n)]
            responder, obj = self.chat_responder, "chat.completion"
        else:
            jobs = [({**body, "prompt": p}, i) for p in prompt_texts for i in range(n)]
            responder, obj = self.completion_responder, "text_completion"
        reasoning = 0
        if profile.reasoning_efforts:
            reasoning = REASONING_TOKENS.get(body.get("reasoning_effort") or DEFAULT_REASONING_EFFORT, 0)
        cap = output_cap(body) if profile.enforce_cap else None
        choices, completion_tokens, reasoning_tokens = [], 0, 0
        for index, (job_body, choice_index) in enumerate(jobs):
            content, finish_reason = self._choice(responder(job_body, choice_index), kind)
            thought = reasoning
            if cap is not None and thought + _count_words(content) > cap:
                thought = min(thought, cap)
                content, finish_reason = _first_words(content, cap - thought), "length"
            completion_tokens += _count_words(content) + thought
            reasoning_tokens += thought
            if obj == "chat.completion":
                message = {"role": "assistant", "content": content}
                choices.append({"index": index, "message": message,
                                "finish_reason": finish_reason, "logprobs": None})
            else:
                choices.append({"index": index, "text": content,
                                "finish_reason": finish_reason, "logprobs": None})
        prompt_tokens = sum(_count_words(t) for t in prompt_texts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        if profile.reasoning_efforts:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        payload = {"id": reply_id or f"fake-{self.request_count}", "object": obj, "created": int(time.time()),
                   "model": body.get("model"), "choices": choices, "usage": usage}
        if profile.service_tiers:
            tier = body.get("service_tier")
            payload["service_tier"] = tier if tier in ("default", "flex", "priority") else "default"
        return payload

    @staticmethod
    def _choice(reply, kind):
        """(content, finish_reason) of one responder reply, spoilt by `kind`."""
        if isinstance(reply, str):
            reply = {"content": reply}
        content, finish_reason = reply["content"], reply.get("finish_reason", "stop")
        if kind == "malformed":
            return MALFORMED_REPLY, "stop"
        if kind == "truncated":
            return content[: len(content) // 2], "length"
        return content, finish_reason

    def error_payload(self, status, message=None, code=None, *, param=None, type=None):
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        default_type, default_code, default_message = _OPENAI_ERRORS.get(
            status, ("server_error", None, "The server had an error processing your request."))
        return {"error": {"message": message or default_message, "type": type or default_type,
                          "param": param, "code": code or default_code}}

    # -- models, files, batches -----------------------------------------------------------

    _ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in (
        ("GET", r"/v1/models", "_list_models"),
        ("GET", r"/v1/models/(?P<id>.+)", "_retrieve_model"),
        ("POST", r"/v1/files", "_create_file"),
        ("GET", r"/v1/files", "_list_files"),
        ("GET", r"/v1/files/(?P<id>[^/]+)", "_retrieve_file"),
        ("DELETE", r"/v1/files/(?P<id>[^/]+)", "_delete_file"),
        ("GET", r"/v1/files/(?P<id>[^/]+)/content", "_file_content"),
        ("POST", r"/v1/batches", "_create_batch"),
        ("GET", r"/v1/batches", "_list_batches"),
        ("GET", r"/v1/batches/(?P<id>[^/]+)", "_retrieve_batch"),
        ("POST", r"/v1/batches/(?P<id>[^/]+)/cancel", "_cancel_batch"),
    )]

    def _served(self, name):
        if name == "_list_models":
            return self.models_endpoint in ("openai", "vllm")
        if name == "_retrieve_model":
            return self.models_endpoint == "openai"
        return self.batch_api

    def _resource(self, method, route, query, headers, body, form):
        for route_method, pattern, name in self._ROUTES:
            match = pattern.fullmatch(route)
            if route_method == method and match and self._served(name):
                break
        else:
            if method == "GET" and route.startswith("/v1/models/") and self.models_endpoint == "vllm":
                return 404, {"detail": "Not Found"}, {}
            return 404, self.error_payload(404, f"Unknown path {route}", "unknown_url"), {}
        if not self._authorized(headers):
            return 401, self.error_payload(401), {}
        fault = self._next_fault(body, route, method, draw=False)
        if fault is not None:
            self._count_fault(fault)
            time.sleep(fault.delay)
            if fault.status is not None:
                return fault.status, self.error_payload(fault.status, **(fault.error or {})), _retry_after(fault)
        ids = {key: urllib.parse.unquote(value) for key, value in match.groupdict().items()}
        return getattr(self, name)(ids, query, body, form)

    def _model_object(self, model_id, fields):
        if self.models_endpoint == "vllm":
            return {"id": model_id, "object": "model", "created": fields.get("created", MODEL_CREATED),
                    "owned_by": "vllm", "root": model_id, "parent": None,
                    "max_model_len": fields.get("max_model_len", VLLM_MAX_MODEL_LEN)}
        return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "system", **fields}

    def _list_models(self, ids, query, body, form):
        data = [self._model_object(m, f) for m, f in self._catalogue().items()]
        return 200, {"object": "list", "data": data}, {}

    def _retrieve_model(self, ids, query, body, form):
        catalogue = self._catalogue()
        if ids["id"] not in catalogue:
            message = f"The model `{ids['id']}` does not exist or you do not have access to it."
            return 404, self.error_payload(404, message, "model_not_found"), {}
        return 200, self._model_object(ids["id"], catalogue[ids["id"]]), {}

    def _bad_request(self, message, param=None, code=None, status=400):
        return status, self.error_payload(status, message, code, param=param), {}

    def _no_such_file(self, file_id):
        return self._bad_request(f"No such File object: {file_id}", "id", status=404)

    def _store_file(self, filename, purpose, content):
        with self._batch_lock:
            stored = StoredFile(_new_id("file-"), filename, purpose, content, int(self.clock()))
            self.files[stored.id] = stored
        return stored

    def _live_file(self, file_id):
        stored = self.files.get(file_id)
        return None if stored is None or stored.deleted else stored

    def _create_file(self, ids, query, body, form):
        if form is None:
            return self._bad_request("The body must be multipart/form-data with fields 'purpose' and 'file'.")
        fields, files = form
        if "purpose" not in fields:
            return self._bad_request("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        if "file" not in files:
            return self._bad_request("Missing required parameter: 'file'.", "file", "missing_required_parameter")
        purpose, (filename, content) = fields["purpose"], files["file"]
        if purpose not in FILE_PURPOSES:
            return self._bad_request(f"Invalid value for 'purpose': {purpose!r}. Supported values are: "
                                     f"{_quoted_list(FILE_PURPOSES)}.", "purpose", "invalid_value")
        if purpose == "batch" and not filename.endswith(".jsonl"):
            return self._bad_request("Invalid file format for Batch API. Must be .jsonl", "file")
        return 200, self._store_file(filename, purpose, content).to_json(), {}

    def _list_files(self, ids, query, body, form):
        with self._batch_lock:
            data = [f.to_json() for f in self.files.values()
                    if not f.deleted and query.get("purpose") in (None, f.purpose)]
        return 200, _page(data, query, newest_first=query.get("order", "desc") == "desc"), {}

    def _retrieve_file(self, ids, query, body, form):
        stored = self._live_file(ids["id"])
        return (200, stored.to_json(), {}) if stored else self._no_such_file(ids["id"])

    def _file_content(self, ids, query, body, form):
        stored = self._live_file(ids["id"])
        if stored is None:
            return self._no_such_file(ids["id"])
        return 200, stored.content, {"Content-Type": "application/octet-stream"}

    def _delete_file(self, ids, query, body, form):
        with self._batch_lock:
            stored = self._live_file(ids["id"])
            if stored is None:
                return self._no_such_file(ids["id"])
            stored.deleted = True
        return 200, {"id": stored.id, "object": "file", "deleted": True}, {}

    def _create_batch(self, ids, query, body, form):
        if not isinstance(body, dict):
            return self._bad_request("The body is not a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if name not in body:
                return self._bad_request(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        endpoint, window = body["endpoint"], body["completion_window"]
        if endpoint not in COMPLETION_PATHS:
            return self._bad_request(f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: "
                                     f"{_quoted_list(COMPLETION_PATHS)}.", "endpoint", "invalid_value")
        if window != "24h":
            return self._bad_request(f"Invalid value for 'completion_window': {window!r}. Supported values "
                                     "are: '24h'.", "completion_window", "invalid_value")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            return self._bad_request("Invalid type for 'metadata': expected an object.", "metadata", "invalid_type")
        with self._batch_lock:
            stored = self._live_file(body["input_file_id"])
            if stored is None:
                return self._bad_request(f"No such File object: {body['input_file_id']}", "input_file_id",
                                         status=404)
            if stored.purpose != "batch":
                return self._bad_request(f"File {stored.id} has purpose {stored.purpose!r}; a batch needs "
                                         "purpose 'batch'.", "input_file_id")
            lines, errors, model = _parse_batch_input(stored.content, endpoint)
            tokens = sum(_count_words(text) for _, line in lines for text in self._prompt_texts(endpoint, line))
            if self.batch_token_limit is not None and not errors:
                now = self.clock()
                for other in self.batches.values():
                    self._advance(other, now)
                queued = sum(b.tokens for b in self.batches.values() if b.status in QUEUED)
                if queued + tokens > self.batch_token_limit:
                    errors = [{"code": "token_limit_exceeded", "param": None, "line": None, "message": (
                        f"Enqueued token limit reached for {model} in organization org-standin. Limit: "
                        f"{self.batch_token_limit:,} enqueued tokens. Please try submitting an equivalent batch "
                        "once your ongoing batches have completed.")}]
            order = list(range(len(lines)))
            self.batch_rng.shuffle(order)
            per_line = self.batch_seconds_per_line
            if self.batch_duration_s is not None:
                per_line = self.batch_duration_s / max(1, len(lines))
            timing = {"validate_s": self.batch_validate_s, "per_line_s": per_line,
                      "finalize_s": self.batch_finalize_s, "cancel_s": self.batch_cancel_s,
                      "expire_after_s": self.batch_expire_after_s,
                      "expire_after_lines": self.batch_expire_after_lines}
            batch = StoredBatch(_new_id("batch_"), stored.id, endpoint, window, metadata, self.clock(), timing,
                                lines, errors, order, model, tokens)
            self.batches[batch.id] = batch
            return 200, self._batch_object(batch), {}

    def _find_batch(self, batch_id):
        batch = self.batches.get(batch_id)
        if batch is None:
            return None, self._bad_request(f"No batch found with id '{batch_id}'.", "batch_id", status=404)
        self._advance(batch, self.clock())
        return batch, None

    def _retrieve_batch(self, ids, query, body, form):
        with self._batch_lock:
            batch, missing = self._find_batch(ids["id"])
            return missing or (200, self._batch_object(batch), {})

    def _list_batches(self, ids, query, body, form):
        with self._batch_lock:
            now = self.clock()
            data = []
            for batch in self.batches.values():
                self._advance(batch, now)
                data.append(self._batch_object(batch))
        return 200, _page(data, query, newest_first=True), {}

    def _cancel_batch(self, ids, query, body, form):
        with self._batch_lock:
            batch, missing = self._find_batch(ids["id"])
            if missing:
                return missing
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                return self._bad_request(f"Cannot cancel a batch with status '{batch.status}'.", None,
                                         status=409)
            if batch.cancel_at is None:
                batch.cancel_at = self.clock()
                batch.stamps["cancelling_at"] = batch.cancel_at
                batch.status = "cancelling"
            return 200, self._batch_object(batch), {}

    # -- the life of a batch -----------------------------------------------------------

    def _advance(self, batch, now):
        """Bring `batch` to its state at clock time `now`, answering the lines due."""
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return
        timing, total = batch.timing, len(batch.lines)
        started = batch.created + timing["validate_s"]
        if batch.cancel_at is not None and batch.cancel_at < started:  # cancelled while validating
            return self._settle_cancel(batch, now)
        if now < started:
            return
        if batch.errors:
            batch.status, batch.stamps["failed_at"] = "failed", started
            return
        batch.stamps["in_progress_at"] = started
        per_line = timing["per_line_s"]

        def done_at(count):  # when the first `count` lines have been answered
            return started + count * per_line

        def due(moment):  # lines answered by `moment`
            if moment < started:
                return 0
            return total if per_line <= 0 else min(total, int((moment - started) / per_line + 1e-9))

        # Expiry: the earliest of "after k lines" and "the deadline passed with lines left".
        expiry = None  # (moment, lines answered)
        if timing["expire_after_lines"] is not None and timing["expire_after_lines"] < total:
            k = max(0, timing["expire_after_lines"])
            expiry = (done_at(k), k)
        if timing["expire_after_s"] is not None:
            deadline = max(batch.created + timing["expire_after_s"], started)
            before = 0 if deadline <= started else (
                total if per_line <= 0 else min(total, math.ceil((deadline - started) / per_line) - 1))
            if before < total and (expiry is None or (deadline, before) < expiry):
                expiry = (deadline, before)
        limit = expiry[1] if expiry else total
        if batch.cancel_at is not None and (expiry is None or batch.cancel_at < expiry[0]):
            self._answer_lines(batch, min(due(batch.cancel_at), limit))
            return self._settle_cancel(batch, now)
        if expiry is not None and now >= expiry[0]:
            self._answer_lines(batch, limit)
            for index in batch.order[limit:]:
                batch.failures.append({"id": _new_id("batch_req_"), "custom_id": batch.lines[index][0],
                                       "response": None,
                                       "error": {"code": "batch_expired", "message": BATCH_EXPIRED_MESSAGE}})
            batch.status, batch.stamps["expired_at"] = "expired", expiry[0]
            return self._write_results(batch)
        self._answer_lines(batch, min(due(now), limit))
        batch.status = "in_progress"
        if batch.done < total:
            return
        batch.status, batch.stamps["finalizing_at"] = "finalizing", done_at(total)
        if now >= done_at(total) + timing["finalize_s"]:
            batch.status, batch.stamps["completed_at"] = "completed", done_at(total) + timing["finalize_s"]
            self._write_results(batch)

    def _settle_cancel(self, batch, now):
        batch.status = "cancelling"
        ends = batch.cancel_at + batch.timing["cancel_s"]
        if now >= ends:
            batch.status, batch.stamps["cancelled_at"] = "cancelled", ends
            self._write_results(batch)

    def _answer_lines(self, batch, count):
        while batch.done < count:
            custom_id, body = batch.lines[batch.order[batch.done]]
            try:
                status, payload, _ = self._answer(batch.endpoint, body, online=False,
                                                  fail_status=self._batch_failure(custom_id),
                                                  reply_id=_new_id("chatcmpl-"))
            except Exception as e:  # noqa: BLE001 -- a broken responder fails its line, loudly
                traceback.print_exc()
                status, payload = 500, self.error_payload(500, f"fake server: {e!r}")
            line = {"id": _new_id("batch_req_"), "custom_id": custom_id,
                    "response": {"status_code": status, "request_id": _new_id("req_"), "body": payload},
                    "error": None}
            (batch.outputs if status == 200 else batch.failures).append(line)
            if status == 200:
                usage = payload.get("usage", {})
                batch.usage["input_tokens"] += usage.get("prompt_tokens", 0)
                batch.usage["output_tokens"] += usage.get("completion_tokens", 0)
                batch.usage["reasoning_tokens"] += usage.get("completion_tokens_details", {}).get(
                    "reasoning_tokens", 0)
            batch.done += 1

    def _batch_failure(self, custom_id):
        rule = self.batch_failures
        if callable(rule):
            verdict = rule(custom_id)
            return 500 if verdict is True else (verdict or None)
        return 500 if rule and self.batch_rng.random() < rule else None

    def _write_results(self, batch):
        def jsonl(lines):
            return "".join(json.dumps(line) + "\n" for line in lines).encode()

        if batch.outputs:
            batch.output_file_id = self._store_file(f"{batch.id}_output.jsonl", "batch_output",
                                                    jsonl(batch.outputs)).id
        if batch.failures:
            batch.error_file_id = self._store_file(f"{batch.id}_error.jsonl", "batch_output",
                                                   jsonl(batch.failures)).id

    def _batch_object(self, batch):
        stamp = {name: int(batch.stamps[name]) if name in batch.stamps else None
                 for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                              "cancelling_at", "cancelled_at")}
        window = batch.timing["expire_after_s"] if batch.timing["expire_after_s"] is not None else BATCH_WINDOW_S
        errors = None
        if batch.errors and batch.status == "failed":
            errors = {"object": "list", "data": batch.errors}
        counted = batch.status not in ("validating", "failed") and not (
            batch.status in ("cancelling", "cancelled") and "in_progress_at" not in batch.stamps)
        input_tokens, output_tokens = batch.usage["input_tokens"], batch.usage["output_tokens"]
        return {"id": batch.id, "object": "batch", "endpoint": batch.endpoint, "model": batch.model,
                "errors": errors, "input_file_id": batch.input_file_id,
                "completion_window": batch.completion_window, "status": batch.status,
                "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
                "created_at": int(batch.created), **stamp, "expires_at": int(batch.created + window),
                "request_counts": {"total": len(batch.lines) if counted else 0,
                                   "completed": len(batch.outputs),
                                   "failed": len(batch.failures)},
                "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": output_tokens,
                          "output_tokens_details": {"reasoning_tokens": batch.usage["reasoning_tokens"]},
                          "total_tokens": input_tokens + output_tokens},
                "metadata": batch.metadata}


def _page(data, query, newest_first):
    """One page of a list endpoint: {"object": "list", "data", "first_id", "last_id", "has_more"}."""
    if newest_first:
        data = data[::-1]
    after = query.get("after")
    if after is not None:
        position = next((i for i, item in enumerate(data) if item["id"] == after), None)
        data = data[position + 1:] if position is not None else []
    limit = _positive_int(int(query["limit"]) if query.get("limit", "").isdigit() else None, 10_000)
    page = data[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit}


def _parse_batch_input(content, endpoint):
    """The (custom_id, body) lines of a batch input file, its validation errors, its model."""
    lines, errors, seen, model = [], [], set(), None

    def error(code, message, line, param=None):
        errors.append({"code": code, "message": message, "param": param, "line": line})

    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        error("invalid_file", "The batch input file is not UTF-8 text.", None)
        return [], errors, None
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    if not rows:
        error("empty_file", "The batch input file is empty.", None)
    for number, row in enumerate(rows, 1):
        try:
            item = json.loads(row)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        missing = [name for name in ("custom_id", "method", "url", "body") if name not in item]
        if missing:
            error("missing_required_parameter", f"Missing required parameter: '{missing[0]}'.", number, missing[0])
            continue
        custom_id, body = item["custom_id"], item["body"]
        if not isinstance(custom_id, str):
            error("invalid_type", "Invalid type for 'custom_id': expected a string.", number, "custom_id")
        elif item["method"] != "POST":
            error("invalid_method", f"Invalid method {item['method']!r}: only 'POST' is supported.", number, "method")
        elif item["url"] != endpoint:
            error("invalid_url", f"The url {item['url']!r} does not match the batch endpoint {endpoint!r}.",
                  number, "url")
        elif not isinstance(body, dict) or not isinstance(body.get("model"), str):
            error("missing_required_parameter", "Missing required parameter: 'body.model'.", number, "body.model")
        elif custom_id in seen:
            error("duplicate_custom_id", DUPLICATE_ID_MESSAGE, number, "custom_id")
        elif model is not None and body["model"] != model:
            error("mismatched_model", f"The model {body['model']!r} differs from the model {model!r} of the "
                  "other requests; all requests in a batch must use the same model.", number, "body.model")
        else:
            seen.add(custom_id)
            model = body["model"]
            lines.append((custom_id, body))
    return lines, errors, model


_OPENAI_ERRORS = {  # status: (type, code, message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "not_found", "Not found."),
    409: ("invalid_request_error", None, "Conflict."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
}


# -- Serper ------------------------------------------------------------------------


class FakeSerperServer(_FakeServer):
    """A fake Serper Google search API: `POST {search_url}` with JSON {"q", "gl", "hl"}.

    `url` is "http://127.0.0.1:PORT" (like https://google.serper.dev) and
    `search_url` is url + "/search". The `X-API-KEY` header must equal `api_key`
    (default "test-serper-key"), else 403 {"message": "Unauthorized.", "statusCode": 403}.

    Replies have Serper's shape: `searchParameters`, optional `answerBox` and
    `knowledgeGraph`, and `organic` results ({"title", "link", "snippet", "position",
    optional "attributes" and "date"}). Script them with `responses = {query: reply}`
    (sent exactly as given); other queries get `default_response(query)`: three
    organic results whose snippets mention the query.

    Fault kind: "malformed" (200 with a body that is not JSON).
    """

    FAULT_KINDS = ("malformed",)
    MAIN_PATHS = ("/search",)

    def __init__(self, api_key=DEFAULT_SERPER_KEY, **kwargs):
        super().__init__(**kwargs)
        self.api_key = api_key
        self.responses = {}

    @property
    def url(self):
        return f"http://{HOST}:{self.port}"

    @property
    def search_url(self):
        return self.url + "/search"

    def refuse(self, path, headers, body):
        if path != "/search":
            return 404, self.error_payload(404, f"Unknown path {path}"), {}
        if headers.get("x-api-key") != self.api_key:
            return 403, self.error_payload(403, "Unauthorized."), {}
        if not isinstance(body, dict) or not isinstance(body.get("q"), str):
            return 400, self.error_payload(400, "Missing query parameter: q"), {}
        return None

    def reply(self, path, body, kind):
        if kind == "malformed":
            return '{"searchParameters": {"q": '  # cut off mid-way
        query = body["q"]
        if query in self.responses:
            return self.responses[query]
        return self.default_response(query, gl=body.get("gl", "us"), hl=body.get("hl", "en"))

    @staticmethod
    def default_response(query, gl="us", hl="en"):
        """A deterministic organic-only reply: three results mentioning `query`."""
        slug = re.sub(r"\W+", "-", query.lower()).strip("-")
        organic = [{"title": f"{query} - Source {i}",
                    "link": f"https://example.com/{slug}/{i}",
                    "snippet": f"Result {i} about {query}.",
                    "position": i} for i in (1, 2, 3)]
        return {"searchParameters": {"q": query, "gl": gl, "hl": hl, "type": "search",
                                     "engine": "google"},
                "organic": organic, "credits": 1}

    def error_payload(self, status, message=None, code=None, **fields):
        """Serper's error shape: {"message", "statusCode"}."""
        return {"message": message or _SERPER_MESSAGES.get(status, "Internal server error."),
                "statusCode": status}


_SERPER_MESSAGES = {403: "Unauthorized.", 429: "Too many requests.", 400: "Bad request."}


# -- a server in its own process (benchmarks, the demo) --------------------------------


def spawn(kind, latency=0.0, fault_rates=None, retry_after=None, seed=0, **options):
    """Start ``python tests/fake_servers.py KIND ...`` in its own process, so its work does not
    count as the client's; return ``(process, port)``.

    `options` are the command line's other flags, underscores for dashes: a value is
    passed as ``--flag value``, True as ``--flag``, None or False left out, a list
    repeated; ``models`` takes {id: shutdown_date or None} or a list of "ID[:DATE]".
    E.g. ``spawn("openai", rpm=1200, rate_initial=0, profile="reasoning", refuse_n=True)``.
    """
    import os
    import subprocess

    command = [sys.executable, os.path.abspath(__file__), kind, "--latency", str(latency), "--seed", str(seed)]
    for label, rate in (fault_rates or {}).items():
        command += ["--fault-rate", f"{label}={rate}"]
    if retry_after is not None:
        command += ["--retry-after", str(retry_after)]
    models = options.pop("models", None)
    if isinstance(models, dict):
        models = [m if date is None else f"{m}:{date}" for m, date in models.items()]
    if models is not None:
        options["model"] = models
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is True:
                command.append(flag)
            elif item is not None and item is not False:
                command += [flag, str(item)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise SystemExit(f"the fake {kind} server did not start: {line!r} {process.stderr.read()}")
    return process, int(line.split()[1])


def stop_spawned(process):
    """Stop a :func:`spawn`-ed server; return the request statistics it printed."""
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    stats = [line for line in err.splitlines() if line.startswith("STATS ")]
    return json.loads(stats[-1][len("STATS "):]) if stats else {}


# -- command line --------------------------------------------------------------------

SERVERS = {"openai": FakeOpenAIServer, "serper": FakeSerperServer}


def _model_arg(text):
    match = _DATE_SUFFIX_RE.match(text)
    if not match:
        return text, {}
    try:
        datetime.date.fromisoformat(match["date"])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the shutdown date is not YYYY-MM-DD") from None
    return match["id"], {"shutdown_date": match["date"]}


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve a fake OpenAI or Serper API.")
    parser.add_argument("api", choices=sorted(SERVERS), help="which API to fake")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds every request sleeps before its reply")
    parser.add_argument("--fault-rate", action="append", default=[], metavar="LABEL=P",
                        help="probability of a fault per request, e.g. 429=0.1, "
                             "500=0.05, malformed=0.05 (repeatable)")
    parser.add_argument("--retry-after", type=float, default=None,
                        help="Retry-After seconds sent with random 429s (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    group, openai_flags = parser.add_argument_group("openai only"), []

    def openai_only(*flags, **kwargs):
        openai_flags.append(group.add_argument(*flags, **kwargs))

    openai_only("--rpm", type=int, help="requests per minute (default: unlimited)")
    openai_only("--tpm", type=int, help="tokens per minute (default: unlimited)")
    openai_only("--rate-burst", type=float, default=60.0,
                help="seconds of the limit a bucket holds (default: 60)")
    openai_only("--rate-initial", type=_fraction, default=1.0,
                help="starting fill of the buckets, 0-1 (default: 1; 0 = a long job's steady state)")
    openai_only("--rate-debt", type=float, default=1.0,
                help="seconds of the limit a bucket may owe (default: 1)")
    openai_only("--rate-retry-after", action="store_true",
                help="send retry-after-ms / retry-after with rate-limit 429s")
    openai_only("--profile", choices=sorted(PROFILES), help="parameter profile of every model")
    openai_only("--refuse-n", action="store_true", help="refuse n > 1 (400 param n)")
    openai_only("--model", action="append", type=_model_arg, default=[], metavar="ID[:YYYY-MM-DD]",
                help="a served model, with its shutdown date (repeatable; default: any model)")
    openai_only("--models-endpoint", choices=("openai", "vllm", "none"), default="openai",
                help="how GET /v1/models[/ID] behave (default: openai)")
    openai_only("--today", type=datetime.date.fromisoformat, help="the date shutdowns compare with")
    openai_only("--flex-unavailable", type=_fraction, default=0.0,
                help="probability that a flex request gets 429 resource_unavailable")
    openai_only("--no-batch-api", action="store_true", help="serve no files or batches (404)")
    for name, help_text in (("validate-s", "seconds a batch validates"),
                            ("seconds-per-line", "seconds per batch line"),
                            ("duration-s", "seconds for all lines of a batch (instead of per line)"),
                            ("finalize-s", "seconds a batch finalizes"),
                            ("cancel-s", "seconds a batch is cancelling"),
                            ("expire-after-s", "a batch expires this many seconds after creation")):
        openai_only(f"--batch-{name}", type=float, help=help_text)
    openai_only("--batch-expire-after-lines", type=int, help="a batch expires after this many lines")
    openai_only("--batch-fail", type=_fraction, help="fraction of batch lines that fail with 500")
    openai_only("--batch-token-limit", type=int, help="enqueued prompt tokens above which a new batch fails")
    args = parser.parse_args(argv)
    if args.api != "openai":
        given = [action.option_strings[0] for action in openai_flags
                 if getattr(args, action.dest) != action.default]
        if given:
            parser.error(f"{', '.join(given)}: for the openai server only")
    args.fault_rates = {}
    for item in args.fault_rate:
        label, _, rate = item.partition("=")
        try:
            args.fault_rates[label] = float(rate)
            SERVERS[args.api]().fault_from_label(label)
        except ValueError as e:
            parser.error(f"--fault-rate {item}: {e}")
    return args


def _configure_openai(server, args):
    server.set_rate_limits(args.rpm, args.tpm, args.rate_burst, args.rate_initial, args.rate_debt)
    server.rate_limit_retry_after = args.rate_retry_after
    profile = PROFILES[args.profile or "accept-all"]
    if args.refuse_n:
        profile = dataclasses.replace(profile, max_n=1)
    if profile != ACCEPT_ALL:
        server.profiles = {"*": profile}
    if args.model:
        server.models = dict(args.model)
    server.models_endpoint = args.models_endpoint
    server.today = args.today
    server.flex_unavailable = args.flex_unavailable
    server.batch_api = not args.no_batch_api
    for name in ("validate_s", "seconds_per_line", "duration_s", "finalize_s", "cancel_s", "expire_after_s",
                 "expire_after_lines"):
        value = getattr(args, f"batch_{name}")
        if value is not None:
            setattr(server, f"batch_{name}", value)
    server.batch_failures = args.batch_fail
    server.batch_token_limit = args.batch_token_limit


def main(argv=None) -> int:
    args = parse_args(argv)
    server = SERVERS[args.api](latency=args.latency, fault_rates=args.fault_rates,
                               fault_retry_after=args.retry_after, seed=args.seed)
    if args.api == "openai":
        _configure_openai(server, args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on kill as on Ctrl-C
    server.start(args.port)
    try:
        print(f"PORT {server.port}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    finally:
        server.stop()
    print("STATS " + json.dumps(server.stats()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
