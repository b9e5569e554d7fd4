"""``cerberus count-params`` driven through the CLI runner, plus the fast-startup guarantees."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cerberus import __version__
from cerberus.cli import app

RESNET18_FLAGS = ["--blocks", "2", "2", "2", "2", "--channels", "64", "128", "256", "512"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, ["count-params", *args])


def assert_clean_refusal(result, message: str) -> None:
    """Exit code 2, one ``Error:`` line naming the problem, no traceback and nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


# --------------------------------------------------------------------------------------------
# Counting


def test_seed_design(runner: CliRunner) -> None:
    result = invoke(runner, "--blocks", "3", "5", "3")
    assert result.exit_code == 0, result.output
    assert "parameters: 4,918,602" in result.stdout
    assert "MACs/image: 798,689,792" in result.stdout
    assert "81,398 under the 5,000,000 budget" in result.stdout
    assert "within budget" in result.stdout
    assert "layer3" in result.stdout  # the per-stage table
    assert result.stderr == ""


def test_defaults_are_the_seed_design(runner: CliRunner) -> None:
    result = invoke(runner)
    assert result.exit_code == 0, result.output
    assert "parameters: 4,918,602" in result.stdout


def test_repeated_option_form(runner: CliRunner) -> None:
    result = invoke(runner, "--blocks", "3", "--blocks", "5", "--blocks", "3")
    assert result.exit_code == 0, result.output
    assert "parameters: 4,918,602" in result.stdout
    assert "81,398 under the 5,000,000 budget" in result.stdout


def test_json(runner: CliRunner) -> None:
    result = invoke(runner, "--blocks", "3", "5", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 4_918_602
    assert data["budget"] == 5_000_000
    assert data["within_budget"] is True
    assert data["macs"] == 798_689_792
    assert data["verdict"] == "81,398 under the 5,000,000 budget"
    assert data["architecture"]["channels"] == [64, 128, 256]
    assert [stage["params"] for stage in data["stages"]] == [221_952, 1_411_840, 3_280_384]


def test_resnet18_is_over_budget(runner: CliRunner) -> None:
    result = invoke(runner, *RESNET18_FLAGS, "--json")
    assert result.exit_code == 0, result.output  # count-params reports the budget, it does not refuse
    data = json.loads(result.stdout)
    assert data["params"] == 11_173_962
    assert data["within_budget"] is False
    assert data["headroom"] == -6_173_962
    assert data["verdict"] == "over the 5,000,000 budget by 6,173,962"
    text = invoke(runner, *RESNET18_FLAGS)
    assert "OVER BUDGET" in text.stdout
    assert "over the 5,000,000 budget by 6,173,962" in text.stdout


def test_mixed_list_forms_and_design_flags(runner: CliRunner) -> None:
    result = invoke(
        runner,
        *("--blocks", "2", "--blocks", "2", "2", "2"),
        *("--channels", "64", "128", "256", "512"),
        *("--pool-size", "2", "--conv-kernel", "3", "--num-classes", "100", "--json"),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture"]["blocks"] == [2, 2, 2, 2]
    assert data["architecture"]["pool_size"] == 2
    # pool 2 on the final 4x4 map: 512 * 2 * 2 inputs to a 100-way linear layer
    assert data["head_params"] == 512 * 4 * 100 + 100


def test_max_params(runner: CliRunner) -> None:
    result = invoke(runner, *RESNET18_FLAGS, "--max-params", "12000000", "--json")
    data = json.loads(result.stdout)
    assert data["budget"] == 12_000_000
    assert data["within_budget"] is True
    assert data["verdict"] == "826,038 under the 12,000,000 budget"
    result = invoke(runner, "--max-params", "4000000")
    assert "over the 4,000,000 budget by 918,602" in result.stdout


def test_max_params_must_be_positive(runner: CliRunner) -> None:
    assert_clean_refusal(invoke(runner, "--max-params", "0"), "--max-params: must be positive, got 0")


# --------------------------------------------------------------------------------------------
# Config files


def test_config_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "r18.toml"
    path.write_text(
        "[model]\nblocks = [2, 2, 2, 2]\nchannels = [64, 128, 256, 512]\nmax_params = 12_000_000\n"
    )
    result = invoke(runner, str(path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 11_173_962
    assert data["budget"] == 12_000_000  # the config's budget
    assert data["within_budget"] is True
    data = json.loads(invoke(runner, str(path), "--max-params", "5000000", "--json").stdout)
    assert data["within_budget"] is False


def test_config_and_flags_conflict(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[model]\nblocks = [1, 1]\n")
    # a flag given at its default value counts too: it would otherwise be ignored silently
    for flags, named in (
        (["--blocks", "2"], "--blocks"),
        (["--conv-kernel", "3"], "--conv-kernel"),
        (["--downsample", "stride", "--num-classes", "10"], "--num-classes, --downsample"),
        (["--channels", "8", "16"], "--channels"),
    ):
        result = invoke(runner, str(path), *flags)
        assert_clean_refusal(result, f"give either a config file or design flags ({named}), not both")
        assert result.stderr.endswith("not both\n")  # a file given on purpose: no hint of a stray value


def test_bad_config_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[model]\nblok = [1, 1]\n")
    assert_clean_refusal(invoke(runner, str(path)), "model.blok: unknown key")
    assert_clean_refusal(invoke(runner, str(tmp_path / "missing.toml")), "no such config file")


# --------------------------------------------------------------------------------------------
def test_pool_downsampling_flag(runner: CliRunner) -> None:
    flags = ("--blocks", "1", "1", "1", "--channels", "32", "128", "128", "--stem-channels", "24")
    result = invoke(runner, *flags, "--downsample", "pool", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 503_682 and data["macs"] == 41_231_616
    assert data["architecture"]["downsample"] == "pool"
    assert [stage["side"] for stage in data["stages"]] == [16, 8, 4]
    strided = json.loads(invoke(runner, *flags, "--json").stdout)
    assert strided["architecture"]["downsample"] == "stride"
    assert [stage["side"] for stage in strided["stages"]] == [32, 16, 8]


# Bad flags: exit 2, the flag named, no traceback


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--conv-kernel", "4"], "Error: --conv-kernel: must be a positive odd number, got 4"),
        (["--skip-kernel", "2"], "Error: --skip-kernel: must be a positive odd number, got 2"),
        (["--blocks", "3", "5", "3", "--channels", "64", "128"], "Error: --channels: has 2 entries"),
        (["--blocks", "3", "0", "3"], "Error: --blocks: every stage needs at least 1 block, got [3, 0, 3]"),
        (["--blocks", "1", "1", "1", "1", "1", "1", "1"], "Error: --blocks: 7 stages do not fit"),
        (["--pool-size", "3"], "Error: --pool-size: 3 must divide the final 8x8 feature map"),
        (["--stem-channels", "0"], "Error: --stem-channels: must be positive, got 0"),
        (["--num-classes", "0"], "Error: --num-classes: must be positive, got 0"),
        (["--downsample", "avg"], "Error: --downsample: must be 'stride' or 'pool', got 'avg'"),
        (
            ["--blocks", "1", "1", "1", "1", "1", "1", "--downsample", "pool"],
            "Error: --blocks: 6 stages do not fit a 32-pixel map: every stage halves",
        ),
    ],
)
def test_bad_design_flags(runner: CliRunner, flags: list[str], message: str) -> None:
    result = invoke(runner, *flags)
    assert_clean_refusal(result, message)
    assert result.stderr.startswith(message)


def test_non_integer_flag_is_a_usage_error(runner: CliRunner) -> None:
    result = invoke(runner, "--blocks", "three")
    assert result.exit_code == 2
    assert "--blocks" in result.stderr
    assert "Traceback" not in result.output
    # plain text, no rich panel: the last line is the whole error
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--blocks': Input should be a valid integer, "
        "unable to parse string as an integer"
    )
    assert "╭" not in result.stderr  # the corner of a rich box


# --------------------------------------------------------------------------------------------
# Summary, version, help


def test_summary_adds_the_torchinfo_table(runner: CliRunner) -> None:
    result = invoke(runner, "--blocks", "3", "5", "3", "--summary")
    assert result.exit_code == 0, result.output
    assert "Total params: 4,918,602" in result.stdout
    assert "Trainable params: 4,918,602" in result.stdout
    assert "parameters: 4,918,602" in result.stdout


def test_summary_shows_mult_add_units_by_value(runner: CliRunner) -> None:
    # torchinfo 1.8 formats its Units enum with str(): "(Units.MEGABYTES)" on Python 3.11+
    result = invoke(runner, "--blocks", "1", "--channels", "8", "--summary")
    assert result.exit_code == 0, result.output
    assert "Total mult-adds (M): 1.40" in result.stdout
    assert "Units." not in result.stdout


def assert_counted_without_table(result, message: str) -> None:
    """The analytic counts on stdout, one note on stderr for the missing layer table, exit 0."""
    assert result.exit_code == 0, result.output
    assert "parameters: " in result.stdout and "Total params" not in result.stdout
    assert result.stderr == f"Note: {message}\n"
    assert "Traceback" not in result.output


def test_summary_leaves_out_the_table_of_a_model_too_large_to_build(runner: CliRunner, monkeypatch) -> None:
    import cerberus.model

    def must_not_build(arch):
        raise AssertionError("the model was built")

    monkeypatch.setattr(cerberus.model, "build_model", must_not_build)
    reason = (
        "no layer table: building the model needs about 180.0 GB for its weights alone, over the "
        "1.0 GB limit (the counts above do not need it)"
    )
    result = invoke(runner, "--blocks", "1", "--channels", "50000", "--summary")
    assert "parameters: 45,002,150,010" in result.stdout
    assert_counted_without_table(result, reason)
    # --json with --summary: the counts, no table, and the reason as a note
    result = invoke(runner, "--blocks", "1", "--channels", "50000", "--summary", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 45_002_150_010 and data["layer_summary"] is None
    assert data["notes"] == [reason]
    result = invoke(runner, "--blocks", "1", "--channels", "50000", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"] == 45_002_150_010


def test_summary_with_json_carries_the_layer_table(runner: CliRunner) -> None:
    result = invoke(runner, "--blocks", "1", "--channels", "8", "--summary", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 1_506
    assert "Total params: 1,506" in data["layer_summary"]
    assert "Total mult-adds (M)" in data["layer_summary"] and data["notes"] == []
    assert "layer_summary" not in json.loads(
        invoke(runner, "--blocks", "1", "--channels", "8", "--json").stdout
    )


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 90000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
    ids=["allocator", "MemoryError"],
)
def test_summary_reports_running_out_of_memory(runner: CliRunner, monkeypatch, error) -> None:
    import torchinfo

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(torchinfo, "summary", out_of_memory)
    result = invoke(runner, "--blocks", "1", "--channels", "8", "--summary")
    assert "parameters: 1,506" in result.stdout
    assert_counted_without_table(
        result,
        "no layer table: building the model ran out of memory (its weights alone take about "
        "6.0 kB; the counts above do not need it)",
    )


def test_summary_does_not_disguise_other_errors(runner: CliRunner, monkeypatch) -> None:
    import torchinfo

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(torchinfo, "summary", broken)
    result = invoke(runner, "--blocks", "1", "--channels", "8", "--summary")
    assert isinstance(result.exception, RuntimeError)
    assert "out of memory" not in result.output


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"cerberus {__version__}\n"


def test_help_lists_count_params(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "count-params" in result.stdout
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    for flag in ("--blocks", "--channels", "--conv-kernel", "--max-params", "--summary", "--json"):
        assert flag in result.stdout


def test_help_keeps_brackets_and_example_lines(runner: CliRunner) -> None:
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    assert "A config file to read [model] from, instead of flags." in result.stdout
    assert (
        "\n    cerberus count-params --blocks 3 5 3\n    cerberus count-params --blocks 2 2 2 2"
        in result.stdout
    )


def test_a_failed_run_ends_its_json_events_with_the_error(runner: CliRunner, tmp_path: Path, monkeypatch):
    import cerberus.runner
    from cerberus.errors import DivergenceError

    def diverging_run(cfg, *, on_event, **_):
        on_event({"event": "note", "message": "hello"})
        raise DivergenceError("the training loss became non-finite at epoch 1, step 3: lower train.lr")

    monkeypatch.setattr(cerberus.runner, "train_run", diverging_run)
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nblocks = [1, 1]\nchannels = [8, 16]\n")
    result = runner.invoke(app, ["train", str(config), "--json"])
    assert result.exit_code == 1
    events = [json.loads(line) for line in result.stdout.splitlines()]
    message = "the training loss became non-finite at epoch 1, step 3: lower train.lr"
    assert events == [
        {"event": "note", "message": "hello"},
        {"event": "error", "message": message, "exit_code": 1},
    ]
    assert result.stderr == f"Error: {message}\n"


def test_piped_train_output_is_plain_lines(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    import cerberus.runner

    # the runner's events, as cerberus.runner emits them
    start = dict(event="start", params=5_266, device="cpu", precision="fp32", channels_last=False)
    start.update(inference_channels_last=True, epochs=1, start_epoch=0, start_step=0)
    start.update(steps_per_epoch=8, world_size=1)
    start.update(train_images=400, val_images=100, test_images=200, out_dir=str(tmp_path / "run"))
    step = dict(event="step", step=1, loss=2.0, accuracy=0.25, images_per_sec=900.0)
    epoch = dict(event="epoch", epoch=1, lr=0.05, train_loss=2.0, train_accuracy=0.25)
    epoch.update(train_images_per_sec=900.0, seconds=1.0)
    summary = dict(test_accuracy=0.5, test_loss=1.5, test_images=200, best_epoch=1, best_val_accuracy=0.4)
    summary.update(params=5_266, wall_seconds=2.0, device="cpu", precision="fp32", peak_rss_mb=300.0)
    done = dict(event="done", summary=summary)

    def fake_train_run(cfg, *, on_event, **_):
        for event in (start, step, epoch, done):
            on_event(event)

    monkeypatch.setattr(cerberus.runner, "train_run", fake_train_run)
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nblocks = [1, 1]\nchannels = [8, 16]\n")
    result = runner.invoke(app, ["train", str(config)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "5,266 parameters on cpu (fp32, channels_last for evaluation); 400 train / 100 val / "
        "200 test images; world size 1"
    )  # one line, not wrapped at 80
    assert lines[1:] == [
        f"run directory: {tmp_path / 'run'}",
        "epoch   1 | lr 0.05 | train loss 2.0000 acc 0.2500 | 900 img/s | 1s",
        "test accuracy 0.5000 (loss 1.5000, 200 images, weights of epoch 1)",
        "best val accuracy 0.4000 at epoch 1",
        "5,266 parameters, 2.0s wall, cpu fp32, peak RSS 300 MB",
    ]  # no progress bar ("epochs 1/1", "steps 0/8")


# --------------------------------------------------------------------------------------------
# Real processes


def test_python_m_cerberus_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cerberus", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"cerberus {__version__}\n"


def test_building_the_cli_and_help_do_not_import_torch() -> None:
    # what keeps `cerberus --help` fast: torch is imported inside commands that need it
    code = (
        "import sys, typer\n"
        "from typer.testing import CliRunner\n"
        "from cerberus.cli import app\n"
        "typer.main.get_command(app)\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "assert CliRunner().invoke(app, ['count-params', '--help']).exit_code == 0\n"
        "assert CliRunner().invoke(app, ['count-params', '--json']).exit_code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_tables_written_to_a_pipe_keep_their_natural_width(monkeypatch):
    """rich would squeeze a table into 80 columns when stdout is not a terminal."""
    from rich.table import Table

    from cerberus.cli._app import console

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    table = Table()
    for i in range(10):
        table.add_column(f"column {i}")
    table.add_row(*(f"value {i:05d}" for i in range(10)))
    console().print(table)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) > 100
    assert all(f"value {i:05d}" in lines[3] for i in range(10))  # the row on one line


def test_a_ctrl_c_while_a_class_is_defined_exits_130_without_a_traceback(monkeypatch) -> None:
    """Python 3.11 wraps an exception raised by ``__set_name__`` (as a Ctrl-C in a module's class
    definitions can be) in RuntimeError; the entry point still treats it as the interrupt."""
    import cerberus.cli

    class Interrupting:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    def command(**kwargs) -> None:
        class Defined:  # what an import does while the signal lands
            attribute = Interrupting()

    monkeypatch.setattr(cerberus.cli, "app", command)
    with pytest.raises(SystemExit) as info:
        cerberus.cli.main()
    assert info.value.code == 130

    def crash(**kwargs) -> None:
        raise RuntimeError("a real error")

    monkeypatch.setattr(cerberus.cli, "app", crash)
    with pytest.raises(RuntimeError, match="a real error"):  # anything else is not hidden
        cerberus.cli.main()


def test_a_stray_value_read_as_the_config_file_is_named() -> None:
    result = CliRunner().invoke(app, ["count-params", "--blocks", "1", "1", "1", "--conv-kernel", "3", "5"])
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: give either a config file or design flags (--blocks, --conv-kernel), not both; '5' was "
        "read as the config file (a flag other than --blocks and --channels takes one value)\n"
    )


def test_list_options_take_the_equals_form() -> None:
    spaced = CliRunner().invoke(
        app, ["count-params", "--blocks", "2", "1", "--channels", "8", "16", "--json"]
    )
    equals = CliRunner().invoke(app, ["count-params", "--blocks=2", "1", "--channels=8", "16", "--json"])
    assert equals.exit_code == 0, equals.output
    assert json.loads(equals.stdout) == json.loads(spaced.stdout)
    assert json.loads(equals.stdout)["architecture"]["blocks"] == [2, 1]
