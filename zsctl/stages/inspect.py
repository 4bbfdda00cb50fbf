"""`zsctl inspect DIR`: an artifact's manifest, the schema of each table, and its first rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from zsctl.core.artifacts import read_manifest


def _short(v, width: int = 120):
    s = str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def run(path: str, rows: int = 5) -> dict:
    manifest = read_manifest(path)
    tables = {}
    for rel in manifest.get("files", {}):
        if not rel.endswith(".parquet"):
            continue
        pf = pq.ParquetFile(Path(path) / rel)
        head = next(pf.iter_batches(batch_size=max(rows, 1)), None)
        tables[rel] = {
            "rows": pf.metadata.num_rows,
            "schema": {f.name: str(f.type) for f in pf.schema_arrow},
            "head": [{k: _short(v) for k, v in r.items()} for r in (head.to_pylist()[:rows] if head else [])],
        }
    return {"path": str(path), "manifest": manifest, "tables": tables}
