"""`zsctl check-sim`: how good is a simulated search engine?

For a set of queries — the logged searches of a trajectories artifact (each with its own question
and gold answers), or the questions themselves used as queries — the simulator writes documents in
BOTH modes. Reported per mode: the share of outputs that contain a gold answer (useful should be
high, noisy low: the gap is the controllability), format validity (k well-formed `Doc i:` docs),
mean document length in words, and distinct-1/distinct-2 over the outputs. With `--vs S` a real
engine answers the same queries and gets the same containment/length/distinct figures.

Writes check_sim.parquet (one row per query × mode, documents included), metrics.json, manifest.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import pyarrow as pa

from zsctl.core import artifacts, data, metrics, prompts
from zsctl.core.errors import BadInput
from zsctl.core.progress import Progress
from zsctl.core.schemas import CHECK_SIM
from zsctl.search import make_engine
from zsctl.search.base import QueryContext


@dataclass
class CheckSimConfig:
    search: str  # the simulated engine: sim:MODEL or sim+http://…
    out: str
    questions: str | None = None  # bundled benchmark name(s) (eval split) or a FlashRAG jsonl / parquet
    trajectories: str | None = None  # take the queries from this trajectories artifact instead
    limit: int | None = 30  # queries
    vs: str | None = None  # a real engine to compare with
    k: int = 3
    sim_mode: str = "tuned"
    sim_template: str | None = None
    max_new_tokens: int | None = None
    batch_size: int = 16
    seed: int = 0


def load_queries(cfg: CheckSimConfig) -> list[dict]:
    """[{id, query, question, golden_answers}] — from logged searches, else one per question."""
    if cfg.trajectories:
        table = artifacts.read_artifact(cfg.trajectories, "trajectories",
                                        columns=["traj_id", "question", "golden_answers", "searches"])
        rows, seen = [], set()
        for t in table.to_pylist():
            for j, s in enumerate(t["searches"] or []):
                key = (s["query"].strip().lower(), t["question"])
                if not s["query"].strip() or key in seen:
                    continue
                seen.add(key)
                rows.append({"id": f"{t['traj_id']}#{j}", "query": s["query"], "question": t["question"],
                             "golden_answers": list(t["golden_answers"])})
        if not rows:
            raise BadInput(f"trajectories '{cfg.trajectories}' hold no search queries; collect with a real engine first")
    elif cfg.questions:
        rows = []
        names = [s.strip() for s in cfg.questions.split(",") if s.strip()]
        each = -(-cfg.limit // len(names)) if cfg.limit and names else None  # the limit shared out
        for name in names:
            split = "eval" if name in data.BENCHMARKS else None  # never the questions training used
            for q in data.load_questions(name, split=split, limit=each).to_pylist():
                rows.append({"id": f"{q['data_source']}:{q['id']}", "query": q["question"], "question": q["question"],
                             "golden_answers": list(q["golden_answers"])})
    else:
        raise BadInput("check-sim needs --questions (benchmark name or file) or --trajectories DIR")
    return rows[: cfg.limit] if cfg.limit else rows


def has_answer(text: str, golds: list[str]) -> bool:
    """A normalised gold answer occurs in the normalised text as whole words."""
    hay = f" {metrics.normalize_answer(text)} "
    return any(g and f" {g} " in hay for g in (metrics.normalize_answer(x) for x in golds))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over a set of outputs (lowercased words); 0 when there are none."""
    grams = [tuple(ws[i:i + n]) for t in texts for ws in [t.lower().split()] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(rows: list[dict]) -> dict:
    """Containment, format, length and diversity figures for a set of rows (one engine/mode)."""
    n = len(rows)
    texts = [_content(r["documents"]) for r in rows]
    docs = [d for r in rows for d in r["documents"] if d["text"].strip()]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "n": n,
        "has_answer": mean([float(r["has_answer"]) for r in rows]),
        "format_valid": mean([float(r["well_formed"]) for r in rows]),
        "mean_doc_words": mean([len(d["text"].split()) for d in docs]),
        "empty_docs": 1.0 - len(docs) / max(1, sum(len(r["documents"]) for r in rows)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }


def run(cfg: CheckSimConfig, progress: Progress | None = None, *, engine=None, vs_engine=None) -> dict:
    """`engine`/`vs_engine`: already-built engines (tests, or sharing a loaded model) instead of specs."""
    progress = progress or Progress()
    if cfg.k < 1 or cfg.batch_size < 1:
        raise BadInput("--k and --batch-size must be at least 1")
    queries = load_queries(cfg)
    if engine is None:
        if not cfg.search.startswith("sim"):
            raise BadInput(f"--search '{cfg.search}' is not a simulated engine; pass sim:MODEL or sim+http://HOST:PORT/v1")
        engine = make_engine(cfg.search, sim_mode=cfg.sim_mode, template=cfg.sim_template, seed=cfg.seed,
                             max_new_tokens=cfg.max_new_tokens)
    if vs_engine is None and cfg.vs:
        vs_engine = make_engine(cfg.vs)
    out = artifacts.prepare_out(cfg.out)  # after setup: bad input never touches --out

    rows: list[dict] = []
    t0 = time.perf_counter()
    progress.start("check-sim", len(queries))
    for start in range(0, len(queries), cfg.batch_size):
        batch = queries[start:start + cfg.batch_size]
        texts = [q["query"] for q in batch]
        # both modes of the batch in one simulator call: one generate (or request round) per batch
        pairs = [(q, mode) for mode in prompts.SIM_MODES for q in batch]
        ctxs = [QueryContext(q["question"], q["golden_answers"], mode) for q, mode in pairs]
        results = engine.search([q["query"] for q, _ in pairs], cfg.k, ctxs)
        for (q, mode), docs, raw, ok in zip(pairs, results, engine.last_texts, engine.last_well_formed):
            rows.append(_row(q, "simulator", engine.spec, mode, docs, raw, ok, cfg.k))
        if vs_engine is not None:
            for q, docs in zip(batch, vs_engine.search(texts, cfg.k)):
                rows.append(_row(q, "real", vs_engine.spec or cfg.vs, "real", docs, "", None, cfg.k))
        progress.advance(len(batch))
    progress.stop()
    wall = time.perf_counter() - t0

    sim_rows = [r for r in rows if r["role"] == "simulator"]
    by_mode = {m: summarize([r for r in sim_rows if r["mode"] == m]) for m in prompts.SIM_MODES}
    result = {
        "n_queries": len(queries),
        "k": cfg.k,
        "simulator": {
            "spec": engine.spec,
            "sim_mode": getattr(engine, "sim_mode", None),
            **by_mode,
            "controllability_gap": by_mode["useful"]["has_answer"] - by_mode["noisy"]["has_answer"],
            "format_valid": summarize(sim_rows)["format_valid"],
        },
    }
    if vs_engine is not None:
        result["real"] = {"spec": vs_engine.spec or cfg.vs, **summarize([r for r in rows if r["role"] == "real"])}
    artifacts.write_table(out, "check_sim.parquet", pa.Table.from_pylist(rows, schema=CHECK_SIM))
    artifacts.write_json(out, "metrics.json", result)
    summary = {"out": str(out), "rows": len(rows), "wall_s": round(wall, 2), "search": engine.stats.as_dict(), **result}
    inputs = [artifacts.input_ref(cfg.trajectories)] if cfg.trajectories else [{"questions": cfg.questions}]
    artifacts.write_manifest(out, "check_sim", config=asdict(cfg), inputs=inputs, summary=summary, seed=cfg.seed)
    engine.close()
    if vs_engine is not None:
        vs_engine.close()
    return summary


def _row(q: dict, role: str, spec: str, mode: str, docs, raw: str, well_formed: bool | None, k: int) -> dict:
    return {
        "id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"], "query": q["query"],
        "role": role, "engine": spec, "mode": mode, "documents": [d.as_dict() for d in docs],
        "text": prompts.format_documents(docs), "raw": raw,
        "well_formed": bool(well_formed) if well_formed is not None else len(docs) == k,
        "has_answer": has_answer(_content([d.as_dict() for d in docs]), q["golden_answers"]),
    }


def _content(docs: list[dict]) -> str:
    """Titles and texts only: the 'Doc i:' labels would count as shared n-grams."""
    return " ".join(f"{d['title']} {d['text']}" for d in docs)
