"""The cluster commands with no Ray cluster to join: a `cluster_unavailable` line naming the address, never
Ray's ConnectionError traceback; `cluster down` says there was nothing to remove rather than "removed"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.packs.example_loras import make_pack_loras

pytestmark = pytest.mark.mlx  # the cluster commands come with the daemon's extra (the thin run deselects)

EASEL = [sys.executable, "-c", "from client.cli import main; main()"]


@pytest.fixture()
def no_cluster_env(tmp_path):
    pytest.importorskip("ray")
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():
        pytest.skip("a Ray cluster runs on this machine: `auto` would join it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TMPDIR"] = str(tmp_path)  # no address file of an earlier cluster to try for a minute
    return env


def run(env, *args):
    return subprocess.run([*EASEL, *args], capture_output=True, text=True, timeout=120, env=env)


def test_gateway_and_batch_without_a_cluster_name_the_address(no_cluster_env, tmp_path):
    expected = "easel: cluster_unavailable: no Ray cluster at 'auto' (Could not find any running Ray instance); "
    gateway = run(no_cluster_env, "gateway", "--cluster", "auto", "--socket", str(tmp_path / "run" / "g.sock"))
    assert gateway.returncode == 1 and expected in gateway.stderr, gateway.stderr
    assert "Traceback" not in gateway.stderr and not (tmp_path / "run" / "g.sock").exists()
    packs = tmp_path / "genre_packs"  # with its LoRA files: the plan is made before the cluster is joined
    shutil.copytree(Path(__file__).resolve().parents[2] / "genre_packs", packs, ignore=shutil.ignore_patterns("lora"))
    make_pack_loras(packs)
    batch = run(no_cluster_env, "batch", "poi", "--packs", str(packs), "--genre", "spaghetti_western", "--world",
                "dust_and_lead", "--cluster", "auto", "--out", str(tmp_path / "out"), "--no-progress")  # fmt: skip
    assert batch.returncode == 1 and expected in batch.stderr, batch.stderr


def test_cluster_down_without_a_cluster_says_there_was_nothing_to_remove(no_cluster_env):
    down = run(no_cluster_env, "cluster", "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "easel: no Ray cluster at 'auto': no application to remove"


def test_token_authentication_without_a_token_is_named_before_ray_starts(no_cluster_env, tmp_path):
    """With RAY_AUTH_MODE=token and no token on the machine, `cluster up` ended in `ray start`'s
    AuthenticationError traceback under a `replica_failed: ... failed: ()` line; the gateway and `cluster
    down` in Ray's traceback too."""
    env = {k: v for k, v in no_cluster_env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env |= {"RAY_AUTH_MODE": "token", "HOME": str(tmp_path / "home")}  # no ~/.ray/auth_token
    expected = "easel: cluster_unavailable: RAY_AUTH_MODE=token but this machine has no Ray token ("
    up = run(env, "cluster", "up", "--replicas", "1", "--output-root", str(tmp_path / "out"))
    gateway = run(env, "gateway", "--cluster", "auto", "--socket", str(tmp_path / "run" / "g.sock"))
    down = run(env, "cluster", "down")
    for done in (up, gateway, down):
        assert done.returncode == 1 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "`ray get-auth-token --generate` writes one" in done.stderr
    token = tmp_path / "token"
    token.write_text("0" * 64 + "\n")
    from daemon.cluster.app import missing_token

    assert missing_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}) is None
    assert missing_token({"RAY_AUTH_MODE": "disabled"}) is None and missing_token({}) is None


def test_a_failed_ray_command_is_named_by_its_own_last_line(no_cluster_env):
    """`ray start` failing (a head already running here, say) was `replica_failed` with Ray's whole stderr,
    traceback included; it is `cluster_unavailable` with the line that says why, colours removed."""
    from client.wire.errors import ClusterUnavailable
    from daemon.cluster.cli import _last_line, _ray_cli

    assert _last_line("Traceback (most recent call last):\n  File x\nConnectionError: already running\n\n") == (
        "ConnectionError: already running"
    )
    assert _last_line("\x1b[37mLocal node IP\x1b[39m: \x1b[1m10.0.0.1\x1b[22m\n") == "Local node IP: 10.0.0.1"
    assert _last_line("") == ""
    with pytest.raises(ClusterUnavailable) as info:
        _ray_cli("start", "--no-such-option")
    assert info.value.message.startswith("`ray start --no-such-option` failed (exit 2): ")
    assert "No such option" in info.value.message and "Traceback" not in info.value.message
