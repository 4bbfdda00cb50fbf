"""Trajectory inputs: zsctl collect's artifacts, or Parquet / JSONL files written by other tools.

A file needs at least `question: string`, `golden_answers: list<string>` and `searches:
list<struct<query: string, documents: list<struct<title?: string, text: string, score?: double>>>>`;
`traj_id` is optional (FILE-STEM:ROW otherwise); `em`, `f1` and `response` are read when a consumer
asks for them. Files are checked before anything is read (Parquet: the schema; JSONL: each line as
it comes) and read in record batches, so memory stays flat however large the input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from zsctl.core import artifacts
from zsctl.core.errors import BadInput
from zsctl.core.schemas import STR_LIST, missing_or_mistyped

# What an input may be asked for. Documents need only `text`: other tools may not log titles or scores.
_DOC_IN = pa.struct([("text", pa.string())])
_SEARCH_IN = pa.struct([("query", pa.string()), ("documents", pa.list_(_DOC_IN))])
COLUMNS = {
    "question": pa.string(),
    "golden_answers": STR_LIST,
    "searches": pa.list_(_SEARCH_IN),
    "em": pa.float64(),
    "f1": pa.float64(),
    "response": pa.string(),
}
_HINT = "the trajectories schema is in the README (Artifacts) and zsctl/core/readers.py"


def input_files(spec: str) -> list[Path]:
    """Each comma-separated source as a data file; artifact dirs must be complete trajectories."""
    files = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        p = Path(part)
        if p.is_dir():
            manifest = artifacts.read_manifest(p)
            if manifest.get("kind") != "trajectories":
                raise BadInput(f"'{p}' is a '{manifest.get('kind')}' artifact, expected 'trajectories'; "
                               "pass zsctl collect's --out")
            files.append(p / "trajectories.parquet")
        elif p.is_file() and p.suffix in (".parquet", ".jsonl"):
            files.append(p)
        elif p.exists():
            raise BadInput(f"--trajectories '{p}' is neither a trajectories directory nor a .parquet/.jsonl file")
        else:
            raise BadInput(f"--trajectories '{p}' does not exist; pass zsctl collect's --out or a .parquet/.jsonl file")
    if not files:
        raise BadInput("--trajectories is empty; pass a trajectories directory or file")
    return files


def check_parquet(file: Path, cols: list[str]) -> None:
    try:
        schema = pq.ParquetFile(file).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise BadInput(f"cannot read Parquet file '{file}' ({' '.join(str(e).split())}); check the path") from e
    problems = missing_or_mistyped(schema, pa.schema([(c, COLUMNS[c]) for c in cols]))
    if problems:
        raise BadInput(f"'{file}': {'; '.join(problems)}; {_HINT}")


def iter_trajectories(file: Path, cols: list[str], batch: int) -> Iterator[list[dict]]:
    """Trajectory dicts in batches; `traj_id` falls back to FILE-STEM:ROW for other tools' files."""
    if file.suffix == ".parquet":
        pf = open_streaming(file)
        read = cols + (["traj_id"] if "traj_id" in pf.schema_arrow.names else [])
        n = 0
        for rb in pf.iter_batches(batch_size=batch, columns=read):
            rows = rb.to_pylist()
            for r in rows:
                if r.get("question") is None:
                    raise BadInput(f"'{file}' row {n}: 'question' is empty (null); every trajectory needs its question")
                r.setdefault("traj_id", f"{file.stem}:{n}")
                n += 1
            yield rows
    else:
        yield from _iter_jsonl(file, cols, batch)


def open_streaming(file: Path) -> pq.ParquetFile:
    # Without pre-buffering and with a small read buffer, Arrow holds one column chunk page at a
    # time instead of whole row groups: measured RSS stays flat (~200 MB) where the defaults grew
    # with the file.
    return pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)


def _iter_jsonl(file: Path, cols: list[str], batch: int) -> Iterator[list[dict]]:
    rows: list[dict] = []
    try:
        f = open(file, encoding="utf-8")
    except OSError as e:
        raise BadInput(f"cannot read '{file}' ({e.strerror}); check the path") from e
    with f:
        for lineno, line in enumerate(_lines(f, file), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"'{file}' line {lineno}: not valid JSON ({e.msg}); "
                               "one trajectory object per line") from e
            problem = _row_problem(row, cols)
            if problem:
                raise BadInput(f"'{file}' line {lineno}: {problem}; {_HINT}")
            row.setdefault("traj_id", f"{file.stem}:{lineno}")
            rows.append(row)
            if len(rows) >= batch:
                yield rows
                rows = []
    if rows:
        yield rows


def _lines(f, file: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise BadInput(f"'{file}' is not UTF-8 text (byte {e.start} of a line); save it as UTF-8") from None


def _row_problem(row, cols: list[str]) -> str | None:
    """What is wrong with one JSONL trajectory (None when it is usable)."""
    if not isinstance(row, dict):
        return "expected a JSON object"
    for c in cols:
        if c not in row:
            return f"missing field '{c}'"
    v = row.get
    if "question" in cols and not isinstance(v("question"), str):
        return "'question' must be a string"
    if "response" in cols and not isinstance(v("response"), str):
        return "'response' must be a string"
    for c in ("em", "f1"):
        if c in cols and not isinstance(v(c), (int, float)):
            return f"'{c}' must be a number"
    golds = v("golden_answers")
    if "golden_answers" in cols and not (isinstance(golds, list) and all(isinstance(g, str) for g in golds)):
        return "'golden_answers' must be a list of strings"
    if "searches" in cols:
        searches = v("searches")
        if not isinstance(searches, list):
            return "'searches' must be a list of {query, documents}"
        for s in searches:
            if not (isinstance(s, dict) and isinstance(s.get("query"), str) and isinstance(s.get("documents"), list)):
                return "each search must be an object with 'query' (string) and 'documents' (list)"
            if not all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in s["documents"]):
                return "each document must be an object with a 'text' string (title and score optional)"
    return None
