"""The math of shardprop: the network, its losses and parameters, and the shard worker."""
