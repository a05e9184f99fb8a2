"""The `shardprop` command: parse, build a config, call the library, render. Nothing else."""

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from service.config import load_config
from service.errors import TrainingError, UserError

app = typer.Typer(
    help="Data-parallel full-batch training on Ray workers, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold tokens and whole datasets
)


@contextmanager
def errors_as_exit_codes():
    """User mistakes: one line per problem, exit 2. Failed runs: one line, exit 1."""
    try:
        yield
    except UserError as error:
        for line in str(error).splitlines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(code=2) from None
    except TrainingError as error:
        typer.echo(f"failed: {error}", err=True)
        raise typer.Exit(code=1) from None


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config; every key has a default.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set train.steps=100 (YAML value)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray workers (cluster.workers); 0 = in-process.")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join: auto, host:port, ray://host:10001.")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default sqlite:///mlflow.db).")
    ] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name.")] = None,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name.")] = None,
    init_weights: Annotated[
        Path | None, typer.Option(help="Start from these weights (.npz: W1..WL, b1..bL).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write DIR/weights.npz, DIR/metrics.json, DIR/model.json.")
    ] = None,
    no_tracking: Annotated[
        bool, typer.Option("--no-tracking", help="Record nothing in MLflow (tracking.enabled).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="Print nothing but errors.")] = False,
) -> None:
    """Train the network of CONFIG on its data, sharded across workers."""
    # imported here: Ray and MLflow take seconds to import, `--help` should not wait for them
    from service.progress import Reporter
    from service.trainer import train as run_training

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO lines drown progress
    with errors_as_exit_codes():
        cfg = load_config(
            config,
            set_ or [],
            {
                "cluster.workers": workers,
                "cluster.address": address,
                "tracking.uri": tracking_uri,
                "tracking.experiment": experiment,
                "tracking.run_name": run_name,
                "tracking.enabled": False if no_tracking else None,
            },
        )
        reporter = Reporter("quiet" if quiet else "auto")
        result = run_training(cfg, init_weights, output, reporter)
    final = result.final
    accuracy = f", accuracy {final['accuracy']:.4f}" if "accuracy" in final else ""
    reporter.say(f"run {result.run_id}: loss {final['loss']:.6f}{accuracy}")
    reporter.say(f"weights: {result.output / 'weights.npz'}")
    if result.tracking_uri:
        from service.tracking import ui_command

        reporter.say(f"see it in the MLflow UI: {ui_command(result.tracking_uri)}")


bench_app = typer.Typer(help="Benchmarks: ratios measured within one run, never absolute.")
app.add_typer(bench_app, name="bench")


def report(results: list[dict], json_out: Path | None) -> None:
    for r in results:
        parts = [r["name"]] + [
            f"{label} {r[key]['median']:.3f} s [{r[key]['low']:.3f}-{r[key]['high']:.3f}]"
            for key, label in r["timings"]
        ]
        typer.echo(", ".join(parts) + f", ratio {r['ratio']:.3f}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@bench_app.command("network")
def bench_network(
    rows: Annotated[int, typer.Option(help="Rows of the synthetic batch.")] = 200_000,
    features: Annotated[int, typer.Option(help="Input features.")] = 64,
    hidden: Annotated[str, typer.Option(help="Hidden widths, comma-separated.")] = "256,256",
    dtype: Annotated[list[str] | None, typer.Option(help="float64 and/or float32.")] = None,
    threads: Annotated[int | None, typer.Option(help="BLAS threads (default: all).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per measurement.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """One forward+backward step against the same step's matrix products alone."""
    from service import bench

    widths = tuple(int(w) for w in hidden.split(",") if w.strip())
    dtypes = dtype or ["float64", "float32"]
    report(
        [bench.bench_network(rows, features, widths, dt, threads, repeats) for dt in dtypes],
        json_out,
    )


@bench_app.command("tracking")
def bench_tracking(
    config: Annotated[Path, typer.Argument(help="The job to time.")] = Path("configs/default.yaml"),
    repeats: Annotated[int, typer.Option(help="Runs of each kind, alternated.")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """Wall time of `shardprop train CONFIG` with MLflow tracking against --no-tracking."""
    from service import bench

    report([bench.bench_tracking(config, repeats)], json_out)
