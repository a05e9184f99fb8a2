"""Checkpoints: the weights (a plain weights file, usable with --init-weights) and the
optimizer state, written atomically so a crash mid-write never spoils the last good one."""

import os
import tempfile
from pathlib import Path

import numpy as np

from service.optim import Optimizer
from workers.params import Layout, save_weights


def save_checkpoint(
    directory: Path, step: int, layout: Layout, theta: np.ndarray, optimizer: Optimizer
) -> Path:
    """Write DIR/step-NNNNNN/{weights,optimizer}.npz; returns that folder."""
    folder = directory / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "weights.npz", layout, theta)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, step=np.array(step), **optimizer.state())
    os.replace(tmp.name, folder / "optimizer.npz")
    return folder
