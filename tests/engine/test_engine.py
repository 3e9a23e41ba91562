"""Engine: validation, presets and weights lookup, the tiny model cache, determinism, PNG metadata."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from client.wire.errors import InvalidRequest, WeightsNotFound
from daemon.engine.png import read_metadata, write_png
from daemon.engine.presets import PRESETS, get_preset, locate_weights
from daemon.render_spec import Limits, RenderSpec, validate_spec

GOOD = RenderSpec(prompt="a red fox in snow", width=64, height=64, steps=2, guidance=3.5, seed=7, preset="tiny")


# ---------------------------------------------------------------- validation (no model)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "   \n"}, "prompt", "empty"),
        ({"prompt": 5}, "prompt", "string"),
        ({"prompt": "x" * 5000}, "prompt", "limit"),
        ({"width": 65}, "width", "multiple of 16"),
        ({"height": 100}, "height", "multiple of 16"),
        ({"width": 32}, "width", "within"),
        ({"height": 4096}, "height", "within"),
        ({"width": 64.0}, "width", "integer"),
        ({"width": True}, "width", "integer"),
        ({"steps": 0}, "steps", "within"),
        ({"steps": 101}, "steps", "within"),
        ({"steps": 2.5}, "steps", "integer"),
        ({"guidance": -1.0}, "guidance", "within"),
        ({"guidance": 31.0}, "guidance", "within"),
        ({"guidance": math.nan}, "guidance", "finite"),
        ({"guidance": math.inf}, "guidance", "finite"),
        ({"guidance": "3.5"}, "guidance", "number"),
        ({"seed": -1}, "seed", "within"),
        ({"seed": 2**40}, "seed", "within"),
        ({"preset": ""}, "preset", "non-empty"),
    ],
)
def test_every_validation_error_names_its_field(change, field, words):
    with pytest.raises(InvalidRequest) as info:
        validate_spec(replace(GOOD, **change))
    assert info.value.field == field
    assert words in info.value.message
    assert info.value.to_wire()["code"] == "invalid_request"


def test_pixel_limit_and_unknown_preset():
    with pytest.raises(InvalidRequest, match="pixel limit"):
        validate_spec(replace(GOOD, width=2048, height=2048), Limits(max_pixels=1024 * 1024))
    with pytest.raises(InvalidRequest, match="unknown preset 'nope'"):
        validate_spec(replace(GOOD, preset="nope"), presets=tuple(PRESETS))
    assert validate_spec(GOOD) is GOOD


# ---------------------------------------------------------------- presets and weights (no model)


def test_real_presets_are_registered():
    assert {"dev", "schnell", "krea-dev", "tiny"} <= set(PRESETS)
    assert get_preset("schnell").default_steps == 4
    with pytest.raises(WeightsNotFound, match="unknown preset"):
        get_preset("flux-9000")


def test_missing_weights_error_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("EASEL_MODEL_PATH", raising=False)
    monkeypatch.delenv("EASEL_MODEL_PATH_DEV", raising=False)
    with pytest.raises(WeightsNotFound) as info:
        locate_weights(get_preset("dev"))
    msg = info.value.message
    assert str(tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev") in msg
    assert "--model-path" in msg and "EASEL_MODEL_PATH_DEV" in msg and "--preset tiny" in msg


def test_incomplete_model_path_names_missing_parts(tmp_path):
    """A path the user named is used as given; the loader says exactly which parts it lacks."""
    from client.wire.errors import ModelPartMissing
    from daemon.engine.checkpoint.source import resolve_source

    (tmp_path / "transformer").mkdir()
    assert locate_weights(get_preset("schnell"), tmp_path) == tmp_path
    with pytest.raises(ModelPartMissing) as info:
        resolve_source(tmp_path)
    assert "missing vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/" in info.value.message


def test_incomplete_snapshot_in_the_hf_cache_is_skipped_and_named(tmp_path, monkeypatch):
    snap = tmp_path / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / "abc123"
    (snap / "transformer").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("EASEL_MODEL_PATH", raising=False)
    monkeypatch.delenv("EASEL_MODEL_PATH_SCHNELL", raising=False)
    with pytest.raises(WeightsNotFound) as info:
        locate_weights(get_preset("schnell"))
    assert "missing vae, text_encoder" in info.value.message


def test_load_model_real_preset_fails_fast_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    from daemon.engine.model import load_model

    with pytest.raises(WeightsNotFound, match="no weights for preset 'krea-dev'"):
        load_model("krea-dev")


def test_complete_layout_is_found_in_hf_cache(tmp_path, monkeypatch):
    snap = tmp_path / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / "abc123"
    for d in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (snap / d).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert locate_weights(get_preset("schnell")) == snap


# ---------------------------------------------------------------- PNG (no model)


def test_png_metadata_round_trip_and_atomic_write(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (32, 16), (10, 20, 30))
    meta = GOOD.to_metadata() | {"lora_paths": ["a.safetensors"], "lora_scales": [0.5]}
    out = tmp_path / "sub" / "x.png"
    write_png(img, out, meta)
    assert read_metadata(out) == json.loads(json.dumps(meta))
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temp file left behind
    with Image.open(out) as back:
        assert back.size == (32, 16)


# ---------------------------------------------------------------- the tiny model


@pytest.mark.model
def test_tiny_architecture(tiny_model):
    flux = tiny_model.flux
    assert len(flux.transformer.transformer_blocks) == 1
    assert len(flux.transformer.single_transformer_blocks) == 1
    assert len(flux.t5_text_encoder.t5_blocks) == 1
    assert len(flux.clip_text_encoder.text_model.encoder.layers) == 1
    assert flux.transformer.transformer_blocks[0].attn.to_q.weight.shape == (3072, 3072)
    assert str(tiny_model.dtype) == "mlx.core.float32"
    from mlx.utils import tree_flatten

    parts = (flux.transformer, flux.t5_text_encoder, flux.clip_text_encoder, flux.vae)
    n = sum(v.size for part in parts for _, v in tree_flatten(part.parameters()))
    assert 0.9e9 < n < 1.1e9, n
    assert tiny_model.info.layout == "hf" and tiny_model.info.depth["transformer"] == [1, 1]
    # real tokenizers (CLIP BPE, T5 sentencepiece) from the checkpoint's files, not stand-ins
    assert type(flux.tokenizers["clip"].tokenizer).__name__.startswith("CLIPTokenizer")
    assert flux.tokenizers["t5"].max_length == 128


def _render(model, spec):
    steps = []
    out = model.render(spec, on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(i, spec.steps) for i in range(0, spec.steps + 1)]  # boundary 0: before the first step
    assert set(out.timings) == {"text_encode", "denoise", "decode"}
    return np.asarray(out.image)


@pytest.mark.model
def test_prompt_and_seed_change_the_image(tiny_model):
    a = _render(tiny_model, GOOD)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, _render(tiny_model, GOOD))
    other_prompt = _render(tiny_model, replace(GOOD, prompt="a lighthouse at dusk"))
    other_seed = _render(tiny_model, replace(GOOD, seed=8))
    trigger = _render(tiny_model, replace(GOOD, prompt="spaghetti_western, " + GOOD.prompt))
    for other in (other_prompt, other_seed, trigger):
        assert np.abs(a.astype(int) - other.astype(int)).mean() > 2.0


@pytest.mark.model
def test_same_request_in_another_process_gives_same_pixels(tiny_model, tmp_path):
    here = tmp_path / "here.png"
    out = tiny_model.render(GOOD)
    write_png(out.image, here, GOOD.to_metadata())
    there = tmp_path / "there.png"
    code = (
        "from daemon.engine.model import load_model; from daemon.render_spec import RenderSpec;"
        "from daemon.engine.png import write_png;"
        f"s = RenderSpec(**{GOOD.to_metadata()!r}); m = load_model('tiny');"
        f"write_png(m.render(s).image, {str(there)!r}, s.to_metadata())"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(here)), np.asarray(Image.open(there)))
    assert read_metadata(there) == read_metadata(here) == json.loads(json.dumps(GOOD.to_metadata()))


@pytest.mark.model
def test_cancel_from_step_callback_stops_render(tiny_model):
    from client.wire.errors import Cancelled

    seen = []

    def stop_after_first(i, n):
        seen.append(i)
        if i == 1:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        tiny_model.render(replace(GOOD, steps=4), on_step=stop_after_first)
    assert seen == [0, 1]
    # the model still renders normally afterwards
    assert _render(tiny_model, GOOD).shape == (64, 64, 3)


@pytest.mark.model
def test_a_render_run_inside_another_at_any_boundary_leaves_its_pixels_unchanged(tiny_model):
    """The runner's preemption renders a whole other job inside a step callback, boundary 0 (prompt
    encoded, no step yet) included; the outer render's bytes must not change."""
    spec = replace(GOOD, steps=3)
    alone = _render(tiny_model, spec)
    other = replace(GOOD, prompt="a lighthouse at dusk", seed=11, steps=1)
    for boundary in (0, 2):
        nested = []

        def at_boundary(i, n, boundary=boundary, nested=nested):
            if i == boundary:
                nested.append(np.asarray(tiny_model.render(other).image))

        out = np.asarray(tiny_model.render(spec, on_step=at_boundary).image)
        assert len(nested) == 1 and np.abs(nested[0].astype(int) - alone.astype(int)).mean() > 2.0
        assert np.array_equal(out, alone), f"a render nested at boundary {boundary} changed the outer one"


@pytest.mark.model
def test_wrong_preset_for_loaded_model_is_rejected(tiny_model):
    with pytest.raises(InvalidRequest, match="preset 'tiny' loaded"):
        tiny_model.render(replace(GOOD, preset="dev"))


RENDER_IN_THREADS = """
import threading
from daemon.engine.model import load_model
from daemon.render_spec import RenderSpec
m = load_model("tiny")
spec = RenderSpec(prompt="x", width=64, height=64, steps=1, preset="tiny")
def job():
    m.render(spec)
    m.release_thread()
for _ in range(3):  # three short-lived render threads, as a daemon's executor or a caller's pool makes
    t = threading.Thread(target=job)
    t.start()
    t.join()
m.release_thread()
print("rendered", flush=True)
"""


@pytest.mark.model
def test_process_that_rendered_in_threads_exits_cleanly(tiny_model):
    """Without release_thread, MLX 0.32 tears per-thread streams down after the interpreter and the
    process aborts at exit ("terminate called without an active exception"; 3 runs in 4 here)."""
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", RENDER_IN_THREADS], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and "rendered" in out.stdout, out.stderr[-2000:]
        assert "terminate called" not in out.stderr


def test_an_unoptimised_cpu_blas_is_a_warning_unless_asked_for():
    from daemon.engine.blas import BlasInfo

    assert BlasInfo("openblas", "/usr/lib/libopenblas.so.0", "OpenBLAS 0.3").cpu_warning() is None
    assert BlasInfo("bundled", None, "EASEL_BLAS=bundled: MLX's generic BLAS (slow on CPU)").cpu_warning() is None
    said = BlasInfo("bundled", None, "no OpenBLAS found (install Debian's libopenblas0-pthread)").cpu_warning()
    assert said == (
        "no OpenBLAS found (install Debian's libopenblas0-pthread): CPU renders use MLX's generic BLAS, "
        "about 20 times slower"
    )


@pytest.mark.parametrize(("blas", "warned"), [("/nonexistent/libblas.so", True), ("bundled", False)])
def test_loading_the_model_on_the_cpu_warns_when_the_blas_fell_back_unasked(blas, warned):
    """A CPU daemon whose EASEL_BLAS library would not load (or that found no OpenBLAS) runs about 20 times
    slower; that was a line at INFO in the load log. Loading the model now warns (`easel serve` prints it as
    `easel: warning: ...`); asking for MLX's own BLAS (`bundled`) does not."""
    import os

    code = (
        "import json, warnings\n"
        "from daemon.engine.model import load_model\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    load_model('tiny')\n"
        "print(json.dumps([str(w.message) for w in caught if 'BLAS' in str(w.message)]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "EASEL_BLAS": blas},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    messages = json.loads(r.stdout.strip().splitlines()[-1])
    if warned:
        assert len(messages) == 1 and messages[0].startswith(f"could not load {blas}: "), messages
        assert messages[0].endswith(": CPU renders use MLX's generic BLAS, about 20 times slower")
    else:
        assert messages == []
