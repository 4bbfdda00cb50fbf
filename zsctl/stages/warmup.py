"""`zsctl warmup`: warm-start a policy by SFT on real-search demonstrations (build-sft --for policy).

Same SFT code as train-sim (zsctl/sft.py), with one difference that matters: the environment's
`<information>` blocks (and the agent's fixed notes) inside each completion are attended to but
never trained on — only the policy's own tokens carry loss, the rule RL uses. The prompt is the
chat-formatted policy prompt, tokenised as the agent loop does (no extra special tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zsctl import sft
from zsctl.core import artifacts
from zsctl.core.progress import Progress


@dataclass
class WarmupConfig:
    data: str  # build-sft policy artifact (kind policy_sft)
    policy: str
    out: str
    lora: bool = True
    lora_r: int = 16
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float | None = None  # None: 2e-4 LoRA, 2e-5 full
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    val_limit: int = 32
    report_to: str = "none"
    seed: int = 0


def run(cfg: WarmupConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    train, val, _ = sft.load_sft_data(cfg.data, "policy_sft")
    sft.check_model_out(cfg.out, "policy")
    run_cfg = sft.SFTRunConfig(
        base=cfg.policy, out=cfg.out, mask_env=True, prompt_special_tokens=False, lora=cfg.lora,
        lora_r=cfg.lora_r, lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, max_length=cfg.max_length, val_limit=cfg.val_limit,
        report_to=cfg.report_to, seed=cfg.seed, desc="warmup",
    )
    manifest = {"kind": "policy", "config": asdict(cfg), "inputs": [artifacts.input_ref(cfg.data)],
                "extra": {"base_model": cfg.policy, "stage": "warmup"}}
    return sft.train_sft(run_cfg, train, val, progress, manifest=manifest)
