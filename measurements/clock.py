"""The simulated clock: a fleet's round times from a latency model, not from this host.

In Flower's simulation engine a thousand virtual nodes train on this machine's cores, so
the wall-clock times say nothing about the fleet they stand for. With
``simulation.latency-model`` (``stamen simulate --latency-model FILE --fleet SPEC``):

* every virtual node gets a device and a network from the fleet spec, by partition id
  (:class:`Fleet`);
* each client-round's phases come from the model (measurements/latency_model.py) with the
  round's real inputs: the rank and pruning ratio the node was asked for, the payload
  the server sent it, and the payload it sent back;
* a round lasts as long as its slowest participant, plus the server's own part, with
  ``strategy.round-timeout`` as the deadline: a node whose simulated time passes it is
  dropped from the round as a late node is in a real run (:class:`ClockedStrategy`
  hides its reply from the strategy);
* clients.csv, rounds.csv and metrics.csv's ``elapsed_s`` carry the simulated times,
  with ``clock = simulated``; strategies that read measured times (FedSpine's reward)
  read these.

What stays measured on this host: the server's time to build messages and aggregate
(``configure_s``, ``aggregation_s``), and the training itself (the model really trains).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp.strategy import Strategy

from stamen import keys
from stamen.wrapping import StrategyWrapper

from .grid import asked, payload_bytes
from .latency_model import LatencyModel, LatencyModelError


@dataclass(frozen=True)
class Fleet:
    """Device and network per virtual node: ``groups`` in order, each (device, network,
    count); partition ids 0.. fill the first group, then the next."""

    groups: tuple[tuple[str, str, int], ...]

    @classmethod
    def parse(cls, spec: str, *, default_network: str) -> Fleet:
        """``"raspberry-pi-4=600 jetson-orin-nano@5g=300 gpu-server@ethernet=100"``:
        ``device[@network]=count``, separated by spaces or commas."""
        groups = []
        for item in spec.replace(",", " ").split():
            name, sep, count = item.partition("=")
            device, _, network = name.partition("@")
            if not sep or not device or not count.isdigit() or int(count) < 1:
                raise LatencyModelError(f"fleet entry {item!r}: expected device[@network]=count, e.g. raspberry-pi-4@wifi=600")
            groups.append((device, network or default_network, int(count)))
        if not groups:
            raise LatencyModelError("the fleet is empty: give device[@network]=count entries")
        return cls(tuple(groups))

    @property
    def size(self) -> int:
        return sum(n for _, _, n in self.groups)

    def of(self, partition_id: int) -> tuple[str, str]:
        """(device, network) of the node with this partition id."""
        seen = 0
        for device, network, n in self.groups:
            seen += n
            if partition_id < seen:
                return device, network
        raise LatencyModelError(f"partition id {partition_id} is outside the fleet of {self.size} nodes")

    def check(self, model: LatencyModel) -> None:
        """Every device and network of the fleet is in the model."""
        try:
            for device, network, _ in self.groups:
                model.device(device)
                model.link(network)
        except LatencyModelError as err:
            raise LatencyModelError(f"fleet {err}") from None


@dataclass
class SimulatedClock:
    """Simulated phases per (round, node); see the module docstring."""

    model: LatencyModel
    fleet: Fleet
    steps: int  # train.local-steps of this run
    deadline: float  # strategy.round-timeout (seconds, simulated)
    strategy: str = ""  # strategy.name: its device side's own cost per step, where the model has one
    nodes: dict[int, tuple[str, str]] = field(default_factory=dict)  # node -> (device, network)
    phases: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)  # (round, node) -> phases
    late: dict[tuple[int, int], float] = field(default_factory=dict)  # (round, node) -> its simulated e2e
    rounds: dict[int, float] = field(default_factory=dict)  # round -> simulated round_s

    def assign(self, profiles: Mapping[int, dict]) -> None:
        """Give each profiled node its device and network by its partition id, and write
        them into its profile as a real device would report them: its class (so
        ``lora.rank-by-class`` gives it its rank), its network and its testbed device."""
        for node, profile in profiles.items():
            if keys.NODE_PARTITION_ID in profile:
                device, network = self.nodes[node] = self.fleet.of(int(profile[keys.NODE_PARTITION_ID]))
                profile[keys.NODE_TESTBED_DEVICE], profile[keys.NODE_NETWORK] = device, network
                if self.model.devices[device].device_class:
                    profile[keys.NODE_DEVICE_CLASS] = self.model.devices[device].device_class

    def time_round(self, server_round: int, sent: Mapping[int, tuple[int, float, int]], replies: Iterable[Message]) -> set[int]:
        """Simulate one round. ``sent``: node -> (rank, pruning ratio, payload bytes down).
        Returns the nodes whose reply came after the deadline on the simulated clock."""
        late = set()
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error() or node not in sent or node not in self.nodes:
                continue
            rank, prune, down = sent[node]
            device, network = self.nodes[node]
            p = self.model.phases(device, network, steps=self.steps, rank=rank, prune=prune, bytes_down=down,
                                  bytes_up=payload_bytes(reply), strategy=self.strategy)
            self.phases[(server_round, node)] = p
            if p["e2e_s"] > self.deadline:
                self.late[(server_round, node)] = p["e2e_s"]
                late.add(node)
        return late

    def round_s(self, server_round: int, *, server_s: float, cut: bool) -> float:
        """The round's simulated length: its slowest in-time participant, or the deadline
        when a node was late or silent (``cut``), plus the server's own measured part."""
        times = [p["e2e_s"] for (r, n), p in self.phases.items() if r == server_round and (r, n) not in self.late]
        slowest = self.deadline if cut else max(times, default=0.0)
        self.rounds[server_round] = slowest + server_s
        return self.rounds[server_round]

    def state_dict(self) -> dict:
        """For a checkpoint: the simulated length of every round so far (clients.csv's rows
        are in the measurement session's state, already on this clock)."""
        return {"rounds": dict(self.rounds)}

    def load_state_dict(self, state, node) -> None:
        self.rounds = {int(r): float(s) for r, s in state["rounds"].items()}

    def elapsed(self) -> float:
        """Simulated seconds of the rounds so far."""
        return sum(self.rounds.values())

    def times(self, server_round: int) -> dict[int, float]:
        """{node: simulated seconds} of a round's in-time replies (FedSpine's reward reads these)."""
        return {n: p["e2e_s"] for (r, n), p in self.phases.items() if r == server_round and (r, n) not in self.late}

    def rewrite(self, row: dict) -> dict:
        """A clients.csv row with the simulated phases in place of the host's."""
        key = (row["round"], row["node_id"])
        p = self.phases.get(key)
        if p is None:
            return row
        device, network = self.nodes[row["node_id"]]
        d = self.model.devices[device]
        out = {**row, "device": device, "network": network, "clock": "simulated", "transfer_via": "simulated"}
        out.update({k: p[k] for k in ("downlink_s", "train_s", "uplink_s", "wait_s", "e2e_s")})
        out.update(load_s=d.startup_s, loop_s=p["train_s"] - d.startup_s, serialize_s=None,
                   train_cpu_s=None, load_cpu_s=None, loop_cpu_s=None, serialize_cpu_s=None)
        if key in self.late:
            out.update(status="late", reason=f"simulated {p['e2e_s']:.1f} s, over strategy.round-timeout = {self.deadline:g} s")
        return out


class ClockedStrategy(StrategyWrapper):
    """``strategy`` on the simulated clock: after each round's replies are in, the clock
    times them and a reply later than the deadline is hidden from ``strategy`` (which
    drops the node as late). ``on_hidden(replies)`` still gets those replies, so that what
    their nodes measured (the telemetry they carry) is not lost with them."""

    def __init__(self, strategy: Strategy, clock: SimulatedClock, *, on_hidden: Callable[[list[Message]], None] | None = None) -> None:
        super().__init__(strategy)
        self.clock, self.on_hidden = clock, on_hidden
        self._sent: dict[int, dict[int, tuple[int, float, int]]] = {}

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent = {}
        for m in messages:
            rank, prune = asked(m)
            sent[int(m.metadata.dst_node_id)] = (rank or 0, prune or 0.0, payload_bytes(m))
        self._sent[server_round] = sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        late = self.clock.time_round(server_round, self._sent.pop(server_round, {}), replies)
        if late and self.on_hidden is not None:
            self.on_hidden([m for m in replies if int(m.metadata.src_node_id) in late])
        return self.strategy.aggregate_train(server_round, [m for m in replies if int(m.metadata.src_node_id) not in late])
