"""P5: one zsctl multi-turn RL step ÷ one plain TRL single-turn GRPO step, same model, batch and tokens.

Both run TRL's GRPOTrainer with the same GRPOConfig (LoRA, batch, group size, algorithm). The zsctl
step rolls out with our multi-turn `rollout_func` (policy turns, searches answered by `--search`,
<information> tokens inserted with env mask 0); the TRL step lets TRL generate one turn itself with
`min_new_tokens = max_new_tokens = L`, where L is the zsctl run's mean number of policy tokens per
completion, so both steps generate the same number of tokens from the same prompts. The ratio is
the cost of multi-turn rollouts: extra generate calls per round, the engine, and the longer
training sequences (inserted documents are attended to in the loss forward pass).

Use a policy that searches (a warm-started one), or the multi-turn path degenerates to one turn:

    python bench/rl_step.py --policy runs/demo/warmup --search bm25:runs/demo/index --steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

    return StepTimer()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="runs/demo/warmup")
    ap.add_argument("--search", default="bm25:data/corpus/wiki_sample.jsonl")
    ap.add_argument("--train", default="hotpotqa")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per variant (one warm-up step more)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--topk", type=int, default=2)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from zsctl.core import prompts
    from zsctl.core.models import load_model, lora_config
    from zsctl.core.progress import Progress
    from zsctl.core.rewards import REWARDS
    from zsctl.stages import rl

    torch.manual_seed(0)
    steps = args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = rl.RLConfig(
            policy=args.policy, search=args.search, train=args.train, out=f"{tmp}/zsctl", steps=steps,
            batch_size=args.batch_size, group_size=args.group_size, max_turns=args.max_turns,
            max_new_tokens=args.max_new_tokens, topk=args.topk, lr=1e-5, reward="f1+format",
        )
        trainer, _, recorder, _ = rl.build_trainer(cfg, Progress(quiet=True))
        z_timer = step_timer()
        trainer.add_callback(z_timer)
        trainer.train()
        rows = [pq.read_table(f).to_pylist()[0] for f in sorted(recorder.metrics_dir.glob("step-*.parquet"))]
        model_tokens = [r["generated_tokens"] for r in rows]
        searches = [r["searches_per_traj"] for r in rows]
        per_completion = max(1, round(statistics.mean(model_tokens[1:] or model_tokens) / args.batch_size))

        # The same trainer settings; TRL generates one turn of exactly `per_completion` tokens itself.
        model, tok = load_model(args.policy)
        questions = rl.load_train_questions(args.train, None)
        dataset = Dataset.from_list([
            {"prompt": prompts.render_policy_prompt(tok, q["question"]), "golden_answers": q["golden_answers"]}
            for q in questions
        ])
        base_args = dataclasses.replace(
            trainer.args, output_dir=f"{tmp}/trl", generation_batch_size=None,  # recomputed from the batch
            generation_kwargs={"min_new_tokens": per_completion, "max_new_tokens": per_completion},
            max_completion_length=per_completion,
        )
        baseline = GRPOTrainer(
            model=model, reward_funcs=REWARDS[cfg.reward], args=base_args, train_dataset=dataset,
            processing_class=tok, peft_config=lora_config(cfg.lora_r),
        )
        t_timer = step_timer()
        baseline.add_callback(t_timer)
        baseline.train()

    z = statistics.median(z_timer.seconds[1:])
    t = statistics.median(t_timer.seconds[1:])
    result = {
        "policy": args.policy, "search": args.search, "batch_size": args.batch_size, "group_size": args.group_size,
        "measured_steps": args.steps, "policy_tokens_per_step": model_tokens[1:],
        "trl_tokens_per_step": per_completion * args.batch_size, "searches_per_traj": searches[1:],
        "zsctl_step_s": [round(s, 2) for s in z_timer.seconds[1:]],
        "trl_step_s": [round(s, 2) for s in t_timer.seconds[1:]],
        "zsctl_median_s": round(z, 2), "trl_median_s": round(t, 2), "ratio": round(z / t, 3),
    }
    print(json.dumps(result, indent=1))
    print(f"P5: zsctl multi-turn step {z:.2f} s / TRL single-turn step {t:.2f} s = {z / t:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
