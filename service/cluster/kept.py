"""Worker actors kept from one run for the next run of the same process.

A sweep's trial process runs trial after trial (Ray Tune's reuse_actors). Starting each
trial's workers anew costs new processes: in a trial they inherit Tune's runtime_env, so
Ray's prestarted processes do not serve them, and the compiled step needs one more for its
driver side. A run that ends cleanly leaves its workers and its compiled step here; the
next run of the same shape renews them with its own rows instead.
(upstream fix: Ray Tune keeping a trial's child actors across reused trials)
"""

import atexit
from dataclasses import dataclass, field
from typing import Any


@dataclass
class KeptWorkers:
    shape: tuple | None = None  # what a run must ask for to take them (RayGroup.shape)
    actors: list[Any] = field(default_factory=list)
    graph: Any = None  # their CompiledStep, None where the run took plain calls
    stops_at_exit: bool = field(default=False, init=False)

    def keep(self, shape: tuple, actors: list[Any], graph: Any) -> None:
        self.drop()
        self.shape, self.actors, self.graph = shape, list(actors), graph
        if not self.stops_at_exit:
            # the process stops them as it ends (Ray's graceful actor exit, how Tune ends a
            # trial process, runs atexit): not left to die with the trial's placement
            # group, which Ray would report as errors
            atexit.register(self.drop)
            self.stops_at_exit = True

    def take(self, shape: tuple) -> tuple[list[Any], Any] | None:
        """The kept workers and their graph where they are of this shape; otherwise None,
        and the kept ones stopped (their resources are the new run's)."""
        if not self.actors or shape != self.shape:
            self.drop()
            return None
        taken = self.actors, self.graph
        self.shape, self.actors, self.graph = None, [], None
        return taken

    def drop(self) -> None:
        if not self.actors:
            return
        import ray

        if self.graph is not None:
            self.graph.close()
        for actor in self.actors:
            ray.kill(actor)
        self.shape, self.actors, self.graph = None, [], None
