"""`shardprop bench convergence`: wall time from the first step until the training loss
reaches a target, for shardprop's lbfgs, adam and gd (on Ray workers and in-process) and the
peers of convergence_peers.py, on three examples: the standard workload, the digits example
and a regression table.

The target is the loss scikit-learn's lbfgs returns from our start with its defaults; every
system is raced to it from the same rows and weights, and every ratio is between runs of the
one invocation. A run that does not get there within its cap says so, with how long it ran.
"""

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from shardprop.service.bench.convergence_peers import (
    SKLEARN,
    Race,
    Start,
    losses_to_target,
    sklearn_adam,
    sklearn_lbfgs,
    torch_adam,
    torch_lbfgs,
)
from shardprop.service.bench.workload import LEARNING_RATE, Workload
from shardprop.service.cluster.group import start_group
from shardprop.service.cluster.runtime import connect_ray
from shardprop.service.config import config_from
from shardprop.service.data.datasets import make_dataset
from shardprop.service.tracking.page import ELAPSED_SECONDS, FUNCTION_EVALS
from shardprop.service.training.progress import Reporter
from shardprop.service.training.reduce import batch_mean, reduce_sums
from shardprop.service.training.run import (
    initial_parameters,
    make_plan,
    set_up_workers,
    train,
)

OURS = "shardprop"
METHODS = ("lbfgs", "adam", "gd")
ADAM_LEARNING_RATE = 0.01  # the digits example's, and every adam's here (ours and the peers')
# the digits example as configs/digits.yaml has it (its rows: `shardprop data make digits`)
DIGITS = {
    "data": {"label": "y", "task": "multiclass", "standardize": True},
    "model": {"hidden": [64], "activation": "relu", "init": "he"},
}
# the peers' adam may run this many times the epochs ours took: the same steps from the same
# start, so it gets there too unless it computes something else
PEER_EPOCHS_FACTOR = 1.5


@dataclass(frozen=True)
class Case:
    """One example: the settings of its run (less the optimizer and the workers) and the
    learning rates of gd and adam."""

    name: str
    describe: str
    settings: dict[str, Any]
    gd_learning_rate: float
    adam_learning_rate: float = ADAM_LEARNING_RATE

    def config_raw(self, method: str, workers: int, steps: int, target: float) -> dict:
        """The run's config as a mapping: no tracking, no checkpoints, no plateau rule, the
        target in the label's units."""
        raw = {section: dict(values) for section, values in self.settings.items()}
        rate = {"gd": self.gd_learning_rate, "adam": self.adam_learning_rate}.get(method)
        raw["train"] = raw.get("train", {}) | {
            "optimizer": method,
            "steps": steps,
            "tolerance": None,
            "target_loss": target,
            "checkpoint_every": 0,
        }
        if rate is not None:
            raw["train"]["learning_rate"] = rate
        raw["cluster"] = raw.get("cluster", {}) | {"workers": workers}
        raw["tracking"] = {"enabled": False}
        return raw


@dataclass(frozen=True)
class Sizes:
    """How big the examples are; `quick()` for a test."""

    rows: int = 200_000  # of the standard workload
    features: int = 64
    hidden: tuple[int, ...] = (256, 256)
    regression_rows: int = 100_000
    regression_features: int = 16
    regression_hidden: tuple[int, ...] = (64, 64)
    digits_rows: int | None = None  # all 1,797
    dtype: str = "float64"

    @classmethod
    def quick(cls, dtype: str = "float64") -> "Sizes":
        return cls(3000, 8, (16, 16), 3000, 4, (8,), 600, dtype)


@dataclass
class Table:
    """One example's races and the target they ran to."""

    case: str
    describe: str
    target: float
    target_from: str
    label_units: float
    start_loss: float
    races: list[Race] = field(default_factory=list)


def cases(sizes: Sizes, folder: Path) -> list[Case]:
    """The three examples; the digits and regression rows are written to `folder` as
    Parquet."""
    standard = Workload(sizes.rows, sizes.features, sizes.hidden, sizes.dtype)
    digits = folder / "digits.parquet"
    make_dataset("digits", digits, rows=sizes.digits_rows)
    regression = folder / "regression.parquet"
    make_dataset(
        "regression", regression, rows=sizes.regression_rows, features=sizes.regression_features
    )
    dtype = {"dtype": sizes.dtype}
    return [
        Case(
            "standard workload",
            f"blobs, {sizes.rows:,} x {sizes.features} -> {list(sizes.hidden)} -> 1, binary",
            standard.settings(0),
            LEARNING_RATE,
        ),
        Case(
            "digits",
            f"configs/digits.yaml: {sizes.digits_rows or 1797:,} x 64 -> [64] -> 10, multiclass",
            {
                "data": DIGITS["data"] | {"path": str(digits)},
                "model": DIGITS["model"] | dtype,
            },
            0.5,
        ),
        Case(
            "regression table",
            f"regression, {sizes.regression_rows:,} x {sizes.regression_features} -> "
            f"{list(sizes.regression_hidden)} -> 1, Parquet",
            {
                "data": {"path": str(regression), "label": "y", "task": "regression"},
                "model": {"hidden": list(sizes.regression_hidden)} | dtype,
            },
            0.1,
        ),
    ]


def same_start(case: Case) -> Start:
    """The rows as an in-process run holds them (standardised), its initial weights and its
    loss there: what every peer starts from."""
    config = config_from(case.config_raw("gd", 0, 1, 0.0))
    plan = make_plan(config)
    group = start_group(plan, config.cluster)
    try:
        _, setup, arch = set_up_workers(group, plan, config)
        theta = initial_parameters(arch.layout, config, None)
        batch = group.workers[0].batch
        loss = batch_mean(reduce_sums(group.call("evaluate", theta, "train"))).loss
        Y = batch.Y  # (n_L, m)
        y = Y.argmax(axis=0) if setup.task == "multiclass" else Y[0]
        return Start(
            np.ascontiguousarray(batch.X1[:-1].T),
            np.ascontiguousarray(y),
            setup.task,
            [block.copy() for block in arch.layout.blocks(theta)],
            loss,
            setup.target[1] ** 2 if setup.target else 1.0,
        )
    finally:
        group.close()


def race_ours(
    case: Case, method: str, workers: int, target: float, label_units: float, steps: int
) -> Race:
    """One shardprop run to the target: the seconds its history logged at the first step
    whose loss is at most the target."""
    config = config_from(case.config_raw(method, workers, steps, target * label_units))
    with tempfile.TemporaryDirectory(prefix="shardprop-convergence-") as out:
        result = train(config, output=Path(out) / "run", reporter=Reporter("quiet"))
    history, at = result.history, result.steps
    seconds = dict(zip(at[ELAPSED_SECONDS], history[ELAPSED_SECONDS], strict=True))
    losses = dict(zip(at["loss"], np.divide(history["loss"], label_units), strict=True))
    steps_run = sorted(losses)
    curve = [losses[s] for s in steps_run], [seconds[s] for s in steps_run]
    to_target, index = losses_to_target(*curve, target)
    evals = None
    if FUNCTION_EVALS in history:  # lbfgs: its line search's evaluations, step by step
        taken = steps_run[index] if to_target is not None else steps_run[-1] + 1
        logged = zip(at[FUNCTION_EVALS], history[FUNCTION_EVALS], strict=True)
        evals = int(sum(e for s, e in logged if s < taken))
    where = f"{workers} Ray workers" if workers else "in-process"
    return Race(
        OURS,
        method,
        where,
        to_target,
        index,
        seconds[steps_run[-1]],
        min(losses.values()),
        losses[steps_run[0]],
        evals,
        curve_losses=curve[0],
        curve_seconds=curve[1],
    )


def bench_convergence(
    sizes: Sizes,
    workers: tuple[int, ...] = (2, 0),
    steps: int = 500,
    gd_steps: int = 100,
    threads: int = 2,
    peers: bool = True,
    folder: Path | None = None,
    say: Callable[[str], object] = lambda line: None,
) -> dict[str, Any]:
    """Every example's races, and the ratios between them; `say` hears of each race as it
    ends."""
    tables = []
    with tempfile.TemporaryDirectory(prefix="shardprop-convergence-") as temp:
        examples = cases(sizes, Path(folder or temp))
        ray_up = any(workers) and connect_ray(None, max(workers))
        try:
            for case in examples:
                tables.append(race_case(case, workers, steps, gd_steps, threads, peers, say))
        finally:
            if ray_up:
                import ray

                ray.shutdown()
    return {
        "sizes": asdict(sizes),
        "threads": threads,
        "caps": {"lbfgs": steps, "adam": steps, "gd": gd_steps},
        "tables": [asdict(table) for table in tables],
        "ratios": {table.case: ratios(table) for table in tables},
    }


def race_case(
    case: Case,
    workers: tuple[int, ...],
    steps: int,
    gd_steps: int,
    threads: int,
    peers: bool,
    say: Callable[[str], object] = lambda line: None,
) -> Table:
    """The target from scikit-learn's lbfgs, then ours and the other peers to it."""
    with threadpool_limits(limits=threads):
        start = same_start(case)
        reference = sklearn_lbfgs(start)
    target = reference.best_loss
    say(f"{case.name}: target {target:.6g}, {row(reference)}")
    table = Table(
        case.name,
        case.describe,
        target,
        f"{SKLEARN} lbfgs, {reference.how}",
        start.label_units,
        start.loss,
    )
    for method in METHODS:
        cap = gd_steps if method == "gd" else steps
        for k in workers:
            table.races.append(race_ours(case, method, k, target, start.label_units, cap))
            say(f"{case.name}: {row(table.races[-1])}")
    if not peers:
        table.races.append(reference)
        return table
    ours_adam = [r for r in table.races if r.method == "adam" and r.reached]
    epochs = steps
    if ours_adam:
        epochs = min(steps, int(PEER_EPOCHS_FACTOR * max(r.steps for r in ours_adam)) + 10)
    table.races.append(reference)
    with threadpool_limits(limits=threads):
        for race in (
            sklearn_adam(start, case.adam_learning_rate, target, epochs),
            torch_lbfgs(start, threads, target, steps),
            torch_adam(start, threads, case.adam_learning_rate, target, epochs),
        ):
            if race is not None:
                table.races.append(race)
                say(f"{case.name}: {row(race)}")
    return table


def ratios(table: Table) -> dict[str, float | str]:
    """Each of our runs' time to the target over the best peer's; lbfgs over gd. Where gd
    did not get there: lbfgs's time over gd's whole run (a bound), and lbfgs's time to the
    loss gd ended on over gd's time to it."""
    races = [Race(**r) if isinstance(r, dict) else r for r in table.races]
    peers = [r for r in races if r.system != OURS and r.reached]
    ours = {(r.method, r.where): r for r in races if r.system == OURS}
    out: dict[str, float | str] = {}
    best = min(peers, key=lambda r: r.seconds or 0.0, default=None)
    if best is not None and best.seconds:
        out["best peer"] = f"{best.system} {best.method}"
        for (method, where), race in ours.items():
            if race.reached:
                out[f"{OURS} {method}, {where} / best peer"] = race.seconds / best.seconds
    for where in sorted({where for _, where in ours}):
        lbfgs, gd = ours.get(("lbfgs", where)), ours.get(("gd", where))
        if lbfgs is None or gd is None or not lbfgs.reached:
            continue
        if gd.reached:
            out[f"lbfgs / gd, {where}"] = lbfgs.seconds / gd.seconds
            continue
        if lbfgs.seconds < gd.run_seconds:  # else the bound says nothing
            out[f"lbfgs / gd, {where}, under (gd not there in its whole run)"] = (
                lbfgs.seconds / gd.run_seconds
            )
        # the same loss both reached: where gd ended
        to_it, _ = losses_to_target(lbfgs.curve_losses, lbfgs.curve_seconds, gd.best_loss)
        gd_to_it, _ = losses_to_target(gd.curve_losses, gd.curve_seconds, gd.best_loss)
        if to_it is not None and gd_to_it:
            out[f"lbfgs / gd, {where}, to gd's best loss {gd.best_loss:.4g}"] = to_it / gd_to_it
    return out


def render(result: dict[str, Any]) -> list[str]:
    """One table: every example's target, then each system's time to it and its ratio to
    the best peer's."""
    caps = result["caps"]
    lines = [
        f"time from the first step to the target loss; caps: lbfgs and adam {caps['lbfgs']} "
        f"steps, gd {caps['gd']} steps; peers on {result['threads']} BLAS threads",
    ]
    header = (
        f"{'system':34} {'to target':>11} {'steps':>6} {'evals':>6} {'/ best peer':>12}  best loss"
    )
    for table in result["tables"]:
        races = [Race(**r) for r in table["races"]]
        lines += [
            "",
            f"{table['case']} ({table['describe']})",
            f"target loss {table['target']:.6g}: {table['target_from']}; "
            f"loss at the start {table['start_loss']:.6g}",
            header,
        ]
        ratio = result["ratios"][table["case"]]
        best = [r for r in races if r.system != OURS and r.reached]
        best_seconds = min((r.seconds for r in best), default=None)
        lines += [row(race, best_seconds) for race in races]
        lines += [
            f"  {name}: {value:.3f}" if isinstance(value, float) else f"  {name}: {value}"
            for name, value in ratio.items()
        ]
    return lines


def row(race: Race, best_seconds: float | None = None) -> str:
    """A race's line of the table: its time to the target, steps, evaluations and ratio to
    the best peer's time (ours: and when its first step ended); or how far it got."""
    name = f"{race.system} {race.method}, {race.where}"
    if not race.reached:
        return (
            f"{name:34} not reached in {race.steps} steps ({race.run_seconds:.1f} s), "
            f"best loss {race.best_loss:.6g}"
        )
    evals = "" if race.evals is None else str(race.evals)
    over = "" if best_seconds is None else f"{race.seconds / best_seconds:.3f}"
    first = f"  first step {race.curve_seconds[0]:.2f} s" if race.curve_seconds else ""
    return (
        f"{name:34} {race.seconds:9.2f} s {race.steps:6d} {evals:>6} {over:>12}  "
        f"{race.best_loss:.6g}{first}"
    )
