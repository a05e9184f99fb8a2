"""The validation split depends on the rows only, never on the worker count."""

import numpy as np
import pytest

from shardprop.service.config import load_config
from shardprop.service.errors import ConfigError, DataError
from shardprop.service.training.early_stop import EarlyStopping
from shardprop.service.training.run import train
from shardprop.workers.data.split import validation_mask


def test_a_rows_side_depends_on_its_index_and_the_seed_only():
    whole = validation_mask(0, 10_000, 0.25, seed=3)
    assert whole.mean() == pytest.approx(0.25, abs=0.02)
    pieces = np.concatenate(
        [
            validation_mask(a, b, 0.25, 3)
            for a, b in [(0, 1), (1, 3333), (3333, 3333), (3333, 10_000)]
        ]
    )
    assert np.array_equal(pieces, whole)
    assert not np.array_equal(validation_mask(0, 10_000, 0.25, seed=4), whole)
    assert not validation_mask(0, 100, 0.0, 3).any()


def test_early_stopping_keeps_the_best_and_waits_patience_evaluations():
    stopper = EarlyStopping(patience=2)
    assert not stopper.update(10, 0.5, np.array([1.0]))
    assert not stopper.update(20, 0.4, np.array([2.0]))
    assert not stopper.update(30, 0.45, np.array([3.0]))
    assert stopper.update(40, 0.41, np.array([4.0]))
    assert (stopper.best_step, stopper.best_loss, stopper.best_theta[0]) == (20, 0.4, 2.0)
    assert not EarlyStopping(None).update(1, 1.0, np.zeros(1))


def config(workers, uri, *sets):
    return load_config(
        None,
        [
            "data.synthetic={name: moons, rows: 1001, noise: 0.3, seed: 5}",
            "data.validation_fraction=0.3",
            "train.steps=25",
            "train.eval_every=5",
            "train.checkpoint_every=0",
            "model.hidden=[8]",
            *sets,
        ],
        {"cluster.workers": workers, "tracking.uri": uri},
    )


def test_validation_metrics_are_the_same_for_1_2_and_3_workers(ray_session, tracking_uri):
    results = [train(config(w, tracking_uri)) for w in (1, 2, 3)]
    rows = {(r.setup.rows, r.setup.val_rows) for r in results}
    assert len(rows) == 1
    ((train_rows, val_rows),) = rows
    assert train_rows + val_rows == 1001 and 250 < val_rows < 350
    reference = results[0]
    for other in results[1:]:
        np.testing.assert_allclose(other.theta, reference.theta, rtol=1e-10, atol=1e-13)
        assert other.final["val_loss"] == pytest.approx(reference.final["val_loss"], rel=1e-12)
        assert other.final["val_accuracy"] == reference.final["val_accuracy"]
    history = reference.history
    assert len(history["val_loss"]) == 5  # steps 5, 10, 15, 20, 25
    from mlflow import MlflowClient

    points = MlflowClient(tracking_uri).get_metric_history(reference.run_id, "val_loss")
    assert sorted(p.step for p in points) == [5, 10, 15, 20, 25]


def test_early_stopping_ends_the_run_with_the_best_weights(tracking_uri):
    result = train(
        config(
            0,
            tracking_uri,
            "train.steps=400",
            "train.learning_rate=3.0",
            "train.eval_every=2",
            "train.patience=3",
        )
    )
    steps_taken = len(result.history["loss"])
    assert steps_taken < 400
    best = result.final["best_step"]
    assert best <= steps_taken
    val = dict(zip(range(2, 401, 2), result.history["val_loss"], strict=False))
    assert val[best] == min(val.values())
    assert result.final["val_loss"] == pytest.approx(val[best], rel=1e-12)


def test_patience_without_a_validation_split_is_refused():
    with pytest.raises(ConfigError, match=r"train\.patience"):
        load_config(None, ["train.patience=3"])


def test_a_split_that_leaves_no_validation_row_is_refused(tracking_uri):
    with pytest.raises(DataError, match=r"data\.validation_fraction"):
        train(config(0, tracking_uri, "data.synthetic.rows=3", "data.validation_fraction=0.01"))
