"""Datasets to train on, written as Parquet: the synthetic generators, and four real tables.

Synthetic sets are written file by file and row group by row group, each piece generated on
its own by workers/data/synthetic.py's generate (seeded by block), so a billion-row set never has to
fit in memory and the files hold exactly the rows a `data.synthetic` config would train on.
The real tables need no network: `breast-cancer`, `digits` and `diabetes` are the ones
scikit-learn ships inside its package (imported only when one of them is asked for), and
`penguins` is a CSV shipped inside shardprop (service/data/tables/).
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shardprop.service.data.plan import EXTENSIONS, IGNORED_PREFIXES, split_rows
from shardprop.workers.data.synthetic import DATASETS, LABEL, SyntheticSpec, generate
from shardprop.workers.data.synthetic import schema as synthetic_schema
from shardprop.workers.errors import DataError

SYNTHETIC = tuple(DATASETS)
# the penguins table as the palmerpenguins package ships it; types pinned, not inferred
PENGUINS_CSV = "penguins.csv"
PENGUINS_TYPES = {
    "species": pa.string(),
    "island": pa.string(),
    "bill_length_mm": pa.float64(),
    "bill_depth_mm": pa.float64(),
    "flipper_length_mm": pa.int64(),
    "body_mass_g": pa.int64(),
    "sex": pa.string(),
    "year": pa.int64(),
}
# 32 synthetic blocks; a worker decodes only the row groups that overlap its rows, so groups
# much larger than a shard would make every worker decode rows it then throws away
ROW_GROUP_ROWS = 131_072


@dataclass(frozen=True)
class Written:
    """What `make_dataset` wrote."""

    files: tuple[Path, ...]
    rows: int
    columns: tuple[str, ...]
    row_groups: int


def make_dataset(
    name: str,
    out: str | os.PathLike,
    rows: int | None = None,
    features: int | None = None,
    files: int = 1,
    noise: float | None = None,
    seed: int | None = None,
    classes: int | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> Written:
    """Write dataset NAME to `out`: one Parquet file, or `files` parts in the folder `out`.

    rows=None takes a real table whole; a synthetic set needs it. Files split the rows into
    contiguous ranges as evenly as the workers' shards are (the first files get one more).
    """
    if files < 1:
        raise DataError(f"--files: must be at least 1, got {files}")
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
    if name in TABLES:
        fixed = {"--features": features, "--noise": noise, "--seed": seed, "--classes": classes}
        for flag, value in fixed.items():
            if value is not None:
                raise DataError(
                    f"{flag}: {name} is a fixed table; {flag} applies to the synthetic "
                    f"datasets ({', '.join(SYNTHETIC)}) only"
                )
        table = bundled_table(name, rows)
        schema, total = table.schema, table.num_rows

        def rows_of(start: int, stop: int) -> pa.Table:
            return table.slice(start, stop - start)

    elif name in SYNTHETIC:
        spec = synthetic_spec(name, rows, features, noise, seed, classes)
        schema, total = synthetic_schema(spec), spec.rows

        def rows_of(start: int, stop: int) -> pa.Table:
            return generate(spec, start, stop)

    else:
        raise DataError(f"{name}: unknown dataset; expected one of {', '.join(NAMES)}")
    if files > total:
        raise DataError(f"--files: {files} files but only {total} rows; use at most {total}")
    targets = output_files(Path(out), files)
    row_groups = 0
    for path, (start, stop) in zip(targets, split_rows(total, files), strict=True):
        row_groups += write_parquet(path, schema, rows_of, start, stop, row_group_rows)
    return Written(tuple(targets), total, tuple(schema.names), row_groups)


def synthetic_spec(
    name: str,
    rows: int | None,
    features: int | None,
    noise: float | None,
    seed: int | None,
    classes: int | None,
) -> SyntheticSpec:
    """The spec a `data.synthetic` config with these values would build; errors name flags."""
    if rows is None:
        raise DataError(f"--rows: required for the synthetic dataset {name}")
    defaults = SyntheticSpec(name, rows=1)
    try:
        return SyntheticSpec(
            name,
            rows,
            defaults.noise if noise is None else noise,
            defaults.seed if seed is None else seed,
            features,
            classes,
        )
    except DataError as error:
        # the spec speaks of config keys; here the same values came from flags
        raise DataError(str(error).replace("data.synthetic.", "--")) from None


def bundled_table(name: str, rows: int | None = None) -> pa.Table:
    """Real table NAME whole, or its first `rows` rows in the order it is shipped."""
    table = TABLES[name]()
    if rows is not None:
        if not 1 <= rows <= table.num_rows:
            raise DataError(f"--rows: {name} has {table.num_rows} rows; got {rows}")
        table = table.slice(0, rows)
    return table


def sklearn_table(name: str, loader: str, label_type: pa.DataType, **options: object) -> pa.Table:
    """scikit-learn's copy of a real table: float64 features with simple names, then `y`.

    breast-cancer: 569 rows, 30 features, y = sklearn's target (0 = malignant, 1 = benign).
    digits: 1797 rows, 64 pixel intensities 0..16 (pixel_<row>_<col>), y = the digit 0..9.
    diabetes: 442 rows, 10 features in their original units (age, sex, bmi, bp, s1..s6
    blood serum measurements), y = disease progression a year later, 25..346.
    """
    try:
        from sklearn import datasets  # heavy and optional: only when its table is asked for
    except ImportError:
        raise DataError(
            f"{name}: needs scikit-learn, which ships this table: pip install scikit-learn"
        ) from None
    bunch = getattr(datasets, loader)(**options)
    X, y = bunch.data, bunch.target  # (m, n0), (m,)
    names = column_names(bunch.feature_names)
    columns = {column: pa.array(X[:, j], pa.float64()) for j, column in enumerate(names)}
    columns[LABEL] = pa.array(np.asarray(y), label_type)
    return pa.table(columns)


def penguins_table() -> pa.Table:
    """The Palmer penguins, 344 rows: species, island and sex as strings (sex null for 11
    birds), bill, flipper and body mass with nulls where they were not measured, and year.
    """
    source = resources.files("shardprop.service.data") / "tables" / PENGUINS_CSV
    with source.open("rb") as stream:
        return pacsv.read_csv(
            stream,
            convert_options=pacsv.ConvertOptions(
                column_types=PENGUINS_TYPES,
                null_values=["NA"],
                strings_can_be_null=True,
                include_columns=list(PENGUINS_TYPES),
            ),
        )


TABLES: dict[str, Callable[[], pa.Table]] = {
    "breast-cancer": partial(sklearn_table, "breast-cancer", "load_breast_cancer", pa.int64()),
    "digits": partial(sklearn_table, "digits", "load_digits", pa.int64()),
    "diabetes": partial(sklearn_table, "diabetes", "load_diabetes", pa.float64(), scaled=False),
    "penguins": penguins_table,
}
NAMES = (*SYNTHETIC, *TABLES)


def column_names(raw: list[str]) -> list[str]:
    """'mean radius' -> 'mean_radius': names that need no quoting in a config or a query."""
    names = [re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_") for name in raw]
    if len(set(names)) != len(names) or LABEL in names:
        raise ValueError(f"feature names {raw} do not map to distinct column names")
    return names


def output_files(out: Path, files: int) -> list[Path]:
    """`out` itself for one file, else out/part-00000.parquet ...; refuses to mix with others.

    A folder is read as one dataset, so stray data files left in it would be trained on too.
    """
    if files == 1:
        if not out.name.lower().endswith((".parquet", ".pq")):
            raise DataError(
                f"--out: {out}: one file must end in .parquet (or give --files F > 1 for a folder)"
            )
        if out.is_dir():
            raise DataError(f"--out: {out} is a folder; give a file name ending in .parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        return [out]
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {out} is a file; --files {files} writes a folder of parts")
    targets = [out / f"part-{i:05d}.parquet" for i in range(files)]
    if out.is_dir():
        ours = {target.name for target in targets}
        strays = sorted(
            entry.name
            for entry in out.iterdir()
            if entry.name not in ours
            and not entry.name.startswith(IGNORED_PREFIXES)
            and entry.name.lower().endswith(tuple(EXTENSIONS))
        )
        if strays:
            raise DataError(
                f"--out: folder {out} already holds {', '.join(strays[:3])}"
                f"{' ...' if len(strays) > 3 else ''}, which would be read with the new "
                "parts; use an empty folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    return targets


def write_parquet(
    path: Path,
    schema: pa.Schema,
    rows_of: Callable[[int, int], pa.Table],
    start: int,
    stop: int,
    row_group_rows: int,
) -> int:
    """Rows [start, stop) into one file, one row group at a time; returns the groups written.

    Written under a hidden name and renamed: a reader (or a folder scan) never sees half a file.
    """
    partial = path.with_name(f".{path.name}.partial")
    groups = 0
    try:
        with pq.ParquetWriter(partial, schema) as writer:
            for lo in range(start, stop, row_group_rows):
                hi = min(lo + row_group_rows, stop)
                writer.write_table(rows_of(lo, hi), row_group_size=row_group_rows)
                groups += 1
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return groups
