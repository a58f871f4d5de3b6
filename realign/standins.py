"""Fake OpenAI and Serper HTTP servers: offline stand-ins for tests and benchmarks.

Each server is a real HTTP/1.1 server (keep-alive) on 127.0.0.1 and a random port,
served from a daemon thread, so the real clients (the `openai` SDK, `requests`) talk
to it unchanged. Both record every request and can be told to misbehave:

- `add_fault(...)` queues a scripted fault: an HTTP error status (with `Retry-After`
  for a 429 when `retry_after` is given), a wrong 200 reply (`kind=`), and/or a slow
  reply (`delay=` seconds). Faults are consumed in order, one per request, by the
  first request they `match`; `times=None` keeps a fault forever.
- `fault_rates = {"429": 0.1, "500": 0.05, "malformed": 0.05}` draws a fault at
  random for each request that no scripted fault caught (seeded, for benchmarks).
- `latency` seconds are slept by every request before it is answered.

A request that is itself wrong (unknown path, bad key, unknown model) is refused
before any fault is taken. Every request is recorded in `requests` (RecordedRequest:
path, lower-cased headers, parsed JSON body); `max_in_flight` tells how many were
answered at once.

FakeOpenAIServer serves `POST /v1/chat/completions` and `POST /v1/completions`;
FakeSerperServer serves `POST /search`. See their docstrings for how to script replies.

Usage (a separate process for benchmarks; prints one line `PORT <n>`, then serves
until killed, and writes a `STATS {...}` line to stderr on SIGTERM or Ctrl-C):
    python -m realign.standins openai --latency 0.2 --fault-rate 429=0.1 \
        --fault-rate 500=0.05 --fault-rate malformed=0.05
    python -m realign.standins serper --latency 0.05
"""

import argparse
import collections
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"
MALFORMED_REPLY = "Sure, here is a better answer, though not in the format you asked for."
REWRITE_HEADING = "**Answer**"  # marks a reply of the default chat responder
DEFAULT_SERPER_KEY = "test-serper-key"

# Where the reformat request (constant.REFORMAT_PROMPTS) holds the original response.
_ORIGINAL_RESPONSE_RE = re.compile(
    r"^\[Original response start\]\n(.*?)\n\[Original response end\]$",
    re.IGNORECASE | re.DOTALL | re.MULTILINE)


@dataclass
class Fault:
    """One scripted misbehaviour; see `add_fault`."""

    status: int | None = None  # reply with this HTTP error status
    kind: str | None = None  # or reply 200 wrongly, e.g. "malformed"
    retry_after: float | None = None  # Retry-After header of the error reply
    delay: float = 0.0  # seconds to sleep before replying
    times: int | None = 1  # requests it applies to; None = forever
    match: Callable[[dict], bool] | None = None  # which request bodies; None = all


@dataclass
class RecordedRequest:
    path: str
    headers: dict  # header names lower-cased
    body: dict | list | None  # parsed JSON; None when the body was not JSON


class _FakeServer:
    """Serving, recording and fault machinery shared by both fake servers."""

    FAULT_KINDS = ()  # the `kind=` values a server understands

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

    def start(self):
        self._httpd = _HTTPServer((HOST, 0), _Handler)
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

    def stats(self):
        """Counts for a benchmark's summary line."""
        return {"requests": self.request_count, "faults": dict(self.fault_counts),
                "max_in_flight": self.max_in_flight}

    # -- faults ------------------------------------------------------------------

    def add_fault(self, status=None, *, kind=None, retry_after=None, delay=0.0, times=1,
                  match=None):
        """Queue a fault for the next request(s) whose JSON body satisfies `match`.

        Give an error `status`, a wrong-reply `kind` (one of FAULT_KINDS), or only a
        `delay` (a slow but normal reply). Returns the Fault; its `times` counts down.
        """
        fault = Fault(status, kind, retry_after, delay, times, match)
        self._check_fault(fault)
        with self._lock:
            self._faults.append(fault)
        return fault

    def _check_fault(self, fault):
        if fault.status is not None and fault.kind is not None:
            raise ValueError("a fault has a status or a kind, not both")
        if fault.kind is not None and fault.kind not in self.FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; known: {self.FAULT_KINDS}")

    def fault_from_label(self, label):
        """The fault a `fault_rates` key stands for: "429", "500", "malformed", ..."""
        if label.isdigit():
            retry_after = self.fault_retry_after if label == "429" else None
            fault = Fault(status=int(label), retry_after=retry_after)
        else:
            fault = Fault(kind=label)
        self._check_fault(fault)
        return fault

    def _next_fault(self, body):
        """Take the first queued fault matching `body`, else draw one from fault_rates."""
        with self._lock:
            for fault in self._faults:
                if fault.match is None or fault.match(body):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
            draw = self.rng.random()
        for label, rate in self.fault_rates.items():
            draw -= rate
            if draw < 0:
                return self.fault_from_label(label)
        return None

    # -- one request -------------------------------------------------------------

    def handle(self, path, headers, body):
        """Record one request and answer it: returns (status, payload, extra headers).

        A str payload is sent as it is (a broken reply); anything else as JSON.
        """
        with self._lock:
            self.requests.append(RecordedRequest(path, headers, body))
        time.sleep(self.latency)
        refusal = self.refuse(path, headers, body)
        if refusal is not None:
            return refusal
        fault = self._next_fault(body)
        if fault is None:
            return 200, self.reply(path, body, kind=None), {}
        with self._lock:
            self.fault_counts[str(fault.status or fault.kind or "delay")] += 1
        time.sleep(fault.delay)
        if fault.status is None:
            return 200, self.reply(path, body, kind=fault.kind), {}
        extra = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
        return fault.status, self.error_payload(fault.status), extra

    def refuse(self, path, headers, body):
        """(status, payload, headers) when the request itself is wrong, else None."""
        raise NotImplementedError

    def reply(self, path, body, kind):
        """The 200 payload, made wrong in the way `kind` says."""
        raise NotImplementedError

    def error_payload(self, status, message=None, code=None):
        raise NotImplementedError


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 resets connections under load
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every reply has a Content-Length
    disable_nagle_algorithm = True

    def do_POST(self):
        fake = self.server.fake
        with fake._lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                status, payload, extra = fake.handle(self.path, headers, body)
            except Exception as e:  # noqa: BLE001 -- a broken responder: fail loudly, but answer
                traceback.print_exc()
                status, payload, extra = 500, fake.error_payload(500, f"fake server: {e!r}"), {}
            self._send(status, payload, extra)
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _send(self, status, payload, extra_headers):
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
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


def find_original_response(text):
    """The text between "[Original response start]" and "[Original response end]" lines,
    else the whole text."""
    match = _ORIGINAL_RESPONSE_RE.search(text)
    return (match.group(1) if match else text).strip()


def default_chat_reply(body, choice_index):
    """Accept the format and echo the original response under REWRITE_HEADING."""
    user_texts = [_text(m.get("content")) for m in body["messages"] if m.get("role") == "user"]
    original = find_original_response(user_texts[-1] if user_texts else "")
    return ("Reasoning: The format fits the question.\n"
            f"Revised response: {REWRITE_HEADING}\n\n{original}")


def default_completion_reply(body, choice_index):
    return " open_qa"


class FakeOpenAIServer(_FakeServer):
    """A fake OpenAI API: `POST {url}/chat/completions` and `POST {url}/completions`.

    `url` is "http://127.0.0.1:PORT/v1", the SDK's `base_url`. Replies have the real
    shape: `id`, `object`, `created`, `model` (echoed), `n` choices (index 0..n-1,
    each with a `finish_reason`) and `usage` (whitespace-separated words).

    Script replies with `chat_responder` / `completion_responder`, each
    `fn(body, choice_index) -> str | {"content": str, "finish_reason": str}`; for a
    list `prompt` the completion responder sees one prompt at a time in
    `body["prompt"]`. The defaults: `default_chat_reply` answers
    "Reasoning: The format fits the question.\\nRevised response: **Answer**\\n\\n"
    followed by the original response found in the last user message (see
    `find_original_response`); `default_completion_reply` answers " open_qa".

    Fault kinds: "malformed" (200, content without "Revised response:") and
    "truncated" (200, the reply cut in half, finish_reason "length"); both apply
    to every choice. Set `expected_key` to demand `Authorization: Bearer <key>`
    (else 401) and `known_models` to reject other models (404 model_not_found).
    """

    FAULT_KINDS = ("malformed", "truncated")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.chat_responder = default_chat_reply
        self.completion_responder = default_completion_reply
        self.expected_key = None
        self.known_models = None

    @property
    def url(self):
        return f"http://{HOST}:{self.port}/v1"

    def refuse(self, path, headers, body):
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return 404, self.error_payload(404, f"Unknown path {path}", "unknown_url"), {}
        if not isinstance(body, dict):
            return 400, self.error_payload(400, "The body is not a JSON object."), {}
        if (self.expected_key is not None
                and headers.get("authorization") != f"Bearer {self.expected_key}"):
            return 401, self.error_payload(401), {}
        model = body.get("model")
        if self.known_models is not None and model not in self.known_models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return 404, self.error_payload(404, message, "model_not_found"), {}
        return None

    def reply(self, path, body, kind):
        n = body.get("n") or 1
        if path == "/v1/chat/completions":
            prompt_texts = [_text(m.get("content")) for m in body.get("messages", [])]
            jobs = [(body, i) for i in range(n)]
            responder, obj = self.chat_responder, "chat.completion"
        else:
            prompts = body.get("prompt", "")
            prompt_texts = prompts if isinstance(prompts, list) else [prompts]
            jobs = [({**body, "prompt": p}, i) for p in prompt_texts for i in range(n)]
            responder, obj = self.completion_responder, "text_completion"
        choices, completion_tokens = [], 0
        for index, (job_body, choice_index) in enumerate(jobs):
            content, finish_reason = self._choice(responder(job_body, choice_index), kind)
            completion_tokens += _count_words(content)
            if obj == "chat.completion":
                message = {"role": "assistant", "content": content}
                choices.append({"index": index, "message": message,
                                "finish_reason": finish_reason, "logprobs": None})
            else:
                choices.append({"index": index, "text": content,
                                "finish_reason": finish_reason, "logprobs": None})
        prompt_tokens = sum(_count_words(t) for t in prompt_texts)
        return {"id": f"fake-{self.request_count}", "object": obj, "created": int(time.time()),
                "model": body.get("model"), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens,
                          "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

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

    def error_payload(self, status, message=None, code=None):
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        default_type, default_code, default_message = _OPENAI_ERRORS.get(
            status, ("server_error", None, "The server had an error processing your request."))
        return {"error": {"message": message or default_message, "type": default_type,
                          "param": None, "code": code or default_code}}


_OPENAI_ERRORS = {  # status: (type, code, message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "not_found", "Not found."),
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

    def error_payload(self, status, message=None, code=None):
        """Serper's error shape: {"message", "statusCode"}."""
        return {"message": message or _SERPER_MESSAGES.get(status, "Internal server error."),
                "statusCode": status}


_SERPER_MESSAGES = {403: "Unauthorized.", 429: "Too many requests.", 400: "Bad request."}


# -- a server in its own process (benchmarks) ---------------------------------------


def spawn(kind, latency=0.0, fault_rates=None, retry_after=None, seed=0):
    """Start ``python -m realign.standins KIND ...`` in its own process, so its work does not
    count as the client's; return ``(process, port)``."""
    import os
    import subprocess

    command = [sys.executable, os.path.abspath(__file__), kind, "--latency", str(latency), "--seed", str(seed)]
    for label, rate in (fault_rates or {}).items():
        command += ["--fault-rate", f"{label}={rate}"]
    if retry_after is not None:
        command += ["--retry-after", str(retry_after)]
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve a fake OpenAI or Serper API.")
    parser.add_argument("api", choices=sorted(SERVERS), help="which API to fake")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds every request sleeps before its reply")
    parser.add_argument("--fault-rate", action="append", default=[], metavar="LABEL=P",
                        help="probability of a fault per request, e.g. 429=0.1, "
                             "500=0.05, malformed=0.05 (repeatable)")
    parser.add_argument("--retry-after", type=float, default=None,
                        help="Retry-After seconds sent with random 429s (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    args = parser.parse_args(argv)
    args.fault_rates = {}
    for item in args.fault_rate:
        label, _, rate = item.partition("=")
        try:
            args.fault_rates[label] = float(rate)
            SERVERS[args.api]().fault_from_label(label)
        except ValueError as e:
            parser.error(f"--fault-rate {item}: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    server = SERVERS[args.api](latency=args.latency, fault_rates=args.fault_rates,
                               fault_retry_after=args.retry_after, seed=args.seed)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on kill as on Ctrl-C
    with server:
        print(f"PORT {server.port}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    print("STATS " + json.dumps(server.stats()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
