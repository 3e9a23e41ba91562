"""Server settings and service settings are separate types; `easel serve`'s defaults come from them;
`easel status` prints the typed status of a running (stand-in) daemon."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.daemon_standin import serving

from client.cli import main as easel
from client.client import RenderClient
from client.wire.messages import ActiveLora, StatusResult, StepTime
from daemon.cli import serve_command
from daemon.config import DaemonConfig, ServerConfig, ServiceConfig, default_of

SERVER_FIELDS = {"socket_path", "max_connections", "max_frame", "frame_timeout_s", "drain_timeout_s", "allow_any_uid"}


def test_server_and_service_settings_are_separate_types(tmp_path):
    assert {f.name for f in dataclasses.fields(ServerConfig)} == SERVER_FIELDS
    service_fields = {f.name for f in dataclasses.fields(ServiceConfig)}
    assert not SERVER_FIELDS & service_fields
    assert {"preset", "lora_roots", "output_root", "limits", "queue_capacity", "interactive_reserve"} <= service_fields
    cfg = DaemonConfig.from_settings(
        socket_path=tmp_path / "s.sock", max_connections=3, lora_roots=(tmp_path,), queue_capacity=8
    )
    assert (cfg.server.max_connections, cfg.service.queue_capacity, cfg.service.interactive_reserve) == (3, 8, 2)
    assert cfg.socket_path == cfg.server.socket_path == (tmp_path / "s.sock").absolute()
    assert cfg.lora_roots == (tmp_path.resolve(),) and cfg.output_root == cfg.service.output_root
    with pytest.raises(TypeError, match="unknown daemon settings: queue_size"):
        DaemonConfig.from_settings(queue_size=3)


@pytest.mark.parametrize(
    "kind, settings, message",
    [
        (ServerConfig, {"max_connections": 0}, "max_connections"),
        (ServerConfig, {"frame_timeout_s": 0}, "frame_timeout_s"),
        (ServerConfig, {"max_frame": 100}, "max_frame"),
        (ServiceConfig, {"queue_capacity": 0}, "queue_capacity"),
        (ServiceConfig, {"queue_capacity": 4, "interactive_reserve": 4}, "interactive_reserve"),
        (ServiceConfig, {"max_preemptions": -1}, "max_preemptions"),
        (ServiceConfig, {"queue_update_s": -1.0}, "queue_update_s"),
        (ServiceConfig, {"lowrank_form": "fused"}, "lowrank_form"),
    ],
)
def test_each_config_checks_its_own_settings(kind, settings, message):
    with pytest.raises(ValueError, match=message):
        kind(**settings)


def test_serve_option_defaults_are_read_from_the_config_classes():
    parsed = serve_command.make_context("serve", []).params  # the defaults as click hands them over
    expected = {
        "preset": default_of(ServiceConfig, "preset"),
        "queue_capacity": default_of(ServiceConfig, "queue_capacity"),
        "interactive_reserve": default_of(ServiceConfig, "interactive_reserve"),
        "max_connections": default_of(ServerConfig, "max_connections"),
        "drain_timeout": default_of(ServerConfig, "drain_timeout_s"),
        "max_frame": default_of(ServerConfig, "max_frame"),
    }
    assert {k: parsed[k] for k in expected} == expected  # max_frame is written 16MiB, read back as bytes
    assert (expected["queue_capacity"], expected["max_connections"], expected["drain_timeout"]) == (64, 128, 30.0)
    r = CliRunner().invoke(easel, ["serve", "--help"])
    assert r.exit_code == 0 and "[default: 64;" in r.output and "[default: 30.0]" in r.output
    with pytest.raises(ValueError, match="no plain default"):
        default_of(ServerConfig, "socket_path")  # computed from the environment: the option says so instead


def test_serve_preemption_and_fair_share_options():
    options = {p.name: p for p in serve_command.params}
    assert options["max_preemptions"].default == default_of(ServiceConfig, "max_preemptions") == 4
    assert options["fair_slack"].default == ServiceConfig().policy.fair_slack == 1.0
    assert ServiceConfig().preempt and options["no_preempt"].is_flag
    r = CliRunner().invoke(easel, ["serve", "--help"])
    assert "--no-preempt" in r.output and "--max-preemptions" in r.output and "--fair-slack" in r.output
    r = CliRunner().invoke(easel, ["serve", "--max-preemptions", "-1"])
    assert r.exit_code == 2


def test_serve_lowrank_form_option():
    options = {p.name: p for p in serve_command.params}
    assert options["lowrank_form"].default == "stacked" == ServiceConfig().lowrank_form
    r = CliRunner().invoke(easel, ["serve", "--help"])
    assert "--lowrank-form [stacked|per-file]" in r.output
    r = CliRunner().invoke(easel, ["serve", "--lowrank-form", "per_file"])
    assert r.exit_code == 2 and "per-file" in r.output


def test_serve_refuses_options_that_do_not_fit_together(tmp_path):
    r = CliRunner().invoke(
        easel, ["serve", "--socket", str(tmp_path / "s.sock"), "--queue-capacity", "4", "--interactive-reserve", "4"]
    )
    assert r.exit_code == 2 and "interactive_reserve" in r.output


def test_easel_status_prints_the_typed_status(tmp_path):
    with serving(tmp_path) as d:
        lora = d.config.lora_roots[0] / "western.safetensors"
        lora.write_bytes(b"stand-in")
        with RenderClient(d.config.socket_path) as c:
            c.send_render("x", width=64, height=64, steps=2, lora_paths=[str(lora)], lora_scales=[0.7])
            st = c.status()
        assert isinstance(st, StatusResult) and st.active_stack == [ActiveLora(path=str(lora), scale=0.7)]
        assert [type(s) for s in st.step_times] == [StepTime] and st.lora_cache is None  # the stand-in keeps none
        socket = str(d.config.socket_path)
        r = CliRunner().invoke(easel, ["status", "--socket", socket])
        assert r.exit_code == 0, r.output
        assert "active stack: western.safetensors@0.7  (switches so far: 1)" in r.output
        assert "preset tiny  warm=True" in r.output and "queue 0/8 (2 kept for interactive)" in r.output
        assert "lora cache" not in r.output
        roots = ", ".join(str(p) for p in d.config.lora_roots)
        assert f"writes into {d.config.output_root}  reads LoRAs from {roots}" in r.output
        assert st.output_root == str(d.config.output_root) and st.lora_roots == [str(p) for p in d.config.lora_roots]
        r = CliRunner().invoke(easel, ["status", "--socket", socket, "--json"])
        data = json.loads(r.output)
        assert data["active_stack"] == [{"path": str(lora), "scale": 0.7}]
        assert data["step_times"][0]["width"] == 64 and set(data["step_times"][0]) == {
            "preset", "width", "height", "step_s", "overhead_s",
        }  # fmt: skip
        assert Path(data["socket"]) == d.config.socket_path
