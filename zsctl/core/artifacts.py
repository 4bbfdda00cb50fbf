"""Artifacts: one directory = data file(s) + manifest.json, written so a crash never looks complete.

Write order: data to a temp name in the directory → rename → manifest.json last (also via temp +
rename). Readers refuse a directory without a manifest, and check required columns and types.
"""

from __future__ import annotations

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
from zsctl.core.errors import BadInput
from zsctl.core.schemas import SCHEMA_VERSION, TABLES, missing_or_mistyped

MANIFEST = "manifest.json"
# Key words that mark a secret (api_key, hf_token, password…); whole words only, so counts such as
# max_new_tokens or tokens_per_doc stay readable.
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_out(out: str | Path, overwrite: bool = True) -> Path:
    """Create the output directory; an old manifest is removed first so a rerun that dies midway
    never leaves the previous run's manifest vouching for new, partial data."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a directory; pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    return out


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
    """Drop anything that looks like a secret before it reaches a manifest."""
    if isinstance(obj, dict):
        return {
            k: ("***" if _SECRET_WORDS & set(re.split(r"[_\-\s.]+", str(k).lower())) and v else _scrub(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
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
        "schema_version": SCHEMA_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "zsctl_version": __version__,
        "git_commit": _git_commit(),
        "argv": _scrub(list(sys.argv)),
        "config": config,
        "config_hash": config_hash(config),
        "inputs": inputs or [],
        "files": files,
        "seed": seed,
        "libraries": _library_versions(),
        "summary": summary or {},
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
    out = prepare_out(out)
    write_table(out, name, table)
    return write_manifest(out, kind, **manifest_kw)


def read_manifest(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"'{p}' does not exist; pass the --out directory of an earlier stage")
    if not p.is_dir():
        raise BadInput(f"'{p}' is not an artifact directory; pass the --out directory of an earlier stage")
    mf = p / MANIFEST
    if not mf.is_file():
        raise BadInput(f"incomplete artifact '{p}': no {MANIFEST} (the run that wrote it did not finish); rerun that stage")
    try:
        return json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"'{mf}' is not valid JSON ({e}); rerun the stage that wrote it") from e


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


def remove_partial(out: Path) -> None:
    """Best-effort cleanup of temp files a failed write left behind (never the user's other files)."""
    for p in Path(out).glob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
