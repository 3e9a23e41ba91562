"""The example genre packs and the generated tiny-preset LoRA files they name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from client.cli import main as cli
from client.packs import genre_dirs, load_visual_style, world_names
from client.packs.example_loras import TINY_LORA_MODULES, choose_modules, make_pack_loras

PACKS = Path(__file__).resolve().parents[2] / "genre_packs"


@pytest.fixture()
def packs_copy(tmp_path: Path) -> Path:
    """A copy of the example packs without generated files, so tests never touch the checkout's lora/."""
    dst = tmp_path / "genre_packs"
    shutil.copytree(PACKS, dst, ignore=shutil.ignore_patterns("lora"))
    return dst


def test_a_packs_directory_that_is_not_there_is_a_pack_error_not_a_traceback(tmp_path):
    """`easel packs make-loras --packs <missing>` was a FileNotFoundError traceback."""
    r = CliRunner().invoke(cli, ["packs", "make-loras", "--packs", str(tmp_path / "nope")])
    assert r.exit_code == 1, r.output
    assert f"easel: pack_error: {tmp_path / 'nope'}: no such directory" in r.stderr
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    ("genre", "world", "field", "bad"),
    [
        ("../genre_packs/spaghetti_western", "dust_and_lead", "genre", "../genre_packs/spaghetti_western"),
        ("", "dust_and_lead", "genre", ""),
        ("spaghetti_western", "../../spaghetti_western", "world", "../../spaghetti_western"),
        ("spaghetti_western", "..", "world", ".."),
    ],
)
def test_genre_and_world_are_folder_names_never_paths_reaching_out(packs_copy, tmp_path, genre, world, field, bad):
    """A genre or world is joined to the packs folder and to a batch's --out: `../x` read another folder's
    style as a genre's, and a batch would have written its records and contact sheet outside --out."""
    base = ["--packs", str(packs_copy), "--genre", genre, "--world", world]
    batch = ["batch", "poi", "--out", str(tmp_path / "out"), "--dry-run", "--socket", str(tmp_path / "no.sock")]
    for cmd in (["packs", "show"], batch):
        r = CliRunner().invoke(cli, [*cmd, *base])
        assert r.exit_code == 1, r.output
        said = f"easel: invalid_request: {field} must be one name, not a path or empty, got {bad!r}"
        assert said in r.stderr, r.output
    assert not (tmp_path / "out").exists()


def test_an_unknown_genre_names_the_genres_there(packs_copy):
    r = CliRunner().invoke(cli, ["packs", "show", "--packs", str(packs_copy), "--genre", "noir"])
    assert r.exit_code == 1
    assert f"easel: pack_error: no genre 'noir' in {packs_copy} (genres: gothic_horror, spaghetti_western)" in r.stderr


def test_examples_show_both_world_forms_and_at_least_two_genres():
    genres = {g.name for g in genre_dirs(PACKS)}
    assert {"spaghetti_western", "gothic_horror"} <= genres
    sw = PACKS / "spaghetti_western" / "worlds"
    assert "loras" not in (yaml.safe_load((sw / "dust_and_lead" / "visual_style.yaml").read_text()) or {})
    mccoy = yaml.safe_load((sw / "the_real_mccoy" / "visual_style.yaml").read_text())["loras"]
    assert mccoy["exclude"] and mccoy["add"]


def test_every_world_has_content_with_some_visual_prompts_and_narrator_prose():
    for gdir in genre_dirs(PACKS):
        for world in world_names(gdir):
            wdir = gdir / "worlds" / world
            items = []
            for fname, key in (("pois.yaml", "pois"), ("portraits.yaml", "portraits"), ("creatures.yaml", "creatures")):
                listed = yaml.safe_load((wdir / fname).read_text())[key]
                assert listed and all(i["name"] and i["description"] for i in listed), (wdir, fname)
                items += listed
            assert any("visual_prompt" in i for i in items), wdir
            assert "NARRATOR-ONLY" in (wdir / "world.yaml").read_text()


def test_make_loras_writes_every_named_file_in_kohya_naming_with_tiny_shapes(packs_copy):
    made = make_pack_loras(packs_copy)
    assert len(made) == 10 and all(g.created for g in made)
    for g in made:
        assert g.path.is_relative_to(packs_copy / "lora")
        with safe_open(str(g.path), "numpy") as fh:
            keys = set(fh.keys())
            meta = fh.metadata()
            assert meta["easel.generated"] == "tiny" and meta["ss_network_dim"] == "4"
            modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
            assert modules == set(g.modules) and len(keys) == 3 * len(g.modules)
            for m in modules:
                n_in, n_out = TINY_LORA_MODULES[m]
                assert fh.get_tensor(f"{m}.lora_down.weight").shape == (4, n_in)
                assert fh.get_tensor(f"{m}.lora_up.weight").shape == (n_out, 4)
                assert fh.get_tensor(f"{m}.alpha").shape == ()
    # with the files present, every genre and world loads with the file-existence check on
    for gdir in genre_dirs(packs_copy):
        for world in [None, *world_names(gdir)]:
            load_visual_style(gdir, world, tier="landscape", check_files=True)


def test_generation_is_deterministic_and_idempotent(packs_copy, tmp_path):
    first = {g.path.name: g.path.read_bytes() for g in make_pack_loras(packs_copy)}
    again = make_pack_loras(packs_copy)
    assert not any(g.created for g in again)
    other = make_pack_loras(packs_copy, tmp_path / "other_root")
    for g in other:
        with safe_open(str(g.path), "numpy") as a:
            original = packs_copy / "lora" / g.path.relative_to(tmp_path / "other_root" / "lora")
            with safe_open(str(original), "numpy") as b:
                assert set(a.keys()) == set(b.keys())
                assert all((a.get_tensor(k) == b.get_tensor(k)).all() for k in a.keys())  # noqa: SIM118
    assert set(first) == {g.path.name for g in other}


def test_a_damaged_file_is_rewritten(packs_copy):
    made = make_pack_loras(packs_copy)
    made[0].path.write_bytes(b"\x00" * 16)
    redo = make_pack_loras(packs_copy)
    assert [g.created for g in redo] == [True] + [False] * (len(redo) - 1)
    with safe_open(str(redo[0].path), "numpy") as fh:
        assert len(list(fh.keys())) == 3 * len(redo[0].modules)


def test_module_choice_differs_between_loras():
    picks = {choose_modules(n) for n in ("a", "b", "c", "d", "e", "f")}
    assert len(picks) > 1
    assert all(3 <= len(p) <= len(TINY_LORA_MODULES) for p in picks)


def test_cli_make_loras_and_show(packs_copy):
    runner = CliRunner()
    out = runner.invoke(cli, ["packs", "make-loras", "--packs", str(packs_copy)])
    assert out.exit_code == 0, out.output
    assert "10 written" in out.output
    show = runner.invoke(
        cli,
        ["packs", "show", "--packs", str(packs_copy), "--genre", "spaghetti_western", "--world", "the_real_mccoy",
         "--tier", "portrait"],
    )  # fmt: skip
    assert show.exit_code == 0, show.output
    assert "the_real_mccoy_portrait" in show.output and "spaghetti_western_portrait" not in show.output
    assert "triggers: mccoy_face" in show.output
