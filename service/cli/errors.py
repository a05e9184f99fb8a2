"""Errors to exit codes, in one place for every command."""

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from shardprop.service.errors import TrainingError, UserError
from shardprop.service.training.interrupts import Interrupted


@contextmanager
def errors_as_exit_codes() -> Iterator[None]:
    """User mistakes: one line per problem, exit 2. Failed runs: one line, exit 1. A stop the
    user asked for: the exit code of its signal."""
    try:
        yield
    except UserError as error:
        for line in str(error).splitlines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(code=2) from None
    except TrainingError as error:
        typer.echo(f"failed: {error}", err=True)
        raise typer.Exit(code=1) from None
    except Interrupted as error:
        typer.echo(f"interrupted: {error}", err=True)
        raise typer.Exit(code=error.exit_code) from None
