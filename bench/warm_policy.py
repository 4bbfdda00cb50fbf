"""A warm-started policy for the benchmarks, built once and cached, so a fresh clone measures the
multi-round path (a base model never searches, so its rollouts are single-turn).

The recipe follows the demo's warm start (pipelines/demo.sh), smaller: 64 training questions
searched once with no model, answer-grounded templated demonstrations from those searches (with
`build-sft --search` multi-hop questions also get ones that search twice, so the policy searches
at least once per question on average), then a few SFT steps of the policy on them. It runs the
real `zsctl` commands into a temporary folder, renamed into place only when all of them succeeded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus" / "wiki_sample.jsonl"
SEARCH = f"bm25:{CORPUS}"


def warm_policy(model: str = "smollm2-135m", steps: int = 12, questions: int = 64, quiet: bool = False) -> str:
    """The warm-started policy's directory (cached under the zsctl cache; built on first use)."""
    from zsctl.core.models import cache_root

    dest = cache_root() / "bench" / f"warm-{model.replace('/', '_')}-q{questions}-s{steps}-multihop"
    if (dest / "policy" / "config.json").is_file():
        return str(dest / "policy")
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    q = ["--quiet"] if quiet else []
    commands = [
        ["collect", "--questions", "hotpotqa", "--policy", "none", "--search", SEARCH, "--out", f"{tmp}/searches",
         "--limit", str(questions), "--topk", "2"],
        ["build-sft", "--for", "policy", "--templated", "--trajectories", f"{tmp}/searches", "--out", f"{tmp}/sft",
         "--policy", model, "--topk", "2", "--max-doc-words", "40", "--search", SEARCH],
        ["warmup", "--data", f"{tmp}/sft", "--policy", model, "--out", f"{tmp}/policy", "--max-steps", str(steps),
         "--batch-size", "2", "--grad-accum", "2", "--max-length", "384", "--lr", "5e-4", "--val-limit", "8"],
    ]
    print(f"building a warm-started policy in {dest} (once; a few minutes on 2 cores)", file=sys.stderr)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for cmd in commands:
        subprocess.run([sys.executable, "-m", "zsctl.cli", *cmd, *q], check=True, cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL if quiet else None)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return str(dest / "policy")
