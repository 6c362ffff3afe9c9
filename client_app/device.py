"""Device profile: what this node is, read from the system, plus node-config overrides."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from measurements.client_mod import transport
from stamen import keys
from stamen.config import DEVICE_CLASSES


def classify_device(*, device_tree_model: str, tegra_release: bool, cuda_available: bool) -> str:
    """raspberry-pi / jetson / nvidia-gpu / cpu, from what the system exposes."""
    model = device_tree_model.lower()
    if "raspberry pi" in model:
        return "raspberry-pi"
    if tegra_release or "jetson" in model or "nvidia orin" in model:
        return "jetson"
    if cuda_available:
        return "nvidia-gpu"
    return "cpu"


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return ""


def detect_profile(node_config: dict[str, Any]) -> dict[str, Any]:
    """The profile a node sends in reply to the server's query."""
    import psutil
    import torch

    cuda = torch.cuda.is_available()
    dt_model = _read("/proc/device-tree/model")
    detected = classify_device(
        device_tree_model=dt_model,
        tegra_release=Path("/etc/nv_tegra_release").exists(),
        cuda_available=cuda,
    )
    device_class = str(node_config.get(keys.NODE_DEVICE_CLASS, detected))
    if device_class not in DEVICE_CLASSES:
        raise ValueError(
            f"node-config {keys.NODE_DEVICE_CLASS}={device_class!r}: accepted values: {', '.join(DEVICE_CLASSES)}"
        )
    profile: dict[str, Any] = {
        "arch": platform.machine(),
        "system": platform.system(),
        "hostname": platform.node(),
        "cpu-count": os.cpu_count() or 1,
        "ram-bytes": int(psutil.virtual_memory().total),
        "device-tree-model": dt_model,
        "cuda-device": torch.cuda.get_device_name(0) if cuda else "",
        "cuda-memory-bytes": int(torch.cuda.get_device_properties(0).total_memory) if cuda else 0,
        "detected-class": detected,
        keys.NODE_DEVICE_CLASS: device_class,
        "torch": torch.__version__,
    }
    profile[keys.NODE_NETWORK] = str(node_config.get(keys.NODE_NETWORK, "unknown"))
    profile["transport"] = transport()
    for key in (keys.NODE_PARTITION_ID, keys.NODE_NUM_PARTITIONS, keys.NODE_LORA_RANK, keys.NODE_MAX_EXIT,
                keys.NODE_LINK_DOWN_MBIT, keys.NODE_LINK_UP_MBIT, keys.NODE_TESTBED_DEVICE):
        if key in node_config:
            profile[key] = node_config[key]
    return profile
