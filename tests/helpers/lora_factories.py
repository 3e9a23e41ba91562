"""Generators of small LoRA files in every supported format, for any mflux Flux transformer's shapes.

The naming of each format is written out here by hand (independently of keymaps/), and every
generator returns the ground truth: for each mflux layer, the weight delta the file means at scale 1
(`(alpha/rank) * B @ A`, or the LoKr Kronecker product), computed in float64 numpy.

    from helpers.lora_factories import make_lora, generate_lora  # tests/ is on sys.path under pytest
    path = make_lora("kohya", tmp_path / "a.safetensors", transformer, rank=4, alpha=8, seed=1)
    gen = generate_lora("bfl", tmp_path / "b.safetensors", transformer, fused_style="stacked")
    gen.expected["transformer_blocks.0.attn.to_q"].dense()  # (out, in) delta at scale 1, float64

`transformer` may be an mflux transformer or a layout mapping {module path: (out, in)}.
Formats: kohya, kohya_diffusers, bfl, bfl_peft, diffusers, peft, ai_toolkit, xlabs, mlx_examples,
lokr (kohya naming), lycoris (SimpleTuner naming). Error files: make_pickle, make_torch_zip,
make_s4nnc, make_truncated, make_garbage, make_dora.
"""

from __future__ import annotations

import json
import pickle
import re
import sqlite3
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

FORMATS = (
    "kohya",
    "kohya_diffusers",
    "bfl",
    "bfl_peft",
    "diffusers",
    "peft",
    "ai_toolkit",
    "xlabs",
    "mlx_examples",
    "lokr",
    "lycoris",
)

# BFL module name -> mflux targets, per block kind ({i} = block index).
_BFL_DOUBLE = [
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("img_attn.proj", ["attn.to_out.0"]),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("txt_attn.proj", ["attn.to_add_out"]),
    ("img_mlp.0", ["ff.linear1"]),
    ("img_mlp.2", ["ff.linear2"]),
    ("txt_mlp.0", ["ff_context.linear1"]),
    ("txt_mlp.2", ["ff_context.linear2"]),
    ("img_mod.lin", ["norm1.linear"]),
    ("txt_mod.lin", ["norm1_context.linear"]),
]
_BFL_SINGLE = [
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    ("linear2", ["proj_out"]),
    ("modulation.lin", ["norm.linear"]),
]
_BFL_GLOBAL = [
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
]
_BFL_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # BFL (shift, scale) vs mflux (scale, shift)

_XLABS_DOUBLE = [
    ("processor.qkv_lora1", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("processor.proj_lora1", ["attn.to_out.0"]),
    ("processor.qkv_lora2", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("processor.proj_lora2", ["attn.to_add_out"]),
]
_XLABS_SINGLE = [("processor.qkv_lora", ["attn.to_q", "attn.to_k", "attn.to_v"]), ("processor.proj_lora", ["proj_out"])]

# mflux module -> diffusers module (identical unless listed).
_DIFFUSERS_RENAME = {
    "ff.linear1": "ff.net.0.proj",
    "ff.linear2": "ff.net.2",
    "ff_context.linear1": "ff_context.net.0.proj",
    "ff_context.linear2": "ff_context.net.2",
}


@dataclass(frozen=True)
class ExpectedDelta:
    """Ground truth for one mflux layer, kept factored (dense deltas of a whole model would be GBs).

    delta = factor * up @ down, or factor * kron(w1, w2) when `kron`; rows [row0:row1] of that product,
    half-swapped first when `swap` (BFL final-layer modulation order).
    """

    up: np.ndarray
    down: np.ndarray
    factor: float
    kron: bool = False
    swap: bool = False
    rows: tuple[int, int] | None = None

    def dense(self, dtype: type = np.float64) -> np.ndarray:
        """The (out, in) delta at scale 1 (float64 by default; float32 is much faster for big layers)."""
        a, b = self.up.astype(dtype), self.down.astype(dtype)
        if self.rows is not None and not self.swap:  # slice first: same numbers, far less work
            r0, r1 = self.rows
            if not self.kron:
                return self.factor * (a[r0:r1] @ b)
            if r0 % b.shape[0] == 0 and r1 % b.shape[0] == 0:
                return self.factor * np.kron(a[r0 // b.shape[0] : r1 // b.shape[0]], b)
        full = self.factor * (np.kron(a, b) if self.kron else a @ b)
        if self.swap:
            full = _swap(full)
        return full if self.rows is None else full[self.rows[0] : self.rows[1]]

    def _full_rows(self, rows: np.ndarray) -> np.ndarray:
        """Indices into the un-sliced, un-swapped product for the given output rows of this layer."""
        r0 = self.rows[0] if self.rows is not None else 0
        idx = np.asarray(rows) + r0
        if self.swap:
            total = self.up.shape[0] * (self.down.shape[0] if self.kron else 1)
            half = total // 2
            idx = np.where(idx < total - half, idx + half, idx - (total - half))
        return idx

    def dense_rows(self, rows: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """Only the given output rows of the delta (cheap: no full product)."""
        idx = self._full_rows(rows)
        a, b = self.up.astype(dtype), self.down.astype(dtype)
        if not self.kron:
            return self.factor * (a[idx] @ b)
        b1 = b.shape[0]
        left, right = a[idx // b1], b[idx % b1]  # kron row i = outer(w1[i // b1], w2[i % b1]) flattened
        return self.factor * (left[:, :, None] * right[:, None, :]).reshape(len(idx), -1)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """x (n, in) @ delta.T (n, out), computed from the factors."""
        x = x.astype(np.float64)
        a, b = self.up.astype(np.float64), self.down.astype(np.float64)
        if not self.kron:
            full = (x @ b.T) @ a.T
        else:
            xs = x.reshape(len(x), a.shape[1], b.shape[1])
            full = np.einsum("ij,njk->nik", a, xs @ b.T).reshape(len(x), -1)
        if self.swap:
            half = full.shape[1] // 2
            full = np.concatenate([full[:, half:], full[:, :half]], axis=1)
        if self.rows is not None:
            full = full[:, self.rows[0] : self.rows[1]]
        return self.factor * full


@dataclass
class GeneratedLora:
    path: Path
    fmt: str
    rank: int
    alpha: float | None
    expected: dict[str, ExpectedDelta]  # mflux module path -> its delta at scale 1 (.dense())
    keys: list[str] = field(default_factory=list)
    text_encoder_keys: list[str] = field(default_factory=list)


def layout_of(transformer: Any) -> dict[str, tuple[int, int]]:
    if isinstance(transformer, Mapping):
        return dict(transformer)
    from daemon.lora.runtime import linear_layout

    return linear_layout(transformer)


def _blocks(layout: Mapping[str, tuple[int, int]], kind: str) -> list[int]:
    found = {int(m.group(1)) for name in layout if (m := re.match(rf"{kind}\.(\d+)\.", name))}
    return sorted(found)


def _groups(fmt: str, layout: Mapping[str, tuple[int, int]]) -> list[tuple[str, list[str], bool]]:
    """(source module name in the format's vocabulary, mflux targets, swap_halves) per module."""
    out: list[tuple[str, list[str], bool]] = []
    doubles, singles = _blocks(layout, "transformer_blocks"), _blocks(layout, "single_transformer_blocks")
    if fmt == "xlabs":
        for i in doubles:
            out += [
                (f"double_blocks.{i}.{s}", [f"transformer_blocks.{i}.{t}" for t in ts], False)
                for s, ts in _XLABS_DOUBLE
            ]
        for i in singles:
            out += [
                (f"single_blocks.{i}.{s}", [f"single_transformer_blocks.{i}.{t}" for t in ts], False)
                for s, ts in _XLABS_SINGLE
            ]
        return out
    if fmt in ("kohya", "bfl", "bfl_peft", "mlx_examples", "lokr"):
        for i in doubles:
            out += [
                (f"double_blocks.{i}.{s}", [f"transformer_blocks.{i}.{t}" for t in ts], False) for s, ts in _BFL_DOUBLE
            ]
        for i in singles:
            out += [
                (f"single_blocks.{i}.{s}", [f"single_transformer_blocks.{i}.{t}" for t in ts], False)
                for s, ts in _BFL_SINGLE
            ]
        out += [(s, [t], False) for s, t in _BFL_GLOBAL]
        out.append((_BFL_SWAPPED[0], [_BFL_SWAPPED[1]], True))
        return out
    # diffusers vocabulary: one module per mflux layer, every Linear of the model
    for name in layout:
        renamed = name
        for old, new in _DIFFUSERS_RENAME.items():
            if name.endswith("." + old):
                renamed = name[: -len(old)] + new
        out.append((renamed, [name], False))
    return out


def _key_base(fmt: str, module: str, prefix: str | None) -> str:
    if fmt in ("kohya", "lokr"):
        return (prefix if prefix is not None else "lora_unet_") + module.replace(".", "_")
    if fmt == "kohya_diffusers":
        return (prefix if prefix is not None else "lora_transformer_") + module.replace(".", "_")
    if fmt == "lycoris":
        return (prefix if prefix is not None else "lycoris_") + module.replace(".", "_")
    if fmt == "bfl":
        return (prefix if prefix is not None else "diffusion_model.") + module
    if fmt == "bfl_peft":
        return (prefix if prefix is not None else "base_model.model.") + module
    if fmt in ("diffusers", "ai_toolkit"):
        return (prefix if prefix is not None else "transformer.") + module
    if fmt == "peft":
        return (prefix if prefix is not None else "base_model.model.") + module
    if fmt == "mlx_examples":  # MLX's nn.Sequential names its children `layers.N` (BFL's `img_mlp.0`)
        module = module.replace("_mlp.", "_mlp.layers.").replace("adaLN_modulation.", "adaLN_modulation.layers.")
    return (prefix or "") + module  # xlabs, mlx_examples


_SUFFIX = {  # fmt -> (down, up, alpha or None)
    "kohya": ("lora_down.weight", "lora_up.weight", "alpha"),
    "kohya_diffusers": ("lora_down.weight", "lora_up.weight", "alpha"),
    "bfl": ("lora_A.weight", "lora_B.weight", "alpha"),
    "bfl_peft": ("lora_A.weight", "lora_B.weight", "alpha"),
    "diffusers": ("lora_A.weight", "lora_B.weight", None),
    "peft": ("lora_A.weight", "lora_B.weight", None),
    "ai_toolkit": ("lora_A.weight", "lora_B.weight", None),
    "xlabs": ("down.weight", "up.weight", None),
    "mlx_examples": ("lora_a", "lora_b", None),
}


def _swap(m: np.ndarray) -> np.ndarray:
    half = m.shape[0] // 2
    return np.concatenate([m[half:], m[:half]], axis=0)


def generate_lora(
    fmt: str,
    path: str | Path,
    transformer: Any,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    modules: Iterable[str] | None = None,
    *,
    fused_style: str = "shared",
    magnitude: float = 0.05,
    dtype: str = "F32",
    prefix: str | None = None,
    include_text_encoder: bool = False,
    metadata: dict[str, str] | None = None,
) -> GeneratedLora:
    """Write a LoRA in `fmt` covering every matching layer of the model; return it with its ground truth.

    fused_style (BFL-vocabulary formats): "shared" (one down matrix for q,k,v[,mlp]), "stacked" (per-part
    downs stacked along the rank axis, block-diagonal up: ai-toolkit's rank-3x/4x style) or
    "replicate" (the shared down tiled k times along the rank axis, up of rank r). `modules`: keep only
    modules whose mflux target path contains one of these substrings. alpha=None: no alpha stored.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    layout = layout_of(transformer)
    rng = np.random.default_rng(seed)
    wanted = list(modules) if modules is not None else None
    tensors: dict[str, np.ndarray] = {}
    expected: dict[str, np.ndarray] = {}
    lokr = fmt in ("lokr", "lycoris")
    if fmt in ("ai_toolkit", "xlabs", "mlx_examples"):
        alpha = None  # these formats store no alpha: the file means scale factor 1
    for module, targets, swap in _groups(fmt, layout):
        if any(t not in layout for t in targets):
            continue
        if wanted is not None and not any(w in t for t in targets for w in wanted):
            continue
        outs = [layout[t][0] for t in targets]
        in_dim = layout[targets[0]][1]
        base = _key_base(fmt, module, prefix)
        if lokr:
            _lokr_module(tensors, expected, base, targets, outs, in_dim, rank, alpha, rng, magnitude, swap)
            continue
        down_s, up_s, alpha_s = _SUFFIX[fmt]
        k = len(targets)
        style = fused_style if k > 1 else "shared"
        rows = np.cumsum([0, *outs])
        if style == "stacked":
            downs = [rng.standard_normal((rank, in_dim)) * magnitude for _ in targets]
            ups = [rng.standard_normal((o, rank)) * magnitude for o in outs]
            down = np.concatenate(downs, axis=0)
            up = np.zeros((sum(outs), k * rank))
            for i, u in enumerate(ups):
                up[rows[i] : rows[i + 1], i * rank : (i + 1) * rank] = u
            f = (alpha / (k * rank)) if alpha is not None else 1.0
            parts = [ExpectedDelta(u, d, f) for u, d in zip(ups, downs, strict=True)]
        elif style == "replicate":
            a = rng.standard_normal((rank, in_dim)) * magnitude
            up = rng.standard_normal((sum(outs), rank)) * magnitude
            down = np.concatenate([a] * k, axis=0)
            f = (alpha / rank) if alpha is not None else 1.0
            parts = [ExpectedDelta(up[rows[i] : rows[i + 1]], a, f) for i in range(k)]
        else:
            down = rng.standard_normal((rank, in_dim)) * magnitude
            up = rng.standard_normal((sum(outs), rank)) * magnitude
            f = (alpha / rank) if alpha is not None else 1.0
            parts = [ExpectedDelta(up, down, f, swap=swap, rows=(int(rows[i]), int(rows[i + 1]))) for i in range(k)]
        for t, p in zip(targets, parts, strict=True):
            expected[t] = p
        if fmt == "mlx_examples":
            tensors[f"{base}.{down_s}"], tensors[f"{base}.{up_s}"] = down.T, up.T
        else:
            tensors[f"{base}.{down_s}"], tensors[f"{base}.{up_s}"] = down, up
        if alpha is not None and alpha_s is not None:
            tensors[f"{base}.{alpha_s}"] = np.array(alpha, dtype=np.float32)
    te_keys: list[str] = []
    if include_text_encoder:
        te_keys = _add_text_encoder(fmt, tensors, rank, rng)
    meta = dict(metadata or {})
    if fmt in ("diffusers", "peft") and alpha is not None:
        meta["lora_adapter_metadata"] = json.dumps({"transformer.lora_alpha": alpha, "transformer.r": rank})
    if fmt == "ai_toolkit":
        meta.setdefault("software", json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"}))
    path = Path(path)
    write_safetensors(path, tensors, meta, dtype=dtype)
    return GeneratedLora(path, fmt, rank, alpha, expected, list(tensors), te_keys)


TINY_WIDTH = 3072  # the tiny preset's hidden size
TINY_ATTENTION = {  # the tiny transformer's joint block 0 attention layers, for LoRAs that reach the tiny model
    f"transformer_blocks.0.attn.{name}": (TINY_WIDTH, TINY_WIDTH) for name in ("to_q", "to_k", "to_v", "to_out.0")
}
TINY_MISSING = {"transformer_blocks.7.attn.to_out.0": (TINY_WIDTH, TINY_WIDTH)}  # a block it lacks: 0 keys match


def make_lora(
    fmt: str,
    path: str | Path,
    transformer: Any,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    modules: Iterable[str] | None = None,
    **kwargs: Any,
) -> Path:
    """Write a LoRA file in `fmt` for this transformer's shapes and return its path."""
    return generate_lora(fmt, path, transformer, rank, alpha, seed, modules, **kwargs).path


def _lokr_module(tensors, expected, base, targets, outs, in_dim, rank, alpha, rng, magnitude, swap) -> None:
    out_total = sum(outs)
    b1 = 512 if all(o % 512 == 0 for o in outs) else out_total
    b2 = 512 if in_dim % 512 == 0 else in_dim
    a1, a2 = out_total // b1, in_dim // b2
    w1 = rng.standard_normal((a1, a2)) * 0.5
    w2_a = rng.standard_normal((b1, rank)) * magnitude
    w2_b = rng.standard_normal((rank, b2)) * magnitude
    f = (alpha / rank) if alpha is not None else 1.0
    w2 = w2_a @ w2_b
    rows = np.cumsum([0, *outs])
    for i, t in enumerate(targets):
        expected[t] = ExpectedDelta(w1, w2, f, kron=True, swap=swap, rows=(int(rows[i]), int(rows[i + 1])))
    tensors[f"{base}.lokr_w1"] = w1
    tensors[f"{base}.lokr_w2_a"] = w2_a
    tensors[f"{base}.lokr_w2_b"] = w2_b
    if alpha is not None:
        tensors[f"{base}.alpha"] = np.array(alpha, dtype=np.float32)


def _add_text_encoder(fmt: str, tensors: dict[str, np.ndarray], rank: int, rng: np.random.Generator) -> list[str]:
    if fmt in ("kohya", "lokr", "kohya_diffusers"):
        base = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        keys = [f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"]
    elif fmt in ("bfl", "bfl_peft"):
        base = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
        keys = [f"{base}.lora_A.weight", f"{base}.lora_B.weight"]
    elif fmt in ("diffusers", "peft", "ai_toolkit"):
        base = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        keys = [f"{base}.lora_A.weight", f"{base}.lora_B.weight"]
    elif fmt == "lycoris":
        base = "lycoris_te_text_model_encoder_layers_0_self_attn_q_proj"
        keys = [f"{base}.lora_down.weight", f"{base}.lora_up.weight"]
    else:
        return []
    for key in keys:
        if key.endswith("alpha"):
            tensors[key] = np.array(float(rank), dtype=np.float32)
        elif "down" in key or "lora_A" in key:
            tensors[key] = rng.standard_normal((rank, 768)) * 0.01
        else:
            tensors[key] = rng.standard_normal((768, rank)) * 0.01
    return keys


# -- writing ------------------------------------------------------------------------------------


def bf16_round(arr: np.ndarray) -> np.ndarray:
    """What a float32 array becomes after a round trip through bfloat16 (round to nearest even)."""
    return np.asarray(arr, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str], dtype: str = "F32") -> None:
    """Write a safetensors file, every tensor in `dtype` (F32, F16 or BF16, rounded to nearest even)."""
    if dtype == "F32":  # through the safetensors library itself, independently of easel's writer
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata)
        return
    from client.lorafile.safetensors_io import DTYPES
    from client.lorafile.safetensors_io import write_safetensors as write

    wide = np.float32 if dtype == "BF16" else None  # bf16 as bf16_round makes it: from float32
    cast = {k: np.asarray(v, dtype=wide).astype(DTYPES[dtype]) for k, v in tensors.items()}
    write(path, cast, metadata)


# -- files easel must refuse ---------------------------------------------------------------------


def make_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=4))
    return path


def make_torch_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        zf.writestr("archive/version", "3\n")
    return path


def make_s4nnc(path: Path) -> Path:
    """A Draw Things s4nnc checkpoint is an SQLite database of tensors."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE tensors (name TEXT, type INTEGER, format INTEGER, datatype INTEGER, data BLOB)")
    con.execute("INSERT INTO tensors VALUES ('__lora__[t-0-0]', 0, 0, 0, x'00000000')")
    con.commit()
    con.close()
    return path


def make_truncated(src: Path, path: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_garbage(path: Path, size: int = 4096, seed: int = 0) -> Path:
    path.write_bytes(b"\x13\x37" + np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def make_dora(path: Path, transformer: Any) -> Path:
    """A diffusers-named DoRA file (lora_A/lora_B plus lora_magnitude_vector)."""
    layout = layout_of(transformer)
    out_dim, in_dim = layout["transformer_blocks.0.attn.to_q"]
    base = "transformer.transformer_blocks.0.attn.to_q"
    rng = np.random.default_rng(0)
    tensors = {
        f"{base}.lora_A.weight": rng.standard_normal((4, in_dim)),
        f"{base}.lora_B.weight": rng.standard_normal((out_dim, 4)),
        f"{base}.lora_magnitude_vector": np.ones((out_dim,)),
    }
    write_safetensors(path, tensors, {})
    return path


def make_control_lora(path: Path, rank: int = 4, seed: int = 0) -> Path:
    """A BFL FLUX.1 Canny/Depth control LoRA as shipped (flux1-canny-dev-lora): bare BFL keys, an `img_in`
    LoRA with 128 inputs (latent + control latent), full RMSNorm scales and `lora_B.bias` (the keys
    diffusers' _convert_bfl_flux_control_lora_to_diffusers reads). easel must refuse it by name."""
    rng = np.random.default_rng(seed)
    w = 3072
    tensors = {
        "img_in.lora_A.weight": rng.standard_normal((rank, 128)),
        "img_in.lora_B.weight": rng.standard_normal((w, rank)),
        "img_in.lora_B.bias": rng.standard_normal(w),
        "double_blocks.0.img_attn.qkv.lora_A.weight": rng.standard_normal((rank, w)),
        "double_blocks.0.img_attn.qkv.lora_B.weight": rng.standard_normal((3 * w, rank)),
        "double_blocks.0.img_attn.qkv.lora_B.bias": rng.standard_normal(3 * w),
        "double_blocks.0.img_attn.norm.query_norm.scale": np.ones(128),
        "double_blocks.0.img_attn.norm.key_norm.scale": np.ones(128),
    }
    write_safetensors(path, {k: v * 0.01 for k, v in tensors.items()}, {}, dtype="BF16")
    return path


def make_rank_mismatch(path: Path) -> Path:
    """A kohya file whose every module's down and up ranks disagree: corrupt, not a file for another model."""
    rng = np.random.default_rng(0)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rng.standard_normal((4, 3072)),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": rng.standard_normal((3072, 5)),
    }
    write_safetensors(path, tensors, {})
    return path


# -- text-encoder LoRAs ----------------------------------------------------------------------------
#
# Each trainer's naming of FLUX.1's two text encoders, written out by hand from the trainers' and loaders'
# own code (independently of keymaps/): (CLIP-L prefix, T5-XXL prefix, separator, down, up, alpha suffix).
# Module names after the prefix are Hugging Face transformers' (CLIPTextModel, T5EncoderModel).
TE_NAMINGS: dict[str, tuple[str, str, str, str, str, str | None]] = {
    # kohya-ss/sd-scripts networks/lora_flux.py: LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1",
    # LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3" (train_t5xxl), names joined with "_"
    "kohya": ("lora_te1_", "lora_te3_", "_", "lora_down.weight", "lora_up.weight", "alpha"),
    # Nerogar/OneTrainer modules/util/convert/lora/convert_flux_lora.py: clip_l -> "lora_te1", t5 -> "lora_te2",
    # written as legacy diffusers keys (convert_lora_util.py: dots of the module name become "_")
    "onetrainer": ("lora_te1_", "lora_te2_", "_", "lora_down.weight", "lora_up.weight", "alpha"),
    # huggingface/diffusers FluxLoraLoaderMixin (text_encoder_name = "text_encoder") and the Flux pipeline's
    # text_encoder_2 (T5), PEFT's lora_A / lora_B, no alpha tensor
    "diffusers": ("text_encoder.", "text_encoder_2.", ".", "lora_A.weight", "lora_B.weight", None),
    # comfyanonymous/ComfyUI comfy/lora.py model_lora_keys_clip: "text_encoders.{state-dict key}", the Flux
    # CLIP state dict being clip_l.transformer.* and t5xxl.transformer.*
    "comfyui": (
        "text_encoders.clip_l.transformer.",
        "text_encoders.t5xxl.transformer.",
        ".",
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
    ),
    # OneTrainer's OMI format (convert_flux_lora.py omi prefixes "clip_l", "t5"; convert_clip.py, convert_t5.py)
    "omi": ("clip_l.", "t5.", ".", "lora_down.weight", "lora_up.weight", "alpha"),
}

_CLIP_HF = {  # mflux CLIPEncoderLayer module -> transformers CLIPEncoderLayer module
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_T5_HF = {  # mflux T5Block module -> transformers T5Block module
    "attention.SelfAttention.q": "layer.0.SelfAttention.q",
    "attention.SelfAttention.k": "layer.0.SelfAttention.k",
    "attention.SelfAttention.v": "layer.0.SelfAttention.v",
    "attention.SelfAttention.o": "layer.0.SelfAttention.o",
    "ff.DenseReluDense.wi_0": "layer.1.DenseReluDense.wi_0",
    "ff.DenseReluDense.wi_1": "layer.1.DenseReluDense.wi_1",
    "ff.DenseReluDense.wo": "layer.1.DenseReluDense.wo",
}


def te_source_name(target: str) -> tuple[str, str] | None:
    """(encoder, Hugging Face module name) of an mflux text-encoder layer path, None for other paths."""
    m = re.fullmatch(r"clip_text_encoder\.text_model\.encoder\.layers\.(\d+)\.(.+)", target)
    if m and m.group(2) in _CLIP_HF:
        return "clip_l", f"text_model.encoder.layers.{m.group(1)}.{_CLIP_HF[m.group(2)]}"
    m = re.fullmatch(r"t5_text_encoder\.t5_blocks\.(\d+)\.(.+)", target)
    if m and m.group(2) in _T5_HF:
        return "t5xxl", f"encoder.block.{m.group(1)}.{_T5_HF[m.group(2)]}"
    return None


def generate_te_lora(
    naming: str,
    path: str | Path,
    te_layout: Mapping[str, tuple[int, int]],
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    *,
    encoders: Iterable[str] = ("clip_l", "t5xxl"),
    magnitude: float = 0.05,
    dtype: str = "F32",
    extra: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
) -> GeneratedLora:
    """Write a LoRA for FLUX.1's text encoders in a trainer's naming (TE_NAMINGS), one module per Linear
    layer of `te_layout` (mflux paths from the model root, {path: (out, in)}); `extra` tensors (a
    transformer LoRA's, say) go into the same file. `expected` maps each mflux layer path to its delta at
    scale 1. Naming without an alpha tensor (diffusers) means factor 1."""
    clip_prefix, t5_prefix, sep, down_s, up_s, alpha_s = TE_NAMINGS[naming]
    if alpha_s is None:
        alpha = None
    rng = np.random.default_rng(seed)
    wanted = set(encoders)
    tensors: dict[str, np.ndarray] = dict(extra or {})
    expected: dict[str, ExpectedDelta] = {}
    te_keys: list[str] = []
    for target, (out_dim, in_dim) in sorted(te_layout.items()):
        source = te_source_name(target)
        if source is None or source[0] not in wanted:
            continue
        encoder, module = source
        base = (clip_prefix if encoder == "clip_l" else t5_prefix) + module.replace(".", sep)
        down = rng.standard_normal((rank, in_dim)) * magnitude
        up = rng.standard_normal((out_dim, rank)) * magnitude
        tensors[f"{base}.{down_s}"], tensors[f"{base}.{up_s}"] = down, up
        te_keys += [f"{base}.{down_s}", f"{base}.{up_s}"]
        if alpha is not None:
            tensors[f"{base}.{alpha_s}"] = np.array(alpha, dtype=np.float32)
            te_keys.append(f"{base}.{alpha_s}")
        expected[target] = ExpectedDelta(up, down, (alpha / rank) if alpha is not None else 1.0)
    path = Path(path)
    write_safetensors(path, tensors, dict(metadata or {}), dtype=dtype)
    return GeneratedLora(path, naming, rank, alpha, expected, list(tensors), te_keys)
