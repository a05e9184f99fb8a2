"""What a person watching a run sees: a rich bar on a terminal, plain lines elsewhere."""

import sys
import time
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Mode = Literal["auto", "rich", "plain", "quiet"]
PLAIN_LINE_SECONDS = 30  # a log shows a slow run is alive between its tenth-of-the-run lines


def describe(metrics: dict[str, float]) -> str:
    parts = [f"loss {metrics['loss']:.4f}"]
    if "accuracy" in metrics:
        parts.append(f"acc {metrics['accuracy']:.3f}")
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    parts.append(f"{metrics['samples_per_second']:,.0f} samples/s")
    return "  ".join(parts)


class Reporter:
    """Step-by-step progress of one run; `quiet` shows nothing (errors go elsewhere)."""

    def __init__(self, mode: Mode = "auto", console: Console | None = None):
        self.console = console or Console(stderr=True)
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        self.mode = mode
        self._bar: Progress | None = None
        self._last_line = 0.0

    def start(self, total_steps: int, title: str) -> None:
        self.total = total_steps
        self.every = max(1, total_steps // 10)
        if self.mode == "rich":
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(title, total=total_steps, metrics="")
        elif self.mode == "plain":
            self.console.print(f"{title}: {total_steps} steps", highlight=False)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, metrics=describe(metrics))
        elif self.mode == "plain":
            now = time.monotonic()
            quiet_for = now - self._last_line
            if step % self.every == 0 or step == self.total or quiet_for > PLAIN_LINE_SECONDS:
                self._last_line = now
                line = f"step {step}/{self.total}  {describe(metrics)}"
                self.console.print(line, highlight=False)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def note(self, text: str) -> None:
        """A line about the run's set-up (what was decided from the data), unless quiet."""
        if self.mode != "quiet":
            self.console.print(text, highlight=False, soft_wrap=True, markup=False)

    def say(self, text: str) -> None:
        """A closing line (summary), shown unless quiet."""
        if self.mode != "quiet":
            Console(file=sys.stdout, soft_wrap=True).print(text, highlight=False)
