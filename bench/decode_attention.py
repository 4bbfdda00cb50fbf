"""Decode steps on a CPU: zsctl's plain-matmul attention (`models.fast_decode`, what load_model
sets up) against SDPA, side by side in one process.

1. One decode step (one new token per row, a filled KV cache), for batch sizes and cache lengths,
   with every row the same length (HF then gives SDPA no mask) and with one row left-padded.
2. Agent rollouts (the warm-started policy, real BM25, greedy), the implementations alternating:
   decode seconds per policy token. Their texts may differ in bf16 (the two sum in another order).

Prints one JSON object; "ratio" = rollout decode time per token, zsctl's ÷ SDPA's (below 1: faster).

    python bench/decode_attention.py                # the cached warm policy, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=None, help="policy; default: the cached warm-started smollm2-135m")
    ap.add_argument("--search", default=f"bm25:{ROOT / 'data' / 'corpus' / 'wiki_sample.jsonl'}")
    ap.add_argument("--bench", default="hotpotqa")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (rollouts run on one)")
    args = ap.parse_args()

    from zsctl.core.models import DECODE_ATTENTION, load_model, set_threads

    set_threads(args.threads)
    import torch
    from transformers import DynamicCache

    from zsctl.agent import AgentConfig, AgentLoop
    from zsctl.core.data import load_questions
    from zsctl.search import make_engine

    if args.policy is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from warm_policy import warm_policy

        args.policy = warm_policy()
    model, tok = load_model(args.policy)
    if model.config._attn_implementation != DECODE_ATTENTION:
        sys.exit(f"decode_attention: {args.policy} does not use {DECODE_ATTENTION} here (a GPU, or not SDPA)")
    impls = ("sdpa", DECODE_ATTENTION)

    def step_ms(impl: str, batch: int, length: int, padded: bool) -> float:
        model.config._attn_implementation = impl
        torch.manual_seed(0)
        ids = torch.randint(100, 1000, (batch, length))
        mask = torch.ones_like(ids)
        if padded:
            mask[0, : length // 4] = 0
        cache, times = DynamicCache(config=model.config), []
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1:]
            for _ in range(12):
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
                t0 = time.perf_counter()
                out = model(input_ids=nxt.argmax(-1), attention_mask=mask, past_key_values=cache, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
                nxt = out.logits[:, -1:]
        return round(1000 * statistics.median(times), 1)

    steps = []
    for batch in (1, 8, 16):
        for length in (300, 600):
            for padded in ((False, True) if batch > 1 else (False,)):
                row = {"batch": batch, "cached": length, "padded_row": padded}
                row.update({f"{impl}_ms": step_ms(impl, batch, length, padded) for impl in impls})
                steps.append(row)
                print(json.dumps(row), file=sys.stderr)

    questions = load_questions(args.bench, split="eval", limit=args.batch).column("question").to_pylist()
    engine = make_engine(args.search)
    cfg = AgentConfig(max_turns=3, max_new_tokens=48, topk=2, max_doc_words=30)
    prompt_ids = AgentLoop(model, tok, engine, cfg).encode_prompts(questions)
    per_token: dict[str, list[float]] = {impl: [] for impl in impls}
    tokens = {}
    loads = [round(os.getloadavg()[0], 2)]
    for rep in range(args.repeats + 1):  # the first round warms up
        for impl in impls:
            model.config._attn_implementation = impl
            loop = AgentLoop(model, tok, engine, cfg)
            loop.run(prompt_ids)
            if rep:
                per_token[impl].append(1000 * loop.seconds["decode"] / loop.generated_tokens)
                tokens[impl] = loop.generated_tokens
        loads.append(round(os.getloadavg()[0], 2))
    model.config._attn_implementation = DECODE_ATTENTION
    med = {impl: statistics.median(v) for impl, v in per_token.items()}
    print(json.dumps({
        "model": args.policy, "threads": torch.get_num_threads(), "dtype": str(model.dtype), "load_1min": loads,
        "decode_steps": steps,
        "rollout_decode_ms_per_token": {impl: [round(x, 2) for x in v] for impl, v in per_token.items()},
        "rollout_policy_tokens": tokens,
        "ratio": round(med[DECODE_ATTENTION] / med["sdpa"], 3),
    }))


if __name__ == "__main__":
    main()
