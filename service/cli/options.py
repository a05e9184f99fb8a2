"""What several commands share: their options, and how those become config overrides."""

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Annotated

import typer

# the options `train`, `verify` and `plan` share
ConfigArgument = Annotated[
    Path | None, typer.Argument(help="YAML config; every key has a default.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: --set train.steps=100 (YAML value)."),
]
WorkersOption = Annotated[
    int | None, typer.Option(help="Ray workers (cluster.workers); 0 = in-process.")
]
# and the ones `train`, `verify` and `submit` share
ExperimentOption = Annotated[str | None, typer.Option(help="MLflow experiment name.")]
RunNameOption = Annotated[str | None, typer.Option(help="MLflow run name.")]
AddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster to join: auto, host:port, ray://host:10001.")
]
TrackingUriOption = Annotated[
    str | None, typer.Option(help="MLflow tracking URI (default sqlite:///mlflow.db).")
]
NoTrackingOption = Annotated[
    bool, typer.Option("--no-tracking", help="Record nothing in MLflow (tracking.enabled).")
]
QuietOption = Annotated[bool, typer.Option(help="Print nothing but errors.")]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")]


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers, as the bench options give widths and worker counts."""
    return tuple(int(item) for item in text.split(",") if item.strip())


def tracking_flags(
    uri: str | None, experiment: str | None, run_name: str | None, no_tracking: bool = False
) -> dict:
    """The tracking options as config overrides (None: not given, the config decides)."""
    return {
        "tracking.uri": uri,
        "tracking.experiment": experiment,
        "tracking.run_name": run_name,
        "tracking.enabled": False if no_tracking else None,
    }


def quiet_mlflow() -> None:
    """MLflow's INFO lines would drown the progress; its client retries a dead server for
    minutes per call, where the tracker's writer retries at its next tick anyway; and its
    usage telemetry reaches for the network; and its run links (printed on a server's runs)
    repeat the run's last lines. Each is only a default: the user's variable wins."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@contextmanager
def only_errors(quiet: bool) -> Iterator[None]:
    """--quiet: no warning of a library or of ours, from any logger or `warnings.warn`, and
    nothing on stdout while the command runs (Ray Tune prints its experiment's box and path
    whatever its `verbose`); errors still show, on stderr. Undone after, for a caller in the
    same process."""
    if not quiet:
        yield
        return
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
