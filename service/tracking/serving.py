"""The MLflow pyfunc model: a table of raw feature columns in, the network's predictions out.

A model is two files beside each other: the .npz weights and a JSON meta file (sizes,
activation, task, dtype, feature names, standardisation, classes). The pyfunc model is logged
as code (model_code.py), so loading it runs this source and reads arrays and JSON: nothing is
unpickled. The forward pass is the workers' Network.predict; this module only turns a table
into X, and the output rows into what a caller of `predict` expects.
"""

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa

from shardprop.workers.data.columns import NUMERIC, Column, inputs, width_of
from shardprop.workers.data.source import one_line
from shardprop.workers.errors import DataError, UserError
from shardprop.workers.network.backprop import TASKS, Architecture, Network
from shardprop.workers.network.params import Layout, load_weights

log = logging.getLogger(__name__)

META_KEYS = ("sizes", "activation", "task", "dtype", "features", "label", "mean", "std", "classes")


class ModelMetaError(UserError):
    """A meta file that is missing, unreadable or does not fit its weights."""


@dataclass(frozen=True)
class Bundle:
    """Everything needed to predict from raw columns: network, parameters, how to read a table."""

    network: Network
    theta: np.ndarray
    features: tuple[str, ...]
    mean: np.ndarray | None  # (n0, 1)
    scale: np.ndarray | None  # (n0, 1), the std with zeros replaced by 1
    classes: tuple[Any, ...] | None
    columns: tuple[Column, ...] = ()  # how each raw column becomes inputs
    target: tuple[float, float] | None = None  # regression: (mean, std) the outputs are in

    @property
    def task(self) -> str:
        return self.network.arch.task


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The meta JSON, with every key of the contract present."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ModelMetaError(f"{path}: no such model meta file") from None
    except (OSError, ValueError) as error:
        raise ModelMetaError(f"{path}: not a readable JSON meta file ({error})") from None
    if not isinstance(meta, dict):
        raise ModelMetaError(f"{path}: expected a JSON object with keys {', '.join(META_KEYS)}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ModelMetaError(f"{path}: missing key(s) {', '.join(missing)}")
    return meta


def _column(path: str | os.PathLike, meta: dict[str, Any], key: str, n0: int) -> np.ndarray | None:
    if meta[key] is None:
        return None
    values = np.asarray(meta[key], dtype=np.float64)
    if values.shape != (n0,) or not np.all(np.isfinite(values)):
        raise ModelMetaError(f"{path}: {key!r} must be null or {n0} finite numbers, one a feature")
    return values.reshape(n0, 1)


def bundle_from_meta(
    weights_path: str | os.PathLike, meta: dict[str, Any], meta_path: str | os.PathLike = "meta"
) -> Bundle:
    """Check the meta against itself and the weights file, then load both."""
    sizes = tuple(int(n) for n in meta["sizes"])
    features = tuple(str(name) for name in meta["features"])
    n0, n_out = sizes[0], sizes[-1]
    try:  # a model saved before categorical columns has numeric ones only
        columns = tuple(Column.from_json(c) for c in meta.get("columns") or ()) or tuple(
            Column(name) for name in features
        )
    except DataError as error:
        raise ModelMetaError(f"{meta_path}: {error}") from None
    if width_of(columns) != n0:
        raise ModelMetaError(
            f"{meta_path}: {len(features)} features ({width_of(columns)} inputs) for an input "
            f"layer of {n0} units"
        )
    target = meta.get("target")
    if target is not None and (len(target) != 2 or not np.all(np.isfinite(target))):
        raise ModelMetaError(f"{meta_path}: 'target' must be null or [mean, std]")
    if meta["task"] not in TASKS:
        raise ModelMetaError(
            f"{meta_path}: unknown task {meta['task']!r}; expected one of {', '.join(TASKS)}"
        )
    classes = None if meta["classes"] is None else tuple(meta["classes"])
    expected_classes = {"binary": 2, "multiclass": n_out}.get(meta["task"])
    if classes is not None and len(classes) != expected_classes:
        raise ModelMetaError(
            f"{meta_path}: {len(classes)} classes for a {meta['task']} model "
            f"with {n_out} outputs; expected {expected_classes}"
        )
    if meta["task"] == "binary" and n_out != 1:
        raise ModelMetaError(f"{meta_path}: a binary model has 1 output unit, not {n_out}")
    try:
        arch = Architecture(sizes, meta["activation"], meta["task"])
    except ValueError as error:
        raise ModelMetaError(f"{meta_path}: {error}") from None
    _, theta = load_weights(weights_path, Layout(sizes), meta["dtype"])
    std = _column(meta_path, meta, "std", n0)
    return Bundle(
        # one thread: a served batch is small, and a pool per loaded model is not worth it
        network=Network(arch, theta.dtype, threads=1),
        theta=theta,
        features=features,
        mean=_column(meta_path, meta, "mean", n0),
        # a constant column has std 0; it is centred and left unscaled, as scikit-learn does
        scale=None if std is None else np.where(std == 0, 1.0, std),
        classes=classes,
        columns=columns,
        target=None if target is None else (float(target[0]), float(target[1])),
    )


def load_bundle(weights_path: str | os.PathLike, meta_path: str | os.PathLike) -> Bundle:
    """Load a model from its weights file and meta file."""
    return bundle_from_meta(weights_path, read_meta(meta_path), meta_path)


def features_of(bundle: Bundle, frame: pd.DataFrame) -> np.ndarray:
    """The network's inputs (n0, m) in float64, read by name from a table of raw columns:
    categories one-hot, missing values filled as in training, then standardised."""
    missing = [name for name in bundle.features if name not in frame.columns]
    if missing:
        raise DataError(
            f"input is missing feature column(s) {', '.join(map(repr, missing))}; "
            f"the model reads {', '.join(bundle.features)}"
        )
    for column in bundle.columns:
        values = frame[column.name]
        numeric = pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        if column.kind == NUMERIC and not numeric:
            raise DataError(
                f"feature column {column.name!r} has dtype {values.dtype}; expected numbers"
            )
    try:
        table = pa.Table.from_pandas(frame.loc[:, list(bundle.features)], preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"input columns cannot be read as a table: {one_line(error)}") from None
    X, unseen = inputs(bundle.columns, bundle.mean, bundle.scale, table)
    for name, count in unseen.items():
        log.warning("column %r: %d value(s) not seen in training encode as all zeros", name, count)
    return X


OUTPUTS = ("probabilities", "labels")


def predict_frame(
    bundle: Bundle, frame: pd.DataFrame, output: str = "probabilities"
) -> np.ndarray | pd.DataFrame:
    """Predictions for the rows of `frame`; rows with a missing value predict NaN.

    binary: P(classes[1]) per row, 1-d. multiclass: a table with one probability column per
    class, named str(class). regression: 1-d for one output, (m, n_L) otherwise.
    output="labels": for classification, the predicted class as the original label.
    """
    if output not in OUTPUTS:
        raise DataError(f"output {output!r}: expected one of {', '.join(OUTPUTS)}")
    A = bundle.network.predict(bundle.theta, features_of(bundle, frame))  # (n_L, m)
    if output == "labels" and bundle.task != "regression":
        classes = np.asarray(bundle.classes if bundle.classes is not None else range(len(A)))
        index = (A[0] > 0.5).astype(int) if bundle.task == "binary" else A.argmax(axis=0)
        return classes[index]
    if bundle.task == "binary":
        return A[0]
    if bundle.task == "multiclass":
        classes = bundle.classes if bundle.classes is not None else range(A.shape[0])
        return pd.DataFrame(A.T, columns=[str(c) for c in classes], index=frame.index)
    if bundle.target is not None:  # trained on standardised targets: back to the label's units
        A = A * bundle.target[1] + bundle.target[0]
    return A[0] if A.shape[0] == 1 else A.T


class ShardpropModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a Bundle; logged as code by model_code.py."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self._bundle = load_bundle(context.artifacts["weights"], context.artifacts["meta"])
        # Network keeps per-batch buffers between calls; a server may call from threads
        self._lock = threading.Lock()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray | pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        output = (params or {}).get("output", "probabilities")
        try:
            with self._lock:
                return predict_frame(self._bundle, model_input, output)
        except UserError as error:
            # MLflow's scoring server answers an MlflowException with its code (400 here) and
            # message; any other exception becomes a generic "unexpected error"
            raise mlflow.MlflowException.invalid_parameter_value(str(error)) from None
