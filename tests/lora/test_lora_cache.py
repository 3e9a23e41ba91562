"""The parsed-LoRA cache: hits, re-reads on change, byte-bounded LRU eviction, stats."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.lora_factories import write_safetensors

from client.wire.errors import LoraNotFound
from daemon.lora import LoraCache


def _lora(path, rank=4, seed=0, width=256):
    rng = np.random.default_rng(seed)
    base = "lora_unet_double_blocks_0_img_attn_proj"
    write_safetensors(
        path,
        {
            f"{base}.lora_down.weight": rng.standard_normal((rank, width)),
            f"{base}.lora_up.weight": rng.standard_normal((width, rank)),
        },
        {},
    )
    return path


def test_hit_miss_and_same_object(tmp_path):
    cache = LoraCache(max_bytes=10**8)
    path = _lora(tmp_path / "a.safetensors")
    first, sig = cache.get(path)
    again, sig2 = cache.get(str(path))
    assert again is first and sig == sig2
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes == first.nbytes > 0


def test_reread_when_the_file_changes(tmp_path):
    cache = LoraCache(max_bytes=10**8)
    path = _lora(tmp_path / "a.safetensors", rank=4)
    first, _ = cache.get(path)
    _lora(path, rank=8, seed=1)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a distinct mtime even on coarse clocks
    second, _ = cache.get(path)
    assert second is not first
    down = next(m for m in second.modules.values()).tensors["down"][1]
    assert down.shape[0] == 8
    assert cache.stats().misses == 2 and cache.stats().entries == 1
    assert cache.stats().bytes == second.nbytes


def test_lru_eviction_bounded_in_bytes(tmp_path):
    paths = [_lora(tmp_path / f"{i}.safetensors", seed=i) for i in range(4)]
    one = LoraCache(max_bytes=10**9).get(paths[0])[0].nbytes
    cache = LoraCache(max_bytes=int(one * 2.5))
    cache.get(paths[0])
    cache.get(paths[1])
    cache.get(paths[0])  # 0 is now most recent; 1 is the eviction candidate
    cache.get(paths[2])
    stats = cache.stats()
    assert stats.entries == 2 and stats.evictions == 1 and stats.bytes <= cache.max_bytes
    before = cache.stats().hits
    cache.get(paths[0])
    assert cache.stats().hits == before + 1  # 0 survived
    cache.get(paths[1])
    assert cache.stats().misses == 4  # 1 had been evicted


def test_file_bigger_than_the_cache_is_served_not_kept(tmp_path):
    cache = LoraCache(max_bytes=16)
    parsed, _ = cache.get(_lora(tmp_path / "big.safetensors"))
    assert parsed.modules and cache.stats().entries == 0 and cache.stats().bytes == 0


def test_missing_file(tmp_path):
    with pytest.raises(LoraNotFound):
        LoraCache().get(tmp_path / "gone.safetensors")


def test_an_adapter_config_beside_the_file_is_part_of_its_signature_and_digest(tmp_path):
    """Creating, editing or removing a PEFT adapter_config.json gives the file a new signature (and, with
    content_hash, a new digest): what was parsed under the old config is not reused."""
    cache = LoraCache(max_bytes=10**8, content_hash=True)
    path = _lora(tmp_path / "adapter_model.safetensors")
    _, plain = cache.get(path)
    config = tmp_path / "adapter_config.json"
    config.write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    _, with_config = cache.get(path)
    config.write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 2}')
    _, edited = cache.get(path)
    config.unlink()
    _, removed = cache.get(path)
    assert plain.sidecar is None and with_config.sidecar is not None and removed.sidecar is None
    assert len({with_config.digest, edited.digest, plain.digest}) == 3
    assert removed.digest == plain.digest  # the weights alone, as before the config existed
    assert cache.stats().misses == 4


def test_threads_asking_for_a_file_being_read_wait_for_that_read(tmp_path):
    """Two threads asking for the same 128 MB file at once (a preload's prefetch and its build, say): the
    file is read and parsed once, and both get the same parsed object (one miss, one hit, whichever thread
    reads). A read that fails is not shared: each asker reads for itself and gets the error."""
    import threading

    from client.wire.errors import LoraFormatError

    cache = LoraCache(max_bytes=10**9)
    path = _lora(tmp_path / "big.safetensors", rank=2048, width=8192)
    start, got, errors = threading.Barrier(2), [], []

    def ask(target):
        start.wait()
        try:
            got.append(cache.get(target)[0])
        except LoraFormatError as exc:
            errors.append(exc)

    def both(target):
        threads = [threading.Thread(target=ask, args=(target,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    both(path)
    stats = cache.stats()
    assert len(got) == 2 and got[0] is got[1] and not errors
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[: 10 * 1024**2])  # its header promises 128 MB
    got.clear()
    both(broken)
    assert len(errors) == 2 and not got
    assert cache.stats().misses == 3 and cache._reading == {}


def test_threads_resolving_a_file_against_one_layout_share_one_resolve(tmp_path, monkeypatch):
    """A thread asking for a file's terms while another resolves the same file against the same layout
    waits for those terms instead of resolving again: one resolve, the very same terms. A resolve that
    fails is not shared: the waiting thread then resolves for itself."""
    import threading

    import daemon.lora.cache as cache_module

    cache = LoraCache(max_bytes=10**8)
    path = _lora(tmp_path / "a.safetensors")
    layout = {"transformer_blocks.0.attn.to_out.0": (256, 256)}
    real, calls, entered, go = cache_module.resolve, [], threading.Event(), threading.Event()
    failing = [True]

    def held(parsed, layout):  # the real resolve, held until the test says go
        calls.append(threading.current_thread().name)
        entered.set()
        go.wait(30)
        if failing[0]:
            failing[0] = False
            raise ValueError("resolve broke")
        return real(parsed, layout)

    monkeypatch.setattr(cache_module, "resolve", held)

    def race() -> tuple[list, list]:
        got, errors = [], []

        def ask():
            try:
                got.append(cache.resolved(path, layout, "tiny")[0])
            except ValueError as exc:
                errors.append(exc)

        first = threading.Thread(target=ask, name="first")
        first.start()
        assert entered.wait(30)
        second = threading.Thread(target=ask, name="second")
        second.start()
        second.join(0.3)
        waited = second.is_alive()  # the second asker waits for the first's resolve
        go.set()
        first.join(30)
        second.join(30)
        assert waited
        return got, errors

    got, errors = race()  # the first resolve fails: the second asker resolves for itself
    assert calls == ["first", "second"] and len(errors) == 1 and len(got) == 1 and got[0]
    calls.clear()
    cache = LoraCache(max_bytes=10**8)
    entered.clear()
    go.clear()
    got, errors = race()
    assert calls == ["first"] and not errors and len(got) == 2 and got[0] is got[1]
    assert got[0][0].target == "transformer_blocks.0.attn.to_out.0"


def test_a_large_file_is_read_in_parts_side_by_side_and_whole(tmp_path, monkeypatch):
    from client.lorafile import safetensors_io

    ranges = []
    read_range = safetensors_io.OpenedSafetensors.read_range

    def noted(self, start, stop):
        ranges.append((start, stop))
        return read_range(self, start, stop)

    monkeypatch.setattr(safetensors_io.OpenedSafetensors, "read_range", noted)
    path = _lora(tmp_path / "big.safetensors", rank=8, width=4096)
    cache = LoraCache(max_bytes=10**8)
    cache.part_bytes = 16 * 1024
    parsed, _ = cache.get(path)
    size = os.path.getsize(path)
    assert len(ranges) == min(cache._readers, size // cache.part_bytes) >= 1
    assert sorted(ranges)[0][0] == 0 and sorted(ranges)[-1][1] == size
    want = safetensors_io.read_safetensors(path).tensors
    got = {key: arr for module in parsed.modules.values() for key, arr in module.tensors.values()}
    assert set(got) == set(want)
    for key, arr in got.items():
        np.testing.assert_array_equal(arr.astype(np.float32), want[key])
