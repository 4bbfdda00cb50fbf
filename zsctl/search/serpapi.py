"""`serpapi`: Google results through SerpAPI's JSON API (key from `SERPAPI_API_KEY`).

`GET {base}/search.json?engine=google&q=…&num=k&api_key=…`: one request per distinct query (that is
how SerpAPI bills), run on up to 8 threads. Documents: the `answer_box` first when present, then
`organic_results` in `position` order, title + snippet. Score = 1/rank in the returned list
(1, 1/2, 1/3, …): Google gives ranks, not relevance scores.

The key lives only in this object's memory: it is sent as a query parameter and scrubbed from
every error message; `spec` and `repr` never show it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from zsctl.core.errors import BadInput
from zsctl.search._net import Fatal, RetryPolicy, request_json
from zsctl.search.base import Document, SearchEngine

DEFAULT_URL = "https://serpapi.com/search.json"
KEY_ENV = "SERPAPI_API_KEY"
URL_ENV = "ZSCTL_SERPAPI_URL"
_NO_RESULTS = "hasn't returned any results"  # SerpAPI reports an empty page as an "error"


def parse_serp(data: dict, k: int) -> list[Document]:
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    error = data.get("error")
    if error and not data.get("organic_results"):
        if _NO_RESULTS in str(error):
            return []
        raise Fatal(f"SerpAPI error: {error}")
    found: list[tuple[str, str]] = []
    box = data.get("answer_box")
    if isinstance(box, dict):
        text = box.get("answer") or box.get("snippet") or box.get("result") or ""
        if text:
            found.append((str(box.get("title") or "Answer"), str(text)))
    organic = sorted(data.get("organic_results") or [], key=lambda r: r.get("position", float("inf")))
    found += [(str(r.get("title", "")), str(r.get("snippet", ""))) for r in organic]
    return [Document(title, text, 1.0 / rank) for rank, (title, text) in enumerate(found[:k], start=1)]


class SerpApiEngine(SearchEngine):
    name = "serpapi"
    spec = "serpapi"

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None, workers: int = 8,
                 tries: int = 3, backoff: float = 0.5, timeout: float = 30.0,
                 params: dict | None = None) -> None:
        import httpx

        super().__init__()
        self._key = api_key or os.environ.get(KEY_ENV, "")
        if not self._key:
            raise BadInput(f"search spec 'serpapi' needs an API key: set {KEY_ENV} "
                           "(https://serpapi.com/manage-api-key)")
        self.base_url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.params = {"engine": "google", **(params or {})}  # e.g. {"gl": "us", "hl": "en"}
        self.policy = RetryPolicy(tries=tries, backoff=backoff, timeout=timeout)
        self.client = httpx.Client()
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, workers)))

    def __repr__(self) -> str:
        return f"SerpApiEngine(base_url={self.base_url!r})"

    def _one(self, query: str, k: int) -> list[Document]:
        params = {**self.params, "q": query, "num": k, "api_key": self._key}
        docs = request_json(self.client, "GET", self.base_url, lambda data: parse_serp(data, k), params=params,
                            policy=self.policy, stats=self.stats, lock=self.stats_lock, secrets=(self._key,),
                            what=f"serpapi {self.base_url}")
        with self.stats_lock:
            self.stats.calls += 1
        return docs

    def _search(self, queries, k, contexts, noise):
        unique = list(dict.fromkeys(queries))  # a repeated query is billed once
        answers = dict(zip(unique, self._pool.map(lambda q: self._one(q, k), unique)))
        return [list(answers[q]) for q in queries]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.client.close()
