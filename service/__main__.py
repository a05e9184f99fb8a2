"""`python -m service ...` is `shardprop ...`: the entry a Ray Job runs where the package is
shipped with the job rather than installed."""

from service.cli import app

app()
