"""How the bench times things (medians over repeats, runs in turns), and two benchmarks:
`shardprop bench network` and `shardprop bench tracking`.

Each comparison is a ratio of figures timed in the same process, in turns, so that the
machine's noise falls on both alike.
"""

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.network.params import init_params
from shardprop.workers.reduction.blocktree import BlockGrid, auto_block_rows

# the pause before a run that follows one on several BLAS threads: OpenBLAS's idle threads
# spin for a while after a call, on a core the next run would share
BLAS_SPIN_SECONDS = 0.3


@dataclass
class Timing:
    """One figure, in seconds: the median of its repeats, the fastest and the slowest."""

    median: float
    low: float
    high: float

    @classmethod
    def over(cls, seconds: list[float]) -> "Timing":
        return cls(float(np.median(seconds)), min(seconds), max(seconds))

    @classmethod
    def alternating(
        cls, runs: list[Callable[[], object]], repeats: int, pause: float = 0.0
    ) -> list["Timing"]:
        return [cls.over(times) for times in alternating_seconds(runs, repeats, pause)]


def alternating_seconds(
    runs: list[Callable[[], object]], repeats: int, pause: float = 0.0
) -> list[list[float]]:
    """Time each run `repeats` times, taking turns, so that a slow spell of the machine
    falls on all of them alike; each round starts one run later, so that none always comes
    after the same one (whose memory traffic it would inherit). Before each, an untimed
    pause of `pause` seconds, so that what the last one left spinning has stopped. The
    seconds of each run, round by round."""
    for run in runs:
        run()  # warm-up: first-touch page faults and BLAS start-up are not the step
    seconds: list[list[float]] = [[] for _ in runs]
    for round_ in range(repeats):
        for i in range(len(runs)):
            k = (round_ + i) % len(runs)
            time.sleep(pause)
            start = time.perf_counter()
            runs[k]()
            seconds[k].append(time.perf_counter() - start)
    return seconds


def gemms_of_step(net: Network, theta: np.ndarray, batch: Batch) -> Callable[[], None]:
    """The matrix products of one forward + backward step, into kept buffers, nothing else."""
    sizes = net.layout.sizes
    m = batch.rows
    acts = [batch.X1] + [np.ones((n + 1, m), net.dtype) for n in sizes[1:-1]]
    outs = [A1[:-1] for A1 in acts[1:]] + [np.empty((sizes[-1], m), net.dtype)]
    deltas = [np.ones((n, m), net.dtype) for n in sizes[1:]]
    blocks = net.layout.blocks(theta)
    grad_blocks = net.layout.blocks(np.empty_like(theta))

    def run() -> None:
        for l, block in enumerate(blocks):
            np.matmul(block, acts[l], out=outs[l])
        for l in range(len(blocks) - 1, -1, -1):
            np.matmul(deltas[l], acts[l].T, out=grad_blocks[l])
            if l > 0:
                np.matmul(blocks[l][:, :-1].T, deltas[l], out=deltas[l - 1])

    return run


def bench_network(
    rows: int = 200_000,
    features: int = 64,
    hidden: tuple[int, ...] = (256, 256),
    dtype: str = "float64",
    threads: int | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> dict:
    """One forward+backward step of the network against the same step's GEMMs alone;
    against the same step with the whole columns at once instead of in chunks; and the
    exact reduction's step (blocks as `block_rows: null` cuts them) against it."""
    rng = np.random.default_rng(seed)
    arch = Architecture((features, *hidden, 1), "relu", "binary")
    theta = init_params(arch.layout, "he", seed, dtype)
    X = rng.standard_normal((features, rows)).astype(dtype)
    Y = (rng.random((1, rows)) < 0.5).astype(dtype)
    batch = Batch(X, Y, dtype)
    with threadpool_limits(limits=threads):
        net = Network(arch, dtype)  # inside the limit: it takes its thread count from BLAS
        whole, blocked = Network(arch, dtype), Network(arch, dtype)
        whole.chunk = rows
        grid = BlockGrid(rows, auto_block_rows(rows, net.chunk))
        step, gemms, unchunked, exact = Timing.alternating(
            [
                lambda: net.gradient(theta, batch),
                gemms_of_step(net, theta, batch),
                lambda: whole.gradient(theta, batch),
                lambda: blocked.block_gradient(theta, batch, grid.bounds(0, rows), 0, grid),
            ],
            repeats,
            pause=BLAS_SPIN_SECONDS,  # after the GEMMs alone, on every BLAS thread
        )
        blas = [
            (i["internal_api"], i.get("architecture"), i["num_threads"])
            for i in threadpool_info()
            if i["user_api"] == "blas"
        ]
    return {
        "name": f"network step ({rows:,} x {features} -> {list(hidden)} -> 1, {dtype})",
        "workload": {"rows": rows, "features": features, "hidden": list(hidden), "dtype": dtype},
        "blas": blas,
        "timings": [
            ("step", "step"),
            ("gemms", "GEMMs alone"),
            ("whole", "whole columns"),
            ("exact", "exact reduction"),
        ],
        "step": asdict(step),
        "gemms": asdict(gemms),
        "whole": asdict(unchunked),
        "exact": asdict(exact),
        "ratio": step.median / gemms.median,
        "also": {
            "step / whole columns": step.median / unchunked.median,
            "exact / step": exact.median / step.median,
        },
    }


def bench_tracking(config: Path, repeats: int = 3) -> dict:
    """The whole `shardprop train` command, tracked and untracked, runs alternated.

    Whole processes, so that everything tracking costs counts: importing MLflow, opening
    the store, the metric writer, checkpoints and the model at the end.
    """
    command = [
        str(Path(sys.executable).parent / "shardprop"),
        "train",
        str(config.resolve()),
        "--quiet",
    ]
    seconds: dict[str, list[float]] = {"tracked": [], "untracked": []}
    with tempfile.TemporaryDirectory(prefix="shardprop-bench-") as tmp:
        for _ in range(repeats):
            for kind, extra in (("tracked", []), ("untracked", ["--no-tracking"])):
                start = time.perf_counter()
                subprocess.run([*command, *extra], cwd=tmp, check=True, capture_output=True)
                seconds[kind].append(time.perf_counter() - start)
    tracked, untracked = (Timing.over(seconds[k]) for k in ("tracked", "untracked"))
    return {
        "name": f"train {config.name}",
        "timings": [("tracked", "tracked"), ("untracked", "untracked")],
        "tracked": asdict(tracked),
        "untracked": asdict(untracked),
        "ratio": tracked.median / untracked.median,
    }
