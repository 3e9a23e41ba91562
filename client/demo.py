"""`make demo`: the whole product in a few minutes on a laptop-class CPU.

Generates the example packs' LoRA files, starts `easel serve` on the tiny preset, batch-renders a few items
of every example world (both world forms: inheriting and exclude/add) through the client at reduced size,
prints each world's stack with the keys each LoRA really applied, names the contact sheets, and stops the
daemon cleanly (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.batch import BatchResult, plan_batch, run_batch, summary_lines
from client.client import RenderClient
from client.contact_sheet import Tile, render_sheet, write_contact_sheet, write_png
from client.packs import genre_dirs, world_names
from client.packs.example_loras import make_pack_loras
from client.packs.load import read_world_style
from client.wire.errors import DaemonUnavailable, EaselError, Timeout

REPO = Path(__file__).resolve().parents[1]
PACKS = REPO / "genre_packs"
DEFAULT_OUT = REPO / "demo-out"


@dataclass
class DaemonProcess:
    """`easel serve` as a child process: started, waited for until it answers, stopped cleanly."""

    socket_path: Path
    lora_roots: Sequence[Path]
    output_root: Path
    preset: str = "tiny"
    ready_timeout_s: float = 600.0
    echo: bool = True
    options: Sequence[str] = ()  # more `easel serve` options, as on its command line
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-c", "from client.cli import main; main()", "serve", "--preset", self.preset]
        cmd += ["--socket", str(self.socket_path), "--output-root", str(self.output_root)]
        for root in self.lora_roots:
            cmd += ["--lora-root", str(root)]
        return cmd + list(self.options)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self.echo:
                print(f"  [daemon] {line.rstrip()}", flush=True)

    def start(self) -> DaemonProcess:
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            start_new_session=True,  # Ctrl-C in the terminal reaches us; we stop the daemon ourselves
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = "\n".join(self.lines[-20:])
                raise DaemonUnavailable(
                    f"`easel serve` exited with {self.proc.returncode} before it was ready:\n{tail}"
                )
            with contextlib.suppress(DaemonUnavailable, Timeout), RenderClient(self.socket_path, timeout=2.0) as c:
                c.ping()
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise Timeout(f"the daemon was not ready within {self.ready_timeout_s:.0f}s")
            time.sleep(0.5)

    def stop(self, wait_s: float = 60.0) -> int | None:
        """Ask for a drained shutdown; SIGTERM, then SIGKILL, only if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        with contextlib.suppress(EaselError), RenderClient(self.socket_path, timeout=5.0) as c:
            c.shutdown(drain_timeout_s=10.0)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                return self.proc.wait(wait_s if sig is None else 15.0)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def short_socket_dir() -> Iterator[Path]:
    """Unix socket paths are limited to ~100 bytes: keep the socket in a short private temp dir."""
    with tempfile.TemporaryDirectory(prefix="easel-demo-", dir="/tmp") as d:
        os.chmod(d, 0o700)
        yield Path(d)


@dataclass(frozen=True)
class DemoSettings:
    out: Path = DEFAULT_OUT
    size: int = 64
    steps: int = 2
    per_kind: int = 1
    kinds: tuple[str, ...] = ("poi", "portrait", "creature")
    worlds: tuple[tuple[str, str], ...] | None = None  # None: every example world
    progress: bool = True


def example_worlds(packs_root: Path = PACKS) -> list[tuple[str, str]]:
    return [(g.name, w) for g in genre_dirs(packs_root) for w in world_names(g)]


def render_worlds(client: RenderClient, settings: DemoSettings, packs_root: Path = PACKS) -> list[BatchResult]:
    """One small batch per world and kind, through the daemon, each with its contact sheet."""
    results = []
    for genre, world in settings.worlds or example_worlds(packs_root):
        for kind in settings.kinds:
            plan = plan_batch(
                packs_root, genre, world, kind, settings.out / "batch",
                width=settings.size, height=settings.size, steps=settings.steps, limit=settings.per_kind,
            )  # fmt: skip
            result = run_batch(plan, client, progress=settings.progress)
            result.contact_sheet_path = write_contact_sheet(result)
            results.append(result)
    return results


def world_form(genre: str, world: str, packs_root: Path = PACKS) -> str:
    """How the world's visual_style.yaml treats the genre's stack: `exclude/add`, or `inherits` it unchanged."""
    return "exclude/add" if read_world_style(packs_root / genre, world).loras is not None else "inherits"


def print_report(results: Sequence[BatchResult], packs_root: Path = PACKS) -> None:
    print("\n=== summary: stacks and matched keys per world ===")
    last = None
    for r in results:
        p = r.plan
        if (p.genre, p.world) != last:
            last = (p.genre, p.world)
            print(f"\n{p.genre}/{p.world}  (world loras: {world_form(p.genre, p.world, packs_root)})")
        for line in summary_lines(r, paths=False):
            print("  " + line)
    sheets = [r.contact_sheet_path for r in results if r.contact_sheet_path]
    print("\ncontact sheets:")
    for s in sheets:
        print(f"  {s}")


def write_overview_sheet(results: Sequence[BatchResult], path: Path) -> Path | None:
    """One sheet with every render of the demo, captioned world / item, so the worlds compare side by side."""
    tiles = [
        Tile(None if i.status == "failed" else i.item.output_path, f"{r.plan.world} / {i.item.content.name}")
        for r in results
        for i in r.items
    ]
    if not tiles:
        return None
    per_world = max(1, len(tiles) // len({(r.plan.genre, r.plan.world) for r in results}))
    sheet = render_sheet(tiles, "easel demo: every world (tiny preset, reduced size)", columns=min(per_world, 8))
    return write_png(sheet, path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where renders, manifests and sheets go")
    ap.add_argument("--size", type=int, default=64, help="render width and height (reduced for the CPU demo)")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps per render")
    ap.add_argument("--per-kind", type=int, default=1, help="items per world and kind")
    ap.add_argument("--resume", action="store_true", help="keep what an earlier run rendered and skip those items")
    ap.add_argument("--world", action="append", metavar="GENRE/WORLD", help="only these worlds (repeatable)")
    ap.add_argument("--kind", action="append", choices=["poi", "portrait", "creature"], help="only these kinds")
    args = ap.parse_args(argv)

    out = args.out.absolute()
    if not args.resume:  # the demo shows rendering: start from a clean batch directory unless asked not to
        import shutil

        shutil.rmtree(out / "batch", ignore_errors=True)
    worlds = example_worlds()
    if args.world:
        unknown = [w for w in args.world if tuple(w.split("/", 1)) not in worlds]
        if unknown:
            ap.error(f"unknown world(s) {', '.join(unknown)}; examples: {', '.join('/'.join(w) for w in worlds)}")
        worlds = [tuple(w.split("/", 1)) for w in args.world]
    settings = DemoSettings(
        out=out, size=args.size, steps=args.steps, per_kind=args.per_kind, worlds=tuple(worlds),
        kinds=tuple(args.kind or DemoSettings.kinds),
    )  # fmt: skip
    n = len(worlds) * len(settings.kinds) * settings.per_kind
    print(
        f"easel demo: {len(worlds)} worlds x {len(settings.kinds)} kinds x {settings.per_kind} item(s) = {n} renders "
        f"on the tiny preset at REDUCED size {settings.size}x{settings.size}, {settings.steps} steps "
        "(the packs' tier sizes are 768-1024 px; the tiny CPU model takes seconds per step even at 64 px)."
    )
    if args.resume:
        print("--resume: items an earlier demo run rendered are skipped.")
    print()
    made = make_pack_loras(PACKS)
    print(f"LoRA files for the packs: {sum(g.created for g in made)} generated, "
          f"{sum(not g.created for g in made)} already there, under {PACKS / 'lora'}")  # fmt: skip

    t0 = time.monotonic()
    with short_socket_dir() as sock_dir:
        daemon = DaemonProcess(sock_dir / "easel.sock", [PACKS / "lora"], out)
        print(f"starting `easel serve --preset tiny` on {daemon.socket_path} ...", flush=True)
        try:
            daemon.start()
            print(f"daemon ready after {time.monotonic() - t0:.0f}s\n", flush=True)
            with RenderClient(daemon.socket_path, render_timeout=600.0) as client:
                results = render_worlds(client, settings)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the daemon (finished items stay; run again to resume)")
            return 130
        except EaselError as err:
            print(f"\ndemo failed: [{err.code}] {err.message}", file=sys.stderr)
            return 1
        finally:
            rc = daemon.stop()
            print(f"daemon stopped (exit code {rc})")
    print_report(results)
    overview = write_overview_sheet(results, out / "contact_sheet.png")
    if overview:
        print(f"  overview of every world: {overview}")
    failed = sum(r.count("failed") for r in results)
    print(f"\ndone in {time.monotonic() - t0:.0f}s; {failed} failed render(s).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
