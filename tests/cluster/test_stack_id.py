"""The stack id a render is routed by: the files' bytes and the scales, never where or when they were written."""

from __future__ import annotations

import os
import shutil

import pytest

from client.wire.errors import LoraNotShared
from daemon.cluster.stack_id import NO_STACK, StackIds


def _file(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_the_id_follows_content_and_scales_not_paths_or_times(tmp_path):
    ids = StackIds()
    a = _file(tmp_path / "a.safetensors", b"A" * 1000)
    b = _file(tmp_path / "b.safetensors", b"B" * 1000)
    (tmp_path / "elsewhere").mkdir()
    a_copy = str(tmp_path / "elsewhere" / "a.safetensors")
    shutil.copy(a, a_copy)  # another machine's copy: other inode, other times, same bytes
    assert ids.stack_id([a, b], [1.0, 0.5]) == ids.stack_id([a_copy, b], [1.0, 0.5])
    assert ids.stack_id([a, b], [1.0, 0.5]) != ids.stack_id([b, a], [0.5, 1.0])  # order is part of a stack
    assert ids.stack_id([a, b], [1.0, 0.5]) != ids.stack_id([a, b], [1.0, 0.75])
    assert ids.stack_id([], []) == NO_STACK
    before = ids.stack_id([a], [1.0])
    _file(tmp_path / "a.safetensors", b"C" * 1000)  # rewritten in place: a new version, a new id
    os.utime(a, ns=(1, 1))
    assert ids.stack_id([a], [1.0]) != before


def test_a_replica_refuses_a_stack_whose_files_differ_from_the_gateways(tmp_path):
    ids = StackIds()
    gateway = _file(tmp_path / "g.safetensors", b"gateway bytes")
    replica = _file(tmp_path / "r.safetensors", b"replica bytes")
    expected = ids.stack_id([gateway], [1.0])
    ids.check_same([gateway], [1.0], expected, where="replica r1")  # the same bytes: fine
    with pytest.raises(LoraNotShared) as info:
        ids.check_same([replica], [1.0], expected, where="replica r1")
    assert "replica r1" in info.value.message and replica in info.value.message
    with pytest.raises(LoraNotShared) as missing:
        ids.check_same([str(tmp_path / "gone.safetensors")], [1.0], expected, where="replica r2")
    assert "not readable on replica r2" in missing.value.message and missing.value.code == "lora_not_shared"


def test_a_remote_client_computes_the_same_id_without_ray_or_the_daemon(tmp_path):
    from client.http_render import stack_id

    a = _file(tmp_path / "a.safetensors", b"A" * 1000)
    b = _file(tmp_path / "b.safetensors", b"B" * 1000)
    assert stack_id([a, b], [1.0, 0.5]) == StackIds().stack_id([a, b], [1.0, 0.5])
    assert stack_id([], []) == NO_STACK


def test_the_ray_token_is_found_as_ray_finds_it(tmp_path):
    from client.http_render import ray_token

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("  from-home\nsecond line\n")
    (tmp_path / "elsewhere").write_text("from-path\n")
    assert ray_token({"RAY_AUTH_TOKEN": " from-env \n", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "elsewhere")}) == (
        "from-env"
    )
    assert ray_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "elsewhere")}, home=tmp_path) == "from-path"
    assert ray_token({}, home=tmp_path) == "from-home"  # ~/.ray/auth_token, its first line
    assert ray_token({}, home=tmp_path / "nobody") is None
