"""What the commands print: a run's closing lines, the verify table, the plan's costs."""

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from shardprop.service.config import Config
from shardprop.service.tracking.store import ui_command

if TYPE_CHECKING:  # rich, pyarrow and the estimates load only when a command needs them
    from rich.console import Console

    from shardprop.service.data.estimate import PlanEstimate
    from shardprop.service.data.plan import DataPlan
    from shardprop.service.sweep.run import SweepResult
    from shardprop.service.training.progress import Reporter
    from shardprop.service.training.run import RunResult
    from shardprop.service.training.verify import Report as VerifyReport


def write_json(path: Path | None, data: object) -> None:
    if path:
        path.write_text(json.dumps(data, indent=2))


def stdout_console() -> "Console":
    """A log or a pipe gets whole rows, a terminal its own width; soft wrap keeps a long line
    one line for grep."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120, highlight=False, soft_wrap=True)


# the final metrics a closing line shows, those of the task that has them
HEADLINE = ("loss", "accuracy", "f1", "roc_auc", "rmse", "r2")


def headline(final: dict[str, float]) -> str:
    """The final loss and accuracy, then the validation rows' metrics when there are some
    (else the training rows' task metrics), named as MLflow logs them."""
    if any(f"val_{name}" in final for name in HEADLINE):
        names = [name for name in HEADLINE[:2] if name in final]
        names += [f"val_{name}" for name in HEADLINE if f"val_{name}" in final]
    else:
        names = [name for name in HEADLINE if name in final]
    return ", ".join(f"{name} {final[name]:.{6 if 'loss' in name else 4}f}" for name in names)


def run_link(tracking_uri: str, run_id: str) -> str:
    """Where to see the run: its page on a tracking server, else the command that opens the
    MLflow UI on the store."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return ui_command(tracking_uri)
    import mlflow

    try:  # the page's address holds the experiment id
        experiment_id = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except mlflow.MlflowException:
        return ui_command(tracking_uri)
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def summarise(result: "RunResult", reporter: "Reporter") -> None:
    """The closing lines: run id, final metrics, where the weights are, how to see the run."""
    if reporter.mode == "quiet":
        return
    reporter.say(f"run {result.run_id}: {headline(result.final)}")
    weights = result.output / "weights.npz"
    reporter.say(f"weights: {weights} (sha256 {result.weights_sha256[:16]}...)")
    if result.tracking_uri:
        reporter.say(f"see it in the MLflow UI: {run_link(result.tracking_uri, result.run_id)}")


def render_sweep(result: "SweepResult", metric: str, quiet: bool) -> None:
    """One row a trial (its values, the metric, its run or error), then the best and where."""
    if quiet:
        return
    from rich.table import Table

    keys = list(result.trials[0].values) if result.trials else []
    table = Table(*keys, metric, "MLflow run", title="sweep", title_justify="left")
    for trial in result.trials:
        value = "" if trial.metric is None else f"{trial.metric:.6g}"
        best = " (best)" if trial is result.best else ""
        where = trial.error or f"{trial.run_id}{best}"
        table.add_row(*(str(trial.values[key]) for key in keys), value, where)
    console = stdout_console()
    console.print(table)
    console.print(f"{len(result.trials)} trials in {result.seconds:.1f} s")
    console.print(f"see the sweep in the MLflow UI: {run_link(result.tracking_uri, result.run_id)}")


def render_verify(report: "VerifyReport", quiet: bool) -> None:
    """The table on stdout, then where the MLflow run is."""
    if quiet:
        return
    from shardprop.service.training.verify import table

    console = stdout_console()
    console.print(table(report))
    if report.run_id:
        console.print(f"logged as MLflow run {report.run_id} (verify.result={report.result})")
        console.print(f"see it in the MLflow UI: {run_link(report.tracking_uri, report.run_id)}")


def render_plan(
    cfg: Config,
    data_plan: "DataPlan",
    estimate: "PlanEstimate",
    known: int | None,
    outputs: int | None,
) -> None:
    """The plan as a table per worker, then the whole step's totals, on stdout."""
    from rich.table import Table

    from shardprop.service.data.estimate import human_bytes
    from shardprop.service.data.prepare import describe_columns

    console = stdout_console()
    source = data_plan.source
    if source.synthetic is not None:
        what = f"synthetic {source.synthetic.name}"
    else:
        what = f"{len(source.files)} {source.format} file(s)"
    console.print(
        f"data: {what}, {data_plan.total_rows:,} rows, {len(data_plan.features)} features, "
        f"label {data_plan.label!r}"
    )
    console.print(describe_columns(data_plan.columns, data_plan.left_out), markup=False)
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
    table.add_column("training arrays", justify="right")
    table.add_column("loading arrays", justify="right")
    table.add_column("peak RSS", justify="right")
    table.add_column("FLOPs/step", justify="right")
    for shard in estimate.shards:
        table.add_row(
            "in-process" if in_process else str(shard.rank),
            f"{shard.start:,}..{shard.stop:,}",
            f"{shard.rows:,}",
            human_bytes(shard.memory.training),
            human_bytes(shard.memory.loading),
            human_bytes(shard.memory.peak),
            f"{shard.flops.total:,}",
        )
    console.print(table)
    first = estimate.shards[0].memory
    console.print(
        f"memory per worker (rank 0): batch {human_bytes(first.batch)}, activations "
        f"{human_bytes(first.activations)}, deltas {human_bytes(first.deltas)}, parameters + "
        f"gradient {human_bytes(first.parameters)}"
    )
    process = "this process (Python, its libraries, MLflow)" if in_process else "a Ray worker"
    console.print(
        f"peak RSS = the process + the larger of the loading arrays and the training arrays; "
        f"the process: {process} {human_bytes(first.process)}"
    )
    if not in_process:
        console.print(
            f"all {len(estimate.shards)} workers together: {human_bytes(sum(estimate.peaks))}; "
            f"the coordinator: {human_bytes(estimate.coordinator)}"
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
