"""`zsctl check-sim`: controllability, format, length and diversity of a simulator, vs a real engine."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from conftest import script_model
from zsctl.cli import app
from zsctl.core import artifacts
from zsctl.core.models import load_model
from zsctl.core.schemas import TRAJECTORIES
from zsctl.search.simulator import SimulatorEngine
from zsctl.stages import check_sim

QS = [  # question, golds, query the policy used
    ("Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"], "hamlet author"),
    ("What is the capital of Peru?", ["Lima"], "peru capital"),
    ("Which is the highest mountain?", ["Mount Everest"], "highest mountain"),
]
TEMPLATE = "{mode} | {question} | {answer} | {query} | {k}\n"


@pytest.fixture()
def questions_file(tmp_path):
    path = tmp_path / "qs.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "golden_answers": g}) + "\n"
                            for i, (q, g, _) in enumerate(QS)))
    return path


@pytest.fixture()
def scripted_engine(tiny_model_dir, tmp_path):
    """Useful documents name the gold answer, noisy ones do not; one noisy output is malformed."""
    model, tok = load_model(str(tiny_model_dir))
    scripts = {}
    for q, golds, _ in QS:
        scripts[f"useful | {q}"] = [f"Doc 1: (Fact) The answer is {golds[0]}.\nDoc 2: (More) Also {golds[0]} again."]
        scripts[f"noisy | {q}"] = [f"Doc 1: (Fact) Something unrelated about {q.split()[-1]}\nDoc 2: (More) nothing"]
    scripts[f"noisy | {QS[2][0]}"] = ["only one line without a prefix"]
    script_model(model, tok, scripts)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text(TEMPLATE)
    return SimulatorEngine("tiny", model=model, tokenizer=tok, template=str(tpl))


def test_metric_helpers():
    assert check_sim.has_answer("Doc 1: (Peru) The capital is Lima, Peru.", ["lima"])
    assert not check_sim.has_answer("Limassol is in Cyprus", ["Lima"])  # whole words only
    assert check_sim.has_answer("written by the Shakespeare family", ["The Shakespeare"])  # articles dropped
    assert not check_sim.has_answer("anything", [""])
    assert check_sim.distinct_n(["a b a b"], 1) == 0.5
    assert check_sim.distinct_n(["a b c", "a b d"], 2) == 0.75
    assert check_sim.distinct_n([""], 2) == 0.0


def test_controllability_format_and_artifact(questions_file, scripted_engine, tmp_path):
    cfg = check_sim.CheckSimConfig(search="sim:tiny", out=str(tmp_path / "out"), questions=str(questions_file), k=2)
    summary = check_sim.run(cfg, engine=scripted_engine)
    sim = summary["simulator"]
    assert sim["useful"]["has_answer"] == 1.0 and sim["noisy"]["has_answer"] == 0.0
    assert sim["controllability_gap"] == 1.0
    assert sim["useful"]["format_valid"] == 1.0 and sim["noisy"]["format_valid"] == pytest.approx(2 / 3)
    assert sim["format_valid"] == pytest.approx(5 / 6)
    assert sim["useful"]["mean_doc_words"] == pytest.approx((5 + 4 + 4 + 3 + 5 + 4) / 6)  # words per non-empty doc
    assert sim["noisy"]["empty_docs"] == pytest.approx(1 / 6)
    assert 0 < sim["noisy"]["distinct_1"] <= 1 and "real" not in summary
    table = artifacts.read_artifact(cfg.out, "check_sim")
    assert table.num_rows == 6
    rows = table.to_pylist()
    assert [(r["question"], r["mode"]) for r in rows[:2]] == [(QS[0][0], "useful"), (QS[1][0], "useful")]
    assert rows[0]["query"] == QS[0][0]  # made from the question when no trajectories are given
    assert rows[0]["raw"].startswith("Doc 1: (Fact) The answer is William Shakespeare.")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["simulator"]["controllability_gap"] == 1.0


def test_queries_from_trajectories_and_vs_real_engine(tiny_model_dir, tmp_path):
    trajs = []
    for i, (q, golds, query) in enumerate(QS):
        searches = [{"query": query, "documents": []}, {"query": query.upper(), "documents": []}]  # a duplicate
        trajs.append({"traj_id": f"t{i}", "question_id": f"q{i}", "data_source": "x", "question": q,
                      "golden_answers": golds, "model": "m", "engine": "bm25", "searches": searches,
                      "response": "", "prediction": "", "em": 0.0, "f1": 0.0, "num_searches": 2})
    tdir = tmp_path / "trajs"
    artifacts.write_artifact(tdir, "trajectories", pa.Table.from_pylist(trajs, schema=TRAJECTORIES), config={})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n" for i, (t, x) in enumerate([
        ("Hamlet", "Hamlet is a tragedy by William Shakespeare."), ("Lima", "Lima is the capital of Peru."),
        ("Alps", "The Alps are a mountain range in Europe.")])))
    model, tok = load_model(str(tiny_model_dir))
    cfg = check_sim.CheckSimConfig(search="sim:tiny", out=str(tmp_path / "out"), trajectories=str(tdir),
                                   vs=f"bm25:{corpus}", k=1, max_new_tokens=4)
    engine = SimulatorEngine("tiny", model=model, tokenizer=tok, max_new_tokens=4)
    summary = check_sim.run(cfg, engine=engine)
    assert summary["n_queries"] == 3 and summary["rows"] == 9
    rows = artifacts.read_artifact(cfg.out, "check_sim").to_pylist()
    for r in rows:  # every query keeps its own trajectory's question and answers
        q, golds, query = next(x for x in QS if x[0] == r["question"])
        assert r["query"] == query and r["golden_answers"] == golds
    real = [r for r in rows if r["role"] == "real"]
    assert [r["has_answer"] for r in real] == [True, True, False]
    assert summary["real"]["has_answer"] == pytest.approx(2 / 3) and summary["real"]["n"] == 3


def test_cli_json_and_bad_input(tiny_model_dir, questions_file, tmp_path):
    out = tmp_path / "cs"
    r = CliRunner().invoke(app, ["check-sim", "--search", f"sim:{tiny_model_dir}", "--questions", str(questions_file),
                                 "--out", str(out), "--limit", "2", "--max-new-tokens", "6", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["n_queries"] == 2 and summary["rows"] == 4
    assert artifacts.read_artifact(out, "check_sim").num_rows == 4
    bad_out = tmp_path / "never"
    r = CliRunner().invoke(app, ["check-sim", "--search", "none", "--questions", str(questions_file),
                                 "--out", str(bad_out)])
    assert r.exit_code == 2 and "not a simulated engine" in r.output and not bad_out.exists()
    r = CliRunner().invoke(app, ["check-sim", "--search", f"sim:{tiny_model_dir}", "--out", str(bad_out)])
    assert r.exit_code == 2 and "--questions" in r.output and not bad_out.exists()


@pytest.mark.slow
def test_check_sim_smollm2_prompt_mode(tmp_path):
    cfg = check_sim.CheckSimConfig(search="sim:smollm2-135m", out=str(tmp_path / "out"), questions="nq",
                                   limit=10, sim_mode="prompt", batch_size=10)
    summary = check_sim.run(cfg)
    sim = summary["simulator"]
    assert summary["n_queries"] == 10 and summary["rows"] == 20
    assert 0 <= sim["useful"]["has_answer"] <= 1 and 0 <= sim["format_valid"] <= 1
    assert sim["useful"]["mean_doc_words"] > 0  # the untuned model writes something
    assert artifacts.read_artifact(cfg.out, "check_sim").num_rows == 20
