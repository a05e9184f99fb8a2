"""MODEL as `shardprop predict` takes it: a run, a registered version, or a folder on disk.

Whatever the form, a model is its weights file and its meta JSON: `train --output DIR` writes
them as DIR/weights.npz and DIR/model.json, and the logged MLflow model carries the same two
files as its "weights" and "meta" artifacts. Runs and registered models are fetched with
MLflow's own resolution of `runs:/` and `models:/` URIs, after a look-up that names what is
not there in one line.
"""

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.models import Model

from shardprop.service.errors import ConfigError
from shardprop.service.tracking.serving import Bundle, load_bundle
from shardprop.service.tracking.store import check_store, resolve_tracking_uri, schema_lock
from shardprop.workers.data.source import one_line

RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids: 32 hex digits
MODEL_PATH = "model"  # where a run logs its model: runs:/<run id>/model
OUTPUT_FILES = ("weights.npz", "model.json")  # what `train --output DIR` writes
MLMODEL = "MLmodel"
FORMS = "a run id, runs:/RUN/model, models:/NAME/VERSION, models:/NAME@ALIAS or a folder"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score with, and where it came from, as a user would name it."""

    bundle: Bundle
    source: str


def model_uri(model: str) -> str | None:
    """The MLflow URI MODEL names; None when it names none (a folder, or nothing)."""
    if model.startswith(("runs:/", "models:/")):
        return model
    if RUN_ID.fullmatch(model):
        return f"runs:/{model}/{MODEL_PATH}"
    return None


def load_model(model: str, tracking_uri: str | None = None) -> LoadedModel:
    """The model MODEL names: a folder is read from disk; a run or registered model from the
    tracking store (default: as `train`'s). ConfigError, one line, when it is not there."""
    folder = Path(model).expanduser()
    uri = model_uri(model)
    if uri is None:
        if not folder.is_dir():
            raise ConfigError(f"MODEL {model}: no such folder; expected {FORMS}")
        return LoadedModel(load_folder(folder, model), str(folder))
    store = resolve_tracking_uri(tracking_uri)
    check_store(store, resuming=True)  # a sqlite file that is not there is not created
    try:
        with schema_lock(store):
            client = mlflow.MlflowClient(store)
        files = look_up(client, uri)
        with tempfile.TemporaryDirectory(prefix="shardprop-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=files, dst_path=tmp, tracking_uri=store, registry_uri=store
            )
            return LoadedModel(load_folder(Path(local), model), f"{uri} in {store}")
    except (mlflow.MlflowException, OSError) as error:
        raise ConfigError(f"MODEL {model}: {one_line(error)} (tracking store {store})") from None


def look_up(client: mlflow.MlflowClient, uri: str) -> str:
    """Where the files of the run or model version a URI names are, or one ConfigError line
    saying what is missing (MLflow's own errors on a download name neither)."""
    path = uri.split(":/", 1)[1].strip("/")
    try:
        if uri.startswith("runs:/"):
            client.get_run(path.split("/")[0])
            return uri
        name, _, rest = path.partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif rest:
            version = client.get_model_version(name, rest.split("/")[0])
        else:
            raise ConfigError(f"{uri}: name a version or an alias: models:/NAME/VERSION or @ALIAS")
        source = version.source
        if source.startswith("models:/"):  # a logged model: found in this store, by its id
            # MLflow resolves models:/<id> through the process-wide tracking URI instead
            source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
        return source
    except mlflow.MlflowException as error:
        raise ConfigError(f"MODEL {uri}: {one_line(error)}") from None


def load_folder(folder: Path, model: str) -> Bundle:
    """A model from `train --output`'s folder, or from an MLflow model's folder (MLmodel)."""
    if (folder / MLMODEL).is_file():
        weights, meta = mlflow_model_files(folder, model)
        return load_bundle(weights, meta)
    missing = [name for name in OUTPUT_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"MODEL {model}: folder {folder} has no {' or '.join(missing)} "
            "(a `train --output` folder) and no MLmodel file (an MLflow model)"
        )
    return load_bundle(folder / OUTPUT_FILES[0], folder / OUTPUT_FILES[1])


def mlflow_model_files(folder: Path, model: str) -> tuple[Path, Path]:
    """The weights and meta files of an MLflow model that shardprop logged, from its MLmodel."""
    artifacts = Model.load(folder).flavors.get("python_function", {}).get("artifacts") or {}
    try:
        weights, meta = (folder / artifacts[name]["path"] for name in ("weights", "meta"))
    except (KeyError, TypeError):
        raise ConfigError(
            f"MODEL {model}: not a shardprop model (its MLmodel lists no weights and meta "
            "artifacts)"
        ) from None
    return weights, meta
