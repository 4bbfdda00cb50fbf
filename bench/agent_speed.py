"""P1: the agent loop's policy tokens/s ÷ one plain batched `generate`'s tokens/s, side by side.

Same model, prompts and batch size, greedy. The agent loop runs multi-round rollouts against the
real BM25 engine with a policy that searches: a warm-started one, built and cached on first use
when --policy is not given (bench/warm_policy.py). Searches, inserted documents and every round
are in its time. Plain `generate` then writes, for the same prompts in one call, exactly as many
tokens per row as the loop's trajectories hold policy tokens on average (min = max new tokens: no
row stops early, no step is wasted): the single-turn ideal. P1 = loop ÷ ideal (target >= 0.9).
`ratio_same_length` compares with a plain `generate` as long as the longest trajectory's policy
tokens instead (a batch needs one pass per token of its longest row, whatever the scheduler), credited
with the same tokens: what remains is the price of the inserted documents and the searches.
Repeats alternate the two to spread machine noise; the load average is recorded with each.

Also reported: decode steps per policy token (rows x forward passes that sampled ÷ tokens kept;
the static-batched decoder spent about 1.9) and the same rollouts through that static decoder
(tests/test_rollout_engine.py keeps it as the reference), for a before/after in the same run.

    python bench/agent_speed.py                  # warm policy, batch 16, 3 repeats
    python bench/agent_speed.py --threads-sweep  # 1 or 2 threads, spinning, sleeping or between, quiet or not
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", "--model", dest="policy", default=None,
                    help="policy; default: the cached warm-started smollm2-135m")
    ap.add_argument("--search", default=f"bm25:{ROOT / 'data' / 'corpus' / 'wiki_sample.jsonl'}")
    ap.add_argument("--bench", default="hotpotqa")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens per round")
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: zsctl's)")
    ap.add_argument("--no-static", action="store_true", help="skip the static-batched decoder")
    ap.add_argument("--agent-only", action="store_true", help="time only the agent loop (what the sweep runs)")
    ap.add_argument("--threads-sweep", action="store_true",
                    help="only the agent loop at 1 and 2 threads, OpenMP threads spinning, sleeping or between, "
                         "quiet and beside a CPU-bound process (each setting in a fresh process)")
    args = ap.parse_args()
    if args.threads_sweep:
        sweep(args)
        return

    from zsctl.core.models import load_model, set_threads

    set_threads(args.threads)  # before torch loads: the OpenMP wait policy is read then
    import torch

    from zsctl.agent import AgentConfig, AgentLoop
    from zsctl.core.data import load_questions
    from zsctl.search import make_engine

    if args.policy is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from warm_policy import warm_policy

        args.policy = warm_policy()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    model, tok = load_model(args.policy)
    questions = load_questions(args.bench, split="eval", limit=args.batch).column("question").to_pylist()
    engine = make_engine(args.search)
    cfg = AgentConfig(max_turns=args.max_turns, max_new_tokens=args.tokens, topk=args.topk)
    probe = AgentLoop(model, tok, engine, cfg)
    prompt_ids = probe.encode_prompts(questions)

    def agent(backend=None):
        loop = AgentLoop(model, tok, engine, cfg)
        loop.generate_fn = backend
        t0 = time.perf_counter()
        trajs = loop.run(prompt_ids)
        return loop, trajs, time.perf_counter() - t0

    if args.agent_only:
        agent()  # warm-up
        loads, rates = [load()], []
        for _ in range(args.repeats):
            loop, _, s = agent()
            rates.append(loop.generated_tokens / s)
            loads.append(load())
        print(json.dumps({"threads": threads, "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                          "spincount": os.environ.get("GOMP_SPINCOUNT"),  # when set, libgomp spins this long
                          "agent_tok_s": [round(r, 1) for r in rates], "load_1min": loads}))
        return

    def plain(n_tokens: int) -> float:
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id)
        att = torch.zeros_like(ids)
        for r, p in enumerate(prompt_ids):
            ids[r, width - len(p):] = torch.tensor(p)
            att[r, width - len(p):] = 1
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids.to(model.device), attention_mask=att.to(model.device),
                           min_new_tokens=n_tokens, max_new_tokens=n_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        return time.perf_counter() - t0

    loop, trajs, _ = agent()  # warm-up, and the length the ideal single turn must match
    policy_tokens = loop.generated_tokens
    per_row = max(1, round(policy_tokens / len(trajs)))
    # A batch decoder makes at least one pass per token of its longest row: a plain `generate` run
    # that long, credited only with the tokens the trajectories hold, is the single-turn batch of
    # the same lengths (what is left between it and the loop: inserted documents and searches).
    longest = max(sum(t.env_mask) for t in trajs)
    agent_rates, plain_rates, same_rates, loads = [], [], [], []
    for _ in range(args.repeats):
        loads.append(load())
        loop, trajs, s = agent()
        agent_rates.append(loop.generated_tokens / s)
        plain_rates.append(per_row * len(prompt_ids) / plain(per_row))
        same_rates.append(policy_tokens / plain(longest))
    a, p = statistics.median(agent_rates), statistics.median(plain_rates)
    inserted = sum(len(t.response_ids) - sum(t.env_mask) for t in trajs)
    result = {
        "model": args.policy, "batch": args.batch, "max_turns": args.max_turns, "max_new_tokens": args.tokens,
        "threads": threads, "cpus": os.cpu_count(), "load_1min": loads + [load()],
        "searches_per_traj": round(sum(t.num_searches for t in trajs) / len(trajs), 3),
        "policy_tokens_per_traj": round(loop.generated_tokens / len(trajs), 1),
        "inserted_tokens_per_traj": round(inserted / len(trajs), 1),
        "rounds": loop.generate_calls, "prefill_tokens": loop.prefill_tokens,
        "decode_steps_per_policy_token": round(loop.decode_steps / loop.generated_tokens, 3),
        # batched forward passes: the loop's (every round runs as long as its longest turn) vs plain's
        "forward_passes": loop.forward_passes, "plain_forward_passes": per_row,
        "longest_traj_policy_tokens": longest,
        # where the last agent run's time went: building caches and feeding inserted tokens, decoding, searching
        "agent_seconds": {k: round(v, 2) for k, v in loop.seconds.items()},
        "agent_tok_s": [round(x, 1) for x in agent_rates], "plain_tok_s": [round(x, 1) for x in plain_rates],
        "ratio": round(a / p, 3),
        "same_length_tok_s": [round(x, 1) for x in same_rates],
        "ratio_same_length": round(a / statistics.median(same_rates), 3),
    }
    if not args.no_static:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_rollout_engine import static_generate

        calls: list[int] = []
        backend = static_generate(model, tok, probe.stop_strings, cfg.max_new_tokens, probe.eos_ids, calls)
        loads_static = [load()]
        old, old_trajs, s_old = agent(backend)
        same = all(x.response_ids == y.response_ids for x, y in zip(old_trajs, trajs))
        result.update(
            static_tok_s=round(old.generated_tokens / s_old, 1), static_load_1min=loads_static,
            static_decode_steps_per_policy_token=round(old.decode_steps / old.generated_tokens, 3),
            static_same_tokens=same, speedup_vs_static=round(a / (old.generated_tokens / s_old), 3),
        )
    print(json.dumps(result))


# OpenMP's idle threads: spinning (libgomp's ACTIVE), sleeping at once (zsctl's default for a fixed
# thread count), or spinning a short while first (what --threads auto sets)
WAIT_SETTINGS = {
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "sleep": {"OMP_WAIT_POLICY": "PASSIVE"},
    "short_spin": {"GOMP_SPINCOUNT": "10000"},
}


def sweep(args) -> None:
    """The agent loop at 1 and 2 threads for each of WAIT_SETTINGS, quiet and then beside a
    CPU-bound process; a fresh process per setting, since the wait policy is read once, when torch
    loads."""
    rows = []
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for competing in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competing else None
        try:
            for wait, env in WAIT_SETTINGS.items():
                for n in (1, 2):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--agent-only",
                        "--threads",
                        str(n),
                        "--repeats",
                        str(args.repeats),
                        "--batch",
                        str(args.batch),
                        "--max-turns",
                        str(args.max_turns),
                        "--tokens",
                        str(args.tokens),
                    ]
                    if args.policy:
                        cmd += ["--policy", args.policy]
                    out = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, check=True).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    rows.append({**row, "wait": wait, "competing_process": competing})
                    print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    print(json.dumps({"cpus": os.cpu_count(), "sweep": rows}))


if __name__ == "__main__":
    main()
