"""What a person at a terminal sees: the progress bar at 80 columns and the closing line."""

import io
import re
import time

import pytest
from rich.console import Console
from rich.text import Text

from shardprop.service.cli.render import headline
from shardprop.service.training.progress import Reporter

METRICS = {
    "loss": 0.123456,
    "accuracy": 0.9512,
    "val_loss": 0.2345,
    "val_accuracy": 0.9375,
    "timing/samples_per_second": 123456.0,
}


def last_frame(width: int) -> list[str]:
    """The bar's two lines as a terminal of `width` columns shows them when the run stops."""
    screen = io.StringIO()
    reporter = Reporter("rich", Console(width=width, file=screen, force_terminal=True))
    reporter.start(500, "training on 2 worker(s)")
    for step in range(1, 122, 30):  # spread in time: the ETA needs a speed
        reporter.update(step, METRICS)
        time.sleep(0.02)
    reporter.stop()
    drawn = screen.getvalue()
    # up a line and clear it: each frame is drawn over the last (a busy machine may leave
    # rich's refresh thread no time to draw any frame but the one at stop())
    last = drawn.rsplit("\x1b[1A\x1b[2K", 1)[-1]
    return Text.from_ansi(last).plain.splitlines()


@pytest.mark.parametrize("width", [80, 60, 40])
def test_the_bar_keeps_step_total_elapsed_and_eta_on_a_narrow_terminal(width):
    bar, metrics = last_frame(width)
    assert len(bar) <= width and len(metrics) <= width
    assert re.search(r"━ 121/500 \d+:\d\d:\d\d eta \d+:\d\d:\d\d$", bar), bar
    assert metrics.startswith("  loss 0.1235  acc 0.951")


def test_at_80_columns_nothing_is_cut_short():
    bar, metrics = last_frame(80)
    assert bar.startswith("training on 2 worker(s) ━")
    assert metrics == "  loss 0.1235  acc 0.951  val_loss 0.2345  val_acc 0.938  123,456 samples/s"


def test_on_a_narrower_terminal_the_title_and_the_metrics_give_way():
    bar, metrics = last_frame(40)
    assert bar.split("━")[0].endswith("… ")  # the title, cut short
    assert metrics.endswith("…")


def test_the_closing_line_shows_the_validation_metrics_when_there_are_some():
    final = {
        "loss": 0.1,
        "accuracy": 0.95,
        "f1": 0.94,
        "roc_auc": 0.99,
        "rows": 800,
        "val_loss": 0.2,
        "val_accuracy": 0.9,
        "val_f1": 0.89,
        "val_roc_auc": 0.97,
        "best_step": 40,
    }
    assert headline(final) == (
        "loss 0.100000, accuracy 0.9500, val_loss 0.200000, val_accuracy 0.9000, "
        "val_f1 0.8900, val_roc_auc 0.9700"
    )


def test_without_validation_the_closing_line_shows_the_tasks_training_metrics():
    regression = {"loss": 0.01, "rmse": 3.25, "mae": 2.5, "r2": 0.91, "rows": 100}
    assert headline(regression) == "loss 0.010000, rmse 3.2500, r2 0.9100"
    multiclass = {"loss": 0.3, "accuracy": 0.9, "f1": 0.88, "rows": 100}
    assert headline(multiclass) == "loss 0.300000, accuracy 0.9000, f1 0.8800"
    regression_val = regression | {"val_loss": 0.02, "val_rmse": 4.0, "val_r2": 0.85}
    assert (
        headline(regression_val)
        == "loss 0.010000, val_loss 0.020000, val_rmse 4.0000, val_r2 0.8500"
    )
