"""Config loading, ``--set`` overrides and the budget check of cerberus.config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cerberus.arch import Architecture
from cerberus.config import (
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    read_toml,
)
from cerberus.errors import BudgetError, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RESNET18_SET = ["model.blocks=[2, 2, 2, 2]", "model.channels=[64, 128, 256, 512]"]
BUDGET_MESSAGE = "model has 11,173,962 parameters, over the 5,000,000 budget by 6,173,962"

FULL_TOML = """\
name = "wide-k5"
seed = 7

[model]
blocks = [2, 3, 2]
channels = [48, 96, 192]
conv_kernel = 5
skip_kernel = 3
pool_size = 4
stem_channels = 32
num_classes = 100
downsample = "pool"
stem_kernel = 5
max_params = 6_000_000

[data]
root = "/tmp/cifar"
download = false
url = "file:///tmp/cifar-10-python.tar.gz"
val_size = 2000
split_seed = 3
train_subset = 20000
test_subset = 5000
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[augment]
crop_padding = 2
crop_mode = "reflect"
crop_sizes = [24, 28]
flip = false
rotation = 10.0
cutout_size = 8
cutout_holes = 2
mixup_alpha = 0.2
cutmix_alpha = 1.0
mix_prob = 0.5
label_smoothing = 0.1

[train]
epochs = 40
batch_size = 256
eval_batch_size = 500
optimizer = "muon"
lr = 0.002
muon_lr = 0.02
muon_momentum = 0.7
momentum = 0.85
nesterov = true
weight_decay = 0.05
decay_bn_and_bias = false
schedule = "seed"
warmup_epochs = 1.5
milestones = [20, 30]
gamma = 0.2
t_max = 35
min_lr = 1e-5
ema_decay = 0.999
prune_ratio = 0.3
prune_until = 0.5
whiten_stem = true
grad_clip = 5.0
precision = "bf16"
device = "cpu"
channels_last = true
compile = true
threads = 2
sync_bn = true
test_tta = true
test_every_epoch = true
checkpoint_every = 100
save_every_epochs = 2
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Defaults and round trips


def test_defaults_load() -> None:
    config = load_config(None)
    assert config == ExperimentConfig()
    assert config.name == "cerberus"
    assert config.model.blocks == [3, 5, 3]
    assert config.model.channels is None
    assert config.model.max_params == 5_000_000
    assert config.model.architecture() == Architecture(blocks=(3, 5, 3))
    assert config.train.epochs == 30
    assert config.train.lr == 0.1
    assert config.data.val_size == 5000


# Fields FULL_TOML leaves at their defaults: their other values conflict with the file's.
# "alternate" needs flip = true, the default; onecycle_peak, the onecycle schedule (FULL_TOML: seed)
FULL_TOML_UNSET = {"augment.flip_mode", "train.onecycle_peak"}


def same_value(loaded: object, written: object) -> bool:
    """Equal as config values: lists and tuples alike, an int equal to a float, but never a bool
    equal to a number."""
    if isinstance(loaded, list | tuple) or isinstance(written, list | tuple):
        return (
            isinstance(loaded, list | tuple)
            and isinstance(written, list | tuple)
            and len(loaded) == len(written)
            and all(same_value(a, b) for a, b in zip(loaded, written, strict=True))
        )
    if isinstance(loaded, bool) or isinstance(written, bool):
        return type(loaded) is type(written) and loaded == written
    if isinstance(loaded, int | float) and isinstance(written, int | float):
        return float(loaded) == float(written)
    return type(loaded) is type(written) and loaded == written


def test_full_config_loads_every_value(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML))
    written = tomllib.loads(FULL_TOML)
    loaded = config.to_dict()
    defaults = ExperimentConfig().model_dump(mode="json")
    for key, value in written.items():
        sections = value if isinstance(value, dict) else {None: value}
        for field, setting in sections.items():
            where = key if field is None else f"{key}.{field}"
            got = loaded[key] if field is None else loaded[key][field]
            default = defaults[key] if field is None else defaults[key][field]
            assert same_value(got, setting), f"{where}: loaded {got!r}, the file says {setting!r}"
            # a value dropped on loading cannot hide behind its default
            assert not same_value(default, setting), f"{where}: the file sets the default {default!r}"
    # The file sets every field but the few listed: each of them is checked above.
    unset = {
        f"{key}.{field}"
        for key, section in defaults.items()
        if isinstance(section, dict)
        for field in section
        if field not in written.get(key, {})
    }
    assert unset == FULL_TOML_UNSET
    assert {k for k, v in defaults.items() if not isinstance(v, dict)} <= set(written)
    assert config.model.architecture() == Architecture(
        blocks=(2, 3, 2),
        channels=(48, 96, 192),
        conv_kernel=5,
        skip_kernel=3,
        pool_size=4,
        stem_channels=32,
        num_classes=100,
        downsample="pool",
        stem_kernel=5,
    )


def test_full_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML))
    again = load_config(write(tmp_path, config.to_toml(), "again.toml"))
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    text = ExperimentConfig().to_toml()
    assert "channels_last" not in text  # None is omitted: TOML has no null
    assert load_config(write(tmp_path, text)) == ExperimentConfig()


def test_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[train]\nlr = 1\nwarmup_epochs = 2\n"))
    assert config.train.lr == 1.0
    assert isinstance(config.train.lr, float)
    assert config.train.warmup_epochs == 2.0


# --------------------------------------------------------------------------------------------
# --set overrides


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("train.lr=0.05", ["train", "lr"], 0.05),
        ("train.epochs=12", ["train", "epochs"], 12),
        ("train.epochs = 12", ["train", "epochs"], 12),
        ("train.min_lr=1e-4", ["train", "min_lr"], 1e-4),
        ("model.blocks=[2, 2, 2]", ["model", "blocks"], [2, 2, 2]),
        ("train.nesterov=true", ["train", "nesterov"], True),
        ("data.download=false", ["data", "download"], False),
        ('name="my run"', ["name"], "my run"),
        ("name=baseline", ["name"], "baseline"),
        ("train.device=cpu", ["train", "device"], "cpu"),
        ("data.root=/data/cifar-10", ["data", "root"], "/data/cifar-10"),
        ("data.url=file:///tmp/c.tar.gz", ["data", "url"], "file:///tmp/c.tar.gz"),
        ("seed=-3", ["seed"], -3),
        ('data.url="http://x/?a=b"', ["data", "url"], "http://x/?a=b"),
    ],
)
def test_parse_override(text: str, path: list[str], value: object) -> None:
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("train.lr", "expected KEY=VALUE"),
        ("=0.1", "expected KEY=VALUE"),
        (".lr=0.1", "expected KEY=VALUE"),
        ("train..lr=0.1", "expected KEY=VALUE"),
        ("train.lr.=0.1", "expected KEY=VALUE"),
        ("1train=3", "expected KEY=VALUE"),
        ("train.lr=", "'' is not a valid TOML value"),
        ("model.blocks=[3, 5", "'[3, 5' is not a valid TOML value"),
        ("name=my run", "'my run' is not a valid TOML value"),
        ('name="unclosed', "is not a valid TOML value"),
        ("seed=1\n[train]", "is not a single TOML value"),
        ("train.lr=0.1=x", "'0.1=x' is not a valid TOML value"),
    ],
)
def test_bad_override_forms(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    message = str(info.value)
    assert message.startswith(f"--set {text!r}: ")
    assert reason in message


def test_apply_overrides_nests_and_copies() -> None:
    data = {"model": {"blocks": [3, 5, 3]}, "name": "a"}
    result = apply_overrides(data, ["model.blocks=[2, 2]", "train.lr=0.05", "name=b", "train.epochs=3"])
    assert result == {"model": {"blocks": [2, 2]}, "name": "b", "train": {"lr": 0.05, "epochs": 3}}
    assert data == {"model": {"blocks": [3, 5, 3]}, "name": "a"}  # the input is untouched


def test_an_inline_table_sets_its_keys_and_keeps_the_sections_others() -> None:
    data = {"model": {"blocks": [3, 5, 3], "channels": [8, 16, 32]}, "train": {"batch_size": 100}}
    overrides = ["train={epochs=1, lr=0.1}", "model={blocks=[1, 1, 1]}", "data={val_size=0}"]
    result = apply_overrides(data, overrides)
    assert result == {
        "model": {"blocks": [1, 1, 1], "channels": [8, 16, 32]},
        "train": {"batch_size": 100, "epochs": 1, "lr": 0.1},
        "data": {"val_size": 0},
    }


def test_an_inline_table_is_blamed_only_for_the_keys_it_lists(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nlr = -1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train={epochs=1}"])
    assert str(info.value).splitlines()[1:] == ["train.lr: Input should be greater than 0"]
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train={epochs=0, lr=0.1}"])
    assert str(info.value).splitlines()[1:] == [
        "train.epochs: Input should be greater than 0 (from --set train={epochs=0, lr=0.1})"
    ]
    # a table where a value goes replaces the value: the --set is to blame
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lr={x=1}"])
    blamed = "train.lr: Input should be a valid number (from --set train.lr={x=1})"
    assert str(info.value).splitlines()[1:] == [blamed]


def test_override_through_a_value_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"model": {"blocks": [3]}}, ["model.blocks.first=2"])
    assert str(info.value) == "--set 'model.blocks.first=2': 'blocks' is not a section"


def test_overrides_apply_on_top_of_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    config = load_config(path, ["train.epochs=5", "train.warmup_epochs=0", "model.num_classes=10"])
    assert config.train.epochs == 5
    assert config.model.num_classes == 10
    assert config.train.optimizer == "muon"  # the rest of the file stays


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    # Windows editors may save UTF-8 with a BOM, which TOML parsers refuse as a bad statement
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + FULL_TOML.encode())
    assert load_config(path) == load_config(write(tmp_path, FULL_TOML))


def test_overrides_on_the_defaults() -> None:
    config = load_config(None, ["model.blocks=[1, 1]", "train.device=cpu", "augment.flip=false"])
    assert config.model.blocks == [1, 1]
    assert config.train.device == "cpu"
    assert config.augment.flip is False


def test_unknown_key_via_set_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.blok=3"])
    assert str(info.value) == "config: invalid config\nmodel.blok: unknown key"
    with pytest.raises(ConfigError, match=r"optim: unknown key"):
        load_config(None, ["optim.lr=0.1"])


def test_bare_word_for_a_number_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: Input should be a valid integer"):
        load_config(None, ["train.epochs=ten"])


# --------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": {"epochs": "30"}}, "train.epochs: Input should be a valid integer"),
        ({"model": {"blocks": ["3", "5", "3"]}}, "model.blocks.0: Input should be a valid integer"),
        ({"model": {"blocks": [True, True]}}, "model.blocks.0: Input should be a valid integer"),
        ({"data": {"download": "yes"}}, "data.download: Input should be a valid boolean"),
        ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
        ({"data": {"mean": [float("nan"), 0.5, 0.5]}}, "data.mean.0: Input should be a finite number"),
        ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than 0"),
        ({"data": {"val_size": 50_000}}, "val_size (50000) must be smaller than the 50,000 training"),
        ({"data": {"train_subset": 50_001}}, "train_subset (50001) is larger than the 50,000 training"),
        ({"data": {"test_subset": 10_001}}, "test_subset (10001) is larger than the 10,000 test"),
        ({"data": {"train_subset": 100, "val_size": 100}}, "must be smaller than train_subset (100)"),
        ({"train": {"epochs": 3, "warmup_epochs": 3}}, "warmup_epochs (3.0) must be less than epochs (3)"),
        ({"train": {"milestones": [20, 10]}}, "milestones must be positive and increasing, got [20, 10]"),
        ({"train": {"milestones": [10], "schedule": "cosine"}}, "milestones apply to the step and seed"),
        ({"train": {"t_max": 20}}, "t_max applies to the seed schedule only, not 'cosine'"),
        ({"train": {"gamma": 0.5}}, "gamma applies to the step and seed schedules, not 'cosine'"),
        ({"train": {"onecycle_peak": 0.3}}, "onecycle_peak applies to the onecycle schedule only"),
        ({"augment": {"cutout_holes": 3}}, "cutout_holes applies to cutout: set cutout_size too"),
        ({"train": {"lr": 0.1, "min_lr": 1.0}}, "min_lr (1.0) must not exceed lr (0.1)"),
        (
            {"train": {"optimizer": "adamw", "nesterov": True}},
            "nesterov applies to the sgd and muon optimizers only",
        ),
        ({"augment": {"mix_prob": 0.5}}, "mix_prob applies to mixup and cutmix"),
        ({"augment": {"flip": False, "flip_mode": "alternate"}}, "flip_mode = 'alternate' needs flip = true"),
        ({"model": {"conv_kernel": 4}}, "model: conv_kernel: must be a positive odd number, got 4"),
        ({"model": {"downsample": "avg"}}, "model.downsample: Input should be 'stride' or 'pool'"),
        (
            {"model": {"blocks": [1] * 6, "downsample": "pool"}},
            "model: blocks: 6 stages do not fit a 32-pixel map: every stage halves",
        ),
    ],
)
def test_invalid_data_is_refused(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value).startswith("config: invalid config\n")
    assert expected in str(info.value)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nepochs = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: invalid config\ntrain.epochs: Input should be greater than 0"


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nepochs = 3\nlr = = 0.1\n")
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert str(info.value).startswith(f"{path}:3: TOML syntax error: ")
    assert "line" not in str(info.value).removeprefix(f"{path}:3")  # the position is said once


# --------------------------------------------------------------------------------------------
# The parameter budget


def test_budget_error_message() -> None:
    with pytest.raises(BudgetError) as info:
        load_config(None, RESNET18_SET)
    assert BUDGET_MESSAGE in str(info.value)
    assert str(info.value) == f"config: {BUDGET_MESSAGE}"
    assert isinstance(info.value, ConfigError)
    assert info.value.exit_code == 2


def test_budget_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nblocks = [2, 2, 2, 2]\nchannels = [64, 128, 256, 512]\n")
    with pytest.raises(BudgetError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {BUDGET_MESSAGE}"


def test_enforce_budget_false_skips_the_check() -> None:
    config = load_config(None, RESNET18_SET, enforce_budget=False)
    assert config.model.blocks == [2, 2, 2, 2]


def test_raised_budget_lets_resnet18_load() -> None:
    config = load_config(None, [*RESNET18_SET, "model.max_params=12_000_000"])
    assert config.model.max_params == 12_000_000
    with pytest.raises(BudgetError, match="over the 11,173,961 budget by 1"):
        load_config(None, [*RESNET18_SET, "model.max_params=11_173_961"])
    assert load_config(None, [*RESNET18_SET, "model.max_params=11_173_962"]).model.max_params == 11_173_962


def test_lowered_budget_refuses_the_seed_model() -> None:
    with pytest.raises(BudgetError) as info:
        load_config(None, ["model.max_params=4_000_000"])
    assert str(info.value) == "config: model has 4,918,602 parameters, over the 4,000,000 budget by 918,602"


def test_a_run_name_with_a_path_separator_is_refused_unless_read_back_from_a_checkpoint() -> None:
    for name in ("ablation/lr0.1", "a\\b"):
        with pytest.raises(ConfigError, match="holds a path separator; the run folder is named after it"):
            config_from_dict({"name": name})
        # a checkpoint written before the rule still loads: its run folder exists already
        assert config_from_dict({"name": name}, stored=True).name == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (".", "starts with '.': the run folder, named after it, would be hidden"),
        (".hidden", "starts with '.': the run folder, named after it, would be hidden"),
        ("a\nb", "holds a control character; the run folder is named after it"),
        ("tab\there", "holds a control character; the run folder is named after it"),
    ],
)
def test_a_run_name_that_names_an_odd_folder_is_refused(name: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": name})
    assert str(info.value).splitlines()[1:] == [f"name: {name!r} {reason}"]
    assert config_from_dict({"name": name}, stored=True).name == name
    assert config_from_dict({"name": "v1.2_run-A"}).name == "v1.2_run-A"  # dots inside are fine


@pytest.mark.parametrize(
    "data, key",
    [
        ({"name": "a\x00b"}, "name"),
        ({"data": {"root": "/tmp/\x00x"}}, "data.root"),
        ({"data": {"url": "file:///\x00"}}, "data.url"),
    ],
)
def test_text_settings_holding_a_nul_character_are_refused(data, key) -> None:
    # a folder, file or address cannot hold one: refused here rather than by the OS mid-run
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value).splitlines()[1].startswith(f"{key}: ") and "holds a NUL character" in str(
        info.value
    )
