"""A real `easel serve` process (tiny preset) against LoRA files that change underneath it.

- a big file truncated while the daemon inspects or renders with it: that request gets a LoRA error code
  (or succeeds, when the read finished first) and the daemon keeps serving; it is never killed by SIGBUS;
- a file rewritten in place with its old size and mtime restored (`cp -p`, `rsync -t`): the next render
  switches to the new bytes (`stack_switched`) and renders what a fresh daemon would;
- a safetensors header of deeply nested JSON: `lora_format` from inspect and from render;
- `--lora-cache-bytes` and `--resident-stack-bytes` show in `status`.

The daemon runs with `--lowrank-form per-file`: its stacks view the files' read buffers, so a file that
changes after it was read must not reach a built stack either.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.lora_factories import make_lora, write_safetensors
from helpers.serve_process import ServeProcess

from client.wire.errors import EaselError

pytestmark = pytest.mark.model

W = 3072
LAYOUT = {"transformer_blocks.0.attn.to_out.0": (W, W), "transformer_blocks.0.attn.to_q": (W, W)}
SIZE = dict(width=64, height=64, steps=1, seed=5)
LORA_CODES = {"lora_format", "lora_not_found", "lora_unsupported", "lora_zero_match", "lora_error"}
CACHE_BYTES, RESIDENT_BYTES = 0, 64 * 1024**2  # files re-read every time; a few small stacks resident


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "loras").mkdir()
    flags = ("--lora-cache-bytes", str(CACHE_BYTES), "--resident-stack-bytes", str(RESIDENT_BYTES), "--no-warmup")
    flags += ("--lowrank-form", "per-file")
    d = ServeProcess(root, *flags, lora_root=root / "loras").start()
    yield d
    d.kill()


def _big_lora(path: Path, mb: int = 160) -> None:
    """A real kohya file of about `mb` MB: one huge-rank pair on attn.to_out (float32)."""
    rank = mb * 1024**2 // (2 * W * 4)
    rng = np.random.default_rng(0)
    base = "lora_unet_double_blocks_0_img_attn_proj"
    tensors = {
        f"{base}.lora_down.weight": rng.standard_normal((rank, W), dtype=np.float32) * 1e-3,
        f"{base}.lora_up.weight": rng.standard_normal((W, rank), dtype=np.float32) * 1e-3,
    }
    write_safetensors(path, tensors, {})


def _truncate_during(call, path: Path, delay_s: float):
    """Run `call()` in a thread, truncate `path` to 1 MiB after `delay_s`; the answer or the error."""
    box: dict[str, object] = {}

    def run():
        try:
            box["result"] = call()
        except EaselError as err:
            box["error"] = err

    t = threading.Thread(target=run)
    t.start()
    time.sleep(delay_s)
    os.truncate(path, 1024**2)
    t.join(300)
    assert not t.is_alive(), "no answer"
    return box


@pytest.mark.parametrize("op", ["inspect", "render"])
def test_a_file_truncated_while_read_is_an_error_for_that_request_only(daemon, op):
    path = daemon.loras / f"big_{op}.safetensors"
    answers = []
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2):
        _big_lora(path)
        with daemon.client() as c:
            if op == "inspect":
                box = _truncate_during(lambda c=c: c.inspect(path), path, delay)
            else:
                box = _truncate_during(
                    lambda c=c: c.send_render("a rider", lora_paths=[path], lora_scales=[1.0], **SIZE), path, delay
                )
        assert daemon.proc.poll() is None, f"the daemon died (exit {daemon.proc.returncode}) after {answers}"
        if "error" in box:
            assert box["error"].code in LORA_CODES, box["error"]
            answers.append(box["error"].code)
        else:
            answers.append("ok")
        assert daemon.alive()
    with daemon.client() as c:  # and it still renders
        assert c.send_render("after the faults", **SIZE).width == 64


def test_a_file_rewritten_with_the_same_size_and_mtime_is_reread(daemon, tmp_path):
    path = daemon.loras / "same_stamp.safetensors"
    other = tmp_path / "other.safetensors"
    make_lora("kohya", path, LAYOUT, rank=4, alpha=4, seed=1, modules=["attn.to_out.0"], magnitude=0.3)
    make_lora("kohya", other, LAYOUT, rank=4, alpha=4, seed=2, modules=["attn.to_out.0"], magnitude=0.3)
    assert path.stat().st_size == other.stat().st_size
    with daemon.client() as c:
        first = c.send_render("a rider", lora_paths=[path], lora_scales=[1.0], return_bytes=True, **SIZE)
        st = path.stat()
        shutil.copyfile(other, path)  # new bytes in place (same inode, same size) ...
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime back, as `cp -p` does
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        second = c.send_render("a rider", lora_paths=[path], lora_scales=[1.0], return_bytes=True, **SIZE)
        shutil.copyfile(other, daemon.loras / "fresh.safetensors")
        fresh = c.send_render(
            "a rider", lora_paths=[daemon.loras / "fresh.safetensors"], lora_scales=[1.0], return_bytes=True, **SIZE
        )
    assert second.stack_switched
    assert second.image_bytes != first.image_bytes
    assert second.image_bytes.split(b"IDAT")[1] == fresh.image_bytes.split(b"IDAT")[1]


def _nested_header_file(path: Path, depth: int = 100_000) -> None:
    header = ("[" * depth + "]" * depth).encode()
    header = b'{"x":' + header + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_deeply_nested_header_is_lora_format(daemon):
    path = daemon.loras / "nested.safetensors"
    _nested_header_file(path)
    with daemon.client() as c:
        with pytest.raises(EaselError) as inspect_err:
            c.inspect(path)
        with pytest.raises(EaselError) as render_err:
            c.send_render("a rider", lora_paths=[path], lora_scales=[1.0], **SIZE)
    assert inspect_err.value.code == render_err.value.code == "lora_format"
    assert daemon.alive()


def test_status_shows_both_lora_bounds(daemon):
    with daemon.client() as c:
        st = c.status()
    assert st.lora_cache is not None and st.lora_cache.max_bytes == CACHE_BYTES
    assert st.resident_stacks is not None and st.resident_stacks.max_bytes == RESIDENT_BYTES
    assert st.lowrank_form == "per_file"  # as it was served (--lowrank-form per-file)
    assert json.loads(json.dumps(st.resident_stacks.bytes)) <= RESIDENT_BYTES


def test_a_relative_path_found_in_no_root_names_every_root_and_the_file_meant(tmp_path):
    """Relative LoRA paths are tried against each root in turn; the error named only the first root's
    candidate, and a name without its `.safetensors` suffix gave no hint of the file beside it."""
    from client.wire.errors import LoraNotFound
    from daemon.service import lora_file

    roots = [tmp_path / "packs", tmp_path / "loras"]
    for root in roots:
        root.mkdir()
    (roots[1] / "western.safetensors").write_bytes(b"x")
    with pytest.raises(LoraNotFound) as err:
        lora_file("western", roots, field="lora_paths[0]", index=0)
    assert err.value.message == (
        f"lora_paths[0]: no LoRA file 'western' in the LoRA roots ({roots[0]}, {roots[1]}) "
        "(did you mean 'western.safetensors'?)"
    )
    with pytest.raises(LoraNotFound) as err:
        lora_file("eastern.safetensors", roots, field="lora_paths[0]", index=0)
    assert err.value.message.endswith(f"no LoRA file 'eastern.safetensors' in the LoRA roots ({roots[0]}, {roots[1]})")
    with pytest.raises(LoraNotFound) as err:  # one root, or an absolute path: the one place looked at
        lora_file(str(roots[1] / "western"), roots, field="lora_paths[0]", index=0)
    assert err.value.message.endswith(
        f"no LoRA file at {roots[1] / 'western'} (did you mean '{roots[1] / 'western'}.safetensors'?)"
    )
    assert lora_file("western.safetensors", roots, field="lora_paths[0]") == roots[1] / "western.safetensors"
