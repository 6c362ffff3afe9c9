"""`stamen report` on small hand-written run directories."""

import csv
import json

import pytest

from cli.main import main
from measurements.report import Run, compare, percentile, phase_stats, report, stragglers
from measurements.tables import CLIENTS_COLUMNS
from server_app.run_dir import ROUNDS_COLUMNS


def _write(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _run_dir(tmp_path, name, network, uplink):
    d = tmp_path / name
    d.mkdir()
    _write(d / "rounds.csv", ROUNDS_COLUMNS, [{"round": 1, "aggregation_s": 1.0, "round_s": 10.0}, {"round": 2, "aggregation_s": 1.0, "round_s": 10.0}])
    rows = []
    for rnd in (1, 2):
        for node in (1, 2):
            rows.append(
                {"round": rnd, "node_id": node, "device_class": "jetson" if node == 1 else "raspberry-pi", "network": network,
                 "status": "ok", "e2e_s": 9.0, "downlink_s": 1.0, "train_s": 9.0 - 1.0 - uplink - 1.0, "uplink_s": uplink,
                 "wait_s": 1.0, "transfer_via": "telemetry"}
            )
    rows.append({"round": 2, "node_id": 3, "network": network, "status": "late"})  # not counted
    _write(d / "clients.csv", CLIENTS_COLUMNS, rows)
    return d


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10.0], 95) == 10.0
    assert percentile([0, 10], 95) == pytest.approx(9.5)


def test_shares_by_hand(tmp_path):
    run = Run.load(_run_dir(tmp_path, "a", "wifi", uplink=2.0))
    stats = phase_stats(run)
    # 4 rows of uplink 2 s, each in a 10 s round: 8 / 40
    assert stats["uplink_s"]["share"] == pytest.approx(0.2) and stats["uplink_s"]["n"] == 4
    assert stats["aggregation_s"]["share"] == pytest.approx(0.1)
    assert stats["train_s"]["median"] == pytest.approx(5.0)


def test_comparison_ratio_and_files(tmp_path):
    a = _run_dir(tmp_path, "a", "5g", uplink=3.0)
    b = _run_dir(tmp_path, "b", "ethernet", uplink=0.5)
    assert compare([Run.load(a), Run.load(b)])["uplink_ratio"]["5g/ethernet"] == pytest.approx(6.0)
    lines = []
    written = report([a, b], out=tmp_path / "cmp", echo=lines.append)
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert (a / "phases_per_round.png").is_file() and (tmp_path / "cmp" / "comparison.png").is_file()
    assert any("uplink time ratio 5g/ethernet: 6.00x" in line for line in lines)
    assert any(line.strip().startswith("5g") and "uplink 30.0%" in line for line in lines)  # 4 x 3 s of 40 s
    assert json.loads((a / "summary.json").read_text())["label"] == "5g"


def test_stragglers_by_hand(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    _write(d / "rounds.csv", ROUNDS_COLUMNS, [{"round": 1, "round_s": 10.0}, {"round": 2, "round_s": 20.0}])
    rows = [  # round 1: e2e 2, 4, 8 (median 4); round 2: 3, 3, 18 (median 3)
        {"round": 1, "node_id": 1, "device_class": "jetson", "status": "ok", "e2e_s": 2.0},
        {"round": 1, "node_id": 2, "device_class": "jetson", "status": "ok", "e2e_s": 4.0},
        {"round": 1, "node_id": 3, "device_class": "raspberry-pi", "status": "ok", "e2e_s": 8.0},
        {"round": 2, "node_id": 1, "device_class": "jetson", "status": "ok", "e2e_s": 3.0},
        {"round": 2, "node_id": 2, "device_class": "jetson", "status": "ok", "e2e_s": 3.0},
        {"round": 2, "node_id": 3, "device_class": "raspberry-pi", "status": "ok", "e2e_s": 18.0},
        {"round": 2, "node_id": 4, "device_class": "jetson", "status": "late"},  # not counted
    ]
    _write(d / "clients.csv", CLIENTS_COLUMNS, rows)
    st = stragglers(Run.load(d))
    assert st["slowest_over_median_e2e"] == pytest.approx((8 / 4 + 18 / 3) / 2)
    assert st["slowest_e2e_over_round"] == pytest.approx((8 / 10 + 18 / 20) / 2)
    assert st["slowest_over_fastest_e2e"] == pytest.approx((8 / 2 + 18 / 3) / 2)
    # idle: round 1: (0.8 + 0.6 + 0.2) / 3; round 2: (0.85 + 0.85 + 0.1) / 3
    assert st["idle_share"] == pytest.approx(((0.8 + 0.6 + 0.2) / 3 + (0.85 + 0.85 + 0.1) / 3) / 2)
    assert st["slowest_class"] == "raspberry-pi"


def test_cli_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "rounds.csv" in capsys.readouterr().err


def _startup_row(**over):
    """A warm client-round by hand: e2e 10 = downlink 1 + train 5 + uplink 1 + wait 3;
    the worker started 0.5 s before its handler, 0.3 s of it waiting for the message;
    load 0.4, loop 4.5, so the rest of the handler is 0.1."""
    row = {"round": 1, "node_id": 1, "status": "ok", "start": "warm", "e2e_s": 10.0, "downlink_s": 1.0, "train_s": 5.0,
           "uplink_s": 1.0, "wait_s": 3.0, "load_s": 0.4, "loop_s": 4.5, "app_start_s": 0.5, "message_wait_s": 0.3}
    return {k: str(v) for k, v in {**row, **over}.items()}


def test_round_parts_split_start_up_from_the_loop_and_polling_from_transfers():
    from measurements.report import ROUND_PARTS, round_parts

    parts = round_parts(_startup_row())
    assert parts["startup_s"] == pytest.approx(0.2 + 0.4)  # fork to handler less the message wait, plus load
    assert parts["loop_s"] == pytest.approx(4.5)
    assert parts["handler_rest_s"] == pytest.approx(0.1)
    assert parts["poll_s"] == pytest.approx(3.0 - 0.2)
    assert parts["overhead_s"] == pytest.approx(0.6 + 2.8)
    assert sum(parts[p] for p in ROUND_PARTS) == pytest.approx(10.0)  # the parts are the whole round trip
    cold = round_parts(_startup_row(start="cold", app_start_s=2.0, message_wait_s="", load_s=3.0, loop_s=1.9))
    assert cold["startup_s"] == pytest.approx(5.0) and cold["poll_s"] == pytest.approx(1.0)
    assert round_parts(_startup_row(downlink_s="")) == {}  # no transfer timing: not split


def test_report_text_shows_start_up_apart_and_counts_starts(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    _write(d / "rounds.csv", ROUNDS_COLUMNS, [{"round": 1, "aggregation_s": 0.1, "round_s": 10.0}])
    cold = _startup_row(node_id=2, start="cold", app_start_s=2.0, message_wait_s="", load_s=3.0, loop_s=1.9)
    _write(d / "clients.csv", CLIENTS_COLUMNS, [_startup_row(), cold])
    lines = []
    report([d], echo=lines.append)
    text = "\n".join(lines)
    assert "ClientApp starts: 1 cold, 1 warm" in text
    startup = next(line for line in text.splitlines() if line.strip().startswith("start-up"))
    assert startup.split()[1:3] == ["2", f"{(0.6 + 5.0) / 2:.3f}"]  # n, median
    assert "train " not in text and any(line.strip().startswith("polling") for line in text.splitlines())
    summary = json.loads((d / "summary.json").read_text())
    assert summary["overall"]["overhead_s"]["median"] == pytest.approx((3.4 + 6.0) / 2)


def test_transfers_show_goodput_against_the_link_rate_by_hand(tmp_path):
    from measurements.report import format_summary, summarize

    d = tmp_path / "g"
    d.mkdir()
    _write(d / "rounds.csv", ROUNDS_COLUMNS, [{"round": 1, "round_s": 10.0}])
    rows = [  # 5g: 1 MB up in 1 s and 2 s (8 and 4 Mbit/s) and 3 MB in 2 s (12), link 16 Mbit/s
        {"round": 1, "node_id": n, "network": "5g", "status": "ok", "bytes_up": b, "uplink_s": s, "rpcs_up": 9,
         "bytes_down": 4_000_000, "downlink_s": 0.5, "rpcs_down": 11, "link_up_mbit": 16.0, "link_down_mbit": 256.0}
        for n, b, s in ((1, 1_000_000, 1.0), (2, 1_000_000, 2.0), (3, 3_000_000, 2.0))
    ]
    rows.append({"round": 1, "node_id": 4, "network": "lan", "status": "ok", "bytes_up": 500_000, "uplink_s": 0.25})  # no rate known
    rows.append({"round": 1, "node_id": 5, "network": "5g", "status": "late", "bytes_up": 1, "uplink_s": 100.0})  # not counted
    _write(d / "clients.csv", CLIENTS_COLUMNS, rows)
    transfers = summarize(Run.load(d))["transfers"]
    up = transfers["5g"]["uplink"]
    assert up["n"] == 3 and up["mb"] == pytest.approx(1.0) and up["seconds"] == pytest.approx(2.0) and up["rpcs"] == 9
    assert up["goodput_mbit"] == pytest.approx(8.0)  # the median of 8, 4, 12
    assert up["rate_mbit"] == 16.0 and up["of_rate"] == pytest.approx(0.5)
    down = transfers["5g"]["downlink"]
    assert down["goodput_mbit"] == pytest.approx(64.0) and down["of_rate"] == pytest.approx(0.25)
    lan = transfers["lan"]
    assert lan.keys() == {"uplink"} and lan["uplink"]["goodput_mbit"] == pytest.approx(16.0) and "of_rate" not in lan["uplink"]
    text = format_summary(summarize(Run.load(d)))
    assert "0.50 of 16" in text and "(rate not known)" in text


def test_a_report_says_when_its_seconds_were_not_measured(tmp_path):
    from measurements.report import format_summary, summarize

    for clock, shown in (("simulated", True), ("measured", False)):
        d = tmp_path / clock
        d.mkdir()
        _write(d / "rounds.csv", ROUNDS_COLUMNS, [{"round": 1, "round_s": 10.0, "clock": clock}])
        _write(d / "clients.csv", CLIENTS_COLUMNS, [{"round": 1, "node_id": 1, "status": "ok", "train_s": 3.0, "clock": clock}])
        text = format_summary(summarize(Run.load(d)))
        assert ("clock: simulated (docs/scale.md" in text) is shown, text
