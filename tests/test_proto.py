"""The committed telemetry stubs are what `make proto` generates from the .proto file."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_up_to_date(tmp_path):
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
        str(ROOT / "proto" / "stamen_telemetry" / "telemetry.proto"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    for name in ("telemetry_pb2.py", "telemetry_pb2_grpc.py", "telemetry_pb2.pyi"):
        fresh = (tmp_path / "stamen_telemetry" / name).read_text()
        committed = (ROOT / "proto" / "stamen_telemetry" / name).read_text()
        assert fresh == committed, f"proto/stamen_telemetry/{name} is stale: run `make proto`"
