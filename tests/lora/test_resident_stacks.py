"""Resident stacks on the live tiny transformer: a switch back to a built stack is one reference swap that
renders exactly what a cold apply renders; the byte bound evicts least recently used stacks (never the live
one); a file changed on disk (same size and mtime restored) is read again and its old stack is not used."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from helpers.lora_factories import TINY_MISSING, generate_lora

from daemon.lora import LoraCache, StackEntry

pytestmark = pytest.mark.model


def _module(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


@pytest.fixture
def make_patcher(transformer):
    from daemon.lora import LoraPatcher
    from daemon.lora.resident import ResidentStacks

    made = []
    originals = {}

    def make(resident_bytes=1024**3, cache_bytes=512 * 1024**2, lowrank_form=None):
        p = LoraPatcher(
            transformer,
            LoraCache(max_bytes=cache_bytes),
            resident=ResidentStacks(resident_bytes),
            lowrank_form=lowrank_form,
        )
        for name in p.layout:  # as the model was before the first patcher of the test
            originals.setdefault(name, _module(transformer, name))
        made.append(p)
        return p

    yield make
    for p in made:
        p.clear()
    for name, module in originals.items():
        assert _module(transformer, name) is module


def _files(tmp_path, layout, n=4):
    fmts = ["kohya", "diffusers", "bfl", "xlabs"]
    return [
        generate_lora(fmts[i % 4], tmp_path / f"{i}.safetensors", layout, rank=4, alpha=4.0, seed=i, magnitude=0.2)
        for i in range(n)
    ]


def _two_stacks(g) -> tuple[list[StackEntry], list[StackEntry]]:
    """A 2-file and a 3-file stack over four generated files (one file in both, at another scale)."""
    stack_a = [StackEntry(str(g[0].path), 0.8), StackEntry(str(g[1].path), 0.5)]
    stack_b = [StackEntry(str(g[2].path), 0.7), StackEntry(str(g[3].path), -0.4), StackEntry(str(g[0].path), 0.3)]
    return stack_a, stack_b


def test_resident_switch_renders_exactly_what_a_cold_apply_renders(tmp_path, make_patcher, transformer, forward):
    p = make_patcher()
    g = _files(tmp_path, p.layout)
    stack_a, stack_b = _two_stacks(g)
    p.apply_stack(stack_b)
    cold_b = forward()
    p.clear()
    p.resident.clear()
    p.cache.clear()
    p.apply_stack(stack_a)
    cold_a = forward()
    p.apply_stack(stack_b)
    wrappers = {name: _module(transformer, name) for name in p.layout}
    before = p.resident.stats()
    for _ in range(3):  # back and forth between resident stacks: no rebuild, no module replaced
        assert not p.apply_stack(stack_a).noop
        np.testing.assert_array_equal(forward(), cold_a)
        p.apply_stack(stack_b)
        np.testing.assert_array_equal(forward(), cold_b)
        assert all(_module(transformer, n) is m for n, m in wrappers.items())
    after = p.resident.stats()
    assert after.misses == before.misses and after.hits == before.hits + 6
    assert p.last_report.matched_keys == [len(g[2].keys), len(g[3].keys), len(g[0].keys)]


def test_clear_after_resident_switches_is_bit_identical(tmp_path, make_patcher, forward):
    base = forward()
    p = make_patcher()
    g = _files(tmp_path, p.layout, 2)
    for _ in range(2):
        p.apply_stack([StackEntry(str(g[0].path), 1.0)])
        p.apply_stack([StackEntry(str(g[1].path), 1.0)])
    p.clear()
    assert p.patched_layers == []
    np.testing.assert_array_equal(forward(), base)


def _tight(tmp_path, make_patcher, n: int):
    """`n` generated files, and a patcher whose resident bound holds one single-file stack and a half."""
    probe = make_patcher()
    g = _files(tmp_path, probe.layout, n)
    probe.apply_stack([StackEntry(str(g[0].path), 1.0)])
    one = probe.resident.stats().bytes
    probe.clear()
    return g, make_patcher(resident_bytes=int(one * 1.5))


def test_eviction_under_a_small_bound_never_drops_the_live_stack(tmp_path, make_patcher, forward):
    g, p = _tight(tmp_path, make_patcher, 3)
    stacks = [[StackEntry(str(x.path), 1.0)] for x in g]
    outs = []
    for s in stacks:
        p.apply_stack(s)
        outs.append(forward())
        stats = p.resident.stats()
        assert stats.entries == 1 and stats.bytes <= p.resident.max_bytes
    assert p.resident.stats().evictions == 2
    p.apply_stack(stacks[0])  # evicted: built again, same output
    np.testing.assert_array_equal(forward(), outs[0])
    assert p.resident.stats().misses == 4
    p.clear()
    tiny = make_patcher(resident_bytes=16)  # bigger than the bound: applied, never kept
    tiny.apply_stack(stacks[1])
    np.testing.assert_array_equal(forward(), outs[1])
    assert tiny.resident.stats().entries == 0


def test_a_file_rewritten_with_its_old_size_and_mtime_is_read_again(tmp_path, make_patcher, forward):
    p = make_patcher()
    path = tmp_path / "live.safetensors"
    a = generate_lora("kohya", path, p.layout, rank=4, alpha=4.0, seed=1, magnitude=0.2)
    b = generate_lora("kohya", tmp_path / "b.safetensors", p.layout, rank=4, alpha=4.0, seed=2, magnitude=0.2)
    assert a.path.stat().st_size == b.path.stat().st_size
    p.apply_stack([StackEntry(str(path), 1.0)])
    old = forward()
    st = os.stat(path)
    shutil.copyfile(b.path, path)  # in place: same inode, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime, as `cp -p` / `rsync -t` leave it
    report = p.apply_stack([StackEntry(str(path), 1.0)])
    assert not report.noop
    new = forward()
    assert not np.array_equal(new, old)
    fresh = make_patcher()
    p.clear()
    fresh.apply_stack([StackEntry(str(b.path), 1.0)])
    np.testing.assert_array_equal(forward(), new)


def test_a_symlink_pointed_at_another_file_switches_to_that_file(tmp_path, make_patcher, forward):
    """A stack named through a symlink (`current.safetensors -> v1`, as a deploy swaps versions) follows the
    link on every switch: pointed at v2, the next switch builds v2 (not a no-op, not v1's resident stack)
    and renders what v2 named directly renders; pointed back, v1's resident stack is switched to again."""
    p = make_patcher()
    v1 = generate_lora("kohya", tmp_path / "v1.safetensors", p.layout, rank=4, alpha=4.0, seed=1, magnitude=0.2)
    v2 = generate_lora("kohya", tmp_path / "v2.safetensors", p.layout, rank=4, alpha=4.0, seed=2, magnitude=0.2)
    link = tmp_path / "current.safetensors"
    link.symlink_to(v1.path)
    via_link = [StackEntry(str(link), 1.0)]
    p.apply_stack(via_link)
    first = forward()
    p.apply_stack([StackEntry(str(v2.path), 1.0)])
    wanted = forward()
    p.apply_stack(via_link)
    np.testing.assert_array_equal(forward(), first)
    swapped = tmp_path / "next.safetensors"
    swapped.symlink_to(v2.path)
    swapped.replace(link)  # the link now names v2 (renamed over it, as a deploy does)
    report = p.apply_stack(via_link)
    assert not report.noop and report.files[0].path == str(link)  # reported as the request named it
    np.testing.assert_array_equal(forward(), wanted)
    misses = p.resident.stats().misses
    swapped.symlink_to(v1.path)
    swapped.replace(link)
    p.apply_stack(via_link)
    np.testing.assert_array_equal(forward(), first)
    assert p.resident.stats().misses == misses  # v1's stack was still resident: a hit


def test_content_hash_tells_apart_files_whose_stat_cannot(tmp_path):
    from client.lorafile.signature import file_signature

    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 64)
    plain, hashed = file_signature(path), file_signature(path, with_digest=True)
    assert hashed.digest and plain.digest is None and hashed.same_file_version(plain)
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = file_signature(path, with_digest=True)
    assert changed.digest != hashed.digest and changed.ctime_ns >= plain.ctime_ns
    assert changed != hashed


def test_prefetch_reads_without_touching_the_model(tmp_path, make_patcher, transformer):
    p = make_patcher()
    g = _files(tmp_path, p.layout, 1)
    modules = {name: _module(transformer, name) for name in p.layout}
    p.prefetch([StackEntry(str(g[0].path), 1.0), StackEntry(str(tmp_path / "missing.safetensors"), 1.0)])
    assert p.cache.stats().entries == 1 and p.resident.stats().entries == 0
    assert all(_module(transformer, n) is m for n, m in modules.items())
    p.apply_stack([StackEntry(str(g[0].path), 1.0)])
    assert p.cache.stats().hits == 1


class _RenderThread:
    """A thread standing in for the render thread: it runs transformer steps in a loop and, at each step
    boundary, the work other threads handed it (daemon.model_thread), until stopped."""

    def __init__(self, forward) -> None:
        import threading

        from daemon.model_thread import ModelThreadCalls

        self.calls = ModelThreadCalls()
        self.steps = 0
        self.ran_on: list[int] = []  # the threads the handed-over functions ran on
        self._stop = threading.Event()
        self._forward = forward
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.calls.run_pending()
            self._forward()
            self.steps += 1
        self.calls.close()

    def call(self, fn):
        import threading

        def noted():
            self.ran_on.append(threading.get_ident())
            return fn()

        return self.calls.call(noted)

    def __enter__(self):
        self.calls.open()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("form", ["stacked", "per_file"])
def test_a_stack_prebuilt_during_a_render_switches_as_a_resident_hit_and_renders_as_built_cold(
    tmp_path, make_patcher, transformer, forward, form
):
    p = make_patcher(lowrank_form=form)
    g = _files(tmp_path, p.layout)
    stack_a, stack_b = _two_stacks(g)
    p.apply_stack(stack_b)
    cold_b = forward()
    p.apply_stack(stack_a)  # the stack live while the "render" runs
    p.resident.discard(lambda key: key != p._active_key)
    p.cache.clear()
    live = forward()
    modules = {name: _module(transformer, name) for name in p.layout}
    with _RenderThread(forward) as render:
        assert p.prebuild(stack_b, render.call)
        assert render.ran_on == [render._thread.ident]  # the buffers were allocated between its steps
    assert render.steps >= 1
    assert all(_module(transformer, n) is m for n, m in modules.items())  # nothing in the model touched
    np.testing.assert_array_equal(forward(), live)  # the live stack renders as before
    before = p.resident.stats()
    assert before.entries == 2
    report = p.apply_stack(stack_b)
    after = p.resident.stats()
    assert after.hits == before.hits + 1 and after.misses == before.misses  # the switch built nothing
    assert report.matched_keys == [len(g[2].keys), len(g[3].keys), len(g[0].keys)]
    np.testing.assert_array_equal(forward(), cold_b)
    assert not p.prebuild(stack_b, render.call)  # live already: nothing to build
    assert any(parts.files for parts in p._live.layers.values()) == (form == "per_file")  # the form prebuilt


def test_a_prebuild_under_a_tight_bound_never_evicts_the_live_stack(tmp_path, make_patcher, forward):
    """The resident bound holds one stack and a half: a prebuild puts the next stack beside the live one
    and evicts nothing live (the live stack is pinned); both switches that follow are resident hits."""
    g, p = _tight(tmp_path, make_patcher, 2)
    live, queued = [StackEntry(str(g[0].path), 1.0)], [StackEntry(str(g[1].path), 1.0)]
    p.apply_stack(live)
    with _RenderThread(forward) as render:
        assert p.prebuild(queued, render.call)
    assert p._key(live) in p.resident and p._key(queued) in p.resident
    assert p.resident.stats().evictions == 0
    misses = p.resident.stats().misses
    p.apply_stack(queued)
    p.apply_stack(live)
    assert p.resident.stats().misses == misses


def test_a_put_in_the_instant_before_a_cold_switch_goes_live_does_not_evict_it(tmp_path, make_patcher, forward):
    """A prebuild's put (another thread) can land between a cold switch's put of its stack and the switch
    itself. The stack going live is live from its put: it stays resident (and counted), and what makes
    room is the stack that was live before."""
    from daemon.lora.resident import ResidentStack

    g, p = _tight(tmp_path, make_patcher, 3)
    first, second = [StackEntry(str(g[0].path), 1.0)], [StackEntry(str(g[1].path), 1.0)]
    p.apply_stack(first)
    one = p.resident.stats().bytes
    elsewhere = ResidentStack(key=(("/elsewhere", 1.0, None),), layers={}, reports=[], nbytes=one)
    switch = p._switch

    def put_beside_then_switch(built):
        p.resident.put(elsewhere)  # as a prebuild's put on the prefetch thread, landing right now
        switch(built)

    p._switch = put_beside_then_switch
    p.apply_stack(second)
    p._switch = switch
    assert p._key(second) in p.resident and elsewhere.key in p.resident
    assert p._key(first) not in p.resident  # the stack that was live is the one evicted
    assert p.resident.live == p._key(second)
    assert p.resident.stats().bytes == p.resident.peek(p._key(second)).nbytes + elsewhere.nbytes
    p.clear()
    assert p.resident.live == ()


def test_prebuild_gives_up_when_no_render_runs_its_allocation(tmp_path, make_patcher, forward):
    import threading

    from daemon.model_thread import ModelThreadCalls

    p = make_patcher()
    g = _files(tmp_path, p.layout, 2)
    stack = [StackEntry(str(g[0].path), 1.0), StackEntry(str(g[1].path), 0.5)]
    idle = ModelThreadCalls()  # no render in progress
    assert not p.prebuild(stack, idle.call)
    assert p.resident.stats().entries == 0 and p.cache.stats().entries == 2  # the files were read
    ending = ModelThreadCalls()
    ending.open()
    answer: list[bool] = []
    worker = threading.Thread(target=lambda: answer.append(p.prebuild(stack, ending.call)))
    worker.start()
    while not ending._pending:  # the prebuild waits for a step boundary that never comes
        worker.join(0.01)
    ending.close()  # the render ends first
    worker.join()
    assert answer == [False] and p.resident.stats().entries == 0
    p.apply_stack(stack)  # the switch builds it
    assert p.resident.stats().misses == 1 and p.resident.stats().entries == 1


def test_prebuild_leaves_missing_files_and_other_adapters_to_the_switch(tmp_path, make_patcher, forward):
    from client.wire.errors import LoraNotFound

    p = make_patcher()
    g = _files(tmp_path, p.layout, 1)
    lokr = generate_lora("lokr", tmp_path / "lokr.safetensors", p.layout, rank=4, alpha=4.0, seed=9)
    with _RenderThread(forward) as render:
        missing = [StackEntry(str(g[0].path), 1.0), StackEntry(str(tmp_path / "gone.safetensors"), 1.0)]
        assert not p.prebuild(missing, render.call)
        assert not p.prebuild([StackEntry(str(lokr.path), 1.0)], render.call)  # Kronecker terms: MLX ops
    assert render.ran_on == [] and p.resident.stats().entries == 0
    with pytest.raises(LoraNotFound):
        p.apply_stack(missing)
    p.apply_stack([StackEntry(str(lokr.path), 1.0)])
    assert p.resident.stats().entries == 1


def test_a_switch_during_a_prebuilds_writes_waits_for_them_instead_of_building_again(
    tmp_path, make_patcher, forward, monkeypatch
):
    import threading

    import daemon.lora.runtime as runtime

    p = make_patcher()
    g = _files(tmp_path, p.layout, 2)
    stack = [StackEntry(str(g[0].path), 0.9), StackEntry(str(g[1].path), -0.6)]
    p.apply_stack(stack)
    cold = forward()
    p.clear()
    p.resident.clear()
    writing, release = threading.Event(), threading.Event()
    write = runtime.AllocatedFills.write

    def held_write(self):  # the prebuild's buffers exist; its writes wait for the test
        writing.set()
        release.wait(60)
        write(self)

    monkeypatch.setattr(runtime.AllocatedFills, "write", held_write)
    before = p.resident.stats()
    answers: list = []
    with _RenderThread(forward) as render:
        prebuilding = threading.Thread(target=lambda: answers.append(p.prebuild(stack, render.call)))
        prebuilding.start()
        assert writing.wait(60)
    switching = threading.Thread(target=lambda: answers.append(p.apply_stack(stack)))
    switching.start()  # the render ended; the next job's switch comes before the writes are done
    switching.join(0.3)
    assert switching.is_alive()  # it waits for the prebuild's writes
    release.set()
    prebuilding.join()
    switching.join()
    assert answers[0] is True and not answers[1].noop
    stats = p.resident.stats()
    assert (stats.hits, stats.misses) == (before.hits + 1, before.misses)  # built once, by the prebuild
    assert stats.entries == 1
    np.testing.assert_array_equal(forward(), cold)


def test_a_preload_builds_beside_the_live_stack_and_changes_nothing_live(tmp_path, make_patcher, forward):
    """Under a bound of one stack and a half: preloading another stack keeps the live one (no eviction),
    changes no output and no module, and the switch to it is a resident hit rendering what a cold apply
    renders. Asked again it builds nothing; asked for the live stack it says so."""
    from daemon.lora import LoraPatcher

    g, p = _tight(tmp_path, make_patcher, 2)
    live, other = [StackEntry(str(g[0].path), 1.0)], [StackEntry(str(g[1].path), 0.7, name="other")]
    p.apply_stack(live)
    out_live = forward()
    modules = {name: _module(p.transformer, name) for name in p.layout}
    report = p.preload(other)
    assert (report.built, report.resident, report.live) == (True, True, False)
    assert report.nbytes == p.resident.peek(p._key(other)).nbytes and report.build_ms > 0
    assert report.files[0].name == "other" and report.matched_keys == [len(g[1].keys)]
    np.testing.assert_array_equal(forward(), out_live)
    assert all(_module(p.transformer, n) is m for n, m in modules.items())
    stats = p.resident.stats()
    assert stats.evictions == 0 and stats.entries == 2 and p.active == live
    again, live_again = p.preload(other), p.preload(live)
    assert (again.built, again.resident, again.live) == (False, True, False)
    assert (live_again.built, live_again.live) == (False, True)
    assert (p.resident.stats().hits, p.resident.stats().misses) == (stats.hits, stats.misses)  # no switch counted
    p.apply_stack(other)
    assert p.resident.stats().hits == stats.hits + 1 and p.resident.stats().misses == stats.misses
    preloaded = forward()
    cold = make_patcher()
    cold.apply_stack(other)
    np.testing.assert_array_equal(forward(), preloaded)
    cold.clear()
    baked = LoraPatcher(p.transformer, LoraCache(), mode="bake")
    report = baked.preload(other)
    assert (report.built, report.resident) == (False, False) and "bake" in report.reason
    assert report.matched_keys == [len(g[1].keys)] and baked.active == []


def test_a_preload_keeps_the_zero_match_policy_of_each_request(tmp_path, make_patcher):
    """A file matching nothing: refused under "error" (nothing built), built with a warning under "warn";
    the switch to that built stack under "error" is still refused."""
    from client.wire.errors import LoraZeroMatch

    p = make_patcher()
    nothing = generate_lora("kohya", tmp_path / "nothing.safetensors", TINY_MISSING, rank=2, seed=1)
    stack = [StackEntry(str(nothing.path), 1.0)]
    with pytest.raises(LoraZeroMatch):
        p.preload(stack)
    assert p.resident.stats().entries == 0
    report = p.preload(stack, zero_match="warn")
    assert report.built and report.matched_keys == [0] and report.warnings
    with pytest.raises(LoraZeroMatch):
        p.apply_stack(stack)
    with pytest.raises(LoraZeroMatch):
        p.preload(stack)
    assert p.active == []


def test_a_preload_stopped_at_any_of_its_checks_keeps_nothing_and_changes_nothing(tmp_path, make_patcher, forward):
    """`preload(..., stop=...)` asks `stop` between its phases and before each buffer is allocated or
    written. Whichever ask first says True, the build ends there: Cancelled, nothing resident, the live
    stack, its outputs and the model's modules as they were. A build never stopped is then resident, and
    the switch to it renders what a cold apply renders."""
    from client.wire.errors import Cancelled

    p = make_patcher()
    g = _files(tmp_path, p.layout, 4)
    live, other = _two_stacks(g)
    p.apply_stack(live)
    out_live = forward()
    modules = {name: _module(p.transformer, name) for name in p.layout}
    entries = p.resident.stats().entries

    asked = []
    counting = make_patcher()  # the same stack built by a patcher of its own: how often a full build asks
    counting.preload(other, stop=lambda: asked.append(1) is not None)
    counting.clear()
    assert len(asked) >= 4  # after reading, after planning, before allocating and before writing a chunk

    for first_true in range(1, len(asked) + 1):
        calls = []

        def stop(first_true=first_true, calls=calls):
            calls.append(1)
            return len(calls) >= first_true

        with pytest.raises(Cancelled, match="nothing was kept"):
            p.preload(other, stop=stop)
        assert len(calls) >= first_true
        assert p.resident.stats().entries == entries and p.resident.peek(p._key(other)) is None
        assert p.active == live
        np.testing.assert_array_equal(forward(), out_live)
        assert all(_module(p.transformer, n) is m for n, m in modules.items())

    report = p.preload(other, stop=lambda: False)
    assert report.built and report.resident and p.resident.stats().entries == entries + 1
    p.apply_stack(other)
    preloaded = forward()
    cold = make_patcher()
    cold.apply_stack(other)
    np.testing.assert_array_equal(forward(), preloaded)
    cold.clear()


def test_a_rewritten_files_old_stacks_leave_the_resident_stacks_at_its_next_build(tmp_path, make_patcher, forward):
    """No lookup can reach a stack built from a file's old bytes, so the build of its new version drops every
    such stack (a LoRA author re-exporting one file between renders would otherwise fill the bound with dead
    versions); stacks of other files stay."""
    p = make_patcher()
    path = tmp_path / "wip.safetensors"
    generate_lora("kohya", path, p.layout, rank=4, alpha=4.0, seed=1, magnitude=0.2)
    other = generate_lora("diffusers", tmp_path / "other.safetensors", p.layout, rank=4, alpha=4.0, seed=3)
    wip, rest = StackEntry(str(path), 1.0), StackEntry(str(other.path), 0.5)
    p.apply_stack([wip])
    p.apply_stack([rest, wip])
    two = p.resident.stats().bytes
    p.apply_stack([rest])
    alone = p.resident.stats().bytes - two  # [rest]'s own bytes
    assert p.resident.stats().entries == 3
    b = generate_lora("kohya", tmp_path / "b.safetensors", p.layout, rank=4, alpha=4.0, seed=2, magnitude=0.2)
    shutil.copyfile(b.path, tmp_path / "next.safetensors")
    os.replace(tmp_path / "next.safetensors", path)  # an atomic re-export: a new inode
    p.apply_stack([wip])
    new = forward()
    stats = p.resident.stats()
    assert stats.entries == 2 and stats.evictions == 2  # [wip v1] and [rest, wip v1] dropped
    assert stats.bytes == alone + p._live_built.nbytes
    p.apply_stack([rest])  # still resident
    assert p.resident.stats().misses == stats.misses
    p.apply_stack([wip])
    np.testing.assert_array_equal(forward(), new)
    fresh = make_patcher()
    p.clear()
    fresh.apply_stack([StackEntry(str(b.path), 1.0)])
    np.testing.assert_array_equal(forward(), new)
