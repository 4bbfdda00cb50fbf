"""The one retry/timeout policy shared by the network engines (Search-R1 retriever, SerpAPI).

Transport errors, timeouts, HTTP 429/5xx and unreadable bodies are retried with exponential
backoff; other 4xx answers mean our request is wrong, so they fail at once. Secrets (API keys)
are scrubbed from every message, since httpx errors and server bodies may echo the request URL.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from zsctl.core.errors import RunFailure
from zsctl.search.base import SearchStats

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    tries: int = 3  # attempts in all, first one included
    backoff: float = 0.5  # sleep backoff * 2**i before retry i+1
    timeout: float = 30.0  # seconds per request (connect, read, write)

    def __post_init__(self) -> None:
        if self.tries < 1 or self.backoff < 0 or self.timeout <= 0:
            raise ValueError("retry policy needs tries >= 1, backoff >= 0 and timeout > 0")


class Fatal(Exception):
    """Raised by a `parse` callback for an answer that retrying cannot fix."""


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def request_json(
    client,
    method: str,
    url: str,
    parse: Callable[[Any], T],
    *,
    policy: RetryPolicy,
    stats: SearchStats | None = None,
    lock: threading.Lock | None = None,
    secrets: tuple[str, ...] = (),
    what: str | None = None,
    **request_kw,
) -> T:
    """Send one request (with retries) and return `parse(response JSON)`.

    `stats.retries` counts every retry and `stats.errors` every request that finally failed;
    the final failure is a RunFailure of one line naming `what` (default: the URL).
    """
    import httpx

    lock = lock or threading.Lock()
    what = what or url
    last = ""
    attempt = 0
    for attempt in range(policy.tries):
        if attempt:
            if stats is not None:
                with lock:
                    stats.retries += 1
            time.sleep(policy.backoff * 2 ** (attempt - 1))
        try:
            r = client.request(method, url, timeout=policy.timeout, **request_kw)
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
            continue
        if r.status_code == 429 or r.status_code >= 500:
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code >= 400:  # our request is wrong: retrying will not help
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            break
        try:
            return parse(r.json())
        except Fatal as e:
            last = str(e)
            break
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            last = f"unreadable response ({type(e).__name__}: {e})"
    if stats is not None:
        with lock:
            stats.errors += 1
    detail = " ".join(last.split())  # one line, whatever the server sent
    raise RunFailure(scrub(f"{what} failed after {attempt + 1} attempt(s): {detail}", secrets))
