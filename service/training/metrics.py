"""The metrics people read, from the tallies the workers sum over their rows (losses.py).

Counts and sums add up across shards, so every metric here is the one of the whole batch,
whatever the worker count: precision, recall and F1 from confusion counts; RMSE, MAE and R^2
from sums of errors and targets. Only ROC AUC needs every row's score (`roc_auc`).
"""

import math
from collections.abc import Sequence

import numpy as np


def task_metrics(
    task: str,
    tallies: np.ndarray | None,
    rows: int,
    target_std: float = 1.0,
    prefix: str = "",
) -> dict[str, float]:
    """The task's metrics from the tallies summed over `rows` rows, keys led by `prefix`.

    binary: precision, recall, f1 of the positive (second) class; multiclass: macro f1;
    regression: rmse and mae in the target's own units (the network sees (y - mean) / std,
    so they are multiplied by `target_std`), and r2. Where a ratio has nothing to divide by,
    scikit-learn's answers: 0.0 for precision, recall and F1 (zero_division=0); for a
    constant target, r2 is 1.0 if every prediction is exact and 0.0 otherwise (r2_score's
    force_finite). No rows (tallies None): no metrics.
    """
    if tallies is None or rows == 0:
        return {}
    if task == "binary":
        _tn, fp, fn, tp = tallies
        metrics = {
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
        }
    elif task == "multiclass":
        metrics = {"f1": macro_f1(square(tallies))}
    elif task == "regression":
        abs_error, squared_error, y_sum, y_squares = tallies
        metrics = {
            "rmse": float(np.sqrt(squared_error / rows)) * target_std,
            "mae": float(abs_error / rows) * target_std,
            "r2": r2(squared_error, y_sum, y_squares, rows),
        }
    else:
        raise ValueError(f"unknown task {task!r}")
    return {prefix + name: value for name, value in metrics.items()}


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0.0 where the denominator is 0 (zero_division=0)."""
    return float(numerator / denominator) if denominator else 0.0


def macro_f1(matrix: np.ndarray) -> float:
    """The mean F1 over the classes that occur as a true or a predicted class: those that
    f1_score(average="macro") finds in its two label arrays."""
    hits = np.diag(matrix)
    true, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    seen = (true + predicted) > 0
    f1 = 2 * hits[seen] / (true + predicted)[seen]
    return float(f1.mean()) if f1.size else 0.0


def r2(squared_error: float, y_sum: float, y_squares: float, rows: int) -> float:
    """1 - SSE / SST, SST = sum y^2 - (sum y)^2 / rows: a ratio, so the same in standardised
    and original units."""
    total = y_squares - y_sum * y_sum / rows
    # a constant target's SST comes out as rounding noise, not 0: below a relative epsilon of
    # sum y^2 it counts as 0 (the spread StandardScaler, too, treats as none)
    if total <= rows * np.finfo(np.float64).eps * y_squares:
        return 1.0 if squared_error == 0 else 0.0
    return float(1 - squared_error / total)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's roc_auc_score of every row's P(positive) against its 0/1 label; nan
    when the labels hold one class only (or none).

    Workers send their rows' scores in row order and the coordinator joins them in rank
    order: the same global array, so the same AUC, for any worker count.
    """
    labels = np.asarray(labels).ravel()
    if np.unique(labels).size < 2:
        return float("nan")
    # imported here: scikit-learn's metrics take a while to load, and most runs never get here
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def confusion_matrix(tallies: np.ndarray, classes: Sequence) -> np.ndarray:
    """The K x K confusion counts (rows: true class, columns: predicted) of the classes'
    tallies; binary tallies [tn, fp, fn, tp] give [[tn, fp], [fn, tp]]."""
    K = len(classes)
    if np.size(tallies) != K * K:
        raise ValueError(f"{np.size(tallies)} tallies are not a confusion matrix of {K} classes")
    return np.rint(square(tallies)).astype(np.int64)


def square(tallies: np.ndarray) -> np.ndarray:
    """A confusion matrix's flat row-major counts as K x K."""
    K = math.isqrt(np.size(tallies))
    return np.asarray(tallies, dtype=np.float64).reshape(K, K)
