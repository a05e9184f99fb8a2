"""`shardprop data make`: datasets written as Parquet."""

from pathlib import Path
from typing import Annotated

import typer

from shardprop.service.cli.errors import errors_as_exit_codes

data_app = typer.Typer(help="Datasets as Parquet: the synthetic sets and four real tables.")


@data_app.command("make")
def data_make(
    name: Annotated[
        str,
        typer.Argument(
            help="Synthetic: moons, circles, blobs, regression. Real tables: breast-cancer, "
            "digits, diabetes (regression), penguins (string columns and nulls, kept as they are)."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="A .parquet file, or with --files F > 1 a folder of parts.")
    ],
    rows: Annotated[
        int | None, typer.Option(help="Rows; required for synthetic sets (tables: first N).")
    ] = None,
    features: Annotated[
        int | None, typer.Option(help="Feature columns (blobs, regression).")
    ] = None,
    files: Annotated[int, typer.Option(help="Split the rows into F part files.")] = 1,
    noise: Annotated[float | None, typer.Option(help="Noise of a synthetic set (0.2).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of a synthetic set (0).")] = None,
    classes: Annotated[int | None, typer.Option(help="Classes of blobs (3).")] = None,
) -> None:
    """Write dataset NAME as Parquet, file by file, never holding all its rows.

    Nothing is downloaded: the real tables ship in scikit-learn, penguins in shardprop.
    """
    from shardprop.service.data.datasets import make_dataset

    with errors_as_exit_codes():
        written = make_dataset(name, out, rows, features, files, noise, seed, classes)
    where = str(out) if len(written.files) == 1 else f"{out}/ ({len(written.files)} files)"
    columns = written.columns
    shown = ", ".join(columns if len(columns) <= 6 else [*columns[:4], "...", columns[-1]])
    typer.echo(
        f"wrote {written.rows:,} rows of {name} to {where}: {written.row_groups} row group(s), "
        f"{len(columns)} columns ({shown})"
    )
