"""`http://HOST:PORT/retrieve`: a client for the Search-R1 retrieval API.

Request  `POST url {"queries": [...], "topk": k, "return_scores": true}`
Response `{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`, one list per query;
servers started without scores answer with the document dicts themselves. `contents` is
FlashRAG's `"Title"\\ntext`.
"""

from __future__ import annotations

from zsctl.core.errors import BadInput, RunFailure
from zsctl.search._net import RetryPolicy, request_json
from zsctl.search.base import Document, SearchEngine


def split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG `"Title"\\ntext` → (title, text); a single line is all text."""
    head, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents.strip()
    return head.strip().strip('"').strip(), rest.strip()


def parse_document(item: dict) -> Document:
    """One result item: `{"document": {...}, "score": s}` or the document dict itself."""
    doc = item.get("document", item)
    if "contents" in doc:
        title, text = split_contents(str(doc["contents"]))
    else:
        title, text = str(doc.get("title", "")), str(doc.get("text", ""))
    score = item.get("score", doc.get("score", 0.0))
    return Document(title, text, float(score) if score is not None else 0.0, str(doc.get("id") or ""))


class HttpRetriever(SearchEngine):
    """Queries go in chunks of at most `batch_size` per request, each retried with backoff.

    `probe=True` sends one small request at construction, so a dead server is bad input
    (exit 2) before any work starts rather than a failure midway.
    """

    name = "http"

    def __init__(self, url: str, *, batch_size: int = 64, tries: int = 3, backoff: float = 0.5,
                 timeout: float = 30.0, probe: bool = True) -> None:
        import httpx

        super().__init__()
        if batch_size < 1:
            raise BadInput(f"search spec '{url}': batch_size must be at least 1")
        self.url = self.spec = url
        self.batch_size = int(batch_size)
        self.policy = RetryPolicy(tries=tries, backoff=backoff, timeout=timeout)
        self.client = httpx.Client()
        if probe:
            try:
                self._post(["test"], 1, count=False)
            except RunFailure as e:
                self.close()
                raise BadInput(f"retriever {url} is not usable ({e}); start it (zsctl serve, or Search-R1's "
                               "retrieval_server.py) or fix the URL") from None

    def _post(self, queries: list[str], k: int, count: bool = True) -> list[list[Document]]:
        def parse(data) -> list[list[Document]]:
            result = data["result"]
            if len(result) != len(queries):
                raise ValueError(f"{len(result)} result lists for {len(queries)} queries")
            return [[parse_document(item) for item in items][:k] for items in result]

        body = {"queries": queries, "topk": k, "return_scores": True}
        return request_json(self.client, "POST", self.url, parse, json=body, policy=self.policy,
                            stats=self.stats if count else None, lock=self.stats_lock, what=f"retriever {self.url}")

    def _search(self, queries, k, contexts, noise):
        out: list[list[Document]] = []
        for i in range(0, len(queries), self.batch_size):
            chunk = queries[i:i + self.batch_size]
            out.extend(self._post(chunk, k))
            with self.stats_lock:
                self.stats.calls += len(chunk)
        return out

    def close(self) -> None:
        self.client.close()
