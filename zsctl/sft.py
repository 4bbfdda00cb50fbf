"""The one supervised fine-tuning path, shared by `zsctl train-sim` and `zsctl warmup`.

Rows are prompt/completion pairs. We tokenise them ourselves and hand TRL's SFTTrainer a
pre-tokenised dataset (`input_ids` + `completion_mask`), so the loss mask is exactly ours:
- simulator rows: the whole completion is trained (the prompt never is);
- policy rows (`mask_env=True`): text the environment inserted — `<information>` blocks and the
  agent's notes — is attended to but never trained on, the same rule as RL. Each such span is
  tokenised on its own, as the agent loop inserts it, so training sees the token stream of inference.
Every completion ends with the EOS token so models learn to stop. LoRA (peft) by default, merged
into a plain HF model directory at the end; the directory appears by one rename, never half-written.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

from zsctl.core import artifacts, prompts
from zsctl.core.config import Options, option
from zsctl.core.errors import BadInput, RunFailure
from zsctl.core.models import adapt_threads
from zsctl.core.progress import Progress
from zsctl.core.schemas import POLICY_SFT, SIM_SFT

DATA_SCHEMAS = {"sim_sft": SIM_SFT, "policy_sft": POLICY_SFT}
SPLITS = ("train.parquet", "val.parquet")
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")  # each but none is also the package it needs
# --report-to, shared by train-sim, warmup and rl: TRL's own integrations log every step
REPORT_TO_HELP = ("Experiment tracking through TRL: none | tensorboard | wandb | trackio (tensorboard files go to "
                  "OUT/logs for train-sim/warmup, OUT/checkpoints/runs for rl; trackio logs locally; wandb "
                  "needs WANDB_MODE=offline to stay off the network).")


def check_report_to(report_to: str) -> None:
    """The tracker's package must be installed: TRL would fail only after the model has loaded."""
    if report_to != "none" and Options.check_environment and importlib.util.find_spec(report_to) is None:
        raise BadInput(f"--report-to {report_to} needs the '{report_to}' package; "
                       f"run `pip install {report_to}` or use --report-to none")

# What the environment inserts into a policy response (agent.py): information blocks and the two
# fixed notes, each with the whitespace around it. An unclosed block (a cut response) runs to the end.
ENV_SPAN_RE = re.compile(
    r"\s*(?:<information>.*?(?:</information>|\Z)"
    + "".join("|" + re.escape(note.strip()) for note in (prompts.INVALID_ACTION, prompts.FINAL_TURN))
    + r")\s*",
    re.DOTALL,
)


@dataclass(kw_only=True)
class SFTOptions(Options):
    """The training options train-sim and warmup share (their configs extend this)."""

    lora: bool = option(True, "LoRA adapters (merged at the end) or full fine-tuning.", off="full")
    lora_r: int = option(16, "LoRA rank (alpha = 2 x rank).", ge=1)
    lr: float | None = option(None, "Learning rate (default 2e-4 with LoRA, 2e-5 full).", gt=0)
    epochs: float = option(1.0, "Passes over the training rows.", gt=0)
    max_steps: int | None = option(None, "Optimizer steps (overrides --epochs).", ge=1)
    batch_size: int = option(8, "Rows per device per step.", ge=1)
    grad_accum: int = option(1, "Gradient accumulation steps.", ge=1)
    max_length: int = option(1024, "Tokens per row (prompt + completion); longer rows are cut.", ge=1)
    pad_to_multiple_of: int = option(64, "Pad a batch of several rows to a multiple of N tokens (1: to its "
                                     "longest row).", ge=1)
    val_limit: int = option(32, "Validation rows scored before and after training.", ge=0)
    report_to: str = option("none", REPORT_TO_HELP, choices=REPORT_TO)
    seed: int = option(0, "Random seed.", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_report_to(self.report_to)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(SFTOptions)}


@dataclass(kw_only=True)
class SFTRunConfig(SFTOptions):
    base: str  # model spec: HF dir, hub id, or smollm2-135m
    out: str  # final model directory
    mask_env: bool = False  # True for policy rows: environment spans get no loss
    prompt_special_tokens: bool = True  # tokenise the prompt as the engine does at inference
    lora_alpha: int | None = None  # None = 2 * lora_r
    desc: str = "sft"  # progress label


# --- data ------------------------------------------------------------------------------------------


def load_sft_data(path: str, kind: str) -> tuple[list[dict], list[dict], dict]:
    """(train rows, val rows, manifest) of a build-sft artifact: train.parquet (+ val.parquet)."""
    manifest = artifacts.read_manifest(path)
    if manifest.get("kind") != kind:
        hint = "build-sft --for policy" if kind == "policy_sft" else "build-sft (simulator data)"
        raise BadInput(
            f"'{path}' is a '{manifest.get('kind')}' artifact, expected '{kind}'; pass the output of zsctl {hint}"
        )
    schema = DATA_SCHEMAS[kind]
    splits = []
    for name in SPLITS:
        file = Path(path) / name
        if not file.is_file():
            if name == "train.parquet":
                raise BadInput(f"'{path}' has no {name}; rerun zsctl build-sft")
            splits.append([])
            continue
        table = artifacts.read_table_file(file, schema)
        # A row without prompt text cannot teach anything; an empty completion still teaches EOS.
        rows = table.select(["prompt", "completion"]).to_pylist()
        splits.append([r for r in rows if r["prompt"] and r["completion"] is not None])
    if not splits[0]:
        raise BadInput(
            f"'{Path(path) / 'train.parquet'}' has no usable rows (prompt and completion set); build a larger corpus"
        )
    return splits[0], splits[1], manifest


def encode_example(tok, prompt: str, completion: str, *, mask_env: bool, prompt_special_tokens: bool) -> dict:
    """Token ids of prompt + completion + EOS and the loss mask (1 = trained).

    The prompt is tokenised alone, as the engine feeds it at inference; completion pieces follow
    as separate token runs. Returns {"input_ids", "completion_mask", "prompt_len"}.
    """
    ids = tok(prompt, add_special_tokens=prompt_special_tokens)["input_ids"]
    mask = [0] * len(ids)
    prompt_len = len(ids)
    for text, trained in split_env_spans(completion) if mask_env else [(completion, True)]:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(trained)] * len(piece)
    ids.append(tok.eos_token_id)
    mask.append(1)
    return {"input_ids": ids, "completion_mask": mask, "prompt_len": prompt_len}


def split_env_spans(text: str) -> list[tuple[str, bool]]:
    """Cut a policy response into (piece, trained) runs: environment spans are not trained."""
    pieces, pos = [], 0
    for m in ENV_SPAN_RE.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos : m.start()], True))
        if m.end() > m.start():
            pieces.append((m.group(0), False))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], True))
    return pieces


def build_dataset(tok, rows: list[dict], cfg: SFTRunConfig) -> tuple[list[dict], dict]:
    """Encoded examples (cut to max_length) and counts; rows left with nothing to train are dropped."""
    examples, truncated, dropped, tokens, trained = [], 0, 0, 0, 0
    for r in rows:
        ex = encode_example(tok, r["prompt"], r["completion"], mask_env=cfg.mask_env,
                            prompt_special_tokens=cfg.prompt_special_tokens)
        if len(ex["input_ids"]) > cfg.max_length:
            truncated += 1
            ex["input_ids"] = ex["input_ids"][: cfg.max_length]
            ex["completion_mask"] = ex["completion_mask"][: cfg.max_length]
        if not any(ex["completion_mask"]):  # prompt alone fills max_length
            dropped += 1
            continue
        tokens += len(ex["input_ids"])
        trained += sum(ex["completion_mask"])
        examples.append({"input_ids": ex["input_ids"], "completion_mask": ex["completion_mask"]})
    stats = {"rows": len(examples), "truncated": truncated, "dropped": dropped, "tokens": tokens,
             "trained_tokens": trained}
    return examples, stats


# --- training ----------------------------------------------------------------------------------


def _callback(cfg: SFTRunConfig, progress: Progress, losses: list):
    from transformers import TrainerCallback

    class Track(TrainerCallback):
        """Progress bar per optimizer step, and the loss of every logged step."""

        def on_train_begin(self, args, state, control, **kw):
            self.every = max(1, state.max_steps // 10)
            self.t0 = time.monotonic()
            if state.is_world_process_zero:
                progress.start(cfg.desc, state.max_steps)

        def on_step_begin(self, args, state, control, **kw):
            # --threads auto: each step takes the cores others leave free, on threads that spin
            # briefly (12 train-sim steps: 123 s, against 187 s on 2 threads that sleep at once)
            adapt_threads()

        def on_step_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                progress.advance(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in (logs or {}):
                # seconds since training began: a run whose steps slow down shows it in train_log.json
                losses.append({"step": state.global_step, "loss": float(logs["loss"]),
                               "seconds": round(time.monotonic() - self.t0, 3)})
                if state.is_world_process_zero and (
                    state.global_step % self.every == 0 or state.global_step == state.max_steps
                ):
                    progress.log(f"{cfg.desc} step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                progress.stop()

    return Track()


def make_trainer(cfg: SFTRunConfig, train_rows: list[dict], val_rows: list[dict], progress: Progress | None = None,
                 *, trainer_dir: str | Path | None = None):
    """Load the base model, encode the rows and build the SFTTrainer.

    Returns (trainer, info) where info holds the data counts and the per-step loss list the
    callback fills.
    """
    import datasets
    import torch
    import transformers
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from zsctl.core.models import (
        load_model,
        lora_config,
        no_activation_checkpointing,
        score_labelled_positions_only,
        training_precision,
    )

    progress = progress or Progress()
    # Our Progress is the one display: no library bars, no log dicts printed to stdout (--json).
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    on_gpu = torch.cuda.is_available()
    dtype, bf16 = training_precision()
    model, tok = load_model(cfg.base, dtype=dtype)
    if tok.eos_token_id is None:
        raise BadInput(f"model '{cfg.base}' has no EOS token; its tokenizer cannot mark the end of a completion")
    train, train_stats = build_dataset(tok, train_rows, cfg)
    if not train:
        raise BadInput(f"every training row's prompt fills --max-length {cfg.max_length}; raise --max-length")
    val, val_stats = build_dataset(tok, val_rows[: cfg.val_limit], cfg)
    if train_stats["truncated"]:
        progress.log(
            f"{train_stats['truncated']} of {len(train_rows)} training rows were cut to --max-length {cfg.max_length}"
        )

    args = SFTConfig(
        output_dir=str(trainer_dir or Path(cfg.out).with_name(f".{Path(cfg.out).name}.trainer")),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        completion_only_loss=True,  # TRL turns our completion_mask into labels (-100 elsewhere)
        max_length=None,  # already cut above, where we can count it
        # few distinct batch shapes: padded only to its longest row, a long CPU run's steps slowed from
        # 6.9 to 9.0 s (80 train-sim steps; README). One row has no padding to share.
        pad_to_multiple_of=cfg.pad_to_multiple_of if cfg.batch_size > 1 else None,
        packing=False,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to=cfg.report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not on_gpu,
        bf16=bf16,
        **no_activation_checkpointing(),
        include_num_input_tokens_seen="non_padding",  # tokens/s counts real tokens, not padding
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = lora_config(cfg.lora_r, cfg.lora_alpha) if cfg.lora else None
    score_labelled_positions_only()
    losses: list[dict] = []
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train),
        eval_dataset=datasets.Dataset.from_list(val) if val else None,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[_callback(cfg, progress, losses)],
    )
    trainer.remove_callback(PrinterCallback)
    for cb in trainer.callback_handler.callbacks:
        # the val loss logged before training opens tensorboard's writer before on_train_begin has set
        # its folder, and the writer's default is runs/ in the user's working directory
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", "") is None:
            from transformers.integrations.integration_utils import default_logdir

            cb.logging_dir = str(Path(args.output_dir) / default_logdir())
    return trainer, {"train": train_stats, "val": val_stats, "losses": losses}


def train_sft(cfg: SFTRunConfig, train_rows: list[dict], val_rows: list[dict], progress: Progress | None = None,
              *, manifest: dict | None = None) -> dict:
    """Fine-tune, evaluate on val, and write the merged HF model to cfg.out (one rename at the end).

    `manifest` = write_manifest keyword arguments (kind, config, inputs, extra); the main process
    writes it last, with the summary. Returns the summary: data counts, steps, train/val loss, tokens/s.
    """
    progress = progress or Progress()
    out = Path(cfg.out)
    trainer_dir = out.with_name(f".{out.name}.trainer")
    try:  # the trainer's working dir never outlives the run (logs are moved into the model dir)
        trainer, info = make_trainer(cfg, train_rows, val_rows, progress, trainer_dir=trainer_dir)
        has_val = trainer.eval_dataset is not None
        val_before = trainer.evaluate()["eval_loss"] if has_val else None
        t0 = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - t0
        val_after = trainer.evaluate()["eval_loss"] if has_val else None
        losses = info["losses"]
        if not losses or not all(math.isfinite(x["loss"]) for x in losses):
            raise RunFailure(
                f"training loss is not finite ({losses[-1]['loss'] if losses else 'never logged'}); lower --lr"
            )
        summary = _summary(cfg, trainer, info, result, wall, val_before, val_after)
        if trainer.accelerator.is_main_process:
            _save(trainer, cfg, out, trainer_dir, losses)
            if manifest is not None:
                artifacts.write_manifest(out, summary=summary, seed=cfg.seed, **manifest)
        trainer.accelerator.wait_for_everyone()
    finally:
        shutil.rmtree(trainer_dir, ignore_errors=True)
    return summary


def _summary(cfg: SFTRunConfig, trainer, info: dict, result, wall: float, val_before, val_after) -> dict:
    losses = info["losses"]
    return {
        "out": str(cfg.out),
        "base_model": cfg.base,
        "lora": cfg.lora,
        "rows_train": info["train"]["rows"],
        "rows_val": info["val"]["rows"],
        "truncated_rows": info["train"]["truncated"],
        "dropped_rows": info["train"]["dropped"],
        "trained_token_share": round(info["train"]["trained_tokens"] / max(1, info["train"]["tokens"]), 4),
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 3),
        "learning_rate": cfg.learning_rate,
        "train_loss_first": losses[0]["loss"],
        "train_loss_last": losses[-1]["loss"],
        "train_loss_mean": float(result.training_loss),
        "val_loss_before": val_before,
        "val_loss": val_after,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_s": round(trainer.state.num_input_tokens_seen / wall, 1) if wall > 0 else None,
        "train_s": round(wall, 2),
    }


def _save(trainer, cfg: SFTRunConfig, out: Path, trainer_dir: Path, losses: list[dict]) -> None:
    """Merge LoRA, save model + tokenizer + per-step losses into a temp dir, then rename it to out."""
    tmp = artifacts.sibling(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = trainer.model.merge_and_unload() if cfg.lora else trainer.model
        model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        artifacts.write_json(tmp, "train_log.json", losses)
        if cfg.report_to != "none" and trainer_dir.is_dir():
            shutil.move(str(trainer_dir), str(tmp / "logs"))  # tensorboard/wandb files stay with the model
        out.parent.mkdir(parents=True, exist_ok=True)
        artifacts.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
