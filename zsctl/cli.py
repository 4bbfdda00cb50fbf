"""The `zsctl` command line: one thin command per stage (build config → stage.run(cfg) → summary).

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (one line, no traceback unless
--debug). With --json the last stdout line is one JSON object summarising the run.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Optional

import typer

from zsctl.core.errors import BadInput, RunFailure

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train LLM search agents with a simulated search engine (ZeroSearch).")
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads for torch, in any position (default $ZSCTL_THREADS, else "
        "$OMP_NUM_THREADS, else one per core); idle threads sleep, so a shared machine stays fast."),
):
    _state["debug"] = debug
    from zsctl.core.models import set_threads

    try:
        set_threads(threads)
    except BadInput as e:
        _fail(e, 2)


def stage(fn):
    """Map our exceptions to exit codes and one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BadInput as e:
            _fail(e, 2)
        except RunFailure as e:
            _fail(e, 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as e:  # noqa: BLE001 - last resort: one line, exit 1
            _fail(f"{type(e).__name__}: {e}", 1)

    return wrapper


def _fail(e, code: int):
    if _state["debug"] and isinstance(e, BaseException):
        import traceback

        traceback.print_exc()
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def _progress(quiet: bool):
    from zsctl.console import make_progress

    return make_progress(quiet)


def _execute(run_fn, cfg, quiet: bool) -> dict | None:
    """Run a stage, or with --dry-run only print its resolved config (None is returned then)."""
    if _state.get("dry_run"):
        from dataclasses import asdict

        stage_name = run_fn.__module__.rsplit(".", 1)[-1]
        print(json.dumps({"dry_run": True, "stage": stage_name, "config": asdict(cfg)}, default=str))
        return None
    return run_fn(cfg, _progress(quiet or not _main_process()))


def _main_process() -> bool:
    """Under accelerate/torchrun (RANK set) only rank 0 prints progress and summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def _emit(summary: dict, as_json: bool, table=None) -> None:
    from zsctl.console import out

    if not _main_process():
        return
    if table is not None:
        out.print(table)
    if as_json:
        print(json.dumps(summary, default=str), flush=True)


# Options shared by most commands.
OUT = typer.Option(..., "--out", help="Output artifact directory.")
SEED = typer.Option(0, "--seed", help="Random seed.")
JSON = typer.Option(False, "--json", help="Print a JSON summary as the last stdout line.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress output.")


@app.command("index")
@stage
def index_cmd(
    corpus: str = typer.Argument(..., help="Corpus .jsonl (id,title,text or id,contents) or .parquet."),
    out: str = OUT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Build a BM25 index (bm25s) of a passage corpus."""
    from zsctl.stages import index

    summary = _execute(index.run, index.IndexConfig(corpus=corpus, out=out), quiet)
    if summary is not None:
        _emit(summary, as_json)


@app.command("eval")
@stage
def eval_cmd(
    bench: str = typer.Option(..., "--bench", help="NAME[,NAME...]: nq triviaqa popqa hotpotqa 2wikimultihopqa musique bamboogle, or a file path."),
    model: str = typer.Option("smollm2-135m", "--model", help="HF model dir, hub id, or smollm2-135m."),
    search: str = typer.Option(..., "--search", help="bm25:PATH | http://HOST:PORT/retrieve | serpapi | sim:MODEL | sim+http://HOST:PORT/v1 | none"),
    out: str = OUT,
    split: str = typer.Option("eval", "--split", help="For bundled benchmarks: eval | train | all."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N questions per benchmark."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_turns: int = typer.Option(4, "--max-turns", help="Searches allowed per question."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens per generation round."),
    topk: int = typer.Option(3, "--topk", help="Documents per search."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    search_cache: Optional[str] = typer.Option(None, "--search-cache", help="SQLite file caching real search results."),
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Score a policy on benchmarks with a search engine: predictions.parquet + metrics.json."""
    from zsctl.console import metrics_table
    from zsctl.stages import evaluate

    if split not in ("eval", "train", "all"):
        raise BadInput(f"--split '{split}' is not one of eval, train, all")
    cfg = evaluate.EvalConfig(
        bench=bench, model=model, search=search, out=out, split=split, limit=limit, batch_size=batch_size,
        max_turns=max_turns, max_new_tokens=max_new_tokens, topk=topk, temperature=temperature,
        seed=seed, search_cache=search_cache,
    )
    summary = _execute(evaluate.run, cfg, quiet)
    if summary is not None:
        _emit(summary, as_json, metrics_table(summary, title=f"{model} + {search}"))


@app.command("collect")
@stage
def collect_cmd(
    questions: str = typer.Option(..., "--questions", help="NAME[,NAME...] (bundled benchmarks, training split only) or a FlashRAG jsonl / parquet path."),
    model: str = typer.Option("smollm2-135m", "--model", help="Policy: HF model dir, hub id, smollm2-135m, or none (search each question once, the question as query)."),
    search: str = typer.Option(..., "--search", help="A real engine: bm25:PATH | http://HOST:PORT/retrieve | serpapi"),
    out: str = OUT,
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N questions per benchmark."),
    samples: int = typer.Option(1, "--samples", help="Trajectories per question."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 1.0 when --samples > 1, else greedy)."),
    max_turns: int = typer.Option(4, "--max-turns", help="Searches allowed per trajectory."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens per generation round."),
    topk: int = typer.Option(3, "--topk", help="Documents per search."),
    batch_size: int = typer.Option(8, "--batch-size", help="Trajectories per batch (whole questions; a shard is written after each)."),
    resume: bool = typer.Option(False, "--resume", help="Keep the shards of an earlier run in --out and skip its finished questions."),
    price_per_1k: float = typer.Option(15.0, "--price-per-1k", help="Assumed USD per 1,000 serpapi calls, for the cost ledger."),
    search_cache: Optional[str] = typer.Option(None, "--search-cache", help="SQLite file caching real search results."),
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Log real-search trajectories of a policy (every search call, its documents, the outcome)."""
    from zsctl.stages import collect

    cfg = collect.CollectConfig(
        questions=questions, model=model, search=search, out=out, limit=limit, samples=samples,
        temperature=temperature, max_turns=max_turns, max_new_tokens=max_new_tokens, topk=topk,
        batch_size=batch_size, resume=resume, price_per_1k=price_per_1k, search_cache=search_cache, seed=seed,
    )
    summary = _execute(collect.run, cfg, quiet)
    if summary is not None:
        from zsctl.console import kv_table

        keys = ("out", "questions", "trajectories", "new_trajectories", "share_correct", "searches_per_trajectory",
                "degenerate_share", "search_hit_rate", "trajectories_per_s", "engine_calls", "cache_hits", "estimated_cost_usd")
        flat = {**summary, **summary["ledger"]}
        _emit(summary, as_json, kv_table({k: flat[k] for k in keys if k in flat}, "collect"))


@app.command("build-sft")
@stage
def build_sft_cmd(
    trajectories: str = typer.Option(..., "--trajectories", help="DIR[,DIR...]: collect outputs, or .parquet / .jsonl trajectory files."),
    out: str = OUT,
    target: str = typer.Option("simulator", "--for", help="simulator (sim_sft) | policy (policy_sft)."),
    label: str = typer.Option("outcome", "--label", help="Simulator labels: docs (useful/noisy pair from one search's top-N; collect with --topk 10) | outcome | answer | judge."),
    degenerate_share: float = typer.Option(0.15, "--degenerate-share", help="--label docs: extra pairs with a placeholder query and answer-free documents in both modes, as a share of the pairs."),
    pairs_per_search: int = typer.Option(1, "--pairs-per-search", help="--label docs: up to N pairs from one search's results (the i-th answer-holding document each; needs deep results, e.g. collect --topk 20)."),
    judge_model: str = typer.Option("smollm2-135m", "--judge-model", help="Model for --label judge."),
    balance: bool = typer.Option(True, "--balance/--no-balance", help="Downsample the larger label class (seeded)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of questions in val.parquet."),
    docs: int = typer.Option(3, "--docs", help="Top-K documents per simulator completion."),
    doc_words: int = typer.Option(80, "--doc-words", help="Each document cut to this many words."),
    min_f1: Optional[float] = typer.Option(None, "--min-f1", help="Policy: keep trajectories with F1 >= X (default: exact match)."),
    templated: bool = typer.Option(False, "--templated", help="Policy: answer-grounded demonstrations from logged calls whose documents hold a gold answer."),
    policy: str = typer.Option("smollm2-135m", "--policy", help="Policy whose chat template renders the prompts (--for policy)."),
    search: Optional[str] = typer.Option(None, "--search", help="A real engine (bm25:PATH, http://…). With --templated: multi-hop questions' supporting entities, then each question no logged call answered, are searched. With --label docs: each bundled multi-hop question's supporting entities are searched (as deep as its logged searches) and make pairs too."),
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Turn logged search calls into SFT data: train.parquet + val.parquet (split by question)."""
    from zsctl.stages import build_sft

    cfg = build_sft.BuildSFTConfig(
        trajectories=trajectories, out=out, target=target, label=label, judge_model=judge_model, balance=balance,
        degenerate_share=degenerate_share, pairs_per_search=pairs_per_search, val_fraction=val_fraction, docs=docs, doc_words=doc_words, min_f1=min_f1, templated=templated,
        policy=policy, search=search, seed=seed,
    )
    summary = _execute(build_sft.run, cfg, quiet)
    if summary is not None:
        from zsctl.console import kv_table

        keys = ("out", "kind", "mode", "trajectories", "search_calls", "duplicates", "yes_no", "no_answer_docs",
                "degenerate_queries", "degenerate_synthesized", "labels_before", "labels_after", "rows_train", "rows_val", "questions_train", "questions_val", "wall_s", "warning")
        _emit(summary, as_json, kv_table({k: summary[k] for k in keys if k in summary}, "build-sft"))


# Options shared by train-sim and warmup (both run zsctl/sft.py).
SFT_DATA = typer.Option(..., "--data", help="build-sft output directory (train.parquet, val.parquet).")
SFT_LORA = typer.Option(True, "--lora/--full", help="LoRA adapters (merged at the end) or full fine-tuning.")
SFT_MAX_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs).")
SFT_EPOCHS = typer.Option(1.0, "--epochs")
SFT_LR = typer.Option(None, "--lr", help="Learning rate (default 2e-4 with LoRA, 2e-5 full).")
SFT_BATCH = typer.Option(8, "--batch-size", help="Rows per device per step.")
SFT_ACCUM = typer.Option(1, "--grad-accum", help="Gradient accumulation steps.")
SFT_MAX_LEN = typer.Option(1024, "--max-length", help="Tokens per row (prompt + completion); longer rows are cut.")
SFT_LORA_R = typer.Option(16, "--lora-r", help="LoRA rank (alpha = 2 x rank).")
SFT_VAL_LIMIT = typer.Option(32, "--val-limit", help="Validation rows scored before and after training.")
SFT_REPORT = typer.Option("none", "--report-to", help="none | tensorboard | wandb")


def _sft_table(summary: dict, title: str):
    from zsctl.console import kv_table

    keys = ("out", "steps", "rows_train", "rows_val", "train_loss_first", "train_loss_last", "val_loss_before",
            "val_loss", "tokens_per_s", "train_s")
    show = lambda v: f"{v:.4g}" if isinstance(v, float) and abs(v) < 1e4 else v  # noqa: E731
    return kv_table({k: show(summary.get(k)) for k in keys}, title)


@app.command("train-sim")
@stage
def train_sim_cmd(
    data: str = SFT_DATA,
    base: str = typer.Option("smollm2-135m", "--base", help="Base model: HF dir, hub id, or smollm2-135m."),
    out: str = OUT,
    lora: bool = SFT_LORA,
    max_steps: Optional[int] = SFT_MAX_STEPS,
    epochs: float = SFT_EPOCHS,
    lr: Optional[float] = SFT_LR,
    batch_size: int = SFT_BATCH,
    grad_accum: int = SFT_ACCUM,
    max_length: int = SFT_MAX_LEN,
    lora_r: int = SFT_LORA_R,
    val_limit: int = SFT_VAL_LIMIT,
    report_to: str = SFT_REPORT,
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Fine-tune the simulator on build-sft's useful/noisy documents (completion-only loss)."""
    from zsctl.stages import train_sim

    cfg = train_sim.TrainSimConfig(
        data=data, base=base, out=out, lora=lora, lora_r=lora_r, max_steps=max_steps, epochs=epochs, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, val_limit=val_limit,
        report_to=report_to, seed=seed,
    )
    summary = _execute(train_sim.run, cfg, quiet)
    if summary is not None:
        _emit(summary, as_json, _sft_table(summary, "train-sim"))


@app.command("warmup")
@stage
def warmup_cmd(
    data: str = SFT_DATA,
    policy: str = typer.Option("smollm2-135m", "--policy", help="Policy model: HF dir, hub id, or smollm2-135m."),
    out: str = OUT,
    lora: bool = SFT_LORA,
    max_steps: Optional[int] = SFT_MAX_STEPS,
    epochs: float = SFT_EPOCHS,
    lr: Optional[float] = SFT_LR,
    batch_size: int = SFT_BATCH,
    grad_accum: int = SFT_ACCUM,
    max_length: int = SFT_MAX_LEN,
    lora_r: int = SFT_LORA_R,
    val_limit: int = SFT_VAL_LIMIT,
    report_to: str = SFT_REPORT,
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Warm-start a policy by SFT on real-search demonstrations; <information> text gets no loss."""
    from zsctl.stages import warmup

    cfg = warmup.WarmupConfig(
        data=data, policy=policy, out=out, lora=lora, lora_r=lora_r, max_steps=max_steps, epochs=epochs, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, val_limit=val_limit,
        report_to=report_to, seed=seed,
    )
    summary = _execute(warmup.run, cfg, quiet)
    if summary is not None:
        _emit(summary, as_json, _sft_table(summary, "warmup"))


@app.command("rl")
@stage
def rl_cmd(
    policy: str = typer.Option("smollm2-135m", "--policy", help="Policy model spec."),
    search: str = typer.Option(..., "--search", help="sim:MODEL / sim+http://… (ZeroSearch) or a real engine (Search-R1 style)."),
    train: str = typer.Option(..., "--train", help="Training questions: bundled name(s) (train split) or a FlashRAG jsonl / ZeroSearch parquet."),
    out: str = OUT,
    algo: str = typer.Option("grpo", "--algo", help="grpo | dapo | dr_grpo | reinforce++"),
    steps: int = typer.Option(50, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="Completions per step and process (prompts x group size)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step."),
    group_size: int = typer.Option(4, "--group-size", help="Rollouts per prompt."),
    lr: float = typer.Option(1e-5, "--lr"),
    beta: float = typer.Option(0.001, "--beta", help="KL coefficient."),
    lora: bool = typer.Option(True, "--lora/--full"),
    noise_start: float = typer.Option(0.0, "--noise-start", help="Curriculum p_s."),
    noise_end: float = typer.Option(0.5, "--noise-end", help="Curriculum p_e."),
    noise_base: float = typer.Option(4.0, "--noise-base", help="Curriculum base b."),
    max_turns: int = typer.Option(2, "--max-turns"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens per generation round."),
    max_response_tokens: int = typer.Option(640, "--max-response-tokens", help="Whole response (policy + inserted tokens), a hard bound: TRL's max_completion_length."),
    topk: int = typer.Option(3, "--topk"),
    temperature: float = typer.Option(1.0, "--temperature"),
    reward: str = typer.Option("f1", "--reward", help="f1 | em | f1+format"),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every K steps (0 = only the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint in --out."),
    report_to: str = typer.Option("none", "--report-to", help="none | tensorboard | wandb"),
    use_vllm: bool = typer.Option(False, "--use-vllm", help="Generate with TRL's vLLM integration (GPU)."),
    vllm_mode: str = typer.Option("colocate", "--vllm-mode", help="colocate | server"),
    vllm_server_host: str = typer.Option("127.0.0.1", "--vllm-server-host", help="TRL vllm-serve host (server mode)."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation questions."),
    val_search: Optional[str] = typer.Option(None, "--val-search", help="Real engine for validation."),
    val_every: int = typer.Option(0, "--val-every", help="Validate every K steps."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N training questions per source."),
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """RL with (simulated) search on TRL's GRPOTrainer, with the noise curriculum and masked loss."""
    from zsctl.console import kv_table
    from zsctl.stages import rl

    cfg = rl.RLConfig(
        policy=policy, search=search, train=train, out=out, algo=algo, steps=steps, batch_size=batch_size,
        grad_accum=grad_accum, group_size=group_size, lr=lr, beta=beta, lora=lora, noise_start=noise_start, noise_end=noise_end,
        noise_base=noise_base, max_turns=max_turns, max_new_tokens=max_new_tokens,
        max_response_tokens=max_response_tokens, topk=topk, temperature=temperature, reward=reward,
        save_every=save_every, resume=resume, report_to=report_to,
        use_vllm=use_vllm, vllm_mode=vllm_mode, vllm_server_host=vllm_server_host, val=val, val_search=val_search, val_every=val_every,
        limit=limit, seed=seed,
    )
    summary = _execute(rl.run, cfg, quiet)
    if summary is not None:
        _emit(summary, as_json, kv_table({k: v for k, v in summary.items() if not isinstance(v, dict)}, "rl"))


@app.command("report")
@stage
def report_cmd(
    run_dir: str = typer.Argument(..., help="Folder holding the run's artifacts."),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder (default RUN_DIR/report)."),
    price_per_1k: float = typer.Option(15.0, "--price-per-1k", help="USD per 1,000 real search calls, for the cost ledger."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Write report.md and PNG plots (reward, noise, before/after, search cost) for a run."""
    from zsctl.stages import report

    from zsctl.console import eval_table

    summary = _execute(report.run, report.ReportConfig(run_dir=run_dir, out=out, price_per_1k=price_per_1k), quiet)
    if summary is not None:
        table = eval_table(summary["evaluation"], "Evaluation with the real engine (scores in %)") if summary["evaluation"] else None
        _emit(summary, as_json, table)


@app.command("inspect")
@stage
def inspect_cmd(
    path: str = typer.Argument(..., help="An artifact directory."),
    rows: int = typer.Option(5, "--rows", help="How many first rows to show."),
    as_json: bool = JSON,
):
    """Show an artifact's manifest, schema and first rows."""
    from zsctl.stages import inspect as inspect_stage

    info = inspect_stage.run(path, rows)
    if as_json:
        _emit(info, True)
    else:
        from zsctl.console import render_inspect

        render_inspect(info)


SIM_MODE = typer.Option("tuned", "--sim-mode", help="For sim: engines: tuned (a train-sim model) | prompt (untuned instruct model, few-shot).")
SIM_TEMPLATE = typer.Option(None, "--sim-template", help="Simulator prompt template file (fields {query} {question} {answer} {mode} {k}).")


@app.command("serve")
@stage
def serve_cmd(
    search: str = typer.Option(..., "--search", help="Engine to serve: bm25:PATH | sim:MODEL | sim+http://… | http://… | serpapi"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port"),
    model: Optional[str] = typer.Option(None, "--model", help="Also serve this model at /v1/completions (for sim+http://)."),
    max_queries: int = typer.Option(64, "--max-queries", help="Queries (or prompts) per request."),
    max_query_chars: int = typer.Option(512, "--max-query-chars", help="Characters per query."),
    sim_mode: str = SIM_MODE,
    sim_template: Optional[str] = SIM_TEMPLATE,
    noise_p: float = typer.Option(0.0, "--noise-p", help="Simulators: share of noisy answers when a request names no noise."),
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Serve an engine over the Search-R1 /retrieve API (and a model over /v1/completions)."""
    from zsctl.stages import serve

    cfg = serve.ServeConfig(search=search, host=host, port=port, model=model, max_queries=max_queries,
                            max_query_chars=max_query_chars, sim_mode=sim_mode, sim_template=sim_template,
                            noise_p=noise_p, seed=seed)
    summary = _execute(serve.run, cfg, quiet)
    if summary is not None:
        _emit(summary, as_json)


@app.command("check-sim")
@stage
def check_sim_cmd(
    search: str = typer.Option(..., "--search", help="The simulator: sim:MODEL | sim+http://HOST:PORT/v1[,…]"),
    out: str = OUT,
    questions: Optional[str] = typer.Option(None, "--questions", help="Bundled benchmark name(s) (eval split) or a FlashRAG jsonl / parquet; the question is the query."),
    trajectories: Optional[str] = typer.Option(None, "--trajectories", help="Take the logged queries (with their own questions) from this trajectories artifact."),
    limit: Optional[int] = typer.Option(30, "--limit", help="At most N held-apart queries (spread over the benchmarks)."),
    vs: Optional[str] = typer.Option(None, "--vs", help="A real engine to compare with, e.g. bm25:PATH."),
    k: int = typer.Option(3, "--k", help="Documents per query."),
    sim_mode: str = SIM_MODE,
    sim_template: Optional[str] = SIM_TEMPLATE,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Simulator tokens per query (default 40 x k)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Queries per simulator call (each in both modes: twice as many generations)."),
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Simulator quality: answer containment useful vs noisy, format validity, length, distinct-n."""
    from zsctl.stages import check_sim

    cfg = check_sim.CheckSimConfig(search=search, out=out, questions=questions, trajectories=trajectories, limit=limit,
                                   vs=vs, k=k, sim_mode=sim_mode, sim_template=sim_template,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    summary = _execute(check_sim.run, cfg, quiet)
    if summary is not None:
        _emit(summary, as_json, _check_sim_table(summary))


def _check_sim_table(summary: dict):
    from rich.table import Table

    sim, real, held = summary["simulator"], summary.get("real"), summary["held_apart"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    t = Table(title=f"check-sim: {sim['spec']} (n = {summary['n_queries']} held-apart queries, k={summary['k']})",
              min_width=76, caption_justify="left")
    columns = [("useful", sim["useful"]), ("noisy", sim["noisy"])] + ([("real", real)] if real else [])
    t.add_column("metric")
    for name, _ in columns:
        t.add_column(name, justify="right")
    t.add_row("has answer %", *[pct(m["has_answer"]) for _, m in columns])
    t.add_row("  95% interval (Wilson)", *["[{}, {}]".format(*map(pct, m["has_answer_ci95"])) for _, m in columns])
    t.add_row("leak %: query names nothing", pct(sim["leak"]["has_answer"]), "", *([""] if real else []))
    for key, label in [("format_valid", "format valid %"), ("mean_tries", "tries / reply"), ("mean_doc_words", "words/doc"),
                       ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2")]:
        t.add_row(label, *[pct(m[key]) if key == "format_valid" else f"{m[key]:.2f}" for _, m in columns])
    lo, hi = sim["gap_ci95"]
    t.caption = (f"gap (useful - noisy has-answer): {pct(sim['controllability_gap'])} points, 95% interval "
                 f"[{pct(lo)}, {pct(hi)}] (Newcombe); format valid {pct(sim['format_valid'])}%; leak probes: "
                 f"{sim['leak']['n']}\ndropped: {held['excluded_trained']} trained on, {held['excluded_yes_no']} yes/no golds; "
                 f"trained questions: {held['trained_on']}")
    return t


def expand_argv(argv: list[str]) -> list[str]:
    """`--config FILE.yaml` and `key=value` overrides → ordinary options.

    The YAML's options go right after the command name, the command line's own after them, so
    explicit flags and `key=value` pairs override the file (for options, the last one wins).
    Keys use option names with - or _ (`batch_size: 64`); `flag: true/false` → `--flag/--no-flag`.
    """
    def as_opts(pairs) -> list[str]:
        opts = []
        for k, v in pairs:
            name = "--" + str(k).replace("_", "-")
            if isinstance(v, bool):
                opts.append(name if v else "--no-" + name[2:])
            elif v is not None:
                opts += [name, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
        return opts

    cmd = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if cmd is None:
        return argv
    head, rest = argv[: cmd + 1], argv[cmd + 1 :]
    from_file: list[str] = []
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            raise BadInput("--config needs a YAML file path")
        path = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
        import yaml

        try:
            loaded = yaml.safe_load(open(path, encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BadInput(f"--config '{path}' cannot be read as YAML ({' '.join(str(e).split())[:160]})") from e
        if not isinstance(loaded, dict):
            raise BadInput(f"--config '{path}' must hold a mapping of option: value")
        from_file = as_opts(loaded.items())
    overrides = [a for a in rest if "=" in a and not a.startswith("-") and a.split("=", 1)[0].replace("-", "_").isidentifier()]
    rest = [a for a in rest if a not in overrides]
    return head + from_file + rest + as_opts(a.split("=", 1) for a in overrides)


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:]
    if "--dry-run" in argv:
        argv.remove("--dry-run")
        _state["dry_run"] = True
    try:
        argv = expand_argv(argv)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app(args=_threads_first(argv), prog_name="zsctl")


def _threads_first(argv: list[str]) -> list[str]:
    """`--threads N` may follow the command name; it is the root's option, so move it in front."""
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            return [a] + argv[:i] + argv[i + 1:]
        if a == "--threads" and i + 1 < len(argv):
            return argv[i:i + 2] + argv[:i] + argv[i + 2:]
    return argv


if __name__ == "__main__":
    main()
