"""`shardprop bench predict`: rows per second of batch prediction, ours against the others.

One Parquet table (blobs, `rows` x `features`) scored by the standard network, trained for a
few steps on a smaller draw of the same distribution, with its MLflow model logged:

- `shardprop predict` through its Python entry point, on Ray workers (the runtime already
  up) and in-process; and the whole command as a new process, Python and Ray's start-up
  included, as a user runs it;
- Ray Data, the alternative: read_parquet + map_batches (an actor pool of the same size,
  the same encoding and forward pass) + write_parquet, order preserved;
- mlflow.pyfunc: the logged model's predict() on the same rows, already in a pandas frame
  in this process; and with the frame read from the file and the result written back.

Every figure is a wall time over the same rows, runs taken in turns (timing.py).
"""

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from shardprop.service.bench.timing import alternating_seconds
from shardprop.service.bench.workload import LEARNING_RATE, Workload
from shardprop.service.cluster.runtime import connect_ray
from shardprop.service.config import config_from
from shardprop.service.data.datasets import make_dataset
from shardprop.service.scoring.batch import SLICE_ROWS, predict, scoring_model
from shardprop.service.scoring.models import load_model
from shardprop.service.training.run import train
from shardprop.workers.data.columns import inputs
from shardprop.workers.network.backprop import Network
from shardprop.workers.scoring import ScoringModel, prediction_columns

TRAIN_ROWS = 20_000  # the model's quality is not what is timed: a small draw trains it
EXPERIMENT = "bench-predict"


class RayDataScorer:
    """Ray Data's map_batches callable: the same encoding and forward pass as ours."""

    def __init__(self, model: ScoringModel, kind: str):
        threadpool_limits(limits=1)  # one CPU per actor, as our workers have
        self.model, self.kind = model, kind
        self.network = Network(model.arch, model.theta.dtype, 1)
        self.names = [f.name for f in model.output_fields(kind)]

    def __call__(self, table: pa.Table) -> pa.Table:
        model = self.model
        X, _ = inputs(model.columns, model.mean, model.scale, table)
        A = self.network.predict(model.theta, X)
        return pa.Table.from_arrays(prediction_columns(model, A, self.kind), names=self.names)


def ray_data_predict(model: ScoringModel, data: Path, out: Path, workers: int) -> None:
    """Score `data` with Ray Data, `workers` actors of 1 CPU each, order preserved: into a
    folder of Parquet files (Ray Data's write_parquet) when `out` has no suffix, else into
    the one file `out`, written from the driver as its batches arrive, as ours is."""
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per stage otherwise
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # as our output: input order
    context.enable_progress_bars = False
    # a block per row group: one file is one read task otherwise, and one actor scores it all
    groups = pq.ParquetFile(data).metadata.num_row_groups
    dataset = ray.data.read_parquet(
        str(data), columns=list(model.features), override_num_blocks=groups
    )
    scored = dataset.map_batches(
        RayDataScorer,
        fn_constructor_args=(model, model.default_kind()),
        batch_format="pyarrow",
        batch_size=SLICE_ROWS,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    if not out.suffix:
        scored.write_parquet(str(out), mode="overwrite")
        return
    writer = None
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer = writer or pq.ParquetWriter(out, batch.schema)
        writer.write_table(batch)
    if writer is not None:
        writer.close()


def command_seconds(model: Path, data: Path, out: Path, workers: int) -> Callable[[], None]:
    """`shardprop predict` as a new process, Python's and Ray's start-up included."""
    command = [
        str(Path(sys.executable).parent / "shardprop"),
        "predict",
        str(model),
        str(data),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--quiet",
    ]

    def run() -> None:
        subprocess.run(command, check=True, capture_output=True, cwd=out.parent)

    return run


def bench_predict(
    rows: int = 1_000_000,
    features: int = 64,
    hidden: tuple[int, ...] = (256, 256),
    workers: int = 2,
    steps: int = 3,
    repeats: int = 3,
    folder: str | Path | None = None,
    ray_data: bool = True,
) -> dict[str, Any]:
    """The figures of `shardprop bench predict`, with what they were measured on."""
    workload = Workload(TRAIN_ROWS, features, tuple(hidden))
    with tempfile.TemporaryDirectory(prefix="shardprop-bench-predict-") as scratch:
        where = Path(folder or scratch)
        where.mkdir(parents=True, exist_ok=True)
        data = where / f"blobs-{rows}x{features}.parquet"
        if not data.exists():
            make_dataset("blobs", data, rows, features, seed=1, classes=2)
        uri = f"sqlite:///{where / 'mlflow.db'}"
        model = where / f"model-{features}-{'x'.join(map(str, hidden))}-{steps}"
        if (model / "metrics.json").exists():  # trained by an earlier run into this folder
            run_id = json.loads((model / "metrics.json").read_text())["run_id"]
        else:
            settings = workload.settings(0, steps)
            settings["tracking"] = {"uri": uri, "experiment": EXPERIMENT}
            settings["train"] |= {"checkpoint_every": 0, "learning_rate": LEARNING_RATE}
            run_id = train(config_from(settings), output=model).run_id
        return measure(where, data, model, run_id, uri, rows, workers, repeats, ray_data) | {
            "workload": {"rows": rows, "features": features, "hidden": list(hidden)},
            "workers": workers,
            "model": f"trained {steps} steps on {TRAIN_ROWS:,} rows of the same distribution",
        }


def measure(
    where: Path,
    data: Path,
    model_dir: Path,
    run_id: str,
    uri: str,
    rows: int,
    workers: int,
    repeats: int,
    ray_data: bool,
) -> dict[str, Any]:
    import mlflow

    out = where / "predictions.parquet"
    scorer = scoring_model(load_model(str(model_dir)).bundle)
    frame = pd.read_parquet(data, columns=list(scorer.features))
    saved_path = list(sys.path)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)  # load_model reads the process's tracking URI
    try:
        began = time.perf_counter()
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        pyfunc_load = time.perf_counter() - began
    finally:
        mlflow.set_tracking_uri(None)
        sys.path[:] = saved_path  # load_model puts the model's code first on the path

    def pyfunc_in_memory() -> None:
        pyfunc.predict(frame)

    def pyfunc_file_to_file() -> None:
        read = pd.read_parquet(data, columns=list(scorer.features))
        pd.DataFrame({"probability": pyfunc.predict(read)}).to_parquet(where / "pyfunc.parquet")

    scoring: dict[str, list[float]] = {"workers": [], "in-process": []}

    def ours(count: int, key: str) -> Callable[[], None]:
        def run() -> None:
            scored = predict(str(model_dir), str(data), out, workers=count)
            scoring[key].append(scored.scoring_seconds)

        return run

    ray_start = time.perf_counter()
    # room for Ray Data's read tasks beside its actors (they would wait for a CPU otherwise)
    started = connect_ray(None, 2 * workers)
    ray_start = time.perf_counter() - ray_start
    try:
        runs = {
            f"shardprop predict, {workers} Ray workers": ours(workers, "workers"),
            "shardprop predict, in-process": ours(0, "in-process"),
            f"shardprop predict command, {workers} workers (new process)": command_seconds(
                model_dir, data, out, workers
            ),
            "mlflow.pyfunc predict(frame in memory)": pyfunc_in_memory,
            "mlflow.pyfunc read + predict + write": pyfunc_file_to_file,
        }
        if ray_data:
            runs[f"Ray Data, {workers} actors, write_parquet (files)"] = lambda: ray_data_predict(
                scorer, data, where / "ray-data", workers
            )
            runs[f"Ray Data, {workers} actors, one file from the driver"] = lambda: (
                ray_data_predict(scorer, data, where / "ray-data.parquet", workers)
            )
        seconds = alternating_seconds(list(runs.values()), repeats)
    finally:
        if started:
            import ray

            ray.shutdown()
    ours_out = pq.read_table(out).column(0).to_numpy()
    theirs = np.asarray(pyfunc.predict(frame))
    figures = {}
    for name, times in zip(runs, seconds, strict=True):
        median = float(np.median(times))
        figures[name] = {"seconds": median, "low": min(times), "high": max(times)}
        figures[name]["rows_per_second"] = rows / median
    for key, name in (("workers", f"{workers} Ray workers"), ("in-process", "in-process")):
        kept = scoring[key][1:]  # the warm-up's left out, as alternating_seconds leaves it
        median = float(np.median(kept))
        figures[f"  of which scoring, {name}"] = {
            "seconds": median,
            "low": min(kept),
            "high": max(kept),
            "rows_per_second": rows / median,
        }
    return {
        "figures": figures,
        "ray_start_seconds": ray_start,
        "pyfunc_load_seconds": pyfunc_load,
        "max_abs_difference_from_pyfunc": float(np.max(np.abs(ours_out - theirs))),
    }


def render(result: dict[str, Any]) -> list[str]:
    w = result["workload"]
    lines = [
        f"workload: {w['rows']:,} rows x {w['features']} -> {w['hidden']} -> 1 (binary), "
        f"float64; model {result['model']}",
        f"{'':58} {'median':>9} {'min':>9} {'max':>9} {'rows/s':>11}",
    ]
    for name, f in result["figures"].items():
        lines.append(
            f"{name:58} {f['seconds']:7.2f} s {f['low']:7.2f} s {f['high']:7.2f} s "
            f"{f['rows_per_second']:11,.0f}"
        )
    lines.append(
        f"Ray start-up {result['ray_start_seconds']:.2f} s (once, before the Ray runs); "
        f"pyfunc load_model {result['pyfunc_load_seconds']:.2f} s; ours vs pyfunc max |diff| "
        f"{result['max_abs_difference_from_pyfunc']:.1e}"
    )
    return lines
