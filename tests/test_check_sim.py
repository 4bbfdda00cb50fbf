"""`zsctl check-sim`: controllability on held-apart queries with intervals, the leak probe, format,
length and diversity of a simulator, vs a real engine."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from conftest import script_model
from zsctl.cli import app
from zsctl.core import artifacts, prompts
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


YES_NO = ("Is Lima in Peru?", ["yes"], "lima peru")  # containment cannot judge it: dropped, counted


@pytest.fixture()
def questions_file(tmp_path):
    path = tmp_path / "qs.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "golden_answers": g}) + "\n"
                            for i, (q, g, _) in enumerate(QS + [YES_NO])))
    return path


@pytest.fixture()
def scripted_engine(tiny_model_dir, tmp_path):
    """Useful documents name the gold answer, noisy ones do not; one noisy output is malformed."""
    model, tok = load_model(str(tiny_model_dir))
    scripts = {}
    for i, (q, golds, _) in enumerate(QS):
        scripts[f"useful | {q} | {golds[0]} | {q} |"] = [
            f"Doc 1: (Fact) The answer is {golds[0]}.\nDoc 2: (More) Also {golds[0]} again."
        ]
        # a leak probe (a query that names nothing) is written from the noisy prompt even in useful mode;
        # this model hands out the answer anyway to the first question's probe
        leak = f"It is {golds[0]}." if i == 0 else "No idea."
        probe = f"noisy | {q} | {golds[0]} | {prompts.LEAK_PROBES[i]} |"
        scripts[probe] = [f"Doc 1: (Probe) {leak}\nDoc 2: (More) words"]
        scripts[f"noisy | {q}"] = [f"Doc 1: (Fact) Something unrelated about {q.split()[-1]}\nDoc 2: (More) nothing"]
    scripts[f"noisy | {QS[2][0]}"] = ["only one line without a prefix"]
    script_model(model, tok, scripts)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text(TEMPLATE)
    return SimulatorEngine("tiny", model=model, tokenizer=tok, template=str(tpl))


def test_metric_helpers():
    assert check_sim.distinct_n(["a b a b"], 1) == 0.5
    assert check_sim.distinct_n(["a b c", "a b d"], 2) == 0.75
    assert check_sim.distinct_n([""], 2) == 0.0


def test_intervals_match_published_values():
    # Wilson 95 %: 0/10 → [0, 0.2775], 5/10 → [0.2366, 0.7634]
    assert check_sim.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert check_sim.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # Newcombe (1998), method 10, his example 56/70 vs 48/80: difference 0.2, interval [0.0524, 0.3339]
    assert check_sim.gap_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_controllability_format_and_artifact(questions_file, scripted_engine, tmp_path):
    cfg = check_sim.CheckSimConfig(search="sim:tiny", out=str(tmp_path / "out"), questions=str(questions_file), k=2)
    summary = check_sim.run(cfg, engine=scripted_engine)
    sim = summary["simulator"]
    assert summary["n_queries"] == 3 and summary["held_apart"]["excluded_yes_no"] == 1
    assert summary["held_apart"]["excluded_trained"] == 0 and summary["held_apart"]["trained_on"].startswith("unknown")
    assert sim["useful"]["has_answer"] == 1.0 and sim["noisy"]["has_answer"] == 0.0
    assert sim["controllability_gap"] == 1.0
    assert sim["gap_ci95"] == pytest.approx(list(check_sim.gap_interval(3, 3, 0, 3)))
    assert sim["gap_ci95"][0] == pytest.approx(0.2050, abs=1e-3) and sim["gap_ci95"][1] == 1.0
    assert sim["useful"]["has_answer_ci95"] == pytest.approx(list(check_sim.wilson(3, 3)))
    assert sim["leak"]["n"] == 3 and sim["leak"]["has_answer"] == pytest.approx(1 / 3)
    assert sim["useful"]["mean_tries"] == 1.0 and sim["verify"] == 0
    assert sim["useful"]["format_valid"] == 1.0 and sim["noisy"]["format_valid"] == pytest.approx(2 / 3)
    assert sim["format_valid"] == pytest.approx(5 / 6)
    assert sim["useful"]["mean_doc_words"] == pytest.approx((5 + 4 + 4 + 3 + 5 + 4) / 6)  # words per non-empty doc
    assert sim["noisy"]["empty_docs"] == pytest.approx(1 / 6)
    assert 0 < sim["noisy"]["distinct_1"] <= 1 and "real" not in summary
    table = artifacts.read_artifact(cfg.out, "check_sim")
    assert table.num_rows == 9  # 3 queries x (useful, noisy, leak probe)
    rows = table.to_pylist()
    assert [(r["question"], r["mode"]) for r in rows[:2]] == [(QS[0][0], "useful"), (QS[1][0], "useful")]
    probes = [r for r in rows if r["role"] == "probe"]
    assert [r["query"] for r in probes] == list(prompts.LEAK_PROBES[:3]) and {r["mode"] for r in probes} == {"useful"}
    assert [r["has_answer"] for r in probes] == [True, False, False]
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
    assert summary["n_queries"] == 3 and summary["rows"] == 12
    rows = artifacts.read_artifact(cfg.out, "check_sim").to_pylist()
    for r in rows:  # every query keeps its own trajectory's question and answers
        q, golds, query = next(x for x in QS if x[0] == r["question"])
        assert r["query"] == (query if r["role"] != "probe" else r["query"]) and r["golden_answers"] == golds
    real = [r for r in rows if r["role"] == "real"]
    assert [r["has_answer"] for r in real] == [True, True, False]
    assert summary["real"]["has_answer"] == pytest.approx(2 / 3) and summary["real"]["n"] == 3


def test_cli_json_and_bad_input(tiny_model_dir, questions_file, tmp_path):
    out = tmp_path / "cs"
    r = CliRunner().invoke(app, ["check-sim", "--search", f"sim:{tiny_model_dir}", "--questions", str(questions_file),
                                 "--out", str(out), "--limit", "2", "--max-new-tokens", "6", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["n_queries"] == 2 and summary["rows"] == 6
    assert artifacts.read_artifact(out, "check_sim").num_rows == 6
    r = CliRunner().invoke(app, ["check-sim", "--search", f"sim:{tiny_model_dir}?verify=1", "--questions",
                                 str(questions_file), "--out", str(tmp_path / "table"), "--limit", "2",
                                 "--max-new-tokens", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    for shown in ("n = 2 held-apart", "95% interval (Wilson)", "leak %", "format valid %", "(Newcombe)", "1 yes/no"):
        assert shown in r.output, shown
    bad_out = tmp_path / "never"
    r = CliRunner().invoke(app, ["check-sim", "--search", "none", "--questions", str(questions_file),
                                 "--out", str(bad_out)])
    assert r.exit_code == 2 and "not a simulated engine" in r.output and not bad_out.exists()
    r = CliRunner().invoke(app, ["check-sim", "--search", f"sim:{tiny_model_dir}", "--out", str(bad_out)])
    assert r.exit_code == 2 and "--questions" in r.output and not bad_out.exists()


def test_a_sampling_simulator_gives_the_same_table_for_the_same_seed(tiny_model_dir, questions_file, tmp_path):
    """--seed makes check-sim repeatable when the simulator samples (here every reply; verify's
    retries do too): torch's generator is seeded, not left where the last run put it."""
    def texts(name: str, seed: int) -> list[str]:
        cfg = check_sim.CheckSimConfig(search=f"sim:{tiny_model_dir}?temperature=1.0", questions=str(questions_file),
                                       out=str(tmp_path / name), limit=2, max_new_tokens=8, seed=seed)
        check_sim.run(cfg)
        return [r["text"] for r in artifacts.read_artifact(tmp_path / name, "check_sim").to_pylist()]

    first = texts("a", 0)
    assert texts("b", 0) == first and texts("c", 1) != first


@pytest.mark.slow
def test_check_sim_smollm2_prompt_mode(tmp_path):
    cfg = check_sim.CheckSimConfig(search="sim:smollm2-135m", out=str(tmp_path / "out"), questions="nq",
                                   limit=10, sim_mode="prompt", batch_size=10)
    summary = check_sim.run(cfg)
    sim = summary["simulator"]
    assert summary["n_queries"] == 10 and summary["rows"] == 30
    assert 0 <= sim["useful"]["has_answer"] <= 1 and 0 <= sim["format_valid"] <= 1
    assert sim["useful"]["mean_doc_words"] > 0  # the untuned model writes something
    assert artifacts.read_artifact(cfg.out, "check_sim").num_rows == 30


def _simulator_trained_on(tmp_path, questions: list[str]) -> str:
    """A simulator folder whose manifest names a build-sft artifact holding `questions` in train.parquet."""
    import pyarrow.parquet as pq

    from zsctl.core.schemas import SIM_SFT

    data = tmp_path / "sim_sft"
    data.mkdir()
    rows = [{"id": str(i), "prompt": "p", "completion": "c", "label": "useful", "query": q, "question": q,
             "golden_answer": "a", "source_traj_id": str(i)} for i, q in enumerate(questions)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SIM_SFT), data / "train.parquet")
    artifacts.write_manifest(data, "sim_sft", config={})
    model = tmp_path / "simulator"
    model.mkdir()
    artifacts.write_manifest(model, "simulator", config={}, inputs=[artifacts.input_ref(data)])
    return f"sim:{model}"


def test_questions_the_simulator_trained_on_are_never_checked(questions_file, scripted_engine, tmp_path):
    spec = _simulator_trained_on(tmp_path, ["  who wrote  HAMLET? "])  # matched after whitespace and case
    cfg = check_sim.CheckSimConfig(search=spec, out=str(tmp_path / "out"), questions=str(questions_file), k=2)
    summary = check_sim.run(cfg, engine=scripted_engine)
    held = summary["held_apart"]
    assert held["excluded_trained"] == 1 and held["excluded_yes_no"] == 1 and held["candidates"] == 4
    assert held["trained_on"].endswith("train.parquet") and summary["n_queries"] == 2
    questions = {r["question"] for r in artifacts.read_artifact(cfg.out, "check_sim").to_pylist()}
    assert questions == {QS[1][0], QS[2][0]}


def test_a_moved_run_folder_still_finds_the_simulator_training_data(tmp_path):
    import shutil

    (tmp_path / "run").mkdir()
    _simulator_trained_on(tmp_path / "run", ["who wrote hamlet?"])
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "run", moved)  # the manifest still names run/sim_sft
    trained, source = check_sim.trained_questions(f"sim:{moved / 'simulator'}")
    assert trained == {"who wrote hamlet?"} and source == str(moved / "sim_sft" / "train.parquet")
    # a same-named folder that is not the recorded artifact is not taken for it
    artifacts.write_manifest(moved / "sim_sft", "sim_sft", config={"other": 1})
    assert check_sim.trained_questions(f"sim:{moved / 'simulator'}")[0] is None


def test_nothing_held_apart_is_bad_input(questions_file, tiny_model_dir, tmp_path):
    spec = _simulator_trained_on(tmp_path, [q for q, _, _ in QS])
    out = tmp_path / "never"
    r = CliRunner().invoke(app, ["check-sim", "--search", spec, "--questions", str(questions_file), "--out", str(out)])
    assert r.exit_code == 2 and "held apart" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_verified_engine_reports_tries(questions_file, tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir))
    scripts = {}
    for q, golds, _ in QS:  # useful: wrong, then right; noisy and probes: answer-free at once
        # (keyed on question and answer: the retry's query line differs)
        scripts[f"useful | {q} | {golds[0]} |"] = ["Doc 1: (X) nothing here", f"Doc 1: (X) {q} It is {golds[0]}."]
        scripts[f"noisy | {q}"] = ["Doc 1: (Y) other things"]
    script_model(model, tok, scripts)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text(TEMPLATE)
    engine = SimulatorEngine("tiny", model=model, tokenizer=tok, template=str(tpl), verify=1)
    cfg = check_sim.CheckSimConfig(search="sim:tiny", out=str(tmp_path / "out"), questions=str(questions_file), k=1)
    sim = check_sim.run(cfg, engine=engine)["simulator"]
    assert sim["verify"] == 1 and sim["useful"]["mean_tries"] == 2.0 and sim["noisy"]["mean_tries"] == 1.0
    assert sim["useful"]["has_answer"] == 1.0 and sim["controllability_gap"] == 1.0 and sim["leak"]["has_answer"] == 0.0
