"""`zsctl warmup`: policy SFT whose loss skips what the environment inserted (token-exact)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from test_train_sim import WEIGHT, corpus_passages, state_dict, write_sft_artifact
from zsctl import sft
from zsctl.cli import app
from zsctl.core import prompts
from zsctl.core.schemas import POLICY_SFT
from zsctl.stages import warmup


def policy_pieces(query: str, docs: list[dict], answer: str, notes: bool) -> list[tuple[str, bool]]:
    """A response as the agent loop writes it: (text, written by the policy?) in order."""
    pieces = [(f"<think> I should look this up. </think>\n<search> {query} </search>", True),
              (prompts.information_block(docs), False)]
    if notes:  # an invalid turn, a second search, and the last-turn note
        pieces += [("I am not sure.", True), (prompts.INVALID_ACTION, False),
                   (f"<search> {query} history </search>", True), (prompts.information_block(docs[:1]), False),
                   (prompts.FINAL_TURN, False)]
    pieces.append((f"<think> The documents name it. </think>\n<answer> {answer} </answer>", True))
    return pieces


def policy_rows(tok, n: int, start: int = 0) -> list[dict]:
    docs = corpus_passages(n + 2, start)
    rows = []
    for i in range(n):
        d = docs[i]
        question = f"Which topic does the passage about {d['title']} cover?"
        pieces = policy_pieces(d["title"], docs[i : i + 2], d["title"], notes=i % 2 == 1)
        rows.append({
            "id": f"p{start + i}",
            "prompt": prompts.render_policy_prompt(tok, question),
            "completion": "".join(t for t, _ in pieces),
            "question": question,
            "golden_answers": [d["title"]],
            "source_traj_id": f"t{start + i}",
            "pieces": pieces,
        })
    return rows


def make_policy_sft(out, tok, n_train: int = 8, n_val: int = 2):
    strip = lambda rows: [{k: v for k, v in r.items() if k != "pieces"} for r in rows]  # noqa: E731
    return write_sft_artifact(out, "policy_sft", POLICY_SFT, strip(policy_rows(tok, n_train)),
                              strip(policy_rows(tok, n_val, start=200)))


def _runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive (trained?, ids) runs of one example."""
    runs: list[tuple[bool, list[int]]] = []
    for i, lab in zip(ids, labels):
        trained = lab != -100
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(i)
        else:
            runs.append((trained, [i]))
    return runs


@pytest.fixture()
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_loss_mask_is_exactly_the_environment_text(tiny_model_dir, tmp_path, tok):
    rows = policy_rows(tok, 4)
    cfg = sft.SFTRunConfig(base=str(tiny_model_dir), out=str(tmp_path / "p"), mask_env=True,
                           prompt_special_tokens=False, max_steps=1, batch_size=2)
    trainer, info = sft.make_trainer(cfg, rows, [])
    by_prompt = {r["prompt"]: r for r in rows}
    assert len(trainer.train_dataset) == 4
    for ex in trainer.train_dataset:  # the labels TRL will train on
        ids, labels = ex["input_ids"], ex["labels"]
        assert all(lab in (-100, i) for i, lab in zip(ids, labels))
        runs = _runs(ids, labels)
        prompt = tok.decode(runs[0][1])
        row = by_prompt[prompt]  # the first masked run is the whole prompt, tokenised as the agent does
        assert runs[0][1] == tok(prompt, add_special_tokens=False)["input_ids"]
        # expected runs: adjacent pieces of one kind merge; the EOS closes the last trained run
        want: list[tuple[bool, str]] = []
        for text, trained in row["pieces"]:
            if want and want[-1][0] == trained:
                want[-1] = (trained, want[-1][1] + text)
            else:
                want.append((trained, text))
        got = [(trained, tok.decode(run)) for trained, run in runs[1:]]
        assert got[-1][1].endswith(tok.eos_token) and runs[-1][1][-1] == tok.eos_token_id
        got[-1] = (got[-1][0], got[-1][1][: -len(tok.eos_token)])
        assert got == want
        masked = "".join(t for tr, t in got if not tr)
        trained_text = "".join(t for tr, t in got if tr)
        assert masked.count("<information>") == row["completion"].count("<information>") >= 1
        assert "<information>" not in trained_text and "Doc 1:" not in trained_text
        assert prompts.FINAL_TURN.strip() not in trained_text
        assert "<answer>" in trained_text and "<search>" in trained_text


def test_batches_of_several_rows_are_padded_to_a_multiple_of_64(tiny_model_dir, tmp_path, tok):
    """Few distinct batch shapes keep a long CPU run from slowing down; padding carries no loss."""
    rows = policy_rows(tok, 3)

    def batch(**kw):
        cfg = sft.SFTRunConfig(base=str(tiny_model_dir), out=str(tmp_path / "p"), mask_env=True,
                               prompt_special_tokens=False, max_steps=1, **kw)
        trainer, _ = sft.make_trainer(cfg, rows, [])
        examples = [trainer.train_dataset[i] for i in range(kw["batch_size"])]
        return trainer.data_collator(examples), max(len(ex["input_ids"]) for ex in examples)

    padded, longest = batch(batch_size=3)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] >= longest
    assert (padded["labels"][:, longest:] == -100).all() and (padded["attention_mask"][:, longest:] == 0).all()
    assert batch(batch_size=3, pad_to_multiple_of=1)[0]["input_ids"].shape[1] == longest
    single, longest = batch(batch_size=1)  # nothing to share: one row is never padded
    assert single["input_ids"].shape[1] == longest


def test_loss_projects_only_the_trained_positions_and_equals_plain_cross_entropy(tiny_model_dir, tmp_path, tok,
                                                                                 monkeypatch):
    import torch
    import trl.trainer.utils as trl_utils

    rows = policy_rows(tok, 2)
    cfg = sft.SFTRunConfig(base=str(tiny_model_dir), out=str(tmp_path / "p"), mask_env=True, lora=False,
                           prompt_special_tokens=False, max_steps=1, batch_size=2)
    trainer, _ = sft.make_trainer(cfg, rows, [])
    projected = []  # rows of hidden states the vocabulary projection received
    real = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *a: projected.append(hidden.shape[0]) or real(hidden, *a))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    labels = batch["labels"][:, 1:]
    assert projected == [int((labels != -100).sum())] < [labels.numel()]  # prompt and documents skipped
    grads = torch.autograd.grad(loss, model.get_output_embeddings().weight)[0]
    # the same loss and gradient as a plain forward over every position and a masked mean
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100)
    assert torch.allclose(loss, plain, atol=1e-5)
    assert torch.allclose(grads, torch.autograd.grad(plain, model.get_output_embeddings().weight)[0], atol=1e-6)


def test_unclosed_information_block_is_masked_to_the_end(tok):
    ex = sft.encode_example(tok, "Q: x\n", "<search> a </search>\n\n<information>Doc 1: cut sho",
                            mask_env=True, prompt_special_tokens=False)
    masked_tail = [i for i, m in zip(ex["input_ids"], ex["completion_mask"]) if not m][ex["prompt_len"]:]
    assert tok.decode(masked_tail) == "\n\n<information>Doc 1: cut sho"
    assert ex["completion_mask"][-1] == 1 and ex["input_ids"][-1] == tok.eos_token_id


def test_warmup_changes_weights_and_reloads(tiny_model_dir, tmp_path, tok):
    import torch
    from transformers import AutoModelForCausalLM

    data = make_policy_sft(tmp_path / "policy_sft", tok)
    data_manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**data_manifest, "config": {"doc_words": 30}}))  # as build-sft
    out = tmp_path / "warm"
    r = CliRunner().invoke(app, ["warmup", "--data", str(data), "--policy", str(tiny_model_dir), "--out", str(out),
                                 "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss_last"]) and math.isfinite(summary["val_loss"])
    assert 0 < summary["trained_token_share"] < 0.5  # prompts and documents dominate the tokens
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "policy" and manifest["config"]["policy"] == str(tiny_model_dir)
    assert manifest["doc_words"] == 30  # the demonstrations' document length: eval and rl default to it
    assert not torch.allclose(state_dict(out)[WEIGHT], state_dict(tiny_model_dir)[WEIGHT])
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok(policy_rows(tok, 1, start=300)[0]["prompt"], add_special_tokens=False, return_tensors="pt",
              return_token_type_ids=False)
    assert (
        model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id).shape[1]
        > ids["input_ids"].shape[1]
    )


def test_warmup_refuses_simulator_data(tiny_model_dir, tmp_path):
    from test_train_sim import make_sim_sft

    data = make_sim_sft(tmp_path / "sim_sft", n_train=2, n_val=0)
    r = CliRunner().invoke(app, ["warmup", "--data", str(data), "--policy", str(tiny_model_dir),
                                 "--out", str(tmp_path / "w")])
    assert r.exit_code == 2 and "expected 'policy_sft'" in r.output and "build-sft --for policy" in r.output
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_warmup_smollm2_few_steps(tmp_path):
    from zsctl.core.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    data = make_policy_sft(tmp_path / "policy_sft", tok, n_train=16, n_val=4)
    summary = warmup.run(warmup.WarmupConfig(data=str(data), policy="smollm2-135m", out=str(tmp_path / "warm"),
                                             max_steps=4, batch_size=4, max_length=512))
    print(json.dumps(summary))
    assert summary["steps"] == 4 and summary["val_loss"] < summary["val_loss_before"]


def test_auto_threads_are_chosen_again_at_every_training_step(tiny_model_dir, tmp_path, tok, monkeypatch):
    import torch

    from zsctl.core import models

    class Cores:  # what --threads auto measures: here one free core, then two, then one
        def __init__(self):
            self.chosen = []

        def choose(self):
            self.chosen.append([1, 2][len(self.chosen) % 2])
            return self.chosen[-1]

    cores = Cores()
    monkeypatch.setattr(models, "_auto", cores)
    before = torch.get_num_threads()
    seen = []
    cfg = sft.SFTRunConfig(base=str(tiny_model_dir), out=str(tmp_path / "p"), mask_env=True,
                           prompt_special_tokens=False, max_steps=3, batch_size=2)
    trainer, _ = sft.make_trainer(cfg, policy_rows(tok, 6), [])
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **kw: (seen.append(torch.get_num_threads()), forward(*a, **kw))[1]
    try:
        trainer.train()
    finally:
        torch.set_num_threads(before)
    assert cores.chosen == [1, 2, 1]  # once before each step
    assert seen == [1, 2, 1]  # and the step ran on what was chosen
