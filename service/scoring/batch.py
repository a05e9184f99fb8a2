"""`shardprop predict`: a model's predictions for every row of a table, as one Parquet file.

Planned as training is (service/data/plan.py): the coordinator reads footers only, and each
worker gets one contiguous range of rows, which it reads and scores itself, slice after slice
(workers/scoring.py). The coordinator never holds the input; it receives each slice's
predictions, a few columns, and writes them in input order: rank 0's straight into the output
file, each later rank's into a part file of its own beside it, appended in rank order at the
end. So every worker scores at full speed (none waits for the ranks before it to be written),
the coordinator holds at most AHEAD slices of output per worker, and the result is one file
at PATH, written on the coordinator's disk whatever node scored the rows.

The file appears at PATH only once complete (a rename in its folder): a failed or stopped
run leaves no half-written file behind.
"""

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from shardprop.service.cluster.group import format_resources, raise_user_error
from shardprop.service.cluster.runtime import code_to_ship, connect_ray
from shardprop.service.cluster.waits import interruptible
from shardprop.service.config import ClusterConfig
from shardprop.service.data.plan import open_source, schema_of, split_rows
from shardprop.service.errors import ConfigError, DataError, TrainingError
from shardprop.service.scoring.models import load_model
from shardprop.service.tracking.serving import Bundle
from shardprop.service.tracking.store import check_writable
from shardprop.workers.data.columns import NUMERIC, is_categorical_type
from shardprop.workers.data.source import Source
from shardprop.workers.data.split import contiguous_ranges
from shardprop.workers.scoring import ScoringModel, ScoringWorker

log = logging.getLogger(__name__)

SLICE_ROWS = 65_536  # rows a worker reads and scores at a time: its memory is a slice's
AHEAD = 2  # slice calls queued per worker: one scoring, one waiting, so no worker idles
MAX_REPLACEMENTS = 3  # lost workers replaced in one call before it fails
TIMEOUT = ClusterConfig().start_timeout  # seconds to place a worker, or to score a slice
NOTICE_SECONDS = 10.0  # a wait for workers longer than this says what it waits for


class Progress(Protocol):
    """What a person watching sees: the CLI draws it where its Reporter draws a run's steps."""

    def start(self, total_rows: int, workers: int) -> None:
        """Scoring starts on `workers` Ray workers (0: in this process)."""

    def rows(self, done: int, rows_per_second: float) -> None:
        """`done` rows are written."""

    def stop(self) -> None:
        """Scoring is over, or failed."""


@dataclass(frozen=True)
class ScoringPlan:
    """The rows to score, the columns to keep, and each worker's contiguous range of rows."""

    data: str
    source: Source
    keep: tuple[str, ...]
    shards: tuple[tuple[int, int], ...]  # (start, stop) of global rows, one per rank
    slice_rows: int = SLICE_ROWS

    @property
    def total_rows(self) -> int:
        return self.source.total_rows

    def slices(self, rank: int) -> list[tuple[int, int]]:
        """Rank's rows as consecutive (start, stop) slices of at most slice_rows rows."""
        start, stop = self.shards[rank]
        count = -(-(stop - start) // self.slice_rows)
        return [(start + lo, start + hi) for lo, hi in contiguous_ranges(stop - start, count)]


@dataclass(frozen=True)
class Scored:
    """What `predict` wrote."""

    path: Path
    rows: int
    columns: tuple[str, ...]
    workers: int
    model: str  # where the model came from
    seconds: float  # the whole call: model, Ray, scoring, writing
    scoring_seconds: float  # from the first slice asked for to the file in place
    unseen: dict[str, int] = field(default_factory=dict)  # column: values not seen in training

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.scoring_seconds if self.scoring_seconds > 0 else float("inf")


def scoring_model(bundle: Bundle) -> ScoringModel:
    """The parts of a loaded model the workers need."""
    return ScoringModel(
        bundle.network.arch,
        bundle.theta,
        bundle.columns,
        bundle.mean,
        bundle.scale,
        bundle.classes,
        bundle.target,
    )


def plan_scoring(
    data: str,
    model: ScoringModel,
    kind: str,
    keep: Sequence[str],
    workers: int,
    slice_rows: int = SLICE_ROWS,
    filesystem: dict[str, Any] | None = None,
) -> ScoringPlan:
    """Open DATA (footers only), check it has the model's feature columns and the columns to
    keep, and split its rows: one range per worker (workers=0: one, in-process). DataError,
    one line, for anything missing."""
    if workers < 0:
        raise ConfigError(f"--workers: must be >= 0 (0 scores in-process), got {workers}")
    if slice_rows < 1:
        raise ConfigError(f"--batch-rows: must be at least 1, got {slice_rows}")
    source = open_source(data, None, filesystem)
    if source.total_rows == 0:
        raise DataError(f"DATA {data}: no rows to score")
    schema = schema_of(source)
    missing = [name for name in model.features if name not in schema.names]
    if missing:
        raise DataError(
            f"DATA {data}: no feature column(s) {', '.join(map(repr, missing))}; "
            f"the model reads {', '.join(model.features)}"
        )
    for column in model.columns:
        kind_of = schema.field(column.name).type
        number = pa.types.is_integer(kind_of) or pa.types.is_floating(kind_of)
        number = number or pa.types.is_decimal(kind_of) or pa.types.is_boolean(kind_of)
        if column.kind == NUMERIC and not number:
            raise DataError(
                f"DATA {data}: feature column {column.name!r} has type {kind_of}; "
                "the model reads numbers"
            )
        if column.kind != NUMERIC and not (number or is_categorical_type(kind_of)):
            raise DataError(
                f"DATA {data}: feature column {column.name!r} has type {kind_of}; "
                "the model reads categories (text, booleans or integers)"
            )
    predicted = [f.name for f in model.output_fields(kind)]
    if len(set(keep)) != len(keep):
        raise DataError(f"--keep: a column is named twice in {','.join(keep)}")
    for name in keep:
        if name not in schema.names:
            raise DataError(f"--keep: no column {name!r} in {data}; columns: {schema.names}")
        if name in predicted:
            raise DataError(f"--keep {name}: the output's prediction column has that name")
    parts = min(max(workers, 1), source.total_rows)  # a tiny table: fewer workers
    shards = split_rows(source.total_rows, parts)
    return ScoringPlan(data, source, tuple(keep), tuple(shards), slice_rows)


class OrderedOutput:
    """One Parquet file written in input order from slices that arrive rank by rank."""

    def __init__(self, path: Path, schema: pa.Schema, ranks: int):
        self.path = path
        # beside PATH: the finished file is renamed into place, never copied across disks
        self.folder = Path(tempfile.mkdtemp(prefix=".shardprop-predict-", dir=path.parent))
        self.parts = [self.folder / f"part-{rank}.parquet" for rank in range(ranks)]
        self.writers = [pq.ParquetWriter(part, schema) for part in self.parts]
        self.rows = 0

    def write(self, rank: int, table: pa.Table) -> None:
        self.writers[rank].write_table(table)
        self.rows += table.num_rows

    def finish(self) -> None:
        """Rank 1's rows after rank 0's, and so on; then the file at PATH."""
        first, *later = self.writers
        for writer, part in zip(later, self.parts[1:], strict=True):
            writer.close()
            with pq.ParquetFile(part) as parquet:
                for batch in parquet.iter_batches(SLICE_ROWS):
                    first.write_batch(batch)
        first.close()
        self.parts[0].replace(self.path)
        shutil.rmtree(self.folder, ignore_errors=True)

    def abort(self) -> None:
        for writer in self.writers:
            with contextlib.suppress(OSError):  # a full disk may be why: the files go anyway
                writer.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def check_out(out: Path) -> None:
    """PATH can be written, before any work: one ConfigError line otherwise."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; name the Parquet file to write")
    if out.suffix.lower() not in (".parquet", ".pq"):
        raise ConfigError(f"--out {out}: expected a .parquet file")
    check_writable(out.absolute().parent, "--out", "the output's folder")


def predict(
    model: str,
    data: str,
    out: str | Path,
    kind: str | None = None,
    keep: Sequence[str] = (),
    workers: int = 2,
    address: str | None = None,
    tracking_uri: str | None = None,
    progress: Progress | None = None,
    slice_rows: int = SLICE_ROWS,
    timeout: float = TIMEOUT,
    filesystem: dict[str, Any] | None = None,
) -> Scored:
    """Score every row of DATA with MODEL and write the predictions (`kind`: probabilities,
    labels or values; None: probabilities for a classifier, values for a regression) and the
    `keep` columns to `out` as Parquet, in input order. workers=0: in this process, no Ray.
    Bad input raises a UserError (one line) before any worker starts."""
    began = time.perf_counter()
    out = Path(out)
    check_out(out)
    loaded = load_model(model, tracking_uri)
    scorer = scoring_model(loaded.bundle)
    kind = kind or scorer.default_kind()
    scorer.check_kind(kind)
    plan = plan_scoring(data, scorer, kind, keep, workers, slice_rows, filesystem)
    kept = [schema_of(plan.source).field(name) for name in plan.keep]
    schema = pa.schema([*scorer.output_fields(kind), *kept])
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    output = OrderedOutput(out.absolute(), schema, len(plan.shards))
    tally = Tally(plan.total_rows, progress)
    try:
        if workers == 0:
            tally.start(0)
            score_here(plan, scorer, kind, output, tally)
        else:
            score_on_ray(plan, scorer, kind, output, tally, address, timeout)
    except BaseException:
        output.abort()
        raise
    finally:
        tally.stop()
    return Scored(
        out,
        output.rows,
        tuple(schema.names),
        len(plan.shards) if workers else 0,
        loaded.source,
        time.perf_counter() - began,
        tally.ended - tally.began,
        dict(tally.unseen),
    )


class Tally:
    """Rows written so far, values never seen in training, and the progress shown."""

    def __init__(self, total_rows: int, progress: Progress | None):
        self.total_rows = total_rows
        self.progress = progress
        self.done = 0
        self.unseen: dict[str, int] = {}
        self.began = self.ended = time.perf_counter()

    def start(self, workers: int) -> None:
        self.began = time.perf_counter()
        if self.progress is not None:
            self.progress.start(self.total_rows, workers)

    def add(self, rows: int, unseen: dict[str, int]) -> None:
        """A slice of `rows` written; `unseen`: its count of values not seen in training."""
        for name, count in unseen.items():
            self.unseen[name] = self.unseen.get(name, 0) + count
        self.done += rows
        if self.progress is not None:
            elapsed = time.perf_counter() - self.began
            self.progress.rows(self.done, self.done / elapsed if elapsed > 0 else 0.0)

    def finish(self, output: OrderedOutput) -> None:
        """The file in place: the end of the scoring (a Ray runtime's shutdown is not)."""
        output.finish()
        self.ended = time.perf_counter()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def score_here(
    plan: ScoringPlan, model: ScoringModel, kind: str, output: OrderedOutput, tally: Tally
) -> None:
    """--workers 0: the same worker, in this process, its slices one after another."""
    start, stop = plan.shards[0]
    worker = ScoringWorker(0, plan.source, model, kind, plan.keep, start, stop, plan.slice_rows)
    for lo, hi in plan.slices(0):
        table, unseen = worker.score(lo, hi)
        output.write(0, table)
        tally.add(table.num_rows, unseen)
    tally.finish(output)


def score_on_ray(
    plan: ScoringPlan,
    model: ScoringModel,
    kind: str,
    output: OrderedOutput,
    tally: Tally,
    address: str | None,
    timeout: float,
) -> None:
    """One ScoringWorker actor per range (1 CPU each), AHEAD slice calls queued on each; the
    results written as they come, each rank's in order. Every wait is bounded by `timeout`."""
    workers = len(plan.shards)
    cluster = ClusterConfig(workers=workers, address=address)
    started = connect_ray(address, workers, code_to_ship(cluster))
    import ray

    scorers = None
    try:
        scorers = RayScorers(ray, plan, model, kind, timeout)
        tally.start(workers)
        stream_slices(ray, scorers, plan, output, tally, timeout)
        tally.finish(output)
    finally:
        if scorers is not None:
            scorers.close()
        if started:
            ray.shutdown()


class RayScorers:
    """One ScoringWorker actor per range of rows. A worker whose process dies is replaced by
    a new actor for the same rows (at most MAX_REPLACEMENTS in a call): scoring a slice again
    gives the same predictions."""

    def __init__(self, ray: Any, plan: ScoringPlan, model: ScoringModel, kind: str, timeout: float):
        self.ray, self.plan, self.kind, self.timeout = ray, plan, kind, timeout
        self.actor = ray.remote(ScoringWorker).options(num_cpus=1, scheduling_strategy="SPREAD")
        # one object-store copy of the weights and of the source, shared by every worker
        self.source, self.model = ray.put(plan.source), ray.put(model)
        self.replaced = 0
        self.actors = [self.spawn(rank) for rank in range(len(plan.shards))]
        await_placed(ray, dict(enumerate(self.actors)), timeout)

    def spawn(self, rank: int) -> Any:
        start, stop = self.plan.shards[rank]
        return self.actor.remote(
            rank, self.source, self.model, self.kind, self.plan.keep, start, stop,
            self.plan.slice_rows, 1,
        )  # fmt: skip

    def replace(self, rank: int, error: Exception) -> None:
        reason = " ".join(str(error).split())[:200]
        self.replaced += 1
        start, stop = self.plan.shards[rank]
        if self.replaced > MAX_REPLACEMENTS:
            raise TrainingError(
                f"scoring worker {rank} (rows {start}..{stop}) was lost ({reason}); "
                f"{self.replaced} workers lost in all, more than {MAX_REPLACEMENTS}"
            )
        log.warning(
            "scoring worker %d (rows %d..%d) lost (%s): replacing it", rank, start, stop, reason
        )
        self.ray.kill(self.actors[rank])
        self.actors[rank] = self.spawn(rank)
        await_placed(self.ray, {rank: self.actors[rank]}, self.timeout)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors.clear()


def await_placed(ray: Any, actors: dict[int, Any], timeout: float) -> None:
    """These workers (rank: actor) placed and answering within `timeout` seconds, saying once
    what it waits for when that takes long; TrainingError naming the workers not placed."""
    pending = {handle.where.remote(): rank for rank, handle in actors.items()}
    deadline = time.monotonic() + timeout
    told = False
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrainingError(f"{unplaced(ray, pending)}, after waiting {timeout:.0f} s")
        wait = min(left, NOTICE_SECONDS)
        ready, _ = interruptible(ray.wait, list(pending), num_returns=len(pending), timeout=wait)
        for ref in ready:
            rank = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as error:
                raise TrainingError(f"scoring worker {rank} could not start: {error}") from None
        if pending and not told:
            told = True
            log.warning("%s; waiting up to %.0f s more", unplaced(ray, pending), left - wait)


def unplaced(ray: Any, pending: dict[Any, int]) -> str:
    free = {k: v for k, v in ray.available_resources().items() if k == "CPU"}
    ranks = ", ".join(map(str, sorted(pending.values())))
    return (
        f"scoring worker(s) {ranks} could not be placed: each needs CPU 1; the cluster has "
        f"{format_resources(free) or 'none of that'} free"
    )


def stream_slices(
    ray: Any,
    scorers: RayScorers,
    plan: ScoringPlan,
    output: OrderedOutput,
    tally: Tally,
    timeout: float,
) -> None:
    """Keep AHEAD slice calls queued on every worker; write each rank's results in order. A
    lost worker's replacement is asked again for every slice of its not yet written."""
    ranks = range(len(plan.shards))
    slices = [plan.slices(rank) for rank in ranks]
    asked = [0] * len(ranks)  # slices asked of each rank so far
    written = [0] * len(ranks)  # slices written of each rank so far
    # results that came before an earlier slice of their rank's: held until it comes
    arrived: list[dict[int, tuple[pa.Table, dict[str, int]]]] = [{} for _ in ranks]
    pending: dict[Any, tuple[int, int]] = {}  # ref: (rank, slice index)

    def ask(rank: int) -> None:
        flying = sum(1 for owner, _ in pending.values() if owner == rank)
        for _ in range(AHEAD - flying):
            if asked[rank] == len(slices[rank]):
                return
            lo, hi = slices[rank][asked[rank]]
            pending[scorers.actors[rank].score.remote(lo, hi)] = (rank, asked[rank])
            asked[rank] += 1

    for rank in ranks:
        ask(rank)
    while pending:
        ready, _ = interruptible(ray.wait, list(pending), num_returns=1, timeout=timeout)
        if not ready:
            late = sorted({rank for rank, _ in pending.values()})
            raise TrainingError(
                f"scoring worker(s) {', '.join(map(str, late))} scored no slice of "
                f"{plan.slice_rows:,} rows within {timeout:.0f} s"
            )
        for ref in ready:
            if ref not in pending:  # asked of a worker since replaced
                continue
            rank, index = pending.pop(ref)
            try:
                table, unseen = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                raise_user_error(error)
            except ray.exceptions.RayActorError as error:
                scorers.replace(rank, error)
                for other in [r for r, (owner, _) in pending.items() if owner == rank]:
                    del pending[other]
                arrived[rank].clear()
                asked[rank] = written[rank]
                ask(rank)
                continue
            arrived[rank][index] = (table, unseen)
            while written[rank] in arrived[rank]:
                table, unseen = arrived[rank].pop(written[rank])
                output.write(rank, table)
                tally.add(table.num_rows, unseen)
                written[rank] += 1
            ask(rank)
