"""The thin client's pure Flux layout table equals the layout read from mflux's own transformer."""

from __future__ import annotations

import pytest

from client.lorafile.layout import PRESET_SHAPES
from client.lorafile.layout import preset_layout as table_layout
from daemon.lora.inspect import preset_layout as mflux_layout


@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_table_layout_is_mflux_layout(preset):
    table = table_layout(preset)
    live = mflux_layout(preset)
    assert table == live
    assert len(live) == {"tiny": 30, "schnell": 502}.get(preset, 504)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="known presets: dev, krea-dev, schnell, tiny"):
        table_layout("sdxl")


@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_text_encoder_table_is_mflux_layout(preset):
    from client.lorafile.layout import preset_text_encoder_layout
    from daemon.lora.inspect import preset_text_encoder_layout as mflux_text_encoder_layout

    table = preset_text_encoder_layout(preset)
    assert table == mflux_text_encoder_layout(preset)
    assert len(table) == {"tiny": 6 + 7}.get(preset, 12 * 6 + 24 * 7)


def test_text_encoder_table_is_the_loaded_tiny_model(tiny_model):
    from client.lorafile.layout import preset_model_layout
    from daemon.lora.inspect import model_layout

    assert model_layout(tiny_model.flux) == preset_model_layout("tiny")
