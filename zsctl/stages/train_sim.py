"""`zsctl train-sim`: fine-tune the simulator on build-sft's prompt/completion corpus.

setup (data, output dir, base model) → SFT in zsctl/sft.py (completion-only loss, LoRA merged or
full) → HF model directory + manifest.json (last). The prompt is the raw simulator template text,
tokenised exactly as the `sim:` engine feeds it at inference; no chat template is applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zsctl import sft
from zsctl.core import artifacts
from zsctl.core.progress import Progress


@dataclass
class TrainSimConfig:
    data: str  # build-sft simulator artifact (kind sim_sft)
    base: str
    out: str
    lora: bool = True
    lora_r: int = 16
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float | None = None  # None: 2e-4 LoRA, 2e-5 full
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    val_limit: int = 32  # val rows scored before and after training
    report_to: str = "none"
    seed: int = 0


def run(cfg: TrainSimConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    train, val, _ = sft.load_sft_data(cfg.data, "sim_sft")
    sft.check_model_out(cfg.out, "simulator")
    run_cfg = sft.SFTRunConfig(
        base=cfg.base, out=cfg.out, mask_env=False, prompt_special_tokens=True, lora=cfg.lora,
        lora_r=cfg.lora_r, lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, max_length=cfg.max_length, val_limit=cfg.val_limit,
        report_to=cfg.report_to, seed=cfg.seed, desc="train-sim",
    )
    manifest = {"kind": "simulator", "config": asdict(cfg), "inputs": [artifacts.input_ref(cfg.data)],
                "extra": {"base_model": cfg.base}}
    return sft.train_sft(run_cfg, train, val, progress, manifest=manifest)
