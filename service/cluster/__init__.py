"""Workers on Ray: the worker group, its failure policy, the Ray runtime, jobs."""
