"""Training curves as a PNG, for the run's artifacts (plots/loss.png)."""

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# each panel: a training curve and its validation twin
PANELS = (("loss", "val_loss"), ("accuracy", "val_accuracy"))


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
        if names[0] == "loss" and all(v > 0 for values in curves.values() for v in values):
            ax.set_yscale("log")  # gradient descent's loss falls over decades
        ax.set_xlabel("step")
        ax.set_ylabel(names[0])
        ax.grid(alpha=0.3)
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
