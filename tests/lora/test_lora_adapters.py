"""Every adapter kind on the live tiny transformer, checked against references computed in numpy from the
files themselves (tests/helpers/lora_corpus.py), never from easel's resolver:

- each corpus file alone: every patched layer's effective weight (and bias) equals the reference,
  relative error <= 1e-5 (DoRA against the materialised g * (W + delta));
- DoRA, LoHa and LoKr mixed with plain LoRAs in one stack, at several strengths: W + sum s_i * D_i;
- the wrapper's output equals x @ W'.T + b' (the gains and sliced Kronecker terms on the real call path);
- the bake form matches the side form; clearing restores bit-identical outputs;
- mflux's own loader agrees where it loads the file (peer oracle).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.lora_corpus import CONVENTIONS, build_corpus

from client.wire.errors import LoraUnsupported
from daemon.lora import LoraCache, StackEntry

pytestmark = pytest.mark.model

SAMPLE = 40  # output rows checked per layer (plus the first and the last)


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return tiny_model.flux.transformer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, transformer):
    from daemon.lora.norms import norm_layout
    from daemon.lora.runtime import linear_layout

    return build_corpus(tmp_path_factory.mktemp("corpus"), linear_layout(transformer) | norm_layout(transformer))


class _Bases:
    """Base weights (numpy, float32) read on demand from the untouched base layers (the side form never
    writes them), so the test holds no copy of the model."""

    def __init__(self, transformer) -> None:
        self.transformer = transformer

    def __getitem__(self, target: str) -> np.ndarray:
        import mlx.core as mx

        module = _module(self.transformer, target)
        return np.array(getattr(module, "base", module).weight.astype(mx.float32))


@pytest.fixture(scope="module")
def bases(transformer):
    return _Bases(transformer)


@pytest.fixture
def patcher(transformer):
    from daemon.lora import LoraPatcher
    from daemon.lora.resident import ResidentStacks

    p = LoraPatcher(transformer, LoraCache(max_bytes=64 << 20), resident=ResidentStacks(max_bytes=0))
    yield p
    p.clear()


def _module(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


def _rows(out_dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.unique(np.concatenate([[0, out_dim - 1], rng.choice(out_dim, SAMPLE, replace=False)]))


def _easel_rows(transformer, target: str, rows: np.ndarray, bases) -> tuple[np.ndarray, np.ndarray]:
    """(W' - W) for these rows, and b' - b, as the live wrapper computes them (float64)."""
    import mlx.core as mx

    wrapper = _module(transformer, target)
    parts = wrapper.parts
    w = bases[target][rows].astype(np.float64)
    eff = w.copy()
    if parts is not None and parts.in_gain is not None:
        eff = eff * np.array(parts.in_gain)[None, :]
    if parts is not None and parts.out_gain is not None:
        eff = eff * np.array(parts.out_gain)[rows, None]
    eff = eff + np.array(wrapper.delta(mx.array(rows.astype(np.int32)))).astype(np.float64)
    b0 = np.array(wrapper.base.bias).astype(np.float64) if "bias" in wrapper.base else 0.0
    eff_b = (np.array(parts.out_gain) * b0 if parts is not None and parts.out_gain is not None else b0) + np.array(
        wrapper.bias_delta()
    ).astype(np.float64)
    return eff - w, eff_b - b0


def _reference(entries, target: str, rows: np.ndarray, bases) -> tuple[np.ndarray, np.ndarray]:
    """sum s_i * (W'_i - W) over the stack's files that touch `target` (and their bias deltas)."""
    out_dim, in_dim = bases[target].shape
    dw, db = np.zeros((len(rows), in_dim)), np.zeros(out_dim)
    for entry, scale in entries:
        if target not in entry.targets:
            continue
        module = entry.module_of(target)
        dw += scale * module.delta_rows(target, rows, bases)
        bias = module.bias_delta(target)
        if bias is not None:
            db += scale * bias
    return dw, db


def _check_norm(transformer, entries, target: str, bases) -> None:
    """An RMSNorm's effective weight against w + sum s_i * delta_i from the files' own arrays."""
    got = np.array(_module(transformer, target).effective_weight()).astype(np.float64) - bases[target]
    want = sum(scale * e.module_of(target).norm for e, scale in entries if target in e.targets)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"{target}: relative error {err:.2e}"


def _check(transformer, entries, bases, seed=0):
    targets = sorted({t for e, _ in entries for t in e.targets})
    for n, target in enumerate(targets):
        if any(e.module_of(target).norm is not None for e, _ in entries if target in e.targets):
            _check_norm(transformer, entries, target, bases)
            continue
        rows = _rows(bases[target].shape[0], seed + n)
        got_w, got_b = _easel_rows(transformer, target, rows, bases)
        want_w, want_b = _reference(entries, target, rows, bases)
        scale = np.abs(want_w).max()
        assert scale > 0, target
        err = np.abs(got_w - want_w).max() / scale
        assert err <= 1e-5, f"{target}: relative error {err:.2e}"
        bias_scale = max(np.abs(want_b).max(), 1e-12)
        assert np.abs(got_b - want_b).max() <= 1e-5 * max(bias_scale, 1.0), f"{target} bias"
    return targets


APPLIED = sorted(name for name in CONVENTIONS)


@pytest.mark.parametrize("name", APPLIED)
def test_corpus_file_matches_its_numpy_reference(transformer, corpus, bases, patcher, name):
    entry = corpus[name]
    report = patcher.apply_stack([StackEntry(str(entry.path), 1.0)])
    assert report.files[0].keys_applied == report.files[0].keys_total
    _check(transformer, [(entry, 1.0)], bases)


MIXED = [
    # DoRA (input columns), LoHa, LoKr and plain LoRA on the same qkv / proj layers
    (("kohya_dora_columns", 0.7), ("kohya_loha", 1.0), ("kohya_lokr", -0.5), ("kohya", 0.8)),
    # DoRA (output rows, PEFT and LyCORIS), misaligned LoKr, full differences, set_weight, plain LoRA
    (("peft_dora", 0.6), ("kohya_dora_rows", 1.0), ("kohya_lokr_factor16", 0.9), ("diffusers", 1.2)),
    (("comfyui_set_weight", 0.5), ("lycoris_full", 1.0), ("kohya_lokr_factor_minus1", 1.0), ("kohya_split_qkv", 0.3)),
    # norm weight differences from two files on one norm (ComfyUI .scale.diff, LyCORIS w_norm) beside LoRA
    (("comfyui_extract", 0.7), ("lycoris_norm", -0.4), ("kohya", 1.0)),
]


@pytest.mark.parametrize("stack", MIXED, ids=lambda s: "+".join(n for n, _ in s))
def test_mixed_stacks_add_each_files_delta_against_the_base(transformer, corpus, bases, patcher, stack):
    entries = [(corpus[name], scale) for name, scale in stack]
    report = patcher.apply_stack([StackEntry(str(e.path), s) for e, s in entries])
    assert all(f.keys_applied == f.keys_total for f in report.files)
    _check(transformer, entries, bases, seed=7)


def test_wrapper_output_is_the_effective_weight_on_the_call_path(transformer, corpus, bases, patcher):
    """The forward pass (gains on input and output, sliced Kronecker parts, bias fix) equals x @ W'.T + b'."""
    import mlx.core as mx

    stack = MIXED[1]
    entries = [(corpus[name], scale) for name, scale in stack]
    patcher.apply_stack([StackEntry(str(e.path), s) for e, s in entries])
    rng = np.random.default_rng(3)
    for target in (
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.proj_out",
    ):
        wrapper = _module(transformer, target)
        x = rng.standard_normal((3, bases[target].shape[1])).astype(np.float32)
        y = np.array(wrapper(mx.array(x))).astype(np.float64)
        rows = np.arange(bases[target].shape[0])
        dw, db = _easel_rows(transformer, target, rows, bases)
        b0 = np.array(wrapper.base.bias).astype(np.float64) if "bias" in wrapper.base else 0.0
        want = x.astype(np.float64) @ (bases[target].astype(np.float64) + dw).T + b0 + db
        np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4, err_msg=target)


def test_dora_rows_and_columns_on_one_layer_are_refused_atomically(transformer, corpus, patcher):
    import mlx.core as mx

    patcher.apply_stack([StackEntry(str(corpus["kohya"].path), 1.0)])
    x = mx.ones((1, 3072))
    before = np.array(_module(transformer, "transformer_blocks.0.attn.to_q")(x))
    with pytest.raises(LoraUnsupported, match="output row and per input column"):
        patcher.apply_stack(
            [StackEntry(str(corpus["peft_dora"].path), 1.0), StackEntry(str(corpus["kohya_dora_columns"].path), 1.0)]
        )
    np.testing.assert_array_equal(np.array(_module(transformer, "transformer_blocks.0.attn.to_q")(x)), before)


def test_bake_form_matches_side_form_for_base_dependent_terms(transformer, corpus):
    import mlx.core as mx

    from daemon.lora import LoraPatcher

    stack = [StackEntry(str(corpus[n].path), s) for n, s in MIXED[1][:2] + MIXED[2][:1]]
    x = mx.array(np.random.default_rng(5).standard_normal((2, 3072)).astype(np.float32))
    targets = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_out.0",
        "single_transformer_blocks.0.proj_mlp",
    ]
    base = [np.array(_module(transformer, t)(x)) for t in targets]
    side = LoraPatcher(transformer, mode="side")
    side.apply_stack(stack)
    side_out = [np.array(_module(transformer, t)(x)) for t in targets]
    side.clear()
    bake = LoraPatcher(transformer, mode="bake")
    try:
        bake.apply_stack(stack)
        for got, want in zip([np.array(_module(transformer, t)(x)) for t in targets], side_out, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    finally:
        bake.clear()
    for got, want in zip([np.array(_module(transformer, t)(x)) for t in targets], base, strict=True):
        np.testing.assert_array_equal(got, want)


# Corpus files mflux 0.24 loads whole. It reads no key of bfl_peft, ai_toolkit_comfy or comfyui_lora_dot,
# only part of diffsynth (bare diffusers names), and not the final-layer modules of the kohya and
# diffusers files: those are not comparisons (tests/lora/test_lora_peer_oracle.py covers block-only files).
PEER = ["kohya_split_qkv", "fal"]


@pytest.mark.parametrize("name", PEER)
def test_mflux_loader_agrees_where_it_loads_the_file(tiny_model, corpus, name):
    """mflux 0.24's own loader on the same file: where it applies the file, the outputs agree."""
    import mlx.core as mx
    from mflux.models.common.config.config import Config
    from mflux.models.common.lora.mapping.lora_loader import LoRALoader
    from mflux.models.flux.weights.flux_lora_mapping import FluxLoRAMapping

    from daemon.lora import LoraPatcher

    transformer = tiny_model.flux.transformer
    rng = np.random.default_rng(0)
    hidden = mx.array(rng.standard_normal((1, 16, 64)).astype(np.float32))
    prompt = mx.array(rng.standard_normal((1, 16, 4096)).astype(np.float32))
    pooled = mx.array(rng.standard_normal((1, 768)).astype(np.float32))
    config = Config(tiny_model.flux.model_config, num_inference_steps=2, height=64, width=64, guidance=3.5)

    def forward() -> np.ndarray:
        out = transformer(t=0, config=config, hidden_states=hidden, prompt_embeds=prompt, pooled_prompt_embeds=pooled)
        mx.eval(out)
        return np.array(out)

    path = str(corpus[name].path)
    patcher = LoraPatcher(transformer, LoraCache())
    originals = {n: _module(transformer, n) for n in patcher.layout}
    base = forward()
    patcher.apply_stack([StackEntry(path, 0.9)])
    easel = forward()
    patcher.clear()
    try:
        try:
            LoRALoader.load_and_apply_lora(FluxLoRAMapping.get_mapping(), transformer, [path], [0.9], bake_lora=False)
        except Exception as exc:  # noqa: BLE001 - a naming mflux does not read
            pytest.skip(f"mflux does not load {name}: {exc}")
        peer = forward()
    finally:
        for n, module in originals.items():
            parent, _, last = n.rpartition(".")
            container = _module(transformer, parent) if parent else transformer
            if isinstance(container, list):
                container[int(last)] = module
            else:
                setattr(container, last, module)
    np.testing.assert_array_equal(forward(), base)
    if np.abs(peer - base).max() == 0:
        pytest.skip(f"mflux loads no key of {name}")
    effect = np.abs(easel - base).max()
    assert effect > 1e-3
    np.testing.assert_allclose(easel - base, peer - base, rtol=0, atol=1e-3 * effect)
