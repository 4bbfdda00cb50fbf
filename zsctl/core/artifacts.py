"""Artifacts: one directory = data file(s) + manifest.json, written so a crash never looks complete.

Where a stage may write (`check_out`, before any work): a new folder, an empty one, or an artifact
of the stage's own kind; never an input or a folder holding one. How it writes: one-shot stages
fill a private staging folder beside --out and swap it in whole at the end (`staging`), so the old
artifact stays valid until the new one is complete; resumable stages (collect, rl) work in place,
in subfolders, and mark the folder incomplete before they replace its files (`prepare_out`,
`mark_incomplete`). Inside a folder: data to a temp name →
rename → manifest.json last (also via temp + rename). Readers refuse a folder whose manifest is
missing, unreadable or says incomplete, and check required columns and types; model folders of
ours (`check_model_dir`) likewise, while a plain HF model folder (no zsctl files) is not ours.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zsctl import __version__
from zsctl.core.errors import BadInput, is_secret_name, redact
from zsctl.core.schemas import SCHEMA_VERSION, TABLES, missing_or_mistyped

MANIFEST = "manifest.json"
MODEL_KINDS = ("policy", "simulator")
# Files only our model stages write (rl's run file, SFT's loss log): a model folder holding one but
# no manifest is ours and unfinished, not a plain HF model.
_OWN_MODEL_FILES = ("rl_run.json", "train_log.json")
# Names of our temp folders beside --out: .NAME.tmp-PID, .NAME.build-sft-PID, .NAME.old-PID.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|build-sft|old)-(?P<pid>\d+)$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_path(spec: str) -> str | None:
    """The local path inside a search or model spec (bm25:PATH, sim:PATH?…, a plain path), else None."""
    for prefix in ("bm25:", "sim:"):
        if spec.startswith(prefix):
            return spec[len(prefix):].partition("?")[0] or None
    return None if "://" in spec or spec in ("none", "serpapi") else spec


def check_out(out: str | Path, kind: str, inputs: tuple | list = ()) -> Path:
    """Refuse an --out that would destroy something, before any work; changes nothing but stale temp folders.

    Allowed: a new folder, an empty one, or an artifact of `kind` (complete or left incomplete by a
    killed run of the same stage). Refused: a file, a folder with other files, an artifact of another
    kind, and any of `inputs` or a folder above one (the run would overwrite what it reads).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a directory; pass a directory path")
    where = out.resolve()
    for raw in inputs:  # option values as given: comma lists and specs (bm25:PATH, sim:PATH) included
        for part in str(raw or "").split(","):
            inp = spec_path(part.strip())
            p = Path(inp).expanduser() if inp else None
            if p is not None and p.exists() and (p.resolve() == where or where in p.resolve().parents):
                raise BadInput(f"--out '{out}' is or holds the input '{inp}'; the run would overwrite what it "
                               "reads: pass another --out")
    if out.is_dir() and any(out.iterdir()):
        try:
            old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise BadInput(f"--out '{out}' holds other files and no zsctl manifest; pass a new or empty directory "
                           "(nothing was changed)")
        if old.get("kind") != kind:
            raise BadInput(f"--out '{out}' is a '{old.get('kind')}' artifact, not '{kind}'; pass a new or empty "
                           "directory (nothing was changed)")
    clean_stale(out)
    return out


def clean_stale(out: Path) -> None:
    """Remove temp folders a killed run of ours left beside `out` (their process is gone); a
    half-swapped artifact (killed between the two renames of `replace_dir`) is put back."""
    parent = out.parent
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = _SIBLING.match(p.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if m["what"] == "old" and not out.exists():
            os.replace(p, out)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sibling(out: Path, what: str) -> Path:
    """A private temp path beside `out`, named so `clean_stale` can tell when its run is gone."""
    return out.with_name(f".{out.name}.{what}-{os.getpid()}")


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder `new` into place; an older artifact there is retired only after."""
    old = None
    if out.exists():
        old = sibling(out, "old")
        os.replace(out, old)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging(out: str | Path):
    """A private folder beside `out` to write the whole artifact into; swapped in on success, removed
    on failure, so `out` holds the old artifact or the new one, never a mix."""
    out = Path(out)
    tmp = sibling(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_out(out: str | Path, kind: str) -> Path:
    """For stages that work in place (resumable ones), keeping their working state in subfolders:
    create `out`. A complete artifact of `kind` already there stays valid, since its files are not
    touched until `mark_incomplete` just before the end; any other folder is marked incomplete at
    once, so a killed run leaves a folder that is recognisably ours and unfinished."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a directory; pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    try:
        complete = read_manifest(out).get("kind") == kind
    except BadInput:
        complete = False
    if not complete:
        mark_incomplete(out, kind)
    return out


def mark_incomplete(out: Path, kind: str) -> None:
    """Say so in the manifest before an in-place stage replaces the artifact's own files."""
    write_json(out, MANIFEST, {"kind": kind, "complete": False, "schema_version": SCHEMA_VERSION,
                               "started_at": _now(), "pid": os.getpid()})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_table(out: Path, name: str, table: pa.Table) -> Path:
    """Write one Parquet file atomically (temp name in the same dir, then rename)."""
    final = out / name
    tmp = out / f".{name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def write_json(out: Path, name: str, obj) -> Path:
    """Write a JSON file atomically (temp name, then rename)."""
    final = out / name
    tmp = out / f".{name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, final)
    return final


class ShardWriter:
    """Append-as-you-go Parquet shards (part-00000.parquet …) for long runs that can be resumed.

    Each shard is written atomically, so after a crash every shard on disk is whole.
    """

    def __init__(self, out: Path, stem: str, schema: pa.Schema):
        self.dir = out / f"{stem}.shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.n = len(list(self.dir.glob("part-*.parquet")))

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        write_table(self.dir, f"part-{self.n:05d}.parquet", pa.Table.from_pylist(rows, schema=self.schema))
        self.n += 1

    def read_all(self) -> pa.Table:
        files = sorted(self.dir.glob("part-*.parquet"))
        if not files:
            return self.schema.empty_table()
        return pa.concat_tables([pq.read_table(f, schema=self.schema) for f in files])


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "pyarrow", "bm25s", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _scrub(obj):
    """Drop anything that looks like a secret before it reaches a manifest: values of key-like
    names, and credentials inside strings (URL passwords, key-like query parameters)."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_name(k) and v else _scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


def input_ref(path: str | Path) -> dict:
    """How a manifest names an input: the path and, for artifacts, their manifest hash."""
    p = Path(path)
    ref = {"path": str(path)}
    if (p / MANIFEST).is_file():
        ref["manifest_sha256"] = sha256_file(p / MANIFEST)
    elif p.is_file():
        ref["sha256"] = sha256_file(p)
    return ref


def find_input(ref: dict, manifest_dir: str | Path) -> Path | None:
    """Where an input named by `ref` (input_ref) is now: its path as recorded (relative paths are
    relative to where the stage ran), else a folder of that name beside the artifact whose manifest
    names it (a run folder moved or run from elsewhere). A recorded manifest hash must match."""
    given = Path(ref.get("path", ""))
    for p in (given, Path(manifest_dir).parent / given.name):
        if not str(p) or not p.exists():
            continue
        want = ref.get("manifest_sha256")
        if want is None or ((p / MANIFEST).is_file() and sha256_file(p / MANIFEST) == want):
            return p
    return None


def write_manifest(
    out: Path,
    kind: str,
    *,
    config: dict,
    inputs: list[dict] | None = None,
    summary: dict | None = None,
    seed: int | None = None,
    extra: dict | None = None,
) -> dict:
    """Write manifest.json LAST, describing every top-level file already in `out` (subfolders such as
    checkpoints or per-step logs are working state, not part of the artifact)."""
    files = {}
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            rel = str(p.relative_to(out))
            entry = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            if p.suffix == ".parquet":
                entry["rows"] = pq.ParquetFile(p).metadata.num_rows
            files[rel] = entry
    config = _scrub(config)
    manifest = {
        "kind": kind,
        "complete": True,
        "schema_version": SCHEMA_VERSION,
        "created_at": _now(),
        "zsctl_version": __version__,
        "git_commit": _git_commit(),
        "argv": _scrub(list(sys.argv)),
        "config": config,
        "config_hash": config_hash(config),
        "inputs": _scrub(inputs or []),
        "files": files,
        "seed": seed,
        "libraries": _library_versions(),
        "summary": _scrub(summary or {}),
    }
    if extra:
        manifest.update(_scrub(extra))
    write_json(out, MANIFEST, manifest)
    return manifest


def write_artifact(out: str | Path, kind: str, table: pa.Table, **manifest_kw) -> dict:
    """Validate `table` against the kind's schema, write it, then the manifest."""
    name, schema = TABLES[kind]
    problems = missing_or_mistyped(table.schema, schema)
    if problems:  # a bug in our own stage, not user input
        raise ValueError(f"{kind} table does not match its schema: {'; '.join(problems)}")
    out = check_out(out, kind)
    with staging(out) as tmp:
        write_table(tmp, name, table)
        manifest = write_manifest(tmp, kind, **manifest_kw)
    return manifest


def model_manifest(model: str, kind: str) -> dict:
    """The manifest a zsctl stage wrote beside a model of `kind` ({} for any other model: a hub id,
    another tool's directory, a manifest of another kind or not JSON), read without complaint."""
    mf = Path(model) / MANIFEST
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8")) if mf.is_file() else {}
    except (OSError, ValueError):  # not a zsctl manifest: the defaults apply
        return {}
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == kind else {}


def policy_doc_words(model: str) -> int | None:
    """The words per document a policy was trained on, as warmup or rl recorded it in its manifest
    (None for other models). Reading documents of the length it learned on is what eval and rl then
    default to: a warm start trained on 30-word documents and evaluated on 80-word ones read
    information blocks 2.7x longer than any it had seen."""
    words = model_manifest(model, "policy").get("doc_words")
    return words if isinstance(words, int) and words > 0 else None


def doc_words_for(model: str, prompt_style: str, chosen: int | None) -> int | None:
    """--max-doc-words as given; unset, the length `model` was trained on (zsctl prompt style only:
    the others insert whole documents); None where neither says (the prompt style's default)."""
    if chosen is not None or prompt_style != "zsctl":
        return chosen
    return policy_doc_words(model)


def read_manifest(path: str | Path, allow_incomplete: bool = False) -> dict:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"'{p}' does not exist; pass the --out directory of an earlier stage")
    if not p.is_dir():
        raise BadInput(f"'{p}' is not an artifact directory; pass the --out directory of an earlier stage")
    mf = p / MANIFEST
    if not mf.is_file():
        raise BadInput(
            f"incomplete artifact '{p}': no {MANIFEST} (the run that wrote it did not finish); rerun that stage"
        )
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"'{mf}' is not valid JSON ({e}); rerun the stage that wrote it") from e
    if not isinstance(manifest, dict):
        raise BadInput(f"'{mf}' is not a zsctl manifest (a JSON object); rerun the stage that wrote it")
    if manifest.get("complete") is False and not allow_incomplete:
        raise BadInput(f"incomplete artifact '{p}': its manifest says the {manifest.get('kind')} run writing it "
                       "did not finish; rerun that stage")
    return manifest


def check_model_dir(path: str | Path) -> None:
    """A model folder of ours must be complete and a model; one without any zsctl file is a plain
    HF model folder (not ours) and passes."""
    p = Path(path)
    if (p / MANIFEST).exists():
        kind = read_manifest(p).get("kind")
        if kind not in MODEL_KINDS:
            raise BadInput(f"'{p}' is a '{kind}' artifact, not a model; pass a train-sim, warmup or rl --out, "
                           "or an HF model directory")
    elif any((p / f).exists() for f in _OWN_MODEL_FILES):
        raise BadInput(f"incomplete artifact '{p}': zsctl model files but no {MANIFEST} (the run writing it did "
                       "not finish); rerun that stage")


def read_artifact(path: str | Path, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read and validate an artifact's table; refuses incomplete or foreign directories."""
    manifest = read_manifest(path)
    if manifest.get("kind") != kind:
        raise BadInput(f"'{path}' is a '{manifest.get('kind')}' artifact, expected '{kind}'")
    name, schema = TABLES[kind]
    return read_table_file(Path(path) / name, schema, columns)


def read_table_file(file: str | Path, required: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file and check it has the required columns with compatible types."""
    file = Path(file)
    try:
        pf = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as e:
        raise BadInput(f"cannot read Parquet file '{file}' ({e}); check the path") from e
    problems = missing_or_mistyped(pf.schema_arrow, required)
    if problems:
        raise BadInput(f"'{file}': {'; '.join(problems)}")
    return pf.read(columns=columns)


def artifact_file(folder: str | Path, rel: str) -> Path:
    """A file a manifest lists, refused when the name leads out of the artifact folder."""
    folder = Path(folder)
    p = folder / rel
    if Path(rel).is_absolute() or folder.resolve() not in p.resolve().parents:
        raise BadInput(
            f"'{folder / MANIFEST}' lists '{rel}', outside the artifact folder; rerun the stage that wrote it"
        )
    return p
