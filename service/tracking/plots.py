"""Training curves and where a step's time goes, as PNGs for the run's artifacts
(plots/loss.png, plots/timing.png)."""

import os
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# each panel: a training curve and its validation twin
PANELS = (("loss", "val_loss"), ("accuracy", "val_accuracy"))
LOG_SCALE_LIMIT = 1e200


def plot_history(history: dict[str, list[float]], path: str | os.PathLike) -> Path:
    """Loss, and accuracy when there is one, against step, validation curves beside them.

    Draws on an Agg canvas of its own, not through pyplot: no display is needed on a cluster
    node, and the caller's matplotlib backend and open figures are left alone.
    """
    panels = [names for names in PANELS if any(history.get(name) for name in names)]
    if not panels:
        raise ValueError(f"no loss or accuracy in the history (keys: {', '.join(history)})")
    figure = Figure(figsize=(5 * len(panels), 3.5), layout="tight")
    FigureCanvasAgg(figure)
    for i, names in enumerate(panels, 1):
        ax = figure.add_subplot(1, len(panels), i)
        curves = {name: history[name] for name in names if history.get(name)}
        for name, values in curves.items():
            ax.plot(range(1, len(values) + 1), values, label=name)
        # gradient descent's loss falls over decades; matplotlib's log ticks overflow on
        # values near the float range (a run about to diverge)
        if names[0] == "loss" and all(
            0 < v <= LOG_SCALE_LIMIT for values in curves.values() for v in values
        ):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(names[0])
        ax.grid(alpha=0.3)
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


WORKER_METRIC = re.compile(r"worker_(\d+)\.(forward|backward|wait)_seconds")


def plot_timing(history: dict[str, list[float]], path: str | os.PathLike) -> Path:
    """Left: each step split into the slowest worker's compute, the all-reduce and the
    coordinator's own work. Right: per worker, its mean forward, backward and wait."""
    parts: dict[int, dict[str, float]] = {}
    for name, values in history.items():
        if match := WORKER_METRIC.fullmatch(name):
            rank, phase = int(match[1]), match[2]
            parts.setdefault(rank, {})[phase] = float(np.mean(values))
    step = np.asarray(history.get("step_seconds", []))
    figure = Figure(figsize=(10, 3.5), layout="tight")
    FigureCanvasAgg(figure)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    if len(step) and parts:
        compute = np.max(
            [
                np.asarray(history[f"worker_{r}.forward_seconds"])
                + np.asarray(history[f"worker_{r}.backward_seconds"])
                for r in parts
            ],
            axis=0,
        )
        allreduce = np.asarray(history["allreduce_seconds"])
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
