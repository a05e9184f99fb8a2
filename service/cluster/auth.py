"""Ray token authentication as a client sees it: which token it would send, and whether a
cluster takes it, asked once before `ray.init` so that a refusal is one clear line instead of
a minute of retries from Ray's core."""

import os
from pathlib import Path

from shardprop.service.errors import ConfigError

# Ray's documented token sources, highest precedence first (ray-security/token-auth)
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
# any GCS method will do: the token is checked before the call is looked at
PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def client_token() -> str | None:
    """The token Ray would send from this environment, or None."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get(TOKEN_VARIABLE):
        return os.environ[TOKEN_VARIABLE].strip()
    path = Path(os.environ.get(TOKEN_PATH_VARIABLE) or DEFAULT_TOKEN_FILE).expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def check_token(address: str, seconds: float = 10) -> None:
    """Raise ConfigError when the cluster's GCS at host:port refuses this client's token (or
    its lack of one). Anything else (unreachable, another error) is left to ray.init."""
    if address == "auto" or "://" in address:
        return  # found through the local node, or a Ray Client proxy: Ray reports those
    import grpc

    token = client_token()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            PROBE_METHOD, request_serializer=bytes, response_deserializer=bytes
        )
        try:
            call(b"", timeout=seconds, metadata=metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ConfigError(refusal(address, token is not None)) from None


def refusal(address: str, had_token: bool) -> str:
    what = "refused this client's token" if had_token else "requires token authentication"
    return (
        f"cluster.address: the Ray cluster at {address} {what}; set {TOKEN_VARIABLE} "
        f"(or {TOKEN_PATH_VARIABLE}) to the cluster's token, and RAY_AUTH_MODE=token"
    )
