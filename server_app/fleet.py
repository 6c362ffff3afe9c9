"""A simulated fleet: its clock from the run config (measurements/clock.py, docs/scale.md)."""

from __future__ import annotations

from collections.abc import Mapping
from logging import ERROR, INFO

from flwr.app.constants import DEFAULT_TTL
from flwr.supercore import log

from measurements.clock import Fleet, SimulatedClock
from measurements.latency_model import LatencyModel, LatencyModelError
from stamen.config import ConfigError, StamenConfig


def simulated_clock(cfg: StamenConfig, profiles: Mapping[int, Mapping]) -> SimulatedClock | None:
    """None on the host's clock (no ``simulation.latency-model``); else the clock, its
    nodes placed in the fleet by partition id. ConfigError naming what does not fit."""
    sim = cfg.simulation
    if not sim.latency_model:
        return None
    try:
        model = LatencyModel.load(sim.latency_model)
        fleet = Fleet.parse(sim.fleet, default_network=sim.network)
        fleet.check(model)
        clock = SimulatedClock(model, fleet, steps=cfg.train.local_steps, deadline=cfg.strategy.round_timeout,
                               strategy=cfg.strategy.name)
        clock.assign(profiles)
    except LatencyModelError as err:
        log(ERROR, "simulation.latency-model: %s", err)
        raise ConfigError(f"simulation.latency-model: {err}") from None
    if len(profiles) != fleet.size:
        raise ConfigError(
            f"simulation.fleet has {fleet.size} nodes and {len(profiles)} sent a profile within strategy.query-timeout = "
            f"{cfg.strategy.query_timeout:g} s: make the federation the fleet's size (stamen simulate --fleet does), or raise "
            "the timeout (a simulated node answers in about 0.25 s, one at a time per Ray worker)"
        )
    log(INFO, "simulated clock: %s, deadline %g s (model %s)",
        ", ".join(f"{n} x {d}@{net}" for d, net, n in fleet.groups), cfg.strategy.round_timeout, sim.latency_model)
    return clock


def host_wait(cfg: StamenConfig) -> float:
    """On a simulated clock, ``strategy.round-timeout`` is the fleet's deadline in simulated
    seconds, which have nothing to do with how long this host takes to train a round of a
    thousand nodes. The host waits for every reply (up to Flower's default message TTL, 12
    hours) and the clock decides who was late."""
    return max(cfg.strategy.round_timeout, float(DEFAULT_TTL))
