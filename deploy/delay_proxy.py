"""A TCP proxy that adds one-way propagation delay (and jitter) to each direction.

This kernel has no ``netem``, so delay is emulated in user space: the testbed runs one
proxy per SuperNode inside the node's network namespace. The SuperNode dials the proxy
on 127.0.0.1; the proxy forwards to the SuperLink over the node's shaped veth.

    python -m deploy.delay_proxy --listen 127.0.0.1:9092 --target 10.213.0.1:9092 \\
        --up-ms 23.5 --down-ms 23.5 --jitter-ms 3

Each chunk read from one side is written to the other side ``delay + jitter`` after it
was read, where jitter is drawn from a normal distribution (sd ``jitter_ms``). Like a
real link, it never reorders bytes: a chunk is never sent before the one ahead of it,
so jitter only stretches gaps (the same rule netem applies with ``rate``). Bandwidth is
not limited here: tbf on the veth does that, after (uplink) or before (downlink) the
delay, as on a real path. ``--port-map`` forwards several ports with one process.

Written by hand: no package on PyPI emulates per-direction delay for a TCP stream
without netem; it is small and has unit tests (tests/test_delay_proxy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from dataclasses import dataclass

CHUNK = 64 * 1024
_unreachable: set[tuple[str, int]] = set()  # targets already reported as unreachable


@dataclass(frozen=True)
class Delay:
    """One direction's delay, in seconds; ``jitter_s`` is the standard deviation."""

    mean_s: float
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mean_s < 0 or self.jitter_s < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {self.mean_s} and {self.jitter_s}")

    def sample(self, rng: random.Random) -> float:
        return max(0.0, self.mean_s + (rng.gauss(0.0, self.jitter_s) if self.jitter_s else 0.0))


def release_times(read_times: list[float], delays: list[float]) -> list[float]:
    """When each chunk leaves: ``read + delay``, but never before the chunk ahead of it.

    >>> release_times([0.0, 0.001, 0.002], [0.05, 0.03, 0.06])
    [0.05, 0.05, 0.062]
    """
    out: list[float] = []
    for t, d in zip(read_times, delays, strict=True):
        out.append(max(t + d, out[-1] if out else float("-inf")))
    return out


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay, rng: random.Random) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    last = float("-inf")

    async def read() -> None:
        nonlocal last
        while data := await reader.read(CHUNK):
            last = max(time.monotonic() + delay.sample(rng), last)
            queue.put_nowait((last, data))
        queue.put_nowait((last, b""))  # end of stream, after everything ahead of it

    async def write() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):  # the other side may be gone already
                        writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()


async def _serve_connection(
    client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: tuple[str, int], up: Delay, down: Delay, seed: int
) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError as err:  # e.g. the collector is not up yet: the client sees a refused connection, as without a proxy
        if target not in _unreachable:
            _unreachable.add(target)
            print(f"[delay-proxy] cannot reach {target[0]}:{target[1]} yet: {err}", file=sys.stderr, flush=True)
        client_w.close()
        return
    rng = random.Random(seed)
    tasks = [asyncio.ensure_future(_pump(client_r, server_w, up, rng)), asyncio.ensure_future(_pump(server_r, client_w, down, rng))]
    try:
        await asyncio.gather(*tasks)
    except (OSError, asyncio.CancelledError):  # a side reset the connection: close both
        pass
    finally:
        for t in tasks:
            t.cancel()
        for w in (client_w, server_w):
            w.close()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def serve(listens: list[tuple[str, int]], targets: list[tuple[str, int]], up: Delay, down: Delay, seed: int = 0) -> None:
    counter = iter(range(seed, sys.maxsize))
    servers = []
    for listen, target in zip(listens, targets, strict=True):

        def handler(r, w, target=target):
            return _serve_connection(r, w, target, up, down, next(counter))

        servers.append(await asyncio.start_server(handler, *listen))
        print(f"[delay-proxy] {listen[0]}:{listen[1]} -> {target[0]}:{target[1]} "
              f"up {up.mean_s * 1e3:.1f}+-{up.jitter_s * 1e3:.1f} ms, down {down.mean_s * 1e3:.1f}+-{down.jitter_s * 1e3:.1f} ms",
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.delay_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_hostport, action="append", required=True, help="HOST:PORT (repeat for each port)")
    p.add_argument("--target", type=_hostport, action="append", required=True, help="HOST:PORT, one per --listen")
    p.add_argument("--up-ms", type=float, default=0.0, help="one-way delay, listener side to target side")
    p.add_argument("--down-ms", type=float, default=0.0, help="one-way delay, target side to listener side")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="standard deviation of the delay, each direction")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.listen) != len(args.target):
        p.error("give one --target per --listen")
    try:
        up, down = Delay(args.up_ms / 1e3, args.jitter_ms / 1e3), Delay(args.down_ms / 1e3, args.jitter_ms / 1e3)
    except ValueError as err:
        p.error(str(err))
    asyncio.run(serve(args.listen, args.target, up, down, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
