"""P5: one zsctl multi-turn RL step ÷ one plain TRL single-turn GRPO step, same model, batch and settings.

All three variants run TRL's GRPOTrainer with the same GRPOConfig (LoRA, batch, group size,
algorithm, temperature). The zsctl step rolls out with our multi-turn `rollout_func` (policy turns,
searches answered by `--search`, <information> tokens inserted with env mask 0). The TRL steps let
TRL generate one turn itself with `min_new_tokens = max_new_tokens = L`:

- P5 ("ratio"): L = zsctl's mean policy tokens per completion: the same tokens generated, so
  the ratio holds everything multi-turn adds, including training on the inserted documents;
- P5-len ("ratio_same_length"): L = zsctl's mean completion length (policy + inserted tokens):
  a single-turn step of the same length, so the ratio is what multi-turn costs beyond the longer
  sequences (target <= 1.0).

The rollouts alone are timed too ("rollout_ratio", "rollout_ratio_same_length": zsctl's
rollout_func ÷ TRL's `generate` calls in the same steps): the part the agent loop decides. The
rest of a step is TRL's loss, which pads every completion of a batch to the longest one; the
TRL variants' completions all have length L, zsctl's vary.

With no --policy a warm-started policy is built and cached on first use (bench/warm_policy.py),
so the multi-round path is what gets measured. The load average is recorded with each variant.

    python bench/rl_step.py
    python bench/rl_step.py --policy runs/demo/warmup --search bm25:runs/demo/index --steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.loads: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)
            self.loads.append(round(os.getloadavg()[0], 2))

    return StepTimer()


def _time_generate(model) -> list[float]:
    """Seconds of each `generate` call TRL makes on `model` (its rollouts), appended as they happen."""
    seconds: list[float] = []
    inner = model.generate

    def timed(*args, **kw):
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        seconds.append(time.perf_counter() - t0)
        return out

    model.generate = timed
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=None, help="policy; default: the cached warm-started smollm2-135m")
    ap.add_argument("--search", default=f"bm25:{ROOT / 'data' / 'corpus' / 'wiki_sample.jsonl'}")
    ap.add_argument("--train", default="hotpotqa")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant (one warm-up step more)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: zsctl's)")
    args = ap.parse_args()

    from zsctl.core.models import set_threads

    set_threads(args.threads)  # before torch loads: the OpenMP wait policy is read then
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from zsctl.core import prompts
    from zsctl.core.models import load_model, lora_config, score_labelled_positions_only
    from zsctl.core.progress import Progress
    from zsctl.core.rewards import REWARDS
    from zsctl.stages import rl

    if args.policy is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from warm_policy import warm_policy

        args.policy = warm_policy()
    score_labelled_positions_only()  # as rl does: every variant's loss projects completion positions only
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    steps = args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = rl.RLConfig(
            policy=args.policy, search=args.search, train=args.train, out=f"{tmp}/zsctl", steps=steps,
            batch_size=args.batch_size, group_size=args.group_size, max_turns=args.max_turns,
            max_new_tokens=args.max_new_tokens, topk=args.topk, lr=1e-5, reward="f1+format",
        )
        trainer, _, _, _ = rl.build_trainer(cfg, Progress(quiet=True))
        rollouts: list[dict] = []
        inner = trainer.rollout_func

        def counted(batch_prompts, tr):
            t0 = time.perf_counter()
            out = inner(batch_prompts, tr)
            rollouts.append({
                "seconds": time.perf_counter() - t0,
                "policy": [sum(m) for m in out["env_mask"]],
                "length": [len(c) for c in out["completion_ids"]],
                "searches": out["num_searches"],
            })
            return out

        trainer.rollout_func = counted
        z_timer = step_timer()
        trainer.add_callback(z_timer)
        trainer.train()
        measured = rollouts[1:] or rollouts  # the warm-up step's rollouts are left out, like its time
        policy_len = max(1, round(statistics.mean(x for r in measured for x in r["policy"])))
        full_len = max(1, round(statistics.mean(x for r in measured for x in r["length"])))
        searches = statistics.mean(x for r in measured for x in r["searches"])
        z_args = trainer.args
        z_dtype = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")  # float32 under bf16 autocast
        del trainer

        # The same trainer settings; TRL generates one turn of exactly `length` tokens itself.
        results = {}
        for name, length in (("trl", policy_len), ("trl_same_length", full_len)):
            # fresh (a trainer wraps its model in LoRA layers), in the weights' dtype zsctl's trainer had
            model, tok = load_model(args.policy, dtype=z_dtype)
            dataset = Dataset.from_list([
                {"prompt": prompts.render_policy_prompt(tok, q["question"]), "golden_answers": q["golden_answers"]}
                for q in rl.load_train_questions(args.train, None)
            ])
            targs = dataclasses.replace(
                z_args, output_dir=f"{tmp}/{name}", generation_batch_size=None,  # recomputed from the batch
                generation_kwargs={"min_new_tokens": length, "max_new_tokens": length},
                max_completion_length=length,
            )
            baseline = GRPOTrainer(
                model=model, reward_funcs=REWARDS[cfg.reward], args=targs, train_dataset=dataset,
                processing_class=tok, peft_config=lora_config(cfg.lora_r),
            )
            results[name] = step_timer()
            baseline.add_callback(results[name])
            results[name].generate_s = _time_generate(baseline.model)
            baseline.train()
            del baseline, model

    z = statistics.median(z_timer.seconds[1:])
    t = statistics.median(results["trl"].seconds[1:])
    t_len = statistics.median(results["trl_same_length"].seconds[1:])
    result = {
        "policy": args.policy,
        "search": args.search,
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "threads": threads,
        "cpus": os.cpu_count(),
        "measured_steps": args.steps,
        "searches_per_traj": round(searches, 3),
        "policy_tokens_per_completion": policy_len,
        "completion_tokens_per_completion": full_len,
        "zsctl_step_s": [round(s, 2) for s in z_timer.seconds[1:]],
        "zsctl_load_1min": z_timer.loads[1:],
        "trl_step_s": [round(s, 2) for s in results["trl"].seconds[1:]],
        "trl_load_1min": results["trl"].loads[1:],
        "trl_same_length_step_s": [round(s, 2) for s in results["trl_same_length"].seconds[1:]],
        "trl_same_length_load_1min": results["trl_same_length"].loads[1:],
        "ratio": round(z / t, 3),
        "ratio_same_length": round(z / t_len, 3),
        # the rollout alone (what the agent loop does) against TRL's own generate, same steps
        "zsctl_rollout_s": [round(r["seconds"], 2) for r in measured],
        "trl_generate_s": [round(x, 2) for x in results["trl"].generate_s[1:]],
        "trl_same_length_generate_s": [round(x, 2) for x in results["trl_same_length"].generate_s[1:]],
        "rollout_ratio": round(
            statistics.median(r["seconds"] for r in measured)
            / statistics.median(results["trl"].generate_s[1:] or [float("nan")]),
            3,
        ),
        "rollout_ratio_same_length": round(
            statistics.median(r["seconds"] for r in measured)
            / statistics.median(results["trl_same_length"].generate_s[1:] or [float("nan")]),
            3,
        ),
    }
    print(
        f"P5: zsctl multi-turn step {z:.2f} s / TRL single-turn step of {policy_len} tokens {t:.2f} s = {z / t:.2f}x; "
        f"P5-len: / TRL step of {full_len} tokens {t_len:.2f} s = {z / t_len:.2f}x (target <= 1.0)",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
