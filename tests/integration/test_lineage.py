"""Each run records what it was trained on: the input dataset and the shard plan."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from shardprop.service.config import load_config
from shardprop.service.data.plan import write_table
from shardprop.service.training.run import train
from shardprop.workers.data.synthetic import SyntheticSpec, generate


@pytest.fixture
def parquet_folder(tmp_path):
    table = generate(SyntheticSpec("moons", rows=900, seed=1), 0, 900)
    folder = tmp_path / "moons"
    for i, (lo, hi) in enumerate([(0, 250), (250, 700), (700, 900)]):
        write_table(table.slice(lo, hi - lo), folder / f"part-{i}.parquet", row_group_rows=100)
    return folder


def run(folder, uri, workers):
    config = load_config(
        None,
        [f"data.path={folder}", "train.steps=3", "train.checkpoint_every=0"],
        {"cluster.workers": workers, "tracking.uri": uri},
    )
    return train(config)


def test_run_records_its_input_dataset_and_shard_plan(ray_session, parquet_folder, tracking_uri):
    result = run(parquet_folder, tracking_uri, 2)
    client = MlflowClient(tracking_uri)
    (dataset_input,) = client.get_run(result.run_id).inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "moons"
    assert str(parquet_folder) in dataset.source
    schema = json.loads(dataset.schema)["mlflow_colspec"]
    assert [(c["name"], c["type"]) for c in schema] == [
        ("x0", "double"),
        ("x1", "double"),
        ("y", "long"),
    ]
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    shards_json = client.download_artifacts(result.run_id, "shards.json")
    shards = json.loads(Path(shards_json).read_text())["shards"]
    assert [s["rows"] for s in shards] == [[0, 512], [512, 900]]  # 4 blocks of 128 rows each
    assert [s["rank"] for s in shards] == [0, 1]
    assert all(s["pid"] > 0 and s["host"] for s in shards)
    assert [(f["file"].rsplit("/", 1)[-1], f["rows"]) for f in shards[1]["files"]] == [
        ("part-1.parquet", [262, 450]),
        ("part-2.parquet", [0, 200]),
    ]

    # the same data gives the same digest; changed data a different one
    again = run(parquet_folder, tracking_uri, 0)
    digest = client.get_run(again.run_id).inputs.dataset_inputs[0].dataset.digest
    assert digest == dataset.digest
    write_table(
        generate(SyntheticSpec("moons", rows=10, seed=9), 0, 10), parquet_folder / "part-3.parquet"
    )
    changed = run(parquet_folder, tracking_uri, 0)
    assert client.get_run(changed.run_id).inputs.dataset_inputs[0].dataset.digest != digest


def test_logged_model_can_answer_with_the_original_labels(tmp_path, tracking_uri):
    import mlflow
    import pyarrow as pa

    table = generate(SyntheticSpec("blobs", rows=300, noise=0.1, seed=2, classes=3), 0, 300)
    names = np.array(["cat", "dog", "eel"])[table["y"].to_numpy()]
    table = table.set_column(2, "y", pa.array(names))
    path = write_table(table, tmp_path / "blobs.parquet")
    config = load_config(
        None,
        [
            f"data.path={path}",
            "train.steps=80",
            "train.optimizer=adam",
            "train.learning_rate=0.05",
            "train.checkpoint_every=0",
        ],
        {"cluster.workers": 0, "tracking.uri": tracking_uri},
    )
    result = train(config)
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    frame = table.select(["x0", "x1"]).to_pandas()
    labels = model.predict(frame, params={"output": "labels"})
    probabilities = model.predict(frame)
    assert list(probabilities.columns) == ["cat", "dog", "eel"]
    assert list(labels) == list(probabilities.idxmax(axis=1))
    assert np.mean(np.asarray(labels) == names) > 0.95
