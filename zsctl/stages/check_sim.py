"""`zsctl check-sim`: how good is a simulated search engine, on queries it never trained on?

For a set of queries — the questions of `--questions` used as queries (for bundled benchmarks their
evaluation split), or the logged searches of a `--trajectories` artifact — the simulator writes
documents in BOTH modes. Held apart: when the simulator is a `sim:DIR` that train-sim wrote, its
manifest names its build-sft data, and every query whose question is in that data's train.parquet
(what train-sim fits) is dropped and counted; when the data cannot be found (sim+http://, another
model, a moved folder) the summary says the check was not made. Yes/no golds are dropped and
counted too: containment cannot judge "no".

Reported per mode: the share of outputs that hold a gold answer (metrics.docs_hold_answer; useful
should be high, noisy low) with a 95 % Wilson interval, format validity (k well-formed `Doc i:`
docs), mean document length, distinct-1/2. The gap (useful − noisy) comes with a 95 % interval by
Newcombe's hybrid score method (his method 10: the two Wilson intervals combined), which treats
the two modes as independent samples — conservative when a query's two outcomes are positively
correlated. Leak probe: each query's question and answer are also asked with a query that names
nothing (prompts.LEAK_PROBES, cycled) in useful mode; the share of those replies that hold a gold
answer is the leak (a simulator that hands out answers to any query rewards a policy that
searches "query"). With `--vs S` a real engine answers the same queries for comparison.

Writes check_sim.parquet (one row per query × mode, probes and real results included),
metrics.json, manifest.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zsctl.core import artifacts, data, metrics, prompts
from zsctl.core.config import Options, option
from zsctl.core.errors import BadInput, redact
from zsctl.core.progress import Progress
from zsctl.core.schemas import CHECK_SIM
from zsctl.search import is_simulated, make_engine
from zsctl.search.base import QueryContext
from zsctl.search.simulator import SIM_STYLES


@dataclass(kw_only=True)
class CheckSimConfig(Options):
    search: str = option(help="The simulator: sim:MODEL | sim+http://HOST:PORT/v1[,...]")
    out: str = option(help="Output artifact directory.")
    questions: str | None = option(None, "Bundled benchmark name(s) (eval split) or a FlashRAG jsonl / parquet; "
                                   "the question is the query.")
    trajectories: str | None = option(None, "Take the logged queries (with their own questions) from this "
                                      "trajectories artifact.")
    limit: int | None = option(30, "At most N held-apart queries (spread over the benchmarks).", ge=1)
    vs: str | None = option(None, "A real engine to compare with, e.g. bm25:PATH.")
    k: int = option(3, "Documents per query.", flag="topk", aliases=("k",), ge=1)
    sim_mode: str = option("tuned", "For sim: engines: tuned (a train-sim model) | prompt (untuned instruct model, "
                                "few-shot).", flag="sim-style", aliases=("sim-mode",), choices=SIM_STYLES)
    sim_template: str | None = option(None, prompts.SIM_TEMPLATE_HELP)
    max_new_tokens: int | None = option(None, "Simulator tokens per query (default 40 x --topk).", ge=1)
    # Larger calls amortise a CPU's fixed cost per decode step, above all in the verification retries
    # of a call's failing rows (README, "The simulator": the cost by queries a call).
    batch_size: int = option(64, "Queries per simulator call (each asked in both modes and beside a leak "
                             "probe: three generations a query).", ge=1)
    seed: int = option(0, "Random seed.", ge=0)


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
            raise BadInput(
                f"trajectories '{cfg.trajectories}' hold no search queries; collect with a real engine first"
            )
    elif cfg.questions:
        rows = []
        for name in [s.strip() for s in cfg.questions.split(",") if s.strip()]:
            split = "eval" if name in data.BENCHMARKS else None  # never the questions training used
            for q in data.load_questions(name, split=split).to_pylist():
                rows.append({"id": f"{q['data_source']}:{q['id']}", "query": q["question"], "question": q["question"],
                             "golden_answers": list(q["golden_answers"])})
    else:
        raise BadInput("check-sim needs --questions (benchmark name or file) or --trajectories DIR")
    return rows


def trained_questions(search: str) -> tuple[set[str] | None, str]:
    """The questions the simulator of `sim:DIR` was fitted on (normalised) and where they came from;
    (None, why they are unknown) otherwise."""
    if not search.startswith("sim:"):
        return None, "unknown: not a sim:DIR simulator"
    model_dir = Path(search[len("sim:"):].partition("?")[0])
    if not (model_dir / artifacts.MANIFEST).is_file():
        return None, f"unknown: {model_dir} has no zsctl manifest"
    for ref in artifacts.read_manifest(model_dir).get("inputs") or []:
        found = artifacts.find_input(ref, model_dir)
        train = found / "train.parquet" if found else None
        if train and train.is_file():
            questions = pq.read_table(train, columns=["question"]).column("question").to_pylist()
            return {_norm(q) for q in questions}, str(train)
    return None, f"unknown: the training data named in {model_dir / artifacts.MANIFEST} is not there"


def _norm(question: str) -> str:
    return " ".join(question.split()).lower()


def select_queries(cfg: CheckSimConfig, rows: list[dict]) -> tuple[list[dict], dict]:
    """The held-apart queries with judgeable golds, up to --limit spread over the sources, and the
    counts of what was dropped."""
    trained, source = trained_questions(cfg.search)
    held = {"trained_on": source, "candidates": len(rows), "excluded_trained": 0, "excluded_yes_no": 0}
    kept = []
    for r in rows:
        if trained is not None and _norm(r["question"]) in trained:
            held["excluded_trained"] += 1
        elif metrics.yes_no(r["golden_answers"]) or not any(g.strip() for g in r["golden_answers"]):
            held["excluded_yes_no"] += 1
        else:
            kept.append(r)
    if not kept:
        raise BadInput(f"none of the {len(rows)} queries is held apart and answerable ({held['excluded_trained']} "
                       f"trained on per {source}, {held['excluded_yes_no']} with yes/no golds); "
                       "pass --questions BENCH (its evaluation split) or questions the simulator never saw")
    return (_spread(kept, cfg.limit) if cfg.limit else kept), held


def _spread(rows: list[dict], limit: int) -> list[dict]:
    """Up to `limit` rows taken round-robin over their sources (benchmark, or one trajectories file)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["id"].split(":")[0], []).append(r)
    out, i = [], 0
    while len(out) < limit and any(i < len(g) for g in groups.values()):
        out += [g[i] for g in groups.values() if i < len(g)][: limit - len(out)]
        i += 1
    return out


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ((0, 1) when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def gap_interval(h1: int, n1: int, h2: int, n2: int) -> tuple[float, float]:
    """95 % interval of p1 − p2, Newcombe's hybrid score method (the two Wilson intervals combined)."""
    p1, p2 = h1 / max(1, n1), h2 / max(1, n2)
    (l1, u1), (l2, u2) = wilson(h1, n1), wilson(h2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


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
        "has_answer_ci95": list(wilson(sum(r["has_answer"] for r in rows), n)),
        "mean_tries": mean([r["tries"] for r in rows]),
        "format_valid": mean([float(r["well_formed"]) for r in rows]),
        "mean_doc_words": mean([len(d["text"].split()) for d in docs]),
        "empty_docs": 1.0 - len(docs) / max(1, sum(len(r["documents"]) for r in rows)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }


def run(cfg: CheckSimConfig, progress: Progress | None = None, *, engine=None, vs_engine=None) -> dict:
    """`engine`/`vs_engine`: already-built engines (tests, or sharing a loaded model) instead of specs."""
    progress = progress or Progress()
    out = artifacts.check_out(cfg.out, "check_sim", [cfg.search, cfg.trajectories, cfg.questions, cfg.vs])
    queries, held = select_queries(cfg, load_queries(cfg))
    if engine is None:
        if not is_simulated(cfg.search):
            raise BadInput(f"--search '{cfg.search}' is not a simulated engine; pass sim:MODEL or sim+http://HOST:PORT/v1")
        engine = make_engine(cfg.search, sim_mode=cfg.sim_mode, template=cfg.sim_template, seed=cfg.seed,
                             max_new_tokens=cfg.max_new_tokens)
    if vs_engine is None and cfg.vs:
        vs_engine = make_engine(cfg.vs)
    if "torch" in sys.modules:  # an in-process simulator samples (retries, temperature) from torch's generator
        sys.modules["torch"].manual_seed(cfg.seed)

    rows: list[dict] = []
    t0 = time.perf_counter()
    progress.start("check-sim", len(queries))
    for start in range(0, len(queries), cfg.batch_size):
        batch = queries[start:start + cfg.batch_size]
        texts = [q["query"] for q in batch]
        # both modes and the leak probe of the batch in one simulator call: one generate (or request
        # round) per batch
        probes = [
            {**q, "query": prompts.LEAK_PROBES[(start + i) % len(prompts.LEAK_PROBES)]} for i, q in enumerate(batch)
        ]
        asks = [(q, mode, "simulator") for mode in prompts.SIM_MODES for q in batch] + [
            (q, "useful", "probe") for q in probes
        ]
        ctxs = [QueryContext(q["question"], q["golden_answers"], mode) for q, mode, _ in asks]
        results = engine.search([q["query"] for q, _, _ in asks], cfg.k, ctxs)
        for (q, mode, role), r in zip(asks, results):
            rows.append(_row(q, role, engine.spec, mode, r.docs, r.text or "", r.well_formed, cfg.k, r.tries or 1))
        if vs_engine is not None:
            for q, r in zip(batch, vs_engine.search(texts, cfg.k)):
                rows.append(_row(q, "real", vs_engine.spec or cfg.vs, "real", r.docs, "", None, cfg.k, 1))
        progress.advance(len(batch))
    progress.stop()
    wall = time.perf_counter() - t0

    sim_rows = [r for r in rows if r["role"] == "simulator"]
    by_mode = {m: summarize([r for r in sim_rows if r["mode"] == m]) for m in prompts.SIM_MODES}
    u, nz = by_mode["useful"], by_mode["noisy"]
    probe = summarize([r for r in rows if r["role"] == "probe"])
    result = {
        "n_queries": len(queries),
        "k": cfg.k,
        "held_apart": held,
        "simulator": {
            "spec": engine.spec,
            "sim_mode": getattr(engine, "sim_mode", None),
            "verify": getattr(engine, "verify", 0),
            **by_mode,
            "controllability_gap": u["has_answer"] - nz["has_answer"],
            "gap_ci95": list(
                gap_interval(round(u["has_answer"] * u["n"]), u["n"], round(nz["has_answer"] * nz["n"]), nz["n"])
            ),
            "format_valid": summarize(sim_rows)["format_valid"],
            "leak": {
                "n": probe["n"],
                "has_answer": probe["has_answer"],
                "has_answer_ci95": probe["has_answer_ci95"],
                "probes": list(prompts.LEAK_PROBES),
            },
            "generation_s": round(getattr(engine, "generation_s", 0.0), 2),
            "generation_cpu_s": round(getattr(engine, "generation_cpu_s", 0.0), 2),
        },
    }
    if vs_engine is not None:
        result["real"] = {"spec": vs_engine.spec or cfg.vs, **summarize([r for r in rows if r["role"] == "real"])}
    summary = {"out": str(out), "rows": len(rows), "wall_s": round(wall, 2), "search": engine.stats.as_dict(), **result}
    inputs = [artifacts.input_ref(cfg.trajectories)] if cfg.trajectories else [{"questions": cfg.questions}]
    with artifacts.staging(out) as tmp:  # the old artifact in --out stays valid until this one is whole
        artifacts.write_table(tmp, "check_sim.parquet", pa.Table.from_pylist(rows, schema=CHECK_SIM))
        artifacts.write_json(tmp, "metrics.json", result)
        artifacts.write_manifest(tmp, "check_sim", config=asdict(cfg), inputs=inputs, summary=summary, seed=cfg.seed)
    engine.close()
    if vs_engine is not None:
        vs_engine.close()
    return summary


def _row(q: dict, role: str, spec: str, mode: str, docs, raw: str, well_formed: bool | None, k: int,
         tries: int) -> dict:
    documents = [d.as_dict() for d in docs]
    return {
        "id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"], "query": q["query"],
        "role": role, "engine": redact(spec), "mode": mode, "documents": documents,
        "text": prompts.format_documents(docs), "raw": raw,
        "well_formed": bool(well_formed) if well_formed is not None else len(docs) == k,
        "has_answer": metrics.docs_hold_answer(documents, q["golden_answers"]),
        "tries": int(tries),
    }


def _content(docs: list[dict]) -> str:
    """Titles and texts only: the 'Doc i:' labels would count as shared n-grams."""
    return " ".join(f"{d['title']} {d['text']}" for d in docs)
