"""Batches through the real daemon server, scheduler, protocol, socket and RenderClient.

The daemon here renders with the stand-in engine of tests/helpers/daemon_standin.py (flat images, fixed key
counts) so these run in seconds; tests/batch/test_batch_e2e.py repeats the essentials on the tiny model with
the real LoRA patcher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.daemon_standin import InProcessDaemon, make_config
from PIL import Image

from client.batch import plan_batch, run_batch
from client.cli import main as cli
from client.client import RenderClient
from client.demo import DemoSettings, print_report, render_worlds
from client.packs.example_loras import make_pack_loras

pytestmark = pytest.mark.mlx  # starts a daemon: needs the daemon extra

PACKS = Path(__file__).resolve().parents[2] / "genre_packs"


@pytest.fixture()
def packs(tmp_path: Path) -> Path:
    dst = tmp_path / "genre_packs"
    shutil.copytree(PACKS, dst, ignore=shutil.ignore_patterns("lora"))
    make_pack_loras(dst)
    return dst


@pytest.fixture()
def daemon(tmp_path: Path, packs: Path):
    config = make_config(tmp_path, lora_roots=(packs / "lora",), output_root=tmp_path / "out")
    d = InProcessDaemon(config, step_s=0.005).start()
    yield d
    d.stop()


def manifest_of(plan) -> dict:
    return json.loads(plan.manifest_path.read_text())


def test_batch_through_the_daemon_shows_each_worlds_own_stack(daemon, packs, tmp_path):
    out = tmp_path / "out" / "batch"
    with RenderClient(daemon.config.socket_path) as client:
        plans = {
            w: plan_batch(packs, "spaghetti_western", w, "portrait", out, width=64, height=64, steps=2)
            for w in ("dust_and_lead", "the_real_mccoy")
        }
        results = {w: run_batch(p, client, progress=False) for w, p in plans.items()}
    assert all(r.ok for r in results.values())
    dust, mccoy = manifest_of(plans["dust_and_lead"]), manifest_of(plans["the_real_mccoy"])
    for item in dust["items"]:
        assert [f["name"] for f in item["stack_applied"]] == ["spaghetti_western_portrait"]
        assert item["stack_applied"][0]["keys_applied"] == 10  # what the daemon reported, per file
    for item in mccoy["items"]:
        names = [f["name"] for f in item["stack_applied"]]
        assert names == ["the_real_mccoy_portrait", "the_real_mccoy_gunsmoke"]
        assert not any(n.startswith("spaghetti_western") for n in names)
        assert [f["scale"] for f in item["stack_applied"]] == [0.75, 0.4]
        assert item["prompt"].startswith("mccoy_face, ")
        with Image.open(item["output_path"]) as im:
            assert im.size == (64, 64)
    # the daemon saw the same stacks the manifests claim, as live-model switches
    assert ("spaghetti_western_portrait.safetensors", 0.7) in daemon.patcher.switches[0]
    assert (("the_real_mccoy_portrait.safetensors", 0.75), ("the_real_mccoy_gunsmoke.safetensors", 0.4)) in (
        daemon.patcher.switches
    )
    # seeds reached the daemon unchanged
    assert sorted(s.seed for s in daemon.engine.rendered) == sorted(j.seed for p in plans.values() for j in p.items)


def test_second_run_through_the_daemon_renders_nothing(daemon, packs, tmp_path):
    plan = plan_batch(packs, "gothic_horror", "drowned_abbey", "poi", tmp_path / "out" / "b", width=64, height=64,
                      steps=1)  # fmt: skip
    with RenderClient(daemon.config.socket_path) as client:
        first = run_batch(plan, client, progress=False)
        n = len(daemon.engine.rendered)
        second = run_batch(plan, client, progress=False)
    assert first.count("rendered") == len(plan.items) == n
    assert second.count("skipped") == len(plan.items) and len(daemon.engine.rendered) == n


def test_a_lora_the_daemon_rejects_fails_one_item_and_stops_the_batch(daemon, packs, tmp_path):
    zero = packs / "lora" / "gothic_horror" / "zero_match.safetensors"  # the stand-in patcher matches nothing
    shutil.copy(packs / "lora" / "gothic_horror" / "gothic_portrait.safetensors", zero)
    style = packs / "gothic_horror" / "worlds" / "ravenmoor" / "visual_style.yaml"
    style.write_text(
        "loras:\n  add:\n    - {name: zero_match, file: lora/gothic_horror/zero_match.safetensors, scale: 1.0,"
        " applies_to: [portrait]}\n"
    )
    plan = plan_batch(packs, "gothic_horror", "ravenmoor", "portrait", tmp_path / "out" / "z", width=64, height=64,
                      steps=1)  # fmt: skip
    with RenderClient(daemon.config.socket_path) as client:
        result = run_batch(plan, client, progress=False)
    assert [r.status for r in result.items] == ["failed"] + ["pending"] * (len(plan.items) - 1)
    assert len(plan.items) > 1 and daemon.engine.rendered == []
    manifest = manifest_of(plan)
    error = manifest["items"][0]["error"]
    assert error["code"] == "lora_zero_match" and "zero_match" in error["message"]
    assert manifest["stopped_after"] == plan.items[0].content.id


class ClientPerCall:
    """A renderer safe to call from several threads (as a cluster's is): one connection per render."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def send_render(self, prompt, **fields):
        with RenderClient(self.socket_path) as client:
            return client.send_render(prompt, **fields)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_output_folder_the_daemon_refuses_stops_the_batch_at_once(daemon, packs, tmp_path, workers):
    """Every item of a plan writes into one folder: once the daemon refuses an item's output path (outside
    its output root), every other item would be refused too, so the batch stops instead of sending them
    all; they stay pending, listed in the manifest, for a run with another --out."""
    plan = plan_batch(packs, "spaghetti_western", "dust_and_lead", "poi", tmp_path / "elsewhere", width=64,
                      height=64, steps=1)  # fmt: skip
    assert len(plan.items) == 5
    renderer = ClientPerCall(daemon.config.socket_path)
    result = run_batch(plan, renderer, progress=False, workers=workers)
    statuses = [r.status for r in result.items]
    failed = [r for r in result.items if r.status == "failed"]
    assert 1 <= len(failed) <= workers and statuses.count("pending") >= len(plan.items) - workers, statuses
    assert all(r.error["code"] == "path_not_allowed" for r in failed) and not result.ok
    assert daemon.engine.rendered == []
    assert manifest_of(plan)["counts"]["pending"] == statuses.count("pending")


def test_cli_batch_against_the_daemon_and_summary(daemon, packs, tmp_path):
    args = ["batch", "creature", "--genre", "spaghetti_western", "--world", "the_real_mccoy", "--packs", str(packs),
            "--out", str(tmp_path / "out" / "cli"), "--socket", str(daemon.config.socket_path), "--width", "64",
            "--height", "64", "--steps", "1", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "2 rendered, 0 skipped (already done), 0 failed" in res.output
    assert "the_real_mccoy_landscape @ 0.85: 10/10 keys applied" in res.output
    assert "the_real_mccoy_gunsmoke @ 0.4: 10/10 keys applied" in res.output
    assert "contact sheet:" in res.output
    sheet = tmp_path / "out" / "cli" / "spaghetti_western" / "the_real_mccoy" / "creature" / "contact_sheet.png"
    assert sheet.is_file()


def test_a_client_pool_renders_each_thread_on_a_connection_of_its_own(daemon):
    """What `easel batch --workers N` renders through on a socket: N threads, N connections, N renders in
    flight at once (through a cluster gateway, on several replicas)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from client.client import RenderClientPool

    together = threading.Barrier(3)

    def render(i: int):
        together.wait(10)  # three threads at once
        return pool.send_render(f"p{i}", width=64, height=64, steps=2)

    with RenderClientPool(daemon.config.socket_path) as pool, ThreadPoolExecutor(3) as threads:
        results = list(threads.map(render, range(3)))
        again = pool.send_render("main thread", width=64, height=64, steps=1)
    assert len({r.job.split(":")[0] for r in results}) == 3  # job ids are "<connection>:<request>"
    assert again.job.split(":")[0] not in {r.job.split(":")[0] for r in results}
    assert pool._clients == []  # closed


def test_cli_batch_workers_through_a_socket(daemon, packs, tmp_path):
    """`--workers` was read only with --cluster: on a socket it was ignored without a word, one render in
    flight at a time."""
    import threading
    import time

    args = ["batch", "poi", "--genre", "spaghetti_western", "--world", "dust_and_lead", "--packs", str(packs),
            "--out", str(tmp_path / "out" / "w"), "--socket", str(daemon.config.socket_path), "--width", "64",
            "--height", "64", "--steps", "40", "--no-progress", "--workers", "3"]  # fmt: skip
    seen, done = [], threading.Event()

    def watch() -> None:  # how many of the batch's renders the daemon holds at once
        with RenderClient(daemon.config.socket_path) as c:
            while not done.is_set():
                st = c.status()
                seen.append(st.queue_depth + (st.in_flight is not None))
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        done.set()
        watcher.join()
    assert res.exit_code == 0, res.output
    assert max(seen) == 3, seen
    assert "5 rendered, 0 skipped (already done), 0 failed" in res.output
    manifest = json.loads((tmp_path / "out" / "w" / "spaghetti_western" / "dust_and_lead" / "poi" /
                           "manifest.json").read_text())  # fmt: skip
    assert manifest["counts"]["rendered"] == 5 and all(Path(i["output_path"]).is_file() for i in manifest["items"])


def test_cli_batch_without_out_writes_into_the_output_root_the_daemon_reports(daemon, packs, tmp_path, monkeypatch):
    """A daemon started with its own --output-root refuses the client's default folder; without --out the
    batch asks the daemon where its root is, even with $EASEL_OUTPUT_ROOT naming another folder here."""
    monkeypatch.setenv("EASEL_OUTPUT_ROOT", str(tmp_path / "not-the-daemons"))
    args = ["batch", "creature", "--genre", "spaghetti_western", "--world", "the_real_mccoy", "--packs", str(packs),
            "--socket", str(daemon.config.socket_path), "--width", "64", "--height", "64", "--steps", "1",
            "--no-progress"]  # fmt: skip
    dry = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    root = daemon.config.output_root / "batch" / "spaghetti_western" / "the_real_mccoy" / "creature"
    assert str(root) in dry.output and "not-the-daemons" not in dry.output
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "2 rendered, 0 skipped (already done), 0 failed" in res.output
    assert len(list(root.glob("*.png"))) == 3  # two renders and the contact sheet
    assert not (tmp_path / "not-the-daemons").exists()


def test_cli_batch_dry_run_without_a_daemon_plans_into_the_local_default(packs, tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_OUTPUT_ROOT", str(tmp_path / "here"))
    args = ["batch", "poi", "--genre", "spaghetti_western", "--world", "dust_and_lead", "--packs", str(packs),
            "--socket", str(tmp_path / "nobody.sock"), "--dry-run"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "here" / "batch" / "spaghetti_western" / "dust_and_lead" / "poi") in res.output


def test_cli_batch_without_a_daemon_is_a_clear_error_not_a_hang(packs, tmp_path):
    args = ["batch", "poi", "--genre", "spaghetti_western", "--world", "dust_and_lead", "--packs", str(packs),
            "--out", str(tmp_path / "o"), "--socket", str(tmp_path / "nobody.sock"), "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert "daemon_unavailable" in res.output and "easel serve" in res.output


def test_demo_worlds_and_report_through_the_daemon(daemon, packs, tmp_path, capsys):
    settings = DemoSettings(out=tmp_path / "out", size=64, steps=1, per_kind=1, progress=False)
    with RenderClient(daemon.config.socket_path) as client:
        results = render_worlds(client, settings, packs)
    assert len(results) == 4 * 3 and all(r.ok for r in results)
    print_report(results, packs)
    text = capsys.readouterr().out
    assert "spaghetti_western/dust_and_lead  (world loras: inherits)" in text
    assert "spaghetti_western/the_real_mccoy  (world loras: exclude/add)" in text
    assert "drowned_abbey_fog @ 0.8: 10/10 keys applied" in text
    assert text.count("contact_sheet.png") == 12
