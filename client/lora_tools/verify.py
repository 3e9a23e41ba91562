"""`easel lora verify`: the gate a LoRA must pass before it ships, rendered through the running daemon.

Checks (thresholds configurable):
  1. key match: keys that reached the model / keys in the file; 0 fails, under 80% fails;
  2. SSIM(LoRA render, no-LoRA render) at the same prompt and seed must be below 0.999 (the LoRA does
     something visible);
  3. with a trigger: SSIM(trigger prompt, control prompt), both with the LoRA, below 0.97 (the trigger
     word does something);
  4. a report (markdown + self-contained HTML with the pictures and numbers) that always gets written.
The numbers come from the daemon's own stack report and from its renders: nothing is inferred.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from client.contact_sheet import labelled_sheet
from client.fs import atomic_write_bytes, atomic_write_text
from client.lora_tools.images import ssim
from client.renderer import Renderer
from client.wire.errors import EaselError, LoraError, PathNotAllowed

DEFAULT_PROMPT = "a lone rider crossing a desert town at dusk"


@dataclass(frozen=True)
class Thresholds:
    min_match_ratio: float = 0.8
    max_ssim_lora: float = 0.999
    max_ssim_trigger: float = 0.97


@dataclass(frozen=True)
class VerifyConfig:
    prompt: str = DEFAULT_PROMPT
    control_prompt: str | None = None  # default: the prompt itself (the trigger prompt adds the trigger)
    trigger: str | None = None
    seed: int = 7
    tier: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    scale: float = 1.0
    thresholds: Thresholds = Thresholds()

    @property
    def trigger_prompt(self) -> str:
        return f"{self.trigger}, {self.prompt}" if self.trigger else self.prompt

    def render_fields(self) -> dict[str, Any]:
        fields = {"seed": self.seed, "tier": self.tier, "width": self.width, "height": self.height}
        fields["steps"] = self.steps
        return {k: v for k, v in fields.items() if v is not None}


@dataclass
class CheckResult:
    number: int
    name: str
    passed: bool
    value: float | None
    threshold: str
    detail: str
    skipped: bool = False

    @property
    def verdict(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")


@dataclass
class VerifyResult:
    file: str
    sha256: str
    date: str
    config: VerifyConfig
    checks: list[CheckResult]
    keys_applied: int | None
    keys_total: int | None
    ssim_lora: float | None
    ssim_trigger: float | None
    images: dict[str, str] = field(default_factory=dict)  # role -> file name inside the report dir
    preset: str | None = None
    errors: list[str] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)  # keys that did not reach the model, with reasons

    @property
    def passed(self) -> bool:
        return all(c.passed or c.skipped for c in self.checks)

    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not (c.passed or c.skipped)]

    def block(self) -> dict[str, Any]:
        """The verification block recorded in a genre's LoRA manifest."""
        return {
            "passed": self.passed,
            "date": self.date,
            "sha256": self.sha256,
            "keys_applied": self.keys_applied,
            "keys_total": self.keys_total,
            "match_ratio": _ratio(self.keys_applied, self.keys_total),
            "ssim_lora_vs_base": _round(self.ssim_lora),
            "ssim_trigger_vs_control": _round(self.ssim_trigger),
            "thresholds": asdict(self.config.thresholds),
            "preset": self.preset,
            "seed": self.config.seed,
            "tier": self.config.tier,
            "prompt": self.config.prompt,
            "trigger": self.config.trigger,
        }

    def to_json(self) -> str:
        data = {"file": self.file, **self.block(), "checks": [asdict(c) | {"verdict": c.verdict} for c in self.checks]}
        data["images"] = self.images
        data["errors"] = self.errors
        data["leftover"] = self.leftover
        return json.dumps(data, indent=2)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def _ratio(applied: int | None, total: int | None) -> float | None:
    return None if applied is None or not total else round(applied / total, 6)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- pure check evaluation ----------------------------------------------------------------------


def check_key_match(applied: int | None, total: int | None, t: Thresholds, error: str | None = None) -> CheckResult:
    need = f">= {t.min_match_ratio:.0%} of keys, > 0"
    if applied is None or total is None:
        return CheckResult(1, "key match", False, None, need, f"no stack report: {error or 'render failed'}")
    ratio = applied / total if total else 0.0
    if applied == 0:
        detail = f"0 of {total} keys reached the model (the LoRA matches nothing)"
        return CheckResult(1, "key match", False, ratio, need, detail)
    ok = ratio >= t.min_match_ratio
    detail = f"{applied} of {total} keys reached the model ({ratio:.1%})"
    return CheckResult(1, "key match", ok, ratio, need, detail if ok else detail + f", under {t.min_match_ratio:.0%}")


def check_ssim(
    number: int, name: str, value: float | None, limit: float, what: str, refused: str | None = None
) -> CheckResult:
    """`what` compared by SSIM; `refused`: the LoRA itself was refused, so nothing was rendered to compare."""
    need = f"SSIM < {limit}"
    if refused is not None:
        return CheckResult(number, name, False, None, need, f"not rendered: the daemon refused the LoRA ({refused})")
    if value is None:
        return CheckResult(number, name, False, None, need, f"{what}: not both made (a render failed)")
    ok = value < limit
    verdict = "differ enough" if ok else "are (nearly) identical"
    return CheckResult(number, name, ok, value, need, f"SSIM {value:.6f}: {what} {verdict}")


# ---- running it against the daemon --------------------------------------------------------------


def _image_of(result: Any) -> Image.Image:
    data = getattr(result, "image_bytes", None)
    if data:
        return Image.open(io.BytesIO(data)).convert("RGB")
    path = getattr(result, "image_path", None)
    if path:
        with Image.open(path) as im:
            return im.convert("RGB")
    raise EaselError("the daemon returned neither image bytes nor an image path")


def _stack_counts(result: Any) -> tuple[int, int]:
    entry = result.stack[0]
    return int(entry.keys_applied), int(entry.keys_total)


def run_verification(
    client: Renderer, lora: str | os.PathLike[str], config: VerifyConfig, out_dir: Path
) -> VerifyResult:
    """Render what the checks need, save the pictures and the reports in `out_dir`, return the verdict."""
    lora_path = str(Path(lora).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    t = config.thresholds
    fields = config.render_fields()
    errors: list[str] = []
    images: dict[str, Image.Image] = {}
    applied = total = None
    preset = None
    leftover: list[str] = []
    refused: str | None = None  # the daemon's refusal of the file itself: no comparison can be rendered

    def render(role: str, prompt: str, with_lora: bool) -> Image.Image | None:
        nonlocal applied, total, preset, refused
        try:
            r = client.send_render(
                prompt,
                lora_paths=[lora_path] if with_lora else [],
                lora_scales=[config.scale] if with_lora else [],
                zero_match="warn",
                return_bytes=True,
                **fields,
            )
        except EaselError as exc:
            errors.append(f"{role}: [{exc.code}] {exc.message}")
            if isinstance(exc, LoraError) and exc.code == "lora_zero_match":
                applied, total = 0, int(exc.details.get("keys_total") or 0) or None
            elif with_lora and isinstance(exc, LoraError | PathNotAllowed):
                refused = exc.code
            return None
        preset = getattr(r, "preset", preset)
        if with_lora and r.stack:
            applied, total = _stack_counts(r)
            leftover[:] = [f"{key}: {reason}" for key, reason in r.stack[0].leftover]
        image = _image_of(r)
        images[role] = image
        return image

    main_prompt = config.trigger_prompt
    lora_img = render("lora", main_prompt, True)
    # A file the daemon refuses (missing, corrupt, unsupported, outside its roots) fails every check:
    # the renders without it would compare with nothing.
    base_img = render("base", main_prompt, False) if refused is None else None
    control_img = None
    if config.trigger and refused is None:
        control_img = render("control", config.control_prompt or config.prompt, True)

    checks = [check_key_match(applied, total, t, errors[0] if errors else None)]
    ssim_lora = ssim(lora_img, base_img) if lora_img is not None and base_img is not None else None
    checks.append(check_ssim(2, "LoRA vs no LoRA", ssim_lora, t.max_ssim_lora, "the LoRA and no-LoRA renders", refused))
    ssim_trigger = None
    if config.trigger:
        if lora_img is not None and control_img is not None:
            ssim_trigger = ssim(lora_img, control_img)
        checks.append(
            check_ssim(
                3, "trigger vs control", ssim_trigger, t.max_ssim_trigger, "the trigger and control renders", refused
            )
        )
    else:
        checks.append(
            CheckResult(3, "trigger vs control", True, None, f"SSIM < {t.max_ssim_trigger}", "no trigger", True)
        )

    result = VerifyResult(
        file=lora_path,
        sha256=file_sha256(lora_path),
        date=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        config=config,
        checks=checks,
        keys_applied=applied,
        keys_total=total,
        ssim_lora=ssim_lora,
        ssim_trigger=ssim_trigger,
        preset=preset,
        errors=errors,
        leftover=leftover,
    )
    write_report(result, images, out_dir)
    return result


# ---- the report ---------------------------------------------------------------------------------

_CAPTIONS = {
    "base": "no LoRA",
    "lora": "with LoRA",
    "control": "LoRA, control prompt",
}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_report(result: VerifyResult, images: dict[str, Image.Image], out_dir: Path) -> dict[str, Path]:
    """Pictures, a contact sheet of the gate renders, report.md, report.html and result.json, atomically."""
    written: dict[str, Path] = {}
    order = [r for r in ("base", "lora", "control") if r in images]
    for role in order:
        name = f"{role}.png"
        atomic_write_bytes(out_dir / name, _png(images[role]))
        result.images[role] = name
    if order:
        labels = [_CAPTIONS[r] for r in order]
        if result.config.trigger and "lora" in images:
            labels[order.index("lora")] = "LoRA, trigger prompt"
        sheet = labelled_sheet([[images[r] for r in order]], labels, [Path(result.file).name])
        atomic_write_bytes(out_dir / "contact.png", _png(sheet))
        result.images["contact"] = "contact.png"
    md = render_markdown(result)
    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.html", render_html(result, out_dir))
    atomic_write_text(out_dir / "result.json", result.to_json())
    for name in ("report.md", "report.html", "result.json", *result.images.values()):
        written[name] = out_dir / name
    return written


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6f}"


def render_markdown(result: VerifyResult) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    c = result.config
    lines = [
        f"# LoRA verification: {Path(result.file).name} — {verdict}",
        "",
        f"- file: `{result.file}`",
        f"- sha256: `{result.sha256}`",
        f"- date: {result.date}",
        f"- preset: {result.preset or 'n/a'}, seed {c.seed}, tier {c.tier or 'default'}, scale {c.scale}",
        f"- prompt: {c.prompt!r}" + (f", trigger {c.trigger!r}" if c.trigger else ""),
        "",
        "| # | check | verdict | value | needs | detail |",
        "| - | ----- | ------- | ----- | ----- | ------ |",
    ]
    for ch in result.checks:
        lines.append(
            f"| {ch.number} | {ch.name} | **{ch.verdict}** | {_fmt(ch.value)} | {ch.threshold} | {ch.detail} |"
        )
    failed = result.failed_checks()
    lines += [
        "",
        "Failed: " + ", ".join(f"check {ch.number} ({ch.name})" for ch in failed) if failed else "All checks passed.",
    ]
    if result.errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result.errors]
    if result.leftover:
        lines += ["", f"## Keys that did not reach the model ({len(result.leftover)})", ""]
        lines += [f"- {x}" for x in result.leftover[:20]] + (["- ..."] if len(result.leftover) > 20 else [])
    if result.images:
        lines += ["", "## Renders", ""]
        for role, name in result.images.items():
            lines.append(f"![{role}]({name})")
    return "\n".join(lines) + "\n"


def render_html(result: VerifyResult, out_dir: Path) -> str:
    """A self-contained page: the same table, pictures embedded as data URIs."""
    verdict = "PASS" if result.passed else "FAIL"
    rows = "".join(
        f"<tr class='{ch.verdict.lower()}'><td>{ch.number}</td><td>{html.escape(ch.name)}</td><td><b>{ch.verdict}</b>"
        f"</td><td>{_fmt(ch.value)}</td><td>{html.escape(ch.threshold)}</td><td>{html.escape(ch.detail)}</td></tr>"
        for ch in result.checks
    )
    pics = ""
    for role, name in result.images.items():
        path = out_dir / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            pics += (
                f"<figure><img alt='{role}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(role)}</figcaption></figure>"
            )
    items = "".join(f"<li>{html.escape(e)}</li>" for e in result.errors + result.leftover[:20])
    errors = f"<h2>Errors and keys that did not reach the model</h2><ul>{items}</ul>" if items else ""
    return (
        "<!doctype html><meta charset='utf-8'>"
        f"<title>LoRA verification {html.escape(Path(result.file).name)}: {verdict}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "table{border-collapse:collapse}.fail{background:#fdd}.pass{background:#dfd}img{image-rendering:pixelated;"
        "min-width:128px}figure{display:inline-block;margin:0 1em 1em 0}</style>"
        f"<h1>{html.escape(Path(result.file).name)}: {verdict}</h1>"
        f"<p>sha256 <code>{result.sha256}</code><br>date {result.date}<br>preset {html.escape(str(result.preset))}, "
        f"seed {result.config.seed}, tier {html.escape(str(result.config.tier or 'default'))}</p>"
        f"<table><tr><th>#</th><th>check</th><th>verdict</th><th>value</th><th>needs</th><th>detail</th></tr>{rows}"
        f"</table>{errors}<h2>Renders</h2>{pics}"
    )
