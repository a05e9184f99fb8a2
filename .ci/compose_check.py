"""Check, through MLflow's client, what the compose stack's `train` runs left in its MLflow
server: `runs` runs, each FINISHED with its model, weights, plots and checkpoints."""

import sys

from mlflow import MlflowClient

URI = "http://127.0.0.1:5000"  # the stack's published MLflow server


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found.add(item.path)
        if item.is_dir:
            found |= artifacts(client, run_id, item.path)
    return found


def main(runs: int) -> None:
    client = MlflowClient(URI)
    experiment = client.get_experiment_by_name("shardprop")
    assert experiment is not None, "no experiment 'shardprop' on the stack's server"
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == runs, f"{len(found)} runs, expected {runs}"
    for run in found:
        run_id = run.info.run_id
        assert run.info.status == "FINISHED", (run_id, run.info.status, run.data.tags.get("error"))
        stored = artifacts(client, run_id)
        for wanted in ("config.yaml", "shards.json", "weights/final.npz", "plots/loss.png"):
            assert wanted in stored, (run_id, wanted, sorted(stored))
        assert any(path.startswith("checkpoints/step-") for path in stored), sorted(stored)
        models = client.search_logged_models([experiment.experiment_id])
        assert any(model.source_run_id == run_id for model in models), f"no model of {run_id}"
        print(
            f"run {run_id}: FINISHED, {len(stored)} artifacts, a logged model, "
            f"workers={run.data.params.get('workers')}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]))
