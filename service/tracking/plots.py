"""Training curves, where a step's time goes and the confusion matrix, as files for the run's
artifacts (plots/loss.png, plots/timing.png, the confusion matrix's PNG and JSON)."""

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shardprop.service.tracking.page import ALLREDUCE_SECONDS, STEP_SECONDS, WORKER_PHASES

# each panel: a training curve and its validation twin
PANELS = (("loss", "val_loss"), ("accuracy", "val_accuracy"))
LOG_SCALE_LIMIT = 1e200
Curve = tuple[list[int], list[float]]  # (steps, values)


def history_curves(
    history: dict[str, list[float]], steps: dict[str, list[int]] | None = None
) -> list[dict[str, Curve]]:
    """The curves of loss.png, panel by panel: each metric's values at their steps (the
    validation metrics at every eval_every-th step). Without `steps`, a metric's values
    are taken to be at steps 1, 2, 3, ..."""
    panels = []
    for names in PANELS:
        curves = {
            name: (
                list(steps[name]) if steps else list(range(1, len(history[name]) + 1)),
                list(history[name]),
            )
            for name in names
            if history.get(name)
        }
        if curves:
            panels.append(curves)
    return panels


def plot_history(
    history: dict[str, list[float]],
    path: str | os.PathLike,
    steps: dict[str, list[int]] | None = None,
) -> Path:
    """Loss, and accuracy when there is one, against step, validation curves beside them
    (see history_curves).

    Draws on an Agg canvas of its own, not through pyplot: no display is needed on a cluster
    node, and the caller's matplotlib backend and open figures are left alone.
    """
    panels = history_curves(history, steps)
    if not panels:
        raise ValueError(f"no loss or accuracy in the history (keys: {', '.join(history)})")
    figure = Figure(figsize=(5 * len(panels), 3.5), layout="tight")
    FigureCanvasAgg(figure)
    for i, curves in enumerate(panels, 1):
        ax = figure.add_subplot(1, len(panels), i)
        for name, (at, values) in curves.items():
            # validation points are every eval_every steps: marked where they were measured
            sparse = name.startswith("val_") or len(values) == 1
            ax.plot(at, values, label=name, marker="o" if sparse else None, markersize=3)
        headline = next(iter(curves)).removeprefix("val_")
        # gradient descent's loss falls over decades; matplotlib's log ticks overflow on
        # values near the float range (a run about to diverge)
        if headline == "loss" and all(
            0 < v <= LOG_SCALE_LIMIT for _, values in curves.values() for v in values
        ):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(headline)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_png(figure, path)


WORKER_METRIC = re.compile(rf"worker_(\d+)/({'|'.join(WORKER_PHASES)})_seconds")


def plot_timing(history: dict[str, list[float]], path: str | os.PathLike) -> Path:
    """Left: each step split into the slowest worker's compute, the all-reduce and the
    coordinator's own work. Right: per worker, its mean forward, backward and wait."""
    parts: dict[int, dict[str, float]] = {}
    for name, values in history.items():
        if match := WORKER_METRIC.fullmatch(name):
            rank, phase = int(match[1]), match[2]
            parts.setdefault(rank, {})[phase] = float(np.mean(values))
    step = np.asarray(history.get(STEP_SECONDS, []))
    figure = Figure(figsize=(10, 3.5), layout="tight")
    FigureCanvasAgg(figure)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    # the ranks that took every step: all of them, unless an elastic run changed size
    every = [r for r in parts if len(history[f"worker_{r}/forward_seconds"]) == len(step)]
    if len(step) and every:
        compute = np.max(
            [
                np.asarray(history[f"worker_{r}/forward_seconds"])
                + np.asarray(history[f"worker_{r}/backward_seconds"])
                for r in every
            ],
            axis=0,
        )
        allreduce = np.asarray(history[ALLREDUCE_SECONDS])
        rest = np.clip(step - compute - allreduce, 0, None)
        steps = np.arange(1, len(step) + 1)
        left.stackplot(
            steps,
            compute * 1e3,
            allreduce * 1e3,
            rest * 1e3,
            labels=["slowest worker's compute", "all-reduce", "coordinator"],
        )
        left.legend(loc="upper right")
        ranks = sorted(parts)
        bottom = np.zeros(len(ranks))
        for phase in ("forward", "backward", "wait"):
            heights = np.array([parts[r].get(phase, 0.0) for r in ranks]) * 1e3
            right.bar([str(r) for r in ranks], heights, bottom=bottom, label=phase)
            bottom += heights
        right.legend()
    left.set_xlabel("step")
    left.set_ylabel("ms")
    right.set_xlabel("worker")
    right.set_ylabel("mean ms per step")
    return save_png(figure, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence, path: str | os.PathLike) -> Path:
    """The confusion matrix as a heat map with each cell's count: true class on the y axis,
    predicted class on the x axis."""
    matrix = np.asarray(matrix)
    K = len(classes)
    labels = [str(c) for c in classes]
    side = min(12.0, 2.5 + 0.45 * K)
    figure = Figure(figsize=(side, side), layout="tight")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    # dark text on light cells, light on dark
    dark = matrix > (matrix.max() / 2 if matrix.size else 0)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{count:d}",
            ha="center",
            va="center",
            color="white" if dark[i, j] else "black",
            fontsize=8 if K > 10 else 10,
        )
    ax.set_xticks(range(K), labels, rotation=45 if K > 6 else 0, ha="right" if K > 6 else "center")
    ax.set_yticks(range(K), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return save_png(figure, path)


def save_confusion_json(matrix: np.ndarray, classes: Sequence, path: str | os.PathLike) -> Path:
    """{"classes": [...], "matrix": [[...]], "rows": "true", "columns": "predicted"}, with
    classes kept as JSON numbers, strings or booleans where they are and written as strings
    otherwise."""
    document = {
        "classes": [json_value(c) for c in classes],
        "matrix": np.asarray(matrix).astype(np.int64).tolist(),
        "rows": "true",
        "columns": "predicted",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def json_value(value: object) -> str | int | float | bool:
    """A class label as JSON holds it: numpy scalars as their Python value, anything else
    that is not a number, string or boolean as its string."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str | bool | int) or (isinstance(value, float) and np.isfinite(value)):
        return value
    return str(value)


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
