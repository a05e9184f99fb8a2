"""The `shardprop` command: parse, build a config, call the library, render. Nothing else."""

import gc
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shardprop.service.config import Config, config_from, load_config
from shardprop.service.errors import ConfigError, TrainingError, UserError
from shardprop.service.training.interrupts import Interrupted

if TYPE_CHECKING:  # pyarrow and the estimates load only when a command needs them
    from shardprop.service.data.estimate import PlanEstimate
    from shardprop.service.data.plan import DataPlan
    from shardprop.service.training.progress import Reporter
    from shardprop.service.training.run import RunResult
    from shardprop.service.training.verify import Report as VerifyReport

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
    except Interrupted as error:
        typer.echo(f"interrupted: {error}", err=True)
        raise typer.Exit(code=error.exit_code) from None


def quiet_mlflow() -> None:
    """MLflow's INFO lines would drown the progress; its client retries a dead server for
    minutes per call, where the tracker's own writer retries at its next tick anyway; and its
    usage telemetry costs the run CPU and reaches for the network (set the variable to
    false to allow it)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def skip_last_collection() -> None:
    """The run is over and the process is about to end: the interpreter's last garbage
    collection walks every object of MLflow's and Ray's thousands of modules (about a second,
    measured) only to free memory the OS takes back anyway. Frozen objects are skipped by it;
    files, atexit handlers and finalizers still run as usual."""
    gc.freeze()


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers, as the bench options give widths and worker counts."""
    return tuple(int(item) for item in text.split(",") if item.strip())


def write_json(path: Path | None, data: object) -> None:
    if path:
        path.write_text(json.dumps(data, indent=2))


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


# the options `train` and `plan` share
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
# and the ones `train` and `submit` share
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


@app.command()
def train(
    config: ConfigArgument = None,
    set_: SetOption = None,
    workers: WorkersOption = None,
    address: AddressOption = None,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = None,
    run_name: RunNameOption = None,
    init_weights: Annotated[
        Path | None, typer.Option(help="Start from these weights (.npz: W1..WL, b1..bL).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write DIR/weights.npz, DIR/metrics.json, DIR/model.json.")
    ] = None,
    inject_failure: Annotated[
        str | None,
        typer.Option(
            help="Chaos: kill worker R's process at step S: worker=R,step=S[,times=N][,when=after]."
        ),
    ] = None,
    no_tracking: NoTrackingOption = False,
    resume: Annotated[
        str | None,
        typer.Option(help="Go on with this MLflow run from its last checkpoint (its own config)."),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Train the network of CONFIG on its data, sharded across workers."""
    if resume:
        resume_run(resume, tracking_uri, address, output, quiet)
        return
    # imported here: Ray and MLflow take seconds to import, `--help` should not wait for them
    from shardprop.service.training.progress import Reporter
    from shardprop.service.training.run import train as run_training

    quiet_mlflow()
    with errors_as_exit_codes():
        if config is None:
            raise ConfigError("train needs a CONFIG file (or --resume RUN_ID)")
        cfg = load_config(
            config,
            set_ or [],
            {
                "cluster.workers": workers,
                "cluster.address": address,
                **tracking_flags(tracking_uri, experiment, run_name, no_tracking),
                "cluster.inject_failure": inject_failure,
            },
        )
        reporter = Reporter("quiet" if quiet else "auto")
        result = run_training(cfg, init_weights, output, reporter)
    summarise(result, reporter)
    skip_last_collection()


@app.command("resume")
def resume_run(
    run_id: Annotated[str, typer.Argument(help="The MLflow run to go on with.")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="The store that holds the run (default sqlite:///mlflow.db).")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="Where the run's checkpoints are (default: as it logged).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Continue a stopped or killed run from its last checkpoint, in the same MLflow run."""
    from shardprop.service.tracking.tracker import recall_run
    from shardprop.service.training.progress import Reporter
    from shardprop.service.training.run import train as run_training

    quiet_mlflow()
    with errors_as_exit_codes():
        logged, logged_output = recall_run(tracking_uri, run_id)
        logged.get("cluster", {}).pop("inject_failure", None)  # chaos does not come back
        cfg = config_from(logged, {"tracking.uri": tracking_uri, "cluster.address": address})
        reporter = Reporter("quiet" if quiet else "auto")
        result = run_training(cfg, None, output or logged_output, reporter, resume_run=run_id)
    summarise(result, reporter)
    skip_last_collection()


@app.command()
def verify(
    config: ConfigArgument = None,
    workers: Annotated[
        str | None,
        typer.Option(
            help="Worker counts to compare with the in-process run, comma-separated "
            "(default: 1, 2 and cluster.workers; '' checks the gradient alone, without Ray)."
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(min=1, help="Steps after which the weights are compared.")
    ] = 10,
    fd_params: Annotated[
        int, typer.Option(min=1, help="Parameters checked against finite differences.")
    ] = 20,
    set_: SetOption = None,
    address: AddressOption = None,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = None,
    no_tracking: NoTrackingOption = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Check the gradient (finite differences) and distributed training (every worker count)
    against the in-process run, on CONFIG's data and cluster; exit 1 if any check fails."""
    from shardprop.service.training import verify as checks

    quiet_mlflow()
    with errors_as_exit_codes():
        if config is None:
            raise ConfigError("verify needs a CONFIG file")
        cfg = load_config(
            config,
            set_ or [],
            {
                "cluster.address": address,
                **tracking_flags(tracking_uri, experiment, None, no_tracking),
            },
        )
        try:
            counts = int_list(workers) if workers is not None else None
        except ValueError:
            raise ConfigError(f"--workers {workers!r}: expected counts like 1,2,3") from None
        say = None if quiet else (lambda text: typer.echo(f"verify: {text}", err=True))
        report = checks.verify(cfg, counts, steps, fd_params, say)
    render_verify(report, quiet)
    write_json(json_out, report.as_dict())
    if not report.passed:
        typer.echo(f"verify failed: {'; '.join(report.failures())}", err=True)
        raise typer.Exit(code=1)
    skip_last_collection()


def render_verify(report: "VerifyReport", quiet: bool) -> None:
    """The table on stdout, then where the MLflow run is."""
    if quiet:
        return
    import sys

    from rich.console import Console

    from shardprop.service.training.verify import table

    # as `plan` does: a log or a pipe gets whole rows, a terminal its own width
    console = Console(width=None if sys.stdout.isatty() else 120, highlight=False, soft_wrap=True)
    console.print(table(report))
    if report.run_id:
        from shardprop.service.tracking.store import ui_command

        console.print(f"logged as MLflow run {report.run_id} (verify.result={report.result})")
        console.print(f"see it in the MLflow UI: {ui_command(report.tracking_uri)}")


@app.command()
def submit(
    config: ConfigArgument = None,
    address: Annotated[
        str, typer.Option(help="The cluster's Jobs API (dashboard): http://HEAD:8265.")
    ] = "http://127.0.0.1:8265",
    set_: SetOption = None,
    workers: WorkersOption = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI as the cluster sees it: http://mlflow:5000."),
    ] = None,
    experiment: ExperimentOption = None,
    run_name: RunNameOption = None,
    wait: Annotated[
        bool, typer.Option(help="Stream the job's logs and exit with its status.")
    ] = True,
) -> None:
    """Run `train CONFIG` on a Ray cluster as a Ray Job, with this version of the code."""
    from shardprop.service.cluster.submit import submit as submit_job

    with errors_as_exit_codes():
        if config is None:
            raise ConfigError("submit needs a CONFIG file")
        cfg = load_config(
            config,
            set_ or [],
            {"cluster.workers": workers, **tracking_flags(tracking_uri, experiment, run_name)},
        )
        code = submit_job(cfg, address, wait, say=typer.echo)
    raise typer.Exit(code)


def summarise(result: "RunResult", reporter: "Reporter") -> None:
    """The closing lines: run id, final loss, where the weights are, how to see the run."""
    final = result.final
    accuracy = f", accuracy {final['accuracy']:.4f}" if "accuracy" in final else ""
    reporter.say(f"run {result.run_id}: loss {final['loss']:.6f}{accuracy}")
    weights = result.output / "weights.npz"
    reporter.say(f"weights: {weights} (sha256 {result.weights_sha256[:16]}...)")
    if result.tracking_uri:
        from shardprop.service.tracking.store import ui_command

        reporter.say(f"see it in the MLflow UI: {ui_command(result.tracking_uri)}")


bench_app = typer.Typer(
    help="Benchmarks: ratios measured within one run, never absolute.",
    invoke_without_command=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench_steps(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option(help="Rows of the workload.")] = 200_000,
    features: Annotated[int, typer.Option(help="Input features.")] = 64,
    hidden: Annotated[str, typer.Option(help="Hidden widths, comma-separated.")] = "256,256",
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    threads: Annotated[int, typer.Option(help="BLAS threads of the in-process step.")] = 2,
    workers: Annotated[str, typer.Option(help="Ray worker counts, comma-separated.")] = "1,2,4",
    tree_workers: Annotated[
        str, typer.Option(help="Worker counts for star vs tree all-reduce alone.")
    ] = "8",
    repeats: Annotated[int, typer.Option(help="Timed repeats per figure.")] = 5,
    peers: Annotated[
        bool,
        typer.Option(help="Also time scikit-learn, PyTorch and Ray Train, where installed."),
    ] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
    track: Annotated[bool, typer.Option(help="Log the table to MLflow as a run.")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store for --track.")] = None,
) -> None:
    """The standard workload's step: in-process, on Ray workers, its GEMMs, Ray alone."""
    if ctx.invoked_subcommand is not None:
        return
    from shardprop.service.bench import steps as suite

    quiet_mlflow()
    workload = suite.Workload(rows, features, int_list(hidden), dtype, threads)
    with errors_as_exit_codes():
        result = suite.bench_steps(
            workload, int_list(workers), repeats, peers, int_list(tree_workers)
        )
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)
    if track:
        typer.echo(f"logged as MLflow run {suite.track(result, tracking_uri)}")


def report(results: list[dict], json_out: Path | None) -> None:
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
    features: Annotated[int, typer.Option(help="Input features.")] = 64,
    hidden: Annotated[str, typer.Option(help="Hidden widths, comma-separated.")] = "256,256",
    dtype: Annotated[list[str] | None, typer.Option(help="float64 and/or float32.")] = None,
    threads: Annotated[int | None, typer.Option(help="BLAS threads (default: all).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per measurement.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
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
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """Planning time and coordinator memory for a large Parquet dataset; one worker's read."""
    from shardprop.service.bench.data import bench_planning

    figures = bench_planning(rows=rows, files=files, folder=folder)
    for key, value in figures.items():
        typer.echo(
            f"{key:28s} {value:,.4g}" if isinstance(value, float) else f"{key:28s} {value:,}"
        )
    write_json(json_out, figures)


@bench_app.command("tracking")
def bench_tracking(
    config: Annotated[Path, typer.Argument(help="The job to time.")] = Path("configs/default.yaml"),
    repeats: Annotated[int, typer.Option(help="Runs of each kind, alternated.")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """Wall time of `shardprop train CONFIG` with MLflow tracking against --no-tracking."""
    from shardprop.service.bench import timing as bench

    report([bench.bench_tracking(config, repeats)], json_out)


@bench_app.command("startup")
def bench_startup(
    rows: Annotated[int, typer.Option(help="Rows of the workload.")] = 200_000,
    features: Annotated[int, typer.Option(help="Input features.")] = 64,
    hidden: Annotated[str, typer.Option(help="Hidden widths, comma-separated.")] = "256,256",
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    steps: Annotated[int, typer.Option(help="Steps of each run.")] = 3,
    repeats: Annotated[int, typer.Option(help="Runs of each kind.")] = 1,
    tracking: Annotated[bool, typer.Option(help="MLflow tracking on in the command.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """`shardprop train` from the command to its first step, 2 workers, Ray's start-up
    included, against Ray Train's fit() to its first step (where it is installed)."""
    from shardprop.service.bench import startup as suite
    from shardprop.service.bench.steps import Workload

    quiet_mlflow()
    workload = Workload(rows, features, int_list(hidden), dtype)
    with errors_as_exit_codes():
        result = suite.bench_startup(workload, steps, repeats, tracking)
    for line in suite.render(result):
        typer.echo(line)
    write_json(json_out, result)


data_app = typer.Typer(help="Datasets as Parquet: the synthetic sets and two real tables.")
app.add_typer(data_app, name="data")


@data_app.command("make")
def data_make(
    name: Annotated[
        str,
        typer.Argument(help="moons, circles, blobs, regression, breast-cancer or digits."),
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
    """Write dataset NAME as Parquet, file by file, never holding all its rows."""
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


@app.command()
def plan(
    config: ConfigArgument = None,
    set_: SetOption = None,
    workers: WorkersOption = None,
    outputs: Annotated[
        int | None,
        typer.Option(min=1, help="Output units to plan for when the labels decide (multiclass)."),
    ] = None,
) -> None:
    """Dry run: rows per worker, memory, all-reduce bytes and FLOPs per step, from metadata."""
    from shardprop.service.data.estimate import estimate_plan, output_units
    from shardprop.service.training.run import make_plan
    from shardprop.workers.data.synthetic import SyntheticSpec

    with errors_as_exit_codes():
        cfg = load_config(config, set_ or [], {"cluster.workers": workers})
        data_plan = make_plan(cfg)  # footers only: no row is read, no worker started
        synthetic = cfg.data.synthetic
        spec = SyntheticSpec(**synthetic.model_dump()) if synthetic else None
        known = output_units(cfg.data.task, spec)
        estimate = estimate_plan(
            data_plan.shards,
            len(data_plan.features),
            cfg.model.hidden,
            outputs or known or 1,
            cfg.model.dtype,
            cfg.cluster.workers,
            data_plan.grid,
            cfg.cluster.cpus_per_worker,
        )
    render_plan(cfg, data_plan, estimate, known, outputs)


def render_plan(
    cfg: Config,
    data_plan: "DataPlan",
    estimate: "PlanEstimate",
    known: int | None,
    outputs: int | None,
) -> None:
    """The plan as a table per worker, then the whole step's totals, on stdout."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from shardprop.service.data.estimate import human_bytes

    # soft wrap: a long line stays one line for grep and logs; a terminal folds it anyway
    console = Console(width=None if sys.stdout.isatty() else 120, highlight=False, soft_wrap=True)
    source = data_plan.source
    if source.synthetic is not None:
        what = f"synthetic {source.synthetic.name}"
    else:
        what = f"{len(source.files)} {source.format} file(s)"
    console.print(
        f"data: {what}, {data_plan.total_rows:,} rows, {len(data_plan.features)} features, "
        f"label {data_plan.label!r}"
    )
    if outputs is not None:
        units = f"{outputs} (--outputs)"
    elif known is not None:
        units = str(known)
    else:
        units = (
            "1 (binary/regression) or K (multiclass, K unknown until the workers read the "
            "labels); the numbers below assume 1, --outputs K plans for K"
        )
    console.print(f"output units: {units}")
    sizes = " -> ".join(str(n) for n in estimate.sizes)
    console.print(
        f"network: {sizes} ({cfg.model.activation}, {cfg.model.dtype}), "
        f"{estimate.n_params:,} parameters"
    )
    in_process = cfg.cluster.workers == 0
    table = Table(title=None, show_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("row range", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("memory", justify="right")
    table.add_column("loading peak", justify="right")
    table.add_column("FLOPs/step", justify="right")
    for shard in estimate.shards:
        table.add_row(
            "in-process" if in_process else str(shard.rank),
            f"{shard.start:,}..{shard.stop:,}",
            f"{shard.rows:,}",
            human_bytes(shard.memory.training),
            human_bytes(shard.memory.loading),
            f"{shard.flops.total:,}",
        )
    console.print(table)
    first = estimate.shards[0].memory
    console.print(
        f"memory per worker (rank 0): batch {human_bytes(first.batch)}, activations "
        f"{human_bytes(first.activations)}, deltas {human_bytes(first.deltas)}, parameters + "
        f"gradient {human_bytes(first.parameters)}"
    )
    traffic = estimate.traffic
    if in_process:
        console.print("all-reduce per step: none (in-process, nothing leaves this process)")
    else:
        back = (
            "the whole subtrees of the block tree back"
            if data_plan.grid
            else "one gradient vector back from each"
        )
        console.print(
            f"all-reduce per step: {human_bytes(traffic.total)} = parameters to each of "
            f"{len(estimate.shards)} workers {human_bytes(traffic.broadcast)} + {back} "
            f"{human_bytes(traffic.gather)} (an upper bound: workers on this machine share the "
            "one broadcast copy)"
        )
    flops = estimate.flops
    console.print(
        f"FLOPs per step: {flops.total:,} (forward {flops.forward:,}, backward dW "
        f"{flops.backward_weights:,}, backward dA {flops.backward_inputs:,}; GEMMs only)"
    )
    if cfg.data.validation_fraction:
        console.print(
            f"validation: about {cfg.data.validation_fraction:.0%} of each shard's rows are held "
            "out, so the gradient FLOPs are that much lower and a forward pass on them runs "
            f"every {cfg.train.eval_every} steps; the memory is the same"
        )
