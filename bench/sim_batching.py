"""P2: simulated documents/s with ONE batched simulator call per agent turn ÷ one call per query
(the reference implementation's pattern), side by side in one run.

Same model, same prompts (each query with its own question and gold answer), same k and the same
max_new_tokens; greedy, so both write the same documents. Repeats alternate the two to spread
machine noise; the median of each is reported.

    python bench/sim_batching.py --model smollm2-135m --queries 16 --k 3 --repeats 2
    python bench/sim_batching.py --sim-mode tuned --fixed-length --repeats 1
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
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--sim-mode", default="prompt", help="prompt (untuned model, few-shot) | tuned")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bench", default="hotpotqa")
    ap.add_argument("--fixed-length", action="store_true",
                    help="every output runs to max_new_tokens (no EOS/stop): what a trained simulator writing "
                         "k full documents costs, where the untuned model stops after a few words")
    args = ap.parse_args()

    import torch

    from zsctl.core.data import load_questions
    from zsctl.core.models import load_model
    from zsctl.search.base import QueryContext
    from zsctl.search.simulator import SimulatorEngine

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    if args.fixed_length:
        plain_generate = model.generate

        def fixed(*a, **kw):
            kw.pop("stopping_criteria", None)
            kw["min_new_tokens"] = kw["max_new_tokens"]
            return plain_generate(*a, **kw)

        model.generate = fixed
    engine = SimulatorEngine(args.model, model=model, tokenizer=tok, sim_mode=args.sim_mode,
                             max_new_tokens=args.max_new_tokens)
    qs = load_questions(args.bench, split="eval", limit=args.queries).to_pylist()
    queries = [q["question"] for q in qs]
    ctxs = [QueryContext(q["question"], q["golden_answers"], "useful" if i % 2 == 0 else "noisy")
            for i, q in enumerate(qs)]

    def batched() -> tuple[float, list]:
        t0 = time.perf_counter()
        results = engine.search(queries, args.k, ctxs)
        return time.perf_counter() - t0, results

    def per_query() -> tuple[float, list]:
        t0 = time.perf_counter()
        results = [engine.search([q], args.k, [c])[0] for q, c in zip(queries, ctxs)]
        return time.perf_counter() - t0, results

    def tokens(run) -> tuple[float, list, int]:
        before = engine.generated_tokens
        s, docs = run()
        return s, docs, engine.generated_tokens - before

    engine.search(queries[:2], args.k, ctxs[:2])  # warm-up
    times_b, times_q = [], []
    for _ in range(args.repeats):
        calls0 = engine.generate_calls
        s, docs_b, tok_b = tokens(batched)
        assert engine.generate_calls - calls0 == 1
        well_formed = sum(r.well_formed for r in docs_b)
        times_b.append(s)
        s, docs_q, tok_q = tokens(per_query)
        times_q.append(s)

    n_docs = len(queries) * args.k
    written = lambda results: sum(1 for r in results for d in r.docs if d.text.strip())  # noqa: E731
    same = sum(a.text == b.text for ra, rq in zip(docs_b, docs_q) for a, b in zip(ra.docs, rq.docs))
    b, q = statistics.median(times_b), statistics.median(times_q)
    result = {
        "model": args.model, "sim_mode": args.sim_mode, "fixed_length": args.fixed_length,
        "queries": len(queries), "k": args.k,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
        "batched_s": round(b, 2), "per_query_s": round(q, 2),
        "batched_docs_per_s": round(n_docs / b, 2), "per_query_docs_per_s": round(n_docs / q, 2),
        "speedup": round(q / b, 2),
        "generated_tokens_batched": tok_b, "generated_tokens_per_query": tok_q,
        "well_formed_outputs": f"{well_formed}/{len(queries)}",
        "nonempty_docs_batched": written(docs_b), "nonempty_docs_per_query": written(docs_q),
        "identical_docs": f"{same}/{n_docs}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
