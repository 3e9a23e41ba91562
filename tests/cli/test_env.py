"""One registry of EASEL_* variables (client/env.py): every read goes through it, every variable is in it,
and docs/operations.md shows exactly what it holds."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

from client import env
from client.wire.errors import ERROR_CLASSES, InvalidEnvVar

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"EASEL_[A-Z0-9_]*")
TOKEN = re.compile(r"\bEASEL_[A-Z0-9_]+(?:<[A-Z]+>)?")

# Modules another change converts: each must still read EASEL_* itself (so the entry is removed once it no
# longer does), and nothing else may join the list.
PENDING: dict[str, str] = {}  # module -> why it still reads EASEL_* itself (none left)


def _python_sources() -> list[Path]:
    return [p for root in ("client", "daemon", "keymaps") for p in sorted((REPO / root).rglob("*.py"))]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def direct_reads(path: Path) -> list[str]:
    """String constants that are, or start, an EASEL_* name (what `os.environ[...]`, `.get(...)`, `getenv`
    or `"EASEL_X_" + key` need); names inside prose (help texts, messages, docstrings) are not reads."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        is_text = isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        if is_text and NAME.fullmatch(node.value):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_no_module_reads_easel_variables_around_the_registry():
    offenders, still_pending = {}, set()
    for path in _python_sources():
        rel = path.relative_to(REPO).as_posix()
        if rel == "client/env.py":
            continue
        reads = direct_reads(path)
        if rel in PENDING:
            still_pending.add(rel) if reads else None
        elif reads:
            offenders[rel] = reads
    assert not offenders, f"read these through client/env.py: {offenders}"
    done = set(PENDING) - still_pending
    assert not done, f"no longer reads EASEL_* directly, drop from PENDING: {done}"


def test_the_scan_finds_a_direct_read(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text('"""Reads $EASEL_SOCKET (prose: fine)."""\nimport os\nos.environ.get("EASEL_SOCKET")\n'
                   'x = "EASEL_MODEL_PATH_" + "DEV"\nhelp = "default: $EASEL_SOCKET"\n')  # fmt: skip
    assert direct_reads(bad) == ["3: 'EASEL_SOCKET'", "4: 'EASEL_MODEL_PATH_'"]


def _known(token: str) -> bool:
    if token in env.REGISTRY or any(token in v.deprecated_names for v in env.REGISTRY.values()):
        return True
    if token.endswith("_"):  # a group in prose: EASEL_TRACES_*
        return any(name.startswith(token) for name in env.REGISTRY)
    families = [v.name.partition("<")[0] for v in env.REGISTRY.values() if "<" in v.name]
    return any(token.startswith(prefix) and token != prefix for prefix in families)


def test_every_easel_variable_the_project_mentions_is_registered():
    places = [*_python_sources(), *sorted((REPO / "docs").glob("*.md")), REPO / "README.md",
              *sorted((REPO / "scripts").glob("*.sh")), REPO / "Makefile"]  # fmt: skip
    unknown = {}
    for path in places:
        for token in set(TOKEN.findall(path.read_text())):
            if token.rstrip("_") == "EASEL" or _known(token):
                continue
            unknown.setdefault(token, []).append(path.relative_to(REPO).as_posix())
    assert not unknown, f"mentioned but not in client/env.py: {unknown}"


def test_docs_show_the_registry_as_it_is():
    doc = (REPO / "docs" / "operations.md").read_text()
    start = "<!-- generated from client/env.py (python -m client.env): do not edit by hand -->\n"
    end = "\n<!-- end of generated table -->"
    assert start in doc and end in doc
    table = doc.split(start, 1)[1].split(end, 1)[0]
    assert table == env.markdown_table(), "docs/operations.md is stale: paste the output of `python -m client.env`"
    for name, var in env.REGISTRY.items():
        assert f"`{name}`" in table and var.doc in table


def test_every_variable_has_its_parts():
    assert len(env.REGISTRY) >= 13
    for name, var in env.REGISTRY.items():
        assert name == var.name and name.startswith("EASEL_")
        assert var.doc.strip() and var.values.strip() and var.default_doc.strip() and var.read_by.strip()
        assert "|" not in var.doc + var.values + var.default_doc  # one table cell each


# --- reading ------------------------------------------------------------------------------------------------


def test_unset_and_empty_give_the_default_and_a_value_is_parsed():
    assert env.OUTPUT_ROOT.get({}) == Path("easel-output")
    assert env.OUTPUT_ROOT.get({"EASEL_OUTPUT_ROOT": ""}) == Path("easel-output")
    assert env.OUTPUT_ROOT.get({"EASEL_OUTPUT_ROOT": "~/out"}) == Path.home() / "out"
    assert env.LORA_ROOTS.get({"EASEL_LORA_ROOTS": "/a::/b"}) == (Path("/a"), Path("/b"))
    assert env.LORA_ROOTS.get({}) == ()
    assert env.SOCKET.get({}) is None and not env.SOCKET.is_set({"EASEL_SOCKET": "  "})
    assert env.CACHE_DIR.get({}) == Path.home() / ".cache" / "easel"
    assert env.BLAS.get({"EASEL_BLAS": " bundled "}) == "bundled" and env.BLAS.get({}) == "auto"
    assert env.TRACES_FILE_MAX_BYTES.get({"EASEL_TRACES_FILE_MAX_BYTES": "1024"}) == 1024
    assert env.TRACES_FILE_MAX_BYTES.get({"EASEL_TRACES_FILE_MAX_BYTES": "64M"}) == 64 << 20
    assert env.MEMORY_LIMIT.get({"EASEL_MEMORY_LIMIT": "4.5G"}) == int(4.5 * 2**30)


def test_the_process_environment_is_read_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("EASEL_SOCKET", str(tmp_path / "s.sock"))
    assert env.SOCKET.get() == tmp_path / "s.sock"
    monkeypatch.delenv("EASEL_SOCKET")
    assert env.SOCKET.get() is None


SIZE = "a size in bytes (e.g. 2GiB, 512M or 67108864)"


@pytest.mark.parametrize(
    ("var", "raw", "expected"),
    [
        (env.DTYPE, "fp8", "EASEL_DTYPE must be one of float32, bfloat16, float16, got 'fp8'"),
        (env.TRACES_FILE_MAX_BYTES, "-1", f"EASEL_TRACES_FILE_MAX_BYTES must be {SIZE}, got '-1'"),
        (env.TRACES_FILE_MAX_BYTES, "lots", f"EASEL_TRACES_FILE_MAX_BYTES must be {SIZE}, got 'lots'"),
        (env.TRACES_FILE_MAX_BYTES, "0", "EASEL_TRACES_FILE_MAX_BYTES must be a size of at least 1, got '0'"),
        (env.MEMORY_LIMIT, "12Q", f"EASEL_MEMORY_LIMIT must be {SIZE}, got '12Q'"),
        (env.CUDA, "yes", "EASEL_CUDA must be 0 or 1, got 'yes'"),
    ],
)
def test_a_bad_value_is_an_easel_error_naming_the_variable(var, raw, expected):
    with pytest.raises(InvalidEnvVar) as info:
        var.get({var.name: raw})
    assert info.value.message == expected and info.value.details == {"variable": var.name}
    assert info.value.code == "invalid_env" and ERROR_CLASSES["invalid_env"] is InvalidEnvVar


def test_the_old_spelling_works_with_a_warning_and_the_new_one_wins():
    with pytest.warns(FutureWarning, match="EASEL_LORA_ROOT is deprecated; set EASEL_LORA_ROOTS instead"):
        assert env.LORA_ROOTS.get({"EASEL_LORA_ROOT": "/old"}) == (Path("/old"),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env.LORA_ROOTS.get({"EASEL_LORA_ROOT": "/old", "EASEL_LORA_ROOTS": "/new:/more"}) == (
            Path("/new"),
            Path("/more"),
        )


def test_a_family_names_its_members():
    member = env.PRESET_MODEL_PATH.for_key("krea-dev")
    assert member.name == "EASEL_MODEL_PATH_KREA_DEV"
    assert member.get({"EASEL_MODEL_PATH_KREA_DEV": "/w"}) == Path("/w")
    with pytest.raises(ValueError, match="not a family"):
        env.SOCKET.for_key("x")


# --- the readers use it -------------------------------------------------------------------------------------


def test_the_client_side_readers_follow_the_registry(monkeypatch, tmp_path):
    from client.address import default_socket_path
    from client.cli.batch import default_out
    from client.lorafile.keymaps import default_keymap_dir, shipped_keymap_dir
    from client.packs.load import default_lora_root
    from client.telemetry.config import config_from_env, default_traces_file

    monkeypatch.setenv("EASEL_SOCKET", "~/s.sock")
    assert default_socket_path() == Path.home() / "s.sock"
    monkeypatch.setenv("EASEL_KEYMAPS", str(tmp_path))
    assert default_keymap_dir() == tmp_path
    monkeypatch.delenv("EASEL_KEYMAPS")
    assert default_keymap_dir() == shipped_keymap_dir()
    monkeypatch.setenv("EASEL_OUTPUT_ROOT", str(tmp_path))
    assert default_out() == tmp_path / "batch"
    monkeypatch.delenv("EASEL_LORA_ROOT", raising=False)
    monkeypatch.setenv("EASEL_LORA_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert default_lora_root(tmp_path / "packs" / "g") == tmp_path / "a"
    monkeypatch.delenv("EASEL_LORA_ROOTS")
    assert default_lora_root(tmp_path / "packs" / "g") == tmp_path / "packs"
    assert default_traces_file({"EASEL_TRACES_FILE": "~/t.jsonl"}) == Path.home() / "t.jsonl"
    c = config_from_env("s", {"EASEL_TRACES_FILE": str(tmp_path / "t"), "EASEL_TRACES_FILE_MAX_BYTES": "2048"})
    assert c.traces_file == tmp_path / "t" and "jsonl" in c.trace_exporters and c.traces_file_max_bytes == 2048


def test_promote_ships_into_the_first_lora_root(monkeypatch, tmp_path):
    """`lora verify --promote` without --lora-root ships where the packs resolve `file:` paths: the first of
    $EASEL_LORA_ROOTS (the old EASEL_LORA_ROOT still works), else the packs directory."""
    from client.lora_tools.promote import promote
    from client.lora_tools.verify import CheckResult, VerifyConfig, VerifyResult, file_sha256

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"bytes to hash")
    result = VerifyResult(
        file=str(lora), sha256=file_sha256(lora), date="2025-01-01T00:00:00+00:00", config=VerifyConfig(),
        checks=[CheckResult(1, "key match", True, 1.0, ">= 80%", "26 of 26 keys")], keys_applied=26,
        keys_total=26, ssim_lora=None, ssim_trigger=None,
    )  # fmt: skip
    packs = tmp_path / "packs"
    (packs / "noir").mkdir(parents=True)
    (packs / "noir" / "visual_style.yaml").write_text("loras: []\n")
    monkeypatch.delenv("EASEL_LORA_ROOT", raising=False)
    monkeypatch.setenv("EASEL_LORA_ROOTS", f"{tmp_path / 'first'}:{tmp_path / 'second'}")
    assert promote(result, genre="noir", packs_root=packs).shipped == tmp_path / "first/lora/noir/style.safetensors"
    monkeypatch.delenv("EASEL_LORA_ROOTS")
    monkeypatch.setenv("EASEL_LORA_ROOT", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match="EASEL_LORA_ROOT is deprecated"):
        assert promote(result, genre="noir", packs_root=packs).shipped == tmp_path / "old/lora/noir/style.safetensors"
    monkeypatch.delenv("EASEL_LORA_ROOT")
    assert promote(result, genre="noir", packs_root=packs).shipped == packs / "lora/noir/style.safetensors"
