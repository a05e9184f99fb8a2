"""Where the tracking store is, and is it there? Answered quickly, without MLflow.

Plain urllib, not MLflow: MLflow's client retries a dead server for minutes by default, and
importing it is slow; a wrong URI should be named before either.
"""

import contextlib
import fcntl
import os
import shlex
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from shardprop.service.errors import ConfigError, TrainingError

PROBE_SECONDS = 5.0
DEFAULT_DB = "mlflow.db"


class StoreError(TrainingError):
    """The tracking store refused the end of a run (read-only, disk full, gone): the run's
    weights are on local disk; the message is the store's reason, in one line."""


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


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite URI (sqlite:///relative.db, sqlite:////absolute.db);
    None for other stores and for an in-memory database."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    if not db or db == ":memory:":
        return None
    return Path(db)


def file_store_path(tracking_uri: str) -> Path | None:
    """The folder of a file store (file:///path or a plain path); None for other stores."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and tracking_uri != "databricks":
        return Path(tracking_uri)
    return None


def check_reachable(uri: str | None, resuming: bool = False) -> None:
    """For an http(s) tracking URI: its /health answers, or ConfigError saying it does not."""
    if not uri or not uri.startswith(("http://", "https://")):
        return  # a local store is checked by check_store
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:
            return  # it answers (a proxy may guard /health): the run's own calls will tell
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    hint = (
        "start it, or name the store that holds the run with --tracking-uri"
        if resuming
        else "start it, or use --tracking-uri sqlite:///mlflow.db or --no-tracking"
    )
    raise ConfigError(f"tracking.uri: the MLflow server at {uri} is unreachable ({reason}); {hint}")


def check_store(uri: str | None, resuming: bool = False) -> None:
    """Before any work: the store answers and can be written to, or one ConfigError line.

    http(s): the server answers. sqlite: the database's folder takes a new file, and a run to
    resume has a database to be in (MLflow would create an empty one). A file store: its
    folder takes a new file. Other stores (postgresql, databricks, ...) are left to MLflow.
    """
    tracking_uri = resolve_tracking_uri(uri)
    check_reachable(tracking_uri, resuming)
    if (db := sqlite_path(tracking_uri)) is not None:
        if resuming and not db.is_file():
            raise ConfigError(
                f"tracking.uri: no tracking store at {db}; "
                "name the store that holds the run with --tracking-uri"
            )
        check_writable(db.absolute().parent, "tracking.uri", f"the folder of the sqlite store {db}")
    elif (folder := file_store_path(tracking_uri)) is not None:
        if resuming and not folder.is_dir():
            raise ConfigError(
                f"tracking.uri: no tracking store at {folder}; "
                "name the store that holds the run with --tracking-uri"
            )
        check_writable(folder.absolute(), "tracking.uri", f"the file store {folder}")


def check_writable(folder: Path, key: str, what: str) -> None:
    """A file can be made in `folder`, or in the nearest folder above it that exists (the
    rest is created later), or one ConfigError line naming `key`. A real file, not
    os.access: as root on a read-only mount, access says yes."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".shardprop-probe-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{key}: cannot write to {existing} ({what}): {error.strerror or error}"
        ) from None


@contextlib.contextmanager
def schema_lock(tracking_uri: str) -> Iterator[None]:
    """Held while MLflow opens a sqlite store: the first client of a new database creates its
    tables and migrates them, and two processes doing so at once break each other's schema.

    The lock is a file beside the database, so it holds across processes and containers that
    share the folder. A folder that takes no new file cannot have its schema created either:
    then nothing is locked.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    try:
        db.absolute().parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(db.with_name(f"{db.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the process dies
        yield
    finally:
        os.close(lock)
