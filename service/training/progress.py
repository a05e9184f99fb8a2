"""What a person watching a run sees: a rich bar on a terminal, plain lines elsewhere."""

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from shardprop.service.tracking.page import SAMPLES_PER_SECOND

Mode = Literal["auto", "rich", "plain", "quiet"]
PLAIN_LINE_SECONDS = 30  # a log shows a slow run is alive between its tenth-of-the-run lines


def describe(metrics: dict[str, float]) -> str:
    parts = [f"loss {metrics['loss']:.4f}"]
    if "accuracy" in metrics:
        parts.append(f"acc {metrics['accuracy']:.3f}")
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    if "val_accuracy" in metrics:
        parts.append(f"val_acc {metrics['val_accuracy']:.3f}")
    parts.append(f"{metrics[SAMPLES_PER_SECOND]:,.0f} samples/s")
    return "  ".join(parts)


class TitleColumn(ProgressColumn):
    """The task's description on one line, cut short with an ellipsis where space is short."""

    def render(self, task: Task) -> Text:
        return Text(task.description, style="bold", no_wrap=True, overflow="ellipsis")


class StepBar(Progress):
    """The bar with step/total, elapsed time and ETA on one line, the metrics on the next:
    a narrow terminal shortens the title, the bar and the metrics, never the counts."""

    def __init__(self, console: Console):
        kept = Column(no_wrap=True)  # left whole; the other columns give way first
        super().__init__(
            TitleColumn(),
            BarColumn(),
            MofNCompleteColumn(table_column=kept),
            TimeElapsedColumn(table_column=kept),
            TextColumn("eta", table_column=kept),
            TimeRemainingColumn(table_column=kept),
            console=console,
        )

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            if task.fields.get("metrics"):
                yield Text(f"  {task.fields['metrics']}", no_wrap=True, overflow="ellipsis")


class Reporter:
    """Step-by-step progress of one run; `quiet` shows nothing (errors go elsewhere)."""

    def __init__(
        self,
        mode: Mode = "auto",
        console: Console | None = None,
        on_open: Callable[[str | None, str | None, Path], None] | None = None,
    ):
        self.console = console or Console(stderr=True)
        self.on_open = on_open  # told the run id, its store and its output folder
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        self.mode = mode
        self._bar: Progress | None = None
        self._last_line = 0.0

    def opened(self, run_id: str | None, tracking_uri: str | None, output: Path) -> None:
        """The run is open: its MLflow run (None: untracked) and its output folder."""
        if self.on_open is not None:
            self.on_open(run_id, tracking_uri, output)

    def start(self, total_steps: int, title: str) -> None:
        self.total = total_steps
        self.every = max(1, total_steps // 10)
        if self.mode == "rich":
            self._bar = StepBar(self.console)
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
                self.console.print(line, highlight=False, soft_wrap=True)  # one line for grep

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
