"""A corpus of Flux.1 LoRA files, one per convention of a public trainer or loader, with references.

Every convention cites where its naming comes from. Each file is written in a real dtype (bf16, fp16
or f32, values rounded to that dtype first, so the reference reads exactly what the file stores) with
the metadata its trainer writes, over a handful of modules of the mflux transformer (fused ones
included). The reference of every module is computed here, in numpy float64, from the file's own
arrays and the math the convention's own loader uses (written out independently of easel):

    corpus = build_corpus(tmp_path, layout)
    entry = corpus["kohya_loha"]
    entry.reference_rows("transformer_blocks.0.attn.to_q", rows, bases)  # W' - W for those rows, scale 1

`bases` maps an mflux layer path to its base weight (numpy): DoRA and `.set_weight` need it.
Control LoRAs (`expect == "refuse"`) have no reference: easel must refuse them by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from helpers.lora_factories import make_control_lora, write_safetensors

W = 3072
MLP = 4 * W

# mflux targets of the modules the corpus uses (tiny model: block 0 of each kind).
QKV = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]
TXT_QKV = [
    "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj",
]
PROJ = ["transformer_blocks.0.attn.to_out.0"]
MLP0 = ["transformer_blocks.0.ff.linear1"]
TXT_MOD = ["transformer_blocks.0.norm1_context.linear"]
LINEAR1 = [
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.0.proj_mlp",
]
LINEAR2 = ["single_transformer_blocks.0.proj_out"]
FINAL_MOD = ["norm_out.linear"]

# (bfl name, kohya name, diffusers name, targets)
BFL_MODULES = {
    "qkv": ("double_blocks.0.img_attn.qkv", QKV),
    "proj": ("double_blocks.0.img_attn.proj", PROJ),
    "mlp0": ("double_blocks.0.img_mlp.0", MLP0),
    "txt_mod": ("double_blocks.0.txt_mod.lin", TXT_MOD),
    "linear1": ("single_blocks.0.linear1", LINEAR1),
    "linear2": ("single_blocks.0.linear2", LINEAR2),
    "final_mod": ("final_layer.adaLN_modulation.1", FINAL_MOD),
}
DIFFUSERS_MODULES = {
    "to_q": ("transformer_blocks.0.attn.to_q", QKV[:1]),
    "to_out": ("transformer_blocks.0.attn.to_out.0", PROJ),
    "ff0": ("transformer_blocks.0.ff.net.0.proj", MLP0),
    "add_k": ("transformer_blocks.0.attn.add_k_proj", TXT_QKV[1:2]),
    "proj_mlp": ("single_transformer_blocks.0.proj_mlp", LINEAR1[3:]),
    "proj_out": ("single_transformer_blocks.0.proj_out", LINEAR2),
    "norm_out": ("norm_out.linear", FINAL_MOD),
}

PEFT = {"down": "lora_A.weight", "up": "lora_B.weight", "alpha_key": None}  # no alpha tensor
XLABS = {"down": "down.weight", "up": "up.weight", "alpha_key": None}

DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


def _round(arr: np.ndarray, dtype: str) -> np.ndarray:
    """The array as the file stores it, back in float32 (what a reader gets)."""
    return np.asarray(arr, np.float32).astype(DTYPES[dtype]).astype(np.float32)


@dataclass
class RefModule:
    """One source module's meaning, written from the file's arrays: row `i` of the fused delta (before the
    BFL half swap) is `rows_fn(i)`; `bias` the fused bias delta; `dora` (axis, magnitude)."""

    targets: list[str]
    outs: list[int]
    rows_fn: Callable[[np.ndarray], np.ndarray] | None  # fused row indices -> (n, in) float64 at scale 1
    swap: bool = False
    bias: np.ndarray | None = None
    dora: tuple[str, np.ndarray] | None = None
    set_weight: np.ndarray | None = None  # fused (out, in): the weight replaces W
    norm: np.ndarray | None = None  # a norm layer's weight difference (d,): `targets` is the one norm

    def _fused_index(self, target: str, rows: np.ndarray) -> np.ndarray:
        start = int(np.sum(self.outs[: self.targets.index(target)]))
        idx = np.asarray(rows) + start
        if self.swap:
            total, half = sum(self.outs), sum(self.outs) // 2
            idx = np.where(idx < total - half, idx + half, idx - (total - half))
        return idx

    def _base_rows(self, idx: np.ndarray, bases: Mapping[str, np.ndarray]) -> np.ndarray:
        """Rows of the fused base weight (in the file's row order)."""
        fused = (
            np.concatenate([bases[t] for t in self.targets], axis=0)
            if len(self.targets) > 1
            else bases[self.targets[0]]
        )
        if self.swap:
            total, half = fused.shape[0], fused.shape[0] // 2
            fused = np.concatenate([fused[total - half :], fused[: total - half]], axis=0)
        return fused[idx].astype(np.float64)

    def delta_rows(self, target: str, rows: np.ndarray, bases: Mapping[str, np.ndarray]) -> np.ndarray:
        """W' - W for these output rows of `target`, at scale 1."""
        idx = self._fused_index(target, rows)
        if self.set_weight is not None:
            return self.set_weight[idx].astype(np.float64) - self._base_rows(idx, bases)
        d = self.rows_fn(idx) if self.rows_fn is not None else 0.0
        if self.dora is None:
            return d
        axis, m = self.dora
        w = self._base_rows(idx, bases)
        if axis == "out":
            g = m[idx] / np.linalg.norm(w + d, axis=1)
            return (w + d) * g[:, None] - w
        squares = np.zeros(w.shape[1])
        total = sum(self.outs)
        for start in range(0, total, 2048):  # the column norm spans every row of the source layer
            chunk = np.arange(start, min(start + 2048, total))
            full = self._base_rows(chunk, bases) + self.rows_fn(chunk)
            squares += np.sum(full * full, axis=0)
        g = m / np.sqrt(squares)
        return (w + d) * g[None, :] - w

    def bias_delta(self, target: str) -> np.ndarray | None:
        if self.bias is None:
            return None
        idx = self._fused_index(target, np.arange(self.outs[self.targets.index(target)]))
        return self.bias[idx].astype(np.float64)


@dataclass
class CorpusFile:
    name: str
    source: str  # where the naming comes from (public trainer / loader code)
    path: Path
    expect: str = "apply"  # "apply" or "refuse"
    modules: list[RefModule] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [t for m in self.modules for t in m.targets]

    def module_of(self, target: str) -> RefModule:
        return next(m for m in self.modules if target in m.targets)


class _Writer:
    """Collects one file's tensors (rounded to its dtype) and the reference of each module."""

    def __init__(self, layout: Mapping[str, tuple[int, int]], dtype: str, seed: int) -> None:
        self.layout, self.dtype = layout, dtype
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, np.ndarray] = {}
        self.modules: list[RefModule] = []

    def put(self, key: str, arr: np.ndarray) -> np.ndarray:
        arr = _round(arr, self.dtype)
        self.tensors[key] = arr
        return arr

    def shape(self, targets: list[str]) -> tuple[list[int], int]:
        return [self.layout[t][0] for t in targets], self.layout[targets[0]][1]

    def randn(self, *shape: int, scale: float = 0.05) -> np.ndarray:
        return self.rng.standard_normal(shape) * scale

    # -- adapter kinds: tensors in, reference out ------------------------------------------------

    def lora(
        self, base: str, targets: list[str], *, down="lora_down.weight", up="lora_up.weight", alpha=8.0, rank=4,
        alpha_key: str | None = "alpha", transposed=False, swap=False, factor=None, mid=None, stacked=False,
    ) -> RefModule:  # fmt: skip
        outs, in_dim = self.shape(targets)
        if stacked:  # per-part downs along the rank axis, block-diagonal up (ai-toolkit / kohya split_qkv)
            k = len(targets)
            a = self.randn(k * rank, in_dim)
            b = np.zeros((sum(outs), k * rank))
            starts = np.cumsum([0, *outs])
            for i in range(k):
                b[starts[i] : starts[i + 1], i * rank : (i + 1) * rank] = self.randn(outs[i], rank)
            stored_rank = k * rank
        else:
            a, b, stored_rank = self.randn(rank, in_dim), self.randn(sum(outs), rank), rank
        a = self.put(f"{base}.{down}", a.T if transposed else a)
        b = self.put(f"{base}.{up}", b.T if transposed else b)
        a, b = (a.T, b.T) if transposed else (a, b)
        a, b = a.astype(np.float64), b.astype(np.float64)
        if mid is not None:
            core = self.put(f"{base}.{mid}", self.randn(stored_rank, stored_rank, 1, 1, scale=0.5))
            a = core.reshape(stored_rank, stored_rank).astype(np.float64) @ a  # ComfyUI: down <- mid @ down
        if alpha is not None and alpha_key is not None:
            self.put(f"{base}.{alpha_key}", np.array(alpha))
        stored_alpha = alpha if alpha_key is not None else None  # no alpha tensor: factor 1 unless a config says
        f = factor if factor is not None else ((stored_alpha / stored_rank) if stored_alpha is not None else 1.0)
        module = RefModule(targets, outs, lambda idx: f * (b[idx] @ a), swap=swap)
        self.modules.append(module)
        return module

    def loha(self, base: str, targets: list[str], *, alpha: float = 4.0, rank: int = 4, tucker: bool = False,
             swap: bool = False) -> RefModule:  # fmt: skip
        outs, in_dim = self.shape(targets)
        out = sum(outs)
        mats = []
        for n in (1, 2):
            if tucker:  # LyCORIS: w_a stored (rank, out), t (rank, rank, 1, 1); m = w_a^T t w_b
                wa = self.put(f"{base}.hada_w{n}_a", self.randn(rank, out, scale=0.3)).astype(np.float64)
                t = self.put(f"{base}.hada_t{n}", self.randn(rank, rank, 1, 1, scale=0.5)).astype(np.float64)
                wb = self.put(f"{base}.hada_w{n}_b", self.randn(rank, in_dim, scale=0.3)).astype(np.float64)
                mats.append((wa.T @ t.reshape(rank, rank), wb))
            else:
                wa = self.put(f"{base}.hada_w{n}_a", self.randn(out, rank, scale=0.3)).astype(np.float64)
                wb = self.put(f"{base}.hada_w{n}_b", self.randn(rank, in_dim, scale=0.3)).astype(np.float64)
                mats.append((wa, wb))
        self.put(f"{base}.alpha", np.array(alpha))
        f = alpha / rank  # ComfyUI loha.py: alpha / w1b.shape[0]
        (a1, b1), (a2, b2) = mats
        module = RefModule(targets, outs, lambda idx: f * (a1[idx] @ b1) * (a2[idx] @ b2), swap=swap)
        self.modules.append(module)
        return module

    def lokr(self, base: str, targets: list[str], *, factor_rows: int, factor_cols: int, alpha: float | None = 4.0,
             rank: int = 4, w1_split: bool = False, tucker: bool = False, swap: bool = False) -> RefModule:  # fmt: skip
        outs, in_dim = self.shape(targets)
        out = sum(outs)
        a1, a2 = factor_rows, factor_cols  # w1 is (a1, a2), w2 (out // a1, in // a2)
        b1, b2 = out // a1, in_dim // a2
        if w1_split:
            w1 = self.put(f"{base}.lokr_w1_a", self.randn(a1, rank, scale=0.5)).astype(np.float64) @ self.put(
                f"{base}.lokr_w1_b", self.randn(rank, a2, scale=0.5)
            ).astype(np.float64)
        else:
            w1 = self.put(f"{base}.lokr_w1", self.randn(a1, a2, scale=0.5)).astype(np.float64)
        if tucker:  # w2 = w2_a^T t2 w2_b (ComfyUI lokr.py einsum "i j k l, j r, i p -> p r k l")
            wa = self.put(f"{base}.lokr_w2_a", self.randn(rank, b1)).astype(np.float64)
            t2 = self.put(f"{base}.lokr_t2", self.randn(rank, rank, 1, 1, scale=0.5)).astype(np.float64)
            wb = self.put(f"{base}.lokr_w2_b", self.randn(rank, b2)).astype(np.float64)
            w2 = wa.T @ t2.reshape(rank, rank) @ wb
        else:
            w2 = self.put(f"{base}.lokr_w2_a", self.randn(b1, rank)).astype(np.float64) @ self.put(
                f"{base}.lokr_w2_b", self.randn(rank, b2)
            ).astype(np.float64)
        if alpha is not None:
            self.put(f"{base}.alpha", np.array(alpha))
        f = (alpha / rank) if alpha is not None else 1.0  # alpha / dim, dim the rank of the factorised w2

        def rows(idx: np.ndarray) -> np.ndarray:  # row i of kron(w1, w2) = outer(w1[i // b1], w2[i % b1])
            return f * (w1[idx // b1][:, :, None] * w2[idx % b1][:, None, :]).reshape(len(idx), -1)

        module = RefModule(targets, outs, rows, swap=swap)
        self.modules.append(module)
        return module

    def full(self, base: str, targets: list[str], *, diff: str = "diff", bias: str | None = "diff_b",
             swap: bool = False) -> RefModule:  # fmt: skip
        outs, in_dim = self.shape(targets)
        d = self.put(f"{base}.{diff}", self.randn(sum(outs), in_dim, scale=0.01))  # float32: what the file holds
        module = RefModule(targets, outs, lambda idx: d[idx].astype(np.float64), swap=swap)
        if bias is not None:
            module.bias = self.put(f"{base}.{bias}", self.randn(sum(outs), scale=0.1)).astype(np.float64)
        self.modules.append(module)
        return module

    def norm_diff(self, key: str, target: str) -> RefModule:
        """A difference of an RMSNorm's weight (ComfyUI `.diff` on a norm parameter, LyCORIS `w_norm`)."""
        (d,) = self.layout[target]
        delta = self.put(key, self.randn(d, scale=0.2)).astype(np.float64)
        module = RefModule([target], [d], None, norm=delta)
        self.modules.append(module)
        return module

    def set_weight(self, base: str, targets: list[str]) -> RefModule:
        outs, in_dim = self.shape(targets)
        w = self.put(f"{base}.set_weight", self.randn(sum(outs), in_dim, scale=0.02))
        module = RefModule(targets, outs, None, set_weight=w)
        self.modules.append(module)
        return module

    def dora(self, module: RefModule, key: str, axis: str, shape: tuple[int, ...]) -> None:
        """A DoRA magnitude for `module` (near the base norms, so g stays near 1, as trained files have)."""
        m = self.put(key, 0.8 + 0.4 * self.rng.random(shape)).reshape(-1).astype(np.float64)
        module.dora = (axis, m)

    def up_bias(self, module: RefModule, key: str, factor: float) -> None:
        b = self.put(key, self.randn(sum(module.outs), scale=0.1)).astype(np.float64)
        module.bias = factor * b

    def write(self, path: Path, metadata: dict[str, str] | None = None) -> list[str]:
        write_safetensors(path, self.tensors, metadata or {}, dtype=self.dtype)
        return list(self.tensors)


Builder = Callable[[_Writer], dict[str, str] | None]
CONVENTIONS: dict[str, tuple[str, str, str, Builder]] = {}  # name -> (source, dtype, file name, builder)


def convention(name: str, source: str, dtype: str = "BF16", filename: str | None = None):
    def register(fn: Builder) -> Builder:
        CONVENTIONS[name] = (source, dtype, filename or f"{name}.safetensors", fn)
        return fn

    return register


def _kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


KOHYA_META = {"ss_network_module": "networks.lora_flux", "ss_network_dim": "4", "ss_network_alpha": "8.0"}
LYCORIS_META = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "%s"}'}


# -- kohya sd-scripts -------------------------------------------------------------------------------


@convention("kohya", "kohya-ss/sd-scripts networks/lora_flux.py (lora_unet_<bfl name with _>.lora_down/lora_up/alpha)")
def _(w: _Writer):
    for key in ("qkv", "proj", "mlp0", "txt_mod", "linear1", "linear2"):
        name, targets = BFL_MODULES[key]
        w.lora(_kohya(name), targets)
    w.lora(_kohya(BFL_MODULES["final_mod"][0]), FINAL_MOD, swap=True)
    return KOHYA_META


@convention(
    "kohya_split_qkv", "kohya-ss/sd-scripts networks/lora_flux.py split_qkv (per-part downs, block-diagonal up)", "F16"
)
def _(w: _Writer):
    w.lora(_kohya(BFL_MODULES["qkv"][0]), QKV, stacked=True)
    w.lora(_kohya(BFL_MODULES["linear1"][0]), LINEAR1, stacked=True)
    return {**KOHYA_META, "ss_network_args": '{"split_qkv": "True"}'}


@convention(
    "kohya_locon_tucker", "KohakuBlueleaf/LyCORIS locon.py use_tucker (lora_mid); ComfyUI comfy/weight_adapter/lora.py"
)
def _(w: _Writer):
    w.lora(_kohya(BFL_MODULES["proj"][0]), PROJ, mid="lora_mid.weight")
    w.lora(_kohya(BFL_MODULES["qkv"][0]), QKV, mid="lora_mid.weight")
    return {**LYCORIS_META, "ss_network_args": '{"algo": "locon", "use_tucker": "True"}'}


@convention(
    "kohya_loha", "KohakuBlueleaf/LyCORIS loha.py (hada_w1_a/b, hada_w2_a/b); ComfyUI comfy/weight_adapter/loha.py"
)
def _(w: _Writer):
    w.loha(_kohya(BFL_MODULES["proj"][0]), PROJ)
    w.loha(_kohya(BFL_MODULES["qkv"][0]), QKV)
    w.loha(_kohya(BFL_MODULES["linear2"][0]), LINEAR2)
    w.loha(_kohya(BFL_MODULES["final_mod"][0]), FINAL_MOD, swap=True)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "loha"}'}


@convention(
    "kohya_loha_tucker", "KohakuBlueleaf/LyCORIS loha.py use_tucker (hada_t1/hada_t2); ComfyUI loha.py einsum", "F32"
)
def _(w: _Writer):
    w.loha(_kohya(BFL_MODULES["mlp0"][0]), MLP0, tucker=True)
    w.loha(_kohya(BFL_MODULES["linear1"][0]), LINEAR1, tucker=True)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "loha", "use_tucker": "True"}'}


@convention(
    "kohya_lokr", "KohakuBlueleaf/LyCORIS lokr.py (lokr_w1, lokr_w2_a/b), factor 8: blocks align with the split"
)
def _(w: _Writer):
    w.lokr(_kohya(BFL_MODULES["proj"][0]), PROJ, factor_rows=8, factor_cols=8)
    w.lokr(_kohya(BFL_MODULES["qkv"][0]), QKV, factor_rows=12, factor_cols=8)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "lokr", "factor": "8"}'}


@convention(
    "kohya_lokr_factor_minus1",
    "KohakuBlueleaf/LyCORIS lokr.py factor -1 (factorization(dim, -1)): linear1 rows do not align",
)
def _(w: _Writer):
    # factorization(21504, -1) -> (144, 149.33..) is not integral; LyCORIS picks the closest divisor pair:
    # 21504 = 128 * 168, 3072 = 48 * 64. 168 rows per block: 3072 / 168 is not an integer.
    w.lokr(_kohya(BFL_MODULES["linear1"][0]), LINEAR1, factor_rows=128, factor_cols=48)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "lokr", "factor": "-1"}'}


@convention(
    "kohya_lokr_factor16",
    "KohakuBlueleaf/LyCORIS lokr.py factor 16 on fused qkv and linear1 (blocks of 576 / 1344 rows)",
)
def _(w: _Writer):
    w.lokr(_kohya(BFL_MODULES["qkv"][0]), QKV, factor_rows=16, factor_cols=16, w1_split=False)
    w.lokr(_kohya(BFL_MODULES["linear1"][0]), LINEAR1, factor_rows=16, factor_cols=16)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "lokr", "factor": "16"}'}


@convention(
    "lycoris_lokr_tucker",
    "KohakuBlueleaf/LyCORIS lokr.py use_tucker (lokr_t2) and w1 as a pair; ComfyUI lokr.py",
    "F32",
)
def _(w: _Writer):
    w.lokr(_kohya(BFL_MODULES["mlp0"][0]), MLP0, factor_rows=8, factor_cols=8, tucker=True, w1_split=True)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "lokr", "use_tucker": "True"}'}


@convention(
    "kohya_dora_columns",
    "KohakuBlueleaf/LyCORIS weight_decompose, wd_on_out=False: dora_scale (1, in); ComfyUI weight_decompose",
)
def _(w: _Writer):
    m = w.lora(_kohya(BFL_MODULES["proj"][0]), PROJ)
    w.dora(m, f"{_kohya(BFL_MODULES['proj'][0])}.dora_scale", "in", (1, W))
    q = w.lora(_kohya(BFL_MODULES["qkv"][0]), QKV)
    w.dora(q, f"{_kohya(BFL_MODULES['qkv'][0])}.dora_scale", "in", (1, W))
    return {**LYCORIS_META, "ss_network_args": '{"algo": "lora", "dora_wd": "True"}'}


@convention("kohya_dora_rows", "KohakuBlueleaf/LyCORIS weight_decompose, wd_on_out=True: dora_scale (out, 1)")
def _(w: _Writer):
    m = w.lora(_kohya(BFL_MODULES["linear1"][0]), LINEAR1)
    w.dora(m, f"{_kohya(BFL_MODULES['linear1'][0])}.dora_scale", "out", (W * 3 + MLP, 1))
    h = w.loha(_kohya(BFL_MODULES["linear2"][0]), LINEAR2)
    w.dora(h, f"{_kohya(BFL_MODULES['linear2'][0])}.dora_scale", "out", (W, 1))
    return {**LYCORIS_META, "ss_network_args": '{"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}'}


@convention("lycoris_full", "KohakuBlueleaf/LyCORIS full.py (diff, diff_b); ComfyUI comfy/lora.py diff/diff_b", "F16")
def _(w: _Writer):
    w.full(_kohya(BFL_MODULES["proj"][0]), PROJ)
    w.full(_kohya(BFL_MODULES["qkv"][0]), QKV)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "full"}'}


# -- diffusers / PEFT -------------------------------------------------------------------------------


def _peft_meta(alpha: float, rank: int, **extra: object) -> dict[str, str]:
    return {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": alpha, "transformer.r": rank, **extra})}


@convention(
    "diffusers",
    "huggingface/diffusers FluxLoraLoaderMixin.save_lora_weights (transformer.*.lora_A/lora_B, lora_adapter_metadata)",
)
def _(w: _Writer):
    for key in ("to_q", "to_out", "ff0", "add_k", "proj_mlp", "proj_out", "norm_out"):
        name, targets = DIFFUSERS_MODULES[key]
        w.lora(f"transformer.{name}", targets, **PEFT, factor=16 / 4)
    return _peft_meta(16, 4)


@convention(
    "diffusers_lora_bias", "huggingface/peft LoraConfig(lora_bias=True): lora_B.bias scaled like its pair", "F32"
)
def _(w: _Writer):
    name, targets = DIFFUSERS_MODULES["to_out"]
    m = w.lora(f"transformer.{name}", targets, **PEFT, factor=2.0)
    w.up_bias(m, f"transformer.{name}.lora_B.bias", 2.0)
    return _peft_meta(8, 4, **{"transformer.lora_bias": True})


@convention(
    "peft_folder",
    "huggingface/peft save_pretrained: adapter_model.safetensors + adapter_config.json (lora_alpha != r)",
    "F32",
    "peft_folder/adapter_model.safetensors",
)
def _(w: _Writer):
    for key in ("to_q", "proj_out"):
        name, targets = DIFFUSERS_MODULES[key]
        w.lora(f"base_model.model.{name}", targets, **PEFT, factor=32 / 4)
    return {
        "__adapter_config__": json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 32, "target_modules": ["to_q", "proj_out"]}
        )
    }


@convention(
    "peft_folder_rslora_pattern",
    "huggingface/peft adapter_config.json: use_rslora, alpha_pattern, rank_pattern",
    "F32",
    "peft_rs/adapter_model.safetensors",
)
def _(w: _Writer):
    name, targets = DIFFUSERS_MODULES["to_q"]
    w.lora(
        f"base_model.model.{name}",
        targets,
        down="lora_A.weight",
        up="lora_B.weight",
        alpha_key=None,
        rank=16,
        factor=8 / 4,
    )
    name, targets = DIFFUSERS_MODULES["to_out"]
    w.lora(f"base_model.model.{name}", targets, **PEFT, factor=12 / 2)
    cfg = {"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"to_out.0": 4},
           "alpha_pattern": {"to_out.0": 12}}  # fmt: skip
    return {"__adapter_config__": json.dumps(cfg)}


@convention("peft_dora", "huggingface/peft DoraLinearLayer (lora_magnitude_vector, norm over dim=1: per output row)")
def _(w: _Writer):
    for key in ("to_q", "ff0"):
        name, targets = DIFFUSERS_MODULES[key]
        m = w.lora(f"transformer.{name}", targets, **PEFT, factor=8 / 4)
        w.dora(m, f"transformer.{name}.lora_magnitude_vector", "out", (w.layout[targets[0]][0],))
    return _peft_meta(8, 4, **{"transformer.use_dora": True})


@convention(
    "kohya_diffusers",
    "Nerogar/OneTrainer legacy / ComfyUI comfy/lora.py 'onetrainer' (lora_transformer_<diffusers name>)",
)
def _(w: _Writer):
    for key in ("to_q", "ff0", "proj_out"):
        name, targets = DIFFUSERS_MODULES[key]
        w.lora("lora_transformer_" + name.replace(".", "_"), targets)
    return {"ss_network_module": "networks.lora"}


@convention(
    "simpletuner_lycoris_lokr",
    "bghira/SimpleTuner + LyCORIS (lycoris_<diffusers name>.lokr_*); ComfyUI comfy/lora.py simpletrainer lycoris",
)
def _(w: _Writer):
    for key in ("to_q", "proj_out"):
        name, targets = DIFFUSERS_MODULES[key]
        w.lokr("lycoris_" + name.replace(".", "_"), targets, factor_rows=16, factor_cols=16, alpha=1.0)
    return {"lycoris_config": json.dumps({"algo": "lokr", "factor": 16})}


@convention("simpletuner_lycoris_loha", "bghira/SimpleTuner + LyCORIS loha (lycoris_<diffusers name>.hada_*)", "F16")
def _(w: _Writer):
    for key in ("add_k", "proj_mlp"):
        name, targets = DIFFUSERS_MODULES[key]
        w.loha("lycoris_" + name.replace(".", "_"), targets)
    return {"lycoris_config": json.dumps({"algo": "loha"})}


@convention(
    "ai_toolkit", "ostris/ai-toolkit toolkit/lora_special.py + metadata.py (diffusers naming, software = ai-toolkit)"
)
def _(w: _Writer):
    for key in ("to_q", "to_out", "proj_out"):
        name, targets = DIFFUSERS_MODULES[key]
        w.lora(f"transformer.{name}", targets, **PEFT, factor=1.0)
    return {
        "software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"}),
        "format": "pt",
    }


@convention(
    "ai_toolkit_comfy",
    "ostris/ai-toolkit ComfyUI export (diffusion_model.*, per-part downs stacked, block-diagonal up)",
)
def _(w: _Writer):
    for key in ("qkv", "linear1"):
        name, targets = BFL_MODULES[key]
        w.lora(
            f"diffusion_model.{name}",
            targets,
            down="lora_A.weight",
            up="lora_B.weight",
            alpha_key=None,
            stacked=True,
            factor=1.0,
        )
    return {"software": json.dumps({"name": "ai-toolkit"})}


@convention("fal", "fal-ai flux-lora-fast-training output (diffusers naming, fp16)", "F16")
def _(w: _Writer):
    for key in ("to_q", "proj_mlp", "proj_out"):
        name, targets = DIFFUSERS_MODULES[key]
        w.lora(f"transformer.{name}", targets, **PEFT, factor=1.0)
    return {}


@convention(
    "diffsynth", "modelscope/DiffSynth-Studio (bare diffusers names); ComfyUI comfy/lora.py 'DiffSynth lora format'"
)
def _(w: _Writer):
    for key in ("to_q", "ff0"):
        name, targets = DIFFUSERS_MODULES[key]
        w.lora(name, targets, **PEFT, factor=1.0)
    return {}


@convention(
    "mochi_style_peft", "ComfyUI comfy/weight_adapter/lora.py mochi_lora (lora_A/lora_B without .weight)", "F32"
)
def _(w: _Writer):
    name, targets = DIFFUSERS_MODULES["to_out"]
    w.lora(f"transformer.{name}", targets, down="lora_A", up="lora_B", alpha_key=None, factor=1.0)
    return {}


# -- BFL / ComfyUI ----------------------------------------------------------------------------------


@convention("comfyui", "comfyanonymous/ComfyUI comfy/lora.py + LoraSave (diffusion_model.*.lora_up/lora_down/alpha)")
def _(w: _Writer):
    for key in ("qkv", "proj", "linear1", "linear2"):
        name, targets = BFL_MODULES[key]
        w.lora(f"diffusion_model.{name}", targets)
    w.lora(f"diffusion_model.{BFL_MODULES['final_mod'][0]}", FINAL_MOD, swap=True)
    return {}


@convention("bfl_peft", "PEFT on BFL's own Flux modules (base_model.model.double_blocks.*.lora_A/lora_B, alpha)")
def _(w: _Writer):
    for key in ("qkv", "mlp0"):
        name, targets = BFL_MODULES[key]
        w.lora(f"base_model.model.{name}", targets, down="lora_A.weight", up="lora_B.weight")
    return {}


@convention(
    "comfyui_extract",
    "ComfyUI comfy_extras/nodes_lora_extract.py full_diff + bias_diff (diff, diff_b); comfy/lora.py loads "
    "`<parameter>.diff` for any parameter, the q/k norms' `scale` included",
    "F16",
)
def _(w: _Writer):
    w.full(f"diffusion_model.{BFL_MODULES['linear2'][0]}", LINEAR2)
    w.full(f"diffusion_model.{BFL_MODULES['proj'][0]}", PROJ)
    norm = "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff"
    w.norm_diff(norm, "transformer_blocks.0.attn.norm_q")
    w.norm_diff("diffusion_model.single_blocks.0.norm.key_norm.scale.diff", "single_transformer_blocks.0.attn.norm_k")
    return {}


@convention(
    "lycoris_norm",
    "KohakuBlueleaf/LyCORIS modules/norms.py (train_norm: <name>.w_norm), kohya lora_unet_ naming; "
    "ComfyUI comfy/lora.py w_norm -> diff",
)
def _(w: _Writer):
    w.norm_diff("lora_unet_double_blocks_0_img_attn_norm_query_norm.w_norm", "transformer_blocks.0.attn.norm_q")
    w.norm_diff("lora_unet_double_blocks_0_txt_attn_norm_key_norm.w_norm", "transformer_blocks.0.attn.norm_added_k")
    w.norm_diff("lora_unet_single_blocks_0_norm_query_norm.w_norm", "single_transformer_blocks.0.attn.norm_q")
    w.lora(_kohya(BFL_MODULES["proj"][0]), PROJ)
    return {**LYCORIS_META, "ss_network_args": '{"algo": "lora", "train_norm": true}'}


@convention(
    "comfyui_set_weight", "comfyanonymous/ComfyUI comfy/lora.py ('set', set_weight): the weight replaces W", "F32"
)
def _(w: _Writer):
    w.set_weight(f"diffusion_model.{BFL_MODULES['proj'][0]}", PROJ)
    w.lora(f"diffusion_model.{BFL_MODULES['mlp0'][0]}", MLP0, alpha=4.0)
    return {}


@convention(
    "comfyui_linear1_qkv",
    "comfyanonymous/ComfyUI comfy/lora.py model_lora_keys_unet: single_blocks.N.linear1_qkv (q, k, v rows)",
)
def _(w: _Writer):
    w.lora(
        "diffusion_model.single_blocks.0.linear1_qkv",
        LINEAR1[:3],
        down="lora_A.weight",
        up="lora_B.weight",
        alpha_key=None,
    )
    return {}


@convention(
    "comfyui_lora_dot",
    "ComfyUI comfy/weight_adapter/lora.py diffusers3 naming (lora.down.weight / lora.up.weight)",
    "F16",
)
def _(w: _Writer):
    w.lora(f"diffusion_model.{BFL_MODULES['proj'][0]}", PROJ, down="lora.down.weight", up="lora.up.weight")
    return {}


# -- XLabs, OneTrainer OMI, mlx-examples ------------------------------------------------------------


@convention(
    "xlabs",
    "XLabs-AI/x-flux src/flux/modules/layers.py DoubleStreamBlockLoraProcessor (processor.qkv_lora1.down.weight)",
)
def _(w: _Writer):
    w.lora("double_blocks.0.processor.qkv_lora1", QKV, **XLABS)
    w.lora("double_blocks.0.processor.proj_lora2", ["transformer_blocks.0.attn.to_add_out"], down="down.weight",
           up="up.weight", alpha_key=None)  # fmt: skip
    return {}


@convention(
    "xlabs_prefixed_single",
    "XLabs-AI/x-flux SingleStreamBlockLoraProcessor (qkv_lora, proj_lora 15360 -> 3072), diffusion_model. prefix",
)
def _(w: _Writer):
    w.lora(
        "diffusion_model.double_blocks.0.processor.qkv_lora2",
        TXT_QKV,
        down="down.weight",
        up="up.weight",
        alpha_key=None,
    )
    w.lora(
        "diffusion_model.single_blocks.0.processor.qkv_lora",
        LINEAR1[:3],
        down="down.weight",
        up="up.weight",
        alpha_key=None,
    )
    w.lora(
        "diffusion_model.single_blocks.0.processor.proj_lora",
        LINEAR2,
        down="down.weight",
        up="up.weight",
        alpha_key=None,
    )
    return {}


@convention(
    "onetrainer_omi",
    "Nerogar/OneTrainer OMI format (omi_model_standards convert_flux_lora.py): "
    "transformer.double_blocks.0.img_attn.qkv.0",
)
def _(w: _Writer):
    for part, target in enumerate(QKV):
        w.lora(f"transformer.double_blocks.0.img_attn.qkv.{part}", [target])
    for part, target in enumerate(LINEAR1):
        w.lora(f"transformer.single_blocks.0.linear1.{part}", [target])
    w.lora("transformer.img_in.proj", ["x_embedder"])
    w.lora("transformer.final_layer.adaLN_modulation.1", FINAL_MOD, swap=True)
    return {"ot_branch": "master", "modelspec.architecture": "flux-1-dev/lora"}


@convention(
    "mlx_examples",
    "ml-explore/mlx-examples flux/dreambooth.py (lora_a (in, r) / lora_b (r, out), img_mlp.layers.0)",
    "F32",
)
def _(w: _Writer):
    w.lora("double_blocks.0.img_attn.qkv", QKV, down="lora_a", up="lora_b", alpha=None, transposed=True)
    w.lora("double_blocks.0.img_mlp.layers.0", MLP0, down="lora_a", up="lora_b", alpha=None, transposed=True)
    w.lora("double_blocks.0.txt_mlp.layers.2", ["transformer_blocks.0.ff_context.linear2"], down="lora_a", up="lora_b",
           alpha=None, transposed=True)  # fmt: skip
    w.lora("single_blocks.0.linear1", LINEAR1, down="lora_a", up="lora_b", alpha=None, transposed=True)
    return {}


def build_corpus(root: Path, layout: Mapping[str, tuple[int, int]]) -> dict[str, CorpusFile]:
    """Write every convention's file under `root`; the control LoRA is written as shipped (refused)."""
    out: dict[str, CorpusFile] = {}
    for n, (name, (source, dtype, filename, build)) in enumerate(CONVENTIONS.items()):
        writer = _Writer(layout, dtype, seed=100 + n)
        meta = dict(build(writer) or {})
        path = root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        config = meta.pop("__adapter_config__", None)
        if config is not None:
            (path.parent / "adapter_config.json").write_text(config)
        keys = writer.write(path, meta)
        out[name] = CorpusFile(name, source, path, "apply", writer.modules, keys)
    control = root / "flux1-canny-dev-lora.safetensors"
    make_control_lora(control)
    out["bfl_control"] = CorpusFile(
        "bfl_control",
        "black-forest-labs FLUX.1 Canny/Depth dev LoRA; diffusers _convert_bfl_flux_control_lora_to_diffusers",
        control,
        "refuse",
    )
    return out


CORPUS_BEGIN = "<!-- corpus table: generated from tests/helpers/lora_corpus.py -->"
CORPUS_END = "<!-- end of corpus table -->"


def markdown_table(corpus: Mapping[str, CorpusFile]) -> str:
    """The corpus as docs/lora_formats.md lists it: convention, source, a key of its file, what easel does."""
    lines = [CORPUS_BEGIN, "", "| convention | naming from | key example | easel |", "|---|---|---|---|"]
    for name in sorted(corpus):
        entry = corpus[name]
        key = entry.keys[0] if entry.keys else "img_in.lora_A.weight"
        does = "applies every key" if entry.expect == "apply" else "refused by name (`lora_unsupported`)"
        lines.append(f"| `{name}` | {entry.source} | `{key}` | {does} |")
    return "\n".join([*lines, "", CORPUS_END])


if __name__ == "__main__":  # python tests/helpers/lora_corpus.py docs/lora_formats.md: refresh the table
    import sys
    import tempfile

    from client.lorafile.layout import PRESET_SHAPES, norm_layout, preset_layout

    page = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        table = markdown_table(build_corpus(Path(tmp), preset_layout("tiny") | norm_layout(PRESET_SHAPES["tiny"])))
    head, _, rest = page.read_text(encoding="utf-8").partition(CORPUS_BEGIN)
    page.write_text(head + table + rest.partition(CORPUS_END)[2], encoding="utf-8")
