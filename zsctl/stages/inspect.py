"""`zsctl inspect DIR`: an artifact's manifest, the schema of each table, and its first rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zsctl.core.artifacts import MANIFEST, artifact_file, read_manifest
from zsctl.core.errors import BadInput


def _short(v, width: int = 120):
    s = str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def run(path: str, rows: int = 5) -> dict:
    manifest = read_manifest(path)
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BadInput(f"'{Path(path) / MANIFEST}': 'files' is not a mapping; rerun the stage that wrote it")
    tables = {}
    for rel in files:
        if not rel.endswith(".parquet"):
            continue
        file = artifact_file(path, rel)  # never a file outside the artifact folder
        try:
            pf = pq.ParquetFile(file)
            head = next(pf.iter_batches(batch_size=max(rows, 1)), None)
        except (OSError, pa.ArrowException) as e:
            raise BadInput(f"cannot read '{file}' ({' '.join(str(e).split())[:200]}); the artifact is damaged: "
                           "rerun the stage that wrote it") from None
        tables[rel] = {
            "rows": pf.metadata.num_rows,
            "schema": {f.name: str(f.type) for f in pf.schema_arrow},
            "head": [{k: _short(v) for k, v in r.items()} for r in (head.to_pylist()[:rows] if head else [])],
        }
    return {"path": str(path), "manifest": manifest, "tables": tables}
