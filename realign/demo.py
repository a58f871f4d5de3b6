"""Local stand-ins for OpenAI and Serper: the demo, and the commands tried without a key.

Usage:
    python -m realign.demo                      # OpenAI on :8000, Serper on :8001; Ctrl-C stops
    python -m realign.demo --openai_port 0 --serper_port 0

It prints the environment to set (``OPENAI_BASE_URL``, ``SERPER_BASE_URL`` and keys
that the stand-ins accept), after which the stages run as written. Not a model: a reformat
request gets the original response back under an ``**Answer**`` heading (a JSON object
when the request sends the JSON schema of ``--reply_format json``), except that for about
one question in six the rewrite loses the response's last sentence, as a careless model's
would, so that the quality checks have something to catch; a classification gets the task
``open_qa`` for a question and ``default`` otherwise, a judge a middling verdict, a search
three made-up results. ``run_pipeline.py --demo`` starts them itself. Standard
library only; the tests use the fuller fakes of ``tests/fake_servers.py``.
"""

import json
import re
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from realign.cli import ArgumentParser

HOST = "127.0.0.1"
MODELS = ("gpt-6-luna", "gpt-6-sol", "GAIR/ReAlign-Task-Classifier")
HEADING = "**Answer**"
ORIGINAL_RE = re.compile(r"^\[Original response start\]\n(.*?)\n\[Original response end\]$", re.DOTALL | re.MULTILINE)
QUERY_RE = re.compile(r"\[User's query start\]\n(.*?)\n\[User's query end\]", re.DOTALL)
SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def careless(text):
    """Whether the stand-in loses the last sentence of this request's response (one in six,
    the same each time)."""
    return zlib.crc32(text.encode("utf-8")) % 6 == 0


def reformat_reply(text, as_json):
    """The original response under a heading, in the layout asked for."""
    match = ORIGINAL_RE.search(text)
    original = (match.group(1) if match else text).strip()
    sentences = SENTENCE_END_RE.split(original)
    if careless(text) and len(sentences) > 1:
        original = " ".join(sentences[:-1])
    revised = f"{HEADING}\n\n{original}"
    if as_json:
        return json.dumps({"reasoning": "The format fits the question.", "revised_response": revised})
    return f"Reasoning: The format fits the question.\nRevised response: {revised}"


def task_of(text):
    """A stand-in's task for a query: open_qa for a question, default otherwise."""
    match = QUERY_RE.search(text)
    query = (match.group(1) if match else text).strip()
    return "open_qa" if query.endswith("?") else "default"


def chat_content(body):
    """What the stand-in answers a chat request (see the module docstring)."""
    messages = body.get("messages") or []
    text = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    schema = (body.get("response_format") or {}).get("json_schema") or {}
    if "[Tasks start]" in text:
        task = task_of(text)
        return json.dumps({"task": task}) if schema.get("name") == "task_choice" else task
    if "[Reference answer start]" in text:
        return "The answer agrees with the reference in part. [[5]]"
    if "[Answer A start]" in text:
        return "Both read equally well. [[C]]"
    return reformat_reply(text, as_json=schema.get("name") == "revision")


def words(text):
    return len(str(text).split())


def chat_reply(body):
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
    content = chat_content(body)
    prompt = sum(words(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict))
    return {"id": "demo", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt, "completion_tokens": n * words(content),
                      "total_tokens": prompt + n * words(content)}}


def completion_reply(body):
    prompt = str(body.get("prompt") or "")
    task = " " + task_of(prompt)
    return {"id": "demo", "object": "text_completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "text": task, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": words(prompt), "completion_tokens": 1, "total_tokens": words(prompt) + 1}}


def search_reply(body):
    query = str(body.get("q") or "")
    return {"searchParameters": {"q": query, "gl": body.get("gl"), "hl": body.get("hl")},
            "organic": [{"title": f"Result {i}", "link": f"https://example.com/{i}", "position": i,
                         "snippet": f"Result {i} about {query}."} for i in (1, 2, 3)]}


def model_object(model):
    return {"id": model, "object": "model", "created": 1764547200, "owned_by": "realign-demo"}


class Handler(BaseHTTPRequestHandler):
    """Routes one request of either stand-in; ``server.kind`` is "openai" or "serper"."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path = self.path.split("?")[0]
        if self.server.kind == "openai" and path == "/v1/models":
            self.send({"object": "list", "data": [model_object(m) for m in MODELS]})
        elif self.server.kind == "openai" and path.startswith("/v1/models/") and path[len("/v1/models/"):] in MODELS:
            self.send(model_object(path[len("/v1/models/"):]))
        else:
            self.send({"error": {"message": f"Unknown path {path}", "type": "invalid_request_error"}}, 404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        path = self.path.split("?")[0]
        routes = {("openai", "/v1/chat/completions"): chat_reply, ("openai", "/v1/completions"): completion_reply,
                  ("serper", "/search"): search_reply}
        answer = routes.get((self.server.kind, path))
        if not isinstance(body, dict) or answer is None:
            self.send({"error": {"message": f"Unknown path {path} or a body that is not JSON"}}, 404)
            return
        self.send(answer(body))

    def send(self, payload, status=200):
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # no per-request line on stderr
        pass


class LocalServer:
    """An HTTP server on 127.0.0.1 with ``handler``, in a daemon thread while the ``with``
    block runs (``port`` 0: a free one)."""

    def __init__(self, handler, port=0):
        self.server = ThreadingHTTPServer((HOST, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self):
        return self.server.server_address[1]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class StandIn(LocalServer):
    """One stand-in server in a daemon thread: ``with StandIn("openai") as openai: openai.url``."""

    def __init__(self, kind, port=0):
        super().__init__(Handler, port)
        self.kind = kind
        self.server.kind = kind

    @property
    def url(self):
        """The base URL a client is given: ``.../v1`` for OpenAI, the search endpoint for Serper."""
        return f"http://{HOST}:{self.port}/v1" if self.kind == "openai" else f"http://{HOST}:{self.port}/search"


def main(argv=None):
    parser = ArgumentParser(description="Local stand-ins for OpenAI and Serper (not a model).")
    parser.add_argument("--openai_port", type=int, default=8000, help="port of the OpenAI stand-in (default: 8000)")
    parser.add_argument("--serper_port", type=int, default=8001, help="port of the Serper stand-in (default: 8001)")
    args = parser.parse_args(argv)
    with StandIn("openai", args.openai_port) as openai, StandIn("serper", args.serper_port) as serper:
        print(f"export OPENAI_BASE_URL={openai.url} OPENAI_API_KEY=none", flush=True)
        print(f"export SERPER_BASE_URL={serper.url} SERPER_API_KEY=none", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
