"""The user-caused error types. The CLI turns every UserError into one line and exit code 2."""

from shardprop.workers.errors import DataError, UserError, WeightsFileError


class ConfigError(UserError):
    """A config file or override that is missing, malformed or out of range."""


class TrainingError(Exception):
    """A run that started but could not finish (divergence, lost workers): exit code 1."""

    run_tags: dict[str, str] = {}  # noqa: RUF012 - read-only default; set per instance


class DivergenceError(TrainingError):
    """A non-finite loss or gradient: the run stops at that step, its weights unsaved."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.run_tags = {"shardprop.diverged_at_step": str(step)}


__all__ = [
    "ConfigError",
    "DataError",
    "DivergenceError",
    "TrainingError",
    "UserError",
    "WeightsFileError",
]
