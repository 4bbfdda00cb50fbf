"""Reliability: what a careless or hostile user can throw at every stage, and what must hold then.

Each case is a real run of the CLI (in process, with the tiny model, real bm25s, real Parquet and a
real HTTP server on 127.0.0.1) and checks one promise: a bad input is ONE line naming the thing,
exit 2 (1 for a runtime fault), no traceback; nothing of the user's is overwritten; an output is only
ever written into a new folder, an empty one or an artifact of its own kind, never into (or above)
an input; an old artifact stays valid until its replacement is complete; readers of every kind
refuse an incomplete folder; secrets never reach a manifest, a row or an error line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from zsctl.cli import app

runner = CliRunner()
SECRET, SECRET2 = "S3cr3tPassw0rd", "K3yK3yK3y"


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_line(r, code: int = 2, *needles: str) -> str:
    """The run failed with `code` and exactly one 'error:' line holding every needle, no traceback."""
    assert r.exit_code == code, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def digest(folder: Path) -> dict:
    """Every file under `folder` and its hash: 'nothing of the user's changed' is this staying equal."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


WORDS = ["apple", "banana", "cherry", "date", "elder", "fig"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """Artifacts of every kind the cases poke at, made once by the real stages."""
    base = tmp_path_factory.mktemp("rel")
    e = SimpleNamespace(base=base, model=tiny_model_dir)
    e.corpus = write_jsonl(
        base / "corpus.jsonl",
        [{"id": str(i), "title": w.title(), "text": f"{w} is a fruit called {w}"} for i, w in enumerate(WORDS)],
    )
    e.questions = write_jsonl(
        base / "q.jsonl",
        [
            {"id": f"q{i}", "question": f"which fruit is called {w}?", "golden_answers": [w]}
            for i, w in enumerate(WORDS)
        ],
    )
    e.index = base / "idx"
    assert cli("index", e.corpus, "--out", e.index).exit_code == 0
    e.trajs = base / "trajs"
    r = cli(
        "collect",
        "--questions",
        e.questions,
        "--model",
        "none",
        "--search",
        f"bm25:{e.index}",
        "--out",
        e.trajs,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    e.evaldir = base / "ev"
    r = cli(
        "eval",
        "--bench",
        e.questions,
        "--model",
        tiny_model_dir,
        "--search",
        f"bm25:{e.index}",
        "--out",
        e.evaldir,
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--max-turns",
        "1",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    e.sft = base / "sft"
    r = cli(
        "build-sft",
        "--trajectories",
        e.trajs,
        "--for",
        "policy",
        "--templated",
        "--policy",
        tiny_model_dir,
        "--out",
        e.sft,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    e.simsft = base / "simsft"
    r = cli("build-sft", "--trajectories", e.trajs, "--label", "docs", "--out", e.simsft, "--quiet")
    assert r.exit_code == 0, r.output
    return e


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def eval_args(e, out, *extra, model=None, search=None, bench=None):
    return (
        "eval",
        "--bench",
        bench or e.questions,
        "--model",
        model or e.model,
        "--search",
        search or f"bm25:{e.index}",
        "--out",
        out,
        "--limit",
        "1",
        "--max-new-tokens",
        "2",
        "--max-turns",
        "1",
        "--quiet",
        *extra,
    )


# --- 1-3: outputs never destroy the user's data ------------------------------------------------------


def _index_over_own_corpus(e, tmp):
    d = tmp / "d"
    d.mkdir()
    rows = [{"id": "1", "title": "T", "text": "some words here", "extra": "keep me"}]
    pq.write_table(pa.Table.from_pylist(rows), d / "corpus.parquet")
    return ("index", d / "corpus.parquet", "--out", d), d, "corpus.parquet"


def _index_over_eval(e, tmp):
    d = copy(e.evaldir, tmp / "ev")
    return ("index", e.corpus, "--out", d), d, "predictions"


def _eval_over_index(e, tmp):
    d = copy(e.index, tmp / "idx")
    return eval_args(e, d), d, "bm25_index"


def _eval_over_its_index(e, tmp):
    d = copy(e.index, tmp / "idx")
    return eval_args(e, d, search=f"bm25:{d}"), d, str(d)


def _eval_over_its_model(e, tmp):
    d = copy(e.model, tmp / "m")
    return eval_args(e, d, model=d), d, str(d)


def _eval_over_user_files(e, tmp):
    d = tmp / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my thesis")
    return eval_args(e, d), d, str(d)


def _eval_above_its_bench(e, tmp):
    d = tmp / "d"
    write_jsonl(d / "q.jsonl", [{"question": "which fruit is called fig?", "golden_answers": ["fig"]}])
    return eval_args(e, d, bench=d / "q.jsonl"), d, str(d)


def _build_sft_over_own_input(e, tmp):
    d = copy(e.trajs, tmp / "q")
    return ("build-sft", "--trajectories", d, "--out", d, "--label", "docs"), d, str(d)


def _build_sft_over_eval(e, tmp):
    d = copy(e.evaldir, tmp / "ev")
    return ("build-sft", "--trajectories", e.trajs, "--out", d, "--label", "docs"), d, "predictions"


def _build_sft_above_input(e, tmp):
    d = tmp / "runs"
    copy(e.trajs, d / "q")
    return ("build-sft", "--trajectories", d / "q", "--out", d, "--label", "docs"), d, str(d)


def _collect_over_eval(e, tmp):
    d = copy(e.evaldir, tmp / "ev")
    return (
        ("collect", "--questions", e.questions, "--model", "none", "--search", f"bm25:{e.index}", "--out", d),
        d,
        "predictions",
    )


def _collect_above_questions(e, tmp):
    d = tmp / "d"
    write_jsonl(d / "q.jsonl", [{"question": "which fruit is called fig?", "golden_answers": ["fig"]}])
    return (
        ("collect", "--questions", d / "q.jsonl", "--model", "none", "--search", f"bm25:{e.index}", "--out", d),
        d,
        str(d),
    )


def _warmup_over_its_data(e, tmp):
    d = copy(e.sft, tmp / "sft")
    return ("warmup", "--data", d, "--policy", e.model, "--out", d, "--max-steps", "1"), d, str(d)


def _warmup_over_eval(e, tmp):
    d = copy(e.evaldir, tmp / "ev")
    return ("warmup", "--data", e.sft, "--policy", e.model, "--out", d, "--max-steps", "1"), d, "predictions"


def _train_sim_over_its_base(e, tmp):
    d = copy(e.model, tmp / "m")
    return ("train-sim", "--data", e.simsft, "--base", d, "--out", d, "--max-steps", "1"), d, str(d)


def _rl_over_eval(e, tmp):
    d = copy(e.evaldir, tmp / "ev")
    return (
        ("rl", "--policy", e.model, "--search", f"bm25:{e.index}", "--train", e.questions, "--out", d, "--steps", "1"),
        d,
        "predictions",
    )


def _check_sim_over_trajs(e, tmp):
    d = copy(e.trajs, tmp / "q")
    return ("check-sim", "--search", f"sim:{e.model}", "--trajectories", d, "--out", d, "--limit", "1"), d, str(d)


def _report_into_run_dir(e, tmp):
    d = tmp / "run"
    copy(e.evaldir, d / "ev")
    return ("report", d, "--out", d), d, str(d)


def _report_over_eval(e, tmp):
    d = tmp / "run"
    copy(e.evaldir, d / "ev")
    return ("report", d, "--out", d / "ev"), d, "predictions"


def _eval_bad_number_over_old(e, tmp):
    d = copy(e.evaldir, tmp / "ev")
    return eval_args(e, d, "--batch-size", "0"), d, "batch"


GUARDED = {
    "index-over-its-own-corpus": _index_over_own_corpus,
    "index-over-eval-artifact": _index_over_eval,
    "eval-over-bm25-index": _eval_over_index,
    "eval-over-its-search-index": _eval_over_its_index,
    "eval-over-its-model": _eval_over_its_model,
    "eval-over-user-files": _eval_over_user_files,
    "eval-above-its-bench-file": _eval_above_its_bench,
    "build-sft-over-its-trajectories": _build_sft_over_own_input,
    "build-sft-over-eval-artifact": _build_sft_over_eval,
    "build-sft-above-its-input": _build_sft_above_input,
    "collect-over-eval-artifact": _collect_over_eval,
    "collect-above-its-questions": _collect_above_questions,
    "warmup-over-its-data": _warmup_over_its_data,
    "warmup-over-eval-artifact": _warmup_over_eval,
    "train-sim-over-its-base-model": _train_sim_over_its_base,
    "rl-over-eval-artifact": _rl_over_eval,
    "check-sim-over-its-trajectories": _check_sim_over_trajs,
    "report-into-its-run-dir": _report_into_run_dir,
    "report-over-eval-artifact": _report_over_eval,
    "eval-bad-number-over-old-eval": _eval_bad_number_over_old,
}


@pytest.mark.parametrize("case", list(GUARDED))
def test_output_never_overwrites_the_users_data(env, tmp_path, case):
    args, folder, needle = GUARDED[case](env, tmp_path)
    before = digest(folder)
    r = cli(*args)
    one_line(r, 2, needle)
    assert digest(folder) == before  # every byte of the user's folder is as it was
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left beside it


def test_rerun_over_own_kind_replaces_and_stays_valid(env, tmp_path):
    d = copy(env.evaldir, tmp_path / "ev")
    r = cli(*eval_args(env, d, "--json"))
    assert r.exit_code == 0, r.output
    m = json.loads((d / "manifest.json").read_text())
    assert m["kind"] == "predictions" and m["summary"]["rows"] == 1
    assert set(m["files"]) == {"predictions.parquet", "metrics.json"}
    assert pq.read_table(d / "predictions.parquet").num_rows == 1
    r = cli("index", env.corpus, "--out", copy(env.index, tmp_path / "idx"))
    assert r.exit_code == 0, r.output


def test_failed_rerun_keeps_the_old_artifact_readable(env, tmp_path):
    """A run that dies midway (here: its engine's server is gone) leaves the old artifact as it was."""
    d = copy(env.evaldir, tmp_path / "ev")
    before = digest(d)
    r = cli(*eval_args(env, d, search="http://127.0.0.1:9/retrieve"))
    assert r.exit_code in (1, 2), r.output
    assert digest(d) == before
    assert cli("inspect", d).exit_code == 0


def test_collect_rerun_that_fails_midway_keeps_the_old_collection_then_resumes(env, tmp_path):
    """The engine dies after the first batch: exit 1, the old collection is still whole and readable,
    and --resume finishes the new run from its shards."""
    from zsctl.core.errors import RunFailure
    from zsctl.search import make_engine
    from zsctl.stages.serve import make_app, start_in_thread

    engine = make_engine(f"bm25:{env.index}")
    search, calls = engine._search, []

    def flaky(*args, **kw):  # the client's probe and the first batch get answers, then the backend is gone
        calls.append(1)
        if len(calls) > 2 and not getattr(engine, "healed", False):
            raise RunFailure("backend down")
        return search(*args, **kw)

    engine._search = flaky
    server, url = start_in_thread(make_app(engine))
    try:
        d = copy(env.trajs, tmp_path / "q")
        before = digest(d)
        args = (
            "collect",
            "--questions",
            env.questions,
            "--model",
            "none",
            "--search",
            f"{url}/retrieve",
            "--out",
            d,
            "--batch-size",
            "1",
            "--quiet",
        )
        r = cli(*args)
        assert r.exit_code == 1 and "--resume" in r.output, r.output
        assert {k: v for k, v in digest(d).items() if not k.startswith("trajectories.shards")} == before
        assert cli("inspect", d).exit_code == 0
        engine.healed = True
        r = cli(*args, "--resume", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout.strip().splitlines()[-1])["trajectories"] == len(WORDS)
        assert json.loads((d / "manifest.json").read_text())["config"]["search"] == f"{url}/retrieve"
    finally:
        server.should_exit = True


# --- 5: every reader checks the manifest ---------------------------------------------------------------


def _killed_rl_rerun(e, tmp):
    """What a kill -9 of an rl rerun leaves: the previous weights, rl's run file, a manifest saying incomplete."""
    d = copy(e.model, tmp / "pol")
    (d / "rl_run.json").write_text("{}")
    (d / "manifest.json").write_text(json.dumps({"kind": "policy", "complete": False}))
    return d


def _rl_without_manifest(e, tmp):
    d = copy(e.model, tmp / "pol")
    (d / "rl_run.json").write_text("{}")
    (d / "train_log.json").write_text("[]")
    return d


def _model_of_other_kind(e, tmp):
    d = copy(e.model, tmp / "pol")
    (d / "manifest.json").write_text(json.dumps({"kind": "predictions", "complete": True}))
    return d


def _index_without_manifest(e, tmp):
    d = copy(e.index, tmp / "idx")
    (d / "manifest.json").unlink()
    return d


def _index_incomplete(e, tmp):
    d = copy(e.index, tmp / "idx")
    (d / "manifest.json").write_text(json.dumps({"kind": "bm25_index", "complete": False}))
    return d


def _index_of_other_kind(e, tmp):
    d = copy(e.index, tmp / "idx")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "kind": "predictions"}))
    return d


READERS = {
    "eval-model-killed-rl-rerun": (_killed_rl_rerun, lambda e, d, o: eval_args(e, o, model=d), "incomplete"),
    "eval-model-rl-without-manifest": (_rl_without_manifest, lambda e, d, o: eval_args(e, o, model=d), "incomplete"),
    "eval-model-of-other-kind": (_model_of_other_kind, lambda e, d, o: eval_args(e, o, model=d), "predictions"),
    "sim-model-killed-rl-rerun": (_killed_rl_rerun, lambda e, d, o: eval_args(e, o, search=f"sim:{d}"), "incomplete"),
    "rl-policy-killed-rl-rerun": (
        _killed_rl_rerun,
        lambda e, d, o: (
            "rl",
            "--policy",
            d,
            "--search",
            f"bm25:{e.index}",
            "--train",
            e.questions,
            "--out",
            o,
            "--steps",
            "1",
        ),
        "incomplete",
    ),
    "warmup-policy-killed-rl-rerun": (
        _killed_rl_rerun,
        lambda e, d, o: ("warmup", "--data", e.sft, "--policy", d, "--out", o, "--max-steps", "1"),
        "incomplete",
    ),
    "bm25-index-without-manifest": (
        _index_without_manifest,
        lambda e, d, o: eval_args(e, o, search=f"bm25:{d}"),
        "manifest",
    ),
    "bm25-index-incomplete": (_index_incomplete, lambda e, d, o: eval_args(e, o, search=f"bm25:{d}"), "incomplete"),
    "bm25-index-of-other-kind": (
        _index_of_other_kind,
        lambda e, d, o: eval_args(e, o, search=f"bm25:{d}"),
        "predictions",
    ),
    "inspect-incomplete": (_index_incomplete, lambda e, d, o: ("inspect", d), "incomplete"),
    "eval-model-is-a-bm25-index": (
        lambda e, tmp: copy(e.index, tmp / "idx"),
        lambda e, d, o: eval_args(e, o, model=d),
        "bm25_index",
    ),
    "build-sft-from-incomplete-collect": (
        lambda e, tmp: _mark_incomplete(copy(e.trajs, tmp / "q")),
        lambda e, d, o: ("build-sft", "--trajectories", d, "--out", o, "--label", "docs"),
        "incomplete",
    ),
    "warmup-from-incomplete-sft-data": (
        lambda e, tmp: _mark_incomplete(copy(e.sft, tmp / "sft")),
        lambda e, d, o: ("warmup", "--data", d, "--policy", e.model, "--out", o, "--max-steps", "1"),
        "incomplete",
    ),
}


def _mark_incomplete(d: Path) -> Path:
    """What `prepare_out` leaves while a resumable stage works (and after it is killed)."""
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    return d


@pytest.mark.parametrize("case", list(READERS))
def test_readers_refuse_incomplete_or_foreign_folders(env, tmp_path, case):
    make, args, needle = READERS[case]
    d = make(env, tmp_path)
    out = tmp_path / "out"
    one_line(cli(*args(env, d, out)), 2, str(d), needle)
    assert not out.exists()


def test_plain_hf_model_dir_still_loads(env, tmp_path):
    """A model directory without our manifest is not ours: it loads (the fixtures' tiny model is one)."""
    assert not (env.model / "manifest.json").exists()
    r = cli(*eval_args(env, tmp_path / "ev", search=f"sim:{env.model}"))
    assert r.exit_code == 0, r.output


# --- 4 and the question cap: limits that hold ------------------------------------------------------------


def test_chunked_body_over_the_cap_is_refused_while_streaming(env):
    """A hostile client streams a huge body without Content-Length: 413 once the cap is passed, and the
    server stops reading (the client cannot push more than the cap plus socket buffers)."""
    from zsctl.search import make_engine
    from zsctl.stages.serve import Caps, make_app, start_in_thread

    cap = 64 << 10
    server, url = start_in_thread(make_app(make_engine(f"bm25:{env.index}"), caps=Caps(max_body_bytes=cap)))
    try:
        port = int(url.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(
            b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * (64 << 10)
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        sent, limit = 0, 300 << 20
        try:
            while sent < limit:
                s.sendall(frame)
                sent += len(chunk)
        except OSError:  # the server answered and closed: the rest is never read
            pass
        s.settimeout(10)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                part = s.recv(65536)
                if not part:
                    break
                reply += part
        except OSError:
            pass
        s.close()
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert sent < 64 << 20  # cut off long before the 300 MB the client meant to send
        # the server still answers ordinary requests afterwards
        import httpx

        ok = httpx.post(f"{url}/retrieve", json={"queries": ["fig"], "topk": 1}, timeout=10)
        assert ok.status_code == 200 and len(ok.json()["result"][0]) == 1
    finally:
        server.should_exit = True


def test_declared_body_over_the_cap_is_refused(env):
    import httpx

    from zsctl.search import make_engine
    from zsctl.stages.serve import Caps, make_app, start_in_thread

    server, url = start_in_thread(make_app(make_engine(f"bm25:{env.index}"), caps=Caps(max_body_bytes=1000)))
    try:
        r = httpx.post(
            f"{url}/retrieve",
            content=b'{"queries": ["' + b"a" * 5000 + b'"]}',
            timeout=10,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
    finally:
        server.should_exit = True


# --- 6: credentials never stored or printed -------------------------------------------------------------


def test_credentials_in_a_spec_never_reach_disk_or_rows(env, tmp_path):
    from zsctl.search import make_engine
    from zsctl.stages.serve import make_app, start_in_thread

    server, url = start_in_thread(make_app(make_engine(f"bm25:{env.index}")))
    try:
        host = url.split("://", 1)[1]
        spec = f"http://user:{SECRET}@{host}/retrieve?api_key={SECRET2}&topic=x"
        out = tmp_path / "c"
        cache = tmp_path / "cache.sqlite"
        r = cli(
            "collect",
            "--questions",
            env.questions,
            "--model",
            "none",
            "--search",
            spec,
            "--out",
            out,
            "--json",
            "--search-cache",
            cache,
        )
        assert r.exit_code == 0, r.output
        assert SECRET not in r.output and SECRET2 not in r.output
        assert SECRET.encode() not in cache.read_bytes() and SECRET2.encode() not in cache.read_bytes()
        for p in out.rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes() and SECRET2.encode() not in p.read_bytes(), p
        engines = set(pq.read_table(out / "trajectories.parquet").column("engine").to_pylist())
        assert engines == {f"http://user:***@{host}/retrieve?api_key=***&topic=x"}
        m = json.loads((out / "manifest.json").read_text())
        assert "***" in m["config"]["search"] and "***" in m["summary"]["ledger"]["engine"]
        # --resume with the same (secret-bearing) spec still matches the scrubbed rows
        r = cli("collect", "--questions", env.questions, "--model", "none", "--search", spec, "--out", out, "--resume")
        assert r.exit_code == 0, r.output
    finally:
        server.should_exit = True


@pytest.mark.parametrize(
    "spec",
    [
        f"http://user:{SECRET}@127.0.0.1:9/retrieve",
        f"http://127.0.0.1:9/retrieve?api_key={SECRET}",
        f"http://127.0.0.1:9/retrieve?token={SECRET}&x=1",
    ],
)
def test_credentials_never_in_error_lines(env, tmp_path, spec):
    r = cli(*eval_args(env, tmp_path / "ev", search=spec))
    line = one_line(r, 2, "127.0.0.1:9")
    assert SECRET not in r.output and SECRET not in line


# --- 7-8, 10: bad values are one line naming the file or value ------------------------------------------


def _q(rows):
    return lambda e, tmp: eval_args(e, tmp / "o", bench=write_jsonl(tmp / "bad.jsonl", rows))


def _q_parquet(rows):
    def make(e, tmp):
        pq.write_table(pa.Table.from_pylist(rows), tmp / "bad.parquet")
        return eval_args(e, tmp / "o", bench=tmp / "bad.parquet")

    return make


def _sft_input(lines: bytes | list, name="bad.jsonl", **kw):
    def make(e, tmp):
        p = tmp / name
        if isinstance(lines, bytes):
            p.write_bytes(lines)
        elif name.endswith(".parquet"):  # typed as collect writes them, nulls and all
            pq.write_table(pa.Table.from_pylist(lines, schema=TRAJ_SCHEMA), p)
        else:
            write_jsonl(p, lines)
        extra = kw.get("extra", ("--label", "docs"))
        extra = extra(e) if callable(extra) else extra
        return ("build-sft", "--trajectories", p, "--out", tmp / "o", *extra)

    return make


TRAJ_SCHEMA = pa.schema(
    [
        ("question", pa.string()),
        ("golden_answers", pa.list_(pa.string())),
        ("em", pa.float64()),
        (
            "searches",
            pa.list_(
                pa.struct(
                    [
                        ("query", pa.string()),
                        ("documents", pa.list_(pa.struct([("title", pa.string()), ("text", pa.string())]))),
                    ]
                )
            ),
        ),
    ]
)
TRAJ = {
    "question": "which fruit is called fig?",
    "golden_answers": ["fig"],
    "em": 1.0,
    "searches": [{"query": "fig", "documents": [{"title": "Fig", "text": "fig is a fruit called fig"}]}],
}


def _inspect_with(mutate):
    def make(e, tmp):
        d = copy(e.evaldir, tmp / "ev")
        mutate(d, tmp)
        return ("inspect", d)

    return make


def _truncate(d, tmp):
    p = d / "predictions.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _escape(d, tmp):
    outside = tmp / "secret.parquet"
    pq.write_table(pa.table({"ssn": ["123-45-6789"]}), outside)
    m = json.loads((d / "manifest.json").read_text())
    m["files"][str(outside)] = {"bytes": 1}
    (d / "manifest.json").write_text(json.dumps(m))


def _escape_dotdot(d, tmp):
    pq.write_table(pa.table({"ssn": ["123-45-6789"]}), tmp / "secret.parquet")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../secret.parquet"] = {"bytes": 1}
    (d / "manifest.json").write_text(json.dumps(m))


def _report_with(mutate, out=None):
    def make(e, tmp):
        run = tmp / "run"
        copy(e.evaldir, run / "ev")
        mutate(run / "ev", tmp)
        return ("report", run, *(("--out", out(tmp)) if out else ()))

    return make


def _file_out(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _truncated_safetensors(e, tmp):
    d = copy(e.model, tmp / "m")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    return eval_args(e, tmp / "o", model=d)


def _corrupt_ledger_with(text: str):
    def make(e, tmp):
        args = _corrupt_ledger(e, tmp)
        (tmp / "c" / "trajectories.shards" / "ledger.json").write_text(text)
        return args

    return make


def _corrupt_ledger(e, tmp):
    d = copy(e.trajs, tmp / "c")
    (d / "trajectories.shards").mkdir()
    (d / "trajectories.parquet").replace(d / "trajectories.shards" / "part-00000.parquet")
    (d / "trajectories.shards" / "ledger.json").write_text("{not json")
    return (
        "collect",
        "--questions",
        e.questions,
        "--model",
        "none",
        "--search",
        f"bm25:{e.index}",
        "--out",
        d,
        "--resume",
    )


BAD = {
    # 7: golds that can never score, questions that are not text
    "gold-empty-list": (_q([{"question": "who?", "golden_answers": []}]), ["bad.jsonl", "1"]),
    "gold-list-of-null": (_q([{"question": "who?", "golden_answers": [None]}]), ["bad.jsonl", "1"]),
    "gold-blank-string": (_q([{"question": "who?", "golden_answers": ["  "]}]), ["bad.jsonl"]),
    "gold-empty-second-row": (
        _q([{"question": "who?", "golden_answers": ["x"]}, {"question": "what?", "golden_answers": []}]),
        ["bad.jsonl", "2"],
    ),
    "gold-empty-parquet": (_q_parquet([{"question": "who?", "golden_answers": []}]), ["bad.parquet", "row 0"]),
    "question-is-a-list": (_q([{"question": ["who", "is"], "golden_answers": ["x"]}]), ["bad.jsonl", "question"]),
    "question-is-a-number": (_q([{"question": 42, "golden_answers": ["x"]}]), ["bad.jsonl", "question"]),
    "question-too-long": (_q([{"question": "why " * 300_000, "golden_answers": ["x"]}]), ["bad.jsonl", "characters"]),
    "question-too-long-parquet": (
        _q_parquet([{"question": "w" * 100_000, "golden_answers": ["x"]}]),
        ["bad.parquet", "characters"],
    ),
    # 8: raw exceptions that became one line
    "eval-bench-only-commas": (lambda e, tmp: eval_args(e, tmp / "o", bench=","), ["','", "names no benchmark"]),
    "eval-truncated-safetensors": (_truncated_safetensors, ["model", "/m"]),
    "build-sft-non-utf8-jsonl": (_sft_input(b'{"question": "caf\xe9?"}\n'), ["bad.jsonl"]),
    "build-sft-null-question-jsonl": (_sft_input([{**TRAJ, "question": None}]), ["bad.jsonl", "question"]),
    "build-sft-null-question-parquet": (
        _sft_input([{**TRAJ, "question": None}, TRAJ], name="bad.parquet"),
        ["bad.parquet", "question"],
    ),
    "build-sft-null-golds-templated": (
        _sft_input(
            [{**TRAJ, "golden_answers": [None]}],
            name="bad.parquet",
            extra=lambda e: ("--for", "policy", "--templated", "--policy", e.model),  # tiny: no 135M conversion
        ),
        ["golden_answers null"],
    ),
    "build-sft-null-golds-docs": (
        _sft_input([{**TRAJ, "golden_answers": [None]}], name="bad.parquet"),
        ["golden_answers null"],
    ),
    "build-sft-empty-golds-jsonl": (_sft_input([{**TRAJ, "golden_answers": []}]), ["bad.jsonl", "gold"]),
    "inspect-truncated-parquet": (_inspect_with(_truncate), ["predictions.parquet"]),
    "inspect-missing-parquet": (
        _inspect_with(lambda d, tmp: (d / "predictions.parquet").unlink()),
        ["predictions.parquet"],
    ),
    "inspect-list-manifest": (
        _inspect_with(lambda d, tmp: (d / "manifest.json").write_text("[1, 2]")),
        ["manifest.json"],
    ),
    "inspect-absolute-path-out-of-folder": (_inspect_with(_escape), ["secret.parquet"]),
    "inspect-dotdot-path-out-of-folder": (_inspect_with(_escape_dotdot), ["secret.parquet"]),
    "report-corrupt-manifest": (
        _report_with(lambda d, tmp: (d / "manifest.json").write_text("{oops")),
        ["manifest.json"],
    ),
    "report-list-manifest": (_report_with(lambda d, tmp: (d / "manifest.json").write_text("[]")), ["manifest.json"]),
    "report-missing-metrics": (_report_with(lambda d, tmp: (d / "metrics.json").unlink()), ["metrics.json"]),
    "report-corrupt-metrics": (_report_with(lambda d, tmp: (d / "metrics.json").write_text("{}")), ["metrics.json"]),
    "report-out-is-a-file": (_report_with(lambda d, tmp: None, out=_file_out), ["afile"]),
    "collect-resume-corrupt-ledger": (_corrupt_ledger, ["ledger.json"]),
    "collect-resume-ledger-not-counts": (_corrupt_ledger_with('{"engine_calls": "many"}'), ["ledger.json"]),
    "inspect-files-not-a-mapping": (
        _inspect_with(
            lambda d, tmp: (d / "manifest.json").write_text(json.dumps({"kind": "predictions", "files": []}))
        ),
        ["manifest.json"],
    ),
    "rl-train-file-with-empty-golds": (
        lambda e, tmp: (
            "rl",
            "--policy",
            e.model,
            "--search",
            f"bm25:{e.index}",
            "--out",
            tmp / "o",
            "--steps",
            "1",
            "--train",
            write_jsonl(tmp / "bad.jsonl", [{"question": "who?", "golden_answers": []}]),
        ),
        ["bad.jsonl", "golden_answers"],
    ),
    "serve-port-out-of-range": (lambda e, tmp: ("serve", "--search", f"bm25:{e.index}", "--port", "70000"), ["70000"]),
    "serve-port-negative": (lambda e, tmp: ("serve", "--search", f"bm25:{e.index}", "--port", "-1"), ["-1"]),
    "index-out-is-a-file": (lambda e, tmp: ("index", e.corpus, "--out", _file_out(tmp)), ["afile"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_is_one_line(env, tmp_path, case):
    make, needles = BAD[case]
    args = make(env, tmp_path)
    r = cli(*args)
    line = one_line(r, 2, *needles)
    assert "123-45-6789" not in r.output
    assert len(line) < 600


def test_killed_build_sft_temp_folder_is_cleaned_on_the_next_run(env, tmp_path):
    out = tmp_path / "sft"
    stale = tmp_path / f".sft.build-sft-{dead_pid()}"
    stale.mkdir()
    (stale / "train.parquet").write_bytes(b"half")
    stale_tmp = tmp_path / f".sft.tmp-{dead_pid()}"
    stale_tmp.mkdir()
    mine = tmp_path / ".sft.notes"  # not a name we make: left alone
    mine.write_text("x")
    r = cli(
        "build-sft",
        "--trajectories",
        env.trajs,
        "--for",
        "policy",
        "--templated",
        "--policy",
        env.model,
        "--out",
        out,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert not stale.exists() and not stale_tmp.exists() and mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sft.notes", "sft"]


def test_public_host_warns_even_when_quiet(env, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    r = cli("serve", "--search", f"bm25:{env.index}", "--host", "0.0.0.0", "--port", "0", "--quiet")
    assert r.exit_code == 0, r.output
    assert "0.0.0.0" in r.stderr and "network" in r.stderr


def test_no_weight_loading_bars_when_stderr_is_not_a_terminal(env, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "zsctl", *map(str, eval_args(env, tmp_path / "ev"))],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr
    assert "Loading weights" not in p.stderr and "it/s]" not in p.stderr


@pytest.mark.parametrize(
    "args", [["eval", "--bogus"], ["eval"], ["index"], ["nosuchcommand"], ["eval", "--batch-size", "x"]]
)
def test_usage_errors_are_one_line(args):
    p = subprocess.run([sys.executable, "-m", "zsctl", *args], capture_output=True, text=True)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr


def test_report_skips_an_artifact_still_being_written(env, tmp_path):
    run = tmp_path / "run"
    copy(env.evaldir, run / "ev")
    _mark_incomplete(copy(env.trajs, run / "collecting"))
    r = cli("report", run, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["artifacts"] == {"predictions": 1}


@pytest.mark.parametrize(
    "text, shown",
    [
        ("http://me:pw1@h:1/retrieve", "http://me:***@h:1/retrieve"),
        ("https://tok123@h/x", "https://***@h/x"),
        ("http://h/retrieve?api_key=k1&topk=3", "http://h/retrieve?api_key=***&topk=3"),
        ("sim+http://h/v1?access_token=t;key=k", "sim+http://h/v1?access_token=***;key=***"),
        ("sim:runs/sim?verify=2&max_new_tokens=64", "sim:runs/sim?verify=2&max_new_tokens=64"),  # counts stay
        ("error: retriever http://u:p@h failed (HTTP 500)", "error: retriever http://u:***@h failed (HTTP 500)"),
        ("write to me@example.org", "write to me@example.org"),
    ],
)
def test_redact_hides_credentials_and_nothing_else(text, shown):
    from zsctl.core.errors import redact

    assert redact(text) == shown


def test_a_failed_smollm2_conversion_leaves_no_half_model(tmp_path, monkeypatch, tiny_model_dir):
    """A full disk mid-save (what CI hit) removes the half-written folder; the next call converts again."""
    import errno

    import transformers

    from zsctl.core import models

    gguf = tmp_path / "wheel" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_smollm2_gguf", lambda: gguf)
    monkeypatch.setenv("ZSCTL_CACHE_DIR", str(tmp_path / "cache"))
    auto_model, auto_tok = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    load_model, load_tok = auto_model.from_pretrained, auto_tok.from_pretrained
    # the tiny model stands in for the dequantized GGUF; the write path is the real one
    monkeypatch.setattr(auto_model, "from_pretrained", lambda *a, **k: load_model(tiny_model_dir))
    monkeypatch.setattr(auto_tok, "from_pretrained", lambda *a, **k: load_tok(tiny_model_dir))
    save = transformers.PreTrainedModel.save_pretrained

    def disk_fills(self, path, **kw):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_fills)
    with pytest.raises(OSError, match="No space"):
        models.resolve_model("smollm2-135m")
    assert list((tmp_path / "cache" / "models").iterdir()) == []

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)
    dest = Path(models.resolve_model("smollm2-135m"))
    assert (dest / "config.json").is_file() and [p.name for p in dest.parent.iterdir()] == [dest.name]
