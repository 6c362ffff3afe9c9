"""Node ids across a resume: a resumed run's nodes may have new ids (a SuperLink started
without ``--database`` registers them again), and state saved under the old ones moves to
the new ones with ``node(old_id) -> new_id | None`` (server_app/resume.py: match_nodes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

Renaming = Callable[[object], "int | None"]


def by_node(mapping: Mapping[int, object], node: Renaming) -> dict[int, object]:
    """``mapping`` keyed by each node's id in this run; nodes that are gone are left out."""
    return {node(old): value for old, value in mapping.items() if node(old) is not None}


def renamed_row(row: Mapping, node: Renaming) -> dict:
    """A table row (privacy.csv, arms.csv, clients.csv) with its ``node_id`` this run's,
    where that node is here; a row of a node that is gone keeps its old id (it is history)."""
    old = row.get("node_id")
    new = node(old) if isinstance(old, int) else None
    return {**row, "node_id": new} if new is not None else dict(row)
