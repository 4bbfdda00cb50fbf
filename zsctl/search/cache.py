"""An on-disk cache of (engine, query, k) → documents in front of a real engine.

Reruns of eval/collect then pay (SerpAPI bills per query) and wait only for new queries.
Simulated engines are never cached: their answers are meant to vary (noise mode, sampling).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from zsctl.core.errors import BadInput, redact
from zsctl.search.base import Document, SearchEngine

_SCHEMA = """CREATE TABLE IF NOT EXISTS docs (
    engine TEXT NOT NULL, query TEXT NOT NULL, k INTEGER NOT NULL, documents TEXT NOT NULL,
    PRIMARY KEY (engine, query, k))"""


class CachedEngine(SearchEngine):
    """Wraps `engine`; `stats.cache_hits` counts queries served from disk, `stats.calls`,
    `retries` and `errors` mirror the wrapped engine's (what the backend really did)."""

    def __init__(self, engine: SearchEngine, path: str | Path) -> None:
        if engine.simulated:
            raise ValueError(f"simulated engine '{engine.spec or engine.name}' must not be cached")
        super().__init__()
        self.engine = engine
        self.name, self.spec = engine.name, engine.spec
        # the key is stored in the file: a spec's credentials never are (same results with any key)
        self.key = redact(getattr(engine, "cache_id", None) or engine.spec or engine.name)
        path = Path(path)
        if path.is_dir():
            path = path / "search_cache.sqlite"
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # one connection shared by the threads of a server; the lock serialises its use
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.execute(_SCHEMA)
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            raise BadInput(f"search cache '{path}' cannot be opened ({e}); pass a writable file path") from None
        self._lock = threading.Lock()
        self._sync()

    def _sync(self) -> None:
        inner = self.engine.stats
        with self.stats_lock:
            self.stats.calls, self.stats.retries, self.stats.errors = inner.calls, inner.retries, inner.errors

    def _search(self, queries, k, contexts, noise):
        found: dict[str, list[Document]] = {}
        with self._lock:
            for q in dict.fromkeys(queries):
                row = self._db.execute("SELECT documents FROM docs WHERE engine=? AND query=? AND k=?",
                                       (self.key, q, k)).fetchone()
                if row is not None:
                    found[q] = [Document(**d) for d in json.loads(row[0])]
        with self.stats_lock:
            self.stats.cache_hits += sum(q in found for q in queries)
        first: dict[str, int] = {}  # each distinct miss once, with its first position's context
        for i, q in enumerate(queries):
            if q not in found:
                first.setdefault(q, i)
        miss_queries = list(first)
        if miss_queries:
            ctx = [contexts[i] for i in first.values()] if contexts is not None else None
            try:
                answers = [r.docs for r in self.engine.search(miss_queries, k, ctx)]
            finally:
                self._sync()
            rows = [(self.key, q, k, json.dumps([d.as_dict() for d in docs])) for q, docs in zip(miss_queries, answers)]
            with self._lock:
                self._db.executemany("INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?)", rows)
                self._db.commit()
            found.update(zip(miss_queries, answers))
        return [[Document(d.title, d.text, d.score) for d in found[q]] for q in queries]

    def close(self) -> None:
        self.engine.close()
        with self._lock:
            self._db.close()
