"""The demo pipeline end to end with a tiny model and tiny sizes; every pipeline script parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from zsctl.core.artifacts import read_manifest


@pytest.mark.parametrize("script", sorted((ROOT / "pipelines").glob("*.sh")), ids=lambda p: p.name)
def test_pipeline_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def _env(**kw):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update({k: str(v) for k, v in kw.items()})
    return env


@pytest.mark.parametrize("script", ["gpu.sh", "multinode.sh"])
def test_recipes_dry_run(script):
    p = subprocess.run(["bash", str(ROOT / "pipelines" / script)], env=_env(DRY_RUN=1), capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    configs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"dry_run"')]
    assert configs and all(c["config"] for c in configs)


def test_tiny_demo_end_to_end(tmp_path, tiny_model_dir):
    run = tmp_path / "demo"
    env = _env(RUN=run, MODEL=tiny_model_dir, QUIET=1, WARM_STEPS=2, SIM_STEPS=2, VERIFY=1, RL_STEPS=2, N_CHECK=4,
               N_EVAL=3, EVAL="bamboogle", ZSCTL_CACHE_DIR=tmp_path / "cache")
    p = subprocess.run(["bash", str(ROOT / "pipelines" / "demo.sh")], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    kinds = {
        "index": "bm25_index", "question_searches": "trajectories", "policy_sft": "policy_sft", "warmup": "policy",
        "sim_sft": "sim_sft", "simulator": "simulator", "check_sim": "check_sim",
        "policy": "policy", "eval_base": "predictions", "eval_warmup": "predictions", "eval_policy": "predictions",
        "report": "report",
    }
    for name, kind in kinds.items():
        assert read_manifest(run / name)["kind"] == kind, name
    assert (run / "report" / "report.md").read_text().startswith("# zsctl report")
    assert list((run / "report").glob("*.png")), "no plots"
    # the report prints the before/after table: every evaluated policy on the held-apart questions
    assert "Evaluation with the real engine" in p.stdout
    assert all(f"eval_{name}" in p.stdout for name in ("base", "warmup", "policy"))


def _running(marker: str) -> list[str]:
    """Command lines of this machine's processes that mention `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if marker in text:
            found.append(text)
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_demo_stops_the_stages_beside_a_failed_one(tmp_path, tiny_model_dir):
    # warmup fails (bad input) while the simulator's checks run beside it: the demo stops, and so do they
    run = tmp_path / "demo"
    env = _env(RUN=run, MODEL=tiny_model_dir, QUIET=1, WARM_STEPS=-1, SIM_STEPS=2, VERIFY=1, RL_STEPS=2, N_CHECK=4,
               N_EVAL=3, EVAL="bamboogle", ZSCTL_CACHE_DIR=tmp_path / "cache")
    p = subprocess.run(["bash", str(ROOT / "pipelines" / "demo.sh")], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    assert p.returncode == 1, (p.stdout[-3000:], p.stderr[-3000:])
    assert "--max-steps -1" in p.stderr and "demo: warmup failed" in p.stderr
    assert (run / "simulator").is_dir() and not (run / "policy").exists()
    assert _running(str(run)) == []
