"""Training tokens/s of the shared SFT code (zsctl/sft.py): train-sim-style and warmup-style rows.

Rows are built from the bundled corpus to about --row-tokens tokens each (simulator: the raw
simulator prompt + K documents; warmup: the chat-formatted policy prompt + a think/search turn, an
<information> block, and the answer). Each style runs --warm untimed steps then --steps timed ones
through `sft.make_trainer` (the exact trainer train-sim and warmup use). Tokens are non-padding
input tokens; "trained" tokens are the ones that carry loss.

    python bench/sft_speed.py --model smollm2-135m --batch 8 --steps 3 --warm 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def passages(n: int, words: int) -> list[dict]:
    out = []
    with open(ROOT / "data" / "corpus" / "wiki_sample.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if len(r["text"].split()) >= words:
                out.append({"title": r["title"], "text": " ".join(r["text"].split()[:words])})
            if len(out) >= n:
                break
    return out


def sim_rows(n: int, words: int, k: int = 5) -> list[dict]:
    from zsctl.core import prompts

    docs = passages(n + k, words)
    return [{"prompt": prompts.render_simulator_prompt(d["title"], f"What is {d['title']} known for?", d["title"],
                                                      "useful" if i % 2 else "noisy", k),
             "completion": prompts.format_documents(docs[i : i + k])} for i, d in enumerate(docs[:n])]


def policy_rows(tok, n: int, words: int, k: int = 3) -> list[dict]:
    from zsctl.core import prompts

    docs = passages(n + k, words)
    rows = []
    for i, d in enumerate(docs[:n]):
        completion = (f"<think> I need to find {d['title']}. </think>\n<search> {d['title']} </search>"
                      + prompts.information_block(docs[i : i + k])
                      + f"<think> Doc 1 is about it. </think>\n<answer> {d['title']} </answer>")
        rows.append({"prompt": prompts.render_policy_prompt(tok, f"What is {d['title']} known for?"),
                     "completion": completion})
    return rows


def fit_words(make, tok, target: int) -> tuple[list[dict], float]:
    """Pick the document length (words) whose rows come closest to `target` tokens on average."""
    best = None
    for words in range(10, 120, 5):
        rows = make(words)
        if len(rows) < len(make(10)):  # too few passages that long
            break
        mean = statistics.mean(len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows)
        if best is None or abs(mean - target) < abs(best[1] - target):
            best = (rows, mean)
    return best


def measure(style: str, rows: list[dict], args) -> dict:
    from transformers import TrainerCallback

    from zsctl import sft

    cfg = sft.SFTRunConfig(base=args.model, out="/tmp/zsctl-sft-bench/unused", mask_env=style == "warmup",
                           prompt_special_tokens=style != "warmup", max_steps=args.warm + args.steps,
                           batch_size=args.batch, max_length=1024, seed=0, desc=style)
    trainer, info = sft.make_trainer(cfg, rows, [], trainer_dir="/tmp/zsctl-sft-bench/trainer")
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, c, **kw):
            if not marks:
                marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def on_step_end(self, a, state, c, **kw):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    trainer.add_callback(Clock())
    trainer.train()
    (t0, n0), (t1, n1) = marks[args.warm], marks[-1]
    step_s = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    stats = info["train"]
    return {
        "style": style, "batch": args.batch, "timed_steps": args.steps,
        "tokens_per_row": round(stats["tokens"] / stats["rows"], 1),
        "trained_token_share": round(stats["trained_tokens"] / stats["tokens"], 3),
        "tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
        "trained_tokens_per_s": round((n1 - n0) / (t1 - t0) * stats["trained_tokens"] / stats["tokens"], 1),
        "s_per_step": [round(s, 2) for s in step_s],
        "loss_last": info["losses"][-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per style")
    ap.add_argument("--warm", type=int, default=1, help="untimed first steps")
    ap.add_argument("--row-tokens", type=int, default=350)
    ap.add_argument("--styles", default="train-sim,warmup")
    args = ap.parse_args()

    import torch

    from zsctl.core.models import load_tokenizer

    tok = load_tokenizer(args.model)
    n = args.batch * (args.warm + args.steps)
    load = os.getloadavg()
    print(json.dumps({"model": args.model, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "loadavg_before": [round(x, 2) for x in load]}), flush=True)
    for style in args.styles.split(","):
        if style == "train-sim":
            rows, mean = fit_words(lambda w: sim_rows(n, w), tok, args.row_tokens)
        else:
            rows, mean = fit_words(lambda w: policy_rows(tok, n, w), tok, args.row_tokens)
        result = measure(style, rows, args)
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
