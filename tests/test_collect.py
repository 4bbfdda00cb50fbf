"""`zsctl collect`: real BM25 searches logged per trajectory, scoring, the cost ledger, shards and
resume (also after SIGKILL), bad input — with the tiny model (scripted where outcomes matter)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import ROOT, script_model
from zsctl.cli import app
from zsctl.core import artifacts, metrics, prompts
from zsctl.core.errors import BadInput
from zsctl.core.models import load_model
from zsctl.stages import build_sft, collect
from zsctl.stages.collect import CollectConfig

PASSAGES = [
    ("Lima", "Lima is the capital and largest city of Peru."),
    ("Peru", "Peru is a country in western South America."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare."),
    ("Everest", "Mount Everest is the highest mountain above sea level."),
    ("Nile", "The Nile is a major river in northeastern Africa."),
    ("Paris", "Paris is the capital of France."),
]
QUESTIONS = [
    ("p", "What is the capital of Peru?", ["Lima"]),
    ("h", "Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"]),
    ("e", "What is the highest mountain?", ["Mount Everest", "Everest"]),
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny model's matmuls are microseconds; on a busy 2-core machine a second thread only adds
    # synchronisation waits (measured: 8 ms instead of 7 us per linear layer). Restored afterwards.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(PASSAGES))
    )
    return path


def questions_file(path: Path, n: int | None = None) -> Path:
    qs = (
        QUESTIONS
        if n is None
        else [(f"x{i}", f"Random question number {i} about rivers?", [f"river {i}"]) for i in range(n)]
    )
    path.write_text("".join(json.dumps({"id": i, "question": q, "golden_answers": g}) + "\n" for i, q, g in qs))
    return path


def cfg_for(tmp_path, corpus, qfile, model, **kw) -> CollectConfig:
    base = dict(questions=str(qfile), model=str(model), search=f"bm25:{corpus}", out=str(tmp_path / "out"),
                max_turns=2, max_new_tokens=24, topk=2)
    return CollectConfig(**{**base, **kw})


def test_collect_logs_real_searches_scores_and_ledger(tmp_path, corpus, tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    script_model(model, tok, {
        "capital of Peru": ["<search> capital of Peru </search>", "<answer> Lima </answer>"],
        "Hamlet": ["<answer> Christopher Marlowe </answer>"],  # no search, wrong
        "highest mountain": ["<search> highest mountain </search>", "<search> Nile river Africa </search>",
                             "<answer> Everest </answer>"],
    })
    cfg = cfg_for(tmp_path, corpus, questions_file(tmp_path / "q.jsonl"), tiny_model_dir, batch_size=8)
    summary = collect.run(cfg, policy=(model, tok))
    rows = {r["traj_id"]: r for r in artifacts.read_artifact(cfg.out, "trajectories").to_pylist()}
    assert set(rows) == {"p#0", "h#0", "e#0"}
    p, h, e = rows["p#0"], rows["h#0"], rows["e#0"]
    assert [s["query"] for s in p["searches"]] == ["capital of Peru"]
    assert [s["query"] for s in e["searches"]] == ["highest mountain", "Nile river Africa"] and h["searches"] == []
    top = p["searches"][0]["documents"]
    assert top[0]["title"] == "Lima" and len(top) == 2 and top[0]["score"] >= top[1]["score"] > 0
    assert prompts.information_block(top) in p["response"]  # the documents the policy saw
    assert (p["em"], h["em"], e["em"]) == (1.0, 0.0, 1.0) and h["f1"] == 0.0 and p["prediction"] == "Lima"
    assert (p["question"], p["golden_answers"], p["engine"], p["num_searches"]) == (
        QUESTIONS[0][1],
        ["Lima"],
        cfg.search,
        1,
    )
    assert summary["share_correct"] == pytest.approx(2 / 3) and summary["searches_per_trajectory"] == 1.0
    # search quality per logged call, and in the summary
    assert [(s["degenerate"], s["has_answer"]) for s in p["searches"] + e["searches"]] == [
        (False, True),
        (False, True),
        (False, False),
    ]
    assert (summary["searches"], summary["degenerate_share"], summary["hit_searches_n"]) == (3, 0.0, 3)
    assert summary["search_hit_rate"] == pytest.approx(2 / 3) and [q for q, _ in summary["top_queries"]] == \
        ["capital of Peru", "highest mountain", "Nile river Africa"]
    ledger = summary["ledger"]
    assert ledger["engine_calls"] == 3 and ledger["logged_searches"] == 3 and "estimated_cost_usd" not in ledger
    manifest = json.loads((Path(cfg.out) / "manifest.json").read_text())
    assert manifest["summary"]["ledger"]["engine_calls"] == 3 and manifest["files"]["trajectories.parquet"]["rows"] == 3
    assert not (Path(cfg.out) / collect.SHARDS).exists()

    # build-sft from it: each call keeps its own trajectory's question and answer
    out = tmp_path / "sft"
    s = build_sft.run(build_sft.BuildSFTConfig(trajectories=cfg.out, out=str(out), val_fraction=0.0, balance=False,
                                               label="answer"))
    sim = pq.read_table(out / "train.parquet").to_pylist()
    assert s["search_calls"] == 3 and len(sim) == 3
    for r in sim:
        q = next(q for q in QUESTIONS if q[1] == r["question"])
        assert (
            r["golden_answer"] == q[2][0]
            and r["prompt"] == prompts.render_simulator_prompt(r["query"], q[1], q[2][0], r["label"], k=2)
        )
    labels = {r["query"]: r["label"] for r in sim}
    assert labels == {"capital of Peru": "useful", "highest mountain": "useful", "Nile river Africa": "noisy"}


def test_serpapi_cost_estimate():
    cfg = CollectConfig(questions="x", model="m", search="serpapi", out="o", price_per_1k=20.0)
    assert collect._cost(cfg, 250) == {"price_per_1k_usd": 20.0, "estimated_cost_usd": 5.0}
    assert collect._cost(CollectConfig(questions="x", model="m", search="bm25:c", out="o"), 250) == {}


def test_resume_extends_without_repeating_and_matches_an_unbroken_run(tmp_path, corpus, tiny_model_dir):
    qfile = questions_file(tmp_path / "q.jsonl", n=4)
    kw = dict(samples=2, batch_size=2, max_turns=1, max_new_tokens=6)  # temperature 1.0 by default with K > 1
    first = collect.run(cfg_for(tmp_path, corpus, qfile, tiny_model_dir, limit=2, **kw))
    assert first["trajectories"] == 4 and first["temperature"] == 1.0
    before = pq.read_table(tmp_path / "out" / "trajectories.parquet").to_pylist()
    second = collect.run(cfg_for(tmp_path, corpus, qfile, tiny_model_dir, resume=True, **kw))
    rows = pq.read_table(tmp_path / "out" / "trajectories.parquet").to_pylist()
    assert second["new_trajectories"] == 4 and second["trajectories"] == 8 and second["questions"] == 4
    assert [r["traj_id"] for r in rows] == [f"x{i}#{s}" for i in range(4) for s in range(2)]
    assert rows[:4] == before  # finished questions are kept, not redone
    unbroken = collect.run(cfg_for(tmp_path, corpus, qfile, tiny_model_dir, out=str(tmp_path / "unbroken"), **kw))
    assert unbroken["trajectories"] == 8
    assert [r["response"] for r in pq.read_table(tmp_path / "unbroken" / "trajectories.parquet").to_pylist()] == \
        [r["response"] for r in rows]  # seeded per batch: resuming draws what one run draws
    with pytest.raises(BadInput, match="not --samples 3"):
        collect.run(cfg_for(tmp_path, corpus, qfile, tiny_model_dir, resume=True, **{**kw, "samples": 3}))
    with pytest.raises(BadInput, match="same --policy/--search"):
        collect.run(cfg_for(tmp_path, corpus, qfile, "smollm2-135m", resume=True, **kw))


def test_sigkill_midway_leaves_no_manifest_and_resume_finishes(tmp_path, corpus, tiny_model_dir):
    qfile = questions_file(tmp_path / "q.jsonl", n=60)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zsctl", "collect", "--questions", str(qfile), "--model", str(tiny_model_dir),
           "--search", f"bm25:{corpus}", "--out", str(out), "--samples", "2", "--batch-size", "2",
           "--max-turns", "1", "--max-new-tokens", "24", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = out / collect.SHARDS
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("part-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "collect finished before it could be killed"
    with pytest.raises(BadInput, match="incomplete artifact"):  # the folder says it is unfinished
        artifacts.read_manifest(out)
    parts = sorted(shards.glob("part-*.parquet"))
    saved = [r for f in parts for r in pq.read_table(f).to_pylist()]
    finished = len({r["question_id"] for r in saved})
    assert len(saved) == 2 * finished >= 4  # whole questions only
    summary = collect.run(CollectConfig(questions=str(qfile), model=str(tiny_model_dir), search=f"bm25:{corpus}",
                                        out=str(out), samples=2, batch_size=2, max_turns=1, max_new_tokens=24,
                                        limit=finished + 2, resume=True))
    rows = pq.read_table(out / "trajectories.parquet").to_pylist()
    assert summary["new_trajectories"] == 4 and len(rows) == 2 * (finished + 2)
    assert len({r["traj_id"] for r in rows}) == len(rows)
    assert rows[: len(saved)] == saved


def test_bad_input_exit_2_and_no_output(tmp_path, corpus, tiny_model_dir):
    qfile = questions_file(tmp_path / "q.jsonl")
    runner = CliRunner()

    def fails(msg, **over):
        args = {"--questions": str(qfile), "--model": str(tiny_model_dir), "--search": f"bm25:{corpus}",
                "--out": str(tmp_path / "out"), **over}
        r = runner.invoke(app, ["collect", "--quiet", *[x for kv in args.items() for x in kv]])
        assert r.exit_code == 2, r.output
        assert msg in r.output and r.output.count("\n") == 1
        assert not (tmp_path / "out").exists()

    fails("not a real engine", **{"--search": "sim:whatever"})
    fails("not a real engine", **{"--search": "none"})
    fails("no such file", **{"--search": f"bm25:{tmp_path / 'nope.jsonl'}"})
    fails("unknown benchmark 'nosuchbench'", **{"--questions": "nosuchbench"})
    fails("--samples 0 must be at least 1", **{"--samples": "0"})
    fails("no such directory", **{"--model": str(tmp_path / "nomodel") + "/"})
    fails("is not usable", **{"--search": "http://127.0.0.1:9/retrieve"})


@pytest.mark.slow
def test_collect_hotpotqa_with_smollm2_then_build_sft(tmp_path):
    corpus = ROOT / "data" / "corpus" / "wiki_sample.jsonl"
    cfg = CollectConfig(questions="hotpotqa", model="smollm2-135m", search=f"bm25:{corpus}", out=str(tmp_path / "traj"),
                        limit=10, samples=1, batch_size=10, max_turns=2, max_new_tokens=64)
    summary = collect.run(cfg)
    assert summary["trajectories"] == 10 and summary["ledger"]["engine_calls"] == summary["ledger"]["logged_searches"]
    table = artifacts.read_artifact(cfg.out, "trajectories")
    from zsctl.core import data

    assert all(data.split_of("hotpotqa", q) == "train" for q in table.column("question_id").to_pylist())
    # The untuned 135M model rarely searches (1 call in 200 questions measured): simulator data from
    # so few calls must either be written or refused with the reason, never half-written.
    out = tmp_path / "sft"
    try:
        s = build_sft.run(build_sft.BuildSFTConfig(trajectories=cfg.out, out=str(out), label="answer", balance=False))
        assert s["rows_train"] + s["rows_val"] >= 1 and (out / "manifest.json").is_file()
    except BadInput as e:
        assert "no usable search calls" in str(e) or " useful and " in str(e)
        assert not out.exists()
    # Policy warm-start data from the same run, each question searched on BM25 when no logged call answered it
    pol = tmp_path / "policy"
    s = build_sft.run(build_sft.BuildSFTConfig(trajectories=cfg.out, out=str(pol), target="policy", templated=True,
                                               search=f"bm25:{corpus}", val_fraction=0.0))
    rows = pq.read_table(pol / "train.parquet").to_pylist()
    assert s["question_searches"] >= 1 and len(rows) >= 1
    assert rows[0]["prompt"].startswith("<|im_start|>system") and rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert metrics.extract_answer(rows[0]["completion"]) in rows[0]["golden_answers"]


def test_cli_json_summary_and_duplicate_questions(tmp_path, corpus, tiny_model_dir):
    qfile = questions_file(tmp_path / "q.jsonl", n=2)
    r = CliRunner().invoke(app, ["collect", "--questions", f"{qfile},{qfile}", "--model", str(tiny_model_dir),
                                 "--search", f"bm25:{corpus}", "--out", str(tmp_path / "o"), "--max-turns", "1",
                                 "--max-new-tokens", "4", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["trajectories"] == 2 and summary["questions"] == 2  # the repeated file adds nothing
    assert summary["temperature"] == 0.0 and set(summary["ledger"]) >= {"engine_calls", "cache_hits", "logged_searches"}
