"""Stack composition rules of docs/genre_packs.md, each one and each error."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from client.packs import (
    PackError,
    StyleDoc,
    VisualStyleError,
    VisualStyleWarning,
    apply_triggers,
    compose_lora_stack,
    compose_style,
    load_visual_style,
    merge_fields,
    resolve_lora_args,
)


def entry(name: str, tiers=("landscape",), scale=0.8, trigger=None, file=None) -> dict:
    applies = tiers if isinstance(tiers, str) else list(tiers)
    e = {"name": name, "file": file or f"{name}.safetensors", "scale": scale, "applies_to": applies}
    if trigger:
        e["trigger"] = trigger
    return e


GENRE = {
    "loras": [
        entry("land", ["landscape", "scene"], trigger="western"),
        entry("face", ["portrait"], 0.7, trigger="western"),
        entry("ink", ["cartography"], 0.5, trigger="ink"),
    ]
}


def names(stack) -> list[str]:
    return [e.name for e in stack.active]


def compose(genre, world, tier, **kw):
    kw.setdefault("check_files", False)
    return compose_lora_stack(StyleDoc(genre, "genre.yaml"), StyleDoc(world, "world.yaml"), tier, **kw)


# ------------------------------------------------------------------------------------------- composition


def test_world_without_loras_inherits_the_genre_stack_unchanged():
    full = compose(GENRE, {}, None)
    assert [e.name for e in full.entries] == ["land", "face", "ink"]
    assert names(compose(GENRE, {"style_suffix": {"portrait": "x"}}, "landscape")) == ["land"]
    assert names(compose(GENRE, {"loras": None}, "portrait")) == ["face"]


def test_tier_filter_keeps_only_entries_whose_applies_to_has_the_tier():
    assert names(compose(GENRE, {}, "landscape")) == ["land"]
    assert names(compose(GENRE, {}, "scene")) == ["land"]
    assert names(compose(GENRE, {}, "cartography")) == ["ink"]
    assert names(compose(GENRE, {}, "tactical_sketch")) == []


def test_exclude_then_add_in_order_then_tier_filter():
    world = {
        "loras": {
            "exclude": ["land"],
            "add": [entry("w_land", ["landscape", "scene"]), entry("w_smoke", ["scene", "portrait"])],
        }
    }
    assert [e.name for e in compose(GENRE, world, None).entries] == ["face", "ink", "w_land", "w_smoke"]
    assert names(compose(GENRE, world, "scene")) == ["w_land", "w_smoke"]
    assert names(compose(GENRE, world, "portrait")) == ["face", "w_smoke"]


def test_add_may_reuse_a_genre_name_once_it_is_excluded():
    world = {"loras": {"exclude": ["land"], "add": [entry("land", ["landscape"], 0.3)]}}
    stack = compose(GENRE, world, "landscape")
    assert names(stack) == ["land"] and stack.active[0].scale == 0.3
    assert stack.active[0].origin == "world.yaml"


def test_relative_files_resolve_against_the_lora_root_and_absolute_ones_stay(tmp_path):
    genre = {"loras": [entry("a", file="sub/a.safetensors"), entry("b", file=str(tmp_path / "abs.safetensors"))]}
    stack = compose(genre, {}, "landscape", lora_root=tmp_path / "root")
    assert stack.lora_paths == [str(tmp_path / "root" / "sub" / "a.safetensors"), str(tmp_path / "abs.safetensors")]
    assert stack.lora_scales == [0.8, 0.8]


def test_other_fields_overlay_world_over_genre_recursively_but_never_loras():
    g = {"style_suffix": {"portrait": "gp", "landscape": "gl"}, "preferred_model": "dev", **GENRE}
    w = {"style_suffix": {"portrait": "wp"}, "preferred_model": "schnell", "loras": {"exclude": ["ink"]}}
    merged = merge_fields(g, w)
    assert merged == {"style_suffix": {"portrait": "wp", "landscape": "gl"}, "preferred_model": "schnell"}
    style = compose_style(g, w, "portrait", check_files=False)
    assert style.style_suffix() == "wp" and style.style_suffix("landscape") == "gl"
    assert "loras" not in style.fields


def test_tier_settings_overlay_engine_defaults_with_pack_overrides():
    g = {"preferred_model": "dev", "tiers": {"portrait": {"steps": 20}}}
    w = {"tiers": {"portrait": {"guidance": 4.0}}}
    style = compose_style(g, w, "portrait", check_files=False)
    assert style.tier_settings() == {"width": 768, "height": 1024, "steps": 20, "guidance": 4.0, "preset": None}
    assert style.preferred_model == "dev"  # which daemon to use, never forced onto each request
    assert style.tier_settings("text_overlay")["preset"] == "schnell"  # a tier that needs its own model


def test_a_pack_may_define_a_new_tier_with_full_settings():
    tarot = {"width": 512, "height": 896, "steps": 12, "guidance": 3.0}
    g = {"tiers": {"tarot": tarot}, "loras": [entry("t", ["tarot"])]}
    style = compose_style(g, {}, "tarot", check_files=False)
    assert [e.name for e in style.stack.active] == ["t"]
    assert style.tier_settings()["height"] == 896


# ------------------------------------------------------------------------------------------- errors


def err(genre, world=None, tier="landscape", **kw) -> VisualStyleError:
    with pytest.raises(VisualStyleError) as info:
        compose(genre, world or {}, tier, **kw)
    return info.value


@pytest.mark.parametrize("field", ["name", "file", "scale", "applies_to"])
def test_missing_required_field_names_file_entry_and_field(field):
    bad = entry("land")
    del bad[field]
    e = err({"loras": [bad]})
    assert e.details["file"] == "genre.yaml"
    assert field in e.message and "genre.yaml" in e.message
    if field != "name":
        assert e.details["entry"] == "land"


def test_missing_field_in_a_world_add_entry_names_the_world_file():
    bad = entry("w")
    del bad["scale"]
    e = err(GENRE, {"loras": {"add": [bad]}})
    assert e.details == {"file": "world.yaml", "entry": "w"} and "'scale'" in e.message


@pytest.mark.parametrize("scale", ["0.8", True, None, float("nan"), float("inf")])
def test_scale_must_be_a_finite_number(scale):
    assert err({"loras": [entry("land", scale=scale)]}).details["entry"] == "land"


def test_empty_applies_to_is_an_error():
    e = err({"loras": [entry("land", tiers=[])]})
    assert "empty" in e.message and e.details["entry"] == "land"


def test_applies_to_must_be_a_list_of_known_tiers():
    assert "list" in err({"loras": [entry("land", tiers="landscape")]}).message
    assert "unknown tier 'landscap'" in err({"loras": [entry("land", tiers=["landscap"])]}).message


def test_unknown_entry_field_is_an_error_so_typos_do_not_vanish():
    bad = entry("land")
    bad["aplies_to"] = ["portrait"]
    assert "aplies_to" in err({"loras": [bad]}).message


def test_world_loras_written_as_a_list_is_the_old_schema_and_an_error():
    e = err(GENRE, {"loras": [entry("w")]})
    assert e.details["file"] == "world.yaml" and "old schema" in e.message


def test_add_reusing_a_genre_name_without_exclude_is_an_error():
    e = err(GENRE, {"loras": {"add": [entry("land")]}})
    assert e.details == {"file": "world.yaml", "entry": "land"} and "without excluding" in e.message


def test_exclude_naming_nothing_is_an_error():
    e = err(GENRE, {"loras": {"exclude": ["lnad"]}})
    assert e.details == {"file": "world.yaml", "entry": "lnad"} and "names nothing" in e.message


def test_duplicate_names_are_an_error_at_both_levels():
    assert err({"loras": [entry("a"), entry("a")]}).details == {"file": "genre.yaml", "entry": "a"}
    e = err(GENRE, {"loras": {"add": [entry("w"), entry("w")]}})
    assert e.details == {"file": "world.yaml", "entry": "w"} and "duplicate" in e.message


def test_missing_lora_file_is_an_error_naming_entry_and_path(tmp_path):
    (tmp_path / "here.safetensors").write_bytes(b"x")
    genre = {"loras": [entry("ok", file="here.safetensors"), entry("gone", file="gone.safetensors")]}
    e = err(genre, check_files=True, lora_root=tmp_path)
    assert e.details == {"file": "genre.yaml", "entry": "gone"}
    assert str(tmp_path / "gone.safetensors") in e.message


def test_unknown_world_loras_key_and_genre_level_mapping_are_errors():
    assert "unknown key" in err(GENRE, {"loras": {"exclude": [], "replace": []}}).message
    assert "must be a list" in err({"loras": {"add": [entry("a")]}}).message


def test_unknown_render_tier_is_an_error():
    assert "unknown render tier" in err(GENRE, tier="panorama").message


def test_scale_zero_is_allowed_with_a_warning():
    with pytest.warns(VisualStyleWarning, match="scale is 0"):
        stack = compose({"loras": [entry("mute", scale=0)]}, {}, "landscape")
    assert stack.lora_scales == [0.0] and stack.warnings


def test_no_warning_for_ordinary_scales():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compose(GENRE, {}, "landscape")


# ------------------------------------------------------------------------------------------- flat legacy form


def test_flat_form_becomes_a_one_entry_stack_for_every_tier():
    for tier in ("portrait", "landscape", "cartography"):
        stack = compose({"lora": "old/style.safetensors", "lora_scale": 0.7}, {}, tier, lora_root="/loras")
        assert stack.lora_paths == ["/loras/old/style.safetensors"] and stack.lora_scales == [0.7]
        assert names(stack) == ["style"]


def test_flat_and_list_forms_together_are_an_error():
    e = err({"lora": "a.safetensors", "lora_scale": 0.7, **GENRE})
    assert "both" in e.message and e.details["file"] == "genre.yaml"


def test_world_flat_form_over_genre_list_is_an_error_not_a_silent_override():
    e = err(GENRE, {"lora": "w.safetensors", "lora_scale": 0.5})
    assert e.details["file"] == "world.yaml" and "genre.yaml" in e.message


def test_world_exclude_and_add_work_on_a_flat_genre():
    world = {"loras": {"exclude": ["style"], "add": [entry("new", ["portrait"])]}}
    assert names(compose({"lora": "style.safetensors", "lora_scale": 0.7}, world, "portrait")) == ["new"]


def test_flat_scale_must_be_a_number():
    assert "lora_scale" in err({"lora": "a.safetensors", "lora_scale": "high"}).message
    assert "lora:" in err({"lora_scale": 0.5}).message


# ------------------------------------------------------------------------------------------- resolve_lora_args


def test_resolve_lora_args_from_a_resolved_style_and_its_dict(tmp_path):
    style = compose_style(GENRE, {"loras": {"exclude": ["face"]}}, "scene", lora_root=tmp_path, check_files=False)
    paths, scales = resolve_lora_args(style)
    assert paths == [str(tmp_path / "land.safetensors")] and scales == [0.8]
    assert resolve_lora_args(style.to_dict()) == (paths, scales)
    assert resolve_lora_args(style.stack) == (paths, scales)


def test_resolve_lora_args_flat_form_is_a_one_entry_stack():
    assert resolve_lora_args({"lora": "x.safetensors", "lora_scale": 0.7}, lora_root="/r") == (
        ["/r/x.safetensors"],
        [0.7],
    )


def test_resolve_lora_args_with_both_forms_is_an_error():
    with pytest.raises(VisualStyleError, match="both"):
        resolve_lora_args({"lora": "x.safetensors", "lora_scale": 0.7, "lora_stack": [{"path": "/y", "scale": 1}]})
    with pytest.raises(VisualStyleError, match="both"):
        resolve_lora_args({"lora": "x.safetensors", **GENRE})


def test_resolve_lora_args_without_loras_is_empty_and_uncomposed_list_is_refused():
    assert resolve_lora_args({"style_suffix": "x"}) == ([], [])
    with pytest.raises(VisualStyleError, match="compose"):
        resolve_lora_args(GENRE)
    with pytest.raises(VisualStyleError, match="scale"):
        resolve_lora_args({"lora_stack": [{"path": "/y"}]})


# ------------------------------------------------------------------------------------------- triggers


def test_triggers_prepended_in_stack_order_deduplicated():
    world = {"loras": {"add": [entry("w1", ["scene"], trigger="smoke"), entry("w2", ["scene"], trigger="western")]}}
    stack = compose(GENRE, world, "scene")
    assert stack.triggers == ("western", "smoke")
    assert apply_triggers("a saloon", stack.triggers) == "western, smoke, a saloon"


def test_apply_triggers_is_idempotent_and_keeps_a_trigger_the_prompt_already_has():
    once = apply_triggers("a saloon", ["western", "smoke", "western"])
    assert apply_triggers(once, ["western", "smoke"]) == once
    assert apply_triggers("smoke, a saloon", ["western", "smoke"]) == "western, smoke, a saloon"
    assert apply_triggers("a saloon", []) == "a saloon"


def test_entries_without_trigger_add_nothing():
    assert compose({"loras": [entry("a"), entry("b", trigger="t")]}, {}, "landscape").triggers == ("t",)


# ------------------------------------------------------------------------------------------- loading from disk


def write_pack(root: Path, genre: dict, worlds: dict[str, dict | None]) -> Path:
    gdir = root / "g"
    (gdir / "worlds").mkdir(parents=True)
    (gdir / "visual_style.yaml").write_text(yaml.safe_dump(genre))
    for name, style in worlds.items():
        (gdir / "worlds" / name).mkdir()
        if style is not None:
            (gdir / "worlds" / name / "visual_style.yaml").write_text(yaml.safe_dump(style))
    return gdir


def test_load_visual_style_reads_both_files_and_names_the_real_paths(tmp_path):
    gdir = write_pack(tmp_path, GENRE, {"inherit": None, "bad": {"loras": [entry("x")]}})
    style = load_visual_style(gdir, "inherit", tier="portrait", lora_root=tmp_path, check_files=False)
    assert [e.name for e in style.stack.active] == ["face"] and style.genre == "g" and style.world == "inherit"
    with pytest.raises(VisualStyleError) as info:
        load_visual_style(gdir, "bad", tier="portrait", check_files=False)
    assert info.value.details["file"] == str(gdir / "worlds" / "bad" / "visual_style.yaml")


def test_load_visual_style_default_lora_root_is_the_packs_directory_or_the_env(tmp_path, monkeypatch):
    gdir = write_pack(tmp_path, GENRE, {})
    monkeypatch.delenv("EASEL_LORA_ROOT", raising=False)
    assert load_visual_style(gdir, tier="scene", check_files=False).stack.lora_paths == [
        str(tmp_path / "land.safetensors")
    ]
    monkeypatch.setenv("EASEL_LORA_ROOT", str(tmp_path / "elsewhere"))
    assert load_visual_style(gdir, tier="scene", check_files=False).stack.lora_paths == [
        str(tmp_path / "elsewhere" / "land.safetensors")
    ]


def test_load_errors_for_missing_pack_world_and_bad_yaml(tmp_path):
    with pytest.raises(PackError, match="no such file"):
        load_visual_style(tmp_path / "nope")
    gdir = write_pack(tmp_path, GENRE, {"real": None})
    with pytest.raises(PackError, match="no world 'fake'.*real"):
        load_visual_style(gdir, "fake", check_files=False)
    (gdir / "visual_style.yaml").write_text("loras: [unclosed")
    with pytest.raises(VisualStyleError, match="not valid YAML"):
        load_visual_style(gdir, check_files=False)
    (gdir / "visual_style.yaml").write_text("- a list")
    with pytest.raises(VisualStyleError, match="mapping"):
        load_visual_style(gdir, check_files=False)
