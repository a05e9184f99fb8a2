"""Batch prediction: a trained model scores a table on the workers (`shardprop predict`)."""
