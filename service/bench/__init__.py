"""`shardprop bench`: workloads and peers; imports the product, never the reverse."""
