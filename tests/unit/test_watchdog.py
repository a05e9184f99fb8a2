"""The watchdog's last line: said only when the command ended without saying it was done."""

import json

from shardprop.service.cli.watchdog import DONE, watch


def opened(output, run=None, uri=None) -> str:
    return json.dumps({"run": run, "uri": uri, "output": str(output)})


def test_a_command_that_says_it_is_done_gets_no_line(tmp_path):
    assert watch([opened(tmp_path), DONE]) is None
    assert watch([DONE]) is None


def test_a_command_that_ends_before_its_run_is_open_gets_no_line():
    assert watch([]) is None


def test_an_untracked_run_that_ends_without_a_word_names_its_newest_checkpoint(tmp_path):
    for step in (10, 20):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    said = watch([opened(tmp_path)])
    assert said.startswith("failed: the run ended without a word")
    newest = tmp_path / "checkpoints" / "step-000020" / "weights.npz"
    assert said.endswith(f"the last good weights: {newest} (start from them with --init-weights)")
