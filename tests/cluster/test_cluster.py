"""Routing by LoRA stack through the gateway socket: each stack loads at most once per replica."""

from __future__ import annotations

from collections import Counter

import pytest

from client.client import RenderClient

pytestmark = pytest.mark.ray
SIZE = dict(width=64, height=64, steps=1)


def _loads(board: dict) -> Counter:
    return Counter({(r, s): n for r, s, n in board["loads"]})


def test_twenty_serial_renders_over_three_stacks_load_each_stack_once(cluster):
    stacks = [[str(cluster.loras / f"s{i}.safetensors")] for i in range(3)]
    before = _loads(cluster.board())
    served = Counter()
    with RenderClient(cluster.gateway.socket, render_timeout=600) as c:
        for n in range(20):
            stack = stacks[n % 3]
            r = c.send_render(f"fox {n}", lora_paths=stack, lora_scales=[1.0], seed=n, return_bytes=True, **SIZE)
            assert r.image_bytes and r.stack[0].path.endswith(stack[0].rsplit("/", 1)[1])
            served[stack[0]] += 1
        status = c.status()
    loads = _loads(cluster.board()) - before
    assert all(n == 1 for n in loads.values()), loads  # at most once per replica that serves it
    assert sum(loads.values()) == 3, loads  # serial: stack loads = distinct stacks
    assert len(status.replicas) == 2
    assert sum(r.stack_loads for r in status.replicas) >= 3
    assert {s for r in status.replicas for s in r.stacks} >= {s for _, s in loads}
