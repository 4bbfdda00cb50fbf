"""How often one more sampled candidate rescues a useful simulator reply that failed verification.

Takes a check-sim run made WITHOUT verification and the simulator it checked; for every useful
reply there that held no gold answer, draws `--candidates` replies per temperature (all of them in
one batch, as `?verify=N` does) and checks each as verification would. Prints one JSON line per
temperature: the pass rate per candidate and the share of failing queries that 1, 2, … candidates
would rescue. With pass rate p, `verify=N` can lift the useful share from u to about
u + (1 - u) * (1 - (1 - p) ** N).

    python bench/sim_retry.py --simulator runs/sim_cpu/simulator --check-sim runs/sim_cpu/check_sim_verify0
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--simulator", required=True, help="a train-sim output directory")
    ap.add_argument("--check-sim", required=True, help="a check-sim output of that simulator, verify=0")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--temperatures", default="0.8,0.5,0.3,1.0")
    ap.add_argument("--top-p", type=float, default=0.95, help="for temperatures below 1 (1.0 samples the full softmax)")
    ap.add_argument("--k", type=int, default=2)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from zsctl.core.generation import Sampling
    from zsctl.search.base import QueryContext
    from zsctl.search.simulator import SimulatorEngine

    rows = pq.read_table(os.path.join(args.check_sim, "check_sim.parquet")).to_pylist()
    failing = [r for r in rows if r["role"] == "simulator" and r["mode"] == "useful" and not r["has_answer"]]
    engine = SimulatorEngine(args.simulator)
    asks = [(r["query"], QueryContext(r["question"], list(r["golden_answers"]), "useful")) for r in failing]
    inputs = [engine.model_input(engine.render(q, c, "useful", args.k)) for q, c in asks]
    n = args.candidates
    for temp in (float(t) for t in args.temperatures.split(",")):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        replies = engine.write(inputs, args.k, Sampling(temp, args.top_p if temp < 1 else 1.0), copies=n)
        passes = [[engine._passes(text, q, c, "useful", args.k) for text in replies[j * n:(j + 1) * n]]
                  for j, (q, c) in enumerate(asks)]
        print(json.dumps({
            "temperature": temp, "failing_useful": len(asks), "candidates": n,
            "pass_rate_per_candidate": round(sum(map(sum, passes)) / (n * len(asks)), 3),
            "rescued_with": {m: round(sum(any(p[:m]) for p in passes) / len(asks), 3) for m in range(1, n + 1)},
            "seconds": round(time.perf_counter() - t0, 1), "load_1min": round(os.getloadavg()[0], 2),
        }), flush=True)


if __name__ == "__main__":
    main()
