"""The `shardprop` command line: parse, call the library, render."""
