"""Pack files as data: the schema's errors name the file, the path in it and the entry; the flat form is one
migration step; the narrator's fields are declared but never reach a prompt; composing stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.packs import PackError, VisualStyleError, compose_lora_stack, load_items, load_visual_style, migrate_flat
from client.packs.compose import StyleDoc
from client.packs.schema import GenreStyle, WorldStyle, decode
from client.wire.errors import EaselError

REPO = Path(__file__).resolve().parents[2]


def entry(name: str, **kw) -> dict:
    return {"name": name, "file": f"{name}.safetensors", "scale": 0.8, "applies_to": ["landscape"], **kw}


def write_genre(root: Path, style: dict, world: dict | None = None) -> Path:
    gdir = root / "x"
    (gdir / "worlds" / "w").mkdir(parents=True)
    (gdir / "visual_style.yaml").write_text(yaml.safe_dump(style, sort_keys=False))
    if world is not None:
        (gdir / "worlds" / "w" / "visual_style.yaml").write_text(yaml.safe_dump(world, sort_keys=False))
    return gdir


def load_error(gdir: Path, world: str | None = None) -> VisualStyleError:
    with pytest.raises(VisualStyleError) as info:
        load_visual_style(gdir, world, tier="landscape", check_files=False)
    return info.value


def test_a_wrong_type_names_the_file_the_path_and_the_entry(tmp_path):
    gdir = write_genre(tmp_path, {"loras": [entry("a"), entry("b"), entry("c", scale="0.8")]})
    e = load_error(gdir)
    where = f"{gdir / 'visual_style.yaml'}: $.loras[2].scale: expected a number, got '0.8'"
    assert e.message == where + " (entry 'c')"
    assert e.json_path == "$.loras[2].scale" and e.details == {"file": str(gdir / "visual_style.yaml"), "entry": "c"}


def test_an_unknown_key_lists_the_allowed_ones_at_its_real_path(tmp_path):
    gdir = write_genre(tmp_path, {"tiers": {"portrait": {"steps": 3}, "scene": {"step": 3}}})
    e = load_error(gdir)
    assert "$.tiers.scene: unknown key 'step' (allowed: guidance, height, preset, steps, width)" in e.message
    gdir = write_genre(tmp_path / "2", {}, {"loras": {"exclude": [], "replace": []}})
    assert "$.loras: unknown key 'replace' (allowed: add, exclude)" in load_error(gdir, "w").message


def test_values_inside_a_mapping_are_checked_at_their_key(tmp_path):
    gdir = write_genre(tmp_path, {"tiers": {"portrait": {"steps": 3}, "scene": {"steps": 0}}})
    assert "$.tiers.scene.steps: expected an integer >= 1, got 0" in load_error(gdir).message
    gdir = write_genre(tmp_path / "2", {"style_suffix": {"portrait": "ok", "scene": ["a", "list"]}})
    assert "$.style_suffix.scene: expected a string, got ['a', 'list']" in load_error(gdir).message


def test_rule_errors_carry_a_path_too(tmp_path):
    gdir = write_genre(tmp_path, {"loras": [entry("a")]}, {"loras": {"exclude": ["b"], "add": [entry("a")]}})
    e = load_error(gdir, "w")
    assert e.json_path == "$.loras.exclude[0]" and "names nothing" in e.message
    gdir = write_genre(tmp_path / "2", {"loras": [entry("a", applies_to=["landscape", "tarot"])]})
    assert load_error(gdir).json_path == "$.loras[0].applies_to[1]"


def test_both_level_shapes_are_refused_with_a_hint_not_inherited(tmp_path):
    genre = decode({"loras": {"add": []}}, GenreStyle, source="g.yaml")
    world = decode({"loras": [entry("a")]}, WorldStyle, source="w.yaml")
    assert isinstance(genre.loras, dict) and isinstance(world.loras, list)  # read, so the rule can explain
    with pytest.raises(VisualStyleError, match="exclude/add is world-level"):
        compose_lora_stack(StyleDoc({"loras": {"add": []}}, "g.yaml"), None, None, check_files=False)


def test_flat_form_is_one_migration_step_to_a_one_entry_stack():
    style = decode({"lora": "old/style.safetensors", "lora_scale": 0.7}, GenreStyle, source="g.yaml")
    spec = migrate_flat(style, "g.yaml", ["portrait", "landscape"])
    assert (spec.name, spec.file, spec.scale, spec.applies_to) == (
        "style",
        "old/style.safetensors",
        0.7,
        ["portrait", "landscape"],
    )
    assert migrate_flat(decode({"lora": "a.safetensors"}, GenreStyle, source="g.yaml"), "g.yaml", ["x"]).scale == 1.0
    assert migrate_flat(decode({"loras": [entry("a")]}, GenreStyle, source="g.yaml"), "g.yaml", ["x"]) is None
    with pytest.raises(VisualStyleError, match="both"):
        migrate_flat(decode({"lora": "a.safetensors", "loras": []}, GenreStyle, source="g.yaml"), "g.yaml", ["x"])
    with pytest.raises(VisualStyleError, match=r"g.yaml: \$: 'lora_scale' must be a finite number, got nan"):
        decode(
            {"lora": "a.safetensors", "lora_scale": float("nan")}, GenreStyle, source="g.yaml", error=VisualStyleError
        )


def test_a_flat_world_over_a_flat_genre_replaces_its_lora():
    stack = compose_lora_stack(
        StyleDoc({"lora": "genre.safetensors", "lora_scale": 0.7}, "g.yaml"),
        StyleDoc({"lora": "world.safetensors", "lora_scale": 0.4}, "w.yaml"),
        "portrait",
        lora_root="/r",
        check_files=False,
    )
    assert (stack.lora_paths, stack.lora_scales) == (["/r/world.safetensors"], [0.4])
    assert stack.active[0].origin == "w.yaml"


def test_a_flat_missing_file_is_named_at_the_flat_key(tmp_path):
    with pytest.raises(VisualStyleError) as info:
        compose_lora_stack(StyleDoc({"lora": "gone.safetensors"}, "g.yaml"), None, None, lora_root=tmp_path)
    assert info.value.json_path == "$.lora" and "does not exist" in info.value.message


# ------------------------------------------------------------------------------------------- content


def test_content_typos_are_errors_and_narrator_fields_are_declared(tmp_path):
    (tmp_path / "pois.yaml").write_text(
        yaml.safe_dump({"pois": [{"name": "Well", "description": "a well", "secret": "NARRATOR-ONLY"},
                                 {"name": "Mill", "description": "a mill", "visual_promt": "typo"}]})
    )  # fmt: skip
    with pytest.raises(PackError) as info:
        load_items(tmp_path, "poi")
    assert f"{tmp_path / 'pois.yaml'}: $.pois[1]: unknown key 'visual_promt'" in info.value.message
    assert info.value.details == {"file": str(tmp_path / "pois.yaml"), "entry": "Mill"}


def test_content_top_level_is_checked(tmp_path):
    (tmp_path / "creatures.yaml").write_text(yaml.safe_dump({"creature": []}))
    with pytest.raises(PackError, match=r"creatures.yaml: \$: unknown key 'creature' \(allowed: creatures\)"):
        load_items(tmp_path, "creature")


def test_every_example_pack_file_decodes():
    for gdir in sorted((REPO / "genre_packs").iterdir()):
        if not (gdir / "visual_style.yaml").is_file():
            continue
        for world in sorted(p.name for p in (gdir / "worlds").iterdir()):
            load_visual_style(gdir, world, tier="portrait", check_files=False)
            for kind in ("poi", "portrait", "creature"):
                assert load_items(gdir / "worlds" / world, kind)


# ------------------------------------------------------------------------------------------- errors, weight


def test_pack_errors_live_in_the_packs_room_with_their_codes():
    import client.wire.errors as wire_errors

    assert (PackError.code, VisualStyleError.code) == ("pack_error", "visual_style")
    assert issubclass(VisualStyleError, PackError) and issubclass(PackError, EaselError)
    assert not hasattr(wire_errors, "PackError") and not hasattr(wire_errors, "VisualStyleError")


def test_composing_a_stack_loads_no_numpy_mlx_or_blas():
    code = (
        "import sys\n"
        "from client.packs import load_visual_style, apply_triggers\n"
        "s = load_visual_style('genre_packs/spaghetti_western', 'the_real_mccoy', tier='portrait', check_files=False)\n"
        "assert s.stack.lora_paths and apply_triggers('x', s.stack.triggers)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'mlx', 'mflux', 'PIL', 'safetensors'))\n"
        "maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''\n"
        "print(heavy, 'blas' in maps.lower())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False", out.stdout + out.stderr


def test_a_key_that_is_not_a_name_is_named_where_it_is(tmp_path):
    gdir = write_genre(tmp_path, {"tiers": {1: {"steps": 2}}})
    assert load_error(gdir).message.endswith("visual_style.yaml: $.tiers: keys must be names (strings), got 1")
