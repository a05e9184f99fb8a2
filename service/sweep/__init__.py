"""Sweeps: many trainings of one config on one cluster, as Ray Tune trials nested in MLflow."""
