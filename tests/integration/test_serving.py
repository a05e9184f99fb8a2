"""The logged MLflow model: loaded from code, predicts what Network.predict does on raw columns."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from shardprop.service.tracking.serving import load_bundle, predict_frame
from shardprop.service.tracking.tracker import Tracker
from shardprop.workers.errors import DataError, UserError
from shardprop.workers.network.backprop import Architecture, Network
from shardprop.workers.network.params import Layout, init_params, save_weights

FEATURES = ["x0", "x1", "x2", "x3"]
MEAN = np.array([10.0, -3.0, 0.5, 100.0])
STD = np.array([2.0, 0.1, 1.0, 50.0])
NETWORKS = {  # task: (sizes, activation, classes)
    "binary": ((4, 6, 1), "tanh", ["no", "yes"]),
    "multiclass": ((4, 6, 5, 3), "relu", [3, 7, 11]),
    "regression": ((4, 6, 2), "sigmoid", None),
}


def write_model(folder: Path, task: str) -> tuple[Path, dict, np.ndarray]:
    """Weights with non-zero biases, and the meta the trainer would write beside them."""
    sizes, activation, classes = NETWORKS[task]
    layout = Layout(sizes)
    theta = init_params(layout, "xavier", 7, np.float64)
    biases = ~layout.weight_mask
    theta[biases] = np.random.default_rng(1).normal(scale=0.5, size=biases.sum())
    weights = save_weights(folder / f"{task}.npz", layout, theta)
    meta = {
        "sizes": list(sizes),
        "activation": activation,
        "task": task,
        "dtype": "float64",
        "features": FEATURES,
        "label": "y",
        "mean": MEAN.tolist(),
        "std": STD.tolist(),
        "classes": classes,
    }
    return weights, meta, theta


def raw_rows(m: int, seed: int = 0) -> pd.DataFrame:
    """Raw, unstandardised feature columns, plus the label the model must not ask for."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(MEAN, STD, size=(m, len(FEATURES))), columns=FEATURES)
    return frame.assign(y=rng.integers(0, 2, m))


def expected(task: str, theta: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
    """Network.predict on inputs standardised here, independently of service.serving."""
    sizes, activation, _ = NETWORKS[task]
    X = ((frame[FEATURES].to_numpy() - MEAN) / STD).T  # (n0, m)
    return Network(Architecture(sizes, activation, task)).predict(theta, X)  # (n_L, m)


@pytest.fixture(scope="module")
def logged(new_store, tmp_path_factory):
    """One run per task in one store, each with its logged model; MLflow pointed at the store.

    Logging models is the slow part of these tests, so it happens once for the module.
    """
    folder = tmp_path_factory.mktemp("serving")
    uri = new_store(folder)
    saved_sys_path = list(sys.path)
    runs = {}
    for task in NETWORKS:
        weights, meta, theta = write_model(folder, task)
        with Tracker.start(uri, "serving", task) as tracker:
            tracker.log_metrics(1, {"loss": 1.0})
            tracker.log_metrics(2, {"loss": 0.5})
            info = tracker.log_model(weights, meta, raw_rows(20, seed=5))
        runs[task] = {"run_id": tracker.run_id, "theta": theta, "meta": meta, "info": info}
    mlflow.set_tracking_uri(uri)  # load_model("runs:/...") reads the global tracking URI
    yield {"uri": uri, "folder": folder, "runs": runs}
    mlflow.set_tracking_uri(None)
    sys.path[:] = saved_sys_path  # every load_model prepends the model's code dir


def load(logged: dict, task: str) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(f"runs:/{logged['runs'][task]['run_id']}/model")


def test_binary_model_gives_the_positive_class_probability(logged):
    frame = raw_rows(50)
    predicted = load(logged, "binary").predict(frame)
    want = expected("binary", logged["runs"]["binary"]["theta"], frame)[0]
    assert isinstance(predicted, np.ndarray) and predicted.shape == (50,)
    np.testing.assert_allclose(predicted, want, rtol=0, atol=1e-12)
    assert predicted.min() > 0 and predicted.max() < 1


def test_multiclass_model_gives_a_probability_column_per_class(logged):
    frame = raw_rows(50)
    predicted = load(logged, "multiclass").predict(frame)
    want = expected("multiclass", logged["runs"]["multiclass"]["theta"], frame)
    assert isinstance(predicted, pd.DataFrame)
    assert list(predicted.columns) == ["3", "7", "11"]
    np.testing.assert_allclose(predicted.to_numpy(), want.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0, atol=1e-12)


def test_regression_model_gives_one_column_per_output(logged):
    frame = raw_rows(50)
    predicted = load(logged, "regression").predict(frame)
    want = expected("regression", logged["runs"]["regression"]["theta"], frame)
    assert isinstance(predicted, np.ndarray) and predicted.shape == (50, 2)
    np.testing.assert_allclose(predicted, want.T, rtol=0, atol=1e-12)


def test_single_output_regression_is_one_dimensional(tmp_path):
    layout = Layout((4, 3, 1))
    theta = init_params(layout, "he", 0, np.float64)
    meta = write_model(tmp_path, "regression")[1] | {"sizes": [4, 3, 1]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    bundle = load_bundle(save_weights(tmp_path / "w.npz", layout, theta), tmp_path / "meta.json")
    frame = raw_rows(7)
    X = ((frame[FEATURES].to_numpy() - MEAN) / STD).T
    want = Network(Architecture((4, 3, 1), "sigmoid", "regression")).predict(theta, X)[0]
    predicted = predict_frame(bundle, frame)
    assert predicted.shape == (7,)
    np.testing.assert_allclose(predicted, want, rtol=0, atol=1e-12)


def model_dir(logged: dict, task: str) -> Path:
    uri = f"runs:/{logged['runs'][task]['run_id']}/model"
    return Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=logged["uri"]))


def test_model_is_built_from_code_and_never_unpickled(logged):
    folder = model_dir(logged, "multiclass")
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "model_code.py"
    assert "python_model" not in flavor  # the key a pickled PythonModel is loaded from
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert sorted(flavor["artifacts"]) == ["meta", "weights"]
    code = folder / "code" / "shardprop"
    assert not (code / "__init__.py").exists()  # a namespace package, as when installed
    assert (code / "workers" / "network" / "backprop.py").is_file()
    assert sorted(p.name for p in (code / "service").iterdir()) == ["__init__.py", "tracking"]
    assert sorted(p.name for p in (code / "service" / "tracking").iterdir()) == [
        "__init__.py",
        "serving.py",
    ]


def test_signature_and_input_example_name_the_features_only(logged):
    info = logged["runs"]["binary"]["info"]
    assert info.signature.inputs.input_names() == FEATURES  # the label is not an input
    folder = model_dir(logged, "binary")
    example = json.loads((folder / "input_example.json").read_text())
    assert example["columns"] == FEATURES


def test_model_belongs_to_the_run_and_keeps_it_running_until_the_end(logged):
    client = MlflowClient(logged["uri"])
    run = client.get_run(logged["runs"]["binary"]["run_id"])
    assert run.info.status == "FINISHED"
    assert [output.model_id for output in run.outputs.model_outputs] == [
        logged["runs"]["binary"]["info"].model_id
    ]
    # the model was logged after the metrics: both points are in the history, once each
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_missing_column_is_named(logged):
    frame = raw_rows(3).drop(columns="x2")
    with pytest.raises(mlflow.MlflowException, match=r"missing inputs \['x2'\]"):
        load(logged, "binary").predict(frame)
    meta_path = logged["folder"] / "binary-meta.json"
    meta_path.write_text(json.dumps(logged["runs"]["binary"]["meta"]))
    bundle = load_bundle(logged["folder"] / "binary.npz", meta_path)
    with pytest.raises(DataError, match=r"missing feature column.*'x2'"):
        predict_frame(bundle, frame)


def test_model_loads_where_shardprop_is_not_installed(logged, tmp_path):
    """A fresh interpreter without the editable install finds shardprop only in the model."""
    frame = raw_rows(10, seed=3)
    np.save(tmp_path / "rows.npy", frame[FEATURES].to_numpy())  # exact, unlike JSON
    script = f"""
import importlib.util, sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})  # -S: no .pth files, no editable install
assert importlib.util.find_spec("shardprop") is None
import mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri({logged["uri"]!r})
model = mlflow.pyfunc.load_model("runs:/{logged["runs"]["binary"]["run_id"]}/model")
frame = pd.DataFrame(np.load({str(tmp_path / "rows.npy")!r}), columns={FEATURES!r})
np.save({str(tmp_path / "out.npy")!r}, model.predict(frame))
import shardprop.workers as workers
print(workers.__file__)
"""
    done = subprocess.run(
        [sys.executable, "-S", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "/code/shardprop/workers/" in done.stdout  # imported from the model's own copy
    want = expected("binary", logged["runs"]["binary"]["theta"], frame)[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=0, atol=1e-12)


def test_meta_that_does_not_fit_is_refused(tmp_path):
    weights, meta, _ = write_model(tmp_path, "multiclass")
    cases = {
        "n0": (meta | {"features": FEATURES[:3]}, r"3 features \(3 inputs\) for an input layer"),
        "classes": (meta | {"classes": [1, 2]}, "2 classes for a multiclass model"),
        "std": (meta | {"std": [1.0, 2.0]}, "'std' must be null or 4 finite numbers"),
        "keys": ({k: v for k, v in meta.items() if k != "mean"}, r"missing key.*mean"),
        "sizes": (meta | {"sizes": [4, 7, 3]}, r"'W1' has shape \(6, 4\); expected \(7, 4\)"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=message):
            load_bundle(weights, path)


def test_constant_column_is_centred_not_divided_by_zero(tmp_path):
    weights, meta, theta = write_model(tmp_path, "binary")
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta | {"std": [2.0, 0.0, 1.0, 50.0]}))
    frame = raw_rows(5).assign(x1=-3.0)
    predicted = predict_frame(load_bundle(weights, path), frame)
    X = ((frame[FEATURES].to_numpy() - MEAN) / [2.0, 1.0, 1.0, 50.0]).T
    want = Network(Architecture((4, 6, 1), "tanh", "binary")).predict(theta, X)[0]
    np.testing.assert_allclose(predicted, want, rtol=0, atol=1e-12)


def test_a_users_own_service_package_still_imports_beside_the_model(logged, tmp_path):
    """The model's code imports as shardprop.*: a user's top-level `service` and `workers`
    packages import before and after load_model, and stay the user's."""
    for name in ("service", "workers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    frame = raw_rows(10, seed=4)
    script = f"""
import sys
import service, workers
assert service.OWNER == "user service" and workers.OWNER == "user workers"
import mlflow, pandas as pd
mlflow.set_tracking_uri({logged["uri"]!r})
model = mlflow.pyfunc.load_model("runs:/{logged["runs"]["binary"]["run_id"]}/model")
print(len(model.predict(pd.DataFrame({frame[FEATURES].to_dict("list")!r}))))
import importlib
for name in ("service", "workers"):
    module = importlib.import_module(name)
    assert module.OWNER == f"user {{name}}", (name, module.__file__)
    assert sys.modules[name] is module
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "10"


def run_python(script: str, cwd: Path) -> str:
    """The script in a fresh interpreter (a fresh sys.path and import state); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_installed_shardprop_still_trains_after_the_model_is_loaded(logged, tmp_path):
    """The model ships part of shardprop; when it is the installed code, the installed package
    is imported, so the parts the model does not ship still import in the same process."""
    frame = raw_rows(10, seed=6)
    script = f"""
from pathlib import Path
import mlflow, pandas as pd
mlflow.set_tracking_uri({logged["uri"]!r})
model = mlflow.pyfunc.load_model("runs:/{logged["runs"]["binary"]["run_id"]}/model")
print(len(model.predict(pd.DataFrame({frame[FEATURES].to_dict("list")!r}))))
from shardprop.service.config import config_from
from shardprop.service.training.run import train
import shardprop.service, shardprop.workers
print(shardprop.service.__file__)
print(shardprop.workers.__file__)
config = config_from({{
    "data": {{"synthetic": {{"rows": 200}}}},
    "train": {{"steps": 3, "checkpoint_every": 0}},
    "cluster": {{"workers": 0}},
    "tracking": {{"enabled": False}},
}})
result = train(config, output=Path({str(tmp_path / "out")!r}))
print(int(result.final["rows"]))
"""
    lines = run_python(script, tmp_path).strip().splitlines()
    assert lines[0] == "10"
    assert all("/code/shardprop/" not in line for line in lines[1:3]), lines
    assert lines[-1] == "200"
    assert (tmp_path / "out" / "weights.npz").is_file()


def test_a_model_whose_code_differs_runs_its_own_copy(logged, tmp_path):
    """Another version's model keeps its own code: the shipped copy is imported, and predicts."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir(logged, "binary"), folder)
    marker = folder / "code" / "shardprop" / "workers" / "__init__.py"
    marker.write_text(marker.read_text() + "\n# another version of shardprop\n")
    frame = raw_rows(10, seed=7)
    np.save(tmp_path / "rows.npy", frame[FEATURES].to_numpy())
    script = f"""
import mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model({str(folder)!r})
frame = pd.DataFrame(np.load({str(tmp_path / "rows.npy")!r}), columns={FEATURES!r})
np.save({str(tmp_path / "out.npy")!r}, model.predict(frame))
import shardprop.workers
print(shardprop.workers.__file__)
"""
    stdout = run_python(script, tmp_path)
    assert stdout.strip() == str(marker)
    want = expected("binary", logged["runs"]["binary"]["theta"], frame)[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=0, atol=1e-12)
