"""P1: agent-loop generated tokens/s ÷ plain batched `generate` tokens/s, side by side in one run.

Same model, same prompts, same batch size, same max_new_tokens, greedy: the agent loop runs one
round with the `none` engine (what it adds: stop strings, token bookkeeping, cutting padding), and
plain `generate` runs without stop strings; both count each row's tokens up to its first EOS, so
with identical greedy outputs the ratio is the loop's overhead. A multi-round figure (searches
answered by a real BM25 engine, earlier turns re-prefilled each round) is printed too. Repeats
alternate the two to spread machine noise.

    python bench/agent_speed.py --model smollm2-135m --batch 8 --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bench", default="hotpotqa")
    args = ap.parse_args()

    import torch

    from zsctl.agent import AgentConfig, AgentLoop
    from zsctl.core.data import load_questions
    from zsctl.core.models import load_model
    from zsctl.search.base import NoSearch

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    questions = load_questions(args.bench, split="eval", limit=args.batch).column("question").to_pylist()
    loop = AgentLoop(model, tok, NoSearch(), AgentConfig(max_turns=0, max_new_tokens=args.tokens))
    prompt_ids = loop.encode_prompts(questions)

    def agent_round() -> tuple[int, float]:
        loop.generated_tokens = 0
        t0 = time.perf_counter()
        loop.run(prompt_ids)
        return loop.generated_tokens, time.perf_counter() - t0

    eos = tok.eos_token_id

    def plain() -> tuple[int, float]:
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id)
        att = torch.zeros_like(ids)
        for r, p in enumerate(prompt_ids):
            ids[r, width - len(p):] = torch.tensor(p)
            att[r, width - len(p):] = 1
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        seconds = time.perf_counter() - t0
        n = 0
        for row in out[:, width:].tolist():
            n += row.index(eos) + 1 if eos in row else len(row)
        return n, seconds

    agent_rates, plain_rates = [], []
    agent_round()  # warm-up
    for _ in range(args.repeats):
        n, s = agent_round()
        agent_rates.append(n / s)
        n2, s2 = plain()
        plain_rates.append(n2 / s2)

    from zsctl.search import make_engine

    multi = AgentLoop(model, tok, make_engine("bm25:data/corpus/wiki_sample.jsonl"),
                      AgentConfig(max_turns=2, max_new_tokens=args.tokens))
    t0 = time.perf_counter()
    multi.run(prompt_ids)
    multi_rate = multi.generated_tokens / (time.perf_counter() - t0)

    a, p = statistics.median(agent_rates), statistics.median(plain_rates)
    result = {
        "model": args.model, "batch": args.batch, "max_new_tokens": args.tokens, "repeats": args.repeats,
        "agent_tok_s": round(a, 1), "plain_generate_tok_s": round(p, 1), "ratio_P1": round(a / p, 3),
        "agent_tokens_per_round": n, "plain_tokens": n2,
        "agent_multi_round_tok_s": round(multi_rate, 1), "multi_round_generate_calls": multi.generate_calls,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
