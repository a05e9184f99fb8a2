"""Worker actors kept from one run for the next run of the same process.

A sweep's trial process runs trial after trial (Ray Tune's reuse_actors). Starting each
trial's workers anew costs new processes: in a trial they inherit Tune's runtime_env, so
Ray's prestarted processes do not serve them. A run that ends cleanly leaves its workers
here; the next run of the same shape renews them with its own rows instead. Their compiled
step is not kept: a graph alive when its process ends is torn down by Ray's shutdown, which
hangs where the cluster has gone first.
(upstream fix: Ray Tune keeping a trial's child actors across reused trials)
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KeptWorkers:
    shape: tuple | None = None  # what a run must ask for to take them (RayGroup._shape)
    actors: list[Any] = field(default_factory=list)

    def keep(self, shape: tuple, actors: list[Any]) -> None:
        self.drop()
        self.shape, self.actors = shape, list(actors)

    def take(self, shape: tuple) -> list[Any]:
        """The kept workers where they are of this shape; otherwise none, and the kept ones
        stopped (their resources are the new run's)."""
        if shape != self.shape:
            self.drop()
        taken, self.shape, self.actors = self.actors, None, []
        return taken

    def drop(self) -> None:
        if not self.actors:
            return
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.shape, self.actors = None, []
