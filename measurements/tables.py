"""clients.csv and resources.csv: joining what the server saw with what the nodes measured.

Pure functions over plain data (``SentMessage`` rows from the TimingGrid, events from the
TelemetryStore, device profiles), so the arithmetic is testable without Flower. The
columns and their clocks are documented in docs/measurements.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import events as ev
from .grid import SentMessage

CLIENTS_COLUMNS = (
    "round",
    "node_id",
    "device_class",
    "network",
    "transport",
    "start",  # cold | forked | warm | simulation: how the ClientApp process started (docs/runtime.md)
    "status",  # ok | clipped | reweighted (accepted) | rejected (the server refused the update) | error | late
    "reason",  # why, for every status but ok (the server's words)
    "e2e_s",  # server: sent -> reply pulled
    "downlink_s",  # device: pull RPCs of the instruction
    "train_s",  # device: the handler (load + loop + serialize + the rest)
    "load_s",
    "loop_s",
    "serialize_s",
    "train_cpu_s",  # device: CPU seconds of the ClientApp process (all threads) in the handler
    "load_cpu_s",
    "loop_cpu_s",
    "serialize_cpu_s",
    "uplink_s",  # device: push RPCs of the reply
    "wait_s",  # e2e - downlink - train - uplink: Flower's polling, queueing, process start
    "queue_s",  # server send -> device starts pulling (two clocks: uses clock_offset_s)
    "app_start_s",  # device: ClientApp process start (or fork) -> handler start
    "message_wait_s",  # device, warm runtime: of app_start_s, waiting for the message from the SuperNode
    "reply_wait_s",  # device uplink done -> server pulls the reply (two clocks)
    "setup_s",  # device: GetRun + GetFab (first message of a run)
    "bytes_down",  # serialized protobuf bytes of the pull RPCs' responses
    "bytes_up",  # serialized protobuf bytes of the push RPCs' requests
    "rpcs_down",  # device: Fleet RPCs of the downlink (PullMessages .. ConfirmMessageReceived)
    "rpcs_up",  # device: Fleet RPCs of the uplink (PushMessages + PushObject)
    "pull_retries",  # device: of rpcs_down, PullObject calls answered "not there yet" (asked again)
    "link_down_mbit",  # the link's rate, where the node's config names it (the testbed does)
    "link_up_mbit",
    "payload_down_bytes",  # ArrayRecord bytes of the instruction
    "payload_up_bytes",  # ArrayRecord bytes of the reply
    "rss_peak_bytes",
    "node_rss_bytes",  # device: the SuperNode and its executor when the message arrived
    "cpu_mean_pct",
    "cpu_max_pct",
    "temp_max_c",
    "gpu_mem_peak_bytes",
    "clock_offset_s",  # server clock - device clock (min-RTT NTP estimate)
    "clock_rtt_s",
    "transfer_via",  # telemetry | reply | unavailable | missing
    "phases_via",  # telemetry | reply | missing
    "device",  # the testbed's device profile (deploy/profiles.toml), else the device class
    "lora_rank",  # what the node was asked to train: its instruction's LoRA rank ...
    "prune_ratio",  # ... and pruning ratio (FedSpine; 0 otherwise): the latency model's inputs
    "clock",  # measured | simulated (a latency model's times: docs/scale.md)
)
RESOURCES_COLUMNS = (
    "round",
    "node_id",
    "unix_s",  # device clock
    "t_s",  # since the handler started (device clock)
    "rss_bytes",
    "cpu_pct",  # this process; 100 = one core
    "system_cpu_pct",  # whole machine; 100 = all cores
    "temp_c",
    "gpu_mem_bytes",
    "via",
)
_PHASE_CPU = ("load_cpu_s", "loop_cpu_s", "serialize_cpu_s")
_RESOURCE_SUMMARY = ("rss_peak_bytes", "cpu_mean_pct", "cpu_max_pct", "temp_max_c", "gpu_mem_peak_bytes")
TIMES_TRANSFERS = "stamen-supernode"
ACCEPTED = ("ok", "clipped", "reweighted")  # statuses whose update went into the aggregate


def _round(group_id: str) -> int | str:
    return int(group_id) if group_id.isdigit() else group_id


def _clock(train: ev.Event | None) -> str:
    """measured, or emulated when the node padded its training to an emulated device's
    time (client_app/pace.py); emulated-late when the host was slower than that device."""
    if train is None:
        return "measured"
    if "emulated_over_s" in train.values:
        return "emulated-late"
    return "emulated" if "emulated_wait_s" in train.values else "measured"


def _status(m: SentMessage, outcome: tuple[str, str] | None) -> dict[str, str]:
    if m.received_unix_s is None:
        return {"status": "late", "reason": "no reply before the round timeout"}
    if m.error:
        return {"status": "error", "reason": m.error}
    status, reason = outcome or ("ok", "")
    return {"status": status, "reason": reason}


def client_rows(
    sent: Iterable[SentMessage],
    events: Iterable[tuple[ev.Event, str]],
    profiles: dict[int, dict[str, Any]] | None = None,
    *,
    message_type: str = "train",
    outcomes: dict[tuple[int, int], tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """One row per sent message of ``message_type``. ``outcomes``: (round, node) ->
    (status, reason), what the strategy did with a reply that arrived without an error
    (rejected, clipped, reweighted); without one it is ``ok``."""
    profiles = profiles or {}
    outcomes = outcomes or {}
    events = list(events)
    clocks = ev.best_clocks(e for e, _ in events)
    by_message: dict[tuple[str, str], tuple[ev.Event, str]] = {}
    for e, via in events:
        if e.kind not in (ev.CLOCK, ev.SAMPLE) and e.message_id:
            by_message.setdefault((e.message_id, e.kind), (e, via))

    rows = []
    for m in sorted(sent, key=lambda m: (str(m.group_id).zfill(8), m.node_id)):
        if m.message_type != message_type:
            continue
        profile = profiles.get(m.node_id, {})
        train, train_via = by_message.get((m.message_id, message_type), (None, "missing"))
        down, down_via = by_message.get((m.message_id, ev.DOWNLINK), (None, None))
        up, up_via = by_message.get((m.message_id, ev.UPLINK), (None, None))
        clock = clocks.get(m.node_id)
        offset = clock.values.get("offset_s") if clock else None
        first = train or down or up
        transport = first.labels.get("transport", "") if first else ""

        row: dict[str, Any] = {
            "round": _round(m.group_id),
            "node_id": m.node_id,
            "device_class": profile.get("device-class") or (train.labels.get("device-class") if train else "") or "",
            "network": profile.get("network") or (train.labels.get("network") if train else "") or "unknown",
            "transport": transport,
            **_status(m, outcomes.get((_round(m.group_id), m.node_id))),
            "e2e_s": m.e2e_s,
            "payload_down_bytes": m.payload_bytes,
            "device": profile.get("testbed-device") or profile.get("device-class") or "",
            "lora_rank": m.lora_rank,
            "prune_ratio": m.prune_ratio,
            "clock": _clock(train),
            "link_down_mbit": profile.get("link-down-mbit"),
            "link_up_mbit": profile.get("link-up-mbit"),
            "payload_up_bytes": m.reply_payload_bytes if m.received_unix_s is not None else None,
            "phases_via": train_via if train else "missing",
        }
        if down is not None:
            row.update(downlink_s=down.duration_s, bytes_down=down.values.get("bytes"), setup_s=down.values.get("setup_s"), rpcs_down=down.values.get("rpcs"),
                       pull_retries=down.values.get("retries"))
        if up is not None:
            row.update(uplink_s=up.duration_s, bytes_up=up.values.get("bytes"), rpcs_up=up.values.get("rpcs"))
        if train is not None:
            row["start"] = train.labels.get("start", "")
            row["train_s"] = train.duration_s
            row["train_cpu_s"] = train.values.get("cpu_s")
            for name in ("load_s", "loop_s", "serialize_s", "app_start_s", "message_wait_s", "node_rss_bytes", *_PHASE_CPU, *_RESOURCE_SUMMARY):
                row[name] = train.values.get(name)
        if down is not None and up is not None and train is not None and m.e2e_s is not None:
            row["wait_s"] = m.e2e_s - down.duration_s - train.duration_s - up.duration_s
        if clock is not None:
            row.update(clock_offset_s=offset, clock_rtt_s=clock.values.get("rtt_s"))
            if down is not None:
                row["queue_s"] = down.start_unix_s + offset - m.sent_unix_s
            if up is not None and m.received_unix_s is not None:
                row["reply_wait_s"] = m.received_unix_s - (up.end_unix_s + offset)
        if down is not None or up is not None:
            vias = {v for v in (down_via, up_via) if v}
            row["transfer_via"] = vias.pop() if len(vias) == 1 else "+".join(sorted(vias))
            if down is None or up is None:
                row["transfer_via"] += " (partial)"
        elif transport and transport != TIMES_TRANSFERS:
            row["transfer_via"] = "unavailable"
        else:
            row["transfer_via"] = "missing"
        rows.append(row)
    return rows


def resource_rows(sent: Iterable[SentMessage], events: Iterable[tuple[ev.Event, str]]) -> list[dict[str, Any]]:
    rounds = {m.message_id: m for m in sent}
    events = list(events)
    starts = {e.message_id: e.start_unix_s for e, _ in events if e.kind in ev.HANDLERS}
    rows = []
    for e, via in events:
        if e.kind != ev.SAMPLE or e.message_id not in rounds:
            continue
        m = rounds[e.message_id]
        start = starts.get(e.message_id)
        rows.append(
            {
                "round": _round(m.group_id),
                "node_id": m.node_id,
                "unix_s": e.start_unix_s,
                "t_s": e.start_unix_s - start if start is not None else None,
                **{k: e.values.get(k) for k in ev.SAMPLE_VALUES},
                "via": via,
            }
        )
    rows.sort(key=lambda r: (str(r["round"]).zfill(8), r["node_id"], r["unix_s"]))
    return rows
