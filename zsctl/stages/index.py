"""`zsctl index CORPUS --out DIR`: a BM25 (bm25s) index of a passage corpus, usable as `bm25:DIR`."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zsctl.core import artifacts
from zsctl.core.config import Options, option
from zsctl.core.errors import BadInput
from zsctl.core.progress import Progress


@dataclass(kw_only=True)
class IndexConfig(Options):
    corpus: str = option(help="Corpus .jsonl (id,title,text or id,contents) or .parquet.", positional=True)
    out: str = option(help="Output artifact directory.")


def run(cfg: IndexConfig, progress: Progress | None = None) -> dict:
    from zsctl.search.bm25 import BM25Engine

    progress = progress or Progress()
    if not Path(cfg.corpus).is_file():
        raise BadInput(
            f"corpus '{cfg.corpus}' is not a file; pass a .jsonl (id,title,text or id,contents) or .parquet corpus"
        )
    out = artifacts.check_out(cfg.out, "bm25_index", [cfg.corpus])
    t0 = time.perf_counter()
    engine = BM25Engine.from_corpus(cfg.corpus)
    build_s = time.perf_counter() - t0
    summary = {"out": str(out), "passages": len(engine), "build_s": round(build_s, 2)}
    with artifacts.staging(out) as tmp:  # an older index in --out stays usable until this one is whole
        engine.save(tmp, config=asdict(cfg), inputs=[artifacts.input_ref(cfg.corpus)], summary=summary)
    progress.log(f"indexed {summary['passages']} passages in {build_s:.1f}s → {out}")
    return summary
