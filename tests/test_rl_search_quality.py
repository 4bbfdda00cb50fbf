"""rl records search quality: per search in rollouts.parquet, per step in the metrics (degenerate
share, search-hit rate, and the hit rate per simulator mode) — a scripted tiny policy, real BM25
documents, and the mode labels a simulated engine would report."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from conftest import script_model
from zsctl.core.models import load_model
from zsctl.core.progress import Progress
from zsctl.search import make_engine
from zsctl.stages import rl

QUESTIONS = [
    ("g", "Who painted Guernica?", ["Pablo Picasso"],
     ["<search> query </search>", "<search> query </search>", "<answer> Picasso </answer>"]),
    ("c", "What is the capital of Peru?", ["Lima"], ["<search> capital of Peru </search>", "<answer> Lima </answer>"]),
    ("l", "Is Lima in Peru?", ["yes"], ["<search> Lima Peru </search>", "<answer> yes </answer>"]),
]
KEYS = {"g": "Guernica", "c": "capital of Peru", "l": "Lima in Peru"}


def _scripted(tmp_path, tiny_model_dir):
    """A two-passage corpus, QUESTIONS as a question file, and the tiny model scripted to their turns."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n" for i, (t, x) in enumerate([
        ("Lima", "Lima is the capital and largest city of Peru."), ("Peru", "Peru is a country in South America.")])))
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"id": i, "question": q, "golden_answers": g}) + "\n" for i, q, g, _ in QUESTIONS)
    )
    model, tok = load_model(str(tiny_model_dir))
    script_model(model, tok, {KEYS[i]: s for i, _, _, s in QUESTIONS})
    return corpus, questions, model, tok


def test_rollouts_and_step_metrics_carry_search_quality(tmp_path, tiny_model_dir):
    corpus, train, model, tok = _scripted(tmp_path, tiny_model_dir)
    cfg = rl.RLConfig(policy="scripted", search=f"bm25:{corpus}", train=str(train), out=str(tmp_path / "run"), steps=2,
                      batch_size=4, group_size=2, max_turns=2, max_new_tokens=24, max_response_tokens=400, lora=False,
                      topk=2, temperature=0.0)
    trainer, _, recorder, _ = rl.build_trainer(cfg, policy=(model, tok))

    # real documents, labelled with modes as a simulated engine labels its replies
    engine = make_engine(f"bm25:{corpus}")
    real_search = engine.search

    def labelled(queries, k=3, contexts=None, noise=None):
        results = real_search(queries, k, contexts, noise)
        return [replace(r, mode=m) for r, m in zip(results, ["useful", "noisy", "useful"])]

    engine.search = labelled
    golds = {q: {"id": i, "question": q, "golden_answers": g} for i, q, g, _ in QUESTIONS}
    rollout = rl.make_rollout_func(cfg, engine, golds, recorder, Progress(quiet=True))
    rollout([q for _, q, _, _ in QUESTIONS], trainer)

    rows = pq.read_table(next(recorder.rollouts_dir.glob("step-000001-*.parquet"))).to_pylist()
    facts = [[(s["query"], s["degenerate"], s["has_answer"], s["repeated"]) for s in r["searches"]] for r in rows]
    assert facts == [[("query", True, False, False), ("query", True, False, True)],
                     [("capital of Peru", False, True, False)], [("Lima Peru", False, None, False)]]
    assert [r["sim_labels"] for r in rows] == [["useful", "useful"], ["noisy"], ["useful"]]
    assert [[s["grounded"] for s in r["searches"]] for r in rows] == [[False, False], [True], [True]]
    m = recorder.pending
    assert (m["searches"], m["hit_searches_n"]) == (4, 3)
    assert (m["degenerate_share"], m["repeat_share"]) == (0.5, 0.25) and m["search_hit_rate"] == pytest.approx(1 / 3)
    assert m["ungrounded_share"] == 0.5
    # useful mode: the degenerate "query" got documents without the answer; noisy: a real hit
    assert (m["search_hit_rate_useful"], m["search_hit_rate_noisy"]) == (0.0, 1.0)
    # groups of 2 consecutive rollouts: "Picasso" (F1 < 1) beside "Lima" (1.0) differ; "yes" alone is flat
    assert m["zero_std_share"] == 0.5
    assert rl._zero_std_share([0.1] * 4 + [0.0, 0.3, 0.0, 0.0], 4) == 0.5


def test_step_metrics_without_searches_are_nan():
    m = rl.search_metrics([])
    assert m["searches"] == 0 and m["hit_searches_n"] == 0
    assert all(
        math.isnan(m[k])
        for k in ("degenerate_share", "search_hit_rate", "search_hit_rate_useful", "search_hit_rate_noisy")
    )


def test_validation_reports_search_quality_with_the_real_engine(tmp_path, tiny_model_dir):
    corpus, val, model, tok = _scripted(tmp_path, tiny_model_dir)
    cfg = rl.RLConfig(policy="scripted", search=f"bm25:{corpus}", train=str(val), out=str(tmp_path / "run"),
                      val=str(val), val_search=f"bm25:{corpus}", val_every=1, max_turns=2, max_new_tokens=24,
                      max_response_tokens=400, lora=False, topk=2, temperature=0.0)
    scores = rl._make_validator(cfg, tok)(model)
    # answers Picasso (gold "Pablo Picasso": no exact match) / Lima / yes; searches "query" twice
    # (degenerate, misses, the second a repeat), "capital of Peru" (a hit), "Lima Peru" (yes/no gold: cannot tell)
    assert scores["val_em"] == pytest.approx(2 / 3)
    assert scores["val_em_open"] == 0.5  # the yes/no question is guessable: Picasso (miss) and Lima (right)
    assert scores["val_read_em"] == 1.0  # the one open question a search found (Lima) was answered right
    assert (scores["val_degenerate_share"], scores["val_repeat_share"]) == (0.5, 0.25)
    assert (scores["val_search_hit_rate"], scores["val_question_hit_rate"]) == (pytest.approx(1 / 3), 0.5)
    assert scores["val_first_search_hit_rate"] == 0.5  # "query" (Picasso) missed, "capital of Peru" found Lima
