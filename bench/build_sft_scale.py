"""P3: `zsctl build-sft` on 1,000,000 synthetic logged search calls — wall time and peak RSS.

Generates a trajectories artifact in a temp dir (2 search calls per trajectory, 3 real Wikipedia
passages from data/corpus per call, cut to 80 words as the agent loop cuts them; about 1 call in 10
repeats an earlier (query, documents) pair so dedupe has work), then runs build-sft as a child
process and reports its wall time and peak RSS (getrusage of the child). Targets: < 60 s, < 2 GB.

    python bench/build_sft_scale.py --calls 1000000 [--label outcome] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def passages(limit: int = 10_000) -> list[dict]:
    out = []
    with open(ROOT / "data" / "corpus" / "wiki_sample.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out.append({"title": r["title"], "text": " ".join(r["text"].split()[:80]), "score": 0.0})
            if len(out) >= limit:
                break
    return out


def generate(dest: Path, calls: int, seed: int = 0, per_traj: int = 2, chunk: int = 20_000) -> int:
    """Write a trajectories artifact with `calls` search calls; returns the trajectory count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zsctl.core import artifacts
    from zsctl.core.schemas import TRAJECTORIES

    rng = random.Random(seed)
    pool = passages()
    dest.mkdir(parents=True, exist_ok=True)
    n_traj = (calls + per_traj - 1) // per_traj
    last = None
    made = 0
    with pq.ParquetWriter(dest / "trajectories.parquet", TRAJECTORIES) as w:
        rows = []
        for i in range(n_traj):
            gold = rng.choice(pool)["title"]
            searches = []
            for j in range(min(per_traj, calls - made)):
                if last is not None and rng.random() < 0.1:
                    searches.append(last)  # a repeated (query, documents) pair
                else:
                    docs = rng.sample(pool, 3)
                    for rank, d in enumerate(docs):
                        d = dict(d, score=round(10.0 - rank - rng.random(), 3))
                        docs[rank] = d
                    last = {"query": f"{docs[0]['title']} {rng.randrange(10**9)}", "documents": docs}
                    searches.append(last)
                made += 1
            em = float(rng.random() < 0.3)
            rows.append({
                "traj_id": f"q{i}#0", "question_id": f"q{i}", "data_source": "synthetic",
                "question": f"Synthetic question {i} about {gold}?", "golden_answers": [gold],
                "model": "synthetic", "engine": "synthetic", "searches": searches,
                "response": "<answer> x </answer>", "prediction": gold if em else "x",
                "em": em, "f1": em, "num_searches": len(searches),
            })
            if len(rows) >= chunk:
                w.write_table(pa.Table.from_pylist(rows, schema=TRAJECTORIES))
                rows = []
        if rows:
            w.write_table(pa.Table.from_pylist(rows, schema=TRAJECTORIES))
    artifacts.write_manifest(dest, "trajectories", config={"synthetic_calls": calls, "seed": seed})
    return n_traj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--label", default="outcome")
    ap.add_argument("--keep", default=None, help="Work in this dir (kept) instead of a temp dir.")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zsctl-p3-"))
    traj = work / "trajectories"
    t0 = time.perf_counter()
    n_traj = generate(traj, args.calls)
    gen_s = time.perf_counter() - t0
    size_mb = (traj / "trajectories.parquet").stat().st_size / 2**20
    print(
        f"generated {args.calls} calls in {n_traj} trajectories ({size_mb:.0f} MB parquet) in {gen_s:.1f} s", flush=True
    )

    cmd = [sys.executable, "-m", "zsctl", "build-sft", "--trajectories", str(traj), "--out", str(work / "sft"),
           "--label", args.label, "--quiet", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    if proc.returncode != 0:
        sys.exit(f"build-sft failed (exit {proc.returncode}): {proc.stderr.strip()}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "calls": args.calls, "label": args.label, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
        "rows_train": summary["rows_train"], "rows_val": summary["rows_val"], "duplicates": summary["duplicates"],
        "labels_before": summary.get("labels_before"), "labels_after": summary.get("labels_after"),
        "targets": {"wall_s": 60, "peak_rss_mb": 2048},
    }))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
