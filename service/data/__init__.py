"""Data on the coordinator: discovery, schema, the shard plan, estimates, lineage."""
