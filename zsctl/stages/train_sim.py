"""`zsctl train-sim`: fine-tune the simulator on build-sft's prompt/completion corpus.

setup (data, output dir, base model) → SFT in zsctl/sft.py (completion-only loss, LoRA merged or
full) → HF model directory + manifest.json (last). The prompt is the raw simulator template text,
tokenised exactly as the `sim:` engine feeds it at inference; no chat template is applied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from zsctl import sft
from zsctl.core import artifacts
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


def run(cfg: TrainSimConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    train, val, data_manifest = sft.load_sft_data(cfg.data, "sim_sft")
    artifacts.check_out(cfg.out, "simulator", [cfg.data, cfg.base])
    run_cfg = sft.SFTRunConfig(
        base=cfg.base, out=cfg.out, mask_env=False, prompt_special_tokens=True, **cfg.options(),
        desc="train-sim",
    )
    manifest = {"kind": "simulator", "config": asdict(cfg), "inputs": [artifacts.input_ref(cfg.data)],
                "extra": {"base_model": cfg.base, "tokens_per_doc": tokens_per_doc(train, data_manifest, cfg.base)}}
    return sft.train_sft(run_cfg, train, val, progress, manifest=manifest)
