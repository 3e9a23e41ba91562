"""The decoder fuzz (issue 18) in the normal test run: 10,000 inputs with a fixed seed against the real
server, runner and service over the session's tiny model, on a real socket. `make fuzz` runs the same
generator for 1,000,000 inputs against `easel serve` (scripts/fuzz_daemon.py)."""

from __future__ import annotations

import pytest
from helpers.daemon_standin import InProcessDaemon, make_config
from helpers.scripts import load_script

from daemon.render_spec import Limits

pytestmark = pytest.mark.model

INPUTS = 10_000
TIME_CAP_S = 600.0  # a hang fails the test instead of stalling the run


def test_decoder_fuzz_10000_inputs_fixed_seed(tiny_model, tmp_path):
    from daemon.service import RenderService

    fuzz = load_script("fuzz_daemon")
    outside = tmp_path / "outside"
    outside.mkdir()
    config = make_config(
        tmp_path, limits=Limits(max_size=64, max_pixels=64 * 64, max_steps=1), lora_cache_bytes=0, queue_capacity=64
    )
    service = RenderService(tiny_model, config.service, preset_name="tiny", default_steps=1)
    d = InProcessDaemon(config, service=service).start()
    try:
        path = config.socket_path
        before = fuzz.reference_render(path)
        stats = fuzz.run_fuzz(path, inputs=INPUTS, seed=18, clients=2, outside=str(outside), time_budget_s=TIME_CAP_S)
        after = fuzz.reference_render(path)
        from client.client import RenderClient

        with RenderClient(path) as c:
            assert c.ping().pong  # the daemon is alive
    finally:
        d.stop(0)
    assert stats.inputs == INPUTS, f"only {stats.inputs} inputs within {TIME_CAP_S}s"
    assert stats.unanswered == [] and stats.dropped == []  # every framed body answered, on a kept connection
    assert sum(stats.answers.values()) == INPUTS
    assert "internal" not in stats.answers, stats.answers
    assert fuzz.files_under(outside) == []  # nothing written outside the output root
    assert all(p.suffix == ".png" for p in fuzz.files_under(config.service.output_root))
    assert before == after  # the model is unchanged: a fixed-seed render is byte-identical
    assert {"protocol_error", "invalid_request", "unknown_op"} <= set(stats.answers)
