"""`shardprop bench ...`: the benchmarks of service/bench, as commands."""

from pathlib import Path
from typing import Annotated

import typer

from shardprop.service.cli.errors import errors_as_exit_codes
from shardprop.service.cli.options import JsonOption, int_list, quiet_mlflow
from shardprop.service.cli.render import write_json

bench_app = typer.Typer(
    help="Benchmarks: ratios measured within one run, never absolute.",
    invoke_without_command=True,
)

RowsOption = Annotated[int, typer.Option(help="Rows of the workload.")]
FeaturesOption = Annotated[int, typer.Option(help="Input features.")]
HiddenOption = Annotated[str, typer.Option(help="Hidden widths, comma-separated.")]
DtypeOption = Annotated[str, typer.Option(help="float64 or float32.")]


@bench_app.callback()
def bench_steps(
    ctx: typer.Context,
    rows: RowsOption = 200_000,
    features: FeaturesOption = 64,
    hidden: HiddenOption = "256,256",
    dtype: DtypeOption = "float64",
    threads: Annotated[int, typer.Option(help="BLAS threads of the in-process step.")] = 2,
    workers: Annotated[str, typer.Option(help="Ray worker counts, comma-separated.")] = "1,2,4",
    tree_workers: Annotated[
        str | None,
        typer.Option(help="Deprecated and ignored: the tree all-reduce is gone.", hidden=True),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per figure.")] = 5,
    peers: Annotated[
        bool,
        typer.Option(help="Also time scikit-learn, PyTorch and Ray Train, where installed."),
    ] = True,
    json_out: JsonOption = None,
    track: Annotated[bool, typer.Option(help="Log the table to MLflow as a run.")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store for --track.")] = None,
) -> None:
    """The standard workload's step: in-process, on Ray workers, its GEMMs, Ray alone."""
    if ctx.invoked_subcommand is not None:
        return
    from shardprop.service.bench import steps as suite
    from shardprop.service.bench.workload import Workload

    if tree_workers is not None:
        typer.echo("warning: --tree-workers is deprecated and ignored", err=True)
    quiet_mlflow()
    workload = Workload(rows, features, int_list(hidden), dtype, threads)
    with errors_as_exit_codes():
        result = suite.bench_steps(workload, int_list(workers), repeats, peers)
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)
    if track:
        typer.echo(f"logged as MLflow run {suite.track(result, tracking_uri)}")


def report(results: list[dict], json_out: Path | None) -> None:
    """One line per result: each timing's median and range, then the ratio."""
    for r in results:
        parts = [r["name"]] + [
            f"{label} {r[key]['median']:.3f} s [{r[key]['low']:.3f}-{r[key]['high']:.3f}]"
            for key, label in r["timings"]
        ]
        also = "".join(f", {name} {value:.3f}" for name, value in r.get("also", {}).items())
        typer.echo(", ".join(parts) + f", ratio {r['ratio']:.3f}{also}")
    write_json(json_out, results)


@bench_app.command("network")
def bench_network(
    rows: Annotated[int, typer.Option(help="Rows of the synthetic batch.")] = 200_000,
    features: FeaturesOption = 64,
    hidden: HiddenOption = "256,256",
    dtype: Annotated[list[str] | None, typer.Option(help="float64 and/or float32.")] = None,
    threads: Annotated[int | None, typer.Option(help="BLAS threads (default: all).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per measurement.")] = 5,
    json_out: JsonOption = None,
) -> None:
    """One forward+backward step against the same step's matrix products alone, against
    itself on the whole columns at once instead of in chunks, and the exact reduction's."""
    from shardprop.service.bench import timing as bench

    widths = int_list(hidden)
    dtypes = dtype or ["float64", "float32"]
    report(
        [bench.bench_network(rows, features, widths, dt, threads, repeats) for dt in dtypes],
        json_out,
    )


@bench_app.command("data")
def bench_data(
    rows: Annotated[int, typer.Option(help="Rows of the Parquet dataset.")] = 10_000_000,
    files: Annotated[int, typer.Option(help="Files it is cut into.")] = 100,
    folder: Annotated[
        Path | None, typer.Option(help="Keep the dataset here between runs (default: a temp dir).")
    ] = None,
    workers: Annotated[
        str,
        typer.Option(
            help="Runs whose workers' peak memory is measured against the plan, comma-separated "
            "(0: in-process; k: k Ray workers)."
        ),
    ] = "",
    features: Annotated[int, typer.Option(help="Feature columns.")] = 8,
    json_out: JsonOption = None,
) -> None:
    """Planning time and coordinator memory for a large Parquet dataset; one worker's read;
    with --workers, each worker's peak memory against the plan's."""
    from shardprop.service.bench.data import bench_planning

    counts = int_list(workers) if workers else ()
    figures = bench_planning(
        rows=rows, files=files, features=features, folder=folder, workers=counts
    )
    for key, value in figures.items():
        typer.echo(
            f"{key:28s} {value:,.4g}" if isinstance(value, float) else f"{key:28s} {value:,}"
        )
    write_json(json_out, figures)


@bench_app.command("scale")
def bench_scale(
    rows: Annotated[
        str, typer.Option(help="Row counts of the Parquet datasets, comma-separated.")
    ] = "1000000,2000000,5000000,10000000",
    workers: Annotated[str, typer.Option(help="Ray worker counts, comma-separated.")] = "1,2,4",
    files: Annotated[
        str, typer.Option(help="File counts the planning is timed on, comma-separated.")
    ] = "100,1000,10000",
    repeats: Annotated[int, typer.Option(help="Timed steps and plans per case.")] = 9,
    folder: Annotated[
        Path | None, typer.Option(help="Keep the datasets here between runs (default: a temp dir).")
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Step time against rows (64 float32 features) and Ray workers, each worker's peak
    memory against the plan's, and planning time against file count."""
    from shardprop.service.bench import scale as suite

    result = suite.bench_scale(
        int_list(rows),
        int_list(workers),
        int_list(files),
        folder,
        repeats,
        say=lambda line: typer.echo(line, err=True),
    )
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)


@bench_app.command("tracking")
def bench_tracking(
    config: Annotated[Path, typer.Argument(help="The job to time.")] = Path("configs/default.yaml"),
    repeats: Annotated[int, typer.Option(help="Runs of each kind, alternated.")] = 3,
    json_out: JsonOption = None,
) -> None:
    """Wall time of `shardprop train CONFIG` with MLflow tracking against --no-tracking."""
    from shardprop.service.bench import timing as bench

    report([bench.bench_tracking(config, repeats)], json_out)


@bench_app.command("startup")
def bench_startup(
    rows: RowsOption = 200_000,
    features: FeaturesOption = 64,
    hidden: HiddenOption = "256,256",
    dtype: DtypeOption = "float64",
    steps: Annotated[int, typer.Option(help="Steps of each run.")] = 3,
    repeats: Annotated[int, typer.Option(help="Runs of each kind.")] = 1,
    tracking: Annotated[bool, typer.Option(help="MLflow tracking on in the command.")] = True,
    json_out: JsonOption = None,
) -> None:
    """`shardprop train` from the command to its first step, 2 workers, Ray's start-up
    included, against Ray Train's fit() to its first step (where it is installed)."""
    from shardprop.service.bench import startup as suite
    from shardprop.service.bench.workload import Workload

    quiet_mlflow()
    workload = Workload(rows, features, int_list(hidden), dtype)
    with errors_as_exit_codes():
        result = suite.bench_startup(workload, steps, repeats, tracking)
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)


@bench_app.command("predict")
def bench_predict(
    rows: Annotated[int, typer.Option(help="Rows of the Parquet table scored.")] = 1_000_000,
    features: FeaturesOption = 64,
    hidden: HiddenOption = "256,256",
    workers: Annotated[int, typer.Option(help="Ray workers (and Ray Data actors).")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps of the model scored.")] = 3,
    repeats: Annotated[int, typer.Option(help="Timed repeats per figure.")] = 3,
    folder: Annotated[
        Path | None, typer.Option(help="Keep the table and model here between runs.")
    ] = None,
    ray_data: Annotated[bool, typer.Option(help="Also time Ray Data's map_batches.")] = True,
    json_out: JsonOption = None,
) -> None:
    """Rows/s of `shardprop predict` (Ray workers, in-process, the command) against Ray Data
    and mlflow.pyfunc's predict on the same rows."""
    from shardprop.service.bench import predict as suite

    quiet_mlflow()
    with errors_as_exit_codes():
        result = suite.bench_predict(
            rows, features, int_list(hidden), workers, steps, repeats, folder, ray_data
        )
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)


@bench_app.command("convergence")
def bench_convergence(
    quick: Annotated[
        bool, typer.Option(help="Small examples (a test's), not the standard.")
    ] = False,
    workers: Annotated[
        str, typer.Option(help="Our runs' worker counts, comma-separated (0: in-process).")
    ] = "2,0",
    steps: Annotated[int, typer.Option(help="Cap of every lbfgs and adam run.")] = 500,
    gd_steps: Annotated[int, typer.Option(help="Cap of our gd runs.")] = 100,
    dtype: DtypeOption = "float64",
    threads: Annotated[int, typer.Option(help="BLAS threads of the peers.")] = 2,
    peers: Annotated[
        bool, typer.Option(help="Race scikit-learn's adam and PyTorch too, where installed.")
    ] = True,
    folder: Annotated[
        Path | None,
        typer.Option(help="Write the examples' Parquet tables here (default: a temp dir)."),
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Time from the first step to a target loss (scikit-learn's lbfgs's): our lbfgs, adam
    and gd against scikit-learn's and PyTorch's, on the standard workload, the digits
    example and a regression table."""
    from shardprop.service.bench import convergence as suite

    sizes = suite.Sizes.quick(dtype) if quick else suite.Sizes(dtype=dtype)
    with errors_as_exit_codes():
        result = suite.bench_convergence(
            sizes,
            int_list(workers),
            steps,
            gd_steps,
            threads,
            peers,
            folder,
            say=lambda line: typer.echo(line, err=True),
        )
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)


@bench_app.command("sweep")
def bench_sweep(
    config: Annotated[Path, typer.Argument(help="The config every trial trains.")] = Path(
        "configs/default.yaml"
    ),
    trials: Annotated[int, typer.Option(help="Trials, each another learning rate.")] = 8,
    max_concurrent: Annotated[int, typer.Option(help="The sweep's trials at once.")] = 2,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key, on both sides.")
    ] = None,
    folder: Annotated[
        Path | None, typer.Option(help="Where both sides run (default: a temp dir).")
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """A sweep of N trials against the same N `shardprop train` commands one after another,
    and each trial's overhead in Ray Tune."""
    import tempfile

    from shardprop.service.bench import sweep as suite

    with errors_as_exit_codes(), tempfile.TemporaryDirectory() as tmp:
        result = suite.bench_sweep(config, trials, max_concurrent, folder or Path(tmp), set_ or [])
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)
