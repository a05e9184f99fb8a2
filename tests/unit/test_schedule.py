"""Learning-rate schedules and the stopping rule on the training loss, against the formulas
of PyTorch's schedulers and scikit-learn's own stopping."""

import itertools
import math
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from shardprop.service.config import TrainConfig
from shardprop.service.training.early_stop import Plateau
from shardprop.service.training.schedule import learning_rate


def rates(**settings) -> list[float]:
    config = TrainConfig(**settings)
    return [learning_rate(config, step) for step in range(1, config.steps + 1)]


def test_constant_is_the_base_rate_at_every_step():
    assert rates(steps=5, learning_rate=0.3) == [0.3] * 5


def test_cosine_goes_from_the_base_rate_to_its_floor_as_pytorchs_annealing():
    got = rates(steps=11, learning_rate=1.0, schedule="cosine", min_learning_rate=0.1)
    # CosineAnnealingLR(T_max=10, eta_min=0.1), read before each of 11 steps
    want = [0.1 + 0.9 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(11)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == 1.0 and got[-1] == pytest.approx(0.1)


def test_step_decay_multiplies_every_decay_every_steps_as_pytorchs_steplr():
    got = rates(steps=7, learning_rate=1.0, schedule="step", decay_every=3, decay_factor=0.5)
    np.testing.assert_allclose(got, [1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_warm_up_ramps_linearly_then_the_schedule_starts_from_the_base_rate():
    got = rates(steps=9, learning_rate=1.0, warmup_steps=4, schedule="cosine")
    np.testing.assert_allclose(got[:4], [0.25, 0.5, 0.75, 1.0])
    assert got[4] == 1.0 and got[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(got[3:]))


def test_step_decay_without_its_period_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"train\.decay_every"):
        TrainConfig(schedule="step")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_plateau_rule_stops_where_scikit_learn_stops(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, 4))
    y = (X[:, 0] + rng.normal(size=300) > 0).astype(int)
    model = MLPClassifier(
        (8,), solver="sgd", batch_size=300, learning_rate_init=0.2, tol=1e-3, max_iter=2000
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    assert model.n_iter_ < 2000  # it stopped on its own
    plateau = Plateau(model.tol, model.n_iter_no_change)
    stops = [plateau.update(loss) for loss in model.loss_curve_]
    assert stops.index(True) == len(model.loss_curve_) - 1  # at the very epoch it stopped


def test_no_tolerance_never_stops_and_the_state_resumes():
    assert not any(Plateau(None, 2).update(1.0) for _ in range(10))
    plateau = Plateau(0.1, 3)
    for loss in (1.0, 0.95, 0.97):
        plateau.update(loss)
    resumed = Plateau(0.1, 3)
    resumed.load_state(plateau.state())
    assert [resumed.update(0.99), resumed.update(0.99)] == [False, True]
