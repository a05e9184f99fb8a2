"""Workers kept from one run for the next run of the same process (a sweep's trial process
runs trial after trial): renewed with the next run's shards, to the bits of new workers."""

import pytest

from shardprop.service.cluster.kept import KeptWorkers
from shardprop.service.config import load_config
from shardprop.service.training.run import train

pytestmark = pytest.mark.slow

SETS = [
    "data.synthetic={name: moons, rows: 801, noise: 0.3, seed: 2}",  # uneven shards
    "model.hidden=[8]",
    "train.steps=20",
    "train.optimizer=adam",
    "train.reduction=exact",
]


def trained(folder, workers: int, rate: float, kept: KeptWorkers | None = None) -> str:
    """The weights' sha256 of a run of `workers` workers and this learning rate."""
    sets = [*SETS, f"cluster.workers={workers}", f"train.learning_rate={rate}"]
    config = load_config(None, sets, {"tracking.enabled": False})
    return train(config, output=folder / f"{workers}-{rate}", kept=kept).weights_sha256


def pids(ray, actors: list) -> list[int]:
    return [where["pid"] for where in ray.get([actor.where.remote() for actor in actors])]


def test_kept_workers_train_the_next_runs_to_the_bits_of_new_ones(tmp_path, ray_session):
    """In turn: 2 workers, 2 renewed, 3 new (another shape stops the kept ones), 3 new again
    after one of the kept was lost; each run to the bits of the in-process run."""
    ray = ray_session
    reference = {rate: trained(tmp_path / "in-process", 0, rate) for rate in (0.01, 0.1)}
    kept = KeptWorkers()

    assert trained(tmp_path, 2, 0.01, kept) == reference[0.01]
    first = list(kept.actors)
    assert len(first) == 2
    assert trained(tmp_path, 2, 0.1, kept) == reference[0.1]
    assert pids(ray, kept.actors) == pids(ray, first)  # the same processes, renewed

    assert trained(tmp_path, 3, 0.01, kept) == reference[0.01]
    assert len(kept.actors) == 3
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(first[0].where.remote())  # stopped: their CPUs were the new run's
    third = pids(ray, kept.actors)

    ray.kill(kept.actors[1])  # lost between runs: the next run starts new workers
    assert trained(tmp_path, 3, 0.1, kept) == reference[0.1]
    assert not set(pids(ray, kept.actors)) & set(third)
    kept.drop()
