"""Errors a user can cause; the CLI turns every one of them into exit code 2."""


class UserError(Exception):
    """A mistake in the input (config, data, weights file), told in one line."""


class WeightsFileError(UserError):
    """A weights file that is missing, unreadable or does not fit the network."""


class DataError(UserError):
    """Data that cannot be trained on: missing columns, non-numeric or non-finite values."""
