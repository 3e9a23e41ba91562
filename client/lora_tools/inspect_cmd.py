"""What `easel lora inspect` prints (its command is in client/cli/lora.py): a LoRA file's format and key
accounting, no render.

Without --preset it reads the file only (numpy, no MLX); with --preset it resolves every key against
that preset's layer layout (an mflux transformer built lazily: no weights are read), exactly as the
daemon would when applying it. With --daemon the running daemon does it (its `inspect` operation)
against the model it has loaded, under its own LoRA-root confinement.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from client.sizes import describe_byte_size


def format_report(report) -> str:
    """The human-readable form of a FileReport."""
    lines = [f"{report.path}"]
    naming = f" (naming: {report.naming})" if report.naming and report.naming != report.format else ""
    lines.append(f"  format:   {report.format}{naming}")
    ranks = f" (ranks {', '.join(map(str, report.ranks))})" if len(report.ranks) > 1 else ""
    lines.append(f"  rank:     {report.rank if report.rank is not None else '-'}{ranks}")
    alpha = "none stored (factor 1)" if report.alpha is None else f"{report.alpha:g}"
    if len(report.alphas) > 1:
        alpha += f" (alphas {', '.join(f'{a:g}' for a in report.alphas)})"
    lines.append(f"  alpha:    {alpha}")
    lines.append(f"  size:     {describe_byte_size(report.nbytes)} of tensors")
    if report.resolved:
        lines.append(f"  keys:     {report.keys_applied}/{report.keys_total} applied")
        if report.keys_applied_by_part:
            parts = ", ".join(f"{part} {n}" for part, n in report.keys_applied_by_part.items())
            lines.append(f"  parts:    {parts}")
        lines.append(f"  layers:   {report.layers_patched} patched")
        if report.fused_styles:
            styles = ", ".join(f"{k} {v}" for k, v in sorted(report.fused_styles.items()))
            lines.append(f"  modules:  {styles}")
    else:
        lines.append(f"  keys:     {report.keys_total} (not resolved: pass --preset to match against a model)")
    if report.explanation:
        lines.append(f"  why:      {report.explanation}")
    if report.leftover:
        lines.append(f"  leftover: {len(report.leftover)} key(s)")
        by_reason = Counter(reason for _, reason in report.leftover)
        for reason, count in by_reason.most_common():
            example = next(k for k, r in report.leftover if r == reason)
            lines.append(f"    {count:4d} x {reason}")
            lines.append(f"           e.g. {example}")
    return "\n".join(lines)


def inspect_via_daemon(file: str, socket_path: Path | None):
    """The running daemon's report of `file`, resolved against the model it has loaded, and that model's preset."""
    from client.client import RenderClient

    local = Path(file).expanduser()
    with RenderClient(socket_path) as c:
        model = c.status().preset
        return c.inspect(str(local.resolve()) if local.exists() else file), model
