"""Elastic runs on two `ray start` nodes: a node lost with no room for its worker leaves the
run on the other (cluster.min_workers), a run resumed where there is room for fewer workers
starts on those, a node that joins grows it back (cluster.max_workers), and the weights are
the very bits of a run that never changed size (train.reduction: exact)."""

import re
import signal

from mlflow import MlflowClient

from tests.processes import assert_in_process_bits, stop_group, train_on, wait_for_checkpoint
from tests.processes import start_shardprop as shardprop

CONFIG = """\
data: {synthetic: {name: moons, rows: 4001, seed: 3}}
model: {hidden: [32, 32]}
train: {steps: 1000, optimizer: adam, learning_rate: 0.01, checkpoint_every: 50}
cluster:
  workers: 2
  min_workers: 1
  max_workers: 2
  replace_timeout: 5
  worker_resources: {shard_slot: 1}
  start_timeout: 120
  transport: plain
tracking: {flush_seconds: 0.2}
"""


def test_a_run_shrinks_resumes_small_and_grows_back_to_the_same_bits(tmp_path, cluster):
    """A node lost mid-run: on with one worker; the coordinator killed then: the resume
    starts on the one node there is; a node joins: back to two. Undisturbed bits."""
    run = train_on(cluster, CONFIG, tmp_path)
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
    wait_for_checkpoint(run, out, 100)
    stop_group(cluster.nodes[-1])  # the second node, and its shard_slot, are gone
    wait_for_checkpoint(run, out, 300)  # the run goes on, on one worker
    run.send_signal(signal.SIGKILL)  # and then its coordinator is lost too
    run.communicate(timeout=60)

    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])
    resumed = shardprop(
        "resume", found.info.run_id, "--tracking-uri", uri, "--address", cluster.address,
        cwd=tmp_path,
    )  # fmt: skip
    wait_for_checkpoint(resumed, out, 400)  # room for one worker: the resume starts on one
    # a node joins: the run grows back to two workers at a step boundary. Paused meanwhile,
    # the run cannot end before the node is there, however fast its steps
    resumed.send_signal(signal.SIGSTOP)
    try:
        cluster.add_node()
    finally:
        resumed.send_signal(signal.SIGCONT)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr

    found = client.get_run(found.info.run_id)
    assert found.info.status == "FINISHED"
    workers = [m.value for m in client.get_metric_history(found.info.run_id, "workers")]
    assert workers[0] == 2 and 1 in workers and workers[-1] == 2, workers
    changes = found.data.tags["shardprop.resizes"].split("; ")
    assert len(changes) == 3, changes
    assert re.fullmatch(
        r"step \d+: 2 -> 1 workers: worker \d lost .* no room to replace it", changes[0]
    )
    assert re.fullmatch(r"step \d+: 2 -> 1 workers: room for 1 at the start", changes[1])
    assert re.fullmatch(r"step \d+: 1 -> 2 workers: room for 1 more worker\(s\)", changes[2])

    assert_in_process_bits(tmp_path / "run.yaml", out / "weights.npz", tmp_path)
