"""The latency model: fitted from synthetic client-rounds with known parameters, it gives
them back; what it predicts is the sum of its parts; its file round-trips."""

import csv
import json

import numpy as np
import pytest

from measurements.latency_model import (
    DeviceModel,
    LatencyModel,
    LatencyModelError,
    LinkModel,
    calibrate,
    fit,
    fit_link,
    least_squares,
)

TRUE_DEVICES = {
    "raspberry-pi-4": DeviceModel(startup_s=2.0, step_s=0.50, step_per_rank_s=0.02, step_per_prune_s=-0.40, wait_s=0.30,
                                  step_by_strategy={"flora": 0.0, "fedspine": 0.08}, downlink_extra_s=0.03, uplink_extra_s=0.05),
    "jetson-orin-nano": DeviceModel(startup_s=1.0, step_s=0.15, step_per_rank_s=0.005, step_per_prune_s=-0.10, wait_s=0.25,
                                    step_by_strategy={"flora": 0.0, "fedspine": 0.02}),
}
TRUE_LINKS = {  # network -> (down, up)
    "wifi": (LinkModel(latency_s=0.05, mbit=100.0), LinkModel(latency_s=0.06, mbit=80.0)),
    "5g": (LinkModel(latency_s=0.10, mbit=265.8), LinkModel(latency_s=0.12, mbit=14.56)),
}


def synthetic_rows(noise=0.02, seed=0, steps=20):
    rng = np.random.default_rng(seed)
    rows = []
    for device, d in TRUE_DEVICES.items():
        for network, (down, up) in TRUE_LINKS.items():
            for rank in (4, 8, 16):
                # FLoRA (most rows: the reference) never prunes; FedSpine prunes 0 to 0.5 and does more per
                # step: its overhead must not be read as pruning's
                for strategy, prune in (("flora", 0.0),) * 4 + (("fedspine", 0.0), ("fedspine", 0.2), ("fedspine", 0.5)):
                    for bytes_down in (7.1e6, 1.2e6):  # FLoRA: dense, then stacked
                        bytes_up = rank * 60_000 * (1 - prune)
                        loop = steps * (d.step_s + d.step_per_rank_s * rank + d.step_per_prune_s * prune + d.step_by_strategy[strategy])
                        jitter = lambda: 1 + noise * rng.uniform(-1, 1)  # noqa: E731
                        rows.append({
                            "device": device, "network": network, "steps": steps, "rank": rank, "prune": prune, "strategy": strategy,
                            "loop_s": loop * jitter(), "train_s": (loop + d.startup_s) * jitter(), "wait_s": d.wait_s * jitter(),
                            "downlink_s": (down.transfer_s(bytes_down) + d.downlink_extra_s) * jitter(),
                            "uplink_s": (up.transfer_s(bytes_up) + d.uplink_extra_s) * jitter(),
                            "bytes_down": bytes_down, "bytes_up": bytes_up, "link_down_mbit": None, "link_up_mbit": None,
                        })
    return rows


def close(got, want, tol=0.05):
    return abs(got - want) <= tol * abs(want)


def test_the_fit_recovers_known_parameters_within_5_percent():
    model = fit(synthetic_rows())
    for name, true in TRUE_DEVICES.items():
        got = model.devices[name]
        for field in ("startup_s", "step_s", "step_per_rank_s", "step_per_prune_s", "wait_s"):
            assert close(getattr(got, field), getattr(true, field)), (name, field, getattr(got, field), getattr(true, field))
        assert close(got.step_by_strategy["fedspine"], true.step_by_strategy["fedspine"]), (name, got.step_by_strategy)
    for network, (down, up) in TRUE_LINKS.items():
        for got, true in ((model.down[network], down), (model.up[network], up)):
            assert got.fitted == "slope"
            assert close(got.mbit, true.mbit), (network, got, true)
        # a link's latency and a device's extra are one sum per (device, network): it is what must come back
        for name, true_device in TRUE_DEVICES.items():
            got_device = model.devices[name]
            for got_link, true_link, extra, true_extra in (
                (model.down[network], down, got_device.downlink_extra_s, true_device.downlink_extra_s),
                (model.up[network], up, got_device.uplink_extra_s, true_device.uplink_extra_s),
            ):
                assert abs(got_link.latency_s + extra - true_link.latency_s - true_extra) < 0.01, (name, network, got_link, extra)
    assert model.error["e2e_s"] < 0.03  # the fit explains its rows to about their noise


def test_a_prediction_is_the_sum_of_its_phases_with_each_part_from_its_owner():
    down, up = TRUE_LINKS["5g"]
    model = LatencyModel(devices=TRUE_DEVICES, down={"5g": down}, up={"5g": up}, steps=20)
    p = model.phases("raspberry-pi-4", "5g", steps=10, rank=8, prune=0.5, bytes_down=2_000_000, bytes_up=100_000)
    assert p["train_s"] == pytest.approx(2.0 + 10 * (0.50 + 0.02 * 8 - 0.40 * 0.5))
    assert p["downlink_s"] == pytest.approx(0.10 + 8 * 2_000_000 / 265.8e6 + 0.03)  # the link's, plus the Pi's own
    assert p["uplink_s"] == pytest.approx(0.12 + 8 * 100_000 / 14.56e6 + 0.05)
    assert p["wait_s"] == 0.30
    assert p["e2e_s"] == pytest.approx(p["downlink_s"] + p["train_s"] + p["uplink_s"] + p["wait_s"])
    with pytest.raises(LatencyModelError, match="device 'toaster' is not in the latency model"):
        model.phases("toaster", "5g", steps=1, rank=1, prune=0, bytes_down=1, bytes_up=1)


def test_one_payload_size_falls_back_on_the_configured_rate():
    sizes, seconds = [7e6] * 5, [0.1 + 8 * 7e6 / 100e6] * 5
    link = fit_link(sizes, seconds, [100.0] * 5)
    assert link.fitted == "link rate" and link.mbit == 100.0 and link.latency_s == pytest.approx(0.1)
    with pytest.raises(LatencyModelError, match="do not spread enough"):
        fit_link(sizes, seconds, [None] * 5)


def test_a_higher_rank_never_trains_faster():
    from measurements.latency_model import fit_device

    rows = [{"steps": 10, "rank": r, "prune": 0.0, "loop_s": 10 * s, "train_s": 10 * s + 1.0, "wait_s": 0.5}
            for r, s in ((4, 2.2), (4, 2.1), (4, 2.2), (8, 2.0), (8, 2.1), (8, 2.0))]  # rank 8 ran on a quieter host
    d = fit_device(rows)
    assert d.step_per_rank_s == 0.0 and d.step_s == pytest.approx((2.2 + 2.1 + 2.2 + 2.0 + 2.1 + 2.0) / 6)


def test_a_column_without_spread_gets_no_coefficient():
    c = least_squares({"1": [1] * 4, "rank": [8] * 4, "prune": [0, 0.5, 1.0, 1.5]}, [1.0, 2.0, 3.0, 4.0])
    assert c["rank"] == 0.0 and c["1"] == pytest.approx(1.0) and c["prune"] == pytest.approx(2.0)
    # one pruned row among many (a bandit that tried it once) is its own noise, not a slope
    c = least_squares({"1": [1] * 6, "prune": [0, 0, 0, 0, 0, 0.1]}, [3.5, 3.6, 3.5, 3.4, 3.5, 4.6])
    assert c["prune"] == 0.0 and c["1"] == pytest.approx(sum([3.5, 3.6, 3.5, 3.4, 3.5, 4.6]) / 6)


def test_the_file_round_trips(tmp_path):
    model = fit(synthetic_rows(), workload={"model.path": "m"}, fitted_from=["runs/1"])
    model.save(tmp_path / "m.json")
    again = LatencyModel.load(tmp_path / "m.json")
    assert again == model
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LatencyModelError, match="format 'other'"):
        LatencyModel.load(tmp_path / "bad.json")


def write_synthetic_runs(tmp_path):
    """Run directories 7 (FLoRA's rows) and 8 (FedSpine's): clients.csv rows as the
    measurement layer writes them (synthetic, known parameters), plus a refused row and
    a simulated one that must not be fitted. Returns the directories and the rows to fit."""
    from measurements.tables import CLIENTS_COLUMNS

    runs, fitted = [], 0
    for name, strategy in (("7", "flora"), ("8", "fedspine")):
        run = tmp_path / name
        run.mkdir()
        (run / "stamen-config.json").write_text(json.dumps({"train.local-steps": 20, "model.path": "m", "model.task": "t",
                                                            "model.max-seq-len": 32, "train.batch-size": 8, "strategy.name": strategy}))
        rows = []
        for i, r in enumerate(r for r in synthetic_rows() if r["strategy"] == strategy):
            rows.append({
                "round": 1 + i % 3, "node_id": i, "device_class": "x", "device": r["device"], "network": r["network"],
                "status": "ok", "clock": "measured", "train_s": r["train_s"], "loop_s": r["loop_s"], "wait_s": r["wait_s"],
                "downlink_s": r["downlink_s"], "uplink_s": r["uplink_s"], "payload_down_bytes": int(r["bytes_down"]),
                "payload_up_bytes": int(r["bytes_up"]), "lora_rank": r["rank"], "prune_ratio": r["prune"],
            })
        fitted += len(rows)
        rows.append({**rows[0], "status": "rejected", "train_s": 1e6})
        rows.append({**rows[0], "clock": "simulated", "train_s": 1e6})
        with open(run / "clients.csv", "w", newline="") as f:
            w = csv.DictWriter(f, CLIENTS_COLUMNS, restval="")
            w.writeheader()
            w.writerows(rows)
        runs.append(run)
    return runs, fitted


def test_calibrate_reads_run_directories(tmp_path):
    """Refused and simulated rows are not fitted; each run's strategy comes from its config; one workload per model."""
    runs, fitted = write_synthetic_runs(tmp_path)
    model, used = calibrate(runs)
    assert len(used) == fitted
    pi = model.devices["raspberry-pi-4"]
    assert close(pi.startup_s, 2.0) and close(pi.step_per_prune_s, -0.40) and close(pi.step_by_strategy["fedspine"], 0.08)
    assert model.workload["model.path"] == "m"
    other = tmp_path / "9"
    other.mkdir()
    (other / "stamen-config.json").write_text(json.dumps({"train.local-steps": 20, "model.path": "other"}))
    (other / "clients.csv").write_text((runs[0] / "clients.csv").read_text())
    with pytest.raises(LatencyModelError, match="different workloads"):
        calibrate([*runs, other])
