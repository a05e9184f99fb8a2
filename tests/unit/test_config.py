"""The config: defaults, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from shardprop.service.config import load_config
from shardprop.service.errors import ConfigError


def test_empty_config_is_complete_and_defaults_to_two_moons(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    config = load_config(path)
    assert config.data.synthetic.name == "moons"
    assert config.model.hidden == [32, 32]
    assert config.train.steps == 500
    assert config.cluster.workers == 2
    assert config.tracking.uri is None


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_config_file_is_the_embedded_default():
    config = load_config(CONFIGS / "default.yaml")
    assert config.data.synthetic.name == "moons"
    assert config.data.synthetic.rows == 20_000
    assert config.model.hidden == [32, 32]
    assert (config.cluster.workers, config.cluster.address, config.tracking.uri) == (2, None, None)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_set_overrides_parse_yaml_and_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 10}\ncluster: {workers: 3}\n")
    config = load_config(
        path,
        ["model.hidden=[8, 4]", "train.learning_rate=0.01", "cluster.workers=1"],
        {"cluster.workers": 0, "tracking.experiment": "123", "tracking.uri": None},
    )
    assert config.model.hidden == [8, 4]
    assert config.train.learning_rate == 0.01
    assert config.train.steps == 10
    assert config.cluster.workers == 0
    assert config.tracking.experiment == "123"  # a flag's value is taken as given


def test_resolved_config_holds_every_key():
    resolved = load_config(None).resolved()
    assert set(resolved) == {"data", "model", "train", "cluster", "tracking"}
    assert resolved["train"]["learning_rate"] == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.learnig_rate=1",
            "train.learnig_rate: unknown key; did you mean 'train.learning_rate'?",
        ),
        ("data.synthetic.nam=moons", "did you mean 'data.synthetic.name'?"),
        ("trian.steps=3", "trian: unknown key; did you mean 'train'?"),
        ("train.learning_rate=0", "train.learning_rate: Input should be greater than 0"),
        ("train.learning_rate=-1", "train.learning_rate: Input should be greater than 0"),
        ("train.steps=0", "train.steps: Input should be greater than 0"),
        ("train.steps=many", "train.steps: Input should be a valid integer"),
        ("model.activation=softmax", "model.activation: Input should be 'relu'"),
        ("model.hidden=[4, 0]", "model.hidden: layer widths must be >= 1"),
        ("cluster.workers=-1", "cluster.workers: Input should be greater than or equal to 0"),
        ("data.path=x.parquet", "give either data.path or data.synthetic"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("data: {synthetic: {name: moons}}\n" if "data.path" in override else "{}")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.steps"])
