"""P4: bm25s queries/s ÷ rank-bm25 queries/s on the bundled corpus, same queries, side by side.

Both get the same tokens (lowercase, bm25s's word pattern, the same English stopwords, no
stemming), k1=1.5, b=0.75, top-10, one thread. rank-bm25 scores every passage per query in Python
(`BM25Okapi.get_scores`, then an argpartition for the top 10); bm25s precomputes the scores into a
sparse matrix and answers the whole batch in one `retrieve` call. Repeats alternate the two so
machine noise hits both; the best repeat of each is reported. The zsctl engine's end-to-end rate
(stemming + Document objects) is printed too.

    python bench/bm25_speed.py [--corpus data/corpus/wiki_sample.jsonl] [--queries 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_existing(*paths: Path) -> Path:
    return next((p for p in paths if p.is_file()), paths[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, default=first_existing(
        ROOT / "data/corpus/wiki_sample.jsonl", ROOT.parent / "shared/data/corpus/wiki_sample.jsonl"))
    ap.add_argument("--questions", type=Path, default=first_existing(
        ROOT / "data/bench/hotpotqa.jsonl", ROOT.parent / "shared/data/bench/hotpotqa.jsonl"))
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import bm25s
    import numpy as np
    from rank_bm25 import BM25Okapi

    from zsctl.search.bm25 import STOPWORDS, BM25Engine, read_corpus

    _, titles, texts = read_corpus(args.corpus)
    with open(args.questions, encoding="utf-8") as f:
        queries = [json.loads(line)["question"] for line in f if line.strip()][: args.queries]

    def tokens(items: list[str]) -> list[list[str]]:
        return bm25s.tokenize(items, stopwords=STOPWORDS, stemmer=None, return_ids=False, show_progress=False)

    doc_tokens = tokens([f"{t}\n{x}" for t, x in zip(titles, texts)])
    query_tokens = tokens(queries)

    t0 = time.perf_counter()
    fast = bm25s.BM25(method="robertson", k1=1.5, b=0.75)
    fast.index(doc_tokens, show_progress=False)
    build_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = BM25Okapi(doc_tokens, k1=1.5, b=0.75)
    build_slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = BM25Engine.from_corpus(args.corpus)
    build_engine = time.perf_counter() - t0

    def run_bm25s() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        ids, _ = fast.retrieve(query_tokens, k=args.k, show_progress=False, n_threads=0)
        return time.perf_counter() - t, ids

    def run_rank_bm25() -> tuple[float, list[np.ndarray]]:
        t = time.perf_counter()
        out = []
        for q in query_tokens:
            scores = slow.get_scores(q)
            top = np.argpartition(-scores, args.k)[: args.k]
            out.append(top[np.argsort(-scores[top])])
        return time.perf_counter() - t, out

    def run_engine() -> float:
        t = time.perf_counter()
        engine.search(queries, k=args.k)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"bm25s": [], "rank_bm25": [], "engine": []}
    for _ in range(args.repeats):
        dt, fast_ids = run_bm25s()
        times["bm25s"].append(dt)
        dt, slow_ids = run_rank_bm25()
        times["rank_bm25"].append(dt)
        times["engine"].append(run_engine())
    qps = {name: len(queries) / min(ts) for name, ts in times.items()}
    # same tokens, both Okapi-style BM25 (rank-bm25 floors negative idf), so the top hits should agree
    agree = float(np.mean([a[0] == b[0] for a, b in zip(fast_ids, slow_ids)]))

    print(f"corpus: {args.corpus} ({len(titles)} passages); queries: {len(queries)} from {args.questions}; "
          f"top-{args.k}; best of {args.repeats}")
    print(f"index build   bm25s {build_fast:.2f}s   rank-bm25 {build_slow:.2f}s   zsctl BM25Engine {build_engine:.2f}s")
    print(f"queries/s     bm25s {qps['bm25s']:.0f}   rank-bm25 {qps['rank_bm25']:.1f}   "
          f"zsctl BM25Engine end-to-end {qps['engine']:.0f}")
    print(f"P4 ratio bm25s / rank-bm25 = {qps['bm25s'] / qps['rank_bm25']:.0f}x   (top-1 agreement {agree:.0%})")
    print(json.dumps({"passages": len(titles), "queries": len(queries), "k": args.k,
                      "build_s": {"bm25s": round(build_fast, 3), "rank_bm25": round(build_slow, 3),
                                  "engine": round(build_engine, 3)},
                      "qps": {k: round(v, 1) for k, v in qps.items()},
                      "ratio": round(qps["bm25s"] / qps["rank_bm25"], 1), "top1_agreement": round(agree, 3)}))


if __name__ == "__main__":
    main()
