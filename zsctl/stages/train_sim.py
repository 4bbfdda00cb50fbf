"""`zsctl train-sim`: fine-tune the simulator on build-sft's prompt/completion corpus.

setup (data, output dir, base model) → SFT in zsctl/sft.py (completion-only loss, LoRA merged or
full) → HF model directory + manifest.json (last). The prompt is the simulator template text build-sft
rendered, tokenised exactly as the `sim:` engine feeds it at inference: raw text, or, for a template
with a system message (e.g. `build-sft --sim-template zerosearch-sft`), the user turn in the base
model's chat template. The template is recorded in the simulator's manifest, and `sim:` uses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from zsctl import sft
from zsctl.core import artifacts, prompts
from zsctl.core.config import DEFAULT_MODEL, option
from zsctl.core.progress import Progress


@dataclass(kw_only=True)
class TrainSimConfig(sft.SFTOptions):
    data: str = option(help="build-sft simulator output directory (train.parquet, val.parquet).")
    base: str = option(DEFAULT_MODEL, "Base model: HF dir, hub id, or smollm2-135m.")
    out: str = option(help="Output model directory.")


def tokens_per_doc(rows: list[dict], data_manifest: dict, base: str) -> int:
    """The generation budget per document the `sim:` engine should give this simulator: the 95th
    percentile of the training completions' token counts per document, plus a margin."""
    from zsctl.core.models import load_tokenizer

    tok = load_tokenizer(base)
    k = max(1, int(data_manifest.get("config", {}).get("docs", 1)))
    lengths = sorted(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)
    return math.ceil(lengths[int(0.95 * (len(lengths) - 1))] / k * 1.1) + 4


def as_chat(splits: list[list[dict]], template: prompts.SimTemplate, base: str) -> tuple[list[list[dict]], bool]:
    """Each split's rows with their prompt (the user turn of a chat) wrapped as the `sim:` engine wraps
    it, and whether prompts are then tokenised with special tokens (only without a chat template, as
    the engine does)."""
    from zsctl.core.models import load_tokenizer

    tok = load_tokenizer(base)
    wrap = [[{**r, "prompt": prompts.render_chat(tok, template.messages(r["prompt"]), who=f"base model {base}")}
             for r in rows] for rows in splits]
    return wrap, not getattr(tok, "chat_template", None)


def run(cfg: TrainSimConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    train, val, data_manifest = sft.load_sft_data(cfg.data, "sim_sft")
    artifacts.check_out(cfg.out, "simulator", [cfg.data, cfg.base])
    template = prompts.SimTemplate.recorded(data_manifest)  # None: data from before templates were recorded
    special = True
    if template is not None and template.system is not None:
        (train, val), special = as_chat([train, val], template, cfg.base)
    run_cfg = sft.SFTRunConfig(
        base=cfg.base, out=cfg.out, mask_env=False, prompt_special_tokens=special, **cfg.options(),
        desc="train-sim",
    )
    extra = {"base_model": cfg.base, "tokens_per_doc": tokens_per_doc(train, data_manifest, cfg.base),
             # the length its documents were cut to: the `sim:` engine ends a document there
             "doc_words": data_manifest.get("config", {}).get("doc_words")}
    if template is not None:
        extra["sim_template"] = template.as_dict()
    manifest = {"kind": "simulator", "config": asdict(cfg), "inputs": [artifacts.input_ref(cfg.data)],
                "extra": extra}
    return sft.train_sft(run_cfg, train, val, progress, manifest=manifest)
