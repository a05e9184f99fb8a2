"""Time to a good model: L-BFGS against scikit-learn's from the same start, the schedules as
logged, and runs that stop by themselves (a plateau, a target loss) and say why.

Real Ray workers, real Parquet files, a real MLflow store.
"""

import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from shardprop.service.config import load_config
from shardprop.service.data.plan import write_table
from shardprop.service.training.run import train
from shardprop.service.training.schedule import learning_rate
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from shardprop.workers.network.params import Layout, init_params, save_weights

SIZES = (2, 16, 8, 1)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    """1,001 rows in 128-row groups (uneven shards), and starting weights every run shares."""
    folder = tmp_path_factory.mktemp("moons")
    table = generate(SyntheticSpec("moons", rows=1001, noise=0.3, seed=7), 0, 1001)
    path = write_table(table, folder / "moons.parquet", row_group_rows=128)
    layout = Layout(SIZES)
    theta = init_params(layout, "he", 123, np.float64)
    return path, save_weights(folder / "init.npz", layout, theta), layout, theta


def run(moons, workers, *sets, tracking_uri=None):
    path, weights, *_ = moons
    overrides = [
        f"data.path={path}",
        "model.hidden=[16, 8]",
        "model.activation=tanh",
        "train.checkpoint_every=0",
        *sets,
    ]
    tracking = {"tracking.uri": tracking_uri} if tracking_uri else {"tracking.enabled": False}
    config = load_config(None, overrides, {"cluster.workers": workers} | tracking)
    return train(config, init_weights=weights)


def scikit_learn_lbfgs(moons, iterations):
    """scikit-learn's MLP on the rows as our workers standardise them, from our starting
    weights, after `iterations` of its L-BFGS: its loss at the start and at the end."""
    path, _, layout, theta = moons
    table = pq.read_table(path)
    X = np.column_stack([table["x0"].to_numpy(), table["x1"].to_numpy()])
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    y = table["y"].to_numpy()
    blocks = layout.blocks(theta)
    model = MLPClassifier(SIZES[1:-1], activation="tanh", solver="lbfgs", alpha=0.0, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.set_params(max_iter=1).fit(X, y)  # builds the network; its weights replaced next
        model.coefs_ = [block[:, :-1].T.copy() for block in blocks]
        model.intercepts_ = [block[:, -1].copy() for block in blocks]
        p = model.predict_proba(X)[:, 1]
        start = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        model.set_params(max_iter=iterations, warm_start=True).fit(X, y)
    return start, float(model.loss_)


@pytest.mark.slow
def test_lbfgs_reaches_scikit_learns_lbfgs_loss_in_as_many_steps(ray_session, moons):
    iterations = 60
    start, target = scikit_learn_lbfgs(moons, iterations)
    result = run(
        moons,
        2,
        "train.optimizer=lbfgs",
        f"train.steps={iterations}",
        f"train.target_loss={target * 1.001}",
        "train.tolerance=null",
    )
    losses = result.history["loss"]
    assert losses[0] == pytest.approx(start, rel=1e-12)  # the same problem from the same start
    assert losses[-1] <= target * 1.001, f"{losses[-1]} after {len(losses)} steps, want {target}"
    # one distributed evaluation per step and a few more: the line search rarely searches
    assert sum(result.history["train/function_evals"]) <= 1.5 * len(losses)


@pytest.mark.parametrize("workers", [0, 2])
def test_lbfgs_stops_by_itself_on_a_plateau_and_logs_its_evaluations(
    ray_session, moons, tracking_uri, workers
):
    result = run(
        moons, workers, "train.optimizer=lbfgs", "train.steps=500", tracking_uri=tracking_uri
    )
    steps = len(result.history["loss"])
    assert 10 < steps < 500
    evals = result.history["train/function_evals"]
    assert len(evals) == steps and evals[0] >= 2 and min(evals) >= 1
    assert "train/learning_rate" not in result.history  # lbfgs has none
    tags = MlflowClient(tracking_uri).get_run(result.run_id).data.tags
    assert "train.tolerance" in tags["shardprop.stopped"]


def test_a_target_loss_ends_the_run_at_the_first_step_that_reaches_it(ray_session, moons):
    free = run(moons, 0, "train.steps=40", "train.tolerance=null", "train.learning_rate=0.5")
    target = free.history["loss"][24]
    assert target < min(free.history["loss"][:24])
    stopped = run(
        moons, 0, "train.steps=40", f"train.target_loss={target}", "train.learning_rate=0.5"
    )
    assert stopped.history["loss"] == free.history["loss"][:25]
    # the weights that reached it: 24 updates, none after
    assert stopped.final["loss"] == pytest.approx(target, rel=1e-12)


def test_the_plateau_rule_stops_after_n_iter_no_change_steps_without_a_gain(ray_session, moons):
    # every step's gain is below a tolerance this large: the first step sets the best loss
    result = run(moons, 0, "train.steps=40", "train.tolerance=10", "train.n_iter_no_change=3")
    assert len(result.history["loss"]) == 5


@pytest.mark.parametrize(
    "schedule",
    [
        ("train.schedule=cosine", "train.min_learning_rate=0.01"),
        ("train.schedule=step", "train.decay_every=7", "train.warmup_steps=3"),
    ],
)
def test_the_learning_rate_is_logged_as_the_schedule_sets_it(ray_session, moons, schedule):
    result = run(moons, 2, "train.steps=20", "train.tolerance=null", *schedule)
    config = load_config(None, ["train.steps=20", *schedule], {})
    want = [learning_rate(config.train, step) for step in range(1, 21)]
    assert result.history["train/learning_rate"] == want
    plain = run(moons, 2, "train.steps=20", "train.tolerance=null")
    assert not np.array_equal(plain.theta, result.theta)
