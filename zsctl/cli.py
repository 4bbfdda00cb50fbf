"""The `zsctl` command line: one command per stage, generated from the stage's config dataclass.

Each config field (zsctl/core/config.py) becomes a flag with its default and help; `--config
FILE.yaml` and `key=value` become the same flags, so all three ways reach every field. The command
builds the config (which validates itself) → stage.run(cfg) → summary table / JSON.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (one line, no traceback unless
--debug). With --json the last stdout line is one JSON object summarising the run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import sys
import typing
import warnings
from typing import Optional

import typer
from typer.core import TyperGroup

from zsctl.core.config import Options, flag_of, range_of, to_flags
from zsctl.core.errors import BadInput, RunFailure, redact

_state = {"debug": False, "dry_run": False}
ROOT_FLAGS = ("--debug", "--dry-run")  # root options accepted anywhere on the line (as is --threads N)


class _Root(TyperGroup):
    """Expands `--config` and `key=value` before click parses, so CliRunner sees what the shell sees."""

    def parse_args(self, ctx, args):
        try:
            args = expand_argv(list(args))
        except BadInput as e:
            _fail(e, 2)
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_Root, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train LLM search agents with a simulated search engine (ZeroSearch).")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the command's options and print its resolved "
                                 "config as JSON; run nothing."),
    threads: Optional[str] = typer.Option(
        None, "--threads", help="CPU threads for torch, in any position (default $ZSCTL_THREADS, else "
        "$OMP_NUM_THREADS, else one per core); idle threads sleep, so a shared machine stays fast. 'auto': "
        "rollouts and rl's loss take the cores other processes leave free, chosen each time, their threads "
        "spinning briefly before they sleep."),
):
    _state.update(debug=debug, dry_run=dry_run)
    from zsctl.core.models import set_threads

    try:
        set_threads(threads)
    except BadInput as e:
        _fail(e, 2)


def exit_codes(fn):
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
    msg = redact(" ".join(str(e).split()) or type(e).__name__)  # a spec's credentials are never printed
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


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
        print(redact(json.dumps(summary, default=str)), flush=True)


_CONFIGS: dict[str, type] = {}  # command name → its config class (expand_argv reads the flags from it)


def command(name: str, module: str, config: str, doc: str) -> None:
    """Register `zsctl NAME`: a flag per field of `module.config`, then config → module.run → summary.

    Required fields are checked here rather than by click, so a missing one is one line like every
    other bad input.
    """
    mod = importlib.import_module(f"zsctl.stages.{module}")
    cls = getattr(mod, config)
    _CONFIGS[name] = cls
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        bounds = range_of(f)
        help_text = " ".join([f.metadata.get("help", "")] + ["[required]"] * required + [f"[{bounds}]"] * bool(bounds))
        typ = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        default = None if required else f.default
        if f.metadata.get("positional"):
            info = typer.Argument(None, help=help_text, metavar=f.name.upper(), show_default=False)
        elif typ is bool:
            info = typer.Option(default, f"{flag_of(f)}/--{f.metadata.get('off') or 'no-' + flag_of(f)[2:]}",
                                help=help_text)
        else:
            info = typer.Option(default, flag_of(f), help=help_text, show_default=not required)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=typ if typ is bool else Optional[typ]))
    params += [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, "--config", help="YAML file of option: value pairs; options on the command line win.")),
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--json", help="Print a JSON summary as the last stdout line.")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="No progress output.")),
    ]

    def run_command(*, config_file=None, as_json: bool = False, quiet: bool = False, **values):
        for f in dataclasses.fields(cls):
            if values[f.name] is None and f.default is dataclasses.MISSING:
                shown = f.name.upper() if f.metadata.get("positional") else flag_of(f)
                raise BadInput(f"missing {shown}: {f.metadata.get('help', '')}")
        Options.check_environment = not _state["dry_run"]  # a dry run checks the values, not this machine
        try:
            cfg = cls(**values)
        finally:
            Options.check_environment = True
        if _state["dry_run"]:
            doc = {"dry_run": True, "stage": module, "config": dataclasses.asdict(cfg)}
            print(redact(json.dumps(doc, default=str)))
            return
        from zsctl.console import make_progress, summary_table

        summary = mod.run(cfg, make_progress(quiet or not _main_process()))
        _emit(summary, as_json, summary_table(name, summary, cfg))

    run_command.__signature__ = inspect.Signature(params)
    run_command.__doc__ = doc
    app.command(name)(exit_codes(run_command))


command("index", "index", "IndexConfig", "Build a BM25 index (bm25s) of a passage corpus.")
command("eval", "evaluate", "EvalConfig", "Score a policy on benchmarks with a search engine: predictions.parquet + "
        "metrics.json.")
command("collect", "collect", "CollectConfig", "Log real-search trajectories of a policy (every search call, its "
        "documents, the outcome).")
command("build-sft", "build_sft", "BuildSFTConfig", "Turn logged search calls into SFT data: train.parquet + "
        "val.parquet (split by question).")
command("train-sim", "train_sim", "TrainSimConfig", "Fine-tune the simulator on build-sft's useful/noisy documents "
        "(completion-only loss).")
command("warmup", "warmup", "WarmupConfig", "Warm-start a policy by SFT on real-search demonstrations; "
        "<information> text gets no loss.")
command("rl", "rl", "RLConfig", "RL with (simulated) search on TRL's GRPOTrainer, with the noise curriculum and "
        "masked loss.")
command("report", "report", "ReportConfig", "Write report.md and PNG plots (reward, noise, before/after, search "
        "cost) for a run.")
command("serve", "serve", "ServeConfig", "Serve an engine over the Search-R1 /retrieve API (and a model over "
        "/v1/completions).")
command("check-sim", "check_sim", "CheckSimConfig", "Simulator quality: answer containment useful vs noisy, format "
        "validity, length, distinct-n.")


@app.command("inspect")
@exit_codes
def inspect_cmd(
    path: str = typer.Argument(..., help="An artifact directory."),
    rows: int = typer.Option(5, "--rows", help="How many first rows to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest, schema and rows as JSON."),
):
    """Show an artifact's manifest, schema and first rows."""
    from zsctl.stages import inspect as inspect_stage

    if rows < 0:
        raise BadInput(f"--rows {rows} must be at least 0")
    info = inspect_stage.run(path, rows)
    if as_json:
        _emit(info, True)
    else:
        from zsctl.console import render_inspect

        render_inspect(info)


def expand_argv(argv: list[str]) -> list[str]:
    """Root options to the front (they may stand anywhere); then the command's `--config FILE.yaml`,
    `key=value` overrides and old flag spellings become its current flags (config.to_flags)."""
    root, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ROOT_FLAGS or a.startswith("--threads="):
            root.append(a)
        elif a == "--threads" and i + 1 < len(argv):
            root += argv[i:i + 2]
            i += 1
        else:
            rest.append(a)
        i += 1
    if not rest or rest[0].startswith("-"):
        return root + rest
    return root + [rest[0]] + to_flags(_CONFIGS.get(rest[0]), rest[1:])


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # TRL reads the old name of a transformers property in warmup, train-sim and rl: harmless, and
    # otherwise the only line a user sees between a stage's start and its table
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        rv = app(args=sys.argv[1:], prog_name="zsctl", standalone_mode=False)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # click's usage errors (typer may carry its own copy of click, so they are told by class name)
        kinds = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in kinds:
            e.show()  # `zsctl` alone: the help text is the answer
            sys.exit(e.exit_code)
        if "UsageError" not in kinds:
            raise
        where = e.ctx.command_path if e.ctx else "zsctl"  # one line, like every other bad input
        print(f"error: {' '.join(e.format_message().split()).rstrip('.')}; see '{where} --help'", file=sys.stderr)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
