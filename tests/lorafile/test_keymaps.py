"""The one keymap loader: every shipped keymap decodes, and a broken one names its file and the path inside it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import msgspec
import pytest
import yaml

from client.lorafile.keymaps import (
    FormatFile,
    ModelFile,
    RemapFile,
    default_keymap_dir,
    load_keymaps,
    load_remap_keymap,
    shipped_keymap_dir,
)
from client.wire.errors import KeymapError


def test_every_shipped_keymap_file_decodes_with_its_schema() -> None:
    root = shipped_keymap_dir()
    files = {
        **{p: FormatFile for p in (root / "formats").glob("*.yaml")},
        **{p: ModelFile for p in (root / "models").glob("*.yaml")},
        **{p: RemapFile for p in root.glob("*.yaml")},
    }
    assert len(files) >= 10
    for path, schema in files.items():
        msgspec.convert(yaml.safe_load(path.read_text()), schema)  # raises on an unknown or mistyped field
    keymaps = load_keymaps()
    assert {f.name for f in keymaps.formats} == {p.stem for p in (root / "formats").glob("*.yaml")}
    assert load_remap_keymap("mlx_examples_flux").rules


def test_easel_keymaps_points_at_another_keymap_folder(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "mykeys"
    shutil.copytree(shipped_keymap_dir(), copy)
    monkeypatch.setenv("EASEL_KEYMAPS", str(copy))
    assert default_keymap_dir() == copy
    assert load_keymaps().formats[0].path.startswith(str(copy))
    monkeypatch.delenv("EASEL_KEYMAPS")
    assert default_keymap_dir() == shipped_keymap_dir()


@pytest.fixture
def keymap_copy(tmp_path) -> Path:
    root = tmp_path / "keymaps"
    shutil.copytree(shipped_keymap_dir(), root)
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        (
            "formats/kohya.yaml",
            "  alpha: alpha\n",
            "  alpha: alfa\n",
            r"formats/kohya\.yaml: \$\.tensors\['alpha'\]: expected one of down, up, alpha, .*, got 'alfa'",
        ),
        ("formats/kohya.yaml", "layout: out_in", "layout: rows", r"\$\.layout: expected one of out_in, in_out"),
        ("formats/kohya.yaml", "priority: 50", "priorty: 50", r"\$\.priorty: unknown field \(known: version, "),
        ("formats/kohya.yaml", "format: kohya\n", "", r"formats/kohya\.yaml: \$\.format: a required field is missing"),
        ("formats/kohya.yaml", "version: 1", "version: 2", r"\$\.version: unsupported keymap version 2"),
        ("formats/kohya.yaml", "version: 1", "version: one", r"\$\.version: expected `int`, got `str`"),
        ("formats/kohya.yaml", "vocabulary: bfl", "vocabulary: sdxl", r"\$\.vocabulary: unknown vocabulary 'sdxl'"),
        (
            "formats/ai_toolkit.yaml",
            "{key: software, contains",
            "{key: software, containz",
            r"ai_toolkit\.yaml: \$\.metadata_hints\[0\]\.containz: unknown field \(known: key, contains\)",
        ),
        (
            "formats/mlx_examples.yaml",
            '["layers.{n}", "{n}"]',
            '["layers.N"]',
            r"\$\.numbered_children\[0\]: 'layers\.N' must contain \{n\}",
        ),
        (
            "models/flux1.yaml",
            'targets: ["norm_out.linear"], permute: swap_halves}',
            'targets: ["norm_out.linear"], permute: swap}',
            r"models/flux1\.yaml: \$\.vocabularies\['bfl'\]\[22\]\.permute: expected one of swap_halves, got 'swap'",
        ),
        (
            "models/flux1.yaml",
            'targets: ["norm_out.linear"], permute: swap_halves}',
            'targets: ["norm_out.linear", "proj_out"], permute: swap_halves}',
            r"\$\.vocabularies\['bfl'\]\[22\]\.permute: swap_halves needs exactly one target",
        ),
        (
            "models/flux1.yaml",
            '{source: "x_embedder", targets: ["x_embedder"]}',
            '{source: "x_embedder", targets: []}',
            r"\$\.vocabularies\['diffusers'\]\[20\]\.targets: expected `array` of length >= 1",
        ),
        ("formats/kohya.yaml", "tensors:", "tensors: [\n", r"formats/kohya\.yaml: not valid YAML"),
    ],
)
def test_a_broken_keymap_names_its_file_and_the_path_inside_it(keymap_copy, file, old, new, message) -> None:
    _edit(keymap_copy / file, old, new)
    with pytest.raises(KeymapError, match=message) as err:
        load_keymaps(keymap_copy)
    assert err.value.code == "keymap_error"
    assert err.value.details["path"] == str(keymap_copy / file)
    assert err.value.message.startswith(str(keymap_copy / file))


def test_the_remap_reads_its_formats_from_the_same_folder(keymap_copy) -> None:
    """A remap is derived from the folder's formats: change kohya's written suffix and the remap follows."""
    _edit(
        keymap_copy / "formats" / "kohya.yaml",
        "  lora_down.weight: down\n",
        "  lora_down: down\n  lora_down.weight: down\n",
    )
    keymap = load_remap_keymap("mlx_examples_flux", keymap_copy)
    assert keymap.suffixes["down"] == ".lora_down"
    assert all(re.search(r"\.lora_(down|up\.weight)$", r.target) for r in keymap.rules)
