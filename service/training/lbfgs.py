"""L-BFGS on the exact full-batch loss: the two-loop recursion and a strong-Wolfe line search
(Nocedal & Wright, Numerical Optimization, algorithms 7.4, 3.5 and 3.6).

Written here rather than driven through scipy.optimize: scipy's L-BFGS-B keeps its state in
Fortran, out of reach of a checkpoint, and its line search asks for the gradient at every
trial point. Here every trial point is one distributed evaluation, and only a point that
lowers the loss enough gets its gradient: the first trial of a step is evaluated with its
gradient (it is usually the one taken), later ones forward only until one passes the
sufficient-decrease test. The whole state is a few arrays, so a resumed run takes the very
steps an uninterrupted one would.

A step is proposed (the line search, which changes nothing) and then taken (theta and the
history updated), so a run stopped during a line search keeps the step before.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# evaluate(theta, with_gradient) -> (loss, gradient or None): one pass over every shard
Evaluate = Callable[[np.ndarray, bool], tuple[float, np.ndarray | None]]

SUFFICIENT_DECREASE = 1e-4  # c1 of the Wolfe conditions
CURVATURE = 0.9  # c2: the usual value for quasi-Newton methods
MAX_EVALS = 25  # trial points of one line search
EXPAND = 10.0  # a step that is still going down may grow up to this factor per trial
INTERVAL = 0.1  # a trial keeps this fraction of the bracket from either end


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b by numpy's own loop rather than BLAS: OpenBLAS runs a long dot on all its
    threads, which then spin on the cores the workers compute on (losses.sum_of_squares)."""
    return float(np.einsum("i,i->", a, b))


class Point(NamedTuple):
    """A point of a line search; slope (along the direction) and grad are None for a point
    evaluated forward only."""

    length: float
    loss: float
    slope: float | None
    theta: np.ndarray
    grad: np.ndarray | None


@dataclass
class Proposal:
    """The point a line search settled on, with its loss and gradient."""

    theta: np.ndarray
    loss: float
    grad: np.ndarray
    step_length: float
    evals: int  # distributed evaluations the search took
    wolfe: bool  # the strong Wolfe conditions hold (else: the lowest loss found)


class LBFGS:
    def __init__(self, history_size: int, size: int):
        self.s = np.zeros((history_size, size))  # steps theta_{k+1} - theta_k, oldest first
        self.y = np.zeros((history_size, size))  # the gradient's changes over them
        self.stored = 0  # pairs held, the newest last

    def direction(self, grad: np.ndarray) -> np.ndarray:
        """-H grad by the two-loop recursion, H the inverse Hessian of the stored pairs."""
        q = -grad.astype(np.float64)
        if not self.stored:
            return q
        s, y = self.s[: self.stored], self.y[: self.stored]
        rho = 1.0 / np.einsum("ij,ij->i", s, y)
        alpha = np.empty(self.stored)
        for i in reversed(range(self.stored)):  # newest first: the pairs depend on each other
            alpha[i] = rho[i] * dot(s[i], q)
            q -= alpha[i] * y[i]
        q *= dot(s[-1], y[-1]) / dot(y[-1], y[-1])  # the initial Hessian's scale, gamma_k
        for i in range(self.stored):
            beta = rho[i] * dot(y[i], q)
            q += (alpha[i] - beta) * s[i]
        return q

    def propose(
        self, theta: np.ndarray, loss: float, grad: np.ndarray, evaluate: Evaluate
    ) -> Proposal | None:
        """Search along the quasi-Newton direction from theta, whose loss and gradient are
        given. None when no lower loss is found: the run has converged (or the gradient is
        too small to tell where down is)."""
        d = self.direction(grad)
        slope = dot(grad, d)
        if not slope < 0:  # not a descent direction: start the history again
            self.stored = 0
            d = -grad.astype(np.float64)
            slope = dot(grad, d)
            if not slope < 0:
                return None
        # the first step is scaled to the gradient, later ones trust the curvature pairs
        first = 1.0 if self.stored else min(1.0, 1.0 / float(np.abs(grad).sum()))
        return line_search(theta, loss, grad, d, slope, first, evaluate)

    def take(self, theta: np.ndarray, grad: np.ndarray, proposal: Proposal) -> None:
        """Move theta to the proposal and remember the curvature pair, when it has any."""
        s = proposal.theta.astype(np.float64) - theta
        y = proposal.grad.astype(np.float64) - grad
        if dot(s, y) > 1e-10 * dot(y, y):  # keeps H positive definite
            if self.stored == len(self.s):
                self.s[:-1], self.y[:-1] = self.s[1:].copy(), self.y[1:].copy()
                self.stored -= 1
            self.s[self.stored], self.y[self.stored] = s, y
            self.stored += 1
        theta[...] = proposal.theta

    def state(self) -> dict[str, np.ndarray]:
        return {"s": self.s[: self.stored].copy(), "y": self.y[: self.stored].copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.stored = len(state["s"])
        self.s[: self.stored], self.y[: self.stored] = state["s"], state["y"]


def line_search(
    theta: np.ndarray,
    loss: float,
    grad: np.ndarray,
    d: np.ndarray,
    slope: float,
    first: float,
    evaluate: Evaluate,
) -> Proposal | None:
    """A step length along d meeting the strong Wolfe conditions: bracket (algorithm 3.5),
    then zoom (3.6)."""
    evals = 0

    def at(length: float, with_gradient: bool) -> Point:
        nonlocal evals
        evals += 1
        point = (theta + length * d).astype(theta.dtype)
        value, gradient = evaluate(point, with_gradient)
        trial_slope = None if gradient is None else dot(gradient, d)
        return Point(length, value, trial_slope, point, gradient)

    def lower_enough(trial: Point, than: float) -> bool:  # sufficient decrease
        armijo = loss + SUFFICIENT_DECREASE * trial.length * slope
        return trial.loss <= armijo and trial.loss < than

    def flat_enough(trial: Point) -> bool:  # the strong curvature condition
        return abs(trial.slope) <= -CURVATURE * slope

    def taken(trial: Point, wolfe: bool) -> Proposal:
        return Proposal(trial.theta, trial.loss, trial.grad, trial.length, evals, wolfe)

    # bracket: lo is the lowest point so far, with its gradient; hi lies beyond a minimum
    lo, hi = Point(0.0, loss, slope, theta, grad), None
    length = first
    while evals < MAX_EVALS:
        # the first trial is usually taken: its gradient comes with it
        trial = at(length, with_gradient=evals == 0)
        if not lower_enough(trial, than=lo.loss if lo.length else np.inf):
            hi = trial
            break
        if trial.slope is None:
            trial = at(length, with_gradient=True)
        if flat_enough(trial):
            return taken(trial, wolfe=True)
        if trial.slope >= 0:  # gone past the minimum: it lies between this point and lo
            lo, hi = trial, lo
            break
        # still going down: a longer step, from the cubic through lo and this point
        guess = cubic(lo, trial)
        low, high = length + 0.01 * (length - lo.length), length * EXPAND
        lo, length = trial, min(max(guess, low), high)
    # zoom between lo and hi
    while hi is not None and evals < MAX_EVALS:
        a, b = sorted((lo.length, hi.length))
        if (b - a) * abs(lo.slope) <= 1e-12 * max(abs(loss), 1.0):  # nothing left to gain
            break
        length = min(max(cubic(lo, hi), a + INTERVAL * (b - a)), b - INTERVAL * (b - a))
        trial = at(length, with_gradient=False)
        if not lower_enough(trial, than=lo.loss):
            hi = trial
            continue
        trial = at(length, with_gradient=True)
        if flat_enough(trial):
            return taken(trial, wolfe=True)
        if trial.slope * (hi.length - lo.length) >= 0:
            hi = lo
        lo = trial
    if lo.length == 0.0:
        return None  # no point below the start
    return taken(lo, wolfe=False)  # the lowest point found


def cubic(p: Point, q: Point) -> float:
    """The minimiser of the cubic through points p and q (their lengths, losses and
    slopes), or of the quadratic when q has no slope; the midpoint when there is none."""
    (a, fa, da), (b, fb, db) = p[:3], q[:3]
    middle = (a + b) / 2
    if not np.isfinite(fb):
        return middle
    if db is None:  # f(a), f'(a), f(b)
        curve = fb - fa - da * (b - a)
        return a - da * (b - a) ** 2 / (2 * curve) if curve > 0 else middle
    d1 = da + db - 3 * (fa - fb) / (a - b)
    square = d1 * d1 - da * db
    if square < 0:
        return middle
    d2 = np.copysign(np.sqrt(square), b - a)
    denominator = db - da + 2 * d2
    guess = b - (b - a) * (db + d2 - d1) / denominator if denominator else middle
    return guess if np.isfinite(guess) else middle
