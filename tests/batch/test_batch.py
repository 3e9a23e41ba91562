"""Batch planning and running: prompts, seeds, shards, resume, dry-run, manifest and contact sheet.

The renders here go through `PngRenderer`, an in-process stand-in for the daemon that writes a real PNG
per item, so resume and failure handling can be exercised item by item in milliseconds; the same batch
through a real daemon and the tiny model is tests/batch/test_batch_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from client.batch import describe_plan, item_seed, parse_shard, plan_batch, run_batch, shard_items, summary_lines
from client.cli import main as cli
from client.contact_sheet import write_contact_sheet
from client.packs import ContentItem, PackError, base_prompt, compose_prompt, genre_dirs, load_items, world_names
from client.packs.example_loras import make_pack_loras
from client.packs.schema import CONTENT_KINDS as KINDS
from client.wire.errors import DaemonUnavailable, InvalidRequest, LoraZeroMatch, RenderFailed, RenderTooLarge
from client.wire.messages import Event, RenderResult
from client.wire.report import FileReport

PACKS = Path(__file__).resolve().parents[2] / "genre_packs"


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    """The example packs with their LoRA files generated, in a temporary directory."""
    dst = tmp_path_factory.mktemp("packs") / "genre_packs"
    shutil.copytree(PACKS, dst, ignore=shutil.ignore_patterns("lora"))
    make_pack_loras(dst)
    return dst


class PngRenderer:
    """A Renderer without a socket: writes a small real PNG per request, reports every stack file as fully
    applied, counts calls (by item id, the output file's stem)."""

    def __init__(
        self,
        fail_on: set[str] = frozenset(),
        interrupt_after: int | None = None,
        gone_after=None,
        lora_refused=False,
        refused: Exception | None = None,
    ) -> None:
        self.calls: list[str] = []
        self.gone_after = gone_after
        self.fail_on = fail_on  # these items fail alone (their render failed)
        self.lora_refused = lora_refused  # every item's stack is refused (its first file matched nothing)
        self.interrupt_after = interrupt_after
        self.refused = refused  # raised for every item

    def send_render(self, prompt, *, lora_paths=(), lora_scales=(), on_progress=None, **f) -> RenderResult:
        out = Path(f["output_path"])
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        if self.gone_after is not None and len(self.calls) >= self.gone_after:
            raise DaemonUnavailable("the daemon at /x.sock closed the connection")
        self.calls.append(out.stem)
        if out.stem in self.fail_on:
            raise RenderFailed("render failed: RuntimeError: [metal::malloc] out of memory")
        if self.refused is not None:
            raise self.refused
        if self.lora_refused:
            raise LoraZeroMatch(f"{lora_paths[0]} matched zero keys", path=lora_paths[0])
        for step in range(1, f["steps"] + 1):
            if on_progress:
                on_progress(Event(id=1, event="progress", step=step, steps=f["steps"]))
        colour = tuple(f["seed"].to_bytes(4, "big")[:3])
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (f["width"] // 8, f["height"] // 8), colour).save(out)
        stack = [
            FileReport(path=p, scale=s, name=n, format="kohya", keys_total=12, keys_applied=12, layers_patched=4)
            for p, s, n in zip(lora_paths, lora_scales, f["lora_names"], strict=True)
        ]
        return RenderResult(
            width=f["width"], height=f["height"], seed=f["seed"], steps=f["steps"], guidance=f["guidance"],
            preset="tiny", stack=stack, matched_keys=[12] * len(stack), timings={"total": 0.01},
            stack_switched=False, image_path=str(out),
        )  # fmt: skip


def plan(packs: Path, out: Path, world: str = "dust_and_lead", kind: str = "poi", **kw):
    return plan_batch(packs, "spaghetti_western", world, kind, out, width=64, height=64, steps=2, **kw)


# ------------------------------------------------------------------------------------------------ prompts


def test_visual_prompt_is_used_verbatim_else_name_and_description():
    assert base_prompt(ContentItem("poi", "a", "A", "desc", "exact words")) == "exact words"
    assert base_prompt(ContentItem("poi", "a", "Boot Hill", "a graveyard")) == "Boot Hill: a graveyard"


def test_prompt_is_triggers_then_item_then_tier_suffix():
    item = ContentItem("poi", "a", "Boot Hill", "a graveyard")
    assert compose_prompt(item, "film still", ["western", "smoke", "western"]) == (
        "western, smoke, Boot Hill: a graveyard, film still"
    )
    assert compose_prompt(item, "", []) == "Boot Hill: a graveyard"


def test_plan_prompts_use_the_tier_suffix_and_the_worlds_triggers(packs, tmp_path):
    mccoy = plan(packs, tmp_path, "the_real_mccoy")
    crossing = next(j for j in mccoy.items if j.content.id == "copper_creek_crossing")
    assert crossing.prompt == (
        "mccoy_country, cattle drive crossing a shallow copper-green creek, red canyon walls, dust and spray, "
        "red canyon country at golden hour, 2.35:1 framing"
    )
    dust = plan(packs, tmp_path, "dust_and_lead", "portrait")
    assert all(j.prompt.startswith("spaghetti_western, ") for j in dust.items)
    assert all(j.prompt.endswith("extreme close-up, Techniscope film grain, sweat and stubble") for j in dust.items)


def test_narrator_prose_never_reaches_a_prompt(packs, tmp_path):
    for gdir in genre_dirs(packs):
        for world in world_names(gdir):
            wdir = gdir / "worlds" / world
            prose = [c["atmosphere"] for c in yaml.safe_load((wdir / "world.yaml").read_text())["chapters"]]
            for kind, (fname, key, _) in KINDS.items():
                raw = yaml.safe_load((wdir / fname).read_text())[key]
                prose += [
                    v for item in raw for k, v in item.items() if k not in {"name", "description", "visual_prompt"}
                ]
                p = plan_batch(packs, gdir.name, world, kind, tmp_path)
                for job in p.items:
                    assert "NARRATOR-ONLY" not in job.prompt
                    assert not any(text in job.prompt for text in prose)


def test_item_errors_name_the_file_and_item(tmp_path):
    (tmp_path / "pois.yaml").write_text(
        yaml.safe_dump({"pois": [{"name": "A B"}, {"name": "a-b", "description": "x"}]})
    )
    with pytest.raises(PackError, match=r"pois\[0\].*description") as info:
        load_items(tmp_path, "poi")
    assert info.value.details["file"] == str(tmp_path / "pois.yaml")
    (tmp_path / "pois.yaml").write_text(
        yaml.safe_dump({"pois": [{"name": "A B", "description": "x"}, {"name": "a-b", "visual_prompt": "y"}]})
    )
    with pytest.raises(PackError, match="share the output name 'a_b'"):
        load_items(tmp_path, "poi")
    with pytest.raises(PackError, match="no such file"):
        load_items(tmp_path, "creature")
    with pytest.raises(InvalidRequest, match="unknown batch kind"):
        load_items(tmp_path, "vehicle")


# ------------------------------------------------------------------------------------------------ seeds


def test_seed_is_deterministic_per_item_and_independent_of_order_and_shard(packs, tmp_path):
    whole = {j.content.id: j.seed for j in plan(packs, tmp_path).items}
    again = {j.content.id: j.seed for j in plan(packs, tmp_path).items}
    shards = {j.content.id: j.seed for i in (1, 2, 3) for j in plan(packs, tmp_path, shard=(i, 3)).items}
    assert whole == again == shards
    assert len(set(whole.values())) == len(whole)
    assert all(0 <= s < 2**32 for s in whole.values())


def test_seed_depends_on_world_kind_item_and_base():
    s = item_seed("g", "w", "poi", "x")
    assert s == item_seed("g", "w", "poi", "x")
    assert len({s, item_seed("g", "w2", "poi", "x"), item_seed("g", "w", "portrait", "x"),
                item_seed("g", "w", "poi", "y"), item_seed("g", "w", "poi", "x", base_seed=1)}) == 5  # fmt: skip


# ------------------------------------------------------------------------------------------------ shards


@given(st.lists(st.integers(), max_size=60), st.integers(min_value=1, max_value=12))
def test_shards_are_a_disjoint_complete_balanced_partition(items, n):
    tagged = list(enumerate(items))
    parts = [shard_items(tagged, i, n) for i in range(1, n + 1)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == tagged  # complete, and no item twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("spec,expected", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 3 / 3 ", (3, 3)), (None, (1, 1))])
def test_parse_shard_accepts_i_of_n(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1/0", "a/b", "1-2", "1/2/3", "", "/2", "-1/2", "1.5/2"])
def test_parse_shard_rejects_malformed_specs(spec):
    with pytest.raises(InvalidRequest) as info:
        parse_shard(spec)
    assert info.value.field == "shard"


# ------------------------------------------------------------------------------------------------ running


def test_batch_writes_pngs_records_manifest_and_contact_sheet(packs, tmp_path):
    p = plan(packs, tmp_path, "the_real_mccoy", "portrait")
    r = PngRenderer()
    result = run_batch(p, r, progress=False)
    assert write_contact_sheet(result) == p.contact_sheet_path  # what `easel batch` draws after a run
    assert result.ok and result.count("rendered") == len(p.items) == 3
    manifest = json.loads(p.manifest_path.read_text())
    assert manifest["counts"] == {"rendered": 3, "skipped": 0, "failed": 0, "pending": 0}
    assert [e["name"] for e in manifest["stack"]] == ["the_real_mccoy_portrait", "the_real_mccoy_gunsmoke"]
    for item, job in zip(manifest["items"], p.items, strict=True):
        assert item["prompt"] == job.prompt and item["seed"] == job.seed
        assert item["output_path"] == str(job.output_path) and Path(item["output_path"]).is_file()
        assert [f["name"] for f in item["stack_applied"]] == ["the_real_mccoy_portrait", "the_real_mccoy_gunsmoke"]
        assert all(f["keys_applied"] == 12 for f in item["stack_applied"])
        assert json.loads(job.record_path.read_text())["fingerprint"] == job.fingerprint()
    sheet = Image.open(p.contact_sheet_path)
    assert sheet.format == "PNG" and sheet.width > 3 * 192
    colours = np.unique(np.asarray(sheet.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 10  # thumbnails and caption text, not a blank canvas


def test_resume_after_an_interrupted_batch_renders_only_the_rest(packs, tmp_path):
    p = plan(packs, tmp_path)
    first = PngRenderer(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_batch(p, first, progress=False)
    assert first.calls == [j.content.id for j in p.items[:2]]
    second = PngRenderer()
    result = run_batch(p, second, progress=False)
    assert second.calls == [j.content.id for j in p.items[2:]]
    assert result.count("skipped") == 2 and result.count("rendered") == len(p.items) - 2
    third = PngRenderer()
    assert run_batch(p, third, progress=False).count("skipped") == len(p.items) and third.calls == []
    # skipped items keep their stack report in the manifest
    manifest = json.loads(p.manifest_path.read_text())
    assert all(item["stack_applied"] for item in manifest["items"])


def test_resume_renders_again_what_changed_or_lost_its_record(packs, tmp_path):
    p = plan(packs, tmp_path)
    run_batch(p, PngRenderer(), progress=False)
    p.items[0].record_path.unlink()
    changed = plan(packs, tmp_path, base_seed=0, guidance=1.0)  # every fingerprint differs
    r = PngRenderer()
    run_batch(plan(packs, tmp_path), r, progress=False)
    assert r.calls == [p.items[0].content.id]
    r2 = PngRenderer()
    run_batch(changed, r2, progress=False)
    assert r2.calls == [j.content.id for j in changed.items]
    r3 = PngRenderer()
    run_batch(changed, r3, progress=False, resume=False)
    assert len(r3.calls) == len(changed.items)


def test_a_failed_item_is_recorded_and_the_batch_goes_on(packs, tmp_path):
    p = plan(packs, tmp_path)
    bad = p.items[1].content.id
    result = run_batch(p, PngRenderer(fail_on={bad}), progress=False)
    assert not result.ok and result.count("failed") == 1 and result.count("rendered") == len(p.items) - 1
    manifest = json.loads(p.manifest_path.read_text())
    failed = next(i for i in manifest["items"] if i["id"] == bad)
    assert failed["status"] == "failed" and failed["error"]["code"] == "render_failed"
    assert not p.items[1].record_path.exists()
    r = PngRenderer()
    run_batch(p, r, progress=False)  # the next run retries only the failed item
    assert r.calls == [bad]


def test_shards_write_their_own_manifests_and_together_cover_the_world(packs, tmp_path):
    ids = set()
    for i in (1, 2):
        p = plan(packs, tmp_path, shard=(i, 2))
        run_batch(p, PngRenderer(), progress=False)
        assert p.manifest_path.name == f"manifest.shard-{i}-of-2.json"
        ids |= {item["id"] for item in json.loads(p.manifest_path.read_text())["items"]}
    assert ids == {j.content.id for j in plan(packs, tmp_path).items}


def test_stack_per_world_in_the_plan(packs, tmp_path):
    dust = plan(packs, tmp_path, "dust_and_lead", "poi")
    mccoy = plan(packs, tmp_path, "the_real_mccoy", "poi")
    assert [e.name for e in dust.items[0].stack] == ["spaghetti_western_landscape"]
    assert [e.name for e in mccoy.items[0].stack] == ["the_real_mccoy_landscape"]


# ------------------------------------------------------------------------------------------------ cli


def test_dry_run_prints_prompts_and_stacks_and_renders_nothing(packs, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        ["batch", "poi", "--genre", "spaghetti_western", "--world", "the_real_mccoy", "--packs", str(packs),
         "--out", str(out), "--dry-run", "--shard", "2/2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "stack: the_real_mccoy_landscape@0.85" in res.output and "spaghetti_western_landscape" not in res.output
    assert "2 of 4 items, shard 2/2" in res.output
    assert "prompt: mccoy_country, cattle drive crossing" in res.output
    assert not out.exists()


def test_cli_malformed_shard_and_unknown_world_are_clear_errors(packs, tmp_path):
    base = ["batch", "creature", "--genre", "gothic_horror", "--packs", str(packs), "--dry-run"]
    res = CliRunner().invoke(cli, [*base, "--world", "ravenmoor", "--shard", "3/2"])
    assert res.exit_code == 2 and "Invalid value for '--shard': shard '3/2': need 1 <= i <= n" in res.output
    res = CliRunner().invoke(cli, [*base, "--world", "atlantis"])
    assert res.exit_code != 0 and "no world 'atlantis'" in res.output


def test_a_negative_limit_is_refused_not_sliced_from_the_end(packs, tmp_path):
    """`--limit -1` once planned every item but the last (a Python slice)."""
    with pytest.raises(InvalidRequest, match=r"^limit must be >= 0, got -1$"):
        plan(packs, tmp_path, limit=-1)
    assert len(plan(packs, tmp_path, limit=0).items) == 0
    base = ["batch", "poi", "--genre", "spaghetti_western", "--world", "dust_and_lead", "--packs", str(packs)]
    res = CliRunner().invoke(cli, [*base, "--dry-run", "--limit", "-1"])
    assert res.exit_code == 2 and "Invalid value for '--limit': -1 is not in the range x>=0." in res.output


def test_default_out_lies_inside_the_daemons_default_output_root(monkeypatch, tmp_path):
    from client.cli.batch import default_out

    monkeypatch.delenv("EASEL_OUTPUT_ROOT", raising=False)
    assert default_out() == Path("easel-output") / "batch"
    monkeypatch.setenv("EASEL_OUTPUT_ROOT", str(tmp_path))
    assert default_out() == tmp_path / "batch"


def test_a_refused_lora_stack_stops_the_batch_instead_of_failing_every_item(packs, tmp_path):
    """Every item of a plan has the one stack: once the daemon refuses it, the rest are not sent."""
    p = plan(packs, tmp_path)
    r = PngRenderer(lora_refused=True)
    result = run_batch(p, r, progress=False)
    assert r.calls == [p.items[0].content.id]
    assert [x.status for x in result.items] == ["failed"] + ["pending"] * (len(p.items) - 1)
    assert result.stopped_after is result.items[0] and not result.ok
    manifest = json.loads(p.manifest_path.read_text())
    assert manifest["stopped_after"] == p.items[0].content.id
    lines = summary_lines(result, paths=False)
    assert lines[-1] == (
        f"  stopped after {p.items[0].content.name} failed ([lora_zero_match]): the other {len(p.items) - 1} "
        "would fail alike and were not sent; a run after the fix renders them"
    )
    again = PngRenderer()
    run_batch(p, again, progress=False)  # the file fixed: the next run renders every item
    assert again.calls == [j.content.id for j in p.items]


@pytest.mark.parametrize(
    ("refused", "stops"),
    [
        (RenderTooLarge("a 64x64 render needs about 1.0 GiB", field="width", largest_pixels=0), True),
        (InvalidRequest("steps must be within 1..1, got 2", field="steps"), True),
        (InvalidRequest("unknown preset 'dev'", field="preset"), True),
        (InvalidRequest("prompt is 5000 characters; the limit is 4000", field="prompt"), False),
    ],
    ids=["too-large-for-memory", "steps", "preset", "prompt"],
)
def test_a_refused_size_or_setting_every_item_shares_stops_the_batch(packs, tmp_path, refused, stops):
    """Every item of a plan has one size, steps, guidance and preset; its prompt and seed are its own."""
    p = plan(packs, tmp_path)
    r = PngRenderer(refused=refused)
    result = run_batch(p, r, progress=False)
    if stops:
        assert r.calls == [p.items[0].content.id] and result.stopped_after is result.items[0]
        assert [x.status for x in result.items] == ["failed"] + ["pending"] * (len(p.items) - 1)
    else:
        assert len(r.calls) == len(p.items) and result.stopped_after is None
        assert all(x.status == "failed" for x in result.items)


def test_a_vanished_daemon_stops_the_batch_instead_of_failing_every_item(packs, tmp_path):
    p = plan(packs, tmp_path)
    result = run_batch(p, PngRenderer(gone_after=1), progress=False)
    assert [r.status for r in result.items] == ["rendered", "failed"] + ["pending"] * (len(p.items) - 2)
    assert result.items[1].error["code"] == "daemon_unavailable" and not result.ok
    manifest = json.loads(p.manifest_path.read_text())
    assert manifest["counts"] == {"rendered": 1, "skipped": 0, "failed": 1, "pending": len(p.items) - 2}
    assert [i["id"] for i in manifest["items"]] == [j.content.id for j in p.items]  # every item is listed


def test_a_record_of_another_version_is_rendered_again_not_misread(packs, tmp_path):
    p = plan(packs, tmp_path)
    run_batch(p, PngRenderer(), progress=False)
    record = json.loads(p.items[0].record_path.read_text())
    assert record["record_version"] == 2 and record["stack_applied"][0]["layers_patched"] == 4
    record["record_version"] = 1
    p.items[0].record_path.write_text(json.dumps(record))
    p.items[1].record_path.write_text("{not json")
    r = PngRenderer()
    run_batch(p, r, progress=False)
    assert r.calls == [p.items[0].content.id, p.items[1].content.id]


def test_progress_reaches_the_caller_as_steps(packs, tmp_path):
    from client.batch import render_item

    seen: list[tuple[int, int]] = []
    item = plan(packs, tmp_path).items[0]
    outcome = render_item(PngRenderer(), item, lambda step, steps: seen.append((step, steps)))
    assert seen == [(1, 2), (2, 2)] and outcome.seed == item.seed and outcome.image_path == str(item.output_path)


def _new_version(path: str) -> None:
    """The LoRA file at `path` saved again with one weight changed (a retrained file at the same path)."""
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0x01  # a bit of the last tensor's last value: still a valid file
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_bytes(bytes(data))
    tmp.replace(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_renders_again_an_item_whose_lora_file_changed(packs, tmp_path, workers):
    """A LoRA retrained and saved over the same path keeps every item's fingerprint (paths and scales):
    resume once skipped every picture drawn with the old weights."""
    mine = tmp_path / "packs"
    shutil.copytree(packs, mine)
    p = plan(mine, tmp_path / "out")
    (name,) = {e.name for item in p.items for e in item.stack}
    run_batch(p, PngRenderer(), progress=False, workers=workers)
    record = json.loads(p.items[0].record_path.read_text())
    assert len(record["lora_digests"]) == 1 and len(record["lora_digests"][0]) == 32
    same = PngRenderer()
    assert run_batch(p, same, progress=False, workers=workers).count("skipped") == len(p.items) and not same.calls
    listed = json.loads(p.manifest_path.read_text())["items"]  # skipped items list the digests they rendered with
    assert [i["lora_digests"] for i in listed] == [record["lora_digests"]] * len(p.items)

    _new_version(p.items[0].lora_paths[0])
    assert f"[todo: {name} changed since it rendered] {p.items[0].content.id}" in describe_plan(p)
    again = PngRenderer()
    result = run_batch(p, again, progress=False, workers=workers)
    assert sorted(again.calls) == sorted(j.content.id for j in p.items)
    assert all(r.status == "rendered" and r.changed == (name,) for r in result.items)
    assert f"  {len(p.items)} rendered again: {name} changed since they rendered" in summary_lines(result)
    assert json.loads(p.items[0].record_path.read_text())["lora_digests"] != record["lora_digests"]
    after = PngRenderer()
    assert run_batch(p, after, progress=False, workers=workers).count("skipped") == len(p.items) and not after.calls


def test_a_record_without_lora_digests_is_still_finished(packs, tmp_path):
    """Records written before the digests were kept say nothing about their files' versions: trusted."""
    p = plan(packs, tmp_path)
    run_batch(p, PngRenderer(), progress=False)
    record = json.loads(p.items[0].record_path.read_text())
    del record["lora_digests"]
    p.items[0].record_path.write_text(json.dumps(record))
    r = PngRenderer()
    assert run_batch(p, r, progress=False).count("skipped") == len(p.items) and r.calls == []
