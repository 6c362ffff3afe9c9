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


def test_a_simulated_clock_is_checked_before_anything_starts(tmp_path, capsys):
    from measurements.latency_model import DeviceModel, LatencyModel, LinkModel

    model = tmp_path / "m.json"
    LatencyModel(devices={"pi": DeviceModel(1.0, 0.1)}, down={"wifi": LinkModel(0.0, 10.0)}, up={"wifi": LinkModel(0.0, 10.0)},
                 steps=1).save(model)
    out = tmp_path / "runs"
    cases = [
        (["--latency-model", str(model)], "--latency-model and --fleet go together"),
        (["--latency-model", str(model), "--fleet", "pi=3", "--nodes", "4"], "--nodes 4 but the fleet has 3"),
        (["--latency-model", str(model), "--fleet", "pi@5g=3"], "fleet network '5g' is not in the latency model"),
        (["--latency-model", str(tmp_path / "none.json"), "--fleet", "pi=3"], "cannot be read"),
    ]
    for flags, named in cases:
        assert main(["simulate", "--output", str(out), *flags]) == 2
        assert named in capsys.readouterr().err
    assert not out.exists()


def test_stamen_calibrate_writes_the_model_and_prints_its_error(tmp_path, capsys):
    from tests.test_latency_model import write_synthetic_runs

    runs, _ = write_synthetic_runs(tmp_path)  # a FLoRA run and a FedSpine run: synthetic rows with known parameters
    assert main(["calibrate", *map(str, runs), "--out", str(tmp_path / "model.json")]) == 0
    text = capsys.readouterr().out
    assert "device raspberry-pi-4: start-up 1.97 s, step 0.501 s + 0.0200 s/rank -0.399 s x pruning ratio, fedspine +0.080 s/step" in text
    assert "fit error" in text and (tmp_path / "model.json").is_file()
    assert main(["calibrate", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_the_fleet_study_times_the_first_round_at_the_target():
    from cli.fleet_study import time_to

    rows = [{"round": "0", "eval_accuracy": "0.2", "elapsed_s": "0"}, {"round": "1", "eval_accuracy": "0.79", "elapsed_s": "60"},
            {"round": "2", "eval_accuracy": "0.85", "elapsed_s": "130"}, {"round": "3", "eval_accuracy": "0.9", "elapsed_s": "200"}]
    assert time_to(rows, 0.8) == (2, 130.0)
    assert time_to(rows, 0.95) is None
