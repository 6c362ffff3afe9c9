"""`stamen study` on hand-written run directories: grouping by strategy and rank setting,
mean and sample std of the final accuracy, downlink per round, the files it writes."""

import json

import pytest

from cli.study import study


def _run(root, name, strategy, ranks, seed, accuracy, downlink):
    d = root / name
    d.mkdir(parents=True)
    config = {"strategy.name": strategy, "lora.rank-by-partition": ranks, "train.seed": seed, "strategy.num-rounds": 2}
    (d / "stamen-config.json").write_text(json.dumps(config))
    lines = ["round,eval_accuracy,downlink_bytes"] + [
        f"{i},{a},{downlink[i - 1] if i else ''}" for i, a in enumerate(accuracy)
    ]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_table_by_hand(tmp_path):
    _run(tmp_path, "1", "flora", [4, 8], 0, [0.2, 0.5, 0.8], [7_000_000, 1_000_000])
    _run(tmp_path, "2", "flora", [4, 8], 1, [0.2, 0.6, 0.9], [7_000_000, 3_000_000])
    _run(tmp_path, "3", "fedit", [8], 0, [0.2, 0.4, 0.7], [7_000_000, 500_000])
    _run(tmp_path, "4", "fedit", [8], 1, [0.2, 0.1], [7_000_000])  # unfinished: 1 of 2 rounds, left out
    lines = []
    rows = {(r["strategy"], r["setting"]): r for r in study([tmp_path], echo=lines.append)}
    flora = rows[("flora", "heterogeneous")]
    assert flora["runs"] == 2 and flora["rounds"] == 2
    assert flora["final_accuracy_mean"] == pytest.approx(0.85)
    assert flora["final_accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.8, 0.9
    assert flora["downlink_round1_mb"] == pytest.approx(7.0) and flora["downlink_later_mb"] == pytest.approx(2.0)
    assert rows[("fedit", "homogeneous")]["final_accuracy_mean"] == pytest.approx(0.7)
    assert (tmp_path / "study.png").stat().st_size > 0 and json.loads((tmp_path / "study.json").read_text())
    assert any("0.850 +- 0.071" in line for line in lines)


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        study([tmp_path])


def _exit_run(root, name, strategy, seed, means, exits, ensemble, epsilons=None):
    d = root / name
    d.mkdir(parents=True)
    config = {"strategy.name": strategy, "data.name": "digits", "train.seed": seed, "strategy.num-rounds": len(means) - 1}
    if epsilons:  # a local-DP run with a target epsilon, and the privacy.csv its nodes filled
        config.update({"dp.mode": "local", "dp.epsilon": 8.0, "dp.noise-multiplier": 0.0})
        (d / "privacy.csv").write_text("round,node_id,epsilon\n" + "".join(f"1,{i},{e}\n" for i, e in enumerate(epsilons)))
    (d / "stamen-config.json").write_text(json.dumps(config))
    header = "round,eval_accuracy_exit1,eval_accuracy_exit2,eval_accuracy_mean,eval_accuracy_ensemble,eval_accuracy_at_0.9,eval_blocks_at_0.9"
    lines = [header] + [f"{i},{exits[0]},{exits[1]},{m},{ensemble},{exits[1]},0.75" for i, m in enumerate(means)]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_early_exit_runs_get_their_own_table(tmp_path):
    _exit_run(tmp_path, "1", "reefl", 0, [0.1, 0.8], [0.7, 0.9], 0.85)
    _exit_run(tmp_path, "2", "reefl", 1, [0.1, 0.6], [0.5, 0.7], 0.75)
    _exit_run(tmp_path, "3", "depthfl", 0, [0.1, 0.5], [0.4, 0.6], 0.55)
    _exit_run(tmp_path, "4", "reefl", 0, [0.1, 0.3], [0.2, 0.4], 0.35, epsilons=[7.99, 8.0])
    lines = []
    rows = {r["strategy"]: r for r in study([tmp_path], echo=lines.append)}
    assert set(rows) == {"reefl", "reefl, local DP eps 8", "depthfl"}  # DP runs are their own row
    private = rows["reefl, local DP eps 8"]
    assert private["runs"] == 1 and private["final_mean_accuracy"] == pytest.approx(0.3) and private["epsilon_max"] == 8.0
    assert any(line.startswith("| digits | reefl, local DP eps 8 |") and line.endswith(" 8.000 |") for line in lines)
    reefl = rows["reefl"]
    assert reefl["runs"] == 2 and reefl["final_mean_accuracy"] == pytest.approx(0.7)
    assert reefl["final_mean_accuracy_std"] == pytest.approx(0.1414214, rel=1e-5)
    assert reefl["final_exit_accuracy"] == pytest.approx([0.6, 0.8]) and reefl["final_ensemble_accuracy"] == pytest.approx(0.8)
    assert reefl["early_exit"] == [{"threshold": 0.9, "blocks": 0.75, "accuracy": pytest.approx(0.8)}]
    assert (tmp_path / "exit_study.png").stat().st_size > 0
    assert any("0.700 +- 0.141" in line and "0.800 / 75%" in line for line in lines)


def test_fedspine_study_time_to_target_and_ratios():
    import math

    from cli.fedspine_study import table, time_to

    curve = [(10.0, 0.2), (70.0, 0.85), (130.0, 0.91), (190.0, 0.89)]
    assert time_to(curve, 0.9) == 130.0 and math.isnan(time_to(curve, 0.95))
    rows = {
        "bandit": {"run": "a", "strategy": "fedspine", "curve": curve, "round_s": [60.0, 58.0, 62.0],
                   "train_s": {"1": [40.0, 30.0], "2": [10.0]}, "profiles": {}, "arms": []},
        "no-pruning": {"run": "b", "strategy": "fedspine", "curve": [(10.0, 0.2), (260.0, 0.93)], "round_s": [80.0], "train_s": {}, "profiles": {}, "arms": []},
    }
    out = {x["row"]: x for x in table(rows, 0.9)}
    assert out["bandit"]["time_to_target_vs_bandit"] == 1.0 and out["no-pruning"]["time_to_target_vs_bandit"] == 2.0
    assert out["bandit"]["median_round_s"] == 60.0 and out["bandit"]["slowest_node_train_s"] == 35.0
    assert out["bandit"]["final_accuracy"] == 0.89 and out["bandit"]["best_accuracy"] == 0.91
