"""`zsctl collect`: log a policy's trajectories against a REAL search engine (the data behind build-sft).

Each question is answered `--samples` times (temperature 1.0 by default when K > 1, so both right
and wrong outcomes appear); every search call is logged with its query and rank-ordered documents,
and every trajectory with its prediction, EM and F1. Bundled benchmark names read their training
split only, so collected data never contains evaluation questions. Each logged call also carries
its search-quality facts (metrics.search_records: `degenerate`, `has_answer`, `repeated`), and the
summary their rates (degenerate and repeated shares, search-hit rate) and the most common queries.

Resumable: after each batch the batch's trajectories go to one shard (OUT/trajectories.shards/
part-NNNNN.parquet, written atomically). All K samples of a question are in the same shard, so a
question is finished exactly when it appears in a shard; `--resume` skips those. At the end the
shards are merged into trajectories.parquet and manifest.json is written last.

Search-cost ledger (manifest summary, printed): calls the engine's backend really answered, cache
hits, and for serpapi an estimated cost at `--price-per-1k` USD per 1,000 calls (an assumption to
set to your plan's price; 15.0 by default). Counts add up over resumed runs (shards/ledger.json).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from zsctl.agent import AgentConfig, AgentLoop, QuestionAsQuery
from zsctl.core import artifacts, metrics, prompts
from zsctl.core.config import DEFAULT_MODEL, Options, option
from zsctl.core.errors import BadInput, RunFailure, redact
from zsctl.core.models import load_model
from zsctl.core.progress import Progress
from zsctl.core.schemas import TRAJECTORIES
from zsctl.search import is_simulated, make_engine
from zsctl.search.base import QueryContext
from zsctl.stages.evaluate import load_benchmarks

SHARDS = "trajectories.shards"
DATA = "trajectories.parquet"
LEDGER = "ledger.json"
_LEDGER_KEYS = ("engine_calls", "cache_hits", "retries", "errors")


@dataclass(kw_only=True)
class CollectConfig(Options):
    questions: str = option(help="NAME[,NAME...] (bundled benchmarks, training split only) or a FlashRAG jsonl / "
                            "parquet path.")
    model: str = option(DEFAULT_MODEL, "Policy: HF model dir, hub id, smollm2-135m, or none (search each question "
                        "once, the question as query).", flag="policy", aliases=("model",))
    search: str = option(help="A real engine: bm25:PATH | http://HOST:PORT/retrieve | serpapi")
    out: str = option(help="Output artifact directory.")
    limit: int | None = option(None, "At most N questions per benchmark.", ge=1)
    samples: int = option(1, "Trajectories per question.", ge=1)
    temperature: float | None = option(None, "Sampling temperature (default 1.0 when --samples > 1, else greedy).",
                                       ge=0)
    max_turns: int = option(4, "Searches allowed per trajectory.", ge=0)
    max_new_tokens: int = option(128, "Tokens per generation round.", ge=1)
    topk: int = option(3, "Documents per search.", ge=1)
    max_doc_words: int | None = option(None, "Each document is cut to this many words before the policy reads it "
                                       "(default: the length the policy was trained on, as warmup or rl recorded "
                                       "it; else the prompt style's: zsctl 80, upstream styles whole documents).",
                                       ge=1)
    batch_size: int = option(8, "Trajectories per batch (whole questions; a shard is written after each).", ge=1)
    resume: bool = option(False, "Keep the shards of an earlier run in --out and skip its finished questions.")
    price_per_1k: float = option(15.0, "Assumed USD per 1,000 serpapi calls, for the cost ledger.", ge=0)
    search_cache: str | None = option(None, "SQLite file caching real search results.")
    seed: int = option(0, "Random seed.", ge=0)
    prompt_style: str = option("zsctl", "zsctl | search-r1 | zerosearch: the instruction, document lines and notes "
                               "the policy is prompted with.", choices=prompts.PROMPT_STYLES)
    prompt_from_data: bool = option(False, "Give the policy each question's own 'prompt' column (a ZeroSearch/"
                                    "Search-R1 parquet) verbatim.")

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = self.search.strip()
        if spec == "none" or is_simulated(spec):
            raise BadInput(f"--search '{self.search}' is not a real engine; collect logs real results: "
                           "use bm25:PATH, http://HOST:PORT/retrieve or serpapi")

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 1.0 if self.samples > 1 else 0.0


def key_of(q: dict) -> tuple[str, str]:
    return q["data_source"], q["id"]


def previous_state(out: Path, cfg: CollectConfig) -> tuple[set, dict]:
    """What an earlier run left in `out` (for --resume): finished question keys and the ledger.

    Shards are authoritative; a finished artifact (trajectories.parquet, no shards) counts too, so
    --resume can also extend a complete collection with more questions.
    """
    shard_dir, data = out / SHARDS, out / DATA
    files = sorted(shard_dir.glob("part-*.parquet")) if shard_dir.is_dir() else []
    ledger = {}
    if files:
        if (shard_dir / LEDGER).is_file():
            ledger = _read_ledger(shard_dir / LEDGER)
    elif data.is_file():
        files = [data]
        try:
            ledger = json.loads((out / artifacts.MANIFEST).read_text(encoding="utf-8"))["summary"]["ledger"]
        except (OSError, ValueError, KeyError):
            ledger = {}
    counts: dict[tuple, int] = {}
    for f in files:
        t = artifacts.read_table_file(f, TRAJECTORIES, columns=["data_source", "question_id", "model", "engine"])
        models, engines = set(t.column("model").to_pylist()), set(t.column("engine").to_pylist())
        if models - {cfg.model} or engines - {redact(cfg.search)}:
            raise BadInput(f"--resume: '{f}' was collected with model {sorted(models)} and engine {sorted(engines)}; "
                           f"pass the same --policy/--search, or drop --resume to start over")
        for ds, qid in zip(t.column("data_source").to_pylist(), t.column("question_id").to_pylist()):
            counts[(ds, qid)] = counts.get((ds, qid), 0) + 1
    odd = [k for k, n in counts.items() if n != cfg.samples]
    if odd:
        raise BadInput(f"--resume: question {odd[0][0]}:{odd[0][1]} has {counts[odd[0]]} trajectories in '{out}', "
                       f"not --samples {cfg.samples}; pass the --samples of the run being resumed")
    return set(counts), {k: int(ledger.get(k, 0)) for k in _LEDGER_KEYS}


def _read_ledger(path: Path) -> dict:
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        ledger = e
    if not isinstance(ledger, dict) or not all(isinstance(ledger.get(k, 0), (int, float)) for k in _LEDGER_KEYS):
        raise BadInput(f"--resume: the cost ledger '{path}' is damaged; delete it (its counts restart at zero) "
                       "and rerun, or drop --resume")
    return ledger


def run(cfg: CollectConfig, progress: Progress | None = None, policy=None) -> dict:
    """`policy`: an already loaded (model, tokenizer) to use instead of loading `cfg.model`."""
    progress = progress or Progress()
    cfg = replace(cfg, max_doc_words=artifacts.doc_words_for(cfg.model, cfg.prompt_style, cfg.max_doc_words))
    tables, chosen = load_benchmarks(cfg.questions, "train", cfg.limit)
    questions = [r for t in tables for r in t.to_pylist()]  # schemas differ when only some files carry prompts
    if not questions:
        raise BadInput(f"--questions '{cfg.questions}' gave no questions; check the names, the files or --limit")
    if cfg.prompt_from_data:
        prompts.chats_from_data(questions, cfg.questions)  # every question has its prompt, or bad input now
    out = artifacts.check_out(cfg.out, "trajectories", [cfg.questions, cfg.model, cfg.search, cfg.search_cache])
    done, ledger0 = previous_state(out, cfg) if cfg.resume else (set(), dict.fromkeys(_LEDGER_KEYS, 0))
    todo = []
    for q in questions:  # a question named twice (e.g. the same bench listed twice) is done once
        if key_of(q) not in done:
            done.add(key_of(q))
            todo.append(q)
    done -= {key_of(q) for q in todo}

    engine = make_engine(cfg.search, cache=cfg.search_cache)
    try:
        if cfg.model == "none":  # no policy: each question searched once as its own query
            policy = None
        else:
            policy = policy or load_model(cfg.model)
        return _collect(cfg, progress, engine, policy, todo, done, ledger0, chosen)
    finally:
        engine.close()


def _collect(cfg, progress, engine, policy, todo, done, ledger0, chosen) -> dict:
    import torch

    out = Path(cfg.out)
    temperature = cfg.sampling_temperature
    if cfg.samples > 1 and temperature == 0:
        progress.log("collect: --samples > 1 with --temperature 0 repeats the same greedy trajectory")
    agent_cfg = AgentConfig(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, topk=cfg.topk,
                            max_doc_words=cfg.max_doc_words, temperature=temperature, prompt_style=cfg.prompt_style)
    loop = QuestionAsQuery(engine, agent_cfg) if policy is None else AgentLoop(*policy, engine, agent_cfg)

    # Setup done: only now does --out change.
    # In place: the shards let a killed run resume; an older collection in --out stays valid until
    # the merge at the end.
    out = artifacts.prepare_out(out, "trajectories")
    shard_dir = out / SHARDS
    if not cfg.resume:
        shutil.rmtree(shard_dir, ignore_errors=True)
    elif not shard_dir.is_dir() and (out / DATA).is_file():
        shard_dir.mkdir()
        _link_or_copy(out / DATA, shard_dir / "part-00000.parquet")  # the finished run becomes shard 0
    writer = artifacts.ShardWriter(out, "trajectories", TRAJECTORIES)
    artifacts.write_json(shard_dir, LEDGER, ledger0)

    per_batch = max(1, cfg.batch_size // cfg.samples)
    t0 = time.perf_counter()
    new = 0
    progress.log(f"collect: {len(todo)} questions to do ({len(done)} done before), {cfg.samples} sample(s) each, "
                 f"temperature {temperature}")
    progress.start("collect", len(todo))
    for start in range(0, len(todo), per_batch):
        batch = todo[start : start + per_batch]
        # Seeded by the batch's first question, so a resumed run draws what an unbroken one would.
        torch.manual_seed(zlib.crc32(f"{cfg.seed}\x1f{batch[0]['data_source']}\x1f{batch[0]['id']}".encode()))
        chats = prompts.chats_from_data(batch, cfg.questions) if cfg.prompt_from_data else None
        prompt_ids = loop.encode_prompts([q["question"] for q in batch], chats=chats)
        expanded = [(q, s, p) for q, p in zip(batch, prompt_ids) for s in range(cfg.samples)]
        try:
            trajs = loop.run(
                [p for _, _, p in expanded], [QueryContext(q["question"], q["golden_answers"]) for q, _, _ in expanded]
            )
        except RunFailure as e:
            raise RunFailure(f"{e} ({len(done) + start} questions are saved in '{out}'; rerun with --resume)") from e
        writer.write([trajectory_row(cfg, q, s, t) for (q, s, _), t in zip(expanded, trajs)])
        artifacts.write_json(shard_dir, LEDGER, _ledger(ledger0, engine))
        new += len(trajs)
        progress.advance(len(batch))
    progress.stop()
    wall = time.perf_counter() - t0

    artifacts.mark_incomplete(out, "trajectories")  # the data file is replaced next
    rows, stats = merge_shards(writer.dir, out / DATA)
    shutil.rmtree(shard_dir, ignore_errors=True)
    ledger = {"engine": redact(cfg.search), **_ledger(ledger0, engine), "logged_searches": stats["searches"]}
    ledger.update(_cost(cfg, ledger["engine_calls"]))
    summary = {
        "out": str(out),
        "questions": stats["questions"],
        "trajectories": rows,
        "new_trajectories": new,
        "samples": cfg.samples,
        "temperature": temperature,
        "share_correct": stats["correct"] / rows if rows else 0.0,
        "mean_f1": stats["f1"] / rows if rows else 0.0,
        "searches_per_trajectory": stats["searches"] / rows if rows else 0.0,
        "share_with_search": stats["with_search"] / rows if rows else 0.0,
        **stats["quality"],
        "top_queries": stats["top_queries"],
        "wall_s": round(wall, 2),
        "trajectories_per_s": round(new / wall, 3) if wall > 0 else 0.0,
        "generated_tokens": loop.generated_tokens,
        "prompt_style": {**loop.style.as_dict(), "prompt_from_data": cfg.prompt_from_data},
        "ledger": ledger,
    }
    artifacts.write_manifest(out, "trajectories", config=asdict(cfg), summary=summary, seed=cfg.seed,
                             inputs=[{"bench": c["bench"], "split": c["split"], "rows": c["rows"]} for c in chosen],
                             extra={"questions": chosen})
    cost = f", est. ${ledger['estimated_cost_usd']:.2f}" if "estimated_cost_usd" in ledger else ""
    progress.log(
        f"collect: search ledger: {ledger['engine_calls']} engine calls, {ledger['cache_hits']} cache hits{cost}"
    )
    return summary


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dest)


def trajectory_row(cfg: CollectConfig, q: dict, sample: int, t) -> dict:
    pred = t.prediction or ""
    scores = metrics.score(pred, q["golden_answers"])
    return {
        "traj_id": f"{q['id']}#{sample}",
        "question_id": q["id"],
        "data_source": q["data_source"],
        "question": q["question"],
        "golden_answers": list(q["golden_answers"]),
        "model": cfg.model,
        "engine": redact(cfg.search),  # a spec's credentials never reach a row
        "searches": metrics.search_records(t.searches, q["golden_answers"], q["question"]),
        "response": t.response,
        "prediction": pred,
        "em": scores["em"],
        "f1": scores["f1"],
        "num_searches": t.num_searches,
    }


def merge_shards(shard_dir: Path, dest: Path) -> tuple[int, dict]:
    """Stream every shard into one Parquet file (atomic rename); returns rows and outcome counts."""
    tmp = dest.with_name(f".{dest.name}.tmp-merge")
    rows = 0
    stats = {"correct": 0.0, "f1": 0.0, "searches": 0, "with_search": 0}
    questions = set()
    facts, queries = [], []  # one small dict / string per search call (documents are not kept)
    with pq.ParquetWriter(tmp, TRAJECTORIES) as w:
        for f in sorted(shard_dir.glob("part-*.parquet")):
            t = pq.read_table(f, schema=TRAJECTORIES)
            w.write_table(t)
            rows += t.num_rows
            stats["correct"] += sum(t.column("em").to_pylist())
            stats["f1"] += sum(t.column("f1").to_pylist())
            n = t.column("num_searches").to_pylist()
            stats["searches"] += sum(n)
            stats["with_search"] += sum(1 for x in n if x)
            questions.update(zip(t.column("data_source").to_pylist(), t.column("question_id").to_pylist()))
            calls = pc.list_flatten(t.column("searches"))
            queries += pc.struct_field(calls, "query").to_pylist()
            facts += pa.Table.from_arrays([pc.struct_field(calls, k) for k in metrics.FACT_KEYS],
                                          names=list(metrics.FACT_KEYS)).to_pylist()
    tmp.replace(dest)
    stats["questions"] = len(questions)
    stats["quality"] = metrics.search_quality(facts)
    stats["top_queries"] = metrics.top_queries(queries)
    return rows, stats


def _ledger(before: dict, engine) -> dict:
    s = engine.stats
    now = {"engine_calls": s.calls, "cache_hits": s.cache_hits, "retries": s.retries, "errors": s.errors}
    return {k: before.get(k, 0) + now[k] for k in _LEDGER_KEYS}


def _cost(cfg: CollectConfig, calls: int) -> dict:
    if not cfg.search.strip().startswith("serpapi"):
        return {}
    return {"price_per_1k_usd": cfg.price_per_1k, "estimated_cost_usd": round(calls * cfg.price_per_1k / 1000, 4)}
