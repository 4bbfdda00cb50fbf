"""The engine interface every search backend implements.

One call answers a whole batch of queries (the agent loop calls it once per turn), so network
engines can batch requests and the simulator can run one `generate` for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    title: str
    text: str
    score: float = 0.0

    def as_dict(self) -> dict:
        return {"title": self.title, "text": self.text, "score": float(self.score)}


@dataclass
class QueryContext:
    """What a simulated engine may know about the sample that issued a query.

    Real engines ignore it. `mode` is "useful", "noisy" or None (let the engine draw it).
    """

    question: str = ""
    golden_answers: list[str] = field(default_factory=list)
    mode: str | None = None


@dataclass
class SearchStats:
    """Counters every engine keeps; collect/report turn them into the search-cost ledger."""

    calls: int = 0  # queries answered by the backend itself (billable for serpapi)
    cache_hits: int = 0
    batches: int = 0
    retries: int = 0
    errors: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class SearchEngine:
    """Base class. Subclasses set `name` and implement `_search`."""

    name = "engine"
    spec = ""

    def __init__(self) -> None:
        self.stats = SearchStats()
        self.last_modes: list[str | None] = []  # simulated engines record the mode used per query

    def search(
        self, queries: list[str], k: int = 3, contexts: list[QueryContext] | None = None
    ) -> list[list[Document]]:
        """Return up to k documents for each query, in rank order (one list per query)."""
        if not queries:
            return []
        if contexts is not None and len(contexts) != len(queries):
            raise ValueError("contexts must align one-to-one with queries")
        self.stats.batches += 1
        self.last_modes = [None] * len(queries)
        return self._search(list(queries), k, contexts)

    def _search(
        self, queries: list[str], k: int, contexts: list[QueryContext] | None
    ) -> list[list[Document]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NoSearch(SearchEngine):
    """`none`: every query gets no documents (closed-book baseline)."""

    name = "none"
    spec = "none"

    def _search(self, queries, k, contexts):
        return [[] for _ in queries]
