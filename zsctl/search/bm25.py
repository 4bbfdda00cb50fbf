"""`bm25:PATH`: BM25 over a passage corpus with bm25s (scores precomputed into a sparse matrix).

PATH is an index directory written by `save` (what `zsctl index` writes) or a corpus file:
JSONL or Parquet with `id,title,text`, or FlashRAG/Search-R1's `id,contents` where contents is
`"Title"\\ntext`. A corpus file is indexed on the fly and the index cached under
`$ZSCTL_CACHE_DIR/bm25/<sha256(file content + tokenizer settings)>/`, so the next run loads it.

Tokenisation: lowercase, bm25s's word pattern, English stopwords, and the PyStemmer English
stemmer when it is installed; which one was used is recorded in the index metadata, and queries
are always tokenised the same way as their index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from zsctl.core.errors import BadInput
from zsctl.search.base import Document, SearchEngine

META = "bm25_meta.json"  # written last by save(): its presence marks a complete index
CORPUS = "corpus.parquet"
STOPWORDS = "en"
BM25_PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75}
# bm25s imports JAX where it is installed and runs a top-k on JAX's default device at import. On a
# GPU machine that is the GPU, and JAX takes 75 % of its memory up front, from the policy and vLLM
# (seen on an H100: processes of the test suite ran out of GPU memory). BM25 needs no GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def tokenizer_settings() -> dict:
    """What decides the index's content besides the corpus (part of the cache key)."""
    import bm25s

    try:
        import Stemmer  # noqa: F401  (PyStemmer)

        stemmer = "english"
    except ImportError:
        stemmer = None
    return {"lower": True, "stopwords": STOPWORDS, "stemmer": stemmer, **BM25_PARAMS, "bm25s": bm25s.__version__}


def _stemmer(name: str | None):
    if name is None:
        return None
    try:
        import Stemmer
    except ImportError:
        raise BadInput(f"this BM25 index was built with the PyStemmer '{name}' stemmer; "
                       "run `pip install PyStemmer` or rebuild the index") from None
    return Stemmer.Stemmer(name)


def _split_contents(contents: str) -> tuple[str, str]:
    from zsctl.search.http import split_contents

    return split_contents(contents)


def read_corpus(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(ids, titles, texts) from a JSONL or Parquet corpus; BadInput naming the file on any problem."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise BadInput(f"corpus '{path}' is unreadable ({type(e).__name__}: {e}); "
                       "pass a .jsonl or .parquet file with id,title,text or id,contents") from None
    if not rows:
        raise BadInput(f"corpus '{path}' is empty; pass a corpus with at least one passage")
    ids, titles, texts = [], [], []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise BadInput(f"corpus '{path}' row {n} is not a JSON object; each row needs id,title,text or id,contents")
        if row.get("text") is not None:
            title, text = str(row.get("title") or ""), str(row["text"])
        elif row.get("contents") is not None:
            title, text = _split_contents(str(row["contents"]))
        else:
            raise BadInput(f"corpus '{path}' row {n} has neither 'text' nor 'contents'; "
                           "each row needs id,title,text or id,contents")
        ids.append(str(row.get("id", n - 1)))
        titles.append(title)
        texts.append(text)
    return ids, titles, texts


def _fingerprint(path: Path, settings: dict) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


class BM25Engine(SearchEngine):
    name = "bm25"

    def __init__(self, retriever, ids: list[str], titles: list[str], texts: list[str], meta: dict,
                 spec: str = "bm25") -> None:
        super().__init__()
        self.retriever, self.ids, self.titles, self.texts, self.meta = retriever, ids, titles, texts, meta
        self.spec = spec
        self.cache_id = f"bm25:{meta.get('fingerprint') or spec}"  # CachedEngine keys on the index, not its path
        self._stemmer = _stemmer(meta["tokenizer"]["stemmer"])
        self._stem_lock = threading.Lock()  # a PyStemmer stemmer must not be used by two threads at once

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_corpus(cls, path: str | Path, spec: str | None = None, fingerprint: str | None = None) -> BM25Engine:
        import bm25s

        path = Path(path)
        settings = tokenizer_settings()
        ids, titles, texts = read_corpus(path)
        stemmer = _stemmer(settings["stemmer"])
        tokens = bm25s.tokenize([f"{t}\n{x}" for t, x in zip(titles, texts)], stopwords=STOPWORDS,
                                stemmer=stemmer, show_progress=False)
        if not tokens.vocab:
            raise BadInput(f"corpus '{path}' has no indexable words (all stopwords or one-letter tokens); "
                           "pass a corpus of real passages")
        retriever = bm25s.BM25(**BM25_PARAMS)
        retriever.index(tokens, show_progress=False)
        meta = {"tokenizer": settings, "passages": len(ids), "source": str(path),
                "fingerprint": fingerprint or _fingerprint(path, settings)}
        return cls(retriever, ids, titles, texts, meta, spec or f"bm25:{path}")

    @classmethod
    def load(cls, path: str | Path, spec: str | None = None) -> BM25Engine:
        import bm25s
        import pyarrow.parquet as pq

        path = Path(path)
        if not (path / META).is_file():
            raise BadInput(f"'{path}' is not a complete BM25 index (no {META}); "
                           "build one with `zsctl index CORPUS --out DIR`")
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
            retriever = bm25s.BM25.load(str(path), show_progress=False)
            corpus = pq.read_table(path / CORPUS).to_pydict()
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(f"BM25 index '{path}' is damaged ({type(e).__name__}: {e}); "
                           "rebuild it with `zsctl index CORPUS --out DIR`") from None
        return cls(retriever, corpus["id"], corpus["title"], corpus["text"], meta, spec or f"bm25:{path}")

    def save(self, out: str | Path, **manifest) -> Path:
        """Write the index into `out`, manifest last (`manifest`: write_manifest keywords, e.g. the
        index stage's config and inputs), so every index folder we write is a complete artifact."""
        import pyarrow as pa

        from zsctl.core import artifacts

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)
        (out / artifacts.MANIFEST).unlink(missing_ok=True)
        self.retriever.save(str(out), show_progress=False)
        artifacts.write_table(out, CORPUS, pa.table({"id": self.ids, "title": self.titles, "text": self.texts}))
        artifacts.write_json(out, META, self.meta)
        manifest.setdefault("config", {"source": self.meta.get("source")})
        manifest.setdefault("summary", {"passages": len(self)})
        artifacts.write_manifest(out, "bm25_index", **manifest)
        return out

    def _search(self, queries, k, contexts, noise):
        import bm25s

        # one tokenize + one retrieve for the whole batch
        with self._stem_lock:
            tokens = bm25s.tokenize(queries, stopwords=STOPWORDS, stemmer=self._stemmer, return_ids=False,
                                    show_progress=False)
        k = min(k, len(self))  # always k passages, as Search-R1's retrievers do (zero scores included)
        if k < 1:
            return [[] for _ in queries]
        indices, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        with self.stats_lock:
            self.stats.calls += len(queries)
        return [
            [
                Document(self.titles[i], self.texts[i], float(s), str(self.ids[i]))
                for i, s in zip(row_i.tolist(), row_s.tolist())
            ]
            for row_i, row_s in zip(indices, scores)
        ]


def cache_dir() -> Path:
    from zsctl.core.models import cache_root

    return cache_root() / "bm25"


def _check_index_dir(p: Path) -> None:
    """An index folder is ours: it needs a complete manifest of kind bm25_index (a killed rerun of
    `zsctl index`, or another artifact, is refused)."""
    from zsctl.core import artifacts

    if not (p / artifacts.MANIFEST).is_file():
        raise BadInput(f"'{p}' is not a complete BM25 index (no {artifacts.MANIFEST}); "
                       "build one with `zsctl index CORPUS --out DIR`")
    kind = artifacts.read_manifest(p).get("kind")
    if kind != "bm25_index":
        raise BadInput(f"'{p}' is a '{kind}' artifact, not a BM25 index; build one with `zsctl index CORPUS --out DIR`")


def open_bm25(path: str) -> BM25Engine:
    """The `bm25:PATH` spec: an index directory, or a corpus file indexed once and cached."""
    spec = f"bm25:{path}"
    p = Path(path).expanduser()
    if p.is_dir():
        _check_index_dir(p)
        return BM25Engine.load(p, spec)
    if not p.is_file():
        raise BadInput(f"search spec '{spec}': no such file or index directory; build one with "
                       "`zsctl index CORPUS --out DIR` or pass a corpus .jsonl/.parquet")
    try:
        fingerprint = _fingerprint(p, tokenizer_settings())
    except OSError as e:
        raise BadInput(f"search spec '{spec}': corpus unreadable ({e}); check the file's permissions") from None
    cached = cache_dir() / fingerprint
    if (cached / META).is_file():
        try:
            return BM25Engine.load(cached, spec)
        except BadInput:
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cache entry is rebuilt below
    engine = BM25Engine.from_corpus(p, spec, fingerprint)
    # build in a private temp dir, then rename: a concurrent run never sees half an index
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    try:
        engine.save(tmp)
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run won the race, or the cache is read-only
    return engine
