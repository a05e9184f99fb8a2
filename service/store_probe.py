"""Is the tracking server there? Asked before any worker starts, in a few seconds at most.

Plain urllib, not MLflow: MLflow's client retries a dead server for minutes, and importing it
takes a second, both before the user would learn that the URI is wrong.
"""

import urllib.error
import urllib.request

from service.errors import ConfigError

PROBE_SECONDS = 5.0


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
