"""`preload` on the real tiny model and LoRA patcher, through the runner (no socket): a stack built ahead
of its renders, without going live, so the first render with it switches in one assignment."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.lora_factories import TINY_ATTENTION, TINY_MISSING, make_lora
from PIL import Image

from client.wire.errors import DeadlineExceeded, LoraNotFound, LoraZeroMatch
from client.wire.messages import Preload, Render
from daemon.config import ServiceConfig
from daemon.runner import RenderRunner

pytestmark = pytest.mark.model

SIZE = dict(width=64, height=64, steps=1)


def _files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    loras = tmp_path / "loras"
    loras.mkdir()
    a = make_lora("kohya", loras / "a.safetensors", TINY_ATTENTION, rank=4, alpha=4, seed=1, modules=["attn.to_q"])
    b = make_lora("diffusers", loras / "b.safetensors", TINY_ATTENTION, rank=4, alpha=4, seed=2, modules=["attn.to_v"])
    stray = make_lora("kohya", loras / "stray.safetensors", TINY_MISSING, rank=4, seed=3, modules=["attn.to_out.0"])
    return loras, a, b, stray


def _runner(tiny_model, loras: Path, out: Path, resident_bytes: int = 2 * 1024**3):
    from daemon.lora.cache import LoraCache
    from daemon.lora.patcher import LoraPatcher
    from daemon.lora.resident import ResidentStacks
    from daemon.service import RenderService

    config = ServiceConfig(lora_roots=(loras,), output_root=out, warmup=False)
    cache = LoraCache(config.lora_cache_bytes)
    patcher = LoraPatcher(tiny_model.flux.transformer, cache, resident=ResidentStacks(resident_bytes))
    service = RenderService(tiny_model, config, patcher=patcher, cache=cache, preset_name="tiny", default_steps=1)
    return RenderRunner(service, config), patcher


def _one(tiny_model, loras: Path, out: Path, resident_bytes: int, call):
    """`call(runner)` on a runner of its own (bounded to `resident_bytes`): its answer, and the resident
    stacks' stats after it (the model put back as it was)."""
    runner, patcher = _runner(tiny_model, loras, out, resident_bytes)

    async def main():
        try:
            return await call(runner)
        finally:
            await runner.close()

    try:
        return asyncio.run(main()), patcher.resident.stats()
    finally:
        patcher.clear()


def test_a_preloaded_stack_is_built_once_and_its_render_switches_to_it(tiny_model, tmp_path):
    """a renders (live); b is preloaded: built, resident, not live, the model still a's. Preloading b
    again, or a, builds nothing. The render with b then finds it resident (a hit, no new miss) and gives
    the same picture as b built by its own switch on a patcher that keeps nothing. A missing file and a
    file matching nothing fail with their own errors and leave the live stack as it was."""
    loras, a, b, stray = _files(tmp_path)
    runner, patcher = _runner(tiny_model, loras, tmp_path / "out")
    with_a = Render(id=1, prompt="rider", lora_paths=[str(a)], lora_scales=[0.8], seed=3, **SIZE)
    with_b = Render(id=2, prompt="town", lora_paths=[str(b)], lora_scales=[0.6], seed=4, **SIZE)
    preload_b = Preload(id=3, lora_paths=[str(b)], lora_scales=[0.6], lora_names=["night"])

    async def main():
        try:
            await runner.render(with_a)
            before = patcher.resident.stats()
            first = await runner.preload(preload_b)
            after_first = patcher.resident.stats()
            active_after_first = runner.service.active_stack()
            again = await runner.preload(preload_b)
            live = await runner.preload(Preload(id=4, lora_paths=[str(a)], lora_scales=[0.8]))
            errors = []
            for paths in ([str(loras / "missing.safetensors")], [str(stray)]):
                try:
                    await runner.preload(Preload(id=5, lora_paths=paths, lora_scales=[1.0]))
                except (LoraNotFound, LoraZeroMatch) as err:
                    errors.append(err)
            active_after_errors = runner.service.active_stack()
            rendered = await runner.render(with_b)
            return before, first, after_first, active_after_first, again, live, errors, active_after_errors, rendered
        finally:
            await runner.close()

    try:
        before, first, after_first, active_first, again, live, errors, active_errors, rendered = asyncio.run(main())
        after = patcher.resident.stats()
    finally:
        patcher.clear()  # the session's model goes back exactly as it was
    assert (first.built, first.resident, first.live) == (True, True, False)
    assert first.bytes > 0 and first.build_ms > 0 and first.reason is None
    assert (
        first.matched_keys == [2] == [first.stack[0].keys_total]
        and first.stack[0].name == "night"
        and first.stack[0].path == str(b)
    )
    assert after_first.entries == before.entries + 1 and after_first.bytes == before.bytes + first.bytes
    assert (after_first.hits, after_first.misses) == (before.hits, before.misses)  # a preload is not a switch
    assert [s.path for s in active_first] == [str(a)]  # the live stack did not change
    assert (again.built, again.resident, again.live, again.bytes) == (False, True, False, first.bytes)
    assert (live.built, live.resident, live.live) == (False, True, True)
    assert [type(e) for e in errors] == [LoraNotFound, LoraZeroMatch]
    assert [s.path for s in active_errors] == [str(a)]
    assert rendered.stack_switched and rendered.matched_keys == [2]
    assert after.hits == before.hits + 1 and after.misses == before.misses  # b's switch was a resident hit

    built_by_switch, cold = _one(tiny_model, loras, tmp_path / "cold", 0, lambda r: r.render(with_b))
    assert cold.misses == 1
    with Image.open(rendered.image_path) as got, Image.open(built_by_switch.image_path) as want:
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_renders_go_before_preloads_and_a_preload_can_expire_or_be_shut_out(tiny_model, tmp_path):
    """A preload sent while a render runs waits for it, and for a render queued after the preload; one
    whose deadline passes meanwhile gets deadline_exceeded and builds nothing; a preload still waiting
    when the runner stops accepting work gets shutting_down; a stack larger than the resident bound is
    built but not kept, and says why."""
    loras, a, b, _ = _files(tmp_path)
    runner, patcher = _runner(tiny_model, loras, tmp_path / "out")
    order: list[str] = []

    async def render(req: Render, name: str):
        result = await runner.render(req)
        order.append(name)
        return result

    async def preload(req: Preload, name: str):
        try:
            result = await runner.preload(req)
        except Exception as err:
            order.append(f"{name}:{type(err).__name__}")
            return err
        order.append(name)
        return result

    async def main():
        try:
            long = asyncio.ensure_future(render(Render(id=1, prompt="long", width=64, height=64, steps=8), "render1"))
            while runner.running is None:
                await asyncio.sleep(0.01)
            waits = asyncio.ensure_future(preload(Preload(id=2, lora_paths=[str(b)], lora_scales=[0.5]), "preload"))
            late = asyncio.ensure_future(
                preload(Preload(id=3, lora_paths=[str(a)], lora_scales=[0.5], deadline_s=0.05), "expiring")
            )
            await asyncio.sleep(0)
            waiting = runner.status().preloads_waiting
            second = asyncio.ensure_future(render(Render(id=4, prompt="next", **SIZE), "render2"))
            await asyncio.gather(long, waits, late, second)
            entries = patcher.resident.stats().entries
            busy = asyncio.ensure_future(render(Render(id=5, prompt="busy", width=64, height=64, steps=4), "render3"))
            while runner.running is None:
                await asyncio.sleep(0.01)
            shut = asyncio.ensure_future(preload(Preload(id=6, lora_paths=[str(a)], lora_scales=[0.9]), "shut"))
            await asyncio.sleep(0)
            runner.stop_accepting()
            await asyncio.gather(shut, busy)
            return waiting, entries
        finally:
            await runner.close()

    try:
        waiting, entries = asyncio.run(main())
    finally:
        patcher.clear()
    assert waiting == 2
    order_without_last = order[:-2]
    assert order_without_last == ["expiring:DeadlineExceeded", "render1", "render2", "preload"]
    assert sorted(order[-2:]) == ["render3", "shut:ShuttingDown"]
    assert entries == 1  # b, built by its preload; a's preload expired before it ran, and renders 1 and 2 had no stack
    assert patcher.resident.stats().entries == 1

    too_big = Preload(id=7, lora_paths=[str(b)], lora_scales=[1.0])
    result, tight = _one(tiny_model, loras, tmp_path / "tight", 1024, lambda r: r.preload(too_big))
    assert result.built and not result.resident and "--resident-stack-bytes" in result.reason
    assert tight.entries == 0


async def _long_render(runner) -> asyncio.Future:
    """An 8-step render without LoRAs, once it runs on the render thread (the future of its result)."""
    long = asyncio.ensure_future(runner.render(Render(id=1, prompt="long", width=64, height=64, steps=8)))
    while runner.running is None:
        await asyncio.sleep(0.01)
    return long


def _gated(runner) -> tuple[threading.Event, threading.Event]:
    """Hold every preload build at its start until the test says go: (entered, go). The build itself is
    the real one, with the runner's stop; a stop set while it is held is seen at the build's first check."""
    real, entered, go = runner.service.preload, threading.Event(), threading.Event()

    def gated(items, zero_match, stop=None):
        entered.set()
        go.wait(60)
        return real(items, zero_match, stop)

    runner.service.preload = gated
    return entered, go


def test_a_preload_is_cancelled_by_its_owner_and_id_waiting_or_building(tiny_model, tmp_path):
    """`cancel_preload(owner, id)` drops a preload still waiting behind a render: its caller gets
    `cancelled` and nothing is built; another owner's preload with the same id is not touched. A preload
    whose build has started is reported running (then cancelling, to a second cancel): its build stops,
    keeps nothing, and its caller gets `cancelled`; an answered one is unknown. A caller that stops
    waiting for a building preload stops its build too."""
    from client.wire.errors import Cancelled

    loras, a, b, _ = _files(tmp_path)
    runner, patcher = _runner(tiny_model, loras, tmp_path / "out")

    async def main():
        try:
            long = await _long_render(runner)
            mine = asyncio.ensure_future(runner.preload(Preload(id=7, lora_paths=[str(a)], lora_scales=[0.5]), owner=1))
            theirs = asyncio.ensure_future(
                runner.preload(Preload(id=7, lora_paths=[str(b)], lora_scales=[0.5]), owner=2)
            )
            await asyncio.sleep(0)
            states = [runner.cancel_preload(1, 7), runner.cancel_preload(1, 7), runner.cancel_preload(3, 7)]
            waiting = runner.status().preloads_waiting
            with pytest.raises(Cancelled):
                await mine
            await long
            built = await theirs
            entered, go = _gated(runner)
            third = asyncio.ensure_future(
                runner.preload(Preload(id=8, lora_paths=[str(a)], lora_scales=[0.7]), owner=1)
            )
            await asyncio.to_thread(entered.wait, 60)  # its build has started on the render thread
            running = [runner.cancel_preload(1, 8), runner.cancel_preload(1, 8)]
            go.set()
            with pytest.raises(Cancelled, match="while it was building"):
                await third
            after = runner.cancel_preload(1, 8)

            entered.clear()
            go.clear()  # a caller that stops waiting (a closed call: a gateway's cancel reaching a replica)
            fourth = asyncio.ensure_future(runner.preload(Preload(id=9, lora_paths=[str(a)], lora_scales=[0.3])))
            await asyncio.to_thread(entered.wait, 60)
            fourth.cancel()
            await asyncio.gather(fourth, return_exceptions=True)
            gone = runner.preloads.running.stopped_for
            go.set()
            while runner.preloads.running is not None:
                await asyncio.sleep(0.01)
            return states, waiting, built, running, after, gone, runner.status().preloads_yielded
        finally:
            await runner.close()

    try:
        states, waiting, built, running, after, gone, yielded = asyncio.run(main())
    finally:
        patcher.clear()
    assert states == ["queued", "unknown", "unknown"] and waiting == 1
    assert built.built and built.resident  # owner 2's preload of the same id ran
    assert running == ["running", "cancelling"] and after == "unknown" and yielded == 0 and gone == "cancel"
    assert patcher.resident.stats().entries == 1  # b; a at 0.5 never built, a at 0.7 and 0.3 stopped


def test_a_render_stops_a_preload_building_another_stack_and_waits_for_one_building_its_own(tiny_model, tmp_path):
    """A render arriving while a preload builds another stack stops that build (nothing kept) and runs
    first; the preload is then built again and answered `built` (`preloads_yielded` counts the stop). A
    render of the very stack being built waits for it instead and finds it resident (a hit, no miss)."""
    loras, a, b, _ = _files(tmp_path)
    runner, patcher = _runner(tiny_model, loras, tmp_path / "out")
    order: list[str] = []

    async def main():
        try:
            entered, go = _gated(runner)

            async def track(name, call):
                result = await call
                order.append(name)
                return result

            preload_a = asyncio.ensure_future(
                track("preload a", runner.preload(Preload(id=1, lora_paths=[str(a)], lora_scales=[0.7])))
            )
            await asyncio.to_thread(entered.wait, 60)
            with_b = Render(id=2, prompt="b", lora_paths=[str(b)], lora_scales=[0.4], **SIZE)
            render_b = asyncio.ensure_future(track("render b", runner.render(with_b)))
            await asyncio.sleep(0)
            stopped_for = runner.preloads.running.stopped_for
            go.set()
            first = await preload_a
            await render_b
            yielded = runner.status().preloads_yielded

            entered.clear()
            go.clear()
            preload_again = asyncio.ensure_future(runner.preload(Preload(id=3, lora_paths=[str(b)], lora_scales=[0.9])))
            await asyncio.to_thread(entered.wait, 60)
            before = patcher.resident.stats()
            same = asyncio.ensure_future(
                runner.render(Render(id=4, prompt="same", lora_paths=[str(b)], lora_scales=[0.9], **SIZE))
            )
            await asyncio.sleep(0)
            kept_going = runner.preloads.running.stopped_for is None
            go.set()
            second, rendered = await preload_again, await same
            after = patcher.resident.stats()

            entered.clear()
            go.clear()  # a preload whose deadline passes while it builds, then stopped by a render
            kept = patcher.resident.stats().entries
            late = asyncio.ensure_future(
                runner.preload(Preload(id=5, lora_paths=[str(a)], lora_scales=[0.2], deadline_s=0.3))
            )
            await asyncio.to_thread(entered.wait, 60)
            await asyncio.sleep(0.4)
            plain = asyncio.ensure_future(runner.render(Render(id=6, prompt="plain", **SIZE)))
            await asyncio.sleep(0)
            go.set()
            with pytest.raises(DeadlineExceeded, match="before this preload was built"):
                await late
            await plain
            assert patcher.resident.stats().entries == kept  # the late preload kept nothing
            return stopped_for, first, yielded, kept_going, second, rendered, before, after, runner.status()
        finally:
            await runner.close()

    try:
        stopped_for, first, yielded, kept_going, second, rendered, before, after, status = asyncio.run(main())
    finally:
        patcher.clear()
    assert stopped_for == "render" and order == ["render b", "preload a"]
    assert first.built and first.resident and not first.live and yielded == 1
    assert kept_going and second.built and rendered.stack_switched
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)  # the render's switch: a resident hit
    assert status.preloads_yielded == 2 and status.preloads_waiting == 0


def test_cancel_on_the_socket_stops_a_building_preload(tiny_model, tmp_path):
    """Over a real socket (the real server and service on the tiny model, in process): `cancel` naming a
    preload whose build has started answers `cancelled` true, state `running`; a second cancel answers
    `cancelling`; the preload answers `cancelled` and nothing was kept. A render arriving during the next
    preload's build stops it too: `easel status` then counts one build yielded to renders."""
    from click.testing import CliRunner
    from helpers.daemon_standin import InProcessDaemon, make_config

    from client.cli import main as easel
    from client.client import AsyncRenderClient
    from client.wire.errors import Cancelled
    from daemon.lora.cache import LoraCache
    from daemon.lora.patcher import LoraPatcher
    from daemon.lora.resident import ResidentStacks
    from daemon.service import RenderService

    loras, a, _, _ = _files(tmp_path)
    config = make_config(tmp_path, lora_roots=(loras,))
    cache = LoraCache(config.service.lora_cache_bytes)
    patcher = LoraPatcher(tiny_model.flux.transformer, cache, resident=ResidentStacks(2 * 1024**3))
    service = RenderService(
        tiny_model, config.service, patcher=patcher, cache=cache, preset_name="tiny", default_steps=1
    )
    d = InProcessDaemon(config, service=service).start()
    try:
        entered, go = threading.Event(), threading.Event()
        real = service.preload

        def gated(items, zero_match, stop=None):
            entered.set()
            go.wait(60)
            return real(items, zero_match, stop)

        service.preload = gated

        async def main():
            async with AsyncRenderClient(config.socket_path) as c:
                preload = asyncio.ensure_future(c.preload([str(a)], [0.6], request_id="world-1"))
                await asyncio.to_thread(entered.wait, 60)
                first, second = await c.cancel("world-1"), await c.cancel("world-1")
                go.set()
                with pytest.raises(Cancelled, match="while it was building"):
                    await preload
                resident = (await c.status()).resident_stacks

                entered.clear()
                go.clear()
                preload = asyncio.ensure_future(c.preload([str(a)], [0.4], request_id="world-2"))
                await asyncio.to_thread(entered.wait, 60)
                render = asyncio.ensure_future(c.send_render("plain", **SIZE))
                while not (await c.status()).queue_depth:  # the render is queued: the build was told to stop
                    await asyncio.sleep(0.01)
                go.set()
                await render
                built = await preload
                shown = await asyncio.to_thread(
                    CliRunner().invoke, easel, ["status", "--socket", str(config.socket_path)]
                )
                return first, second, resident, built, shown

        first, second, resident, built, shown = asyncio.run(main())
    finally:
        go.set()
        d.stop(0)
        patcher.clear()
    assert (first.cancelled, first.state, first.job) == (True, "running", "")
    assert (second.cancelled, second.state) == (False, "cancelling")
    assert resident.entries == 0
    assert built.built and built.resident and shown.exit_code == 0, shown.output
    assert "preload builds yielded to renders 1" in shown.output


def test_the_files_of_a_preload_waiting_behind_a_render_are_read_during_the_render(tiny_model, tmp_path):
    """While a render runs, the preload waiting behind it has its files read and parsed on the prefetch
    thread (a miss in the parsed-file cache before the render ends); its own turn then reads nothing."""
    loras, a, b, _ = _files(tmp_path)
    runner, patcher = _runner(tiny_model, loras, tmp_path / "out")

    async def main():
        try:
            long = await _long_render(runner)
            misses = patcher.cache.stats().misses
            preload = asyncio.ensure_future(runner.preload(Preload(id=2, lora_paths=[str(a)], lora_scales=[0.5])))
            while patcher.cache.stats().misses == misses and not long.done():
                await asyncio.sleep(0.01)
            read_during_render = not long.done() and runner.status().preloads_waiting == 1
            await long
            result = await preload
            return misses, read_during_render, result, patcher.cache.stats()
        finally:
            await runner.close()

    try:
        misses, read_during_render, result, after = asyncio.run(main())
    finally:
        patcher.clear()
    assert read_during_render and result.built and result.resident
    assert after.misses == misses + 1 and after.hits >= 1  # read once, ahead; the build found it parsed


def test_a_render_does_not_wait_for_the_files_of_a_preload_that_started_on_an_idle_daemon(tiny_model, tmp_path):
    """A preload that starts at once (nothing ahead of it to read its files behind) reads them on the
    prefetch thread, not on the render thread: a render arriving while that read is held runs and
    finishes before the read ends. The preload yields to it, and is built once its files are read."""
    loras, a, _, _ = _files(tmp_path)
    runner, patcher = _runner(tiny_model, loras, tmp_path / "out")
    real, entered, go = patcher.cache.resolved, threading.Event(), threading.Event()

    def held(path, *args, **kwargs):  # the real read, held until the test says go
        entered.set()
        go.wait(60)
        return real(path, *args, **kwargs)

    patcher.cache.resolved = held

    async def main():
        try:
            preload = asyncio.ensure_future(runner.preload(Preload(id=1, lora_paths=[str(a)], lora_scales=[0.5])))
            await asyncio.to_thread(entered.wait, 60)
            render = asyncio.ensure_future(runner.render(Render(id=2, prompt="plain", **SIZE)))
            done, _ = await asyncio.wait({render}, timeout=30)
            rendered_while_held = render in done and not go.is_set()
            go.set()
            result = await preload
            await render
            return rendered_while_held, result, runner.status().preloads_yielded
        finally:
            go.set()
            await runner.close()

    try:
        rendered_while_held, result, yielded = asyncio.run(main())
    finally:
        patcher.clear()
    assert rendered_while_held
    assert result.built and result.resident and not result.live and yielded == 1


def test_a_cancel_that_comes_after_the_build_finished_still_keeps_nothing(tiny_model, tmp_path):
    """A cancel answered `running` while the preload's build has finished but its answer is not out yet:
    the preload still answers `cancelled`, and the stack it built is dropped (a later render of it builds
    it, a miss). A stack that was resident before the preload (built=False) is left where it was."""
    from client.wire.errors import Cancelled

    loras, a, b, _ = _files(tmp_path)
    runner, patcher = _runner(tiny_model, loras, tmp_path / "out")
    real, finished, go = runner.service.preload, threading.Event(), threading.Event()

    def held_after(items, zero_match, stop=None):  # the real build, its answer held until the test says go
        result = real(items, zero_match, stop)
        finished.set()
        go.wait(60)
        return result

    async def cancelled_after_build(request: Preload) -> tuple[str, int]:
        finished.clear()
        go.clear()
        preload = asyncio.ensure_future(runner.preload(request, owner=1))
        await asyncio.to_thread(finished.wait, 60)
        kept_meanwhile = patcher.resident.stats().entries
        state = runner.cancel_preload(1, request.id)
        go.set()
        with pytest.raises(Cancelled, match="nothing was kept"):
            await preload
        return state, kept_meanwhile

    async def main():
        try:
            await runner.preload(Preload(id=1, lora_paths=[str(b)], lora_scales=[0.5]))
            runner.service.preload = held_after
            before = patcher.resident.stats()
            fresh = await cancelled_after_build(Preload(id=2, lora_paths=[str(a)], lora_scales=[0.6]))
            after_fresh = patcher.resident.stats()
            known = await cancelled_after_build(Preload(id=3, lora_paths=[str(b)], lora_scales=[0.5]))
            after_known = patcher.resident.stats()
            runner.service.preload = real
            rendered = await runner.render(Render(id=4, prompt="a", lora_paths=[str(a)], lora_scales=[0.6], **SIZE))
            return before, fresh, after_fresh, known, after_known, rendered, patcher.resident.stats()
        finally:
            go.set()
            await runner.close()

    try:
        before, fresh, after_fresh, known, after_known, rendered, last = asyncio.run(main())
    finally:
        patcher.clear()
    assert fresh == ("running", before.entries + 1)  # built and put, then the cancel came
    assert after_fresh.entries == before.entries and after_fresh.bytes == before.bytes
    assert known == ("running", before.entries) and after_known.entries == before.entries  # b stays
    assert rendered.stack_switched and last.misses == before.misses + 1  # a was built again by its switch
