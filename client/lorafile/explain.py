"""Why a LoRA file does not apply: what it most likely is, and what would have matched.

Used when a file matches nothing of the model (an unknown format, or every key a leftover): the
explanation goes into the report (`FileReport.explanation`), the zero-match error and `easel lora
inspect`. Three clues, each from data (keymaps/known/*.yaml and keymaps/formats/*.yaml):
- the model family its keys belong to (SD 1.x/SDXL UNet, SD3, FLUX.2, video DiTs, ...);
- a prefix that would have made a known format match (a missing, extra or different prefix);
- the closest known format: the one whose tensor names match most keys.
Files easel recognises but cannot render with (`action: refuse`, e.g. FLUX.1 control LoRAs) are refused
when read, with what they are and why (`refusal`).
"""

from __future__ import annotations

from collections import Counter

from client.lorafile.keymaps import FormatKeymap, KeymapSet, KnownFile

_SAMPLE = 400  # keys looked at for prefix guesses (a file's keys are alike; this bounds the work)


def refusal(keys: list[str], keymaps: KeymapSet) -> tuple[KnownFile, list[str]] | None:
    """The known kind of file easel refuses that these keys are (and the keys that say so), if any."""
    for known in keymaps.known:
        if known.action == "refuse":
            hits = known.matching(keys)
            if hits:
                return known, hits
    return None


def family(keys: list[str], keymaps: KeymapSet) -> tuple[KnownFile, list[str]] | None:
    """The other model family most of these keys belong to, if any key names one."""
    best = max(
        ((k, k.matching(keys)) for k in keymaps.known if k.action == "explain"),
        key=lambda pair: len(pair[1]),
        default=None,
    )
    return best if best is not None and best[1] else None


def _leading(key: str) -> list[str]:
    """The key's possible prefixes: nothing, then its first one and two dotted (or `_`) segments."""
    out = [""]
    for sep in (".", "_"):
        parts = key.split(sep)
        for n in (1, 2):
            if len(parts) > n + 1:
                out.append(sep.join(parts[:n]) + sep)
    return out


def _recognised(fmt: FormatKeymap, key: str) -> bool:
    split = fmt.split_key(key)
    return bool(split and fmt.match_module(split[0]))


def prefix_fix(keys: list[str], keymaps: KeymapSet) -> tuple[FormatKeymap, str, str, int] | None:
    """(format, the prefix the file has, the prefix the format expects, keys it would fix), best first."""
    votes: Counter[tuple[str, str, str]] = Counter()
    formats = {f.name: f for f in keymaps.formats}
    for key in keys[:_SAMPLE]:
        for fmt in keymaps.formats:
            if _recognised(fmt, key):
                continue
            found = False
            for have in _leading(key):
                if not key.startswith(have):
                    continue
                rest = key[len(have) :]
                for want in sorted(fmt.prefixes, key=len):  # the simplest fix first
                    if want != have and _recognised(fmt, want + rest):
                        votes[(fmt.name, have, want)] += 1
                        found = True
                        break
                if found:
                    break
    if not votes:
        return None
    (name, have, want), count = votes.most_common(1)[0]
    return formats[name], have, want, count


def closest_format(keys: list[str], keymaps: KeymapSet) -> tuple[FormatKeymap, int] | None:
    """The format whose tensor names (suffixes) match most keys, if any does."""
    scored = [(f, sum(1 for k in keys if f.split_key(k))) for f in keymaps.formats]
    best = max(scored, key=lambda pair: (pair[1], pair[0].priority), default=None)
    return best if best is not None and best[1] else None


def explain(keys: list[str], keymaps: KeymapSet) -> str:
    """One sentence on why nothing matched (empty when no clue applies)."""
    clues: list[str] = []
    fam = family(keys, keymaps)
    if fam is not None:
        known, hits = fam
        clues.append(f"looks like {known.message} ({len(hits)} of {len(keys)} keys, e.g. {hits[0]}; {known.family})")
    fix = prefix_fix(keys, keymaps)
    if fix is not None:
        fmt, have, want, count = fix
        had = f"prefix {have!r}" if have else "no prefix"
        naming = f"the {fmt.name} naming ({fmt.description})"
        clues.append(f"{count} key(s) would match {naming} with prefix {want!r} in place of {had}")
    near = closest_format(keys, keymaps)
    if near is not None and fix is None:
        fmt, count = near
        clues.append(
            f"closest known format: {fmt.name} ({fmt.description}): its tensor names match {count} key(s), "
            "but not its module names"
        )
    if not clues:
        clues.append("no known LoRA format or model family has keys like these")
    return "; ".join(clues)
