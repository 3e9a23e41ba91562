"""Text-encoder LoRAs on the live tiny model (1 CLIP layer, 1 T5 block): every trainer's naming applies all
of its keys, every patched CLIP/T5 layer's weight equals a numpy reference computed from the file, the
prompt embedding and the image change, switching stacks never reuses an embedding across text-encoder
states, mixed stacks work, and a failing stack leaves the encoders exactly as they were.

References are computed from the files themselves, read by the safetensors library (not easel's reader),
in numpy: W + sum(scale * alpha / rank * up @ down), in float32 (its rounding, ~1e-7, is far below the
1e-5 bound; float64 over the 10240 x 4096 T5 layers is too slow on a shared 2-core machine).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers.lora_factories import (
    TE_NAMINGS,
    generate_lora,
    generate_te_lora,
    make_control_lora,
    make_truncated,
    te_source_name,
)

from client.wire.errors import LoraFormatError, LoraNotFound, LoraUnsupported
from daemon.lora import LoraCache, StackEntry

pytestmark = pytest.mark.model

PROMPT = "a dusty saloon at noon"
CLIP_LAYERS, T5_LAYERS = 6, 7  # Linear layers of one CLIP encoder layer and of one T5 block


@pytest.fixture
def patcher(tiny_model):
    """A patcher on the transformer and both text encoders, with the model's prompt embeddings keyed by it;
    everything goes back as it was afterwards (the tiny model is shared by the session)."""
    from daemon.engine.model import _no_text_encoder_state
    from daemon.lora import LoraPatcher

    flux = tiny_model.flux
    originals = {
        name: _module(flux, name)
        for name in (
            "clip_text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            "t5_text_encoder.t5_blocks.0.ff.DenseReluDense.wo",
        )
    }
    p = LoraPatcher.for_model(tiny_model, LoraCache(max_bytes=512 * 1024**2))
    tiny_model.prompt_embeddings.clear()
    yield p
    p.clear()
    tiny_model.key_prompts_by(_no_text_encoder_state)
    tiny_model.prompt_embeddings.clear()
    for name, module in originals.items():
        assert _module(flux, name) is module


def _module(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


@functools.lru_cache(maxsize=8)
def _file_tensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


def _reference_delta(path, naming: str, target: str) -> np.ndarray:
    """scale-1 delta of one mflux text-encoder layer, from the file: alpha / rank * up @ down."""
    clip_prefix, t5_prefix, sep, down_s, up_s, alpha_s = TE_NAMINGS[naming]
    encoder, module = te_source_name(target)
    base = (clip_prefix if encoder == "clip_l" else t5_prefix) + module.replace(".", sep)
    t = _file_tensors(path)
    down, up = t[f"{base}.{down_s}"], t[f"{base}.{up_s}"]
    factor = (
        float(t[f"{base}.{alpha_s}"].reshape(-1)[0]) / down.shape[0] if alpha_s and f"{base}.{alpha_s}" in t else 1.0
    )
    return np.float32(factor) * (up @ down)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _check_text_encoder_layers(flux, wanted: dict[str, np.ndarray]) -> None:
    """Each layer's delta, effective weight and forward output against the float64 reference delta."""
    import mlx.core as mx

    from daemon.lora.runtime import StackedLoraLinear

    rng = np.random.default_rng(3)
    for target, delta in wanted.items():
        layer = _module(flux, target)
        assert isinstance(layer, StackedLoraLinear), target
        base = np.array(layer.base.weight.astype(mx.float32))
        assert _rel(np.array(layer.delta()), delta) <= 1e-5, target
        assert _rel(np.array(layer.effective_weight()), base + delta) <= 1e-5, target
        x = rng.standard_normal((3, base.shape[1])).astype(np.float32)
        side = np.array(layer(mx.array(x))).astype(np.float64) - np.array(layer.base(mx.array(x)))
        assert _rel(side, x.astype(np.float64) @ delta.T.astype(np.float64)) <= 1e-5, target


def _encode(tiny_model, prompt: str = PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """The T5 and CLIP embeddings of a prompt, run through the encoders now (no cache)."""
    import mlx.core as mx

    flux = tiny_model.flux
    t5 = flux.t5_text_encoder(flux.tokenizers["t5"].tokenize(prompt).input_ids)
    clip = flux.clip_text_encoder(flux.tokenizers["clip"].tokenize(prompt).input_ids)
    mx.eval(t5, clip)
    return np.array(t5), np.array(clip)


@pytest.mark.parametrize("naming", sorted(TE_NAMINGS))
def test_every_naming_applies_all_its_keys_exactly(tmp_path, tiny_model, patcher, naming):
    dtype = "F16" if naming in ("kohya", "comfyui") else "F32"
    gen = generate_te_lora(naming, tmp_path / f"{naming}.safetensors", patcher.text_encoder_layout, rank=4, dtype=dtype)
    assert len(gen.expected) == CLIP_LAYERS + T5_LAYERS
    report = patcher.apply_stack([StackEntry(str(gen.path), 0.8, naming)])
    (file,) = report.files
    assert file.leftover == [] and file.keys_applied == file.keys_total == len(gen.keys)
    per_module = 3 if gen.alpha is not None else 2
    assert file.keys_applied_by_part == {"clip_l": CLIP_LAYERS * per_module, "t5xxl": T5_LAYERS * per_module}
    assert file.layers_patched == report.layers_patched == CLIP_LAYERS + T5_LAYERS
    assert patcher.text_encoder_key == (patcher._active_key[0],)
    wanted = {t: 0.8 * _reference_delta(gen.path, naming, t) for t in gen.expected}
    _check_text_encoder_layers(tiny_model.flux, wanted)


def test_text_encoder_lora_changes_the_embedding_and_the_image_and_switching_back_restores_them(
    tmp_path, tiny_model, patcher
):
    from daemon.render_spec import RenderSpec

    spec = RenderSpec(prompt=PROMPT, width=64, height=64, steps=2, seed=7, preset="tiny")
    cache = tiny_model.prompt_embeddings
    te = generate_te_lora("kohya", tmp_path / "te.safetensors", patcher.text_encoder_layout, magnitude=0.3, seed=1)
    plain = generate_lora("kohya", tmp_path / "tr.safetensors", patcher.layout, rank=4, alpha=4.0, modules=["proj_out"])

    base_image = np.array(tiny_model.render(spec).image)
    base_embedding = cache[PROMPT]
    assert cache.total == 1

    patcher.apply_stack([StackEntry(str(te.path), 1.0)])
    assert patcher.text_encoder_key != ()
    assert PROMPT not in cache  # the embedding made without the LoRA is not this state's
    te_image = np.array(tiny_model.render(spec).image)
    te_embedding = cache[PROMPT]
    assert cache.total == 2
    for made_with, made_without in zip(te_embedding, base_embedding, strict=True):
        assert not np.allclose(np.array(made_with), np.array(made_without), atol=1e-4)
    assert not np.array_equal(te_image, base_image)
    fresh_t5, fresh_clip = _encode(tiny_model)  # the cached embedding is what the patched encoders make
    np.testing.assert_array_equal(np.array(te_embedding[0]), fresh_t5)
    np.testing.assert_array_equal(np.array(te_embedding[1]), fresh_clip)

    # a stack that leaves the text encoders alone shares the embeddings made without any stack
    patcher.apply_stack([StackEntry(str(plain.path), 1.0)])
    assert patcher.text_encoder_key == ()
    assert cache[PROMPT] is base_embedding

    patcher.clear()
    assert cache[PROMPT] is base_embedding
    np.testing.assert_array_equal(np.array(tiny_model.render(spec).image), base_image)
    assert cache.total == 2

    patcher.apply_stack([StackEntry(str(te.path), 1.0)])  # back to the resident TE stack
    assert cache[PROMPT] is te_embedding
    np.testing.assert_array_equal(np.array(tiny_model.render(spec).image), te_image)
    for cached, fresh in zip(te_embedding, _encode(tiny_model), strict=True):
        np.testing.assert_array_equal(np.array(cached), fresh)

    patcher.apply_stack([StackEntry(str(te.path), 0.5)])  # another scale is another text-encoder state
    assert PROMPT not in cache


def test_mixed_transformer_and_text_encoder_stack(tmp_path, tiny_model, patcher):
    from safetensors.numpy import load_file

    flux = tiny_model.flux
    transformer_part = generate_lora("kohya", tmp_path / "t.safetensors", patcher.layout, rank=4, alpha=2.0, seed=3)
    mixed = generate_te_lora(  # one kohya file: lora_unet_* beside lora_te1_* and lora_te3_*
        "kohya",
        tmp_path / "mixed.safetensors",
        patcher.text_encoder_layout,
        seed=4,
        extra=load_file(str(transformer_part.path)),
    )
    diffusers = generate_te_lora("diffusers", tmp_path / "d.safetensors", patcher.text_encoder_layout, seed=5)
    omi_clip = generate_te_lora(
        "omi", tmp_path / "o.safetensors", patcher.text_encoder_layout, seed=6, encoders=["clip_l"]
    )
    entries = [
        StackEntry(str(mixed.path), 0.6),
        StackEntry(str(diffusers.path), -0.4),
        StackEntry(str(omi_clip.path), 1.3),
    ]
    report = patcher.apply_stack(entries)
    assert [f.keys_applied for f in report.files] == [f.keys_total for f in report.files]
    assert report.files[0].format == "kohya"
    assert report.files[0].keys_applied_by_part["transformer"] == len(transformer_part.keys)
    assert report.files[2].keys_applied_by_part == {"clip_l": CLIP_LAYERS * 3}
    assert report.layers_patched == len(transformer_part.expected) + CLIP_LAYERS + T5_LAYERS
    assert patcher.text_encoder_key == patcher._active_key  # every file reaches a text encoder

    wanted = {}
    for target in mixed.expected:
        wanted[target] = 0.6 * _reference_delta(mixed.path, "kohya", target)
        wanted[target] += -0.4 * _reference_delta(diffusers.path, "diffusers", target)
        if target in omi_clip.expected:
            wanted[target] += 1.3 * _reference_delta(omi_clip.path, "omi", target)
    _check_text_encoder_layers(flux, wanted)
    for target in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):  # the transformer side
        layer = _module(flux.transformer, target)
        rows = np.arange(0, layer.base.weight.shape[0], 97)
        import mlx.core as mx

        got = np.array(layer.delta(mx.array(rows.astype(np.int32))))
        want = 0.6 * transformer_part.expected[target].dense_rows(rows)
        assert _rel(got.astype(np.float64), want) <= 1e-5, target


def test_failing_stack_with_a_text_encoder_file_leaves_the_encoders_as_they_were(tmp_path, tiny_model, patcher):
    flux = tiny_model.flux
    before_any = _encode(tiny_model)
    good = generate_te_lora(
        "comfyui", tmp_path / "good.safetensors", patcher.text_encoder_layout, magnitude=0.3, seed=1
    )
    other = generate_te_lora("onetrainer", tmp_path / "other.safetensors", patcher.text_encoder_layout, seed=2)
    active = [StackEntry(str(good.path), 0.9, "good")]
    patcher.apply_stack(active)
    key_before = patcher.text_encoder_key
    with_good = _encode(tiny_model)
    assert not np.allclose(with_good[0], before_any[0], atol=1e-4)
    modules = {name: _module(flux, name) for name in patcher.text_encoder_layout}
    bad_files = [
        (make_control_lora(tmp_path / "control.safetensors"), LoraUnsupported),  # refused by name
        (tmp_path / "missing.safetensors", LoraNotFound),
        (make_truncated(other.path, tmp_path / "cut.safetensors"), LoraFormatError),
    ]
    for bad, error in bad_files:
        with pytest.raises(error):
            patcher.apply_stack([StackEntry(str(other.path), 1.0), StackEntry(str(bad), 1.0)])
        assert patcher.active == active and patcher.text_encoder_key == key_before
        assert all(_module(flux, n) is m for n, m in modules.items())
        for now, then in zip(_encode(tiny_model), with_good, strict=True):
            np.testing.assert_array_equal(now, then)
    patcher.clear()
    assert patcher.text_encoder_key == ()
    for now, then in zip(_encode(tiny_model), before_any, strict=True):  # clear: bit-identical encoders
        np.testing.assert_array_equal(now, then)


def test_bake_form_patches_text_encoders_like_the_side_form(tmp_path, tiny_model):
    from daemon.lora import LoraPatcher
    from daemon.lora.inspect import text_encoders_of

    flux = tiny_model.flux
    before = _encode(tiny_model)
    encoders = text_encoders_of(flux)
    side = LoraPatcher(flux.transformer, LoraCache(), mode="side", text_encoders=encoders)
    gen = generate_te_lora("omi", tmp_path / "omi.safetensors", side.text_encoder_layout, magnitude=0.2, seed=9)
    side.apply_stack([StackEntry(str(gen.path), 0.7)])
    side_out = _encode(tiny_model)
    side.clear()
    bake = LoraPatcher(flux.transformer, LoraCache(), mode="bake", text_encoders=encoders)
    report = bake.apply_stack([StackEntry(str(gen.path), 0.7)])
    try:
        assert report.files[0].keys_applied == len(gen.keys) and bake.text_encoder_key != ()
        for baked, sided in zip(_encode(tiny_model), side_out, strict=True):
            np.testing.assert_allclose(baked, sided, rtol=1e-3, atol=1e-4)
    finally:
        bake.clear()
    for now, then in zip(_encode(tiny_model), before, strict=True):
        np.testing.assert_array_equal(now, then)


def test_a_patcher_without_text_encoders_reports_their_keys_as_not_applied(tmp_path, tiny_model):
    from daemon.lora import LoraPatcher

    gen = generate_te_lora(
        "kohya", tmp_path / "te.safetensors", {"clip_text_encoder.text_model.encoder.layers.0.mlp.fc1": (3072, 768)}
    )
    patcher = LoraPatcher(tiny_model.flux.transformer, LoraCache())
    report = patcher.apply_stack([StackEntry(str(gen.path), 1.0)], zero_match="warn")
    try:
        assert report.matched_keys == [0] and patcher.text_encoder_key == ()
        assert all(
            reason.startswith("text encoder clip_l: this model has no layer") for _, reason in report.files[0].leftover
        )
    finally:
        patcher.clear()
