"""The engine interface every search backend implements.

One call answers a whole batch of queries (the agent loop calls it once per turn), so network
engines can batch requests and the simulator can run one `generate` for all of them. It returns one
`SearchResult` per query: the documents, and from a simulated engine also how they were written.
Nothing about a call is kept on the engine, so one engine may answer calls from several threads.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field


@dataclass
class Document:
    title: str
    text: str
    score: float = 0.0
    # the corpus id where the engine knows it (BM25, a retriever that sends one); not part of equality
    id: str = field(default="", compare=False)

    def as_dict(self) -> dict:
        return {"title": self.title, "text": self.text, "score": float(self.score)}


def cut_words(text: str, max_words: int | None) -> str:
    """The one document-truncation rule: the first `max_words` words (whitespace between them made
    one space); 0 or None keeps the text as it is. The agent cuts the documents it inserts with it
    and build-sft the documents it trains on, so training data matches what the policy will see."""
    if not max_words:
        return text
    return " ".join(text.split(None, max_words)[:max_words])  # maxsplit: a long text is not split whole


@dataclass
class QueryContext:
    """What a simulated engine may know about the sample that issued a query.

    Real engines ignore it. `mode` is "useful", "noisy" or None (let the engine draw it).
    """

    question: str = ""
    golden_answers: list[str] = field(default_factory=list)
    mode: str | None = None


@dataclass
class Noise:
    """How a simulated engine picks a mode for a query whose context names none: noisy with
    probability `p`, drawn from `rng` in query order (RL passes a per-step generator, so a redone
    step draws the same modes)."""

    p: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def draw(self) -> str:
        return "noisy" if self.rng.random() < self.p else "useful"


@dataclass
class SearchResult:
    """One query's answer. Real engines fill only `docs`."""

    docs: list[Document]
    mode: str | None = None  # simulated: "useful" | "noisy", the mode the query was asked in
    text: str | None = None  # simulated: the reply the documents were parsed from (as kept)
    well_formed: bool | None = None  # simulated: the reply held exactly k numbered documents
    tries: int = 0  # simulated: generations spent on the reply (1 + verification retries)
    verified: bool | None = None  # simulated with verify: the kept reply passed (None: verify off)
    prompt: str | None = None  # simulated: the prompt the reply was written from


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
    """Base class. Subclasses set `name` and implement `_search`; simulated ones set `simulated`."""

    name = "engine"
    spec = ""
    simulated = False  # writes its documents (honours contexts and noise; never cached)

    def __init__(self) -> None:
        self.stats = SearchStats()
        self.stats_lock = threading.Lock()  # counters are updated from every thread that searches

    def search(
        self, queries: list[str], k: int = 3, contexts: list[QueryContext] | None = None, noise: Noise | None = None
    ) -> list[SearchResult]:
        """One result per query: up to k documents in rank order. `noise` (simulated engines only):
        how modes are drawn for queries whose context names none; None = the engine's own setting."""
        if not queries:
            return []
        if contexts is not None and len(contexts) != len(queries):
            raise ValueError("contexts must align one-to-one with queries")
        with self.stats_lock:
            self.stats.batches += 1
        out = self._search(list(queries), k, contexts, noise)
        return [r if isinstance(r, SearchResult) else SearchResult(r) for r in out]

    def _search(
        self, queries: list[str], k: int, contexts: list[QueryContext] | None, noise: Noise | None
    ) -> list[SearchResult | list[Document]]:
        """One entry per query: a SearchResult, or (real engines) just its list of documents."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class NoSearch(SearchEngine):
    """`none`: every query gets no documents (closed-book baseline)."""

    name = "none"
    spec = "none"

    def _search(self, queries, k, contexts, noise):
        return [[] for _ in queries]
