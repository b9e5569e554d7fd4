"""Evaluation: logits, the classification report, loading weights, and the ``eval`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import normalised, randomize_batchnorm_, varied_model
from typer.testing import CliRunner

from cerberus.arch import Architecture
from cerberus.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint
from cerberus.cli import app
from cerberus.config import CIFAR10_MEAN, CIFAR10_STD, ExperimentConfig, config_from_dict, load_config
from cerberus.data import CLASSES, load_cifar10
from cerberus.device import Placement
from cerberus.errors import CerberusError, CheckpointError, ConfigError, DataError
from cerberus.evaluate import (
    TTA_VIEWS,
    TTA_WEIGHTS,
    classification_report,
    confusion_plot,
    evaluate_checkpoint,
    load_model,
    predict_logits,
    write_report,
)
from cerberus.model import build_model

TINY = Architecture(blocks=(1, 1), channels=(8, 16))
CPU = Placement(torch.device("cpu"), "fp32", channels_last=False)
runner = CliRunner()


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(TINY).eval()


def by_hand(model, images, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    with torch.inference_mode():
        return model(normalised(images, mean, std))


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def test_set(fake_cifar):
    data = load_cifar10(fake_cifar, download=False, split="test")
    return data.test_images, data.test_labels


# --------------------------------------------------------------------------------------------
# classification_report


def test_report_on_hand_made_logits():
    classes = ["a", "b", "c", "d"]
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = F.one_hot(predicted, 4).float() * 2.0  # the right class gets 2, the others 0
    report = classification_report(logits, labels, classes)
    assert report["images"] == 6
    assert report["correct"] == 4
    assert report["accuracy"] == 4 / 6
    expected_loss = -math.log(math.exp(2) / (math.exp(2) + 3))
    wrong_loss = -math.log(1 / (math.exp(2) + 3))
    assert report["loss"] == pytest.approx((4 * expected_loss + 2 * wrong_loss) / 6, rel=1e-6)
    assert report["confusion_matrix"] == [
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ]
    rows = {row["class"]: row for row in report["per_class"]}
    assert rows["a"] == {"class": "a", "accuracy": 2 / 3, "precision": 1.0, "recall": 2 / 3, "support": 3}
    assert rows["b"] == {"class": "b", "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "support": 2}
    assert rows["c"] == {"class": "c", "accuracy": 1.0, "precision": 0.5, "recall": 1.0, "support": 1}
    # no image of class d and none predicted as d: undefined, not zero
    assert rows["d"] == {"class": "d", "accuracy": None, "precision": None, "recall": None, "support": 0}


def test_report_rejects_mismatched_inputs():
    with pytest.raises(DataError, match=r"expected \(N, 3\)"):
        classification_report(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long), ["a", "b", "c"])
    with pytest.raises(DataError, match="3 labels for 4 images"):
        classification_report(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), ["a", "b", "c"])
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.2"):
        classification_report(torch.zeros(2, 3), torch.tensor([0, 3]), ["a", "b", "c"])


# --------------------------------------------------------------------------------------------
# predict_logits


def test_predict_logits_matches_the_model_and_reports_progress():
    model = tiny_model().train()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    seen = []
    logits = predict_logits(
        model,
        images,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        placement=CPU,
        batch_size=2,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert logits.dtype == torch.float32 and logits.shape == (5, 10)
    assert model.training  # the caller's mode is restored
    torch.testing.assert_close(logits, by_hand(model.eval(), images), rtol=1e-5, atol=1e-5)


def test_batchnorm_folding_keeps_a_pooling_model_exact():
    # A max-pool sits between conv1 and bn1 in pooling blocks; a negative BatchNorm scale does not
    # commute with it, so those BatchNorms must stay unfolded for the logits to stay the same.
    torch.manual_seed(0)
    arch = Architecture(blocks=(1, 1), channels=(8, 16), downsample="pool")
    model = build_model(arch).eval()
    randomize_batchnorm_(model)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    logits = predict_logits(model, images, mean=CIFAR10_MEAN, std=CIFAR10_STD, placement=CPU)
    torch.testing.assert_close(logits, by_hand(model, images), rtol=1e-5, atol=1e-5)


def test_reduced_precision_and_channels_last_give_float32_logits():
    model = tiny_model(2)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    bf16 = Placement(torch.device("cpu"), "bf16", channels_last=True)
    logits = predict_logits(model, images, mean=CIFAR10_MEAN, std=CIFAR10_STD, placement=bf16, batch_size=3)
    assert logits.dtype == torch.float32 and logits.shape == (4, 10)
    torch.testing.assert_close(logits, by_hand(model, images), rtol=0.05, atol=0.05)


def test_cpu_inference_runs_channels_last_unless_the_layout_is_set(monkeypatch):
    import cerberus.device as device

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))  # no native bf16: fp32
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    auto = device.resolve_placement("cpu")
    assert (auto.precision, auto.channels_last, auto.inference_layout) == ("fp32", False, True)
    assert auto.inference_memory_format == torch.channels_last
    assert auto.describe() == "cpu fp32 NCHW (inference channels_last)"
    for chosen in (False, True):
        placement = device.resolve_placement("cpu", "fp32", chosen)
        assert placement.channels_last is chosen and placement.inference_layout is chosen
    monkeypatch.setattr(device.platform, "machine", lambda: "aarch64")  # not measured there: NCHW
    assert device.resolve_placement("cpu").inference_layout is False


@pytest.mark.parametrize(
    "design,hazard",
    [
        (
            dict(blocks=(1, 1, 1), channels=(4, 8, 16)),
            "layer2.0.shortcut.0 (a strided 1x1 conv reading 4 channels)",
        ),
        (
            dict(blocks=(1, 1, 1), channels=(16, 8, 16)),
            "layer3.0.shortcut.0 (a strided 1x1 conv reading 8 channels)",
        ),
        (
            dict(blocks=(1, 1), channels=(8, 8), conv_kernel=1),
            "layer2.0.conv1 (a strided 1x1 conv reading 8 channels)",
        ),
        (dict(blocks=(1, 1, 1), channels=(4, 8, 16), skip_kernel=3), None),  # 3x3 shortcuts
        (dict(blocks=(1, 1, 1), channels=(4, 8, 16), downsample="pool"), None),  # no strided conv
        (dict(blocks=(1, 1, 1), channels=(16, 32, 64)), None),
        (dict(blocks=(3, 5, 3), channels=(64, 128, 256)), None),
    ],
)
def test_training_on_the_cpu_avoids_onednns_nhwc_fault(monkeypatch, design, hazard):
    """oneDNN (issue #6035) trains a strided 1x1 conv over < 16 channels wrongly in NHWC: auto keeps
    NCHW for such designs, an explicit channels_last is refused; other designs train in NHWC."""
    import cerberus.device as device
    from cerberus.arch import Architecture, nhwc_backward_hazard
    from cerberus.errors import ConfigError

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    arch = Architecture(**design)
    assert nhwc_backward_hazard(arch) == hazard
    auto = device.resolve_placement("cpu", arch=arch)
    assert (auto.channels_last, auto.inference_layout) == (hazard is None, True)
    assert device.resolve_placement("cpu", "fp32", False, arch=arch).channels_last is False
    if hazard is None:
        assert device.resolve_placement("cpu", "fp32", True, arch=arch).channels_last is True
    else:
        with pytest.raises(ConfigError, match=r"train\.channels_last") as err:
            device.resolve_placement("cpu", "fp32", True, arch=arch)
        assert hazard in str(err.value)
        bf16 = device.resolve_placement("cpu", "bf16", arch=arch)  # the fault is not fp32's alone
        assert (bf16.channels_last, bf16.inference_layout) == (False, True)
    monkeypatch.setattr(device.platform, "machine", lambda: "aarch64")  # not measured there: NCHW
    assert device.resolve_placement("cpu", arch=arch).channels_last is False


def test_an_unsafe_channels_last_config_is_refused_before_anything_is_written(tmp_path):
    from cerberus.runner import train_run

    cfg = load_config(None, ["model.blocks=[1,1]", "model.channels=[4,8]", "train.channels_last=true"])
    with pytest.raises(ConfigError, match=r"layer2\.0\.shortcut\.0") as err:
        train_run(cfg, out_dir=tmp_path / "run", data_dir=str(tmp_path / "no-data"))
    assert err.value.exit_code == 2
    assert not (tmp_path / "run").exists()


def test_resuming_a_run_that_trained_in_an_unsafe_layout_says_to_start_again(tmp_path, fake_cifar):
    """A run from before the check: channels_last with a hazardous design. --resume cannot change
    its config, so the advice is a new run."""
    from cerberus.runner import train_run

    cfg = load_config(
        None, ["model.blocks=[1,1]", "model.channels=[4,8]", "train.epochs=1", "data.val_size=10"]
    )
    run = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), evaluate_test=False)
    last = torch.load(run.out_dir / "last.pt", weights_only=True)
    last["config"]["train"]["channels_last"] = True  # as an earlier version let it train
    (run.out_dir / "last.pt.sha256").unlink()
    torch.save(last, run.out_dir / "last.pt")
    with pytest.raises(ConfigError, match=r"start a new run with train\.channels_last = false") as err:
        train_run(resume=run.out_dir / "last.pt")
    assert "this run trains in channels_last, and oneDNN trains layer2.0.shortcut.0" in str(err.value)


def test_inference_layout_leaves_the_live_model_as_it_is():
    # a model training in NCHW is evaluated in channels_last without its own tensors changing
    model = tiny_model(3)
    placement = Placement(torch.device("cpu"), "fp32", False, inference_channels_last=True)
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    logits = predict_logits(model, images, mean=CIFAR10_MEAN, std=CIFAR10_STD, placement=placement)
    assert all(p.is_contiguous() for p in model.parameters())
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights
    torch.testing.assert_close(logits, by_hand(model, images), rtol=1e-5, atol=1e-5)


def test_tta_averages_the_six_documented_views_with_their_weights():
    model = tiny_model(1)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    logits = predict_logits(model, images, mean=CIFAR10_MEAN, std=CIFAR10_STD, placement=CPU, tta=True)
    flipped = images.flip(3)
    padded = [F.pad(x.float(), (1, 1, 1, 1), mode="reflect").to(torch.uint8) for x in (images, flipped)]
    # crop at (2, 2): content moves 1 pixel up and left; at (0, 0): 1 pixel down and right
    up_left = [p[:, :, 2:, 2:] for p in padded]
    down_right = [p[:, :, :32, :32] for p in padded]
    assert torch.equal(up_left[0][:, :, :31, :31], images[:, :, 1:, 1:])
    assert torch.equal(down_right[0][:, :, 1:, 1:], images[:, :, :31, :31])
    plain, mirror = by_hand(model, images), by_hand(model, flipped)
    shifted = sum(by_hand(model, v) for v in up_left + down_right)
    expected = (plain + mirror) / 4 + shifted / 8
    assert len(TTA_VIEWS) == len(TTA_WEIGHTS) == 6 and sum(TTA_WEIGHTS) == 1
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the weights matter: an equal average of the six views is a different figure
    assert not torch.allclose(logits, (plain + mirror + shifted) / 6, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, logits)


def test_predict_logits_rejects_float_images():
    with pytest.raises(DataError, match="uint8"):
        predict_logits(
            tiny_model(), torch.zeros(1, 3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, placement=CPU
        )


# --------------------------------------------------------------------------------------------
# load_model and evaluate_checkpoint


def cerberus_checkpoint(path, *, test_subset: int = 0, eval_batch_size: int = 64, root=None, **payload):
    """A checkpoint as the runner writes it; ``payload`` replaces top-level entries."""
    data = {"test_subset": test_subset, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    if root is not None:
        data["root"] = str(root)
    config = ExperimentConfig.model_validate(
        {
            "model": {"blocks": [1, 1], "channels": [8, 16]},
            "data": data,
            "train": {"device": "cpu", "precision": "fp32", "eval_batch_size": eval_batch_size},
        }
    )
    save_checkpoint(
        path,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": tiny_model(0).state_dict(),
            "ema": tiny_model(1).state_dict(),
            "epoch": 3,
            "step": 0,
            "config": config.to_dict(),
            "architecture": TINY.to_dict(),
            "cerberus_version": "0.1.0",
            **payload,
        },
    )
    return path


def test_load_model_prefers_ema_weights(tmp_path):
    path = cerberus_checkpoint(tmp_path / "last.pt")
    model, info = load_model(path)
    assert info["source"] == "cerberus" and info["weights"] == "ema"
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert torch.equal(model.state_dict()["linear.weight"], tiny_model(1).state_dict()["linear.weight"])
    model, info = load_model(path, use_ema=False)
    assert info["weights"] == "model"
    assert torch.equal(model.state_dict()["linear.weight"], tiny_model(0).state_dict()["linear.weight"])
    with pytest.raises(ConfigError, match=r"records its architecture; design overrides \(pool_size\)"):
        load_model(path, overrides={"pool_size": 4})


@pytest.mark.parametrize(
    ("field", "value", "wanted"),
    [
        ("conv_kernel", "3", "a whole number"),
        ("pool_size", 32.0, "a whole number"),
        ("num_classes", True, "a whole number"),
        ("blocks", [1, "1"], "a list of whole numbers"),
        ("channels", 16, "a list of whole numbers"),
        ("downsample", 1, "a string"),
    ],
)
def test_a_recorded_architecture_of_the_wrong_type_is_refused(tmp_path, field, value, wanted):
    path = cerberus_checkpoint(tmp_path / "best.pt", architecture={**TINY.to_dict(), field: value})
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: the recorded architecture is invalid (model.{field}: must be {wanted}, got {value!r})"
    )


def test_an_unsound_recorded_architecture_is_refused(tmp_path):
    path = cerberus_checkpoint(tmp_path / "best.pt", architecture={**TINY.to_dict(), "blocks": [1, 0]})
    with pytest.raises(CheckpointError, match=r"invalid \(model\.blocks: every stage needs at least 1 block"):
        load_model(path)


def test_a_checkpoint_copied_without_its_sidecar_loads_with_a_note(tmp_path):
    import shutil

    (tmp_path / "run").mkdir()
    path = cerberus_checkpoint(tmp_path / "run" / "best.pt")
    assert load_model(path)[1]["notes"] == []
    (tmp_path / "copy").mkdir()
    alone = Path(shutil.copy(path, tmp_path / "copy" / "best.pt"))
    assert load_model(alone)[1]["notes"] == [
        "best.pt has no best.pt.sha256 beside it, so its checksum was not verified; copy the "
        "sidecar along with the checkpoint"
    ]


def test_best_pt_of_an_ema_run_holds_ema_weights_only(tmp_path):
    # best.pt of an EMA run: the EMA weights under "model", no raw weights
    path = cerberus_checkpoint(
        tmp_path / "best.pt", model=tiny_model(1).state_dict(), ema=None, weights="ema", role="best"
    )
    model, info = load_model(path)
    assert info["weights"] == "ema"
    assert torch.equal(model.state_dict()["linear.weight"], tiny_model(1).state_dict()["linear.weight"])
    with pytest.raises(CheckpointError) as err:
        load_model(path, use_ema=False)
    assert str(err.value) == (
        f"{path} holds the EMA weights only (best.pt of an EMA run keeps no raw weights); "
        "to evaluate the raw weights, use the run's last.pt with --no-ema"
    )
    # without EMA, best.pt holds the raw weights: --no-ema is no contradiction
    plain = cerberus_checkpoint(tmp_path / "plain.pt", ema=None, weights="model", role="best")
    assert load_model(plain, use_ema=False)[1]["weights"] == "model"


def test_a_recorded_data_root_that_is_gone_is_named(tmp_path, fake_cifar, monkeypatch):
    gone = tmp_path / "moved-away"
    path = cerberus_checkpoint(tmp_path / "best.pt", test_subset=20, root=gone)
    monkeypatch.setenv("CERBERUS_DATA", str(fake_cifar))  # a fallback that must not be taken
    with pytest.raises(DataError) as err:
        evaluate_checkpoint(path)
    assert (
        str(err.value) == f"data.root {gone} recorded in the checkpoint does not exist here; pass --data-dir"
    )
    assert evaluate_checkpoint(path, data_dir=fake_cifar)["images"] == 20


def test_unusable_weights_are_refused_with_the_reason(tmp_path, fake_cifar):
    state = tiny_model().state_dict()
    state["bn1.running_var"][2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan\.pt: weight 'bn1\.running_var' holds NaN"):
        load_model(tmp_path / "nan.pt")
    torch.manual_seed(0)
    seven = build_model(Architecture(blocks=(1,), channels=(4,), num_classes=7))
    torch.save(seven.state_dict(), tmp_path / "7.pt")
    with pytest.raises(CheckpointError, match="the model has 7 outputs but the dataset has 10 classes"):
        evaluate_checkpoint(tmp_path / "7.pt", data_dir=fake_cifar)


def test_weights_whose_outputs_overflow_are_refused(tmp_path, fake_cifar):
    state = tiny_model().state_dict()
    # Finite weights that overflow on every image: the last block's output is 1e30 everywhere.
    state["layer2.0.bn2.weight"].zero_()
    state["layer2.0.bn2.bias"].fill_(1e30)
    state["linear.weight"][0] = 1e10
    torch.save(state, tmp_path / "huge.pt")
    message = r"huge\.pt: the model's outputs are not finite for 200 of 200 "
    with pytest.raises(CheckpointError, match=message):
        evaluate_checkpoint(tmp_path / "huge.pt", data_dir=fake_cifar)
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path / "huge.pt"), "--data-dir", str(fake_cifar), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1 and "not finite for 200 of 200 images (in fp32)" in result.stderr
    assert not (tmp_path / "r").exists()
    with pytest.raises(CheckpointError, match=r"\(in bf16\): bf16's range may be .*try --precision fp32"):
        evaluate_checkpoint(tmp_path / "huge.pt", data_dir=fake_cifar, test_subset=20, precision="bf16")


def test_evaluation_of_a_cerberus_checkpoint_uses_its_config(tmp_path, fake_cifar, test_set):
    path = cerberus_checkpoint(tmp_path / "best.pt", test_subset=50, eval_batch_size=16)
    result = evaluate_checkpoint(path, data_dir=fake_cifar)
    images, labels = test_set
    assert result["images"] == 50 and result["batch_size"] == 16
    assert (result["device"], result["precision"], result["weights"]) == ("cpu", "fp32", "ema")
    # what the training loop computes: the same two functions, the same settings
    logits = predict_logits(
        tiny_model(1), images[:50], mean=[0.5] * 3, std=[0.25] * 3, placement=CPU, batch_size=16
    )
    expected = classification_report(logits, labels[:50], CLASSES)
    assert result["accuracy"] == expected["accuracy"]
    assert result["loss"] == expected["loss"]
    assert result["confusion_matrix"] == expected["confusion_matrix"]


def test_a_checkpoint_whose_config_an_earlier_version_accepted_still_evaluates(tmp_path, fake_cifar):
    # settings that earlier versions accepted and ignored, and that new configs refuse
    stored = {
        "model": {"blocks": [1, 1], "channels": [8, 16]},
        "data": {"test_subset": 20},
        "train": {"device": "cpu", "schedule": "onecycle", "milestones": [2], "eval_batch_size": 10},
    }
    with pytest.raises(ConfigError, match="milestones apply to the step and seed schedules"):
        config_from_dict(stored)
    assert config_from_dict(stored, stored=True).train.milestones == [2]
    path = cerberus_checkpoint(tmp_path / "old.pt", config=stored)
    result = evaluate_checkpoint(path, data_dir=fake_cifar)
    assert result["images"] == 20


def test_confusion_plot_writes_a_png(tmp_path):
    path = confusion_plot([[3, 1], [0, 2]], ["cat", "dog"], tmp_path)
    assert path == tmp_path / "confusion.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_writes_the_plot_and_the_json(tmp_path):
    result = {"accuracy": 0.5, "per_class": [{"class": "cat"}, {"class": "dog"}]}
    result["confusion_matrix"] = [[1, 1], [1, 1]]
    out = tmp_path / "a" / "b"
    assert write_report(result, out) == [out / "confusion.png", out / "eval.json"]
    saved = json.loads((out / "eval.json").read_text())
    assert saved == {**result, "files": [str(out / "confusion.png"), str(out / "eval.json")]}
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CerberusError, match=r"could not write into .*eval\.json"):
        write_report(result, out / "eval.json")  # a file, not a folder


# --------------------------------------------------------------------------------------------
# The eval command


def test_eval_json_on_a_plain_state_dict(tmp_path, fake_cifar, test_set):
    images, labels = test_set
    model = varied_model(TINY, normalised(images))
    weights = tmp_path / "varied.pt"
    torch.save(model.state_dict(), weights)
    args = ["eval", str(weights), "--data-dir", str(fake_cifar), "--json", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--precision", "fp32"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("accuracy", "loss", "images", "per_class", "confusion_matrix", "images_per_sec", "views"):
        assert key in report
    # the figures by hand: the model on the images normalised with the documented CIFAR-10 mean/std
    logits = by_hand(model, images)
    predicted = logits.argmax(1)
    assert len(set(predicted.tolist())) > 1  # a model that predicts one class hides preprocessing faults
    correct = (predicted == labels).sum().item()
    assert report["images"] == len(labels) == 200
    assert report["correct"] == correct
    assert report["accuracy"] == correct / len(labels)
    expected_loss = -logits.log_softmax(1).gather(1, labels.long()[:, None]).mean().item()
    assert report["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert report["source"] == "state_dict" and report["views"] == 1
    confusion = torch.zeros(10, 10, dtype=torch.long)
    for true, guess in zip(labels.tolist(), predicted.tolist()):
        confusion[true, guess] += 1
    assert report["confusion_matrix"] == confusion.tolist()
    assert [row["support"] for row in report["per_class"]] == torch.bincount(labels, minlength=10).tolist()


@pytest.mark.parametrize(
    "flags,bar", [((), True), (("--quiet",), False), (("-q",), False), (("--json",), False)]
)
def test_eval_progress_bar_follows_quiet_and_json(weights, fake_cifar, monkeypatch, flags, bar):
    import cerberus.cli.evaluate as cli_evaluate

    asked = []
    real = cli_evaluate._progress_bar

    def recording(enabled, description):
        asked.append(enabled)
        return real(enabled, description)

    monkeypatch.setattr(cli_evaluate, "_progress_bar", recording)
    args = ["eval", str(weights), "--data-dir", str(fake_cifar), "--test-subset", "20", *flags]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert asked == [bar]


def test_eval_table_and_out_folder(weights, fake_cifar, tmp_path):
    out = tmp_path / "report"
    args = [
        "eval",
        str(weights),
        "--data-dir",
        str(fake_cifar),
        "--test-subset",
        "30",
        "--tta",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "accuracy" in result.stdout and "confusion matrix" in result.stdout and "airplane" in result.stdout
    assert "TTA over 6 views" in result.stdout
    saved = json.loads((out / "eval.json").read_text())
    assert saved["images"] == 30 and saved["tta"] is True
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_overrides_reach_inference(weights, fake_cifar, tmp_path):
    args = ["--data-dir", str(fake_cifar), "--test-subset", "10", "--json"]
    # one stage, no projection shortcut: the weights cannot show K, the flag settles it
    torch.manual_seed(0)
    one_stage = tmp_path / "one-stage.pt"
    torch.save(build_model(Architecture(blocks=(1,), channels=(8,))).state_dict(), one_stage)
    result = runner.invoke(app, ["eval", str(one_stage), *args, "--skip-kernel", "3"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["architecture"]["skip_kernel"] == 3
    # overrides win over what the weights show, so a wrong one is reported
    result = runner.invoke(app, ["eval", str(weights), *args, "--skip-kernel", "3"])
    assert result.exit_code == 2  # a usage error, like --blocks below, named by its flag
    assert result.stderr.startswith(
        "Error: --skip-kernel: the weights do not fit the design with skip_kernel = 3 ("
    )
    assert "'layer2.0.shortcut.0.weight' has shape [16, 8, 1, 1] but the architecture needs" in result.stderr
    result = runner.invoke(app, ["eval", str(weights), *args, "--skip-kernel", "3", "--pool-size", "4"])
    assert result.exit_code == 2
    assert "Error: design overrides: the weights do not fit the design with " in result.stderr
    # the weights always show the blocks: a different count is named by its flag
    result = runner.invoke(app, ["eval", str(weights), *args, "--blocks", "2", "2"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --blocks: the weights have blocks [1, 1], not [2, 2]\n"
    result = runner.invoke(app, ["eval", str(weights), *args, "--conv-kernel", "2"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --conv-kernel: must be a positive odd number, got 2\n"


def test_eval_notes_weights_that_fit_a_pooling_design_too(weights, fake_cifar, tmp_path):
    args = ["--data-dir", str(fake_cifar), "--test-subset", "10"]
    result = runner.invoke(app, ["eval", str(weights), *args])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("Note: these weights fit a strided and a max-pooling ResNet alike")
    result = runner.invoke(app, ["eval", str(weights), *args, "--json"])
    assert len(json.loads(result.stdout)["notes"]) == 1
    # said explicitly, or shown by the weights (a stage that keeps its width): no note
    result = runner.invoke(app, ["eval", str(weights), *args, "--downsample", "stride"])
    assert result.exit_code == 0 and result.stderr == ""
    torch.manual_seed(0)
    shown = tmp_path / "pool.pt"
    pool = Architecture(blocks=(1, 1), channels=(8, 8), downsample="pool")
    torch.save(build_model(pool).state_dict(), shown)
    result = runner.invoke(app, ["eval", str(shown), *args, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"]["downsample"] == "pool" and report["notes"] == []


def test_eval_refuses_an_unwritable_report_folder_before_evaluating(weights, fake_cifar, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["eval", str(weights), "--data-dir", str(fake_cifar), "--out", str(blocker)])
    assert result.exit_code == 2  # the request, not the machine: a usage error
    assert result.stderr == f"Error: {blocker} is a file; give a folder for the report\n"
    result = runner.invoke(app, ["eval", str(weights), "--data-dir", str(fake_cifar),
                                 "--out", str(blocker / "report")])  # fmt: skip
    assert result.exit_code == 1
    expected = f"Error: cannot write into {blocker / 'report'}: {blocker} is not a writable folder\n"
    assert result.stderr == expected


def test_eval_refuses_a_report_folder_holding_a_folder_where_a_file_goes(weights, fake_cifar, tmp_path):
    for name in ("eval.json", "confusion.png"):
        out = tmp_path / name.split(".")[0]
        (out / name).mkdir(parents=True)
        args = ["eval", str(weights), "--data-dir", str(fake_cifar), "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert result.stderr == f"Error: {out / name} is a folder; the report writes a file there\n"
        assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written beside it


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_eval_refuses_a_report_folder_that_takes_no_files_before_evaluating(weights, fake_cifar):
    # /proc takes no new files, for root too: permission bits would not tell (root passes them)
    result = runner.invoke(app, ["eval", str(weights), "--data-dir", str(fake_cifar), "--out", "/proc/r"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot write into /proc/r: /proc is not a writable folder (")


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    from cerberus.evaluate import write_report

    result = {"per_class": [{"class": "cat"}, {"class": "dog"}], "confusion_matrix": [[3, 1], [0, 2]]}
    (tmp_path / "eval.json").mkdir()  # the second file cannot be written: the first stays away
    with pytest.raises(CerberusError, match=r"could not write .*eval\.json: Is a directory"):
        write_report(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    (tmp_path / "eval.json").rmdir()
    files = write_report(result, tmp_path)
    assert [p.name for p in files] == ["confusion.png", "eval.json"]
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "eval.json").read_text())["files"] == [str(p) for p in files]


def test_eval_refuses_a_pickled_module_and_trust_pickle_loads_it(tmp_path, fake_cifar):
    path = tmp_path / "seed.pt"
    torch.save({"net": tiny_model()}, path)
    args = ["eval", str(path), "--data-dir", str(fake_cifar), "--test-subset", "10", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "arbitrary code" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(app, [*args, "--trust-pickle"])
    assert result.exit_code == 0, result.stderr
    assert "Warning: --trust-pickle" in result.stderr
    assert json.loads(result.stdout)["images"] == 10


def test_eval_errors_are_one_line(tmp_path, fake_cifar):
    result = runner.invoke(app, ["eval", str(tmp_path / "missing.pt"), "--data-dir", str(fake_cifar)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'missing.pt'}: no such checkpoint file\n"
    bad = tmp_path / "bad.pt"
    bad.write_text("not weights")
    result = runner.invoke(app, ["eval", str(bad), "--data-dir", str(fake_cifar)])
    assert result.exit_code == 1 and "is not a PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["eval", str(bad), "--device", "tpu"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --device: choose one of auto, cpu, cuda, mps, got 'tpu'\n"


def test_eval_errors_name_the_flag(weights, fake_cifar):
    args = ["eval", str(weights), "--data-dir", str(fake_cifar)]
    result = runner.invoke(app, [*args, "--test-subset", "100000"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --test-subset: 100000 is more than the 200 test images\n"
    result = runner.invoke(app, [*args, "--downsample", "avg"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --downsample: must be 'stride' or 'pool', got 'avg'\n"
    same = weights.parent / "same.pt"  # a strided stage of the same width: a projection no pooling design has
    torch.save(build_model(Architecture(blocks=(1, 1), channels=(16, 16))).state_dict(), same)
    result = runner.invoke(app, ["eval", str(same), "--data-dir", str(fake_cifar), "--downsample", "pool"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        "Error: --downsample: the weights do not fit the design with downsample = 'pool' ("
    )
    result = runner.invoke(app, [*args, "--device", "cpu", "--precision", "fp16"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --precision: fp16 is not supported on the CPU; use bf16 or fp32\n"
    if torch.cuda.is_available():
        pytest.skip("--device cuda is refused only on a machine without CUDA")
    result = runner.invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --device: 'cuda' was asked for, but no CUDA GPU is available\n"
