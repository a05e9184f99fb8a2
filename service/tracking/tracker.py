"""Everything MLflow for one training run, through an explicit client and run id.

Nothing here uses MLflow's global state (tracking URI, active run): every call names the
store and the run, so a caller's own MLflow session is left as it was.

Per-step metrics never touch the store on the training loop's thread: `log_metrics` appends
to a queue and a writer thread sends it with `log_batch` every `flush_seconds`, then uploads
the checkpoints saved since. The store's cost is per metric row, so writing more often saves
nothing; the interval only decides how much of a short run's writing lands after its loop.
The same thread renews the run's lease (lease.py), so a run is held by one live process.

A store that fails (read-only, full, gone) raises StoreError from every call that writes:
one line, and the caller still has its weights on local disk to point to.

What the page shows (names, params in force, the description) is decided in page.py.
"""

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import wraps
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

import mlflow
import mlflow.pyfunc
import pandas as pd
import pyarrow as pa
import yaml
from mlflow import MlflowClient
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE

from shardprop.service.config import FLUSH_SECONDS
from shardprop.service.data.lineage import InputRecord
from shardprop.service.errors import ConfigError
from shardprop.service.shipped_code import stage
from shardprop.service.tracking.lease import LEASE_TAG, RENEW_SECONDS, Lease
from shardprop.service.tracking.page import code_tags, json_default, render
from shardprop.service.tracking.serving import load_bundle, predict_frame
from shardprop.service.tracking.store import (
    StoreError,
    check_store,
    resolve_tracking_uri,
    schema_lock,
    sqlite_path,
)
from shardprop.workers.data.source import one_line
from shardprop.workers.errors import UserError

MODEL_PATH = "model"  # the model is at runs:/<run_id>/model, whatever its name
DEFAULT_MODEL_NAME = "shardprop-model"
FINGERPRINTS = "checkpoints/fingerprints.json"  # {"step-NNNNNN": weights sha256}
REGISTERED_DESCRIPTION = "Networks trained by shardprop; each version's description says how."
MODEL_CODE = Path(__file__).with_name("model_code.py")
MODEL_REQUIREMENTS = ("mlflow", "numpy", "pandas", "threadpoolctl")
INPUT_EXAMPLE_ROWS = 5
# MLflow's limits per log_batch call, and a param value length every server accepts
# (older tracking servers refuse more than 500 characters; MLflow 3 takes 6000)
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARAM_VALUE_LIMIT = 500
TAG_VALUE_LIMIT = 5000
STATUSES = ("FINISHED", "FAILED", "KILLED")
# what a store that fails raises: MLflow's own errors (a database's, a server's answer) and
# the OS's (files, sockets; requests' errors are OSErrors)
STORE_ERRORS = (mlflow.MlflowException, OSError)

log = logging.getLogger(__name__)
# MLflow logs each failed database call with its traceback, then raises it: the tracker says
# it in one line (set after MLflow's import, which configures its loggers)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
T = TypeVar("T")
P = ParamSpec("P")


class TrackingError(UserError):
    """A tracking store that cannot take this run (e.g. the experiment is deleted)."""


class RunHeldError(TrackingError):
    """The run is being trained by another live process: resuming it too would mix two runs."""


class RunFinishedError(TrackingError):
    """The run ended well: there is nothing to resume."""


def _store_call(method: Callable[P, T]) -> Callable[P, T]:
    """A store's failure, raised by `method`, as one StoreError line."""

    @wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except STORE_ERRORS as error:
            raise StoreError(store_reason(error)) from error

    return call


def store_reason(error: BaseException) -> str:
    """The first cause in one line ("database or disk is full", "[Errno 111] Connection
    refused"): MLflow's own message around it is a page of SQL or of retry counts."""
    while error.__cause__ is not None:
        error = error.__cause__
    return one_line(error)


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _sqlite_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database file, not into the working dir."""
    db = sqlite_path(tracking_uri)
    return None if db is None else (db.resolve().parent / "mlruns").as_uri()


def _open_client(tracking_uri: str, resuming: bool = False) -> MlflowClient:
    """A client of the store. MLflow creates a new sqlite database's tables when the client
    opens it: under a lock, so that processes starting together do not race on them. A run to
    resume is never looked for in a store created for the occasion (check_store refuses)."""
    if resuming:
        check_store(tracking_uri, resuming=True)
    with schema_lock(tracking_uri):
        return MlflowClient(tracking_uri)


def register_model(
    client: MlflowClient,
    run_id: str,
    model_id: str,
    name: str,
    tags: Mapping[str, str],
    description: str,
) -> str:
    """A run's logged model as a new version of the registered model `name` (created when
    missing); returns models:/<name>/<version>."""
    try:
        client.create_registered_model(name, description=REGISTERED_DESCRIPTION)
    except mlflow.MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # the model's own location, not models:/<model_id>: MLflow's database registry looks
    # that up through the process's global tracking URI (upstream TODO in its store)
    location = client.get_logged_model(model_id).artifact_location
    registered = client.create_model_version(
        name, source=location, run_id=run_id, tags=dict(tags), description=description,
        model_id=model_id,
    )  # fmt: skip
    return f"models:/{name}/{registered.version}"


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=_sqlite_artifact_location(tracking_uri)
            )
        except mlflow.MlflowException:
            # another process created it between our lookup and create
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted in {tracking_uri}; restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
            "or choose another experiment name"
        )
    return experiment.experiment_id


def stage_model_code(folder: Path) -> list[str]:
    """The model's code_paths: all of shardprop.workers (the math), but of shardprop.service
    only the pyfunc class, so the model does not drag the CLI, Ray or the trainer along; it
    imports them under the installed names (`shardprop.…`), which a user's own packages
    cannot clash with."""
    return [str(stage(folder, ("workers", "service/tracking/serving.py")))]


def save_model(
    folder: Path,
    config: Model,
    artifacts: Mapping[str, str | os.PathLike],
    signature: ModelSignature,
    example: pd.DataFrame,
) -> None:
    """Write the pyfunc model into `folder`, its code staged beside it (see stage_model_code)."""
    mlflow.pyfunc.save_model(
        folder,
        python_model=os.fspath(MODEL_CODE),
        artifacts={name: os.fspath(path) for name, path in artifacts.items()},
        code_paths=stage_model_code(folder.with_name("code")),
        mlflow_model=config,
        signature=signature,
        input_example=example,
        # listed, not inferred: inference loads the model in a subprocess
        pip_requirements=[f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS],
    )


class Tracker:
    """One MLflow run: params, buffered metrics, artifacts, the model, and its final status."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        tracking_uri: str,
        flush_seconds: float = FLUSH_SECONDS,
        lease: Lease | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        # (step, timestamp ms, {name: value}); deque append/popleft are thread-safe
        self._pending: deque[tuple[int, int, dict[str, float]]] = deque()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # write now rather than at the next tick
        # checkpoint folders to upload, by the writer thread after the metrics before them
        self._artifacts: deque[tuple[Path, str]] = deque()  # (checkpoint folder, its sha256)
        self._fingerprints: dict[str, str] = {}  # of the uploaded checkpoints, by folder
        self._fingerprints_due = False  # uploaded since FINGERPRINTS was last written
        self.model_id: str | None = None  # the logged model, once log_model is done
        self._flush_seconds = flush_seconds
        self._writer_error: Exception | None = None
        self._last_logged: tuple[int, int, dict[str, float]] | None = None  # the newest step
        self._logged_through = -1  # steps up to this one are in the store already
        self._ended = False
        self._lease = lease  # this process's hold on the run, renewed by the writer thread
        self._renew_at = time.monotonic() + RENEW_SECONDS
        self._writer = threading.Thread(
            target=self._write_loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True
        )
        self._writer.start()

    @classmethod
    @_store_call
    def start(
        cls,
        uri: str | None,
        experiment: str,
        run_name: str | None,
        tags: Mapping[str, Any] | None = None,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> Self:
        """Open a new run in `experiment` (created if missing) on the store at `uri`.

        Queued metrics are written every `flush_seconds` by a background thread. Runs of the
        experiment whose process died while RUNNING are marked FAILED first. The run is tagged
        with the code that trains it (page.code_tags).
        """
        tracking_uri = resolve_tracking_uri(uri)
        client = _open_client(tracking_uri)
        experiment_id = _experiment_id(client, experiment, tracking_uri)
        _fail_abandoned_runs(client, experiment_id, tracking_uri)
        lease = Lease.ours()
        # user, source and git commit, as mlflow.start_run would record them
        run_tags = resolve_tags(
            code_tags()
            | {key: str(value) for key, value in (tags or {}).items()}
            | {LEASE_TAG: lease.tag()}
        )
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        return cls(client, run.info.run_id, experiment_id, tracking_uri, flush_seconds, lease)

    @classmethod
    @_store_call
    def reopen(cls, uri: str | None, run_id: str, flush_seconds: float = FLUSH_SECONDS) -> Self:
        """Continue an existing run (left RUNNING by a killed coordinator, or KILLED/FAILED):
        it is RUNNING again, held by this process, and steps it already has metrics for are
        not logged twice. Raises RunHeldError while another live process holds it,
        RunFinishedError for a run that ended well, ConfigError or TrackingError for a store
        or run that is not there."""
        tracking_uri = resolve_tracking_uri(uri)
        client = _open_client(tracking_uri, resuming=True)
        run = _get_run(client, run_id, tracking_uri)
        _refuse_held(run)
        if run.info.status == "FINISHED":
            raise RunFinishedError(f"run {run_id} is FINISHED: nothing to resume")
        lease = Lease.ours()
        # MLflow has no compare-and-set on a tag (a conditional set_tag would close this): two
        # resumes on two hosts in the same instant can both take the run
        client.set_tag(run_id, LEASE_TAG, lease.tag())
        client.update_run(run_id, status="RUNNING")
        if "error" in run.data.tags:  # why it stopped last time: no longer true of it
            client.delete_tag(run_id, "error")
        for key, value in code_tags().items():  # the code that goes on with it
            client.set_tag(run_id, key, value)
        logged = client.get_metric_history(run_id, "loss")
        tracker = cls(client, run_id, run.info.experiment_id, tracking_uri, flush_seconds, lease)
        tracker._logged_through = max((point.step for point in logged), default=-1)
        tracker._fingerprints = tracker._uploaded_fingerprints()
        return tracker

    # --- params and tags -------------------------------------------------------------------

    @_store_call
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Values are stringified and cut to PARAM_VALUE_LIMIT characters."""
        items = [
            Param(key, _truncate(render(value), PARAM_VALUE_LIMIT)) for key, value in params.items()
        ]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=list(chunk))

    @_store_call
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [
            RunTag(key, _truncate(render(value), TAG_VALUE_LIMIT)) for key, value in tags.items()
        ]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=list(chunk))

    @_store_call
    def log_config(self, resolved: Mapping[str, Any], params: Mapping[str, Any]) -> None:
        """The resolved config as config.yaml (every key: what a resume reads), and `params`
        (page.in_force: the settings that act on the run, flattened, and the run's sizes)."""
        self.log_params(params)
        self.log_dict(resolved, "config.yaml")

    @_store_call
    def set_note(self, text: str) -> None:
        """The run's description, shown at the top of its page (Markdown)."""
        self.set_tags({MLFLOW_RUN_NOTE: text})

    @_store_call
    def log_lineage(self, record: InputRecord, shards: list[dict]) -> None:
        """The input dataset as the run's input (what mlflow.log_input records, logged
        through our client) and the shard plan as shards.json."""
        source_type, source = dataset_source(record.uri)
        schema = Schema([ColSpec(_mlflow_type(kind), name) for name, kind in record.columns])
        entity = Dataset(
            name=record.name,
            digest=record.digest,
            source_type=source_type,
            source=json.dumps(source),
            schema=json.dumps({"mlflow_colspec": schema.to_dict()}),  # as MLflow's datasets do
        )
        inputs = [DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except mlflow.MlflowException:
            # the store adds a dataset it has not seen, and another run adding the same one
            # at that moment (a sweep's trials side by side) fails this insert; once more,
            # the store has it and links it (upstream fix: an idempotent log_inputs)
            self.client.log_inputs(self.run_id, inputs)
        self.log_dict({"shards": shards}, "shards.json")

    # --- metrics ---------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Queue one step's metrics. The store is not touched here: this runs every step."""
        if self._ended:
            raise RuntimeError(f"run {self.run_id} has ended; its metrics can no longer change")
        if step <= self._logged_through:
            return  # a resumed run recomputes these steps: the store has them already
        self._last_logged = (step, int(time.time() * 1000), dict(metrics))
        self._pending.append(self._last_logged)

    @_store_call
    def flush(self) -> None:
        """Write every queued metric now; raises if the store refuses them."""
        self._write_pending()
        self._writer_error = None  # whatever the writer failed on has been written now

    def download_checkpoints(self, destination: Path) -> Path:
        """The run's uploaded checkpoints, for a resume where its output folder is gone."""
        destination.mkdir(parents=True, exist_ok=True)
        try:
            return Path(self.client.download_artifacts(self.run_id, "checkpoints", destination))
        except (mlflow.MlflowException, OSError):
            return destination / "checkpoints"  # none uploaded: an empty place to look

    def log_checkpoint(self, folder: Path, weights_sha256: str) -> None:
        """Upload a checkpoint folder under checkpoints/ and add its weights' fingerprint to
        checkpoints/fingerprints.json, from the writer thread at its next tick (the folder is
        on local disk already: the upload is for a resume elsewhere)."""
        self._artifacts.append((folder, weights_sha256))

    def _upload_checkpoints(self) -> None:
        while self._artifacts:
            folder, weights_sha256 = self._artifacts[0]
            self.client.log_artifact(self.run_id, os.fspath(folder), "checkpoints")
            self._fingerprints[folder.name] = weights_sha256
            self._fingerprints_due = True
            self._artifacts.popleft()
        if self._fingerprints_due:  # one file, rewritten: the checkpoints uploaded so far
            text = json.dumps(dict(sorted(self._fingerprints.items())), indent=1)
            self.client.log_text(self.run_id, text + "\n", FINGERPRINTS)
            self._fingerprints_due = False

    def _uploaded_fingerprints(self) -> dict[str, str]:
        """FINGERPRINTS as the run has it ({} before its first checkpoint upload)."""
        with tempfile.TemporaryDirectory(prefix="shardprop-fingerprints-") as tmp:
            try:
                path = self.client.download_artifacts(self.run_id, FINGERPRINTS, tmp)
            except (mlflow.MlflowException, OSError):
                return {}
            return json.loads(Path(path).read_text(encoding="utf-8"))

    def _write_loop(self) -> None:
        flush_at = time.monotonic() + self._flush_seconds
        while not self._stop.is_set():
            due = min(flush_at, self._renew_at) if self._lease else flush_at
            woken = self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            flushing = woken or time.monotonic() >= flush_at
            try:
                self._renew_lease()
                if flushing:
                    flush_at = time.monotonic() + self._flush_seconds
                    self._write_pending()
                    self._upload_checkpoints()
            # a thread boundary: an error here would vanish with the thread; the queues keep
            # the metrics and checkpoints, and the next tick, flush() or end() retries them
            except Exception as error:
                if self._writer_error is None:
                    log.warning("MLflow store unreachable, will retry: %s", store_reason(error))
                self._writer_error = error
            else:
                if self._writer_error is not None and flushing:
                    log.warning("MLflow store reachable again: queued metrics written")
                    self._writer_error = None

    def _renew_lease(self) -> None:
        """One tag write every RENEW_SECONDS, whatever flush_seconds is."""
        if self._lease is None or time.monotonic() < self._renew_at:
            return
        lease = self._lease.renewed()
        self.client.set_tag(self.run_id, LEASE_TAG, lease.tag())
        self._lease = lease
        self._renew_at = time.monotonic() + RENEW_SECONDS

    def _write_pending(self) -> None:
        with self._write_lock:
            while self._pending:
                taken: list[tuple[int, int, dict[str, float]]] = []
                batch: list[Metric] = []
                while self._pending and len(batch) < METRICS_PER_BATCH:
                    entry = self._pending.popleft()
                    taken.append(entry)
                    step, timestamp, values = entry
                    batch.extend(
                        Metric(key, float(value), timestamp, step) for key, value in values.items()
                    )
                try:
                    for chunk in _chunks(batch, METRICS_PER_BATCH):
                        self.client.log_batch(self.run_id, metrics=list(chunk))
                except BaseException:
                    self._pending.extendleft(reversed(taken))
                    raise

    # --- artifacts -------------------------------------------------------------------------

    @_store_call
    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, os.fspath(local_path), artifact_path)

    @_store_call
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    @_store_call
    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """YAML for .yaml/.yml (keys in the given order, lists inline), JSON otherwise."""
        if Path(artifact_file).suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(dict(d), sort_keys=False, default_flow_style=None)
        else:
            text = json.dumps(d, indent=2, default=json_default)
        self.log_text(text, artifact_file)

    # --- the model -------------------------------------------------------------------------

    @_store_call
    def log_model(
        self,
        weights_path: str | os.PathLike,
        meta: Mapping[str, Any],
        input_example: pd.DataFrame,
        name: str = DEFAULT_MODEL_NAME,
    ) -> ModelInfo:
        """Log the pyfunc model named `name` (page.model_name): weights + meta JSON, loaded
        from code; it loads as models:/<model_id> and as runs:/<run_id>/model.

        The signature and input example are built from the first rows of `input_example`
        (feature columns only, so the label is not asked for at predict time).
        """
        self.flush()  # the model owns the metrics of the run's last step: they must be in
        with tempfile.TemporaryDirectory(prefix="shardprop-model-") as tmp:
            meta_path = Path(tmp) / "meta.json"
            meta_path.write_text(
                json.dumps(dict(meta), indent=2, default=json_default), encoding="utf-8"
            )
            bundle = load_bundle(weights_path, meta_path)  # a bad meta fails here, clearly
            example = input_example.head(INPUT_EXAMPLE_ROWS)
            predicted = predict_frame(bundle, example)  # names a missing column before MLflow
            example = example.loc[:, list(bundle.features)]
            outputs = infer_signature(None, predicted, params={"output": "probabilities"})
            signature = ModelSignature(input_schema(example), outputs.outputs, outputs.params)
            # mlflow.pyfunc.log_model taking a run_id and tracking_uri would replace what follows
            model = self.client.create_logged_model(
                self.experiment_id,
                name=name,
                source_run_id=self.run_id,
                params=self.client.get_run(self.run_id).data.params,
            )
            config = Model(
                artifact_path=model.artifact_location,
                run_id=self.run_id,
                model_uuid=model.model_id,
                model_id=model.model_id,
            )
            try:
                folder = Path(tmp) / "model"
                artifacts = {"weights": weights_path, "meta": meta_path}
                save_model(folder, config, artifacts, signature, example)
                self.client.log_model_artifacts(model.model_id, os.fspath(folder))
                # runs:/<run_id>/model finds a logged model only by the name "model": a copy
                # in the run's artifacts keeps that URI for a model with a name of its own
                self.client.log_artifacts(self.run_id, os.fspath(folder), MODEL_PATH)
                self._link_model(model.model_id)
            except BaseException:
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                raise
            model = self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            self.model_id = model.model_id
            return config.get_model_info(model)

    def _link_model(self, model_id: str) -> None:
        """The model is the run's output at its last step, and owns that step's headline
        metrics (as mlflow.pyfunc.log_model records them, so the UI shows them on the model's
        page; the timing sections stay the run's)."""
        step, timestamp, values = self._last_logged or (0, 0, {})
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step=step)])
        metrics = [
            Metric(key, float(value), timestamp, step, model_id=model_id)
            for key, value in values.items()
            if "/" not in key
        ]
        if not metrics:
            return
        self.client.log_batch(self.run_id, metrics=metrics)

    @_store_call
    def log_final(
        self,
        weights_path: Path,
        meta: Mapping[str, Any],
        input_example: pa.Table,
        model_name: str = DEFAULT_MODEL_NAME,
    ) -> None:
        """The end of a run: weights/final.npz and the model (the example: a few raw rows)."""
        with tempfile.TemporaryDirectory() as tmp:
            final = shutil.copy(weights_path, Path(tmp) / "final.npz")
            self.log_artifact(final, "weights")
        self.log_model(weights_path, meta, input_example.to_pandas(), model_name)

    @_store_call
    def register_model(self, name: str, tags: Mapping[str, str], description: str) -> str:
        """The run's logged model as a new version of the registered model `name` (created
        when missing), with `tags` and `description`; returns models:/<name>/<version>."""
        if self.model_id is None:
            raise RuntimeError(f"run {self.run_id} has logged no model to register")
        return register_model(self.client, self.run_id, self.model_id, name, tags, description)

    # --- the end ---------------------------------------------------------------------------

    @_store_call
    def end(self, status: str = "FINISHED") -> None:
        """Write the queued metrics, then mark the run FINISHED, FAILED or KILLED. Idempotent."""
        if status not in STATUSES:
            raise ValueError(
                f"unknown run status {status!r}; expected one of {', '.join(STATUSES)}"
            )
        if self._ended:
            return
        self._ended = True
        self._stop.set()
        self._wake.set()
        self._writer.join()
        try:
            self._write_pending()
            self._upload_checkpoints()
        finally:
            self.client.set_terminated(self.run_id, status)
            if self._lease is not None:
                self.client.set_tag(self.run_id, LEASE_TAG, self._lease.released().tag())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """FINISHED on normal exit, KILLED on Ctrl-C, FAILED on any other exception."""
        if exc is None:
            self.end("FINISHED")
            return
        # a stop the user asked for (Ctrl-C, SIGTERM) is KILLED; anything else FAILED
        status = (
            "KILLED" if isinstance(exc, KeyboardInterrupt) else getattr(exc, "run_status", "FAILED")
        )
        # a process boundary: the exception in flight matters more than a store that fails
        # now, which is told in one line (it is often why the run failed)
        try:
            if status == "FAILED":
                self.set_tags(
                    {"error": f"{type(exc).__name__}: {exc}", **getattr(exc, "run_tags", {})}
                )
        except Exception as error:
            log.warning("could not tag MLflow run %s: %s", self.run_id, store_reason(error))
        try:
            self.end(status)
        except Exception as error:
            log.warning(
                "could not mark MLflow run %s as %s: %s", self.run_id, status, store_reason(error)
            )


def dataset_source(uri: str) -> tuple[str, dict[str, Any]]:
    """The input dataset's source type and source, named here: MLflow's resolver finds two
    source types for a local path and warns that it picked one."""
    if uri.startswith("synthetic:"):
        return "code", {"tags": {"generator": uri}}
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a path, file://, a Windows drive
        return "local", {"uri": uri}
    if scheme in ("http", "https"):
        return "http", {"url": uri}
    if scheme == "memory":  # rows handed over in memory (the Python API)
        return "code", {"tags": {"uri": uri}}
    return scheme, {"uri": uri}  # s3, gs, hdfs, abfss...: as MLflow names their sources


def input_schema(example: pd.DataFrame) -> Schema:
    """The model's input columns from the example's types. Integer columns are `long`, as
    MLflow would infer them; floats are `double`, which takes float32 and float64 alike.
    Built here because MLflow's inference warns about integer columns and missing values,
    which input_example (training/run.py) has already typed as float64 where they occur."""
    arrow = pa.Schema.from_pandas(example, preserve_index=False)
    return Schema([ColSpec(_signature_type(str(field.type)), field.name) for field in arrow])


def _signature_type(arrow_type: str) -> str:
    if arrow_type.startswith(("int", "uint")):
        return "long"
    if arrow_type in ("float", "halffloat") or arrow_type.startswith(("double", "decimal")):
        return "double"
    return {"bool": "boolean"}.get(arrow_type, "string")


def _mlflow_type(arrow_type: str) -> str:
    """The MLflow column type for an arrow type's name (schemas here come from metadata)."""
    if arrow_type.startswith(("int", "uint")):
        return "long"
    if arrow_type in ("float", "halffloat"):
        return "float"
    if arrow_type.startswith(("double", "decimal")):
        return "double"
    return {"bool": "boolean"}.get(arrow_type, "string")


def _get_run(client: MlflowClient, run_id: str, tracking_uri: str) -> Any:
    try:
        return client.get_run(run_id)
    except mlflow.MlflowException:
        raise TrackingError(f"no run {run_id!r} in the tracking store {tracking_uri}") from None


def resume_command(run_id: str, tracking_uri: str) -> str:
    return f"shardprop resume {run_id} --tracking-uri '{tracking_uri}'"


def _refuse_held(run: Any) -> None:
    """RunHeldError if the run is RUNNING and another live process holds its lease."""
    lease = Lease.from_tags(run.data.tags)
    if run.info.status == "RUNNING" and lease is not None and lease.alive():
        until = time.strftime("%H:%M:%S", time.localtime(lease.until))
        raise RunHeldError(
            f"run {run.info.run_id} is being trained by {lease} (its lease runs to {until}, "
            "renewed while it lives); stop that process first, or let it finish"
        )


def _fail_abandoned_runs(client: MlflowClient, experiment_id: str, tracking_uri: str) -> None:
    """RUNNING runs of the experiment whose process is gone (its lease lapsed, or its pid is
    dead on this host) are marked FAILED, with how to resume them. Runs without a lease (an
    older shardprop, another tool's) are left alone."""
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    for found in running:
        lease = Lease.from_tags(found.data.tags)
        if lease is None or lease.alive():
            continue
        run = client.get_run(found.info.run_id)  # a resume may have taken it since the search
        lease = Lease.from_tags(run.data.tags)
        if run.info.status != "RUNNING" or lease is None or lease.alive():
            continue
        run_id = run.info.run_id
        client.set_tag(
            run_id,
            "error",
            f"its process ({lease}) stopped renewing its lease: it was killed or lost; "
            f"go on with: {resume_command(run_id, tracking_uri)}",
        )
        client.set_terminated(run_id, "FAILED")
        log.warning("run %s: its process (%s) is gone; marked FAILED", run_id, lease)


@dataclass(frozen=True)
class RecalledRun:
    """What `shardprop resume` needs to know of a run before anything starts."""

    run_id: str
    tracking_uri: str
    status: str  # RUNNING (its process died), FINISHED, FAILED or KILLED
    config: dict[str, Any]  # the resolved config it logged; {} for a FINISHED run without one
    output: Path | None  # the folder it wrote its checkpoints under
    holder: str | None  # the process that last held it ("process 123 on host"), if any


def recall_run(uri: str | None, run_id: str) -> RecalledRun:
    """The run to resume, read without touching it.

    Raises ConfigError for a store that is unreachable, missing (a sqlite file that is not
    there is not created) or not writable; TrackingError for no such run, or one without its
    config; RunHeldError while another live process trains it.
    """
    tracking_uri = resolve_tracking_uri(uri)
    client = _open_client(tracking_uri, resuming=True)
    run = _get_run(client, run_id, tracking_uri)
    _refuse_held(run)
    status = run.info.status
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    except STORE_ERRORS:
        if status != "FINISHED":
            raise TrackingError(f"run {run_id} has no config.yaml: it cannot be resumed") from None
        text = "{}"
    if run.data.tags.get("shardprop.input") == "memory":
        raise ConfigError(
            f"run {run_id} trained on rows given in memory, which a resume cannot read again; "
            "start a new run from its last weights (--init-weights, or init_weights= in Python)"
        )
    output = run.data.tags.get("shardprop.output")
    lease = Lease.from_tags(run.data.tags)
    return RecalledRun(
        run_id,
        tracking_uri,
        status,
        yaml.safe_load(text),
        Path(output) if output else None,
        str(lease) if lease else None,
    )
