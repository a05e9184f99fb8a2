"""What the training loop records to, and the recorder for runs that MLflow does not track.

`tracking.enabled: false` (`--no-tracking`) runs without importing MLflow at all: for quick
local experiments, and as the baseline that tracking's overhead is measured against.
"""

import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import pyarrow as pa

from shardprop.service.data.lineage import InputRecord


class Recorder(Protocol):
    run_id: str
    tracking_uri: str | None

    def log_config(self, resolved: dict[str, Any], params: dict[str, Any]) -> None: ...

    def log_lineage(self, record: InputRecord, shards: list[dict]) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def set_note(self, text: str) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_checkpoint(self, folder: Path, weights_sha256: str) -> None: ...

    def download_checkpoints(self, destination: Path) -> Path: ...

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None: ...

    def log_final(
        self, weights_path: Path, meta: dict, input_example: pa.Table, model_name: str
    ) -> None: ...

    def register_model(self, name: str, tags: dict[str, str], description: str) -> str | None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class Untracked:
    """Records nothing; the run still gets an id (for its output folder)."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.tracking_uri = None

    def log_config(self, resolved: dict[str, Any], params: dict[str, Any]) -> None:
        pass

    def log_lineage(self, record: InputRecord, shards: list[dict]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def set_note(self, text: str) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_checkpoint(self, folder: Path, weights_sha256: str) -> None:
        pass

    def download_checkpoints(self, destination: Path) -> Path:
        return destination / "checkpoints"

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_final(
        self, weights_path: Path, meta: dict, input_example: pa.Table, model_name: str
    ) -> None:
        pass

    def register_model(self, name: str, tags: dict[str, str], description: str) -> str | None:
        return None  # tracking.register_model needs tracking (config.py refuses it without)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        pass
