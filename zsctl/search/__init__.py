"""Search engines behind one small interface; `make_engine(spec)` turns a search spec into one.

Specs: `none`, `bm25:PATH` (index dir or corpus file), `http(s)://HOST:PORT/retrieve`
(Search-R1 retrieval API), `serpapi` (key from SERPAPI_API_KEY), and the simulated engines.
Engine modules are imported inside the factories so `zsctl --help` stays instant.
"""

from __future__ import annotations

from typing import Callable

from zsctl.core.errors import BadInput
from zsctl.search.base import Document, NoSearch, Noise, QueryContext, SearchEngine, SearchResult

__all__ = ["Document", "Noise", "QueryContext", "SearchEngine", "SearchResult", "ENGINES", "make_engine",
           "is_simulated"]


def _none(spec: str, **kw) -> SearchEngine:
    return NoSearch()


def _bm25(spec: str, **kw) -> SearchEngine:
    from zsctl.search.bm25 import open_bm25

    path = spec[len("bm25:"):]
    if not path:
        raise BadInput("search spec 'bm25:' names no path; use bm25:INDEX_DIR or bm25:CORPUS.jsonl")
    return open_bm25(path)


def _http(spec: str, **kw) -> SearchEngine:
    from zsctl.search.http import HttpRetriever

    return HttpRetriever(spec, **kw)


def _serpapi(spec: str, **kw) -> SearchEngine:
    from zsctl.search.serpapi import SerpApiEngine

    return SerpApiEngine(**kw)


def _sim(spec: str, **kw) -> SearchEngine:
    from zsctl.search.simulator import make_sim

    return make_sim(spec, **kw)


def _sim_http(spec: str, **kw) -> SearchEngine:
    from zsctl.search.simulator import make_sim_http

    return make_sim_http(spec, **kw)


# Prefix → factory(spec, **kw). A key ending in ':' or '/' is a prefix; other keys match exactly.
# The simulated engines (zsctl.search.simulator) are the "sim:" and "sim+http(s)://" entries.
ENGINES: dict[str, Callable[..., SearchEngine]] = {
    "none": _none,
    "bm25:": _bm25,
    "http://": _http,
    "https://": _http,
    "serpapi": _serpapi,
    "sim:": _sim,
    "sim+http://": _sim_http,
    "sim+https://": _sim_http,
}


def _factory(spec: str) -> Callable[..., SearchEngine] | None:
    for key in sorted(ENGINES, key=len, reverse=True):  # longest first: "sim+http://" before "sim:"
        if spec == key or (key.endswith((":", "/")) and spec.startswith(key)):
            return ENGINES[key]
    return None


def is_simulated(spec: str) -> bool:
    """Whether `spec` names a simulated engine (decided without building it)."""
    return _factory((spec or "").strip()) in (_sim, _sim_http)


def make_engine(spec: str, *, cache: str | None = None, sim_template: str | None = None, **kw) -> SearchEngine:
    """Build the engine for `spec`; `cache` = path of an on-disk (engine, query, k) cache;
    `sim_template` = a simulator template (file or built-in name; simulated engines only).

    Extra keywords go to the engine's constructor (e.g. timeout/tries for network engines).
    """
    spec = (spec or "").strip()
    if sim_template:
        if not is_simulated(spec):
            raise BadInput(
                f"--sim-template applies only to simulated engines (sim:…, sim+http://…), not '{spec}'; drop it"
            )
        kw["template"] = sim_template
    if cache and is_simulated(spec):
        raise BadInput(f"search spec '{spec}': simulated engines are never cached; drop the search cache option")
    factory = _factory(spec)
    for sim_only in ("verify", "chain"):
        if factory not in (None, _sim, _sim_http) and f"{sim_only}=" in spec.partition("?")[2]:
            raise BadInput(f"search spec '{spec}': {sim_only} applies only to simulated engines "
                           f"(sim:MODEL?{sim_only}=N, sim+http://…?{sim_only}=N); drop it")
    if factory is None:
        forms = ", ".join(k + ("…" if k.endswith((":", "/")) else "") for k in ENGINES)
        raise BadInput(f"search spec '{spec}' is not recognised; use one of: {forms} "
                       "(e.g. bm25:data/corpus/wiki_sample.jsonl)")
    engine = factory(spec, **kw)
    if cache:
        from zsctl.search.cache import CachedEngine

        try:
            engine = CachedEngine(engine, cache)
        except BadInput:
            engine.close()
            raise
    return engine
