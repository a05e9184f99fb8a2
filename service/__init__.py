"""The coordinator side of shardprop: CLI, config, data plan, training loop, tracking."""
