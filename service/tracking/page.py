"""What a run's MLflow page says, worked out without MLflow: the params in force, the run's
description, the logged model's name, the version's tags and the code's own tags.

Metric names are grouped the way MLflow's UI draws them: a name's part before its first "/"
is the section its chart goes in. The headline metrics (loss, accuracy, the task's metrics
and their val_ twins) have no prefix, so they come first; the step's timing is under
`timing/`, each worker's under `worker_R/`, the optimizer's view of the step under `train/`.
"""

import contextlib
import copy
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardprop.service.data.lineage import InputRecord

if TYPE_CHECKING:  # the data's set-up is read here, never built
    from shardprop.service.data.prepare import DataSetup

# the step's timing and each worker's (R: its rank); see run.py step_metrics
STEP_SECONDS = "timing/step_seconds"
ALLREDUCE_SECONDS = "timing/allreduce_seconds"
SAMPLES_PER_SECOND = "timing/samples_per_second"
STRAGGLER_RATIO = "timing/straggler_ratio"
# seconds from the training loop's start until the step's loss was known: time to a loss
ELAPSED_SECONDS = "timing/elapsed_seconds"
GRAD_NORM = "train/grad_norm"
LEARNING_RATE = "train/learning_rate"  # gd, momentum, adam: the schedule's rate of the step
FUNCTION_EVALS = "train/function_evals"  # lbfgs: the distributed evaluations the step took
STEP_LENGTH = "train/step_length"  # lbfgs: where the line search stopped along its direction
STOPPED_TAG = "shardprop.stopped"  # why a run ended before train.steps
WORKERS = "workers"  # elastic runs: the workers that took the step
RESIZES_TAG = "shardprop.resizes"  # elastic runs: each change of size, its step and cause
WORKER_PHASES = ("forward", "backward", "wait")  # worker_R/<phase>_seconds every step
READ_SECONDS = "read_seconds"  # worker_R/read_seconds, once, at step 0


def worker_metric(rank: int, name: str) -> str:
    return f"worker_{rank}/{name}"


# the headline metrics in the order the description lists them
HEADLINE = (
    "loss",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "rmse",
    "mae",
    "r2",
)
SCHEDULE_KEYS = ("learning_rate", "schedule", "warmup_steps")
OPTIMIZER_KEYS = {
    "gd": SCHEDULE_KEYS,
    "momentum": (*SCHEDULE_KEYS, "momentum"),
    "adam": (*SCHEDULE_KEYS, "beta1", "beta2", "epsilon"),
    "lbfgs": ("history_size",),
}
# the schedule's own settings, in force with that schedule only
SCHEDULE_SETTINGS = {
    "constant": (),
    "cosine": ("min_learning_rate",),
    "step": ("decay_every", "decay_factor"),
}
TASK_NAMES = {
    "binary": "binary classification",
    "multiclass": "multiclass classification",
    "regression": "regression",
}
GIT_SECONDS = 5.0  # a git that hangs (a network filesystem) must not hold the run up
CODE_ROOT = Path(__file__).resolve().parents[2]  # service/ and workers/ are its folders


def json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


def render(value: Any) -> str:
    """A param's or tag's text: strings as they are, anything else in YAML's flow style."""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # JSON is YAML's flow style: [32, 32], null, true, 0.5
    return json.dumps(value, default=json_default)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"hidden": [32, 32]}} -> {"model.hidden": "[32, 32]"}: one MLflow param a leaf."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = render(value)
    return flat


def in_force(resolved: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The resolved config without what does not act on this run: another optimizer's or
    schedule's settings, the validation cadence without a validation split, the cluster's
    settings of an in-process run, the target's scaling of a classifier, and every unset
    value (null, empty list or mapping). config.yaml keeps every key."""
    config = copy.deepcopy(dict(resolved))
    data, train = config.get("data", {}), config.get("train", {})
    kept = set(OPTIMIZER_KEYS.get(train.get("optimizer"), ()))
    if "schedule" in kept:
        kept.update(SCHEDULE_SETTINGS.get(train.get("schedule"), ()))
    for keys in (*OPTIMIZER_KEYS.values(), *SCHEDULE_SETTINGS.values()):
        for key in set(keys) - kept:
            train.pop(key, None)
    if train.get("tolerance") is None:
        train.pop("n_iter_no_change", None)
    if not data.get("validation_fraction"):
        train.pop("eval_every", None)
    if train.get("reduction") != "exact":
        train.pop("block_rows", None)
    if task != "regression":
        data.pop("standardize_target", None)
    if data.get("path") is None:
        data.pop("filesystem", None)
    cluster = config.get("cluster", {})
    if cluster.get("workers") == 0:
        config["cluster"] = {"workers": 0}
    config.get("tracking", {}).pop("enabled", None)  # a run on this page is tracked
    return _drop_unset(config)


def _drop_unset(tree: Mapping[str, Any]) -> dict[str, Any]:
    kept = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            value = _drop_unset(value)
        if value is None or (isinstance(value, Mapping | list) and not value):
            continue
        kept[key] = value
    return kept


def code_tags() -> dict[str, str]:
    """`shardprop.version`, and `shardprop.git_commit` when the code runs from a git
    checkout of shardprop (not from a package that merely sits inside another repository)."""
    tags = {}
    with contextlib.suppress(PackageNotFoundError):  # a source tree never installed
        tags["shardprop.version"] = version("shardprop")
    commit = git_commit(CODE_ROOT)
    if commit:
        tags["shardprop.git_commit"] = commit
    return tags


def git_commit(root: Path) -> str | None:
    """HEAD of the git checkout whose top folder is `root`; None anywhere else."""
    try:
        found = subprocess.run(
            ["git", "-C", os.fspath(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=GIT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git, or one that hangs
        return None
    lines = found.stdout.splitlines()
    if found.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return None
    return lines[1]


def blas_tag(placements: Sequence[Mapping[str, Any]]) -> str:
    """The workers' BLAS build and threads: once when they agree, per worker when not (a
    cluster of mixed nodes, which can change the bits: docs/exactness.md)."""
    builds = [str(where.get("blas", "unknown")) for where in placements]
    if len(set(builds)) == 1:
        return builds[0]
    return "; ".join(f"worker {rank}: {build}" for rank, build in enumerate(builds))


def dataset_words(record: InputRecord) -> str:
    if record.uri.startswith("synthetic:"):
        return f"synthetic {record.name.removeprefix('synthetic-')}"
    if record.uri.startswith("memory:"):
        return "a table in memory"
    return f"`{record.uri}`"


def model_name(record: InputRecord, label: str, task: str) -> str:
    """The logged model's name: the data, the label it predicts and the task
    ("moons-y-binary", "penguins-species-multiclass"). MLflow refuses '/', ':', '.', '%'
    and quotes in a logged model's name."""
    data = record.name.removeprefix("synthetic-").rsplit(":", 1)[-1].split(".", 1)[0]
    name = f"{data or 'data'}-{label}-{task}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def run_description(
    record: InputRecord,
    setup: "DataSetup",
    label: str,
    sizes: Sequence[int],
    n_params: int,
    resolved: Mapping[str, Any],
    workers: int,
) -> str:
    """The run's description (MLflow's `mlflow.note.content`, Markdown): what it learns from
    which data, the network, the training and the workers."""
    model, train = resolved["model"], resolved["train"]
    rows = f"{setup.rows:,} rows to train"
    if setup.val_rows:
        rows += f", {setup.val_rows:,} to validate"
    if setup.dropped:
        rows += f" ({setup.dropped:,} left out for a missing value)"
    classes = f" ({len(setup.classes)} classes)" if setup.classes else ""
    optimizer = train["optimizer"]
    if optimizer != "lbfgs":
        optimizer += f", learning rate {train['learning_rate']:g}"
        if train["schedule"] != "constant":
            optimizer += f" ({train['schedule']} schedule)"
    ran = "in-process (0 workers)" if workers == 0 else f"{workers} Ray worker(s)"
    return "\n".join(
        [
            f"**{TASK_NAMES.get(setup.task, setup.task).capitalize()}** of `{label}`{classes} "
            f"from {setup.width} input(s).",
            "",
            f"- data: {dataset_words(record)}, {rows}",
            f"- network: {' → '.join(str(n) for n in sizes)}, {model['activation']}, "
            f"{n_params:,} parameters ({model['dtype']})",
            f"- training: {optimizer}, up to {train['steps']:,} full-batch steps, "
            f"{train['reduction'].replace('_', '-')} reduction",
            f"- workers: {ran}",
        ]
    )


def result_words(final: Mapping[str, float]) -> str:
    """The final weights' metrics, training and validation, as a line of the description."""
    parts = []
    for split, prefix in (("train", ""), ("validation", "val_")):
        names = [name for name in HEADLINE if prefix + name in final]
        shown = [f"{name} {final[prefix + name]:.4g}" for name in names]
        if shown:
            parts.append(f"{split}: {', '.join(shown)}")
    if "best_step" in final:
        parts.append(f"lowest val_loss at step {int(final['best_step'])}")
    return "**Result**: " + "; ".join(parts) if parts else "**Result**: no metrics"


def version_tags(final: Mapping[str, float]) -> dict[str, str]:
    """The final metrics as a model version's tags (six significant digits: tags are read)."""
    return {
        name: f"{value:.6g}" if isinstance(value, float) else str(value)
        for name, value in final.items()
    }
