"""The run configuration: YAML + `--set key=value` overrides, validated by pydantic.

Every key has a default, so `{}` is a valid config. Errors name the dotted key and, for an
unknown key, suggest the closest known one.
"""

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shardprop.service.errors import ConfigError
from shardprop.workers.chaos import InjectedFailure

log = logging.getLogger(__name__)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticConfig(Section):
    name: Literal["moons", "circles", "blobs", "regression"] = "moons"
    rows: int = Field(20_000, gt=0)
    noise: float = Field(0.2, ge=0)
    seed: int = 0
    features: int | None = Field(None, gt=0)
    classes: int | None = Field(None, ge=2)


class FilesystemConfig(Section):
    """Options of the filesystem behind a URI path; unset ones come from the environment
    (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ... as pyarrow reads them)."""

    endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO or another S3 server
    region: str | None = None
    anonymous: bool | None = None


class DataConfig(Section):
    path: str | None = None
    filesystem: FilesystemConfig = Field(default_factory=FilesystemConfig)
    synthetic: SyntheticConfig | None = None
    label: str = "y"
    features: list[str] | None = None  # null: every numeric and categorical column
    categorical: list[str] = Field(default_factory=list)  # integer columns to one-hot too
    max_categories: int = Field(100, ge=2)  # levels of one categorical column
    categories_over_max: Literal["error", "other"] = "error"  # other: rare ones become one
    # a null or NaN in a used column: stop the run, leave the row out, or fill it (numbers:
    # the training mean; categories: a "missing" level)
    missing: Literal["error", "drop", "impute"] = "error"
    task: Literal["binary", "multiclass", "regression", "auto"] = "auto"
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    standardize: bool = True
    standardize_target: bool = True  # regression: train on (y - mean) / std

    @model_validator(mode="after")
    def one_source(self) -> "DataConfig":
        if self.path is not None and self.synthetic is not None:
            raise ValueError(
                "data.path and data.synthetic are both set: keep one (a --set data.path=... "
                "replaces the config's data.synthetic, and the other way round)"
            )
        if self.path is None and self.synthetic is None:
            self.synthetic = SyntheticConfig()
        return self


class ModelConfig(Section):
    hidden: list[int] = Field(default_factory=lambda: [32, 32])
    activation: Literal["relu", "leaky_relu", "tanh", "sigmoid"] = "relu"
    init: Literal["he", "xavier", "normal"] = "he"
    dtype: Literal["float64", "float32"] = "float64"

    @model_validator(mode="after")
    def positive_widths(self) -> "ModelConfig":
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"model.hidden: layer widths must be >= 1, got {self.hidden}")
        return self


LBFGS_TOLERANCE = 1e-4  # scikit-learn's tol


class TrainConfig(Section):
    steps: int = Field(500, gt=0)
    learning_rate: float = Field(0.5, gt=0)
    # lbfgs: quasi-Newton with a line search, no learning rate (docs/training.md)
    optimizer: Literal["gd", "momentum", "adam", "lbfgs"] = "gd"
    momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    epsilon: float = Field(1e-8, gt=0)
    history_size: int = Field(10, gt=0)  # lbfgs: the curvature pairs it remembers
    # the learning rate over the steps of gd, momentum and adam: constant, cosine down to
    # min_learning_rate, or times decay_factor every decay_every steps; warmup_steps ramp
    # it up linearly first, with any schedule
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    decay_every: int | None = Field(None, gt=0)
    decay_factor: float = Field(0.1, gt=0, le=1)
    min_learning_rate: float = Field(0.0, ge=0)
    # stop when the training loss has not gone down by `tolerance` for n_iter_no_change
    # steps in a row, as scikit-learn does; null: run every step. auto: 1e-4 with lbfgs,
    # null with the others, whose single full-batch step may gain less and still be going
    tolerance: float | Literal["auto"] | None = Field("auto", ge=0)
    n_iter_no_change: int = Field(10, gt=0)
    target_loss: float | None = None  # stop once the training loss is at most this
    l2: float = Field(0.0, ge=0)
    seed: int = 0  # initial weights and the validation split
    checkpoint_every: int = Field(50, ge=0)
    eval_every: int = Field(10, gt=0)  # steps between validation metrics
    patience: int | None = Field(None, gt=0)  # stop after this many evals without a better val_loss
    # exact: row blocks summed along one fixed tree, the same bits for any worker count;
    # rank_order: each worker's rows in one sum, the workers' sums added in rank order
    reduction: Literal["exact", "rank_order"] = "exact"
    block_rows: int | None = Field(None, gt=0)  # rows per block of `exact`; null: by row count
    # a loss this many times its best, and above where the run started, fails the run as a
    # non-finite one does; null: only non-finite losses do
    divergence_factor: float | None = Field(1e3, gt=1)

    @model_validator(mode="after")
    def settings_that_depend_on_others(self) -> "TrainConfig":
        if self.tolerance == "auto":
            self.tolerance = LBFGS_TOLERANCE if self.optimizer == "lbfgs" else None
        if self.schedule == "step" and self.decay_every is None:
            raise ValueError("train.schedule: step needs train.decay_every (steps between decays)")
        if self.schedule == "cosine" and self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"train.min_learning_rate ({self.min_learning_rate:g}) is above "
                f"train.learning_rate ({self.learning_rate:g})"
            )
        return self


# old cluster keys -> what the warning says instead
DEPRECATED_CLUSTER_KEYS = {
    "compiled_graph": "use cluster.transport (compiled_graph: false is transport: plain)",
    "direct_steps": "no longer used, ignored (the step's transport is cluster.transport)",
    "allreduce": "no longer used, ignored (the workers' sums are added on the coordinator)",
}


class ClusterConfig(Section):
    workers: int = Field(2, ge=0)
    address: str | None = None
    cpus_per_worker: int = Field(1, gt=0)
    max_worker_failures: int = Field(3, ge=0)  # lost workers replaced before the run fails
    # elastic runs: a lost worker with no room for its replacement within replace_timeout
    # leaves the run on the others (at least min_workers); room again grows it back towards
    # max_workers, at a step boundary. null: cluster.workers (a fixed size)
    min_workers: int | None = Field(None, ge=1)
    max_workers: int | None = Field(None, ge=1)
    # seconds a lost worker's replacement may take to be placed before an elastic run goes
    # on without it; null: start_timeout
    replace_timeout: float | None = Field(None, gt=0)
    # seconds a worker may take to be placed and to load its rows (new and replacement
    # workers): long enough for a cold cluster to add a node
    start_timeout: float = Field(600.0, gt=0)
    # seconds; a worker silent longer is lost. null: 10x the longest step so far, at least
    # start_timeout
    step_timeout: float | None = Field(None, gt=0)
    inject_failure: str | None = None  # chaos: "worker=R,step=S[,times=N][,when=...]"
    # spread: shards over as many nodes as have room (Ray's SPREAD); pack: fill nodes in turn
    placement: Literal["spread", "pack"] = "spread"
    worker_resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources
    # send workers/ to the nodes with the job (runtime_env py_modules); auto: when joining a
    # cluster, whose nodes may have another version installed, or none
    ship_code: Literal["auto", "always", "never"] = "auto"
    # how a step's parameters and sums travel: through a Ray Compiled Graph, or as plain
    # actor calls (the fallback, also taken where a graph cannot be compiled)
    transport: Literal["compiled", "plain"] = "compiled"

    @model_validator(mode="before")
    @classmethod
    def deprecated_keys(cls, raw: Any) -> Any:
        """Old transport keys: still accepted, with a one-line warning naming the new one."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for key, message in DEPRECATED_CLUSTER_KEYS.items():
            if key in raw:
                value = raw.pop(key)
                log.warning("cluster.%s is deprecated: %s", key, message)
                if key == "compiled_graph" and value is False:
                    raw.setdefault("transport", "plain")
        return raw

    @field_validator("inject_failure")
    @classmethod
    def parses(cls, text: str | None) -> str | None:
        if text is not None:
            InjectedFailure.parse(text)  # raises ValueError with what is wrong
        return text

    @model_validator(mode="after")
    def injection_needs_workers(self) -> "ClusterConfig":
        if self.inject_failure and self.workers == 0:
            raise ValueError("cluster.inject_failure kills a worker process: needs workers >= 1")
        return self

    @model_validator(mode="after")
    def sizes_in_order(self) -> "ClusterConfig":
        if self.smallest > self.workers:
            raise ValueError(
                f"cluster.min_workers: {self.smallest} is more than cluster.workers "
                f"({self.workers}), the workers a run starts with"
            )
        if self.largest < self.workers:
            raise ValueError(
                f"cluster.max_workers: {self.largest} is less than cluster.workers "
                f"({self.workers}), the workers a run starts with"
            )
        return self

    @property
    def smallest(self) -> int:
        """The fewest workers an elastic run goes on with (in-process: none, it is one)."""
        return (self.min_workers or self.workers) if self.workers else 0

    @property
    def largest(self) -> int:
        """The most workers an elastic run grows to."""
        return (self.max_workers or self.workers) if self.workers else 0


# seconds between the tracker's writes of queued metrics and checkpoint uploads
FLUSH_SECONDS = 10.0


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None
    experiment: str = "shardprop"
    run_name: str | None = None
    flush_seconds: float = Field(FLUSH_SECONDS, gt=0)  # and everything left at the run's end
    # the run's model becomes a new version of this registered model
    register_model: str | None = None
    parent_run: str | None = None  # the MLflow run this one is nested under (a sweep's)
    tags: dict[str, str] = {}  # set on the run as it opens

    @field_validator("register_model")
    @classmethod
    def registrable(cls, name: str | None) -> str | None:
        # the registry's own rule, checked before the run rather than after it
        if name is not None and (not name.strip() or any(c in name for c in "/:")):
            raise ValueError(f"tracking.register_model: {name!r} is empty or holds '/' or ':'")
        return name

    @model_validator(mode="after")
    def registry_needs_tracking(self) -> "TrackingConfig":
        if self.register_model and not self.enabled:
            raise ValueError(
                "tracking.register_model: the registry is MLflow's; drop --no-tracking "
                "(tracking.enabled: false) or the model name"
            )
        return self


class SweepConfig(Section):
    """What `shardprop sweep` tries (service/sweep/space.py) and how it picks the best."""

    # config key: a grid ("0.01,0.1,1", or a YAML list) or a distribution ("loguniform(1e-4,1)")
    params: dict[str, str | list[Any]] = Field(default_factory=dict)
    samples: int = Field(1, gt=0)  # the grid this many times, distributions drawn each time
    metric: str = "loss"  # any metric a run logs; its last value ranks the trials
    mode: Literal["min", "max"] = "min"
    max_concurrent: int | None = Field(None, gt=0)  # trials at once; null: as many as fit
    # asha: Ray Tune's ASHA stops trials whose metric lags (reported 20 times a trial)
    scheduler: Literal["fifo", "asha"] = "fifo"


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)  # read by `shardprop sweep` only

    @model_validator(mode="after")
    def patience_needs_validation(self) -> "Config":
        if self.train.patience and not self.data.validation_fraction:
            raise ValueError(
                "train.patience: early stopping watches val_loss; "
                "set data.validation_fraction > 0 too"
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """The config as logged: every key, defaults filled in."""
        return self.model_dump(mode="json")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", error)
        raise ConfigError(f"{path}:{where} not valid YAML ({problem})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...)")
    return raw


def section_at(path: list[str]) -> type[BaseModel]:
    """The pydantic model of the section at a dotted path (Optional sections unwrapped)."""
    section: type[BaseModel] = Config
    for part in path:
        annotation = section.model_fields[part].annotation
        section = next(
            arg
            for arg in getattr(annotation, "__args__", (annotation,))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        )
    return section


def describe(error: dict[str, Any]) -> str:
    """One line for one pydantic error, naming the dotted key."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        known = list(section_at(loc[:-1]).model_fields)
        close = difflib.get_close_matches(loc[-1], known, n=1)
        if close:
            return f"{key}: unknown key; did you mean {'.'.join([*loc[:-1], close[0]])!r}?"
        return f"{key}: unknown key; known keys here: {', '.join(known)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error") and message.startswith(key):
        return message
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) and value is not None else ""
    return f"{key}: {message}{shown}"


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = child
    node[leaf] = value


# the two data sources, each with the other's key
DATA_SOURCES = {"data.path": "synthetic", "data.synthetic": "path"}


def set_source(raw: dict[str, Any], key: str, value: Any) -> None:
    """set_key; a data source set after the config's other one replaces it, so that
    `--set data.path=x.csv` trains on the file whatever set the config used."""
    for source, other in DATA_SOURCES.items():
        if value is not None and (key == source or key.startswith(f"{source}.")):
            data = raw.get("data")
            if isinstance(data, dict):
                data.pop(other, None)
    set_key(raw, key, value)


def load_config(
    path: Path | None, overrides: Sequence[str] = (), flags: dict[str, Any] | None = None
) -> Config:
    """The file, then `--set` overrides (YAML values), then dedicated flags (taken as given)."""
    return config_from(read_yaml(path) if path is not None else {}, flags, overrides)


def config_from(
    raw: dict[str, Any], flags: dict[str, Any] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """A config from a mapping (a file's, or a run's logged config.yaml), then overrides."""
    for assignment in overrides:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.steps=100")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: take the text itself
        set_source(raw, key.strip(), value)
    for key, value in (flags or {}).items():
        if value is not None:
            set_source(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("\n".join(describe(e) for e in error.errors())) from None
