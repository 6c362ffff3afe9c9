"""What a transfer costs, packed (stamen/pack.py) against Flower's own records, in one run.

bench/transfer_app sends one node, every round, a downlink and takes back an uplink whose
arrays have the names, shapes and dtypes of Stamen's real messages (read from the models):

* ``minilm``: MiniLM's dense downlink (12 adapted weights + head, 7.1 MB) and its LoRA
  rank-8 uplink (24 factors + head, 26 arrays, 0.3 MB);
* ``smollm2``: SmolLM2-135M's stacked downlink (rank 4+8 = 12 over q/k/v/o of 30 layers:
  240 arrays, 5.7 MB) and its LoRA rank-8 uplink (240 arrays, 3.9 MB);
* ``smollm2-dense``: SmolLM2's dense downlink (120 weights, 106 MB) and a rank-4 uplink.

Each runs on loopback and, as root, on the emulated testbed (deploy/testbed.py) with the
``5g`` and ``ethernet`` profiles of deploy/profiles.toml (bandwidth by tbf, delay by the
delay proxy), one gpu-server node (the whole host), ``--rounds`` rounds. Per transfer it
prints the medians from round 2 on of the time (clients.csv ``downlink_s`` /
``uplink_s``), the Fleet RPCs, the bytes on the wire and the goodput (wire bytes x 8 /
time), against the shaped rate and against ``bytes x 8 / rate + 1 RTT``. Both sides
check that every array arrived exactly.

Targets (issue 20): the SmolLM2 LoRA uplink on loopback <= 0.3 s; RPCs per transfer that
do not grow with the number of arrays; goodput >= 0.9 of the shaped rate for payloads
>= 1 MB on the 5g profile.

    python bench/transfer_goodput.py [--where loopback,5g,ethernet] [--payloads minilm,smollm2,smollm2-dense]
        [--encodings packed,flower] [--rounds 4] [--concurrency 2,8] [--flower-concurrency 2] [--keep DIR]

``--concurrency`` runs every packed arm once per value of stamen-supernode
--transfer-concurrency (2 is Flower's default; ``0`` passes no flag: stamen-supernode's
default, 8). The arm with Flower's records runs at ``--flower-concurrency``: with 2, it is
Flower 1.39 as it ships.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
APP = ROOT / "bench" / "transfer_app"
PAYLOADS = ("minilm", "smollm2", "smollm2-dense")


def model_shapes() -> dict[str, dict]:
    """{model: {"modules": [(name, (out, in))], "head": [(name, shape)]}} of the real models."""
    from bench.common import load_default
    from ml.model import target_module_names

    out = {}
    for name in ("minilm", "smollm2"):
        model, targets, _ = load_default(name)
        modules = [(m, tuple(model.get_submodule(m).weight.shape)) for m in target_module_names(model, targets)]
        head = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k.startswith("head.")]
        out[name] = {"modules": modules, "head": head}
    return out


def specs(shapes: dict[str, dict]) -> dict[str, dict]:
    def dense(model):
        return [[f"{m}.weight", list(s), "float32"] for m, s in shapes[model]["modules"]] + head(model)

    def lora(model, rank):
        out = []
        for m, (o, i) in shapes[model]["modules"]:
            out += [[m + ".lora_A", [rank, i], "float32"], [m + ".lora_B", [o, rank], "float32"]]
        return out + head(model)

    def head(model):
        return [[k, list(s), "float32"] for k, s in shapes[model]["head"]]

    return {
        "minilm": {"down": dense("minilm"), "up": lora("minilm", 8)},
        "smollm2": {"down": lora("smollm2", 12), "up": lora("smollm2", 8)},
        "smollm2-dense": {"down": dense("smollm2"), "up": lora("smollm2", 4)},
    }


def run_arm(where: str, spec_path: Path, packed: bool, concurrency: int, rounds: int, workdir: Path) -> list[dict]:
    """One run of the transfer app; its clients.csv rows from round 2 on."""
    from deploy.local import LocalDeployment, NodeSpec

    flags = ["--transfer-concurrency", str(concurrency)] if concurrency else []
    result = workdir / "result.json"
    overrides = [(f'spec-path="{spec_path}" packed={str(packed).lower()} num-rounds={rounds} '
                  f'result-path="{result}" output.dir="{workdir}"')]
    if where == "loopback":
        with LocalDeployment([NodeSpec(0, 1, num_threads=1)], workdir=workdir / "_deploy", app_dir=APP, supernode_flags=flags) as dep:
            dep.run(overrides, echo=lambda line: None, timeout=1800)
    else:
        from deploy import testbed

        networks, devices = testbed.load_profiles()
        nodes = [testbed.TestbedNode(devices["gpu-server"], networks[where])]
        with testbed.Testbed(nodes, workdir=workdir / "_deploy", app_dir=APP, threads=1, supernode_flags=flags) as bed:
            bed.run(overrides, echo=lambda line: None, timeout=1800)
    out = json.loads(result.read_text())
    broken = [r for r in out["results"] if r["error"] or not (r["down_intact"] and r["up_intact"])]
    if broken or len(out["results"]) != rounds:
        raise RuntimeError(f"{workdir}: transfers did not all arrive intact: {out['results']}")
    rows = [r for r in csv.DictReader(open(Path(out["run_dir"]) / "clients.csv")) if int(r["round"]) >= 2]
    timed = [r for r in rows if r["downlink_s"] and r["uplink_s"]]
    if len(timed) < len(rows):
        print(f"[bench]   {len(rows) - len(timed)} of {len(rows)} client-rounds lack a transfer timing; left out", flush=True)
    if not timed:
        raise RuntimeError(f"{workdir}: clients.csv lacks transfer timings")
    return timed


def summarize(rows: list[dict], direction: str, arrays: int, link: dict | None) -> dict:
    side = "down" if direction == "downlink" else "up"
    seconds = statistics.median(float(r[f"{direction}_s"]) for r in rows)
    wire = statistics.median(int(r[f"bytes_{side}"]) for r in rows)
    out = {
        "arrays": arrays,
        "payload_mb": statistics.median(int(r[f"payload_{side}_bytes"]) for r in rows) / 1e6,
        "wire_mb": wire / 1e6,
        "rpcs": statistics.median(int(r[f"rpcs_{side}"]) for r in rows),
        "seconds": seconds,
        "goodput_mbit": wire * 8 / seconds / 1e6,
    }
    if link:
        rate = link[f"{side}_mbit"]
        out["rate_mbit"] = rate
        out["of_rate"] = out["goodput_mbit"] / rate
        out["ideal_s"] = wire * 8 / (rate * 1e6) + 2 * link["delay_ms"] / 1000  # bytes at the rate + one round trip
        out["of_ideal"] = out["ideal_s"] / seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--where", default="loopback,5g,ethernet")
    parser.add_argument("--payloads", default=",".join(PAYLOADS))
    parser.add_argument("--encodings", default="packed,flower")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", default="2,8", help="packed arms: stamen-supernode --transfer-concurrency values (0: its default)")
    parser.add_argument("--flower-concurrency", type=int, default=2, help="the arm with Flower's records (2: Flower's default)")
    parser.add_argument("--keep", default="", help="keep the runs under this directory (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    wheres, payloads, encodings = args.where.split(","), args.payloads.split(","), args.encodings.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    base = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="transfer-goodput-"))
    base.mkdir(parents=True, exist_ok=True)
    if any(w != "loopback" for w in wheres):
        from deploy import testbed

        if (reason := testbed.available()) is not None:
            sys.exit(f"the testbed profiles need {reason}; use --where loopback")
        networks, _ = testbed.load_profiles()
    print("[bench] reading the models' shapes ...", flush=True)
    all_specs = specs(model_shapes())
    results = []
    for where in wheres:
        link = None if where == "loopback" else {
            "down_mbit": networks[where].down_mbit, "up_mbit": networks[where].up_mbit, "delay_ms": networks[where].delay_ms
        }
        for payload in payloads:
            spec_path = base / f"{payload}.json"
            spec_path.write_text(json.dumps(all_specs[payload]))
            for encoding in encodings:
                for concurrency in (levels if encoding == "packed" else [args.flower_concurrency]):
                    label = f"{where}/{payload}/{encoding}/c{concurrency or 'default'}"
                    workdir = base / label.replace("/", "-")
                    workdir.mkdir(parents=True, exist_ok=True)
                    started = time.monotonic()
                    print(f"[bench] {label}: {args.rounds} rounds ...", flush=True)
                    rows = run_arm(where, spec_path, encoding == "packed", concurrency, args.rounds, workdir)
                    for direction, side in (("downlink", "down"), ("uplink", "up")):
                        r = summarize(rows, direction, len(all_specs[payload][side]), link)
                        r.update(where=where, payload=payload, encoding=encoding, concurrency=concurrency or "default", direction=direction)
                        results.append(r)
                        print(f"[bench]   {direction}: {json.dumps(r)}", flush=True)
                    print(f"[bench] {label}: {time.monotonic() - started:.0f} s", flush=True)
    (base / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nmedians from round 2 on ({args.rounds} rounds, one node); goodput = wire bytes x 8 / time")
    head = (f"{'where':<9}{'payload':<14}{'dir':<9}{'encoding':<9}{'conc':>6}{'arrays':>7}{'MB':>8}{'RPCs':>6}"
            f"{'time s':>8}{'Mbit/s':>9}{'of rate':>8}{'ideal/t':>8}")
    print(head)
    for r in results:
        rate = f"{r['of_rate']:>8.2f}{r['of_ideal']:>8.2f}" if "of_rate" in r else f"{'':>8}{'':>8}"
        print(f"{r['where']:<9}{r['payload']:<14}{r['direction']:<9}{r['encoding']:<9}{str(r['concurrency']):>6}{r['arrays']:>7}"
              f"{r['wire_mb']:>8.2f}{r['rpcs']:>6.0f}{r['seconds']:>8.3f}{r['goodput_mbit']:>9.1f}{rate}")
    targets(results)
    print(f"results: {base / 'results.json'}")


def targets(results: list[dict]) -> None:
    def find(**kw):
        return [r for r in results if all(r.get(k) == v for k, v in kw.items())]

    for r in find(where="loopback", payload="smollm2", direction="uplink", encoding="packed"):
        print(f"target: SmolLM2 LoRA uplink on loopback {r['seconds']:.3f} s (<= 0.3 s), concurrency {r['concurrency']}")
    packed = find(encoding="packed")
    if packed:
        by_arrays = sorted({(r["arrays"], r["rpcs"], r["direction"], r["where"]) for r in packed})
        print("target: RPCs per packed transfer by array count: " + ", ".join(f"{a} arrays {d} {w}: {c:.0f}" for a, c, d, w in by_arrays))
    for r in find(where="5g", encoding="packed"):
        if r["wire_mb"] >= 1.0:
            print(f"target: 5g {r['payload']} {r['direction']} ({r['wire_mb']:.1f} MB, concurrency {r['concurrency']}): "
                  f"goodput {r['of_rate']:.2f} of the shaped rate (>= 0.9); {r['of_ideal']:.2f} of bytes/rate + 1 RTT")


if __name__ == "__main__":
    main()
