"""The `shardprop` command: parse, build a config, call the library, render. Nothing else.

Ray and MLflow are imported inside the commands that use them: `--help` should not wait.
"""

from pathlib import Path
from typing import Annotated

import typer

from shardprop.service.cli.bench import bench_app
from shardprop.service.cli.data import data_app
from shardprop.service.cli.errors import errors_as_exit_codes
from shardprop.service.cli.options import (
    AddressOption,
    ConfigArgument,
    ExperimentOption,
    JsonOption,
    NoTrackingOption,
    QuietOption,
    RunNameOption,
    SetOption,
    TrackingUriOption,
    WorkersOption,
    int_list,
    only_errors,
    quiet_mlflow,
    tracking_flags,
)
from shardprop.service.cli.predict import predict
from shardprop.service.cli.render import (
    render_plan,
    render_sweep,
    render_verify,
    summarise,
    write_json,
)
from shardprop.service.cli.watchdog import Watchdog
from shardprop.service.config import config_from, load_config
from shardprop.service.errors import ConfigError

app = typer.Typer(
    help="Data-parallel full-batch training on Ray workers, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold tokens and whole datasets
)


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
    register_model: Annotated[
        str | None,
        typer.Option(
            help="Register the run's model as a new version of this MLflow registered model."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Train the network of CONFIG on its data, sharded across workers."""
    if resume:
        resume_run(resume, tracking_uri, address, output, quiet)
        return
    from shardprop.service.training.progress import Reporter
    from shardprop.service.training.run import train as run_training

    quiet_mlflow()
    # the watchdog says how to go on if Ray ends this process without a word
    with errors_as_exit_codes(), only_errors(quiet), Watchdog() as watchdog:
        cfg = load_config(  # no CONFIG: every key's default
            config,
            set_ or [],
            {
                "cluster.workers": workers,
                "cluster.address": address,
                **tracking_flags(tracking_uri, experiment, run_name, no_tracking),
                "cluster.inject_failure": inject_failure,
                "tracking.register_model": register_model,
            },
        )
        reporter = Reporter("quiet" if quiet else "auto", on_open=watchdog.opened)
        result = run_training(cfg, init_weights, output, reporter)
    summarise(result, reporter)


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
    """Continue a stopped or killed run from its last checkpoint, in the same MLflow run; a
    sweep's run goes on with its unfinished trials."""
    from shardprop.service.tracking.tracker import recall_run
    from shardprop.service.training.progress import Reporter
    from shardprop.service.training.run import train as run_training

    quiet_mlflow()
    with errors_as_exit_codes(), only_errors(quiet), Watchdog() as watchdog:
        recalled = recall_run(tracking_uri, run_id)  # before Ray: a held run is refused
        if recalled.status == "FINISHED":
            typer.echo(f"run {run_id} is FINISHED: nothing to resume", err=True)
            return
        logged = recalled.config
        logged.get("cluster", {}).pop("inject_failure", None)  # chaos does not come back
        cfg = config_from(
            logged, {"tracking.uri": recalled.tracking_uri, "cluster.address": address}
        )
        if cfg.sweep.params:  # a sweep's run: its unfinished trials go on
            from shardprop.service.sweep.run import sweep as run_sweep

            swept = run_sweep(cfg, resume_run=run_id)
            render_sweep(swept, cfg.sweep.metric, quiet)
            return
        reporter = Reporter("quiet" if quiet else "auto", on_open=watchdog.opened)
        result = run_training(cfg, None, output or recalled.output, reporter, resume_run=run_id)
    summarise(result, reporter)


@app.command()
def sweep(
    config: ConfigArgument = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="A key and what to try: a grid (train.learning_rate=0.01,0.1,1) or a "
            "distribution (loguniform(1e-4,1), uniform(a,b), randint(a,b), choice(a,b,...))."
        ),
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="Run the grid this many times, drawing distributions anew.")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="The logged metric that ranks trials (default loss).")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="min or max: which end of it is best.")] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Trials at once (default: as many as the cluster fits).")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="fifo (every trial to its end) or asha (stop laggards).")
    ] = None,
    set_: SetOption = None,
    workers: WorkersOption = None,
    address: AddressOption = None,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = None,
    run_name: RunNameOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train CONFIG once per trial (Ray Tune), each a run nested under the sweep's MLflow run."""
    from shardprop.service.sweep.run import sweep as run_sweep
    from shardprop.service.sweep.space import parse_params

    quiet_mlflow()
    with errors_as_exit_codes(), only_errors(quiet):
        flags = {
            "cluster.workers": workers,
            "cluster.address": address,
            **tracking_flags(tracking_uri, experiment, run_name),
            "sweep.samples": samples,
            "sweep.metric": metric,
            "sweep.mode": mode,
            "sweep.max_concurrent": max_concurrent,
            "sweep.scheduler": scheduler,
        }
        params = parse_params(param or [])
        cfg = load_config(config, set_ or [], flags)
        if params:  # the flags' keys over the file's
            cfg.sweep.params = {**cfg.sweep.params, **params}
        result = run_sweep(cfg)
        render_sweep(result, cfg.sweep.metric, quiet)


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
    json_out: JsonOption = None,
    quiet: QuietOption = False,
) -> None:
    """Check the gradient (finite differences) and distributed training (every worker count)
    against the in-process run, on CONFIG's data and cluster; exit 1 if any check fails."""
    from shardprop.service.training import verify as checks

    quiet_mlflow()
    with errors_as_exit_codes(), only_errors(quiet):
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
    """Dry run: columns, rows per worker, memory, all-reduce bytes and FLOPs per step."""
    from dataclasses import replace

    from shardprop.service.cluster.capacity import estimate_run
    from shardprop.service.data.estimate import output_units
    from shardprop.service.data.prepare import scan_levels
    from shardprop.service.training.run import make_plan
    from shardprop.workers.data.synthetic import SyntheticSpec

    with errors_as_exit_codes():
        cfg = load_config(config, set_ or [], {"cluster.workers": workers})
        data_plan = make_plan(cfg)  # footers only: no worker started
        # the categorical columns alone are read, for their levels: the network's width
        data_plan = replace(data_plan, columns=scan_levels(data_plan, cfg.data, cfg.train.seed))
        synthetic = cfg.data.synthetic
        spec = SyntheticSpec(**synthetic.model_dump()) if synthetic else None
        known = output_units(cfg.data.task, spec)
        estimate = estimate_run(cfg, data_plan, outputs or known)
    render_plan(cfg, data_plan, estimate, known, outputs)


app.command()(predict)
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
