"""The Serper (Google search) client used by retrieval.py.

One function sends a query and applies the retry policy of :mod:`realign.retry`, so
tests point it at a loopback server and nothing else changes. ``requests`` is imported
on first use so ``--help`` stays instant. The API key travels only in the ``X-API-KEY``
header: no message raised here ever contains it.
"""

import logging
import threading
import time

from realign.cli import FatalError
from realign.retry import is_transient_status, retry_delay

logger = logging.getLogger(__name__)

SERPER_URL = "https://google.serper.dev/search"

_stats_lock = threading.Lock()  # many threads count into one stats dict


class SearchFailed(Exception):
    """This one query has no result: refused by the server (a 4xx other than 401/403/404:
    ``permanent``, no retry heals it), or a transient failure that outlived the retries.
    The run goes on without it."""

    def __init__(self, message, permanent=False):
        super().__init__(message)
        self.permanent = permanent


class SearchCancelled(SearchFailed):
    """The run is stopping (``stop`` was set) while this query waited to retry."""


def make_session(pool_size):
    """A ``requests.Session`` whose connection pool keeps ``pool_size`` connections per host
    alive, so that ``pool_size`` threads can share it without reconnecting."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _count(stats, key):
    if stats is not None:
        with _stats_lock:
            stats[key] = stats.get(key, 0) + 1


def _server_message(response):
    try:
        body = response.json()
    except ValueError:
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return f": {str(message)[:200]}" if message else ""


def search(session, query, api_key, url=SERPER_URL, gl="us", hl="en", timeout=30.0,
           max_retries=5, backoff=1.0, stop=None, stats=None):
    """POST ``query`` to Serper and return its JSON reply (a dict).

    Retries timeouts, connection errors, 408/409/429/5xx and a 200 whose body is not a
    JSON object, up to ``max_retries`` times, waiting ``Retry-After`` when the server
    sends it, else exponential backoff from ``backoff`` seconds. ``stop`` (a
    ``threading.Event`` or a realign.pool.Stopper) cuts a wait short and raises
    :class:`SearchCancelled`.
    ``stats`` (a dict, may be shared by threads) counts ``requests`` and ``retries``.

    Raises :class:`FatalError` on 401/403 (the key) and 404 (the URL), which no retry
    heals; :class:`SearchFailed` when this query cannot be answered.
    """
    import requests

    headers = {"X-API-KEY": api_key, "Content-Type": "application/json"}
    payload = {"q": query, "gl": gl, "hl": hl}
    attempt = 0
    while True:
        if stop is not None and stop.is_set():
            raise SearchCancelled("cancelled: the run is stopping")
        _count(stats, "requests")
        retry_after = None
        try:
            response = session.post(url, json=payload, headers=headers, timeout=timeout)
        except requests.Timeout:
            problem = f"no reply within {timeout:g}s"
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            problem = f"connection error ({e.__class__.__name__})"
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema):
            raise FatalError(f"cannot send a request to {url!r} (check --search_url)") from None
        except requests.RequestException as e:
            raise SearchFailed(f"request failed: {e.__class__.__name__}") from None
        else:
            status = response.status_code
            if status in (401, 403):
                raise FatalError(f"the search server refused the API key (HTTP {status}); check SERPER_API_KEY")
            if status == 404:
                raise FatalError(f"the search server answered HTTP 404 for {url} (check --search_url)")
            if status == 200:
                try:
                    body = response.json()
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    return body
                problem = "a reply that is not a JSON object"
            elif is_transient_status(status):
                problem = f"HTTP {status}"
                retry_after = response.headers.get("Retry-After")
            else:
                raise SearchFailed(f"HTTP {status}{_server_message(response)}", permanent=True)
        if attempt >= max_retries:
            raise SearchFailed(f"{problem} after {attempt + 1} attempts")
        delay = retry_delay(attempt, retry_after, base=backoff)
        logger.debug("search: %s, retry %d in %.2fs", problem, attempt + 1, delay)
        _count(stats, "retries")
        attempt += 1
        if stop is not None:
            if stop.wait(delay):
                raise SearchCancelled("cancelled: the run is stopping")
        elif delay > 0:
            time.sleep(delay)
