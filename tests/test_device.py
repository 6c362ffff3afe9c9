from client_app.device import classify_device, detect_profile


def test_classify_from_system_facts():
    assert classify_device(device_tree_model="Raspberry Pi 5 Model B Rev 1.0", tegra_release=False, cuda_available=False) == "raspberry-pi"
    assert classify_device(device_tree_model="NVIDIA Jetson Orin Nano Developer Kit", tegra_release=False, cuda_available=True) == "jetson"
    assert classify_device(device_tree_model="", tegra_release=True, cuda_available=True) == "jetson"
    assert classify_device(device_tree_model="", tegra_release=False, cuda_available=True) == "nvidia-gpu"
    assert classify_device(device_tree_model="", tegra_release=False, cuda_available=False) == "cpu"


def test_profile_reads_the_system_and_keeps_overrides():
    profile = detect_profile({"device-class": "jetson", "lora-rank": 16, "partition-id": 1})
    assert profile["device-class"] == "jetson"
    assert profile["detected-class"] in {"raspberry-pi", "jetson", "nvidia-gpu", "cpu"}
    assert profile["lora-rank"] == 16 and profile["partition-id"] == 1
    assert profile["cpu-count"] >= 1 and profile["ram-bytes"] > 0


def test_profile_rejects_unknown_class():
    import pytest

    with pytest.raises(ValueError, match="device-class='toaster'"):
        detect_profile({"device-class": "toaster"})


def test_pick_device():
    import pytest
    import torch

    from ml.tasks import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            pick_device("cuda")
