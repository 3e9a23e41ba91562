"""A replica records a stack as held only once Serve keeps it: a load cancelled while it reads the stack's
files (its render's caller gone) is one Serve never keeps, and so never unloads; recorded before the
read, it would stay in the replica's `stacks` (status, and the gateway's `holds` probe) for good."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


class _Recorder:
    """The board's `loaded` as the replica calls it (`board.loaded.remote(replica, stack_id)`)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.loaded = self
        self.remote = lambda *args: self.calls.append(args)


class _Files:
    """The service's `prefetch` (reading a stack's files, in an executor thread), held until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.resident = None  # no built stacks for an unload to drop
        self.read: list[list] = []

    def prefetch(self, stack: list) -> None:
        self.release.wait(30)
        self.read.append(stack)


def _replica(stack_id: str, tmp_path: Path):
    from daemon.cluster.replica import RenderReplica
    from daemon.service import StackItem

    replica = RenderReplica.__new__(RenderReplica)  # the loader alone: no model behind it
    replica.replica_id = "r1"
    replica.loads, replica.unloads, replica.resident = Counter(), Counter(), set()
    replica.board, replica.service = _Recorder(), _Files()
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"")
    replica._pending = {stack_id: [[StackItem(path=path, scale=0.5)]]}
    return replica, path


def test_a_load_cancelled_while_it_reads_the_files_leaves_the_stack_unheld(tmp_path):
    replica, _ = _replica("1xabc", tmp_path)

    async def run() -> None:
        load = asyncio.create_task(replica._load_stack("1xabc"))
        await asyncio.sleep(0)  # the load is reading the files (waiting on its executor thread)
        load.cancel()
        replica.service.release.set()
        with pytest.raises(asyncio.CancelledError):
            await load

    asyncio.run(asyncio.wait_for(run(), 30))
    assert replica.resident == set()
    assert replica.loads == Counter()
    assert replica.board.calls == []


def test_a_load_that_completes_is_held_until_serve_unloads_it(tmp_path):
    replica, path = _replica("1xabc", tmp_path)
    replica.service.release.set()

    handle = asyncio.run(asyncio.wait_for(replica._load_stack("1xabc"), 30))
    assert replica.resident == {"1xabc"}
    assert replica.loads == Counter({"1xabc": 1})
    assert replica.board.calls == [("r1", "1xabc")]
    assert handle.entries == ((str(path.resolve()), 0.5),)
    assert len(replica.service.read) == 1

    handle.__del__()  # Serve's LRU unload
    handle.__del__()  # and garbage collection's: only the first counts
    assert replica.resident == set()
    assert replica.unloads == Counter({"1xabc": 1})


def test_a_request_cancelled_while_its_stack_loads_leaves_the_next_ones_files_to_the_loader(tmp_path):
    """Two requests of one stack: the first's load is cancelled while it reads the files (its caller gone);
    the second, waiting on the loader's lock (Serve's multiplexed loader takes one load at a time), then
    loads with its own files: the first one's clean-up took back only its own stack."""
    from daemon.service import StackItem

    replica, _ = _replica("1xabc", tmp_path)
    replica._pending = {}
    lock = asyncio.Lock()

    async def loader(stack_id: str):  # Serve's multiplexed loader, as far as this needs: one load at a time
        async with lock:
            return await replica._load_stack(stack_id)

    replica.stack = loader
    first, second = ([StackItem(path=tmp_path / f"{n}.safetensors", scale=0.5)] for n in ("a", "b"))

    async def run():
        a = asyncio.create_task(replica._take_in("1xabc", first))
        await asyncio.sleep(0)  # a's load reads the files
        b = asyncio.create_task(replica._take_in("1xabc", second))
        await asyncio.sleep(0)  # b waits on the loader's lock
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        replica.service.release.set()
        return await b

    handle = asyncio.run(asyncio.wait_for(run(), 30))
    assert handle.entries == ((str((tmp_path / "b.safetensors").resolve()), 0.5),)
    assert second in replica.service.read  # (the first's read went on in its thread, as a read does)
    assert replica._pending == {}
