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
from zsctl.core.config import DEFAULT_MODEL, option
from zsctl.core.progress import Progress


@dataclass(kw_only=True)
class WarmupConfig(sft.SFTOptions):
    data: str = option(help="build-sft --for policy output directory (train.parquet, val.parquet).")
    policy: str = option(DEFAULT_MODEL, "Policy model: HF dir, hub id, or smollm2-135m.")
    out: str = option(help="Output model directory.")


def run(cfg: WarmupConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    train, val, data_manifest = sft.load_sft_data(cfg.data, "policy_sft")
    artifacts.check_out(cfg.out, "policy", [cfg.data, cfg.policy])
    run_cfg = sft.SFTRunConfig(
        base=cfg.policy, out=cfg.out, mask_env=True, prompt_special_tokens=False, **cfg.options(),
        desc="warmup",
    )
    manifest = {"kind": "policy", "config": asdict(cfg), "inputs": [artifacts.input_ref(cfg.data)],
                # the documents' length in the demonstrations: eval and rl default to it
                "extra": {"base_model": cfg.policy, "stage": "warmup",
                          "doc_words": data_manifest.get("config", {}).get("doc_words")}}
    return sft.train_sft(run_cfg, train, val, progress, manifest=manifest)
