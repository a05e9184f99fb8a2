"""Checkpoints: everything needed to continue a run to the same bits.

A checkpoint is a folder `step-NNNNNN/` holding the weights (a plain weights file, usable
with --init-weights), the optimizer's and early stopping's state, and a manifest with the
sha256 of each file. It is written into a hidden temporary folder and renamed into place, so
a crash mid-write never leaves a half checkpoint; one whose files do not match their
checksums is skipped for the one before it.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardprop.workers.errors import WeightsFileError
from shardprop.workers.network.params import Layout, fingerprint, load_weights, save_weights

log = logging.getLogger(__name__)
FILES = ("weights.npz", "state.npz")


@dataclass
class Checkpoint:
    step: int  # the steps already applied to theta
    theta: np.ndarray
    state: dict[str, np.ndarray]  # "optimizer.*" and "early_stopping.*" arrays
    folder: Path

    def part(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            key.removeprefix(prefix + "."): value
            for key, value in self.state.items()
            if key.startswith(prefix + ".")
        }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(
    directory: Path, step: int, layout: Layout, theta: np.ndarray, state: dict[str, np.ndarray]
) -> Path:
    """Write DIR/step-NNNNNN/ atomically; returns that folder."""
    if not np.all(np.isfinite(theta)):
        raise ValueError("refusing to checkpoint non-finite weights")
    final = directory / f"step-{step:06d}"
    staging = directory / f".step-{step:06d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_weights(staging / "weights.npz", layout, theta)
    buffer = io.BytesIO()  # zipped in memory: a full disk fails the write below, not numpy's
    np.savez(buffer, step=np.array(step), **state)
    (staging / "state.npz").write_bytes(buffer.getbuffer())
    manifest = {
        "step": step,
        "weights_sha256": fingerprint(theta),
        "sha256": {name: sha256(staging / name) for name in FILES},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def weights_fingerprint(folder: Path) -> str:
    """The sha256 of the checkpoint's parameter bytes, as its manifest records it."""
    return json.loads((folder / "manifest.json").read_text())["weights_sha256"]


def read_checkpoint(folder: Path, layout: Layout, dtype: str) -> Checkpoint:
    """One checkpoint, verified against its manifest; ValueError when it does not hold up."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        for name in FILES:
            if sha256(folder / name) != manifest["sha256"][name]:
                raise ValueError(f"{folder / name} does not match its checksum")
        _, theta = load_weights(folder / "weights.npz", layout, dtype)
        with np.load(folder / "state.npz", allow_pickle=False) as npz:
            state = {key: npz[key] for key in npz.files}
    except (OSError, KeyError, json.JSONDecodeError, zipfile.BadZipFile, WeightsFileError) as error:
        raise ValueError(f"{folder}: unreadable checkpoint ({error})") from None
    return Checkpoint(int(state.pop("step")), theta, state, folder)


def latest_checkpoint(directory: Path, layout: Layout, dtype: str) -> Checkpoint | None:
    """The newest checkpoint that verifies; a corrupt newer one is skipped with a warning."""
    for folder in sorted(directory.glob("step-*"), reverse=True):
        try:
            return read_checkpoint(folder, layout, dtype)
        except ValueError as error:
            log.warning("skipping a corrupt checkpoint: %s", error)
    return None


def go_on(output: Path | None, run_id: str | None, tracking_uri: str | None) -> str:
    """ "; the last good weights: W; go on with: shardprop resume RUN ...": where the run's
    newest weights are (its final ones, else its newest checkpoint's), and the command that
    goes on from them; with no run to resume (None), how to start from the weights."""
    kept = output / "weights.npz" if output else None  # the final weights, once the loop is done
    if kept is None or not kept.exists():
        newest = max(output.glob("checkpoints/step-*"), default=None) if output else None
        kept = newest / "weights.npz" if newest else None
    weights = f"; the last good weights: {kept}" if kept else ""
    if run_id is None or tracking_uri is None:
        return f"{weights} (start from them with --init-weights)" if kept else ""
    return f"{weights}; go on with: shardprop resume {run_id} --tracking-uri '{tracking_uri}'"
