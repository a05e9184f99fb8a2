"""The user-caused error types. The CLI turns every UserError into one line and exit code 2."""

from workers.errors import DataError, UserError, WeightsFileError


class ConfigError(UserError):
    """A config file or override that is missing, malformed or out of range."""


class TrainingError(Exception):
    """A run that started but could not finish (divergence, lost workers): exit code 1."""


__all__ = ["ConfigError", "DataError", "TrainingError", "UserError", "WeightsFileError"]
