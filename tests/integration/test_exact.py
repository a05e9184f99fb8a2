"""The exact reduction: the same bits for any number of workers, and after a worker is lost.

The block tree alone (any split, any arrival order), then whole training runs on a real
local Ray runtime.
"""

import copy
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from shardprop.service.config import load_config
from shardprop.service.errors import DataError
from shardprop.service.training.reduce import reduce_sums
from shardprop.service.training.run import train
from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.network.params import init_params
from shardprop.workers.reduction.blocktree import BlockGrid, auto_block_rows, subtree_count
from shardprop.workers.reduction.sums import BlockSums


def shard_sums(grid, workers, X, Y, arch, theta, threads=1, chunk=None):
    """Each shard's block sums, computed the way a worker computes them (`chunk`: columns
    per chunk instead of the network's own)."""
    parts = []
    for start, stop in grid.split(workers):
        batch = Batch(X[:, start:stop], Y[:, start:stop])
        network = Network(arch, np.float64, threads=threads)
        network.chunk = chunk or network.chunk
        first = start // grid.block_rows
        parts.append(network.block_gradient(theta, batch, grid.bounds(start, stop), first, grid))
    return parts


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    m = 1001
    X = rng.normal(size=(3, m)) * [[1.0], [1e3], [1e-3]]  # scales far apart: rounding shows
    Y = (rng.random((1, m)) > 0.5).astype(np.float64)
    arch = Architecture((3, 16, 8, 1), "tanh", "binary")
    return X, Y, arch, init_params(arch.layout, "he", 0, np.float64)


@pytest.mark.parametrize("block_rows", [143, 64, 1])
def test_block_tree_gives_the_same_bits_for_any_split_and_arrival_order(problem, block_rows):
    X, Y, arch, theta = problem
    grid = BlockGrid(X.shape[1], block_rows)
    reference = reduce_sums(shard_sums(grid, 1, X, Y, arch, theta))
    for workers in (2, 3, 5, 7):
        parts = shard_sums(grid, workers, X, Y, arch, theta, threads=2)
        random.Random(workers).shuffle(parts)  # subtrees arriving in any order
        total = reduce_sums(parts)
        assert np.array_equal(total.grad, reference.grad), f"{workers} workers"
        assert (total.loss, total.rows, total.correct) == (
            reference.loss,
            reference.rows,
            reference.correct,
        )
        assert np.array_equal(total.tallies, reference.tallies)


def test_blocks_run_in_chunks_give_the_same_bits_for_any_split(problem):
    """Blocks of 143 columns in chunks of 50, 50 and 43: the chunks depend on the block's
    bounds alone, so the bits still do not depend on the workers."""
    X, Y, arch, theta = problem
    grid = BlockGrid(X.shape[1], 143)
    reference = reduce_sums(shard_sums(grid, 1, X, Y, arch, theta, chunk=50))
    for workers in (2, 3, 7):
        total = reduce_sums(shard_sums(grid, workers, X, Y, arch, theta, threads=2, chunk=50))
        assert np.array_equal(total.grad, reference.grad), f"{workers} workers"
        assert total.loss == reference.loss
    whole_blocks = reduce_sums(shard_sums(grid, 1, X, Y, arch, theta))
    np.testing.assert_allclose(reference.grad, whole_blocks.grad, rtol=1e-12, atol=1e-12)
    assert not np.array_equal(reference.grad, whole_blocks.grad)  # it did run in chunks


def test_rank_order_sums_differ_in_the_last_bits_which_is_what_exact_removes(problem):
    """The test above could not fail if plain sums were already the same bits."""
    X, Y, arch, theta = problem
    network = Network(arch, np.float64, threads=1)
    whole = network.gradient(theta, Batch(X, Y)).grad
    cuts = [0, 333, 1001]
    parts = [
        network.gradient(theta, Batch(X[:, a:b], Y[:, a:b])) for a, b in itertools.pairwise(cuts)
    ]
    split = reduce_sums(parts).grad
    assert np.allclose(split, whole, rtol=1e-12, atol=0)
    assert not np.array_equal(split, whole)


def test_a_worker_returns_a_handful_of_subtrees():
    grid = BlockGrid(200_000, auto_block_rows(200_000))
    assert grid.blocks == 64
    theta = np.zeros(3)
    for start, stop in grid.split(3):
        sums = BlockSums(grid=grid)
        for block in range(start // grid.block_rows, -(-stop // grid.block_rows)):
            sums += leaf(grid, block, theta)
        assert len(sums.nodes) <= 2 * grid.top
        assert subtree_count(grid, start, stop) == len(sums.nodes)  # what `plan` counts


def leaf(grid, block, theta):
    from shardprop.workers.reduction.sums import Sums

    return BlockSums(grid=grid, nodes={(0, block): Sums(theta + block, 1.0, 1, 0)})


def test_a_deep_copy_owns_every_gradient_and_keeps_the_rest(problem):
    """What the compiled step relies on: results read out of a channel's shared memory,
    which the next step overwrites, are copied out whole."""
    X, Y, arch, theta = problem
    whole = Network(arch, np.float64).gradient(theta, Batch(X, Y))
    for sums in (*shard_sums(BlockGrid(X.shape[1], 143), 2, X, Y, arch, theta), whole):
        sums.seconds, sums.forward_seconds = 0.25, 0.125
        copied = copy.deepcopy(sums)
        parts = list(getattr(sums, "nodes", {None: sums}).values())
        before = [part.grad.copy() for part in parts]
        for part in parts:
            part.grad[...] = np.nan  # the channel's memory, overwritten by the next step
        copies = list(getattr(copied, "nodes", {None: copied}).values())
        after = [part.grad for part in copies]
        assert all(map(np.array_equal, after, before))
        for part, copy_of_part in zip(parts, copies, strict=True):
            assert np.array_equal(copy_of_part.tallies, part.tallies)
            assert not np.shares_memory(copy_of_part.tallies, part.tallies)
        assert type(copied) is type(sums)
        assert (copied.seconds, copied.forward_seconds) == (0.25, 0.125)
        assert copied.timings() == sums.timings()


def test_an_incomplete_tree_is_refused():
    grid = BlockGrid(10, 2)
    sums = leaf(grid, 0, np.zeros(2)) + leaf(grid, 2, np.zeros(2))
    with pytest.raises(ValueError, match="incomplete"):
        sums.total()


def test_block_sizes_depend_on_the_row_count_and_the_chunk_width_only():
    assert auto_block_rows(1001) == 126  # 8 blocks: small data still splits
    assert auto_block_rows(20_000) == 1024
    assert auto_block_rows(200_000) == 3125  # 64 blocks
    assert auto_block_rows(10_000_000) == 8192
    # whole chunks of 512 columns (the standard workload's), else whole 64s, else as is
    assert auto_block_rows(200_000, 512) == 3584  # 56 blocks of 7 chunks
    assert auto_block_rows(1001, 512) == 128
    assert auto_block_rows(100, 512) == 13
    assert BlockGrid(1001, 126).split(3) == [(0, 378), (378, 756), (756, 1001)]


def test_more_workers_than_blocks_names_the_key():
    with pytest.raises(DataError, match=r"train\.block_rows"):
        BlockGrid(1001, 500).split(4)


# whole runs ---------------------------------------------------------------------------------

DATA = "data.synthetic={name: moons, rows: 1001, noise: 0.3, seed: 7}"


def run(workers, *sets, **flags):
    overrides = [
        DATA,
        "model.hidden=[16, 8]",
        "train.steps=30",
        "train.reduction=exact",
        "train.checkpoint_every=0",
        *sets,
    ]
    config = load_config(
        None, overrides, {"cluster.workers": workers, "tracking.enabled": False} | flags
    )
    return train(config)


CASES = {
    "whole blocks": ("train.block_rows=143",),
    "partial last block": (),  # 8 blocks of 128 rows, the last of 105
    # the coordinator's side in one case: its optimizer state, its learning-rate schedule
    # and its early stopping on validation rows the workers evaluate
    "validation, adam, warm-up and cosine": (
        "data.validation_fraction=0.2",
        "train.patience=2",
        "train.optimizer=adam",
        "train.learning_rate=0.05",
        "train.warmup_steps=5",
        "train.schedule=cosine",
    ),
    "lbfgs": ("train.optimizer=lbfgs",),
}


TRANSPORTS = ["compiled", "plain"]


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", CASES)
def test_exact_weights_after_30_steps_are_bitwise_equal_for_workers_0_1_2_3_5(
    ray_session, case, transport
):
    reference = run(0, *CASES[case])
    assert reference.history["loss"][-1] < reference.history["loss"][0]  # it trained at all
    for workers in (1, 2, 3, 5):
        result = run(workers, *CASES[case], **{"cluster.transport": transport})
        assert np.array_equal(result.theta, reference.theta), f"{workers} workers"
        assert result.final == reference.final
        assert result.history["loss"] == reference.history["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exact_weights_survive_a_worker_killed_mid_run(ray_session, transport):
    reference = run(0)
    for workers in (2, 3):
        flags = {"cluster.inject_failure": "worker=1,step=10", "cluster.transport": transport}
        result = run(workers, **flags)
        assert result.history["worker_restarts"] == [1]
        assert np.array_equal(result.theta, reference.theta), f"{workers} workers"


@pytest.mark.slow
def test_runs_with_the_same_weights_carry_the_same_fingerprint_in_mlflow(
    ray_session, tracking_uri, tmp_path
):
    """`weights_sha256` at the end and per checkpoint (checkpoints/fingerprints.json), and
    the workers' BLAS, in the run."""
    from mlflow import MlflowClient

    from shardprop.workers.network.params import fingerprint, load_weights

    sets = ("train.checkpoint_every=10",)
    tracked = {"tracking.enabled": True, "tracking.uri": tracking_uri}
    runs = [run(workers, *sets, **tracked) for workers in (0, 2)]
    client = MlflowClient(tracking_uri)
    tags = [client.get_run(result.run_id).data.tags for result in runs]
    assert tags[0]["weights_sha256"] == tags[1]["weights_sha256"]
    _, theta = load_weights(runs[1].output / "weights.npz")
    assert tags[1]["weights_sha256"] == fingerprint(theta)
    prints = []
    for result in runs:
        into = tmp_path / result.run_id
        into.mkdir()
        path = client.download_artifacts(result.run_id, "checkpoints/fingerprints.json", into)
        prints.append(json.loads(Path(path).read_text()))
    assert list(prints[0]) == ["step-000010", "step-000020", "step-000030"]
    assert prints[0] == prints[1]
    assert prints[0]["step-000030"] == tags[0]["weights_sha256"]
    assert not any(name.startswith("weights_sha256.") for name in tags[0])
    assert "1 thread(s)" in tags[1]["shardprop.blas"]
    metrics = json.loads((runs[1].output / "metrics.json").read_text())
    assert metrics["weights_sha256"] == tags[1]["weights_sha256"]
