"""`zsctl train-sim` and the shared SFT code (zsctl/sft.py) on a tiny real model.

The build-sft artifacts here are made by hand from the bundled corpus (real passages, real
simulator prompts), in the layout build-sft writes: manifest.json + train.parquet + val.parquet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from zsctl import sft
from zsctl.cli import app
from zsctl.core import artifacts, prompts
from zsctl.core.schemas import SIM_SFT
from zsctl.stages import train_sim

ROOT = Path(__file__).resolve().parents[1]
WEIGHT = "model.layers.0.self_attn.q_proj.weight"


# --- hand-made build-sft artifacts (test_warmup.py uses these too) ------------------------------


def corpus_passages(n: int, start: int = 0) -> list[dict]:
    rows = []
    with open(ROOT / "data" / "corpus" / "wiki_sample.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(rows) >= n:
                break
            r = json.loads(line)
            rows.append({"title": r["title"], "text": " ".join(r["text"].split()[:40])})
    return rows


def write_sft_artifact(out: Path, kind: str, schema: pa.Schema, train: list[dict], val: list[dict],
                       **config) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_table(out, "train.parquet", pa.Table.from_pylist(train, schema=schema))
    artifacts.write_table(out, "val.parquet", pa.Table.from_pylist(val, schema=schema))
    artifacts.write_manifest(out, kind, config={"made_by": "tests", **config})
    return out


def sim_rows(n: int, start: int = 0, k: int = 3) -> list[dict]:
    """The query is a passage title; the completion is k real passages in 'Doc i:' form."""
    docs = corpus_passages(n + k, start)
    rows = []
    for i in range(n):
        head = docs[i]
        mode = "useful" if i % 2 == 0 else "noisy"
        question = f"What is {head['title']} known for?"
        rows.append({
            "id": f"s{start + i}",
            "prompt": prompts.render_simulator_prompt(head["title"], question, head["title"], mode, k),
            "completion": prompts.format_documents(docs[i : i + k]),
            "label": mode,
            "query": head["title"],
            "question": question,
            "golden_answer": head["title"],
            "source_traj_id": f"t{start + i}",
        })
    return rows


def make_sim_sft(out: Path, n_train: int = 12, n_val: int = 4) -> Path:
    return write_sft_artifact(out, "sim_sft", SIM_SFT, sim_rows(n_train), sim_rows(n_val, start=200), doc_words=80)


def state_dict(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


# --- tests ---------------------------------------------------------------------------------------


def test_sim_rows_train_the_whole_completion_and_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = sim_rows(1)[0]
    ex = sft.encode_example(tok, row["prompt"], row["completion"], mask_env=False, prompt_special_tokens=True)
    n = ex["prompt_len"]
    assert ex["input_ids"][:n] == tok(row["prompt"])["input_ids"]  # what the sim: engine feeds
    assert ex["completion_mask"] == [0] * n + [1] * (len(ex["input_ids"]) - n)
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n:-1]) == row["completion"]


def test_train_sim_lora_merges_and_reloads(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = make_sim_sft(tmp_path / "sim_sft")
    out = tmp_path / "sim"
    cfg = train_sim.TrainSimConfig(data=str(data), base=str(tiny_model_dir), out=str(out), max_steps=3,
                                   batch_size=4, lr=1e-2, max_length=512)
    summary = train_sim.run(cfg)

    assert summary["steps"] == 3 and summary["rows_train"] == 12 and summary["rows_val"] == 4
    for k in ("train_loss_first", "train_loss_last", "val_loss_before", "val_loss"):
        assert math.isfinite(summary[k]), k
    assert summary["val_loss"] < summary["val_loss_before"]  # 3 steps at lr 1e-2 learn the doc format
    assert summary["tokens_per_s"] > 0 and summary["tokens_seen"] > 3 * 4 * 50
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "simulator" and manifest["base_model"] == str(tiny_model_dir)
    assert manifest["inputs"][0]["manifest_sha256"] == artifacts.sha256_file(data / "manifest.json")
    assert manifest["summary"]["val_loss"] == summary["val_loss"]
    # the per-document generation budget the sim: engine will use, measured on the training completions
    assert isinstance(manifest["tokens_per_doc"], int) and manifest["tokens_per_doc"] > 0
    from zsctl.search.simulator import SimulatorEngine

    engine = SimulatorEngine(str(out))
    assert engine.tokens_per_doc == manifest["tokens_per_doc"]
    # and the words its documents were cut to (build-sft's --max-doc-words): replies end documents there
    assert manifest["doc_words"] == 80 and engine.doc_words == 80
    from zsctl.search.simulator import make_sim

    assert make_sim(f"sim:{out}?doc_words=0").doc_words == 0  # the spec wins: documents as written
    # check-sim finds the questions this simulator was fitted on (train.parquet, not val) through the manifest
    from zsctl.stages import check_sim

    trained, source = check_sim.trained_questions(f"sim:{out}?verify=1")
    assert source == str(data / "train.parquet")
    assert trained == {r["question"].lower() for r in sim_rows(12)} and not trained & {
        r["question"].lower() for r in sim_rows(4, start=200)
    }
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3]
    assert 0 < log[0]["seconds"] < log[1]["seconds"] < log[2]["seconds"]  # when each step ended
    assert not (out / "adapter_config.json").exists()  # merged: a plain HF model
    assert not list(tmp_path.glob(".sim*"))  # no temp or trainer dirs left behind

    merged, base = state_dict(out), state_dict(tiny_model_dir)
    assert set(merged) == set(base)  # no lora_A/lora_B left
    assert not torch.allclose(merged[WEIGHT], base[WEIGHT])  # the adapters reached the weights
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(sim_rows(1, start=300)[0]["prompt"], return_tensors="pt", return_token_type_ids=False)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_train_sim_full_cli_json_and_rerun_replaces(tiny_model_dir, tmp_path):
    import torch

    data = make_sim_sft(tmp_path / "sim_sft", n_train=6, n_val=0)
    out = tmp_path / "sim"
    args = ["train-sim", "--data", str(data), "--base", str(tiny_model_dir), "--out", str(out), "--full",
            "--max-steps", "2", "--batch-size", "3", "--lr", "1e-3", "--json", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["lora"] is False and summary["val_loss"] is None
    merged, base = state_dict(out), state_dict(tiny_model_dir)
    assert not torch.allclose(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # a rerun into the same --out replaces the earlier model
    first = (out / "model.safetensors").read_bytes()
    r = CliRunner().invoke(app, args[:-2] + ["--seed", "1", "--lr", "5e-3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


def _invoke(*args):
    return CliRunner().invoke(app, ["train-sim", *map(str, args), "--max-steps", "1"])


def test_train_sim_bad_inputs_exit_2_and_write_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    good = make_sim_sft(tmp_path / "good", n_train=2, n_val=1)

    def bad(expect: str, data=good, base=tiny_model_dir, o=out):
        r = _invoke("--data", data, "--base", base, "--out", o)
        assert r.exit_code == 2, r.output
        assert expect in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists()

    bad("does not exist", data=tmp_path / "nope")
    (tmp_path / "half").mkdir()
    bad("incomplete artifact", data=tmp_path / "half")
    no_completion = pa.Table.from_pylist(sim_rows(2)).drop(["completion"])
    (tmp_path / "nocol").mkdir()
    artifacts.write_table(tmp_path / "nocol", "train.parquet", no_completion)
    artifacts.write_manifest(tmp_path / "nocol", "sim_sft", config={})
    bad("missing column 'completion'", data=tmp_path / "nocol")
    bad("has no usable rows", data=write_sft_artifact(tmp_path / "empty", "sim_sft", SIM_SFT, [], []))
    (tmp_path / "pol").mkdir()
    artifacts.write_manifest(tmp_path / "pol", "policy_sft", config={})
    bad("expected 'sim_sft'", data=tmp_path / "pol")
    bad("no such directory", base=tmp_path / "no-model")
    r = _invoke("--data", good, "--base", tiny_model_dir, "--out", out, "--report-to", "mlflow")
    assert r.exit_code == 2 and "--report-to 'mlflow'" in r.output and not out.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = _invoke("--data", good, "--base", tiny_model_dir, "--out", foreign)
    assert r.exit_code == 2 and "holds other files" in r.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_train_sim_smollm2_30_steps(tmp_path):
    """Issue 4: train-sim on smollm2-135m for 30 steps; val loss must drop."""
    data = write_sft_artifact(tmp_path / "sim_sft", "sim_sft", SIM_SFT, sim_rows(120), sim_rows(16, start=400))
    out = tmp_path / "sim"
    summary = train_sim.run(train_sim.TrainSimConfig(data=str(data), base="smollm2-135m", out=str(out),
                                                     max_steps=30, batch_size=4, max_length=384, val_limit=16))
    assert summary["steps"] == 30 and summary["val_loss"] < summary["val_loss_before"]
    print(json.dumps(summary))
    from zsctl.search.simulator import SimulatorEngine
    from zsctl.search.base import QueryContext

    eng = SimulatorEngine(str(out))
    docs = [
        r.docs for r in eng.search(["Paris"], 3, [QueryContext("What is the capital of France?", ["Paris"], "useful")])
    ]
    assert len(docs[0]) == 3
