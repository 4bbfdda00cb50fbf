"""`zsctl eval` end to end with a tiny model and a real BM25 engine; exit codes; config expansion."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from zsctl.cli import app, expand_argv

runner = CliRunner()


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.jsonl"
    rows = [{"id": str(i), "title": f"Doc {w}", "text": f"{w} is a word about {w}"} for i, w in
            enumerate(["apple", "banana", "cherry", "date"])]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_eval_writes_consistent_artifacts(tmp_path, tiny_model_dir, corpus):
    out = tmp_path / "ev"
    r = runner.invoke(app, ["eval", "--bench", "bamboogle,nq", "--model", str(tiny_model_dir), "--search",
                            f"bm25:{corpus}", "--out", str(out), "--limit", "3", "--batch-size", "2",
                            "--max-new-tokens", "8", "--max-turns", "1", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 6
    preds = pq.read_table(out / "predictions.parquet").to_pylist()
    met = json.loads((out / "metrics.json").read_text())
    assert set(met["benchmarks"]) == {"bamboogle", "nq"}
    for name, m in met["benchmarks"].items():
        rows = [p for p in preds if p["data_source"] == name]
        assert m["n"] == len(rows) == 3  # every question scored, partial last batch included
        assert m["f1"] == pytest.approx(sum(p["f1"] for p in rows) / 3)
        assert m["subem"] == pytest.approx(sum(p["subem"] for p in rows) / 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {q["split"] for q in manifest["questions"]} == {"eval"}
    assert manifest["files"]["predictions.parquet"]["rows"] == 6
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "predictions.parquet" in r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bench", "squad"], "squad"),
        (["--bench", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["--search", "elastic:foo"], "elastic:foo"),
        (["--search", "bm25:/no/such/index"], "/no/such/index"),
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--split", "dev"], "--split"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_model_dir, corpus, args, needle):
    base = {"--bench": "nq", "--model": str(tiny_model_dir), "--search": f"bm25:{corpus}", "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["eval"] + [x for kv in base.items() for x in kv]
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_jsonl_row_without_golden_answers(tmp_path, tiny_model_dir, corpus):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "q?", "golden_answers": ["a"]}) + "\n"
                   + json.dumps({"id": "2", "question": "x?"}) + "\n")
    r = runner.invoke(app, ["eval", "--bench", str(bad), "--model", str(tiny_model_dir), "--search", "none",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "golden_answers" in r.stderr and "2" in r.stderr


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("bench: nq\nsearch: none\nlimit: 5\nlora: false\n")
    argv = expand_argv(["eval", "--config", str(cfg), "--limit", "7", "topk=2"])
    assert argv == ["eval", "--bench", "nq", "--search", "none", "--limit", "5", "--no-lora", "--limit", "7",
                    "--topk", "2"]


def test_dry_run_prints_config_and_runs_nothing(tmp_path):
    out = tmp_path / "never"
    p = subprocess.run([sys.executable, "-m", "zsctl", "--dry-run", "eval", "--bench", "nq", "--search", "none",
                        "--out", str(out), "limit=4"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert doc["dry_run"] and doc["config"]["limit"] == 4 and not out.exists()


@pytest.mark.slow
def test_eval_bamboogle_smollm2_bm25(tmp_path):
    out = tmp_path / "ev"
    r = runner.invoke(app, ["eval", "--bench", "bamboogle", "--model", "smollm2-135m", "--search",
                            "bm25:data/corpus/wiki_sample.jsonl", "--out", str(out), "--limit", "20", "--json"])
    assert r.exit_code == 0, r.output
    met = json.loads((out / "metrics.json").read_text())
    assert met["overall"]["n"] == 20


def test_summary_rates_of_protocol_use():
    from zsctl.stages.evaluate import summarize

    def row(answered, searches, em=0.0):
        return {"data_source": "nq", "em": em, "subem": em, "f1": em, "num_searches": searches, "answered": answered}

    met = summarize([row(True, 0, 1.0), row(False, 2), row(False, 0), row(True, 1)])["overall"]
    assert met["answer_rate"] == 0.5 and met["valid_rate"] == 0.75 and met["em"] == 0.25
    assert met["avg_searches"] == 0.75


SEARCH_CORPUS = [
    ("Lima", "Lima is the capital and largest city of Peru."),
    ("Peru", "Peru is a country in western South America."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare."),
    ("Everest", "Mount Everest is the highest mountain above sea level."),
]
# (id, data_source, question, golds, what the scripted policy writes round by round). Keys are
# substrings of the question that no document contains (the script is chosen by the row's text).
SEARCH_QUESTIONS = [
    ("g", "arts", "Who painted Guernica?", ["Pablo Picasso"],
     ["<search> query </search>", "<answer> Picasso </answer>"]),
    ("t", "arts", "Who wrote Tamburlaine?", ["Christopher Marlowe"],
     ["<search> query </search>", "<search>  Query </search>", "<answer> Marlowe </answer>"]),
    ("l", "geo", "Is Lima in Peru?", ["yes"], ["<search> Lima Peru </search>", "<answer> yes </answer>"]),
    ("c", "geo", "What is the capital of Peru?", ["Lima"],
     ["<search> capital of Peru </search>", "<answer> Lima </answer>"]),
    ("m", "geo", "What is the highest mountain?", ["Mount Everest"], ["<answer> Mount Everest </answer>"]),
]


def test_eval_records_degenerate_queries_and_search_hits(tmp_path, tiny_model_dir, monkeypatch):
    """Known values end to end: a scripted tiny model, a real BM25 engine over a small corpus."""
    from conftest import script_model
    from zsctl.console import metrics_table
    from zsctl.core.models import load_model
    from zsctl.stages import evaluate

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n"
                              for i, (t, x) in enumerate(SEARCH_CORPUS)))
    bench = tmp_path / "q.jsonl"
    bench.write_text("".join(json.dumps({"id": i, "data_source": ds, "question": q, "golden_answers": g}) + "\n"
                             for i, ds, q, g, _ in SEARCH_QUESTIONS))
    model, tok = load_model(str(tiny_model_dir))
    keys = {"g": "Guernica", "t": "Tamburlaine", "l": "Lima in Peru", "c": "capital of Peru", "m": "highest mountain"}
    script_model(model, tok, {keys[i]: script for i, _, _, _, script in SEARCH_QUESTIONS})
    monkeypatch.setattr(evaluate, "load_model", lambda spec: (model, tok))
    out = tmp_path / "ev"
    summary = evaluate.run(evaluate.EvalConfig(bench=str(bench), model="scripted", search=f"bm25:{corpus}",
                                               out=str(out), max_turns=2, max_new_tokens=24, topk=2))

    preds = {p["id"]: p for p in pq.read_table(out / "predictions.parquet").to_pylist()}
    facts = {i: [(s["query"], s["degenerate"], s["has_answer"], s["repeated"]) for s in p["searches"]]
             for i, p in preds.items()}
    assert facts == {
        "g": [("query", True, False, False)],  # names nothing, and the corpus has no Picasso
        "t": [("query", True, False, False), ("Query", True, False, True)],  # case and spacing aside
        "l": [("Lima Peru", False, None, False)],  # yes/no golds cannot tell
        "c": [("capital of Peru", False, True, False)],
        "m": [],
    }
    assert preds["c"]["searches"][0]["documents"][0]["title"] == "Lima"
    # grounded: the query names a word of the question or of the documents read before ("query" names nothing)
    assert {i: [s["grounded"] for s in p["searches"]] for i, p in preds.items()} == {
        "g": [False], "t": [False, False], "l": [True], "c": [True], "m": []}
    met = json.loads((out / "metrics.json").read_text())
    overall = met["overall"]
    assert (overall["searches"], overall["degenerate_share"], overall["hit_searches_n"]) == (5, 0.6, 4)
    assert (overall["search_hit_rate"], overall["repeat_share"], overall["ungrounded_share"]) == (0.25, 0.2, 0.6)
    assert overall["top_queries"][0] == ["query", 3] and len(overall["top_queries"]) == 3
    arts, geo = met["benchmarks"]["arts"], met["benchmarks"]["geo"]
    assert (arts["searches"], arts["degenerate_share"], arts["search_hit_rate"]) == (3, 1.0, 0.0)
    assert arts["repeat_share"] == pytest.approx(1 / 3) and geo["repeat_share"] == 0.0
    assert (geo["searches"], geo["degenerate_share"], geo["search_hit_rate"], geo["hit_searches_n"]) == (2, 0.0, 1.0, 1)
    assert overall["em"] == pytest.approx(3 / 5) and summary["overall"] == overall
    # per question: only "c" found its answer; "m" never searched (a miss); "l" (yes/no) cannot tell
    assert (overall["question_hit_rate"], overall["hit_questions_n"]) == (0.25, 4)
    assert (geo["question_hit_rate"], geo["hit_questions_n"]) == (0.5, 2)
    # the opening query alone: of "g", "t" and "c" (which searched), only "c"'s first search found it
    assert (overall["first_search_hit_rate"], overall["first_searches_n"]) == (pytest.approx(1 / 3), 3)
    # EM over open questions: "l" (yes/no, answered right) is guessable; of the other four "c" and
    # "m" are right
    assert (overall["open_n"], overall["em_open"], geo["open_n"], geo["em_open"]) == (4, 0.5, 2, 1.0)
    # reading: of the open questions, only "c" found its answer, and answered it right
    assert (overall["read_em"], overall["found_open_n"]) == (1.0, 1)
    # and none of its four open answers is one of its queries (metrics.reading's doctest has one that is)
    assert (overall["query_answer_share"], overall["answered_open_n"]) == (0.0, 4)
    table = metrics_table(summary)
    assert [c.header for c in table.columns][-4:] == ["deg%", "rep%", "hit%", "qhit%"]
    assert list(table.columns[-4].cells) == ["100.0", "0.0", "60.0"]  # arts, geo, overall
    assert list(table.columns[-3].cells) == ["33.3", "0.0", "20.0"]
    assert list(table.columns[-1].cells) == ["0.0", "50.0", "25.0"]


def test_eval_cuts_documents_to_the_length_the_policy_was_trained_on(tmp_path, tiny_model_dir, monkeypatch):
    """Unset --max-doc-words: the length warmup or rl recorded in the policy's manifest; set, it wins."""
    from conftest import script_model
    from zsctl.core import artifacts
    from zsctl.core.models import load_model
    from zsctl.stages import evaluate

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n"
                              for i, (t, x) in enumerate(SEARCH_CORPUS)))
    bench = tmp_path / "q.jsonl"
    bench.write_text(json.dumps({"id": "c", "question": "What is the capital of Peru?", "golden_answers": ["Lima"]}))
    model, tok = load_model(str(tiny_model_dir))
    monkeypatch.setattr(evaluate, "load_model", lambda spec: (model, tok))
    policy = tmp_path / "warm"
    policy.mkdir()
    artifacts.write_manifest(policy, "policy", config={}, extra={"doc_words": 3})

    def words(max_doc_words=None, name="ev"):
        script_model(model, tok, {"capital of Peru": ["<search> capital of Peru </search>", "<answer> Lima </answer>"]})
        evaluate.run(evaluate.EvalConfig(bench=str(bench), model=str(policy), search=f"bm25:{corpus}",
                                         out=str(tmp_path / name), max_turns=1, max_new_tokens=24, topk=1,
                                         max_doc_words=max_doc_words))
        (pred,) = pq.read_table(tmp_path / name / "predictions.parquet").to_pylist()
        config = json.loads((tmp_path / name / "manifest.json").read_text())["config"]
        return len(pred["searches"][0]["documents"][0]["text"].split()), config["max_doc_words"]

    assert words() == (3, 3)  # "Lima is the", recorded as used
    assert words(5, "ev5") == (5, 5)
    assert artifacts.doc_words_for(str(tiny_model_dir), "zsctl", None) is None  # no record: the style's default
    assert artifacts.doc_words_for(str(policy), "search-r1", None) is None  # whole documents there
