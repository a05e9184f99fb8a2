"""L-BFGS: the two-loop recursion is BFGS's inverse Hessian, every step it takes meets the
strong Wolfe conditions, it converges as scipy's L-BFGS-B does, and its state resumes to the
same bits."""

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize, rosen, rosen_der

from shardprop.service.training.lbfgs import CURVATURE, LBFGS, SUFFICIENT_DECREASE


class Counted:
    """Rosenbrock's function as a distributed evaluation would give it, counting passes."""

    def __init__(self):
        self.forward = self.gradient = 0
        self.points: list[tuple[np.ndarray, bool]] = []

    def __call__(self, x: np.ndarray, with_gradient: bool):
        self.points.append((x.copy(), with_gradient))
        if with_gradient:
            self.gradient += 1
            return float(rosen(x)), rosen_der(x)
        self.forward += 1
        return float(rosen(x)), None


def descend(x: np.ndarray, evaluate: Counted, steps: int = 500):
    """L-BFGS from x: every step as (x before, loss, gradient, proposal), and the optimizer."""
    opt = LBFGS(10, x.size)
    loss, grad = float(rosen(x)), rosen_der(x)
    taken = []
    for _ in range(steps):
        proposal = opt.propose(x, loss, grad, evaluate)
        if proposal is None or loss < 1e-20:
            break
        taken.append((x.copy(), loss, grad.copy(), proposal))
        opt.take(x, grad, proposal)
        loss, grad = proposal.loss, proposal.grad
    return taken, opt


def test_two_loop_recursion_is_the_bfgs_inverse_hessian_product():
    rng = np.random.default_rng(0)
    n, pairs = 6, 4
    opt = LBFGS(pairs, n)
    A = rng.normal(size=(n, n))
    A = A @ A.T + n * np.eye(n)  # a convex quadratic: every pair has s.y > 0
    for _ in range(pairs):
        s = rng.normal(size=n)
        opt.s[opt.stored], opt.y[opt.stored] = s, A @ s
        opt.stored += 1
    g = rng.normal(size=n)
    s, y = opt.s[-1], opt.y[-1]
    H = (s @ y) / (y @ y) * np.eye(n)  # Nocedal & Wright (7.20), then (6.17) per pair
    for s, y in zip(opt.s, opt.y, strict=True):
        rho = 1 / (s @ y)
        V = np.eye(n) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    np.testing.assert_allclose(opt.direction(g), -H @ g, rtol=1e-10)


def test_every_step_meets_the_strong_wolfe_conditions_and_converges_as_scipy_does():
    evaluate = Counted()
    taken, _ = descend(np.zeros(10), evaluate)
    assert taken[-1][-1].loss < 1e-12
    for x, f0, g0, proposal in taken:
        d = (proposal.theta - x) / proposal.step_length
        assert proposal.wolfe
        assert proposal.loss <= f0 + SUFFICIENT_DECREASE * proposal.step_length * (g0 @ d)
        assert abs(proposal.grad @ d) <= CURVATURE * abs(g0 @ d)
    scipy = minimize(
        rosen,
        np.zeros(10),
        jac=rosen_der,
        method="L-BFGS-B",
        options={"gtol": 1e-10, "ftol": 1e-16},
    )
    assert scipy.fun < 1e-12
    assert len(taken) <= 1.5 * scipy.nit  # an independent L-BFGS takes about as many steps
    assert evaluate.gradient + evaluate.forward <= 1.5 * scipy.nfev


def test_only_the_first_trial_and_points_low_enough_get_a_gradient():
    evaluate = Counted()
    taken, _ = descend(np.zeros(10), evaluate)
    assert evaluate.forward > 0  # some steps searched past their first trial
    calls = iter(evaluate.points)
    for *_, proposal in taken:
        step = [next(calls) for _ in range(proposal.evals)]
        assert step[0][1], "the first trial comes with its gradient"
        for (before, before_gradient), (point, gradient) in itertools.pairwise(step):
            if gradient:  # only for a point found low enough forward only
                assert not before_gradient and np.array_equal(before, point)
        assert step[-1][1] and np.array_equal(step[-1][0], proposal.theta)


def test_state_resumes_to_the_same_bits():
    taken, first = descend(np.zeros(10), Counted(), steps=12)
    resumed = LBFGS(10, 10)
    resumed.load_state(first.state())
    x, _, _, last = taken[-1]
    x = last.theta.copy()
    a = first.propose(x, last.loss, last.grad, Counted())
    b = resumed.propose(x, last.loss, last.grad, Counted())
    assert np.array_equal(a.theta, b.theta) and a.loss == b.loss


def test_no_step_is_proposed_at_a_minimum():
    assert LBFGS(3, 2).propose(np.ones(2), 0.0, np.zeros(2), Counted()) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_step_keeps_the_weights_dtype(dtype):
    x = np.zeros(4, dtype=dtype)
    opt = LBFGS(5, 4)
    grad = rosen_der(x).astype(dtype)
    proposal = opt.propose(x, float(rosen(x)), grad, Counted())
    opt.take(x, grad, proposal)
    assert x.dtype == dtype and proposal.theta.dtype == dtype
    assert rosen(x) < rosen(np.zeros(4))
