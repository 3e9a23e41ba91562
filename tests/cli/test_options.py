"""Options shared by the commands are defined once (client/cli/options.py), old spellings still parse, and
defaults are read from the classes that own them rather than written a second time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from client.cli import main
from client.cli.options import EaselOption

REPO = Path(__file__).resolve().parents[2]


def command(*path: str) -> click.Command:
    cmd: click.Command = main
    for name in path:  # get_command: a daemon command joins through its entry point on first use
        cmd = cmd.get_command(click.Context(cmd), name)  # type: ignore[attr-defined]
    return cmd


def default_of(cmd: click.Command, name: str):
    (param,) = [p for p in cmd.params if p.name == name]
    return param.get_default(click.Context(cmd))


def options_named(flag: str):
    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), (*path, name))
        for p in cmd.params:
            if isinstance(p, click.Option) and flag in p.opts:
                yield path, p

    return list(walk(main, ()))


@pytest.mark.parametrize("flag", ["--socket", "--json", "--packs", "--lora-root", "--width", "--height", "--steps"])
def test_a_shared_option_is_one_definition_on_every_command(flag):
    found = options_named(flag)
    assert len(found) >= 2, found
    kinds = {(p.name, type(p.type), p.is_flag, p.help, tuple(p.opts)) for path, p in found if path[0] != "serve"}
    if flag == "--json":  # each command says what its JSON is; the option is the same
        kinds = {k[:3] + k[4:] for k in kinds}
    assert len(kinds) == 1, kinds
    assert all(isinstance(p, EaselOption) for path, p in found if path[0] != "serve")


def test_json_options_remember_json_mode():
    for _path, p in options_named("--json"):
        assert p.callback is not None and p.callback.__name__ == "_remember_json"


def test_defaults_come_from_their_owners():
    from client.client import DEFAULT_RENDER_TIMEOUT_S
    from client.dataset import DEFAULT_MIN_IMAGES, DEFAULT_MIN_SIDE
    from client.lora_tools.grid import GridSpec
    from client.lora_tools.verify import VerifyConfig

    assert default_of(command("render"), "timeout") == DEFAULT_RENDER_TIMEOUT_S
    assert default_of(command("batch", "poi"), "timeout") == DEFAULT_RENDER_TIMEOUT_S
    cfg = VerifyConfig()
    verify = command("lora", "verify")
    assert default_of(verify, "min_match") == cfg.thresholds.min_match_ratio
    assert default_of(verify, "max_ssim_lora") == cfg.thresholds.max_ssim_lora
    assert default_of(verify, "max_ssim_trigger") == cfg.thresholds.max_ssim_trigger
    assert (default_of(verify, "seed"), default_of(verify, "scale")) == (cfg.seed, cfg.scale)
    spec, grid = GridSpec(prompts=()), command("lora", "grid")
    assert (default_of(grid, "seed"), default_of(grid, "baseline")) == (spec.seed, spec.baseline)
    from client.lora_tools.grid import parse_strengths

    assert parse_strengths(default_of(grid, "strengths")) == spec.strengths
    check = command("dataset", "check")
    assert (default_of(check, "min_images"), default_of(check, "min_side")) == (DEFAULT_MIN_IMAGES, DEFAULT_MIN_SIDE)


def test_help_shows_the_owners_defaults():
    from client.lora_tools.verify import Thresholds

    out = CliRunner().invoke(main, ["lora", "verify", "--help"], terminal_width=200).stdout
    assert f"[default: {Thresholds().min_match_ratio}]" in out and f"[default: {Thresholds().max_ssim_lora}]" in out
    out = CliRunner().invoke(main, ["render", "--help"], terminal_width=200).stdout
    assert "[default: 900.0]" in out
    out = CliRunner().invoke(main, ["lora", "grid", "--help"], terminal_width=200).stdout
    assert "[default: 0.3 0.5 0.7 0.9 1.0]" in out and "[default: baseline]" in out


def test_importing_the_cli_does_not_import_what_the_defaults_live_in():
    """Defaults are read lazily: `easel --help` does not load the verify gate, PIL or the dataset checks."""
    code = "import sys, client.cli; print(sorted(m for m in ('PIL', 'client.lora_tools.verify', 'client.dataset') if m in sys.modules))"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_old_spellings_parse_and_stay_out_of_help(tmp_path):
    packs = str(REPO / "genre_packs")
    args = ["packs", "show", "--genre", "spaghetti_western"]
    new = CliRunner().invoke(main, [*args, "--packs", packs, "--lora-root", str(tmp_path)])
    old = CliRunner().invoke(main, [*args, "--packs-root", packs, "--root", str(tmp_path)])
    assert new.exit_code == old.exit_code == 0, old.output
    assert new.stdout == old.stdout and str(tmp_path / "lora") in new.stdout
    for path in (("packs", "show"), ("packs", "make-loras"), ("lora", "verify"), ("batch", "poi")):
        out = CliRunner().invoke(main, [*path, "--help"]).stdout
        assert "--packs " in out and "--packs-root" not in out and "--root" not in out, path
    (tmp_path / "file").write_text("")
    bad = CliRunner().invoke(main, [*args, "--packs-root", str(tmp_path / "file")], prog_name="easel")
    assert bad.exit_code == 2 and "Invalid value for '--packs':" in bad.stderr and "--packs-root" not in bad.stderr


# --- sizes in bytes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("67108864", 67108864),
        ("0", 0),
        ("2GiB", 2 << 30),
        ("2G", 2 << 30),
        ("2gb", 2 << 30),
        (" 512 MiB ", 512 << 20),
        ("1.5k", 1536),
        (".5M", 512 << 10),
        ("1T", 1 << 40),
        ("10b", 10),
    ],
)
def test_a_byte_size_reads_binary_units_with_or_without_an_i(text, expected):
    from client.sizes import parse_byte_size

    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "2X", "-1", "1e9", "nan", "inf", "2 G B", "1,024"])
def test_a_byte_size_refuses_what_it_cannot_read_and_says_what_it_wants(text):
    from client.sizes import parse_byte_size

    with pytest.raises(ValueError, match=r"^a size in bytes \(e\.g\. 2GiB, 512M or 67108864\)$"):
        parse_byte_size(text)


def test_a_byte_size_below_the_minimum_names_the_minimum_and_sizes_print_in_the_unit_that_divides():
    from client.sizes import format_byte_size, parse_byte_size

    with pytest.raises(ValueError, match=r"^a size of at least 1KiB$"):
        parse_byte_size("1023", minimum=1024)
    assert parse_byte_size("1K", minimum=1024) == 1024
    assert [format_byte_size(n) for n in (2 << 30, 1536 << 10, 16 << 20, 1000, 0)] == [
        "2GiB",
        "1536KiB",
        "16MiB",
        "1000",
        "0",
    ]


def test_sizes_for_people_keep_three_figures_after_rounding():
    from client.sizes import describe_byte_size

    sizes = (0, 512, 1023, 1024, 1536, 170 << 20, int(3.72 * 2**30), 2**31 - 1, int(9.999 * 2**20), int(99.996 * 2**20))
    assert [describe_byte_size(n) for n in sizes] == [
        "0 B",
        "512 B",
        "1023 B",
        "1.00 KiB",
        "1.50 KiB",
        "170 MiB",
        "3.72 GiB",
        "2.00 GiB",
        "10.0 MiB",
        "100 MiB",
    ]


@pytest.mark.mlx  # `easel serve` joins the command line with the daemon's extra
def test_serve_takes_its_byte_bounds_with_units_and_refuses_a_bad_one_by_option_name():
    from daemon.config import ServerConfig, ServiceConfig

    serve = command("serve")
    ctx = serve.make_context("serve", ["--resident-stack-bytes", "512M", "--lora-cache-bytes", "1.5G"])
    assert ctx.params["resident_stack_bytes"] == 512 << 20 and ctx.params["lora_cache_bytes"] == int(1.5 * 2**30)
    assert ctx.params["heap_retain_bytes"] == ServiceConfig().heap_retain_bytes  # its default, written 2GiB
    assert ctx.params["max_frame"] == ServerConfig().max_frame
    out = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).stdout
    assert "--resident-stack-bytes SIZE" in out and "[default: 2GiB]" in out and "[default: 16MiB]" in out
    bad = CliRunner().invoke(main, ["serve", "--max-frame", "1000"])
    assert bad.exit_code == 2
    assert "Invalid value for '--max-frame': '1000' is not a size of at least 1KiB" in bad.output


@pytest.mark.mlx  # the cluster commands come with the daemon's extra (the thin run deselects)
@pytest.mark.ray
def test_cluster_up_bounds_each_replicas_lora_caches_as_serve_does():
    """A replica refused for memory is told to lower --lora-cache-bytes or --resident-stack-bytes: `cluster
    up` takes both, with units, into the replicas' configuration."""
    from daemon.cluster.cli import _service_config

    up = command("cluster", "up")
    ctx = up.make_context("up", ["--resident-stack-bytes", "512M", "--lora-cache-bytes", "256M"])
    assert ctx.params["resident_stack_bytes"] == 512 << 20 and ctx.params["lora_cache_bytes"] == 256 << 20
    config = _service_config(lora_cache_bytes=ctx.params["lora_cache_bytes"], resident_stack_bytes=None)
    assert config.lora_cache_bytes == 256 << 20 and config.resident_stack_bytes == 2 << 30  # unset: serve's


@pytest.mark.mlx  # `easel serve` joins the command line with the daemon's extra
@pytest.mark.parametrize("name", ["serve", "gateway"])
def test_the_log_level_is_one_of_loggings_names_in_any_case_and_a_bad_one_is_a_usage_error(name):
    required = ["--cluster", "auto"] if name == "gateway" else []
    if name == "gateway":
        pytest.importorskip("ray")
    cmd = command(name)
    assert cmd.make_context(name, [*required, "--log-level", "info"]).params["log_level"] == "INFO"
    assert cmd.make_context(name, [*required, "--log-level", "Debug"]).params["log_level"] == "DEBUG"
    assert cmd.make_context(name, required).params["log_level"] == "WARNING"
    bad = CliRunner().invoke(main, [name, *required, "--log-level", "bogus"])
    assert bad.exit_code == 2, bad.output  # a usage error, not a traceback from logging
    assert "Invalid value for '--log-level': 'bogus' is not one of 'debug', 'info'" in bad.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["render", "x", "--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295."),
        (["render", "x", "--seed", "4294967296"], "is not in the range 0<=x<=4294967295."),
        (["render", "x", "--width", "0"], "Invalid value for '--width': 0 is not in the range x>=1."),
        (["lora", "grid", "f.safetensors", "--seed", "-3"], "Invalid value for '--seed': -3 is not in the range"),
        (["batch", "poi", "--genre", "g", "--world", "w", "--steps", "0"], "Invalid value for '--steps': 0 is not"),
    ],
)
def test_seeds_and_sizes_out_of_range_are_usage_errors_before_any_connection(args, message, tmp_path):
    res = CliRunner().invoke(main, [*args, "--socket", str(tmp_path / "nobody.sock")])
    assert res.exit_code == 2 and message in res.output, res.output


@pytest.mark.mlx  # the daemon's commands join the command line with the daemon's extra
@pytest.mark.parametrize("path", [("serve",), ("model", "info"), ("model", "save"), ("cluster", "up")])
def test_a_daemon_commands_preset_is_one_it_knows_in_any_case_and_another_is_a_usage_error(path, tmp_path):
    """An unknown preset was a `weights_not_found` error after the command had started (for `serve`, after
    it had claimed its socket); it is refused as the command line is read, naming the presets."""
    if path[0] == "cluster":
        pytest.importorskip("ray")
    paths = {"serve": [], "info": [str(tmp_path)], "save": [str(tmp_path), str(tmp_path / "dst")], "up": []}
    args = paths[path[-1]]
    cmd = command(*path)
    assert cmd.make_context(path[-1], [*args, "--preset", "TINY"]).params["preset"] == "tiny"
    bad = CliRunner().invoke(main, [*path, *args, "--preset", "bogus"])
    assert bad.exit_code == 2, bad.output
    assert "Invalid value for '--preset': 'bogus' is not one of 'dev', 'schnell', 'krea-dev', 'tiny'." in bad.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["render", "x", "--timeout", "0"], "Invalid value for '--timeout': '0' is not more than 0."),
        (["status", "--timeout", "-1"], "Invalid value for '--timeout': '-1' is not more than 0."),
        (["status", "--timeout", "nan"], "Invalid value for '--timeout': 'nan' is not a finite number."),
        (["render", "x", "--deadline", "inf"], "Invalid value for '--deadline': 'inf' is not a finite number."),
        (["stop", "--wait", "0"], "Invalid value for '--wait': '0' is not more than 0."),
        (["stop", "--drain-timeout", "nan"], "Invalid value for '--drain-timeout': 'nan' is not a finite number."),
    ],
)
def test_a_number_of_seconds_is_positive_and_finite_or_a_usage_error(args, message):
    """Before this was checked, `--timeout 0` reached the socket as "never block" (a BlockingIOError
    traceback) and `--timeout -1` raised socket's own ValueError."""
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code == 2 and message in bad.output, bad.output


def test_a_drain_timeout_of_zero_is_a_drain_cut_short_and_parses():
    assert command("stop").make_context("stop", ["--drain-timeout", "0"]).params["drain_timeout"] == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lora", "verify", "a.safetensors", "--scale", "nan"], "Invalid value for '--scale': 'nan' is not a finite"),
        (["lora", "verify", "a.safetensors", "--min-match", "1.5"], "'--min-match': '1.5' is not at most 1."),
        (["lora", "verify", "a.safetensors", "--max-ssim-lora", "nan"], "'--max-ssim-lora': 'nan' is not a finite"),
        (["render", "x", "--guidance", "inf"], "Invalid value for '--guidance': 'inf' is not a finite number."),
    ],
)
def test_numbers_that_would_only_fail_at_the_daemon_are_refused_as_usage_errors(tmp_path, args, message):
    """A nan scale sent to the verify gate came back as a failed report (every render refused); nan passed
    click's FloatRange bounds too."""
    (tmp_path / "a.safetensors").write_bytes(b"")
    args = [str(tmp_path / a) if a == "a.safetensors" else a for a in args]
    if args[0] == "lora":  # were the value taken, the gate's report would go here, not into the working directory
        args += ["--report-dir", str(tmp_path / "report"), "--socket", str(tmp_path / "nobody.sock")]
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code == 2 and message in bad.output, bad.output


def test_a_grid_picture_is_a_png_in_a_folder_or_a_usage_error_before_any_render(tmp_path):
    """`lora grid --out g.jpg` wrote PNG bytes under a .jpg name, and a path under a file failed only after
    every cell had rendered."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "f.safetensors").write_bytes(b"not read before the daemon is asked")
    base = ["lora", "grid", str(tmp_path / "f.safetensors"), "--socket", str(tmp_path / "nobody.sock"), "--out"]
    for out, said in (
        ("g.jpg", "Invalid value for '-o' / '--out': 'g.jpg' does not end in .png"),
        (str(tmp_path / "afile" / "g.png"), f"cannot be written: {tmp_path / 'afile'} is not a folder"),
    ):
        res = CliRunner().invoke(main, [*base, out])
        assert res.exit_code == 2 and said in res.output, res.output
    res = CliRunner().invoke(main, [*base, str(tmp_path / "new" / "G.PNG")])  # a folder to make is fine
    assert res.exit_code == 1 and "daemon_unavailable" in res.output


def test_a_lora_whose_scale_is_not_a_number_is_a_usage_error_not_a_missing_file(tmp_path):
    """`--lora a.safetensors:abc` was sent as the path `a.safetensors:abc` (lora_not_found); a path may hold
    a colon, so only a `.safetensors` name with a scale that is no number, and no file of the whole name, is
    taken for a typo."""
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "odd:name").write_bytes(b"x")
    base = ["render", "x", "--socket", str(tmp_path / "nobody.sock"), "--lora"]
    res = CliRunner().invoke(main, [*base, f"{tmp_path}/a.safetensors:abc"])
    assert res.exit_code == 2 and "the scale after ':' must be a number, got 'abc'" in res.output, res.output
    for fine in (f"{tmp_path}/odd:name", f"{tmp_path}/a.safetensors:0.5"):  # a colon in a name; a good scale
        res = CliRunner().invoke(main, [*base, fine])
        assert res.exit_code == 1 and "daemon_unavailable" in res.output, res.output
