"""RL stage: curriculum, rewards, the env mask TRL receives, training steps, logs, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import ROOT, assert_logprobs_aligned, script_model, train_capturing_rollouts
from zsctl.cli import app
from zsctl.core import artifacts
from zsctl.core.artifacts import read_manifest, read_table_file
from zsctl.core.errors import BadInput
from zsctl.core.generation import length_groups
from zsctl.core.models import load_model
from zsctl.core.rewards import em_reward, f1_format_reward, f1_reward
from zsctl.core.schemas import ROLLOUTS
from zsctl.stages import rl


@pytest.fixture()
def train_file(tmp_path):
    p = tmp_path / "train.jsonl"
    rows = [{"id": f"q{i}", "question": f"question number {i}?", "golden_answers": [f"answer {i}"]} for i in range(8)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


@pytest.fixture()
def corpus_file(tmp_path):
    p = tmp_path / "corpus.jsonl"
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    rows = [{"id": str(i), "title": f"Title {w}", "text": f"{w} answers question {w}"} for i, w in enumerate(words)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _cfg(tmp_path, train_file, **kw):
    base = dict(policy="", search="none", train=str(train_file), out=str(tmp_path / "run"), steps=2, batch_size=4,
                group_size=2, max_turns=1, max_new_tokens=8, max_response_tokens=64, lora=True, lora_r=4, lr=1e-3)
    base.update(kw)
    return rl.RLConfig(**base)


def test_curriculum_values():
    assert rl.noise_probability(0, 10, 0.0, 0.5) == 0.0
    assert rl.noise_probability(10, 10, 0.0, 0.5) == pytest.approx(0.5)
    assert rl.noise_probability(5, 10, 0.0, 0.5) == pytest.approx((4**0.5 - 1) / 3 * 0.5)
    assert rl.noise_probability(5, 10, 0.2, 0.6, base=2) == pytest.approx(0.2 + (2**0.5 - 1) * 0.4)
    vals = [rl.noise_probability(i, 20, 0.1, 0.9) for i in range(21)]
    assert vals == sorted(vals) and vals[0] == pytest.approx(0.1) and vals[-1] == pytest.approx(0.9)
    # the exponential ramp stays below the linear one in between (slow start, fast end)
    assert all(v < 0.1 + 0.8 * i / 20 for i, v in enumerate(vals) if 0 < i < 20)


def test_curriculum_step_m_of_m_uses_the_end_value(tmp_path, train_file, tiny_model_dir):
    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir), steps=4, noise_start=0.1, noise_end=0.5)
    trainer, _, recorder, _ = rl.build_trainer(cfg)
    logged = []
    for done in range(cfg.steps):  # TRL's global_step during step i (1-based) is i - 1
        trainer.state.global_step = done
        trainer.rollout_func(["question number 0?", "question number 0?"], trainer)
        logged.append((recorder.pending["step"], recorder.pending["noise_p"]))
    assert logged == [(i, pytest.approx(rl.noise_probability(i, 4, 0.1, 0.5))) for i in (1, 2, 3, 4)]
    assert logged[-1][1] == pytest.approx(0.5) and logged[0][1] > 0.1


def test_trl_settings_match_the_rollout(tmp_path, train_file, tiny_model_dir):
    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir), algo="dr_grpo", max_new_tokens=8,
               max_response_tokens=64, temperature=0.7)
    trainer, *_ = rl.build_trainer(cfg)
    # dr_grpo divides the loss by max_completion_length: it must be the whole response budget
    assert trainer.max_completion_length == trainer.args.max_completion_length == 64
    # TRL's loss and logprobs assume sampling from the full softmax at this temperature
    assert trainer.temperature == 0.7 and trainer.top_p == 1.0 and trainer.top_k in (0, None)
    # TRL defaults activation checkpointing on; we turn it off under either of transformers' names for it
    assert not trainer.args.gradient_checkpointing and not getattr(trainer.args, "activation_checkpointing", False)
    assert not trainer.model.is_gradient_checkpointing
    # bf16 as inference has it: autocast over float32 weights on a CPU with bf16 instructions
    import torch

    from zsctl.core.models import use_bf16

    assert trainer.args.bf16 == use_bf16("cpu") and next(trainer.model.parameters()).dtype == torch.float32


def test_hf_rollouts_sample_from_the_full_softmax(tmp_path, train_file, tiny_model_dir, monkeypatch):
    """TRL's loss treats HF rollouts as exactly on-policy under softmax(logits / T): no top-k/top-p cut."""
    from zsctl.core import generation

    trainer, *_ = rl.build_trainer(_cfg(tmp_path, train_file, policy=str(tiny_model_dir), temperature=1.0))
    support = []
    draw = generation._draw

    def probe(logp):
        support.append(int(logp.isfinite().sum(-1).min()))
        return draw(logp)

    monkeypatch.setattr(generation, "_draw", probe)
    trainer.rollout_func(["question number 0?", "question number 1?"], trainer)
    assert support and min(support) == trainer.model.config.vocab_size


def test_dapo_trajectory_that_used_up_its_turns_is_finished(tmp_path, train_file, corpus_file, tiny_model_dir):
    """A trajectory that never answers must reach the loss (and be penalised) under dapo's truncation mask."""
    model, tok = load_model(str(tiny_model_dir))
    script_model(model, tok, {
        "number 0": ["<search> alpha </search>", "<search> bravo </search>"],  # searches in its final round
        "number 1": ["<answer> nope </answer>"],
    })
    cfg = _cfg(tmp_path, train_file, search=f"bm25:{corpus_file}", lora=False, algo="dapo", topk=1, max_turns=1,
               max_new_tokens=24, max_response_tokens=400, temperature=0.0)
    trainer, *_ = rl.build_trainer(cfg, policy=(model, tok))
    assert trainer.mask_truncated_completions
    out = trainer.rollout_func(["question number 0?", "question number 1?"], trainer)
    for ids, mask in zip(out["completion_ids"], out["env_mask"]):
        assert ids[-1] == tok.eos_token_id and mask[-1] == 0  # closed by us, not trained on
    assert out["prediction"] == ["", "nope"] and out["num_searches"] == [1, 0]


def test_completion_never_exceeds_the_response_budget(tmp_path, train_file, corpus_file, tiny_model_dir):
    """max_response_tokens bounds what TRL trains on; an answer cut off by the bound is no answer."""
    model, tok = load_model(str(tiny_model_dir))
    script = script_model(model, tok, {"number 0": ["<search> alpha </search>", "<answer> answer 0 </answer>"]})
    cfg = _cfg(tmp_path, train_file, search=f"bm25:{corpus_file}", lora=False, topk=2, max_turns=2,
               max_new_tokens=24, max_response_tokens=1000, temperature=0.0)
    trainer, *_ = rl.build_trainer(cfg, policy=(model, tok))
    full = trainer.rollout_func(["question number 0?"], trainer)
    ids, mask = full["completion_ids"][0], full["env_mask"][0]
    assert full["prediction"] == ["answer 0"]
    search_len = mask.index(0)  # the policy's search, then the inserted documents
    answer_start = len(mask) - 1 - mask[:-1][::-1].index(0)  # first token of the answer round
    for budget in (search_len + 3, answer_start + 3):  # inside the documents; inside the answer
        small = replace(
            cfg, max_response_tokens=budget, max_new_tokens=min(24, budget), out=str(tmp_path / f"b{budget}")
        )
        trainer, _, recorder, _ = rl.build_trainer(small, policy=(model, tok))
        script.rounds = {k: -1 for k in script.rounds}  # the script starts over
        out = trainer.rollout_func(["question number 0?"], trainer)
        assert len(out["completion_ids"][0]) == len(out["env_mask"][0]) == budget
        assert out["completion_ids"][0] == ids[:budget] and out["env_mask"][0] == mask[:budget]
        assert out["prediction"] == [""]
        rows = pq.read_table(next(recorder.rollouts_dir.glob("step-000001-*.parquet"))).to_pylist()
        assert rows[0]["reward"] == 0.0 and rows[0]["response"] == tok.decode(ids[:budget], skip_special_tokens=True)


def test_rewards_on_crafted_completions():
    golds = [["Paris"], ["Paris"], ["Paris"], ["Paris"]]
    completions = [
        "<think>x</think><answer> Paris </answer>",
        "<search>q</search><information>Doc 1: <answer>Paris</answer></information><answer>Lyon</answer>",
        "no answer at all",
        "<answer>the city of Paris</answer>",
    ]
    assert f1_reward(completions, golds) == [1.0, 0.0, 0.0, pytest.approx(2 * (1 / 3) / (1 / 3 + 1))]
    assert em_reward(completions, golds) == [1.0, 0.0, 0.0, 0.0]
    assert f1_format_reward(completions, golds)[1:3] == [0.1, 0.0]
    # a search that names nothing forfeits the format credit, not the F1
    queries = [["Paris"], ["I will look it up."], [], ["capital of France", "query"]]
    assert f1_format_reward(completions, golds, queries=queries) == [
        1.0, 0.0, 0.0, pytest.approx(2 * (1 / 3) / (1 / 3 + 1))]
    assert f1_format_reward(completions[1:2], golds[1:2], queries=[["Lyon mayor"]]) == [0.1]
    # the rollout's own prediction wins over text extraction (prompt example never counted)
    assert f1_reward(["<answer>Paris</answer>"], [["Paris"]], prediction=[""]) == [0.0]


def test_env_mask_is_zero_exactly_on_inserted_tokens(tmp_path, train_file, corpus_file, tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    script_model(model, tok, {
        "number 0": ["<search> alpha </search>", "<answer> answer 0 </answer>"],
        "number 1": ["<answer> nope </answer>"],
    })
    cfg = _cfg(tmp_path, train_file, search=f"bm25:{corpus_file}", lora=False, topk=2, max_turns=2,
               max_new_tokens=24, max_response_tokens=400, temperature=0.0)
    trainer, engine, recorder, _ = rl.build_trainer(cfg, policy=(model, tok))
    out = trainer.rollout_func(["question number 0?", "question number 1?"], trainer)
    ids0, mask0 = out["completion_ids"][0], out["env_mask"][0]
    assert len(ids0) == len(mask0)
    inserted = tok.decode([t for t, m in zip(ids0, mask0) if m == 0], skip_special_tokens=False)
    own = tok.decode([t for t, m in zip(ids0, mask0) if m == 1])
    assert own == "<search> alpha </search><answer> answer 0 </answer>"
    assert inserted.startswith(
        "\n\n<information>Doc 1: (Title alpha) alpha answers question alpha\nDoc 2:"
    ) and inserted.endswith("</information>\n\n" + tok.eos_token)
    assert out["prediction"] == ["answer 0", "nope"] and out["queries"] == [["alpha"], []]  # reward kwargs
    assert out["env_mask"][1] == [1] * (len(out["env_mask"][1]) - 1) + [0]  # only the closing EOS is ours
    rows = pq.read_table(next(recorder.rollouts_dir.glob("step-000001-*.parquet"))).to_pylist()
    assert [r["reward"] for r in rows] == [1.0, 0.0] and rows[0]["num_searches"] == 1


def test_two_steps_train_and_write_artifacts(tmp_path, train_file, tiny_model_dir, monkeypatch):
    import torch

    from zsctl.core.rewards import REWARDS

    # a random tiny model never answers, so F1 is 0 everywhere and advantages vanish; a reward that
    # varies with the sampled text gives the gradient something to follow
    monkeypatch.setitem(REWARDS, "length", lambda completions, **_: [len(c) / 100 for c in completions])
    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir), lora=False, lr=1e-2, reward="length")
    before = {k: v.clone() for k, v in load_model(str(tiny_model_dir))[0].state_dict().items()}
    summary = rl.run(cfg)
    out = tmp_path / "run"
    manifest = read_manifest(out)
    assert manifest["kind"] == "policy" and summary["steps"] == 2
    assert "noise_p_last" not in summary  # no simulator drew useful/noisy: nothing to report
    # no length recorded for this policy: rl's own default, recorded for eval and a next rl
    assert manifest["config"]["max_doc_words"] == manifest["doc_words"] == rl.DEFAULT_DOC_WORDS
    assert artifacts.policy_doc_words(str(out)) == rl.DEFAULT_DOC_WORDS
    after, _ = load_model(str(out))
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training changed no weight"
    rollouts = read_table_file(out / "rollouts.parquet", ROLLOUTS)
    assert rollouts.num_rows == 8 and sorted(set(rollouts.column("step").to_pylist())) == [1, 2]
    mets = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mets] == [1, 2]
    for m in mets:
        assert math.isfinite(m["loss"]) and 0 <= m["valid_answer_rate"] <= 1 and m["noise_p"] >= 0
        assert 0 <= m["search_seconds"] <= m["rollout_seconds"] <= m["step_seconds"]
        assert m["threads"] == torch.get_num_threads()  # recorded per step (--threads auto changes it)


def test_lora_run_merges_and_resume_continues(tmp_path, train_file, tiny_model_dir):
    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir), steps=2, save_every=1)
    rl.run(cfg)
    out = tmp_path / "run"
    assert (out / "checkpoints" / "checkpoint-2" / rl.DONE_MARK).is_file()
    # pretend the run died after step 1: drop the last checkpoint, then resume
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    summary = rl.run(_cfg(tmp_path, train_file, policy=str(tiny_model_dir), steps=2, save_every=1, resume=True))
    assert summary["resumed_from_step"] == 1
    mets = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mets] == [1, 2]  # each step exactly once
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()  # merged


def test_sigkill_mid_step_then_resume_logs_each_step_once(tmp_path, train_file, tiny_model_dir):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "zsctl", "rl", "--policy", str(tiny_model_dir), "--search", "none",
            "--train", str(train_file), "--out", str(out), "--steps", "6", "--batch-size", "4", "--group-size", "2",
            "--max-turns", "1", "--max-new-tokens", "8", "--lr", "1e-3", "--save-every", "1", "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # kill -9 as soon as checkpoint-2 is complete: the process is then inside step 3 (or saving it)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "checkpoint-2" / rl.DONE_MARK).is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(BadInput, match="incomplete artifact"):  # the folder says it is unfinished
        read_manifest(out)

    done = subprocess.run(argv + ["--resume", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] >= 2
    assert read_manifest(out)["kind"] == "policy"
    mets = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mets] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    rollouts = read_table_file(out / "rollouts.parquet", ROLLOUTS).to_pylist()
    assert sorted(r["step"] for r in rollouts) == sorted(list(range(1, 7)) * 4)

    # same data order and curriculum as a run that was never interrupted
    ref = tmp_path / "ref"
    rl.run(_cfg(tmp_path, train_file, policy=str(tiny_model_dir), out=str(ref), steps=6, save_every=1, lora=True,
                lora_r=16))
    def order(path):
        rows = read_table_file(path / "rollouts.parquet", ROLLOUTS).to_pylist()
        return [
            (r["step"], r["question_id"], round(r["noise_p"], 9))
            for r in sorted(rows, key=lambda r: (r["step"], r["sample"], r["question_id"]))
        ]

    assert order(out) == order(ref)


def test_resume_never_takes_an_earlier_runs_checkpoint(tmp_path, train_file, tiny_model_dir):
    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir), steps=2, save_every=1)
    rl.run(cfg)  # an earlier run in the same --out, finished: checkpoints 1 and 2 marked complete
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "checkpoint-2" / rl.DONE_MARK).is_file()
    trainer, *_ = rl.build_trainer(cfg)  # a new run starts there ...
    marked_during_save = []
    save = trainer._save_checkpoint

    def spy(*a, **kw):
        marked_during_save.append((ckpts / f"checkpoint-{trainer.state.global_step}" / rl.DONE_MARK).exists())
        return save(*a, **kw)

    trainer._save_checkpoint = spy
    trainer.args.max_steps = 1
    trainer.train()  # ... saves its checkpoint-1, then dies before step 2
    assert marked_during_save == [False]  # a checkpoint being written is never marked finished
    assert (ckpts / "checkpoint-1" / rl.DONE_MARK).is_file() and not (ckpts / "checkpoint-2").exists()
    _, _, _, resume_from = rl.build_trainer(replace(cfg, resume=True))
    assert resume_from == str(ckpts / "checkpoint-1")


def test_resume_refuses_a_run_with_other_settings(tmp_path, train_file, corpus_file, tiny_model_dir):
    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir))
    rl.build_trainer(cfg)
    changes = dict(search=f"bm25:{corpus_file}", reward="em", max_turns=3, lr=1e-4, beta=0.01, temperature=0.7,
                   max_new_tokens=16, max_response_tokens=128, open_only=True)
    for key, value in changes.items():
        with pytest.raises(BadInput, match=f"{key}: {getattr(cfg, key)} then, {value} now"):
            rl.build_trainer(replace(cfg, resume=True, **{key: value}))
    rl.build_trainer(replace(cfg, resume=True, save_every=3, val_every=0))  # not part of a run's identity


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_use_vllm_trains_with_vllm_logprobs(tmp_path, train_file, tiny_model_dir, monkeypatch, mode):
    """`--use-vllm` through TRL's own VLLMGeneration with a stand-in engine (tests/vllm_standin.py):
    the policy tokens' logprobs reach TRL aligned with the completion, so its importance-sampling
    correction sees ratio 1, and training runs."""
    import vllm_standin  # imports trl

    vllm_standin.install(monkeypatch)
    # the stand-in scores in float32; a trainer under bf16 autocast would see ratios 1 +- 1e-3
    monkeypatch.setenv("ZSCTL_BF16", "0")
    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir), use_vllm=True, vllm_mode=mode, lora=False, steps=2,
               max_turns=1, max_new_tokens=8, max_response_tokens=48)
    trainer, _, recorder, _ = rl.build_trainer(cfg)
    assert trainer.use_vllm and trainer.vllm_importance_sampling_correction
    outputs = train_capturing_rollouts(trainer)
    assert len(outputs) == 2
    assert_logprobs_aligned(outputs, cfg.max_response_tokens, policy_below=0)
    assert any(0 in m[:-1] for out in outputs for m in out["env_mask"])  # inserted notes inside completions
    engine = trainer.vllm_generation.engine
    assert engine.calls and trainer.vllm_generation.syncs == 2  # TRL synced weights once per step
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/max" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["sampling/sampling_logp_difference/max"] < 1e-3 and math.isfinite(h["loss"])
        assert h["sampling/importance_sampling_ratio/min"] == pytest.approx(1.0, abs=1e-3)
    assert trainer.vllm_generation.generation_kwargs["max_tokens"] == cfg.max_new_tokens  # per round
    mets = [pq.read_table(f).to_pylist()[0] for f in sorted(recorder.metrics_dir.glob("*.parquet"))]
    assert [m["step"] for m in mets] == [1, 2] and all(
        m["vllm_is_ratio_min"] == pytest.approx(1.0, abs=1e-3) for m in mets
    )


def test_vllm_server_mode_ranks_ending_in_different_rounds_do_not_deadlock(tmp_path, corpus_file, tiny_model_dir):
    """2 processes (gloo), TRL's server-mode generation (a collective per call): process 0's rows answer
    in round 1, process 1's search until their turns run out, and the two hold different numbers of rows."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "tests" / "vllm_standin.py"), str(tiny_model_dir), str(corpus_file), "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the two processes deadlocked")
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    ranks, engine = result[:2], result[2]
    assert ranks[0]["stops"] == ["answer"] * 2 and ranks[0]["searches"] == [0, 0]
    assert ranks[1]["stops"] == ["turns"] * 3 and ranks[1]["searches"] == [2, 2, 2]
    for r in ranks:
        assert r["lockstep"] and r["generate_calls"] == 3  # every round, also with no row left
        assert r["logprobs_aligned"] and r["policy_logprobs_negative"] and r["inserted_logprobs_zero"]
    assert engine["engine_calls"] == [6, 6, 6]  # each process padded to the larger share, 3 rows


def test_gpu_check_commands_parse(tmp_path):
    """pipelines/gpu_check.sh needs a GPU; its dry run checks every zsctl command's options here."""
    env = dict(os.environ, DRY_RUN="1", RUN=str(tmp_path / "gpu_check"), PY=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "pipelines" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"dry_run"')]
    assert [r["stage"] for r in runs] == ["index", "collect", "build_sft", "train_sim", "check_sim", "rl"]
    rl_cfg = runs[-1]["config"]
    assert rl_cfg["use_vllm"] and rl_cfg["vllm_mode"] == "colocate" and rl_cfg["steps"] == 5
    assert rl_cfg["search"] == runs[4]["config"]["search"]  # the served simulator answers the policy's searches


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(group_size=1), "--group-size 1"),
        (dict(batch_size=5, group_size=2), "not divisible"),
        (dict(algo="ppo"), "--algo 'ppo'"),
        (dict(max_new_tokens=64, max_response_tokens=32), "--max-response-tokens 32 must hold at least one round"),
        (dict(vllm_mode="remote"), "--vllm-mode 'remote'"),
        (dict(resume=True), "holds no zsctl rl run"),
    ],
)
def test_bad_input(tmp_path, train_file, kw, needle):
    with pytest.raises(BadInput, match=needle):
        rl.build_trainer(_cfg(tmp_path, train_file, policy="x", **kw))


def test_open_only_drops_questions_a_guess_answers(tmp_path, tiny_model_dir):
    f = tmp_path / "t.jsonl"
    rows = [("Who is younger, Mart Van Duren or Madeleine Simms?", ["Mart Van Duren"]),  # names its answer
            ("Is Lima in Peru?", ["yes"]),
            ("Who wrote Hamlet?", ["Shakespeare"])]
    f.write_text("".join(json.dumps({"id": str(i), "question": q, "golden_answers": g}) + "\n"
                         for i, (q, g) in enumerate(rows)))
    assert len(rl.load_train_questions(str(f), None)) == 3
    assert [r["question"] for r in rl.load_train_questions(str(f), None, open_only=True)] == ["Who wrote Hamlet?"]
    f.write_text("".join(json.dumps({"id": str(i), "question": q, "golden_answers": g}) + "\n"
                         for i, (q, g) in enumerate(rows[:2])))
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["rl", "--policy", str(tiny_model_dir), "--search", "none", "--train", str(f),
                                 "--open-only", "--out", str(out)])
    assert r.exit_code == 2 and "--open-only leaves no question" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (out / "manifest.json").exists()


def test_cli_train_file_without_golden_answers(tmp_path, tiny_model_dir):
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "q?"}) + "\n")
    r = CliRunner().invoke(app, ["rl", "--policy", str(tiny_model_dir), "--search", "none", "--train", str(bad),
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "golden_answers" in r.output
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.slow
def test_two_process_accelerate_launch_on_cpu(tmp_path, train_file, corpus_file, tiny_model_dir):
    """`accelerate launch` with 2 CPU processes (torch.distributed over gloo): both ranks roll out,
    the main process logs metrics over both ranks' rollouts and writes the one manifest."""
    import os

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "zsctl", "rl", "--policy", str(tiny_model_dir), "--search", f"bm25:{corpus_file}",
           "--train", str(train_file), "--out", str(out), "--steps", "2", "--batch-size", "4", "--group-size", "2",
           "--max-turns", "1", "--max-new-tokens", "8", "--lr", "1e-3", "--save-every", "1", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only the main process reports
    summary = json.loads(summaries[0])
    assert summary["steps"] == 2 and summary["rollouts"] == 2 * 2 * 4  # steps x ranks x batch
    assert read_manifest(out)["kind"] == "policy"
    rollouts = read_table_file(out / "rollouts.parquet", ROLLOUTS).to_pylist()
    assert sorted({f.name.split("-r")[-1] for f in (out / "rollouts.steps").glob("*.parquet")}) == [
        "0.parquet",
        "1.parquet",
    ]
    assert sorted(r["step"] for r in rollouts) == [1] * 8 + [2] * 8
    mets = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mets] == [1, 2] and all(math.isfinite(m["loss"]) for m in mets)
    assert all((out / "checkpoints" / f"checkpoint-{s}" / rl.DONE_MARK).is_file() for s in (1, 2))


@pytest.mark.slow
def test_two_process_vllm_server_mode_rl_run(tmp_path, train_file, corpus_file, tiny_model_dir):
    """`zsctl rl --use-vllm --vllm-mode server` under `accelerate launch` with 2 CPU processes and the
    stand-in engine: process 0's rollouts answer in round 1, process 1's search until their turns run
    out, every step; training runs with vLLM's logprobs and ends with one manifest."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "tests" / "vllm_standin.py"), "rl", "--policy", str(tiny_model_dir), "--search",
           f"bm25:{corpus_file}", "--train", str(train_file), "--out", str(out), "--steps", "2", "--batch-size", "4",
           "--group-size", "2", "--max-turns", "2", "--max-new-tokens", "16", "--lr", "1e-3", "--use-vllm",
           "--vllm-mode", "server", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_manifest(out)["kind"] == "policy"
    for rank, searches in ((0, 0), (1, 2)):
        rows = [
            row for f in (out / "rollouts.steps").glob(f"*-r{rank}.parquet") for row in pq.read_table(f).to_pylist()
        ]
        assert len(rows) == 2 * 4 and all(row["num_searches"] == searches for row in rows)
    mets = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mets] == [1, 2]
    assert all(m["vllm_is_ratio_min"] == pytest.approx(1.0, abs=1e-3) and math.isfinite(m["loss"]) for m in mets)


@pytest.mark.slow
def test_smollm2_few_rl_steps_with_simulated_search(tmp_path):
    """SmolLM2-135M policy, its searches answered by the untuned SmolLM2 simulator (prompt mode) with
    the noise curriculum, on bundled training questions."""
    out = tmp_path / "run"
    cfg = rl.RLConfig(policy="smollm2-135m", search="sim:smollm2-135m?sim_mode=prompt", train="hotpotqa",
                      out=str(out), steps=3, batch_size=4, group_size=2, max_turns=2, max_new_tokens=32, topk=2,
                      lr=1e-4, reward="f1+format", noise_start=0.0, noise_end=0.5, limit=16)
    summary = rl.run(cfg)
    print(json.dumps(summary, default=str))
    assert read_manifest(out)["kind"] == "policy"
    mets = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mets] == [1, 2, 3]
    assert [m["noise_p"] for m in mets] == pytest.approx([rl.noise_probability(i, 3, 0.0, 0.5) for i in (1, 2, 3)])
    assert summary["noise_p_last"] == pytest.approx(0.5)  # the curriculum's end, at the last step
    assert all(math.isfinite(m["loss"]) and m["generated_tokens"] > 0 for m in mets)
    model, tok = load_model(str(out))  # the merged policy reloads and generates
    ids = tok("Question: who wrote Hamlet?", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]


@pytest.mark.parametrize("algo", ["grpo", "dapo", "dr_grpo"])
def test_trimming_padding_leaves_the_loss_and_its_gradient_unchanged(tmp_path, train_file, tiny_model_dir, algo):
    import torch

    cfg = _cfg(tmp_path, train_file, policy=str(tiny_model_dir), algo=algo, lora=False)
    trainer, *_ = rl.build_trainer(cfg)
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    # two rows: prompts of 5 and 3 tokens (left-padded to 9), completions of 4 and 2 tokens (right-padded to 12);
    # the second row's inserted tokens (tool mask 0) sit inside its completion
    prompt_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1]])
    completion_mask = torch.zeros(2, 12, dtype=torch.long)
    completion_mask[0, :4] = 1
    completion_mask[1, :2] = 1
    tool_mask = torch.ones(2, 12, dtype=torch.long)
    tool_mask[1, 1] = 0
    batch = {
        "prompt_ids": torch.randint(5, 60, (2, 9), generator=g) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(5, 60, (2, 12), generator=g) * completion_mask,
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "advantages": torch.tensor([0.7, -0.7]),
        "num_items_in_batch": completion_mask.sum(),
        # sampled and reference log-probs are completion-aligned too (KL term; importance ratio != 1)
        "old_per_token_logps": -torch.rand(2, 12, generator=g) * completion_mask,
        "ref_per_token_logps": -torch.rand(2, 12, generator=g) * completion_mask,
    }
    trimmed = rl.trim_padding(batch)
    assert trimmed["prompt_ids"].shape == (2, 5) and trimmed["completion_ids"].shape == (2, 4)
    assert trimmed["tool_mask"].shape == trimmed["ref_per_token_logps"].shape == (2, 4)
    assert trimmed["advantages"].shape == (2,)

    def loss_and_grads(b):
        model.zero_grad()
        loss = trainer._compute_loss(model, b)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop
    full_loss, full_grads = loss_and_grads(batch)
    cut_loss, cut_grads = loss_and_grads(trimmed)
    assert full_loss != 0 and torch.allclose(full_loss, cut_loss, atol=1e-6)
    assert len(full_grads) == len(cut_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(full_grads, cut_grads))

    # the rows computed in groups of similar length (here one row each) sum to the same loss and gradient
    trainer.group_overhead = 0
    assert length_groups([4, 2], overhead=0) == [[1], [0]] and length_groups([4, 2], overhead=8) == [[1, 0]]
    model.zero_grad()
    grouped = trainer.compute_loss(model, batch)
    grouped.backward()
    grouped_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.allclose(full_loss, grouped.detach(), atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(full_grads, grouped_grads))


def test_unset_doc_words_resolve_to_the_policys_record_else_40(tmp_path, train_file):
    """build_trainer (bench/rl_step.py, tests) and run resolve --max-doc-words the same way."""
    policy = tmp_path / "warm"
    policy.mkdir()
    artifacts.write_manifest(policy, "policy", config={}, extra={"doc_words": 30})
    assert rl.resolved(_cfg(tmp_path, train_file, policy=str(policy))).max_doc_words == 30
    assert rl.resolved(_cfg(tmp_path, train_file, policy="smollm2-135m")).max_doc_words == rl.DEFAULT_DOC_WORDS
    assert rl.resolved(_cfg(tmp_path, train_file, policy=str(policy), max_doc_words=12)).max_doc_words == 12
