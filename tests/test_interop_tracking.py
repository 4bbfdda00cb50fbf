"""--report-to: experiment tracking passed through to TRL for train-sim, warmup and rl."""

from __future__ import annotations

import importlib.util

import pytest

from zsctl.core.errors import BadInput
from zsctl.sft import REPORT_TO
from zsctl.stages import rl, train_sim, warmup

HAVE = {name: importlib.util.find_spec(name) is not None for name in REPORT_TO if name != "none"}


def _configs(report_to: str):
    yield train_sim.TrainSimConfig(data="d", base="b", out="o", report_to=report_to)
    yield warmup.WarmupConfig(data="d", policy="p", out="o", report_to=report_to)
    yield rl.RLConfig(search="none", train="nq", out="o", report_to=report_to)


def test_every_tracker_is_offered_by_every_training_stage():
    assert set(REPORT_TO) == {"none", "tensorboard", "wandb", "trackio"}
    for cfg in _configs("none"):
        assert cfg.report_to == "none"


@pytest.mark.parametrize("name", [n for n, have in HAVE.items() if not have])
def test_a_tracker_that_is_not_installed_is_one_line_bad_input(name):
    for make in (lambda: train_sim.TrainSimConfig(data="d", base="b", out="o", report_to=name),
                 lambda: warmup.WarmupConfig(data="d", policy="p", out="o", report_to=name),
                 lambda: rl.RLConfig(search="none", train="nq", out="o", report_to=name)):
        with pytest.raises(BadInput, match=f"--report-to {name} needs the '{name}' package") as e:
            make()
        assert "\n" not in str(e.value)


def test_an_unknown_tracker_is_refused():
    with pytest.raises(BadInput, match="--report-to 'mlflow' is not one of none, tensorboard, wandb, trackio"):
        rl.RLConfig(search="none", train="nq", out="o", report_to="mlflow")


@pytest.mark.skipif(not HAVE["tensorboard"], reason="tensorboard is not installed")
def test_tensorboard_event_files_are_kept_with_the_model(tiny_model_dir, tmp_path, monkeypatch):
    from test_train_sim import make_sim_sft

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # tensorboard's default folder is runs/ here

    data = make_sim_sft(tmp_path / "sim_sft")
    out = tmp_path / "sim"
    cfg = train_sim.TrainSimConfig(data=str(data), base=str(tiny_model_dir), out=str(out), max_steps=2,
                                   batch_size=4, max_length=512, report_to="tensorboard")
    train_sim.run(cfg)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert not list(cwd.iterdir())  # nothing left in the working directory


@pytest.mark.skipif(not HAVE["tensorboard"], reason="tensorboard is not installed")
def test_rl_logs_each_step_to_tensorboard(tiny_model_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(f'{{"id": "q{i}", "question": "question {i}?", "golden_answers": ["a{i}"]}}\n' for i in range(4))
    )
    cfg = rl.RLConfig(policy=str(tiny_model_dir), search="none", train=str(train), out=str(tmp_path / "run"), steps=2,
                      batch_size=4, group_size=2, max_turns=1, max_new_tokens=8, max_response_tokens=64, lora_r=4,
                      report_to="tensorboard")
    rl.run(cfg)
    events = list((tmp_path / "run" / "checkpoints" / "runs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
