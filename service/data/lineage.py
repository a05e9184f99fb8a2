"""What a run was trained on, described from metadata: the input dataset and the shard plan.

Nothing here re-reads the data: the digest is built from the file names, their row counts and
the schema (or from the synthetic generator's spec), so it is cheap for any dataset size and
changes when the files do.
"""

import hashlib
import json
from dataclasses import asdict, dataclass

import pyarrow as pa

from shardprop.service.data.plan import DataPlan


@dataclass(frozen=True)
class InputRecord:
    uri: str  # where the data lives, as the user named it
    name: str
    digest: str  # sha256 of the metadata, shortened as MLflow shows digests
    columns: tuple[tuple[str, str], ...]  # (name, arrow type) of the columns used
    rows: int


def column_types(schema: pa.Schema, names: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((name, str(schema.field(name).type)) for name in names)


def input_record(plan: DataPlan, path: str | None) -> InputRecord:
    source = plan.source
    used = [*plan.features, plan.label]
    if source.synthetic is not None:
        spec = asdict(source.synthetic)
        uri = "synthetic:" + ",".join(f"{k}={v}" for k, v in spec.items() if v is not None)
        identity = {"synthetic": spec}
        name = f"synthetic-{source.synthetic.name}"
    else:
        uri = path or ("memory:table" if source.format == "table" else source.files[0])
        identity = {
            "format": source.format,
            "files": list(zip(source.files, source.file_rows, strict=True)),
        }
        name = uri.rstrip("/").rsplit("/", 1)[-1]
    columns = column_types(source.schema, used) if source.schema is not None else ()
    identity |= {"columns": columns, "features": list(plan.features), "label": plan.label}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return InputRecord(uri, name, digest, columns, plan.total_rows)


def shard_records(plan: DataPlan, placements: list[dict]) -> list[dict]:
    """Per rank: its row range, the files (and rows within them) it reads, where it runs."""
    records = []
    for (start, stop), placement in zip(plan.shards, placements, strict=True):
        files = (
            [{"file": file, "rows": [lo, hi]} for file, lo, hi in plan.source.spans(start, stop)]
            if plan.source.files
            else []
        )
        records.append({**placement, "rows": [start, stop], "files": files})
    return records
