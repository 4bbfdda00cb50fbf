"""Evaluating a released Search-R1 / ZeroSearch policy: prompt styles and prompts from the data file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from conftest import script_model
from zsctl.agent import AgentConfig, AgentLoop
from zsctl.cli import app
from zsctl.core import prompts
from zsctl.core.models import load_model
from zsctl.search import make_engine
from zsctl.search.base import QueryContext

runner = CliRunner()
QUESTIONS = [("what is apple", ["apple"]), ("what is a banana?", ["banana"]), ("name a cherry", ["cherry"])]


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.jsonl"
    rows = [{"id": f"w{i}", "title": f"Doc {w}", "text": f"{w} is a word about {w}"} for i, w in
            enumerate(["apple", "banana", "cherry", "date"])]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def searchr1_parquet(path):
    """A test file laid out as Search-R1's qa_search_test_merge writes it (a chat prompt per row)."""
    pq.write_table(pa.table({
        "data_source": ["nq"] * len(QUESTIONS),
        "prompt": [[{"role": "user", "content": f"Use <search> when unsure. Question: {q}\n"}] for q, _ in QUESTIONS],
        "ability": ["fact-reasoning"] * len(QUESTIONS),
        "reward_model": [{"style": "rule", "ground_truth": {"target": g}} for _, g in QUESTIONS],
        "extra_info": [{"split": "test", "index": i} for i in range(len(QUESTIONS))],
    }), path)
    return path


def _eval(tmp_path, model_dir, corpus, bench, out, *extra):
    return runner.invoke(app, ["eval", "--bench", str(bench), "--model", str(model_dir), "--search", f"bm25:{corpus}",
                               "--out", str(out), "--max-new-tokens", "4", "--max-turns", "1", "--json", *extra])


def test_prompt_from_data_feeds_each_rows_prompt_verbatim(tmp_path, tiny_model_dir, corpus):
    bench = searchr1_parquet(tmp_path / "test.parquet")
    r = _eval(
        tmp_path, tiny_model_dir, corpus, bench, tmp_path / "ev", "--prompt-style", "search-r1", "--prompt-from-data"
    )
    assert r.exit_code == 0, r.output
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    preds = pq.read_table(tmp_path / "ev" / "predictions.parquet").to_pylist()
    rows = pq.read_table(bench).to_pylist()
    assert [p["prompt"] for p in preds] == [
        tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    style = json.loads((tmp_path / "ev" / "manifest.json").read_text())["summary"]["prompt_style"]
    assert style["name"] == "search-r1" and style["prompt_from_data"] is True and style["system"] is None
    assert style["example_documents"] == 'Doc 1(Title: "T") text'


def test_style_prompt_is_recorded_per_row(tmp_path, tiny_model_dir, corpus):
    bench = searchr1_parquet(tmp_path / "test.parquet")
    r = _eval(tmp_path, tiny_model_dir, corpus, bench, tmp_path / "ev", "--prompt-style", "zerosearch")
    assert r.exit_code == 0, r.output
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    preds = pq.read_table(tmp_path / "ev" / "predictions.parquet").to_pylist()
    for p in preds:
        assert p["prompt"] == prompts.render_policy_prompt(tok, p["question"], style="zerosearch")
        assert p["prompt"].count("?\n") == 1 and "<|im_start|>system" not in p["prompt"]


@pytest.mark.parametrize("extra, needle", [
    (["--prompt-from-data"], "'prompt'"),  # the bundled jsonl has no prompt column
    (["--prompt-style", "r1"], "--prompt-style 'r1'"),
    (["--sim-template", "zerosearch-sft"], "--sim-template applies only to simulated engines"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, corpus, extra, needle):
    out = tmp_path / "ev"
    r = _eval(tmp_path, tiny_model_dir, corpus, "nq", out, "--limit", "2", *extra)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("style, first_doc, final_note", [
    ("search-r1", 'Doc 1(Title: "Doc apple") apple is a word about apple', False),
    ("zerosearch", "Doc 1: apple is a word about apple", False),
    ("zsctl", "Doc 1: (Doc apple) apple is a word about apple", True),
])
def test_documents_and_notes_follow_the_style(tiny_model_dir, corpus, style, first_doc, final_note):
    model, tok = load_model(str(tiny_model_dir))
    script_model(model, tok, {"apple": ["<search> apple </search>", "<answer> apple </answer>"]})
    engine = make_engine(f"bm25:{corpus}")
    loop = AgentLoop(model, tok, engine, AgentConfig(max_turns=1, max_new_tokens=24, topk=1, prompt_style=style))
    (t,) = loop.run(loop.encode_prompts(["what is apple"]), [QueryContext("what is apple", ["apple"])])
    inserted = tok.decode([x for x, m in zip(t.response_ids, t.env_mask) if m == 0])
    assert inserted.startswith(f"\n\n<information>{first_doc}</information>\n\n")
    assert (prompts.FINAL_TURN in inserted) is final_note  # the upstream loops announce no last round
    assert t.prediction == "apple"


def test_collect_with_a_files_own_prompts(tmp_path, tiny_model_dir, corpus):
    bench = searchr1_parquet(tmp_path / "train.parquet")
    out = tmp_path / "traj"
    r = runner.invoke(app, ["collect", "--questions", str(bench), "--model", str(tiny_model_dir), "--search",
                            f"bm25:{corpus}", "--out", str(out), "--max-new-tokens", "4", "--max-turns", "1",
                            "--prompt-style", "search-r1", "--prompt-from-data", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    style = json.loads((out / "manifest.json").read_text())["summary"]["prompt_style"]
    assert style["name"] == "search-r1" and style["prompt_from_data"] is True
    r = runner.invoke(app, ["collect", "--questions", "nq", "--model", str(tiny_model_dir), "--search",
                            f"bm25:{corpus}", "--out", str(tmp_path / "t2"), "--limit", "1", "--prompt-from-data"])
    assert r.exit_code == 2 and "'prompt'" in r.stderr and not (tmp_path / "t2").exists()
