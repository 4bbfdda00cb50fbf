"""Artifacts: atomic write order, manifest contents, validated reads and refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zsctl.core import artifacts
from zsctl.core.errors import BadInput
from zsctl.core.schemas import QUESTIONS, TRAJECTORIES


def _questions(n=3):
    return pa.Table.from_pylist(
        [{"id": f"q{i}", "question": f"Q{i}?", "golden_answers": [f"a{i}"], "data_source": "t"} for i in range(n)],
        schema=QUESTIONS,
    )


def test_round_trip_and_manifest(tmp_path):
    out = tmp_path / "art"
    m = artifacts.write_artifact(
        out,
        "questions",
        _questions(),
        config={"x": 1, "api_key": "sekrit", "hf_token": "tok123", "max_new_tokens": 64},
        seed=7,
        summary={"rows": 3},
    )
    assert (out / "manifest.json").is_file()
    t = artifacts.read_artifact(out, "questions")
    assert t.num_rows == 3 and t.column("id").to_pylist() == ["q0", "q1", "q2"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m, default=str))
    assert on_disk["kind"] == "questions" and on_disk["seed"] == 7
    assert on_disk["files"]["questions.parquet"]["rows"] == 3
    assert len(on_disk["files"]["questions.parquet"]["sha256"]) == 64
    assert "sekrit" not in (out / "manifest.json").read_text() and "tok123" not in (out / "manifest.json").read_text()
    assert on_disk["config"]["max_new_tokens"] == 64  # a count of tokens is not a secret
    for key in ("created_at", "zsctl_version", "argv", "config_hash", "inputs", "libraries", "schema_version"):
        assert key in on_disk


def test_dir_without_manifest_is_refused(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    pq.write_table(_questions(), out / "questions.parquet")
    with pytest.raises(BadInput, match="incomplete artifact"):
        artifacts.read_artifact(out, "questions")


def test_wrong_kind_and_missing_columns_are_named(tmp_path):
    artifacts.write_artifact(tmp_path / "q", "questions", _questions(), config={})
    with pytest.raises(BadInput, match="'questions' artifact, expected 'trajectories'"):
        artifacts.read_artifact(tmp_path / "q", "trajectories")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"traj_id": ["a"], "question": [1]}), bad)
    with pytest.raises(BadInput) as e:
        artifacts.read_table_file(bad, TRAJECTORIES)
    msg = str(e.value)
    assert "missing column 'searches'" in msg and "column 'question' is int64" in msg and "bad.parquet" in msg


def test_in_place_rerun_keeps_the_old_artifact_until_it_marks_it(tmp_path):
    out = tmp_path / "art"
    artifacts.write_artifact(out, "questions", _questions(), config={})
    artifacts.prepare_out(out, "questions")  # its files are not touched yet: still valid
    assert artifacts.read_artifact(out, "questions").num_rows == 3
    artifacts.mark_incomplete(out, "questions")  # just before they are replaced
    with pytest.raises(BadInput, match="incomplete artifact"):
        artifacts.read_artifact(out, "questions")
    fresh = artifacts.prepare_out(tmp_path / "new", "questions")  # nothing valid there: incomplete at once
    with pytest.raises(BadInput, match="incomplete artifact"):
        artifacts.read_manifest(fresh)


def test_kill_during_write_leaves_no_manifest(tmp_path):
    """SIGKILL a writer midway through its data: the directory must not look complete."""
    out = tmp_path / "art"
    code = textwrap.dedent(
        f"""
        import os, signal, pyarrow as pa
        from zsctl.core import artifacts
        from zsctl.core.schemas import QUESTIONS
        out = artifacts.prepare_out({str(out)!r}, "questions")
        w = artifacts.ShardWriter(out, "questions", QUESTIONS)
        w.write([{{"id": "a", "question": "q", "golden_answers": ["x"], "data_source": "t"}}])
        os.kill(os.getpid(), signal.SIGKILL)  # dies before the manifest
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    with pytest.raises(BadInput, match="incomplete artifact"):
        artifacts.read_manifest(out)
    # the shard written before the kill is whole and readable (resume builds on it)
    assert artifacts.ShardWriter(out, "questions", QUESTIONS).read_all().num_rows == 1
    assert not any(p.name.startswith(".") for p in out.rglob("*") if p.is_file())


def test_staged_write_keeps_the_old_artifact_until_the_new_one_is_whole(tmp_path):
    out = tmp_path / "art"
    artifacts.write_artifact(out, "questions", _questions(2), config={})
    with pytest.raises(RuntimeError):
        with artifacts.staging(out) as tmp:
            artifacts.write_table(tmp, "questions.parquet", _questions(5))
            raise RuntimeError("died before the manifest")
    assert artifacts.read_artifact(out, "questions").num_rows == 2  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging folder left
    artifacts.write_artifact(out, "questions", _questions(5), config={})
    assert artifacts.read_artifact(out, "questions").num_rows == 5


def test_check_out_refuses_inputs_and_other_kinds(tmp_path):
    artifacts.write_artifact(tmp_path / "q", "questions", _questions(), config={})
    with pytest.raises(BadInput, match="'trajectories'"):
        artifacts.check_out(tmp_path / "q", "trajectories")
    with pytest.raises(BadInput, match="overwrite what it reads"):
        artifacts.check_out(tmp_path / "q", "questions", [f"bm25:{tmp_path / 'q'}"])
    with pytest.raises(BadInput, match="overwrite what it reads"):
        artifacts.check_out(tmp_path, "questions", [f"x.jsonl,{tmp_path / 'q' / 'questions.parquet'}"])
    assert artifacts.check_out(tmp_path / "q", "questions") == tmp_path / "q"
    assert artifacts.check_out(tmp_path / "new", "questions", [str(tmp_path / "q")]) == tmp_path / "new"


def test_manifests_never_hold_credentials(tmp_path):
    spec = "http://me:hunter2@h:1/retrieve?api_key=abc123&topk=3"
    m = artifacts.write_artifact(tmp_path / "q", "questions", _questions(), config={"search": spec},
                                 summary={"ledger": {"engine": spec}}, extra={"questions": [spec]})
    text = (tmp_path / "q" / "manifest.json").read_text()
    assert "hunter2" not in text and "abc123" not in text
    assert m["config"]["search"] == "http://me:***@h:1/retrieve?api_key=***&topk=3"
