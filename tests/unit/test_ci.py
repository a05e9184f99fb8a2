"""CI runs the README's test command word for word: the two stay in step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && '


def test_ci_runs_the_readmes_test_command_word_for_word():
    (command,) = [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.strip().startswith(TEST_COMMAND)
    ]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line.startswith(command)], (command, ci)
    # tests/speed and tests/cluster run alone, after the rest (tests/conftest.py refuses -n)
    assert command.endswith('.venv/bin/python -m pytest -m "speed or cluster"')
