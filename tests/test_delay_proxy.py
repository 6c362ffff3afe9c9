"""The userspace delay proxy (deploy/delay_proxy.py): the ordering rule on hand-checkable
numbers, then a live proxy on loopback in front of an echo server."""

import asyncio
import hashlib
import os
import random
import time

import pytest

from deploy.delay_proxy import Delay, release_times, serve


def test_release_times_add_the_delay():
    assert release_times([0.0, 1.0], [0.5, 0.5]) == [0.5, 1.5]


def test_release_times_never_reorder():
    # chunk 2 would leave at 0.031 < 0.05: it waits for chunk 1
    assert release_times([0.0, 0.001, 0.002], [0.05, 0.03, 0.06]) == [0.05, 0.05, 0.062]


def test_delay_rejects_negative_values():
    with pytest.raises(ValueError):
        Delay(-0.01)
    with pytest.raises(ValueError):
        Delay(0.01, jitter_s=-1)


def test_jittered_samples_are_never_negative_and_center_on_the_mean():
    rng = random.Random(0)
    samples = [Delay(0.010, 0.005).sample(rng) for _ in range(4000)]
    assert min(samples) >= 0
    assert abs(sum(samples) / len(samples) - 0.010) < 0.0005


async def _echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _measure(up_ms: float, down_ms: float, payload: bytes) -> tuple[float, float, bytes]:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target = echo.sockets[0].getsockname()[:2]
    port = _free_port()
    proxy = asyncio.ensure_future(serve([("127.0.0.1", port)], [target], Delay(up_ms / 1e3), Delay(down_ms / 1e3)))
    for _ in range(100):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.02)
    rtts = []
    for _ in range(5):  # small messages: the round trip is the two delays
        t0 = time.monotonic()
        writer.write(b"ping")
        await writer.drain()
        assert await reader.readexactly(4) == b"ping"
        rtts.append(time.monotonic() - t0)
    t0 = time.monotonic()
    writer.write(payload)
    await writer.drain()
    echoed = await reader.readexactly(len(payload))
    bulk = time.monotonic() - t0
    writer.close()
    proxy.cancel()
    echo.close()
    return min(rtts), bulk, echoed


def test_live_proxy_adds_both_delays_and_keeps_bytes_intact():
    payload = os.urandom(4_000_000)
    rtt, bulk, echoed = asyncio.run(_measure(up_ms=40, down_ms=20, payload=payload))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()  # nothing lost or reordered
    assert 0.060 <= rtt < 0.090, f"round trip {rtt * 1e3:.1f} ms, expected 60 ms plus a little"
    assert bulk < 2.0  # delay, not bandwidth: 4 MB through loopback stays fast
