"""`zsctl report`: search quality (degenerate share, search-hit rate) beside EM/F1 in the evaluation
table, the most common queries, the RL table rows and the plot over RL steps; older artifacts
without these fields still report."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from zsctl.cli import app
from zsctl.core import artifacts
from zsctl.stages import report


def _eval_dir(root, name, overall: dict, created: str):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"benchmarks": {"hotpotqa": overall}, "overall": overall}))
    m = artifacts.write_manifest(d, "predictions", config={}, summary={})
    m["created_at"] = created  # run order
    (d / artifacts.MANIFEST).write_text(json.dumps(m))


def test_report_shows_search_quality_next_to_scores(tmp_path):
    run = tmp_path / "run"
    scores = {"n": 20, "em": 0.1, "subem": 0.15, "f1": 0.2, "avg_searches": 1.5}
    _eval_dir(run, "eval_old", scores, "2026-01-01T00:00:00+00:00")  # written before the search-quality fields
    _eval_dir(run, "eval_warmup", {**scores, "searches": 30, "degenerate_share": 0.25, "search_hit_rate": 0.4,
                                   "hit_searches_n": 25, "repeat_share": 0.1, "ungrounded_share": 0.2, "em_open": 0.05,
                                   "open_n": 12, "first_search_hit_rate": 0.3, "first_searches_n": 18,
                                   "question_hit_rate": 0.5, "read_em": 0.25, "found_open_n": 8,
                                   "query_answer_share": 0.5, "answered_open_n": 10,
                                   "top_queries": [["Kiss and Tell", 3], ["query", 2]]},
              "2026-01-02T00:00:00+00:00")
    pol = run / "policy"
    pol.mkdir()
    steps = [
        {
            "step": i,
            "noise_p": 0.1 * i,
            "noisy_share": 0.1 * i,
            "sim_searches": 8,
            "reward_mean": 0.1,
            "reward_std": 0.0,
            "valid_answer_rate": 0.5,
            "searches_per_traj": 1.0,
            "searches": 8,
            "degenerate_share": d,
            "repeat_share": d / 2,
            "ungrounded_share": d,
            "search_hit_rate": h,
            "hit_searches_n": 8,
            "search_hit_rate_useful": 0.75,
            "search_hit_rate_noisy": 0.125,
            "step_seconds": 1.0,
        }
        for i, d, h in [(1, 0.5, 0.25), (2, 0.25, 0.5), (3, 0.0, float("nan"))]
    ]
    artifacts.write_table(pol, "metrics.parquet", pa.Table.from_pylist(steps))
    artifacts.write_manifest(pol, "policy", config={}, summary={})

    coll = run / "collect"
    coll.mkdir()
    artifacts.write_manifest(coll, "trajectories", config={}, summary={"ledger": {"engine_calls": 7}})

    summary = report.run(report.ReportConfig(run_dir=str(run)))
    assert summary["ledger"]["real_calls"] == 7  # collect's search ledger counts
    md = (run / "report" / "report.md").read_text()
    assert ("| run | benchmark | n | EM | SubEM | F1 | EM, open questions | searches | degenerate queries % "
            "| repeated queries % | ungrounded queries % | search-hit rate % |") in md
    assert ("| eval_warmup | hotpotqa | 20 | 10.0 | 15.0 | 20.0 | 5.0 (12) | 1.50 | 25.0 | 10.0 | 20.0 | 40.0 | 30.0 "
            "| 50.0 | 25.0 (8) | 50.0 |") in md  # ... search-hit, first-search hit, question-hit rates, reading
    # an older run: no figures, no crash
    assert "| eval_old | hotpotqa | 20 | 10.0 | 15.0 | 20.0 | – | 1.50 | – | – | – | – | – | – | – | – |" in md
    assert '`eval_warmup` searched most for: "Kiss and Tell" ×3; "query" ×2' in md
    # RL table: first fifth (step 1) vs last fifth (step 3); a NaN step is no value
    assert "| degenerate queries % | 50.0 | 0.0 |" in md and "| search-hit rate % | 25.0 | – |" in md
    assert "| repeated queries % | 25.0 | 0.0 |" in md and "| ungrounded queries % | 50.0 | 0.0 |" in md
    assert (
        "| search-hit rate, useful mode % | 75.0 | 75.0 |" in md
        and "| search-hit rate, noisy mode % | 12.5 | 12.5 |" in md
    )
    rows = {r["run"]: r for r in summary["evaluation"]}
    assert rows["eval_warmup"]["degenerate_share"] == 0.25 and rows["eval_old"]["search_hit_rate"] is None
    assert rows["eval_warmup"]["ungrounded_share"] == 0.2
    pytest.importorskip("matplotlib")
    assert (run / "report" / "policy_search_quality.png").is_file() and "policy_search_quality.png" in summary["plots"]


def test_report_cli_table_has_the_search_quality_columns(tmp_path):
    run = tmp_path / "run"
    _eval_dir(run, "eval_x", {"n": 4, "em": 0.5, "subem": 0.5, "f1": 0.5, "avg_searches": 1.0, "degenerate_share": 0.5,
                              "search_hit_rate": 1.0, "hit_searches_n": 2}, "2026-01-01T00:00:00+00:00")
    r = CliRunner().invoke(app, ["report", str(run)], env={"COLUMNS": "80"})  # a plain terminal: nothing cut
    assert r.exit_code == 0, r.output
    # the run, then its benchmark: n, EM, SubEM, F1, srch, deg%, rep%, hit%
    row = r"\n eval_x\s*\n   hotpotqa +4 +50\.0 +50\.0 +50\.0 +1\.00 +50\.0 +– +100\.0 "
    assert "…" not in r.output and re.search(row, r.output)


def test_report_compares_consecutive_evaluations_question_by_question(tmp_path):
    run = tmp_path / "run"
    scores = {"n": 4, "em": 0.25, "subem": 0.25, "f1": 0.25, "avg_searches": 1.0}
    for name, created, ems in (("eval_warmup", "2026-01-01T00:00:00+00:00", [0, 0, 1, 0]),
                               ("eval_policy", "2026-01-02T00:00:00+00:00", [1, 1, 0, 0])):
        _eval_dir(run, name, scores, created)
        rows = [{"data_source": "hotpotqa", "id": f"q{i}", "golden_answers": ["Lima"], "em": float(e), "f1": float(e),
                 "searches": [{"query": "Peru", "documents": [], "has_answer": bool(e)}]} for i, e in enumerate(ems)]
        artifacts.write_table(run / name, "predictions.parquet", pa.Table.from_pylist(rows))
    summary = report.run(report.ReportConfig(run_dir=str(run)))
    (p,) = summary["paired"]
    assert (p["before"], p["after"], p["n"], p["em_won"], p["em_lost"]) == ("eval_warmup", "eval_policy", 4, 2, 1)
    assert p["em"]["diff"] == pytest.approx(0.25)
    md = (run / "report" / "report.md").read_text()
    assert "| eval_warmup → eval_policy | 4 | 25.0 → 50.0 (+25.0; " in md and "| 2 / 1 |" in md
    r = CliRunner().invoke(app, ["report", str(run)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert re.search(r"\n eval_warmup → eval_policy *\n   questions in both +4 ", r.output)
    assert re.search(r"\n   EM +25\.0 +50\.0 +\+25\.0 +\[", r.output) and "…" not in r.output


def test_report_names_an_unreadable_predictions_file(tmp_path):
    run = tmp_path / "run"
    scores = {"n": 1, "em": 0.0, "subem": 0.0, "f1": 0.0, "avg_searches": 0.0}
    for name, created in (("eval_a", "2026-01-01T00:00:00+00:00"), ("eval_b", "2026-01-02T00:00:00+00:00")):
        _eval_dir(run, name, scores, created)
        (run / name / "predictions.parquet").write_bytes(b"not parquet")
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 2
    assert "eval_a/predictions.parquet' is missing or unreadable" in r.output and "rerun the zsctl eval" in r.output
    assert not (run / "report").exists()  # nothing half-written
