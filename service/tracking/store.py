"""Where the tracking store is, and is it there? Answered quickly, without MLflow.

Plain urllib, not MLflow: MLflow's client retries a dead server for minutes by default, and
importing it is slow; a wrong URI should be named before either.
"""

import os
import shlex
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from shardprop.service.errors import ConfigError

PROBE_SECONDS = 5.0
DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """The store to use: the given URI, else $MLFLOW_TRACKING_URI, else ./mlflow.db (sqlite)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB}"


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return f"python -m webbrowser {shlex.quote(tracking_uri)}"  # the server is the UI
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def check_reachable(uri: str | None) -> None:
    """For an http(s) tracking URI: its /health answers, or ConfigError saying it does not."""
    if not uri or not uri.startswith(("http://", "https://")):
        return  # a local store (sqlite, files) is opened, and checked, by MLflow itself
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:
            return  # it answers (a proxy may guard /health): the run's own calls will tell
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    raise ConfigError(
        f"tracking.uri: the MLflow server at {uri} does not answer ({reason}); "
        "start it, or use --tracking-uri sqlite:///mlflow.db or --no-tracking"
    )
