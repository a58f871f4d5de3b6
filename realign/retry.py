"""Retry policy shared by the HTTP clients: which failures are transient, and how long to wait."""

import email.utils
import random
import time

MAX_RETRY_AFTER = 300.0  # never sleep longer than this on a server's say-so


def is_transient_status(status):
    """Rate limits, timeouts and server errors heal by themselves; other 4xx do not."""
    return status in (408, 409, 429) or status >= 500


def parse_retry_after(value):
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = str(value).strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def parse_retry_after_ms(headers):
    """Seconds to wait from ``retry-after-ms`` (OpenAI's, preferred) or ``retry-after``, or None."""
    value = headers.get("retry-after-ms") if headers is not None else None
    if value is not None:
        try:
            return min(max(float(value) / 1000.0, 0.0), MAX_RETRY_AFTER)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after") if headers is not None else None)


def retry_delay(attempt, retry_after=None, base=1.0, cap=30.0):
    """Wait before retry number ``attempt`` (0-based): the server's ``Retry-After`` when it
    sent one, else exponential backoff with jitter so that many workers do not retry in step."""
    told = parse_retry_after(retry_after)
    if told is not None:
        return told
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)
