"""The OpenAI-compatible client used by reformat.py and classify.py (--backend openai).

One function sends a request and applies the retry policy, so tests point the real SDK
at a loopback server and nothing else changes. ``openai`` is imported on first use so
``--help`` stays instant.
"""

import asyncio
import json
import logging

from realign.cli import FatalError
from realign.retry import is_transient_status, retry_delay

logger = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The server refused this one request (e.g. HTTP 400, prompt too long): not transient,
    but not a reason to stop the run either; the caller records it on the record."""

    def __init__(self, status, message):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class RetriesExhausted(Exception):
    """A transient failure that outlived ``max_retries``."""


class UnreadableReply(Exception):
    """A 200 reply whose body is not the JSON object expected: a server glitch, retried."""


def make_async_client(base_url=None, api_key=None, timeout=600.0):
    """An ``openai.AsyncOpenAI`` that never retries by itself (we do, with our policy)."""
    import openai

    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)


async def create_chat_completion(client, **params):
    """POST ``/chat/completions`` with ``params`` as the body; return the reply as a plain dict.

    The typed ``client.chat.completions.create`` spends about 2 ms of CPU per call
    transforming the parameters and building pydantic objects of the reply, which caps one
    process near 300 requests/s on two cores. The SDK's low-level ``client.post`` (its
    documented way to call any endpoint) keeps its authentication, base URL, connection
    pool and error mapping, so :func:`classify_error` applies unchanged.
    """
    return await _post_for_choices(client, "/chat/completions", params)


async def create_completion(client, **params):
    """POST ``/completions`` (text completions, e.g. a `vllm serve` of the task classifier)
    with ``params`` as the body; return the reply as a plain dict. The same fast path as
    :func:`create_chat_completion`."""
    return await _post_for_choices(client, "/completions", params)


async def _post_for_choices(client, path, params):
    content = await client.post(path, body=params, cast_to=bytes)
    try:
        reply = json.loads(content)
    except ValueError:
        raise UnreadableReply("the reply is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
        raise UnreadableReply("the reply has no list of choices")
    return reply


def _server_message(error):
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return str(message)
    return error.__class__.__name__


def classify_error(error):
    """Map an SDK exception to (transient?, retry_after header, description).

    Raises :class:`FatalError` for errors that will not heal and
    :class:`RequestRejected` for a request the server refuses on its merits.
    """
    import openai

    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError)):
        return True, None, error.__class__.__name__
    if isinstance(error, UnreadableReply):
        return True, None, str(error)
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        headers = error.response.headers if error.response is not None else {}
        if status in (401, 403):
            # The server's message may quote part of the key: do not repeat it.
            raise FatalError(
                f"the API server refused the credentials (HTTP {status}); check OPENAI_API_KEY"
            ) from None
        if status == 404:
            raise FatalError(f"the API server answered HTTP 404: {_server_message(error)} (check --model and --base_url)") from None
        if is_transient_status(status):
            return True, headers.get("retry-after"), f"HTTP {status}"
        raise RequestRejected(status, _server_message(error)) from None
    raise error


async def call_with_retries(send, max_retries, stats=None, what="request"):
    """Await ``send()``; retry transient failures up to ``max_retries`` times.

    ``stats`` (a dict) counts ``requests`` and ``retries``.
    """
    attempt = 0
    while True:
        if stats is not None:
            stats["requests"] = stats.get("requests", 0) + 1
        try:
            return await send()
        except Exception as error:
            transient, retry_after, description = classify_error(error)
            if not transient:  # pragma: no cover - classify_error raises for these
                raise
            if attempt >= max_retries:
                raise RetriesExhausted(f"{what} failed after {attempt + 1} attempts: {description}") from None
            delay = retry_delay(attempt, retry_after)
            logger.debug("%s: %s, retry %d in %.1fs", what, description, attempt + 1, delay)
            if stats is not None:
                stats["retries"] = stats.get("retries", 0) + 1
            attempt += 1
            await asyncio.sleep(delay)
