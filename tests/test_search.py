"""Real engines: BM25 (bm25s) on a small corpus, the Search-R1 and SerpAPI clients against real
local HTTP servers, the on-disk cache, and make_engine's spec handling."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from zsctl.core.errors import BadInput, RunFailure
from zsctl.search import make_engine
from zsctl.search.base import Document, NoSearch, QueryContext, SearchEngine, SearchResult
from zsctl.search.bm25 import BM25Engine
from zsctl.search.cache import CachedEngine
from zsctl.search.http import HttpRetriever, split_contents
from zsctl.search.serpapi import SerpApiEngine

PASSAGES = [
    ("Lima", "Lima is the capital and largest city of Peru, on the Pacific coast."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Photosynthesis", "Photosynthesis turns light energy into chemical energy in plants."),
    ("Danube", "The Danube flows through Vienna, Budapest and Belgrade into the Black Sea."),
]
QUERIES = {"capital city of Peru": "Lima", "who wrote the tragedy Hamlet": "Hamlet",
           "highest mountains": "Mount Everest", "river through Budapest": "Danube"}
KEY = "sk-test-5ecret-key"


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ZSCTL_CACHE_DIR", str(root))
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path) -> Path:
    rows = [{"id": str(i), "title": t, "text": x} for i, (t, x) in enumerate(PASSAGES)]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def titles(results: list[SearchResult]) -> list[list[str]]:
    return [[d.title for d in r.docs] for r in results]


def docs_of(results: list[SearchResult]) -> list[list[Document]]:
    return [r.docs for r in results]


# --- BM25 ---------------------------------------------------------------------------------------


def test_bm25_ranks_the_right_passage_first(corpus):
    engine = BM25Engine.from_corpus(corpus)
    results = docs_of(engine.search(list(QUERIES), k=3))
    assert [docs[0].title for docs in results] == list(QUERIES.values())
    for docs in results:
        assert len(docs) == 3 and all(type(d.score) is float for d in docs)
        assert docs[0].score > 0 and [d.score for d in docs] == sorted((d.score for d in docs), reverse=True)
    assert results[0][0].text == PASSAGES[0][1]
    assert engine.stats.calls == 4 and engine.stats.batches == 1
    assert len(engine.search(["Peru"], k=50)[0].docs) == len(PASSAGES)  # k beyond the corpus: all of it
    assert engine.meta["tokenizer"]["stopwords"] == "en" and "stemmer" in engine.meta["tokenizer"]


def test_bm25_save_load_round_trip(corpus, tmp_path):
    engine = BM25Engine.from_corpus(corpus)
    out = engine.save(tmp_path / "index")
    assert {"corpus.parquet", "bm25_meta.json", "vocab.index.json"} <= {p.name for p in out.iterdir()}
    loaded = BM25Engine.load(out)
    assert len(loaded) == len(PASSAGES) and loaded.meta == engine.meta
    assert loaded.search(list(QUERIES), k=3) == engine.search(list(QUERIES), k=3)
    via_spec = make_engine(f"bm25:{out}")
    assert via_spec.spec == f"bm25:{out}"
    assert titles(via_spec.search(list(QUERIES), 2)) == titles(loaded.search(list(QUERIES), 2))


def test_bm25_corpus_spec_builds_once_then_loads_the_cache(corpus, cache_root, monkeypatch):
    first = make_engine(f"bm25:{corpus}")
    entries = list((cache_root / "bm25").iterdir())
    assert len(entries) == 1 and (entries[0] / "bm25_meta.json").is_file() and len(entries[0].name) == 64

    def no_rebuild(*a, **kw):
        raise AssertionError("the cached index should have been loaded")

    with monkeypatch.context() as m:
        m.setattr(BM25Engine, "from_corpus", no_rebuild)
        second = make_engine(f"bm25:{corpus}")
    assert second.search(list(QUERIES), k=3) == first.search(list(QUERIES), k=3)
    assert list((cache_root / "bm25").iterdir()) == entries
    corpus.write_text(corpus.read_text() + json.dumps({"id": "9", "title": "Nile", "text": "The Nile is long."}) + "\n")
    make_engine(f"bm25:{corpus}")  # changed content → a new cache entry
    assert len(list((cache_root / "bm25").iterdir())) == 2


def test_bm25_reads_flashrag_contents_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": str(i), "contents": f'"{t}"\n{x}'} for i, (t, x) in enumerate(PASSAGES)]
    flash = BM25Engine.from_corpus(write_jsonl(tmp_path / "wiki18.jsonl", rows))
    top = flash.search(["capital city of Peru"], k=1)[0].docs[0]
    assert (top.title, top.text) == PASSAGES[0]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "wiki18.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "title": ["Lima", "Hamlet"], "text": [PASSAGES[0][1], PASSAGES[1][1]]}),
                   tmp_path / "plain.parquet")
    assert titles(make_engine(f"bm25:{tmp_path / 'wiki18.parquet'}").search(["tragedy Shakespeare"], 1)) == [["Hamlet"]]
    assert titles(make_engine(f"bm25:{tmp_path / 'plain.parquet'}").search(["tragedy Shakespeare"], 1)) == [["Hamlet"]]
    assert split_contents('"Title"\nline one\nline two') == ("Title", "line one\nline two")
    assert split_contents("no title line") == ("", "no title line")


def test_bm25_bad_input(tmp_path):
    with pytest.raises(BadInput, match=r"bm25:.*nope.*no such file or index directory.*zsctl index"):
        make_engine(f"bm25:{tmp_path / 'nope'}")
    with pytest.raises(BadInput, match="row 2 has neither 'text' nor 'contents'"):
        make_engine(f"bm25:{write_jsonl(tmp_path / 'bad.jsonl', [{'id': 1, 'text': 'x'}, {'id': 2, 'body': 'y'}])}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BadInput, match="is empty"):
        make_engine(f"bm25:{tmp_path / 'empty.jsonl'}")
    (tmp_path / "broken.jsonl").write_text('{"id": 1, "text": \n')
    with pytest.raises(BadInput, match="unreadable"):
        make_engine(f"bm25:{tmp_path / 'broken.jsonl'}")
    (tmp_path / "not_an_index").mkdir()
    with pytest.raises(BadInput, match="not a complete BM25 index"):
        make_engine(f"bm25:{tmp_path / 'not_an_index'}")
    with pytest.raises(BadInput, match="no indexable words"):
        make_engine(f"bm25:{write_jsonl(tmp_path / 'stop.jsonl', [{'title': 'a', 'text': 'the of b'}])}")
    index = BM25Engine.from_corpus(write_jsonl(tmp_path / "ok.jsonl", [{"text": "lima peru"}])).save(tmp_path / "ix")
    (index / "corpus.parquet").unlink()
    with pytest.raises(BadInput, match="is damaged.*rebuild"):
        make_engine(f"bm25:{index}")


# --- local HTTP servers -------------------------------------------------------------------------


@contextmanager
def http_server(respond):
    """A real HTTP server on 127.0.0.1; `respond(request, n)` → (status, JSON payload)."""
    log: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self):
            size = int(self.headers.get("Content-Length") or 0)
            url = urlsplit(self.path)
            request = {"method": self.command, "path": url.path, "query": dict(parse_qsl(url.query)),
                       "body": json.loads(self.rfile.read(size)) if size else None}
            with lock:
                log.append(request)
                n = len(log)
            status, payload = respond(request, n)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _handle

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", log
    finally:
        server.shutdown()
        server.server_close()


def retrieval_api(request, n, scores=True):
    """Search-R1's /retrieve: topk documents per query, as `"Title"\\ntext` contents."""
    body = request["body"]
    result = []
    for q in body["queries"]:
        docs = [{"id": f"{q}-{j}", "contents": f'"Title {q} {j}"\ntext about {q}, number {j}'}
                for j in range(body["topk"])]
        result.append([{"document": d, "score": 10.0 - j} for j, d in enumerate(docs)] if scores else docs)
    return 200, {"result": result}


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/retrieve"


def test_http_retriever_parses_search_r1_results():
    with http_server(retrieval_api) as (url, log):
        engine = make_engine(f"{url}/retrieve")  # probes the server once
        results = engine.search(["peru capital", "hamlet"], k=2)
    assert titles(results) == [["Title peru capital 0", "Title peru capital 1"], ["Title hamlet 0", "Title hamlet 1"]]
    assert results[1].docs[1] == Document("Title hamlet 1", "text about hamlet, number 1", 9.0)
    assert log[-1]["body"] == {"queries": ["peru capital", "hamlet"], "topk": 2, "return_scores": True}
    assert engine.stats.calls == 2 and engine.stats.retries == 0
    with http_server(lambda r, n: retrieval_api(r, n, scores=False)) as (url, _):  # items are bare documents
        docs = HttpRetriever(f"{url}/retrieve", probe=False).search(["x"], k=1)[0].docs
    assert docs == [Document("Title x 0", "text about x, number 0", 0.0)]


def test_http_retriever_sends_chunks_of_batch_size():
    with http_server(retrieval_api) as (url, log):
        engine = HttpRetriever(f"{url}/retrieve", batch_size=2, probe=False)
        queries = [f"q{i}" for i in range(5)]
        results = engine.search(queries, k=1)
    assert [len(r["body"]["queries"]) for r in log] == [2, 2, 1]
    assert [r.docs[0].title for r in results] == [f"Title q{i} 0" for i in range(5)]
    assert engine.stats.calls == 5 and engine.stats.batches == 1


def test_http_retriever_retries_then_succeeds():
    def flaky(request, n):
        return (503, {"detail": "warming up"}) if n <= 2 else retrieval_api(request, n)

    with http_server(flaky) as (url, log):
        engine = HttpRetriever(f"{url}/retrieve", tries=3, backoff=0.01, probe=False)
        assert titles(engine.search(["a"], k=1)) == [["Title a 0"]]
    assert len(log) == 3 and engine.stats.retries == 2 and engine.stats.errors == 0


def test_http_retriever_gives_up_with_one_line_naming_the_url():
    with http_server(lambda r, n: (500, {"detail": "index\nnot loaded"})) as (url, log):
        engine = HttpRetriever(f"{url}/retrieve", tries=2, backoff=0.01, probe=False)
        with pytest.raises(RunFailure, match=f"{url}/retrieve failed after 2 attempt") as err:
            engine.search(["a"], k=1)
    assert "\n" not in str(err.value) and len(log) == 2 and engine.stats.errors == 1
    with http_server(lambda r, n: (422, {"detail": "bad topk"})) as (url, log):  # our fault: no retry
        with pytest.raises(RunFailure, match="HTTP 422"):
            HttpRetriever(f"{url}/retrieve", tries=3, backoff=0.01, probe=False).search(["a"], k=1)
    assert len(log) == 1


def test_http_retriever_dead_port_fails_fast():
    url = dead_url()
    engine = HttpRetriever(url, tries=2, backoff=0.01, timeout=1.0, probe=False)
    t0 = time.perf_counter()
    with pytest.raises(RunFailure, match=f"retriever {url} failed after 2 attempt"):
        engine.search(["a"], k=1)
    assert time.perf_counter() - t0 < 5 and engine.stats.errors == 1 and engine.stats.retries == 1
    with pytest.raises(BadInput, match=f"retriever {url} is not usable.*start it"):  # at startup: bad input
        make_engine(url, tries=1, timeout=1.0)


# --- SerpAPI ------------------------------------------------------------------------------------


def serpapi_json(request, n):
    q = request["query"]
    if q.get("api_key") != KEY:
        return 401, {"error": f"Invalid API key. Your API key should be here: {q.get('api_key')}"}
    if q["q"] == "nothing at all":
        return 200, {"error": "Google hasn't returned any results for this query."}
    organic = [{"position": p, "title": f"{q['q']} result {p}", "snippet": f"snippet {p}", "link": "https://x"}
               for p in (3, 1, 2)]
    page = {"search_metadata": {"status": "Success"}, "organic_results": organic}
    if q["q"] == "capital of peru":
        page["answer_box"] = {"type": "organic_result", "title": "Peru", "answer": "Lima"}
    return 200, page


def test_serpapi_one_request_per_distinct_query(monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", KEY)
    with http_server(serpapi_json) as (url, log):
        monkeypatch.setenv("ZSCTL_SERPAPI_URL", f"{url}/search.json")
        engine = make_engine("serpapi")
        results = engine.search(["capital of peru", "hamlet", "capital of peru", "nothing at all"], k=3)
    assert sorted(r["query"]["q"] for r in log) == ["capital of peru", "hamlet", "nothing at all"]
    assert all(r["path"] == "/search.json" and r["query"]["engine"] == "google" and r["query"]["num"] == "3"
               and r["query"]["api_key"] == KEY for r in log)
    assert titles(results) == [["Peru", "capital of peru result 1", "capital of peru result 2"],
                               ["hamlet result 1", "hamlet result 2", "hamlet result 3"],
                               ["Peru", "capital of peru result 1", "capital of peru result 2"], []]
    assert results[0].docs[0].text == "Lima" and [d.score for d in results[1].docs] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert engine.stats.calls == 3 and engine.spec == "serpapi"
    assert KEY not in json.dumps([[d.as_dict() for d in r.docs] for r in results]) + repr(engine) + engine.spec


def test_serpapi_key_never_in_errors(monkeypatch):
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    with pytest.raises(BadInput, match="SERPAPI_API_KEY"):
        make_engine("serpapi")
    wrong = "sk-wrong-key-123"
    with http_server(serpapi_json) as (url, log):  # the server echoes the bad key in its error body
        engine = SerpApiEngine(api_key=wrong, base_url=f"{url}/search.json", tries=2, backoff=0.01)
        with pytest.raises(RunFailure, match="serpapi .*HTTP 401") as err:
            engine.search(["hamlet"], k=2)
    assert log[0]["query"]["api_key"] == wrong and wrong not in str(err.value) and "***" in str(err.value)
    with pytest.raises(RunFailure, match="serpapi .* failed") as err:
        SerpApiEngine(api_key=wrong, base_url=dead_url(), tries=1, timeout=1.0).search(["x"], k=1)
    assert wrong not in str(err.value)


# --- the cache ----------------------------------------------------------------------------------


class CountingEngine(SearchEngine):
    name = "counting"
    spec = "counting:v1"

    def __init__(self):
        super().__init__()
        self.batches_seen: list[list[str]] = []

    def _search(self, queries, k, contexts, noise):
        self.batches_seen.append(list(queries))
        self.stats.calls += len(queries)
        return [[Document(f"{q} {j}", f"about {q}", 1.0 / (j + 1)) for j in range(k)] for q in queries]


def test_cache_serves_repeats_from_disk(tmp_path):
    inner = CountingEngine()
    engine = CachedEngine(inner, tmp_path / "cache.sqlite")
    first = engine.search(["a", "b"], k=2)
    assert engine.stats.calls == 2 and engine.stats.cache_hits == 0
    again = engine.search(["a", "b"], k=2)
    assert again == first and inner.stats.calls == 2 and engine.stats.cache_hits == 2
    mixed = engine.search(["c", "a", "c", "d"], k=2, contexts=[QueryContext()] * 4)
    assert inner.batches_seen[-1] == ["c", "d"] and len(inner.batches_seen) == 2  # misses in one batched call
    assert titles(mixed)[1] == ["a 0", "a 1"] and engine.stats.calls == 4 and engine.stats.cache_hits == 3
    engine.search(["a"], k=3)  # another k is another key
    assert inner.stats.calls == 5
    engine.close()
    reopened = CachedEngine(CountingEngine(), tmp_path / "cache.sqlite")  # persists across runs
    assert reopened.search(["a", "d"], k=2) == [first[0], mixed[3]] and reopened.stats.calls == 0


def test_cache_refuses_simulated_engines(tmp_path):
    class Sim(CountingEngine):
        name = "sim"
        simulated = True

    with pytest.raises(ValueError, match="must not be cached"):
        CachedEngine(Sim(), tmp_path / "c.sqlite")
    with pytest.raises(BadInput, match="never cached"):
        make_engine("sim:smollm2-135m", cache=str(tmp_path / "c.sqlite"))


def test_concurrent_searches_answer_as_serial_ones(corpus, tmp_path):
    """serve calls one engine from many threads: BM25, and BM25 behind the cache, give each caller its
    own results and count every call."""
    from concurrent.futures import ThreadPoolExecutor

    queries = list(QUERIES) * 6
    for engine in (make_engine(f"bm25:{corpus}"), make_engine(f"bm25:{corpus}", cache=str(tmp_path / "c.sqlite"))):
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda q: engine.search([q, "Peru"], k=2), queries))
        assert parallel == [engine.search([q, "Peru"], k=2) for q in queries]
        assert engine.stats.batches == 2 * len(queries)
        engine.close()


def test_make_engine_with_cache(corpus, tmp_path):
    engine = make_engine(f"bm25:{corpus}", cache=str(tmp_path / "c.sqlite"))
    assert isinstance(engine, CachedEngine) and engine.spec == f"bm25:{corpus}"
    engine.search(["capital city of Peru"], k=1)
    engine.search(["capital city of Peru"], k=1)
    assert engine.stats.calls == 1 and engine.stats.cache_hits == 1


def test_one_truncation_rule_for_inserted_and_training_documents():
    """The agent cuts the documents it inserts and build-sft the ones it trains on by one rule."""
    from zsctl.agent import _trim
    from zsctl.search.base import cut_words
    from zsctl.stages.build_sft import clean_docs

    text = "  Lima  is the\ncapital and\tlargest city of Peru ."
    for n in (1, 3, 8, 50):
        inserted = _trim([Document("Lima", text)], n)[0].text
        assert inserted == clean_docs([{"title": "Lima", "text": text}], n)[0]["text"] == " ".join(text.split()[:n])
    assert cut_words(text, 0) == cut_words(text, None) == text  # no limit: the text as it came


# --- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "bogus", "bm25", "bm25:", "ftp://host/retrieve", "serpapi2", "None"])
def test_make_engine_rejects_bad_specs(spec):
    with pytest.raises(BadInput) as err:
        make_engine(spec)
    assert "\n" not in str(err.value)
    if not spec.startswith("bm25:"):
        assert "none, bm25:…, http://…, https://…, serpapi" in str(err.value)


def test_make_engine_none():
    engine = make_engine("none")
    assert isinstance(engine, NoSearch) and docs_of(engine.search(["a", "b"], k=3)) == [[], []]


def test_bm25_keeps_jax_off_the_gpu_unless_told(tmp_path):
    """bm25s runs JAX at import where it is installed; JAX would take most of a GPU's memory."""
    import subprocess
    import sys

    probe = "import os, zsctl.search.bm25, bm25s; print(os.environ.get('JAX_PLATFORMS'))"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = lambda e: subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.strip()
    assert run(env) == "cpu"
    assert run({**env, "JAX_PLATFORMS": "cuda"}) == "cuda"  # the user's choice stands
