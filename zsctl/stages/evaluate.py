"""`zsctl eval`: answer benchmark questions with a policy and a (real) search engine, and score them.

setup (questions, model, engine) → batched agent rollouts → score every row → write
predictions.parquet, metrics.json, manifest.json (last). Scores are fractions in [0, 1]; every
question is scored, partial last batch included, and n is reported.

Search quality beside the scores (metrics.search_records / search_quality): every search call in
predictions.parquet carries `degenerate` (its query names nothing), `has_answer` (its documents
hold a gold answer) and `repeated` (the question already searched it); metrics.json gives per
benchmark and overall the search count, the degenerate and repeated shares, the search-hit rate
(over `hit_searches_n` searches: questions whose golds are not all yes/no) and the most common
queries. `em_open` is the EM over the `open_n` questions whose answer is neither yes/no nor named
in the question (metrics.open_em); `read_em` the EM over the `found_open_n` open questions one of
whose searches found a gold answer, and `query_answer_share` the share of open answers that are
one of the policy's own queries (metrics.reading: does it read what it found?).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import pyarrow as pa

from zsctl.agent import AgentConfig, AgentLoop
from zsctl.core import artifacts, data, metrics, prompts
from zsctl.core.config import DEFAULT_MODEL, Options, option
from zsctl.core.errors import BadInput
from zsctl.core.models import load_model
from zsctl.core.progress import Progress
from zsctl.core.schemas import PREDICTIONS
from zsctl.search import make_engine
from zsctl.search.base import QueryContext


@dataclass(kw_only=True)
class EvalConfig(Options):
    bench: str = option(help="NAME[,NAME...]: nq triviaqa popqa hotpotqa 2wikimultihopqa musique bamboogle, or "
                        "a FlashRAG jsonl / ZeroSearch parquet path.")
    model: str = option(DEFAULT_MODEL, "Policy: HF model dir, hub id, or smollm2-135m.", flag="policy",
                        aliases=("model",))
    search: str = option(help="bm25:PATH | http://HOST:PORT/retrieve | serpapi | sim:MODEL | "
                         "sim+http://HOST:PORT/v1 | none")
    out: str = option(help="Output artifact directory.")
    split: str = option("eval", "For bundled benchmarks: eval | train | all.", choices=("eval", "train", "all"))
    limit: int | None = option(None, "At most N questions per benchmark.", ge=1)
    # a CPU decodes 32 rows in little more time than 8 (40 questions: 48 s at 32 against 68 s at 8)
    batch_size: int = option(32, "Questions answered together (rows of one batch decode side by side).", ge=1)
    max_turns: int = option(4, "Searches allowed per question.", ge=0)
    max_new_tokens: int = option(128, "Tokens per generation round.", ge=1)
    topk: int = option(3, "Documents per search.", ge=1)
    max_doc_words: int | None = option(None, "Each document is cut to this many words before the policy reads it "
                                       "(default: the length the policy was trained on, as warmup or rl recorded "
                                       "it; else the prompt style's: zsctl 80, upstream styles whole documents).",
                                       ge=1)
    temperature: float = option(0.0, "Sampling temperature; 0 = greedy.", ge=0)
    seed: int = option(0, "Random seed.", ge=0)
    search_cache: str | None = option(None, "SQLite file caching real search results.")
    prompt_style: str = option("zsctl", "zsctl | search-r1 | zerosearch: the instruction, document lines and notes a "
                               "policy was trained with (evaluate a released Search-R1 / ZeroSearch policy with its "
                               "own).", choices=prompts.PROMPT_STYLES)
    prompt_from_data: bool = option(False, "Give the policy each question's own 'prompt' column (a ZeroSearch/"
                                    "Search-R1 parquet) verbatim; documents and notes still follow --prompt-style.")
    sim_template: str | None = option(None, prompts.SIM_TEMPLATE_HELP)


def load_benchmarks(spec: str, split: str, limit: int | None) -> tuple[list[pa.Table], list[dict]]:
    """Questions of every benchmark in `spec`, and how each was chosen (for the manifest)."""
    tables, chosen = [], []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise BadInput(f"benchmark list '{spec}' names no benchmark; pass e.g. nq,triviaqa or a question file path")
    for name in names:
        bundled = name in data.BENCHMARKS
        part = (None if split == "all" else split) if bundled else None
        t = data.load_questions(name, split=part, limit=limit)
        tables.append(t)
        chosen.append({"bench": name, "bundled": bundled, "split": part or "all", "rows": t.num_rows})
    return tables, chosen


def summarize(rows: list[dict]) -> dict:
    """metrics.json content: per benchmark and overall (micro average over all questions)."""
    def agg(rs):
        n = len(rs)
        mean = lambda k: sum(r[k] for r in rs) / n if n else 0.0  # noqa: E731
        searches = [s for r in rs for s in r.get("searches") or []]
        return {
            "n": n,
            "em": mean("em"),
            "subem": mean("subem"),
            "f1": mean("f1"),
            "avg_searches": mean("num_searches"),
            # protocol use: an answer in tags, or at least a search or an answer (a small model off
            # the protocol scores 0 for that reason, not for lack of knowledge)
            "answer_rate": mean("answered"),
            "valid_rate": sum(r["answered"] or r["num_searches"] > 0 for r in rs) / n if n else 0.0,
            # what it searched for: a policy that searches "query" is not searching, whatever its EM
            **metrics.search_quality(searches),
            **metrics.question_hits(rs),
            # EM a policy cannot get by echoing the question (comparisons) or guessing yes/no
            **metrics.open_em(rs),
            # and whether it answers what its searches found (a policy may search well and not read)
            **metrics.reading(rs),
            "top_queries": metrics.top_queries(s["query"] for s in searches),
        }

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["data_source"], []).append(r)
    return {"benchmarks": {k: agg(v) for k, v in by.items()}, "overall": agg(rows)}


def run(cfg: EvalConfig, progress: Progress | None = None) -> dict:
    import torch

    progress = progress or Progress()
    torch.manual_seed(cfg.seed)
    cfg = replace(cfg, max_doc_words=artifacts.doc_words_for(cfg.model, cfg.prompt_style, cfg.max_doc_words))
    style = prompts.style_of(cfg.prompt_style)
    out = artifacts.check_out(cfg.out, "predictions", [cfg.bench, cfg.model, cfg.search, cfg.search_cache])
    tables, chosen = load_benchmarks(cfg.bench, cfg.split, cfg.limit)
    questions = [r for t in tables for r in t.to_pylist()]  # schemas differ when only some files carry prompts
    # the file's own prompts, checked before anything loads: a file without them is bad input
    chats = prompts.chats_from_data(questions, cfg.bench) if cfg.prompt_from_data else [None] * len(questions)
    engine = make_engine(cfg.search, cache=cfg.search_cache, sim_template=cfg.sim_template)
    model, tok = load_model(cfg.model)
    loop = AgentLoop(
        model,
        tok,
        engine,
        AgentConfig(
            max_turns=cfg.max_turns,
            max_new_tokens=cfg.max_new_tokens,
            topk=cfg.topk,
            max_doc_words=cfg.max_doc_words,
            temperature=cfg.temperature,
            prompt_style=style.name,
        ),
    )

    rows: list[dict] = []
    t0 = time.perf_counter()
    progress.start("eval", len(questions))
    for start in range(0, len(questions), cfg.batch_size):
        batch = questions[start : start + cfg.batch_size]
        texts = loop.render_prompts([q["question"] for q in batch], chats=chats[start : start + cfg.batch_size])
        trajs = loop.run(
            loop.encode_texts(texts),
            [QueryContext(q["question"], q["golden_answers"]) for q in batch],
        )
        for q, t, text in zip(batch, trajs, texts):
            pred = t.prediction or ""
            rows.append(
                {
                    "id": q["id"],
                    "data_source": q["data_source"],
                    "question": q["question"],
                    "golden_answers": q["golden_answers"],
                    "prediction": pred,
                    **metrics.score(pred, q["golden_answers"]),
                    "num_searches": t.num_searches,
                    "response": t.response,
                    "searches": metrics.search_records(t.searches, q["golden_answers"], q["question"]),
                    "prompt": text,
                    "answered": t.prediction is not None,  # not a column: only for the rates in metrics.json
                }
            )
        progress.advance(len(batch))
    progress.stop()
    wall = time.perf_counter() - t0

    result = summarize(rows)
    summary = {
        "out": str(out),
        "rows": len(rows),
        "wall_s": round(wall, 2),
        "generated_tokens": loop.generated_tokens,
        "search": engine.stats.as_dict(),
        "prompt_style": {**style.as_dict(), "prompt_from_data": cfg.prompt_from_data},
        **result,
    }
    with artifacts.staging(out) as tmp:  # the old artifact in --out stays valid until this one is whole
        artifacts.write_table(tmp, "predictions.parquet", pa.Table.from_pylist(rows, schema=PREDICTIONS))
        artifacts.write_json(tmp, "metrics.json", result)
        artifacts.write_manifest(
            tmp,
            "predictions",
            config=asdict(cfg),
            inputs=[{"bench": c["bench"], "split": c["split"], "rows": c["rows"]} for c in chosen],
            summary=summary,
            seed=cfg.seed,
            extra={"questions": chosen},
        )
    engine.close()
    return summary
