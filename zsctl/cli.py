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
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


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


def _emit(summary: dict, as_json: bool, table=None) -> None:
    from zsctl.console import out

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

    summary = index.run(index.IndexConfig(corpus=corpus, out=out), _progress(quiet))
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
    summary = evaluate.run(cfg, _progress(quiet))
    _emit(summary, as_json, metrics_table(summary, title=f"{model} + {search}"))


@app.command("rl")
@stage
def rl_cmd(
    policy: str = typer.Option("smollm2-135m", "--policy", help="Policy model spec."),
    search: str = typer.Option(..., "--search", help="sim:MODEL / sim+http://… (ZeroSearch) or a real engine (Search-R1 style)."),
    train: str = typer.Option(..., "--train", help="Training questions: bundled name(s) (train split) or a FlashRAG jsonl / ZeroSearch parquet."),
    out: str = OUT,
    algo: str = typer.Option("grpo", "--algo", help="grpo | dapo | dr_grpo | reinforce++"),
    steps: int = typer.Option(50, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="Completions per step (prompts x group size)."),
    group_size: int = typer.Option(4, "--group-size", help="Rollouts per prompt."),
    lr: float = typer.Option(1e-5, "--lr"),
    beta: float = typer.Option(0.001, "--beta", help="KL coefficient."),
    lora: bool = typer.Option(True, "--lora/--full"),
    noise_start: float = typer.Option(0.0, "--noise-start", help="Curriculum p_s."),
    noise_end: float = typer.Option(0.5, "--noise-end", help="Curriculum p_e."),
    noise_base: float = typer.Option(4.0, "--noise-base", help="Curriculum base b."),
    max_turns: int = typer.Option(2, "--max-turns"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens per generation round."),
    topk: int = typer.Option(3, "--topk"),
    temperature: float = typer.Option(1.0, "--temperature"),
    reward: str = typer.Option("f1", "--reward", help="f1 | em | f1+format"),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every K steps (0 = only the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint in --out."),
    report_to: str = typer.Option("none", "--report-to", help="none | tensorboard | wandb"),
    use_vllm: bool = typer.Option(False, "--use-vllm", help="Generate with TRL's vLLM integration (GPU)."),
    vllm_mode: str = typer.Option("colocate", "--vllm-mode", help="colocate | server"),
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
        group_size=group_size, lr=lr, beta=beta, lora=lora, noise_start=noise_start, noise_end=noise_end,
        noise_base=noise_base, max_turns=max_turns, max_new_tokens=max_new_tokens, topk=topk,
        temperature=temperature, reward=reward, save_every=save_every, resume=resume, report_to=report_to,
        use_vllm=use_vllm, vllm_mode=vllm_mode, val=val, val_search=val_search, val_every=val_every,
        limit=limit, seed=seed,
    )
    summary = rl.run(cfg, _progress(quiet))
    _emit(summary, as_json, kv_table({k: v for k, v in summary.items() if not isinstance(v, dict)}, "rl"))


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


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
