"""MLflow: the run's tracker, the logged model and its serving, the store."""
