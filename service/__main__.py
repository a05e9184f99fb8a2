"""`python -m shardprop.service ...` is `shardprop ...`: the entry a Ray Job runs where the
package is shipped with the job rather than installed."""

from shardprop.service.cli.app import app

app()
