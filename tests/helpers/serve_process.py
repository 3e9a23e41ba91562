"""A real `easel serve` subprocess for tests that need a daemon of their own (another checkpoint, other flags)."""

from __future__ import annotations

import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from client.client import RenderClient

SERVE = [sys.executable, "-c", "from client.cli import main; main()", "serve"]


class ServeProcess:
    """`easel serve ARGS` with its socket, LoRA root and output root under `root`; `start()` waits for ready."""

    def __init__(self, root: Path, *args: str, lora_root: Path | None = None) -> None:
        self.root = root
        self.socket = root / "run" / "easel.sock"
        self.out = root / "out"
        self.loras = lora_root or root
        self.extra = list(args)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return [*SERVE, "--socket", str(self.socket), "--lora-root", str(self.loras), "--output-root", str(self.out),
                *self.extra]  # fmt: skip

    def start(self, timeout: float = 600) -> ServeProcess:
        self.proc = subprocess.Popen(
            self.args(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"easel serve exited with {self.proc.returncode}: {self.text()}") from None
                continue
            if "ready on" in line:
                return self
        raise RuntimeError("easel serve did not become ready: " + self.text())

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip())
            self.lines.put(line.rstrip())

    def text(self) -> str:
        return "\n".join(self.output)

    def client(self, **kw) -> RenderClient:
        return RenderClient(self.socket, **kw)

    def render(self, prompt: str = "a red fox in snow", **fields) -> np.ndarray:
        fields = {"width": 64, "height": 64, "steps": 1, "seed": 3, **fields}
        with self.client(timeout=600) as c:
            result = c.send_render(prompt, return_bytes=True, **fields)
        return np.asarray(Image.open(io.BytesIO(result.image_bytes)).convert("RGB"))

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        with self.client() as c:
            return c.ping().pong

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with self.client(timeout=30) as c:
                c.shutdown(drain_timeout_s=10)
            self.proc.wait(60)
        except Exception:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
