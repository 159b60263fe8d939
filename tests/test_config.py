"""Config loading: the embedded default is valid; bad config is exit code 2 naming the key or path."""

import pytest

from flows.cli import main
from pipeline_config import DEFAULT_CONFIG, ConfigError, load_config

pytestmark = pytest.mark.no_prefect  # no flow or task runs: no Prefect server


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(None, ["train.max_steps=7", "gates.max_perplexity=12.5", "merge.mode=original"])
    assert cfg.train.max_steps == 7
    assert cfg.gates.max_perplexity == 12.5
    assert cfg.merge.mode == "original"
    assert load_config(DEFAULT_CONFIG).train.max_steps != 7  # overrides do not leak


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "train.bogus=1"], "train.bogus: unknown key"),
        (["--set", "train.max_steps=abc"], "train.max_steps"),
        (["--set", "merge.mode=sideways"], "merge.mode"),
        (["--set", "noequals"], "expected KEY=VALUE"),
        (["--config", "does/not/exist.yaml"], "config file not found: does/not/exist.yaml"),
    ],
)
def test_bad_config_is_exit_2_naming_the_problem(argv, expected, capsys):
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_missing_required_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {base: x, name: y}\npublish: {repo: r}\n")
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config(path)


def test_not_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
