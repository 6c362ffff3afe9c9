"""The server's side of differential privacy in the run directory: ``privacy.csv`` and the
final summary of what each node spent (``dp.mode = "local"``) or what the central-DP
wrapper released (``dp.mode = "central"``; strategies/central_dp.py, wrapped in
server_app/app.py). docs/privacy.md has the guarantees."""

from __future__ import annotations

from logging import INFO

from flwr.supercore import log

from .run_dir import RunDirectory


def write_privacy(run: RunDirectory, strategy) -> None:
    """privacy.csv (one row per round and node that trained under DP-SGD, or that stopped
    because its budget was spent) and one log line per node with its final epsilon."""
    if not strategy.privacy_log:
        return
    run.write_table("privacy.csv", strategy.PRIVACY_COLUMNS, strategy.privacy_log)
    delta = strategy.privacy_log[-1]["delta"]
    final = strategy.privacy_summary()
    log(INFO, "privacy (local DP-SGD, delta %g): %s", delta, ", ".join(f"node {n} epsilon {e:.3f}" for n, e in sorted(final.items())))
    for node, reason in sorted(strategy.retired.items()):
        log(INFO, "privacy: node %d stopped training: %s", node, reason)
