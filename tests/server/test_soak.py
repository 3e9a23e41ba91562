"""The live-game soak (scripts/soak_daemon.py) in the normal test run: a minute of a game server, two batch
scripts, an operator cancelling, a client hanging up, a LoRA author rewriting a file, bad requests and a
monitor, all at once against the real server, runner and service over the session's tiny model, on a real
socket; then every invariant the script checks. `make soak` runs the same for ten minutes against
`easel serve`."""

from __future__ import annotations

import pytest
from helpers.daemon_standin import InProcessDaemon, make_config
from helpers.scripts import load_script

pytestmark = pytest.mark.model

SOAK_S = 60.0


def test_a_minute_of_a_live_game_keeps_every_invariant(tiny_model, tmp_path):
    from daemon.lora.cache import LoraCache
    from daemon.lora.patcher import LoraPatcher
    from daemon.lora.resident import ResidentStacks
    from daemon.service import RenderService

    soak = load_script("soak_daemon")
    outside = tmp_path / "outside"
    outside.mkdir()
    config = make_config(tmp_path, queue_capacity=32)
    cache = LoraCache(config.service.lora_cache_bytes)
    patcher = LoraPatcher.for_model(tiny_model, cache, resident=ResidentStacks(config.service.resident_stack_bytes))
    service = RenderService(tiny_model, config.service, patcher=patcher, cache=cache, preset_name="tiny")
    d = InProcessDaemon(config, service=service).start()
    try:
        stats = soak.run_soak(
            config.socket_path, tmp_path / "loras", config.service.output_root, outside, seconds=SOAK_S, seed=14
        )
    finally:
        d.stop(0)
        patcher.clear()  # the session's model goes back as it was
    assert stats.failures == [], "\n".join(stats.failures)
    # everything the soak means to exercise happened at least once
    assert stats.renders["interactive"] >= 5 and stats.renders["batch"] >= 2, stats.renders
    assert stats.cancels_sent >= 1 and stats.answers["cancelled"] >= 1, stats.answers
    assert stats.hangups >= 1 and stats.rewrites >= 1
    assert {"lora_not_found", "lora_format", "path_not_allowed", "output_exists", "invalid_request"} & set(
        stats.answers
    ), stats.answers
    assert "internal" not in stats.answers
