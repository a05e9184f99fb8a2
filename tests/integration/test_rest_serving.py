"""`mlflow models serve` on a trained model, as a user serves it: a real server process, real
HTTP requests, the answers compared with the network's own predictions."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shardprop.service.config import load_config
from shardprop.service.data.datasets import make_dataset
from shardprop.service.tracking.serving import load_bundle, predict_frame
from shardprop.service.training.run import train
from tests.processes import BIN, answers, free_port, stop_group

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SERVE_SECONDS = 180  # the server imports MLflow, downloads the model and loads it first


@pytest.fixture(scope="module")
def trained(new_store, tmp_path_factory):
    """The penguins config (strings, missing values, three classes), trained in-process into
    a sqlite store."""
    folder = tmp_path_factory.mktemp("rest")
    data = folder / "penguins.parquet"
    make_dataset("penguins", data)
    uri = new_store(folder)
    config = load_config(
        ROOT / "configs/penguins.yaml",
        ["train.steps=40", "train.checkpoint_every=0"],
        {"data.path": str(data), "cluster.workers": 0, "tracking.uri": uri},
    )
    result = train(config, output=folder / "out")
    bundle = load_bundle(folder / "out" / "weights.npz", folder / "out" / "model.json")
    return {"folder": folder, "uri": uri, "run_id": result.run_id, "bundle": bundle, "data": data}


@pytest.fixture(scope="module")
def server(trained):
    """The scoring server on a free port; killed with its process group at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = trained["folder"] / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                f"runs:/{trained['run_id']}/model",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            # the server starts `uvicorn` by name: from this environment, as an activated one
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": trained["uri"],
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVE_SECONDS
        while not answers(f"{url}/ping"):
            if process.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with {process.returncode}"
                    if process.poll() is not None
                    else f"did not answer /ping within {SERVE_SECONDS} s"
                )
                pytest.fail(f"mlflow models serve {state}; its output:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(process)


def rows(trained, count: int = 12) -> pd.DataFrame:
    """Raw rows as a user sends them: strings, numbers, a missing sex and a missing number."""
    frame = pd.read_parquet(trained["data"]).head(count)
    frame = frame.loc[:, list(trained["bundle"].features)]
    frame.loc[0, "sex"] = None
    frame.loc[1, "body_mass_g"] = np.nan
    return frame


def post(url: str, frame: pd.DataFrame, params: dict | None = None) -> tuple[int, dict]:
    """POST the rows as dataframe_split (missing values as JSON null); the status and body."""
    split = frame.astype(object).where(frame.notna(), None).to_dict(orient="split")
    payload: dict = {"dataframe_split": {"columns": split["columns"], "data": split["data"]}}
    if params is not None:
        payload["params"] = params
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload, allow_nan=False).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_served_probabilities_are_the_networks(trained, server):
    frame = rows(trained)
    assert frame.isna().any(axis=None)  # missing values are part of the request
    status, body = post(server, frame)
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    want = predict_frame(trained["bundle"], frame)
    assert list(served.columns) == list(want.columns) == ["Adelie", "Chinstrap", "Gentoo"]
    np.testing.assert_allclose(served.to_numpy(), want.to_numpy(), rtol=0, atol=1e-12)


def test_served_labels_with_params_are_the_class_names(trained, server):
    frame = rows(trained)
    status, body = post(server, frame, {"output": "labels"})
    assert status == 200, body
    want = predict_frame(trained["bundle"], frame, "labels")
    assert body["predictions"] == list(want)
    assert set(body["predictions"]) <= {"Adelie", "Chinstrap", "Gentoo"}


def test_an_unknown_output_is_a_400_naming_the_value_and_the_choices(trained, server):
    status, body = post(server, rows(trained), {"output": "nonsense"})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "output 'nonsense': expected one of probabilities, labels" in body["message"]
    assert "unexpected error" not in body["message"]


def test_a_missing_feature_column_is_a_400_naming_it(trained, server):
    status, body = post(server, rows(trained).drop(columns="bill_length_mm"))
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "missing inputs ['bill_length_mm']" in body["message"]
    assert "unexpected error" not in body["message"]


def test_words_in_a_number_column_are_a_400_naming_the_column(trained, server):
    frame = rows(trained).astype({"flipper_length_mm": object})
    frame.loc[2, "flipper_length_mm"] = "long"
    status, body = post(server, frame)
    assert status == 400, body
    assert "flipper_length_mm" in body["message"]
    assert "unexpected error" not in body["message"]
