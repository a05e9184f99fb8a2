"""`shardprop verify`: is the math right on the user's own data and cluster?

Three checks, each a row of one table (the promise they hold the build to: docs/exactness.md):

1. the analytic gradient against finite differences of the objective, in float64, on a
   seeded sample of parameters, in-process (central differences; smaller steps and one-sided
   quotients only where a ReLU kink spoils one);
2. for each worker count k, the distributed gradient at the initial weights and the weights
   after N steps against the in-process run (`cluster.workers: 0`, the reference);
3. with `train.reduction: exact`, bitwise identity of both, for every k.

Nothing here computes a gradient or takes a step itself: every number comes from the
trainer's own functions, so what is verified is what `shardprop train` runs.
"""

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.table import Table

from shardprop.service.cluster.group import WorkerGroup, start_group
from shardprop.service.cluster.runtime import code_to_ship, connect_ray
from shardprop.service.config import ClusterConfig, Config, config_from
from shardprop.service.errors import ConfigError
from shardprop.service.tracking.store import check_reachable
from shardprop.service.tracking.untracked import Untracked
from shardprop.service.training.progress import Reporter
from shardprop.service.training.run import (
    final_metrics,
    fit,
    initial_parameters,
    make_plan,
    objective,
    set_up_workers,
)
from shardprop.workers.network.params import Layout

RUN_NAME = "verify"
# central differences: truncation error ~ h^2, rounding error ~ eps / h; best near eps^(1/3)
FD_STEP = float(np.finfo(np.float64).eps ** (1 / 3))
FD_STEPS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)  # of FD_STEP, in turn (closest_difference)
FD_TOLERANCE = 1e-5  # relative to max(|analytic|, |numeric|, floor)
FD_CLOSE_ENOUGH = FD_TOLERANCE / 100  # no smaller step is tried once a quotient is this close
# below this fraction of the largest gradient entry, an entry's deviation counts against the
# fraction rather than the entry: tiny entries are all rounding, on both sides
FD_FLOOR = 1e-3
# max |distributed - in-process| / max |in-process|, for (gradient, weights after N steps):
# rounding only (sums grouped differently), which steps compound
TOLERANCES = {"float64": (1e-10, 1e-8), "float32": (1e-4, 1e-3)}

Status = Literal["pass", "fail", "skipped"]


@dataclass
class Check:
    """One row of the table: one check on one worker count."""

    name: str  # as the table and the failure line say it: "distributed gradient"
    key: str  # the metric prefix: "gradient"
    workers: int | None  # None: in-process
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None  # on max_rel; None: bitwise, or nothing to compare
    status: Status = "pass"
    note: str = ""

    @property
    def where(self) -> str:
        if self.workers is None:
            return "in-process"
        return f"{self.workers} worker" + ("s" if self.workers != 1 else "")

    def failure(self) -> str:
        """What the failure line says about this row."""
        head = self.name if self.workers is None else f"{self.name}, {self.where}"
        if self.tolerance is None:
            return f"{head}: not bitwise identical (max absolute deviation {self.max_abs:.1e})"
        return f"{head}: max relative deviation {self.max_rel:.1e} > {self.tolerance:.0e}"

    def metrics(self) -> dict[str, float]:
        """This row's values as MLflow metrics: `gradient.workers_2.max_rel`, ..."""
        if self.status == "skipped":
            return {}
        prefix = self.key if self.workers is None else f"{self.key}.workers_{self.workers}"
        if self.tolerance is None:  # bitwise: the deviations are the comparison rows'
            return {f"{prefix}.identical": float(self.status == "pass")}
        return {f"{prefix}.max_abs": self.max_abs, f"{prefix}.max_rel": self.max_rel}


@dataclass
class Report:
    """Every row, and what was compared; `passed` only when no row failed."""

    workers: tuple[int, ...]
    steps: int
    fd_params: int
    dtype: str
    reduction: str
    n_params: int = 0
    n_rows: int = 0
    checks: list[Check] = field(default_factory=list)
    run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def passed(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    @property
    def result(self) -> str:
        return "pass" if self.passed else "fail"

    def failures(self) -> list[str]:
        return [check.failure() for check in self.checks if check.status == "fail"]

    def metrics(self) -> dict[str, float]:
        return {name: value for check in self.checks for name, value in check.metrics().items()}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"result": self.result, "failures": self.failures()}


@dataclass
class Prepared:
    """Workers holding their shards and networks, as a run has them before its first step."""

    group: WorkerGroup
    layout: Layout
    theta0: np.ndarray
    rows: int


@dataclass
class Outcome:
    gradient: np.ndarray  # at the initial weights
    weights: np.ndarray  # after N steps


def verify(
    config: Config,
    counts: Sequence[int] | None = None,
    steps: int = 10,
    fd_params: int = 20,
    say: Callable[[str], None] | None = None,
) -> Report:
    """Run every check on CONFIG's data; log the table as an MLflow run of its own when
    tracking is on. Worker counts default to 1, 2 and cluster.workers."""
    say = say or (lambda _: None)
    counts = checked_counts(counts if counts is not None else default_counts(config))
    if config.tracking.enabled:
        check_reachable(config.tracking.uri)  # before minutes of work, not after
    # the same steps for every side, and nothing written: no checkpoints, no chaos
    base = variant(
        config, {"train.steps": steps, "train.checkpoint_every": 0, "cluster.workers": 0}
    )
    report = Report(counts, steps, fd_params, base.model.dtype, base.train.reduction)
    float64 = variant(base, {"model.dtype": "float64"})
    say("in-process reference")
    with prepared(base) as run:
        report.n_params, report.n_rows = run.layout.size, run.rows
        fd = finite_differences(run, base, fd_params) if base == float64 else None
        reference = outcome(run, base)
    if fd is None:  # float32 runs: finite differences need float64 to mean anything
        say("finite differences in float64")
        with prepared(float64) as run:
            fd = finite_differences(run, float64, fd_params)
    outcomes = {}
    with ray_runtime(base.cluster, counts):
        for k in counts:
            say(f"{k} Ray worker(s)")
            distributed = variant(base, {"cluster.workers": k})
            with prepared(distributed) as run:
                outcomes[k] = outcome(run, distributed)
    report.checks = [fd, *compare_all(outcomes, reference, base)]
    if config.tracking.enabled:
        report.run_id, report.tracking_uri = track(report, config)
    return report


def default_counts(config: Config) -> tuple[int, ...]:
    return tuple(sorted({1, 2, config.cluster.workers} - {0}))


def checked_counts(counts: Sequence[int]) -> tuple[int, ...]:
    if any(k < 1 for k in counts):
        raise ConfigError(
            f"--workers {','.join(map(str, counts))}: worker counts must be >= 1 "
            "(every count is compared with the in-process run, which is 0)"
        )
    return tuple(dict.fromkeys(counts))


def variant(config: Config, keys: dict[str, Any]) -> Config:
    """The same config with some dotted keys set, validated again."""
    raw = config.resolved()
    raw["cluster"]["inject_failure"] = None  # chaos has no place in a check
    return config_from(raw, keys)


@contextmanager
def prepared(config: Config) -> Iterator[Prepared]:
    plan = make_plan(config)
    with closing(start_group(plan, config.cluster)) as group:
        _, setup, arch = set_up_workers(group, plan, config)
        theta0 = initial_parameters(arch.layout, config, None)  # the same draw for any k
        yield Prepared(group, arch.layout, theta0, setup.rows)


@contextmanager
def ray_runtime(cluster: ClusterConfig, counts: Sequence[int]) -> Iterator[None]:
    """One Ray runtime for every worker count: started (or joined) once, not once a group."""
    if not counts:
        yield
        return
    started = connect_ray(
        cluster.address, max(counts) * cluster.cpus_per_worker, code_to_ship(cluster)
    )
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def gradient_at(run: Prepared, theta: np.ndarray, config: Config) -> np.ndarray:
    """The gradient exactly as a training step takes it: gathered, reduced, L2 added once."""
    return objective(run.group.call("gradient", theta), theta, run.layout, config.train.l2)[2]


def objective_value(run: Prepared, theta: np.ndarray, config: Config) -> float:
    """Mean loss + L2, reduced as a run's final metrics are."""
    return final_metrics(run.group, theta, run.layout, config.train.l2, None)["loss"]


def outcome(run: Prepared, config: Config) -> Outcome:
    """The gradient at the initial weights, then `train.steps` steps of the real loop."""
    gradient = gradient_at(run, run.theta0, config)
    theta = run.theta0.copy()
    with tempfile.TemporaryDirectory(prefix="shardprop-verify-") as folder:
        fit(run.group, theta, run.layout, config, Untracked(), Reporter("quiet"), Path(folder))
    return Outcome(gradient, theta)


def finite_differences(run: Prepared, config: Config, count: int) -> Check:
    """Finite differences of the objective against the analytic gradient, at theta0."""
    theta = run.theta0.copy()
    analytic = gradient_at(run, theta, config)
    rng = np.random.default_rng(config.train.seed)
    picked = np.sort(rng.choice(theta.size, size=min(count, theta.size), replace=False))
    floor = max(FD_FLOOR * float(np.abs(analytic).max()), float(np.finfo(np.float64).tiny))
    at_theta = objective_value(run, theta, config)
    numeric = np.array(
        [
            closest_difference(run, theta, int(i), config, at_theta, analytic[i], floor)
            for i in picked
        ]
    )
    exact = analytic[picked]
    return judged(
        Check(
            "finite differences",
            "finite_differences",
            None,
            float(np.abs(exact - numeric).max()),
            float(fd_deviation(exact, numeric, floor).max()),
            FD_TOLERANCE,
            note=f"{len(picked)} parameters, float64",
        )
    )


def fd_deviation(analytic: np.ndarray, numeric: np.ndarray, floor: float) -> np.ndarray:
    scale = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
    return np.abs(analytic - numeric) / scale


def closest_difference(
    run: Prepared,
    theta: np.ndarray,
    i: int,
    config: Config,
    at_theta: float,
    analytic: float,
    floor: float,
) -> float:
    """The difference quotient closest to the analytic value, over shrinking steps and over
    central, forward and backward quotients, stopping once one is well within tolerance.

    ReLU kinks near theta_i spoil a step (by about h per kink crossed, which many rows make
    likely) or one side of it, seldom every smaller step and both sides; a wrong gradient
    disagrees with all of them alike.
    """
    best = np.inf
    for fraction in FD_STEPS:
        for numeric in difference_quotients(run, theta, i, config, at_theta, FD_STEP * fraction):
            if abs(numeric - analytic) < abs(best - analytic):
                best = numeric
        if fd_deviation(np.array(analytic), np.array(best), floor) <= FD_CLOSE_ENOUGH:
            break
    return best


def difference_quotients(
    run: Prepared, theta: np.ndarray, i: int, config: Config, at_theta: float, step: float
) -> tuple[float, float, float]:
    """Central, forward and backward quotients of the objective in theta_i, with the step
    scaled to the parameter; theta is restored."""
    saved = theta[i]
    h = step * max(1.0, abs(float(saved)))
    theta[i] = saved + h
    up = objective_value(run, theta, config)
    theta[i] = saved - h
    down = objective_value(run, theta, config)
    theta[i] = saved
    # the steps as represented, not as intended
    ahead, behind = float((saved + h) - saved), float(saved - (saved - h))
    return (up - down) / (ahead + behind), (up - at_theta) / ahead, (at_theta - down) / behind


def deviation(got: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """max |got - reference|, and that over max |reference| (in float64)."""
    difference = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(difference.max())
    scale = float(np.abs(reference.astype(np.float64)).max())
    if scale == 0:
        return max_abs, 0.0 if max_abs == 0 else float("inf")
    return max_abs, max_abs / scale


def judged(check: Check) -> Check:
    """Pass only when the deviation is within tolerance: NaN fails too."""
    check.status = "pass" if check.max_rel <= check.tolerance else "fail"
    return check


def compare_all(outcomes: dict[int, Outcome], reference: Outcome, config: Config) -> list[Check]:
    """The distributed rows, grouped by check, each in worker-count order."""
    gradient_tol, weights_tol = TOLERANCES[config.model.dtype]
    pairs = [
        ("distributed gradient", "gradient", "gradient", gradient_tol),
        (f"weights after {config.train.steps} steps", "weights", "weights", weights_tol),
    ]
    checks = []
    for name, key, attribute, tolerance in pairs:
        for k, got in outcomes.items():
            max_abs, max_rel = deviation(getattr(got, attribute), getattr(reference, attribute))
            checks.append(judged(Check(name, key, k, max_abs, max_rel, tolerance)))
    if not outcomes:
        return checks
    if config.train.reduction != "exact":
        note = f"skipped (train.reduction is {config.train.reduction})"
        return [*checks, Check("bitwise identity", "bitwise", None, status="skipped", note=note)]
    for name, key, attribute, _ in pairs:
        for k, got in outcomes.items():
            ours, theirs = getattr(got, attribute), getattr(reference, attribute)
            same = ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
            max_abs, max_rel = deviation(ours, theirs)
            status = "pass" if same else "fail"
            checks.append(
                Check(f"bitwise {name}", f"bitwise_{key}", k, max_abs, max_rel, None, status)
            )
    return checks


def track(report: Report, config: Config) -> tuple[str, str]:
    """The table as an MLflow run of its own: the config as params, one metric a value,
    the result as the tag `verify.result`, everything as verify.json."""
    from shardprop.service.tracking.page import flatten, in_force
    from shardprop.service.tracking.tracker import (
        Tracker,  # MLflow takes a second to import: only when tracking
    )

    track = config.tracking
    extra = {
        "verify.workers": list(report.workers),
        "verify.steps": report.steps,
        "verify.fd_params": report.fd_params,
        "n_params": report.n_params,
        "n_rows": report.n_rows,
    }
    with Tracker.start(track.uri, track.experiment, RUN_NAME) as tracker:
        resolved = config.resolved()
        tracker.log_config(resolved, flatten(in_force(resolved, config.data.task)) | extra)
        # step 1: a Tracker takes steps from 1 and counts step 0 as logged already
        tracker.log_metrics(1, report.metrics())
        tracker.set_tags({"verify.result": report.result})
        tracker.log_dict(report.as_dict(), "verify.json")
    return tracker.run_id, tracker.tracking_uri


def number(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def table(report: Report) -> Table:
    """The rows as a rich table: check, workers, max abs, max rel, tolerance, result."""
    caption = (
        f"finite differences: {report.fd_params} sampled parameters, in float64, deviation "
        "relative to the larger of the two values; others: max |a - b| / max |in-process|"
    )
    rows = Table(show_edge=False, caption=caption, caption_justify="left")
    for name, justify in [
        ("check", "left"),
        ("workers", "right"),
        ("max abs", "right"),
        ("max rel", "right"),
        ("tolerance", "right"),
        ("result", "left"),
    ]:
        rows.add_column(name, justify=justify, no_wrap=True)
    for check in report.checks:
        if check.status == "skipped":
            tolerance, result = "", check.note
        else:
            tolerance = "bitwise" if check.tolerance is None else f"{check.tolerance:.0e} rel"
            result = "[green]pass[/]" if check.status == "pass" else "[bold red]FAIL[/]"
        workers = "all" if check.key == "bitwise" else check.where
        rows.add_row(
            check.name, workers, number(check.max_abs), number(check.max_rel), tolerance, result
        )
    return rows
