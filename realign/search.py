"""Serper's Google search API as a transport of the request engine (:mod:`realign.engine`).

retrieval.py builds one request per query (``{"q", "gl", "hl"}``, POSTed as JSON with the
key in the ``X-API-KEY`` header); the engine sends it through :class:`SerperTransport`,
which knows this wire: what a reply is (a JSON object), what Serper's errors mean, and
that a search is billed by the request. The HTTP client is the async one the ``openai``
SDK builds on, so a stop cancels a search in flight at once. The key travels only in the
header: no message raised here ever contains it.
"""

from realign.cache import request_key
from realign.cli import FatalError
from realign.client import http_module, json_body
from realign.engine import Response, TransportError

SERPER_URL = "https://google.serper.dev/search"
SEARCH_URL_VARIABLE = "SERPER_BASE_URL"  # the search endpoint's environment variable (as OPENAI_BASE_URL)


def search_body(query, gl, hl):
    """What a search sends (and what its cache key is made of)."""
    return {"q": query, "gl": gl, "hl": hl}


class SerperTransport:
    """POST a query to the search endpoint; billed by the request (``searches``)."""

    name = "the search server"
    limits_key = None  # Serper sends no rate-limit headers

    def __init__(self, url, api_key, timeout=30.0, pool_size=10):
        self.url = url
        self.server = url
        self.api_key = api_key
        self.timeout = timeout
        self.pool_size = pool_size
        self._client = None

    def key(self, body):
        return request_key(self.url, body)

    @staticmethod
    def wire(body):
        return [body]

    @staticmethod
    def learn(wire, refusal):
        return False  # a search has no parameter to leave out

    @staticmethod
    def adaptations():
        return "none"

    @staticmethod
    def estimate_prompt(body):
        return 0.0

    @staticmethod
    def token_cost(wire, prompt):
        return 0.0

    @staticmethod
    def is_reply(body):
        return isinstance(body, dict)

    def fatal_message(self, verdict, status, error):
        if verdict == "bad_key":
            return f"the search server refused the API key (HTTP {status}); check SERPER_API_KEY"
        return f"the search server answered HTTP {status} for {self.url} (check --search_url or ${SEARCH_URL_VARIABLE})"

    async def post(self, wire):
        http = http_module()
        if self._client is None:
            limits = http.Limits(max_connections=self.pool_size, max_keepalive_connections=self.pool_size)
            self._client = http.AsyncClient(timeout=self.timeout, limits=limits)
        headers = {"X-API-KEY": self.api_key, "Content-Type": "application/json"}
        try:
            response = await self._client.post(self.url, json=wire, headers=headers)
        except http.TimeoutException:
            raise TransportError(f"no reply within {self.timeout:g}s") from None
        except (http.UnsupportedProtocol, http.InvalidURL):
            raise FatalError(f"cannot send a request to {self.url!r} (check --search_url)") from None
        except http.TransportError as e:
            raise TransportError(f"connection error ({e.__class__.__name__})") from None
        return Response(response.status_code, response.headers, json_body(response))

    async def prepare(self, run):
        return None

    async def close(self):
        if self._client is not None:
            await self._client.aclose()
            self._client = None
