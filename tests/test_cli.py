"""The command line's handling of a run config a person got wrong: one line naming the key,
exit code 2, and nothing started; and ``output.dir`` honoured."""

from pathlib import Path

import pytest

from cli.main import RunConfigError, checked_run_config, last_exception, main


@pytest.mark.parametrize(
    ("items", "named"),
    [
        (["strategy.num-round=3"], "strategy.num-round (did you mean strategy.num-rounds?)"),
        (["strategy.num-rounds=0"], "strategy.num-rounds = 0"),
        (["strategy.num-rounds=abc"], "strategy.num-rounds=abc"),
        (["robust.over-bound=\"maybe\""], "accepted values: clip, drop"),
        (["/no/such/overlay.toml"], "no such file: /no/such/overlay.toml"),
    ],
)
def test_a_bad_run_config_is_one_line_naming_the_problem(items, named):
    with pytest.raises(RunConfigError) as err:
        checked_run_config(items, None)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_toml_overlay_that_does_not_parse_is_named(tmp_path):
    overlay = tmp_path / "bad.toml"
    overlay.write_text('"lora.rank" = \n')
    with pytest.raises(RunConfigError, match="TOML file does not parse"):
        checked_run_config([str(overlay)], None)


def test_stamen_local_exits_2_without_starting_anything(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["local", "--nodes", "2", "--output", str(out), "--run-config", "lora.rank=-1"]) == 2
    assert "[stamen] error: lora.rank = -1: must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()  # no process, no run directory
    assert main(["simulate", "--nodes", "2", "--output", str(out), "--run-config", "nope=1"]) == 2
    assert not out.exists()


def test_the_run_configs_output_dir_is_honoured_unless_output_is_given(tmp_path):
    _, output = checked_run_config([f'output.dir="{tmp_path / "mine"}"'], None)
    assert output == (tmp_path / "mine").resolve()
    _, output = checked_run_config([f'output.dir="{tmp_path / "mine"}"'], str(tmp_path / "flag"))
    assert output == (tmp_path / "flag").resolve()
    assert checked_run_config([], None)[1] == Path("runs").resolve()


def test_a_failed_run_names_the_serverapps_exception(tmp_path):
    log = tmp_path / "flwr-run.log"
    log.write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "stamen.config.ConfigError: model.path = '/nope': no such directory\nERROR : Exit Code: 201\n"
    )
    assert last_exception(log) == "stamen.config.ConfigError: model.path = '/nope': no such directory"
    assert last_exception(tmp_path / "missing.log") == ""
