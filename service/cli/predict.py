"""`shardprop predict MODEL DATA --out PATH`: a trained model's predictions for a table."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from shardprop.service.cli.errors import errors_as_exit_codes
from shardprop.service.cli.options import AddressOption, QuietOption, only_errors, quiet_mlflow

if TYPE_CHECKING:  # the training package loads only when the command runs
    from shardprop.service.training.progress import Reporter


class RowsProgress:
    """Rows scored so far, where the Reporter shows a run's steps: a bar on a terminal, a line
    every tenth of the rows in a log, nothing with --quiet. (The Reporter's own update()
    describes a training step, its loss first: rows have none.)"""

    def __init__(self, reporter: "Reporter"):
        self.reporter = reporter
        self.bar: Progress | None = None

    def start(self, total_rows: int, workers: int) -> None:
        self.total, self.next_line = total_rows, 0
        where = f"{workers} workers" if workers else "in-process"
        if self.reporter.mode != "rich":
            self.reporter.note(f"scoring {total_rows:,} rows, {where}")
            return
        digits = len(str(total_rows))
        self.bar = Progress(  # at 80 columns the title and the bar give way, never the counts
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(),
            MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=2 * digits + 1)),
            TextColumn("{task.fields[rate]}", table_column=Column(no_wrap=True, min_width=15)),
            TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
            TextColumn("eta"),
            TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
            console=self.reporter.console,
        )
        self.bar.start()
        self.task = self.bar.add_task(f"scoring, {where}", total=total_rows, rate="")

    def rows(self, done: int, rows_per_second: float) -> None:
        rate = f"{rows_per_second:,.0f} rows/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, rate=rate)
        elif done >= self.next_line or done == self.total:
            self.next_line = done + max(1, self.total // 10)
            self.reporter.note(f"{done:,}/{self.total:,} rows  {rate}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def predict(
    model: Annotated[
        str,
        typer.Argument(
            help="An MLflow run id, runs:/RUN/model, models:/NAME/VERSION, models:/NAME@ALIAS, "
            "or a folder holding weights.npz and model.json (train --output)."
        ),
    ],
    data: Annotated[
        str,
        typer.Argument(help="What train reads: a Parquet / CSV / Feather file, folder, glob, URI."),
    ],
    out: Annotated[Path, typer.Option(help="The Parquet file to write.")],
    kind: Annotated[
        str | None,
        typer.Option(
            help="probabilities | labels | values (default: probabilities for a classifier, "
            "values for a regression)."
        ),
    ] = None,
    keep: Annotated[
        str | None, typer.Option(help="Input columns to copy to the output: id,name.")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Ray workers, each scoring its own rows; 0 = in-process.")
    ] = 2,
    address: AddressOption = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="The store that holds the run or model (default sqlite:///mlflow.db)."),
    ] = None,
    batch_rows: Annotated[
        int, typer.Option(help="Rows a worker reads and scores at a time.")
    ] = 65_536,
    timeout: Annotated[
        float, typer.Option(help="Seconds to place a worker, or for it to score a batch.")
    ] = 600.0,
    quiet: QuietOption = False,
) -> None:
    """Score every row of DATA with MODEL; write the predictions, in input order, to --out."""
    from shardprop.service.scoring.batch import predict as score
    from shardprop.service.training.progress import Reporter

    quiet_mlflow()
    # MLflow's download bar would draw over ours
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    reporter = Reporter("quiet" if quiet else "auto")
    columns = [name.strip() for name in (keep or "").split(",") if name.strip()]
    with errors_as_exit_codes(), only_errors(quiet):
        scored = score(
            model,
            data,
            out,
            kind=kind,
            keep=columns,
            workers=workers,
            address=address,
            tracking_uri=tracking_uri,
            progress=RowsProgress(reporter),
            slice_rows=batch_rows,
            timeout=timeout,
        )
    for name, count in scored.unseen.items():
        reporter.note(f"column {name!r}: {count:,} value(s) not seen in training: all-zero inputs")
    where = f"{scored.workers} worker(s)" if scored.workers else "in-process"
    reporter.say(
        f"wrote {scored.rows:,} rows to {scored.path} ({', '.join(scored.columns)}), "
        f"{where}, {scored.rows_per_second:,.0f} rows/s; model {scored.model}"
    )
