"""The Kaggle test file: both layouts, safe unpickling, clear errors, and ``cerberus predict``."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import normalised, varied_model
from torch import nn
from typer.testing import CliRunner

from cerberus.arch import Architecture
from cerberus.cli import app
from cerberus.data import CLASSES
from cerberus.errors import CerberusError, CheckpointError, ConfigError, DataError
from cerberus.kaggle import predict_unlabeled, read_unlabeled, write_probabilities, write_submission
from cerberus.model import build_model

N = 12
runner = CliRunner()


def images_chw() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(N, 3, 32, 32), dtype=np.uint8)


def write_pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def layout_2024(path, **extra):
    """cifar_test_nolabels.pkl: N x 3072 channel-major rows."""
    obj = {b"data": images_chw().reshape(N, 3072), b"ids": np.arange(100, 100 + N), **extra}
    return write_pickle(path, obj)


def layout_2025(path, protocol=pickle.DEFAULT_PROTOCOL):
    """cifar_test_nolabel.pkl: N x 32 x 32 x 3, channels last."""
    hwc = np.ascontiguousarray(images_chw().transpose(0, 2, 3, 1))
    return write_pickle(path, {b"data": hwc, b"ids": np.arange(100, 100 + N)}, protocol)


def kaggle_inputs() -> torch.Tensor:
    """The Kaggle test images, normalised by hand."""
    return normalised(images_chw())


def by_hand(model: nn.Module, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The model's logits on uint8 images normalised by hand (no Cerberus code on the way)."""
    with torch.inference_mode():
        return model(normalised(images))


def read_probs(path) -> torch.Tensor:
    rows = read_csv(path)
    assert rows[0] == ["ID", *CLASSES]
    return torch.tensor([[float(p) for p in row[1:]] for row in rows[1:]])


# The CLI runs on the CPU in fp32, as the hand-made figures are computed
FP32 = ["--device", "cpu", "--precision", "fp32"]
TINY = Architecture(blocks=(1, 1), channels=(8, 16))


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(varied_model(TINY, kaggle_inputs()).state_dict(), path)
    return path


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as file:
        return list(csv.reader(file))


class Marker:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_both_layouts_give_the_same_images(tmp_path, protocol):
    ids_a, a = read_unlabeled(layout_2024(tmp_path / "nolabels.pkl"))
    ids_b, b = read_unlabeled(layout_2025(tmp_path / "nolabel.pkl", protocol))
    assert a.dtype == torch.uint8 and a.shape == (N, 3, 32, 32)
    assert torch.equal(a, torch.from_numpy(images_chw()))
    assert torch.equal(a, b)
    assert ids_a == ids_b == list(range(100, 100 + N))


def test_str_keys_and_default_ids(tmp_path):
    path = write_pickle(tmp_path / "t.pkl", {"data": images_chw().reshape(N, 3072)})
    ids, images = read_unlabeled(path)
    assert ids == list(range(N))
    assert torch.equal(images, torch.from_numpy(images_chw()))


def test_layout_override_reinterprets_each_image(tmp_path):
    path = layout_2025(tmp_path / "nolabel.pkl")
    _, images = read_unlabeled(path, layout="chw")
    hwc = images_chw().transpose(0, 2, 3, 1)
    assert torch.equal(images, torch.from_numpy(np.ascontiguousarray(hwc).reshape(N, 3, 32, 32)))
    _, images = read_unlabeled(layout_2024(tmp_path / "nolabels.pkl"), layout="hwc")
    rows = images_chw().reshape(N, 32, 32, 3).transpose(0, 3, 1, 2)
    assert torch.equal(images, torch.from_numpy(np.ascontiguousarray(rows)))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "MARKER"
    path = write_pickle(tmp_path / "evil.pkl", {b"data": Marker(marker)})
    with pytest.raises(DataError, match=r"holds Python objects other than numpy arrays \(io\.open\)"):
        read_unlabeled(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Writing


def test_write_submission_and_probabilities(tmp_path):
    write_submission(tmp_path / "sub.csv", [7, 8, 9], torch.tensor([3, 0, 9]))
    assert (tmp_path / "sub.csv").read_text() == "ID,Labels\n7,3\n8,0\n9,9\n"
    probs = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    write_probabilities(tmp_path / "p.csv", ["a", "b"], probs, ["cat", "dog"])
    assert (tmp_path / "p.csv").read_text() == "ID,cat,dog\na,0.250000,0.750000\nb,1.000000,0.000000\n"
    with pytest.raises(DataError, match="3 ids but 2 labels"):
        write_submission(tmp_path / "bad.csv", [1, 2, 3], [0, 1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "sub.csv"]


# --------------------------------------------------------------------------------------------
# cerberus predict


def test_predict_gives_identical_submissions_for_both_layouts(tmp_path, weights):
    model = varied_model(TINY, kaggle_inputs())
    logits = by_hand(model, images_chw())
    expected_labels = logits.argmax(1).tolist()
    assert len(set(expected_labels)) > 1  # else any preprocessing would give the same submission
    outputs = []
    for name, writer in (("nolabels.pkl", layout_2024), ("nolabel.pkl", layout_2025)):
        out, probs = tmp_path / f"{name}.csv", tmp_path / f"{name}.probs.csv"
        result = runner.invoke(app, ["predict", str(weights), "--input", str(writer(tmp_path / name)),
                                     "--output", str(out), "--probs", str(probs), *FP32])  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert f"wrote {N} predictions" in result.stdout
        outputs.append(read_csv(out))
        # the probabilities are the softmax of the model's logits on the normalised images
        torch.testing.assert_close(read_probs(probs), logits.softmax(1), rtol=0, atol=1e-5)
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == ["ID", "Labels"]
    assert [row[0] for row in outputs[0][1:]] == [str(i) for i in range(100, 100 + N)]
    # the labels are the model's own argmax on the normalised images
    assert [int(row[1]) for row in outputs[0][1:]] == expected_labels


def tta_logits_by_hand(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """The documented 6-view average of logits: the image and its mirror 1/4 each, and both moved
    1 pixel up-left and 1 pixel down-right (borders reflected) 1/8 each."""
    image = torch.from_numpy(images)
    mirror = image.flip(3)
    # moved up-left: pixel (i, j) shows (i + 1, j + 1); the last row/column reflects back to 30
    up_left = [*range(1, 32), 30]
    # moved down-right: pixel (i, j) shows (i - 1, j - 1); the first row/column reflects to 1
    down_right = [1, *range(0, 31)]
    views = [(image, 1 / 4), (mirror, 1 / 4)]
    for index in (up_left, down_right):
        for view in (image, mirror):
            views.append((view[:, :, index][:, :, :, index], 1 / 8))
    return sum(weight * by_hand(model, view) for view, weight in views)


def test_predict_json_probabilities_and_tta(tmp_path, weights):
    source = layout_2025(tmp_path / "nolabel.pkl")
    model = varied_model(TINY, kaggle_inputs())
    reports, probabilities, submissions = {}, {}, {}
    for flag in ("--tta", "--no-tta"):
        out, probs = tmp_path / f"sub{flag}.csv", tmp_path / f"probs{flag}.csv"
        args = ["predict", str(weights), "--input", str(source), "--output", str(out), "--probs", str(probs)]
        result = runner.invoke(app, [*args, flag, "--json", *FP32])
        assert result.exit_code == 0, result.stderr
        reports[flag] = json.loads(result.stdout)
        rows = read_csv(probs)
        assert len(rows) == N + 1 and [row[0] for row in rows[1:]] == [str(i) for i in range(100, 100 + N)]
        probabilities[flag] = read_probs(probs)
        submissions[flag] = [int(row[1]) for row in read_csv(out)[1:]]
        assert submissions[flag] == probabilities[flag].argmax(1).tolist()
    report = reports["--tta"]
    assert report["images"] == N and report["layout"] == "hwc" and report["views"] == 6 and report["tta"]
    assert reports["--no-tta"]["views"] == 1 and not reports["--no-tta"]["tta"]
    assert sum(report["predicted_counts"].values()) == N
    assert report["predicted_counts"] == {
        name: submissions["--tta"].count(c) for c, name in enumerate(CLASSES)
    }
    assert torch.allclose(probabilities["--tta"].sum(1), torch.ones(N), atol=1e-5)
    # the TTA probabilities are the softmax of the documented weighted average of the views' logits
    expected = tta_logits_by_hand(model, images_chw()).softmax(1)
    assert len(set(expected.argmax(1).tolist())) > 1
    torch.testing.assert_close(probabilities["--tta"], expected, rtol=0, atol=1e-5)
    assert submissions["--tta"] == expected.argmax(1).tolist()
    plain = by_hand(model, images_chw()).softmax(1)
    torch.testing.assert_close(probabilities["--no-tta"], plain, rtol=0, atol=1e-5)
    # and TTA changes them: a test that cannot tell the two apart tests no TTA at all
    assert (probabilities["--tta"] - probabilities["--no-tta"]).abs().max() > 0.01


def test_a_pickle_of_the_images_alone_is_read_with_ids_in_order(tmp_path):
    for images in (images_chw().reshape(N, 3072), images_chw().transpose(0, 2, 3, 1)):
        ids, read = read_unlabeled(write_pickle(tmp_path / "bare.pkl", np.ascontiguousarray(images)))
        assert ids == list(range(N))
        assert torch.equal(read, torch.from_numpy(images_chw()))
    with pytest.raises(
        DataError, match=r"bare.pkl: the array it holds has shape \[12, 100\]; expected N x 3072"
    ):
        read_unlabeled(write_pickle(tmp_path / "bare.pkl", images_chw().reshape(N, 3072)[:, :100]))


def test_a_npy_file_of_the_images_is_read_and_one_of_objects_is_refused(tmp_path):
    for images in (images_chw().reshape(N, 3072), images_chw().transpose(0, 2, 3, 1)):
        np.save(tmp_path / "test.npy", np.ascontiguousarray(images))
        ids, read = read_unlabeled(tmp_path / "test.npy")
        assert ids == list(range(N))
        assert torch.equal(read, torch.from_numpy(images_chw()))
    objects = np.array([Marker(tmp_path / "MARKER")], dtype=object)
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    with pytest.raises(DataError, match=r"objects\.npy: a \.npy file that is not an array of numbers"):
        read_unlabeled(tmp_path / "objects.npy")
    assert not (tmp_path / "MARKER").exists()


def bad_inputs(tmp_path) -> list[tuple[object, str]]:
    good = images_chw().reshape(N, 3072)
    return [
        ("text", "is not a pickle file"),
        (b"", "is empty or truncated"),
        (
            [1, 2, 3],
            "holds a list; expected a dict with 'data' (and optionally 'ids'), or an array of images",
        ),
        ({b"ids": np.arange(N)}, "has no 'data' entry (found keys: 'ids')"),
        ({b"data": good[:, :100]}, "'data' has shape [12, 100]; expected N x 3072"),
        ({b"data": good.astype(np.float32) / 255}, "'data' has dtype float32; expected uint8"),
        ({b"data": good, b"ids": np.arange(N - 1)}, "has 11 ids but 12 images"),
        ({b"data": good, b"ids": [*range(N - 1), 3]}, "id 3 appears more than once"),
        ({b"data": good[:0]}, "holds no images"),
        ({b"data": Marker(tmp_path / "MARKER")}, "could run arbitrary code"),
    ]


def test_each_bad_input_gets_its_own_message(tmp_path, weights):
    for i, (content, message) in enumerate(bad_inputs(tmp_path)):
        path = tmp_path / f"bad{i}.pkl"
        if content == "text":
            path.write_text("ID,Labels\n1,2\n")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_pickle(path, content)
        out, probs = tmp_path / "x.csv", tmp_path / "p.csv"  # absolute: a relative name would land in the cwd
        result = runner.invoke(app, ["predict", str(weights), "--input", str(path), "--output", str(out),
                                     "--probs", str(probs)])  # fmt: skip
        assert result.exit_code == 1, message
        assert result.stderr.startswith("Error: "), result.stderr
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.output
        assert not out.exists() and not probs.exists(), message
    assert not (tmp_path / "MARKER").exists()


def test_predict_checks_the_model_and_the_output_before_the_input(tmp_path, weights):
    missing_input = str(tmp_path / "nope.pkl")
    result = runner.invoke(app, ["predict", str(tmp_path / "gone.pt"), "--input", missing_input,
                                 "--output", str(tmp_path / "sub.csv")])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'gone.pt'}: no such checkpoint file\n"
    no_folder = tmp_path / "no-such-folder" / "sub.csv"
    result = runner.invoke(app, ["predict", str(weights), "--input", missing_input,
                                 "--output", str(no_folder)])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == f"Error: cannot write {no_folder}: the folder {no_folder.parent} does not exist\n"


def test_an_output_that_is_a_folder_is_a_usage_error(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    result = runner.invoke(app, ["predict", str(weights), "--input", str(source), "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == f"Error: {tmp_path} is a folder; give a file name for the CSV\n"


def test_a_missing_output_folder_is_refused_before_inference(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    seen = []
    with pytest.raises(CerberusError, match=r"the folder .*missing does not exist"):
        predict_unlabeled(weights, source, tmp_path / "sub.csv", probs_path=tmp_path / "missing" / "p.csv",
                          progress=lambda done, total: seen.append(done))  # fmt: skip
    assert seen == []  # no image was predicted
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_files_is_refused_before_inference_and_keeps_the_last_submission(
    tmp_path, weights
):
    # /proc takes no new files, for root too: permission bits would not tell (root passes them)
    source = layout_2024(tmp_path / "t.pkl")
    (tmp_path / "sub.csv").write_text("ID,Labels\n0,3\n")
    seen = []
    message = r"cannot write /proc/p\.csv: the folder /proc is not writable \("
    with pytest.raises(CerberusError, match=message):
        predict_unlabeled(weights, source, tmp_path / "sub.csv", probs_path=Path("/proc/p.csv"),
                          progress=lambda done, total: seen.append(done))  # fmt: skip
    assert seen == []
    assert (tmp_path / "sub.csv").read_text() == "ID,Labels\n0,3\n"


def test_an_output_through_a_link_writes_the_linked_file_and_keeps_the_link(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    (tmp_path / "target.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to("target.csv")
    predict_unlabeled(weights, source, tmp_path / "link.csv")
    assert (tmp_path / "link.csv").is_symlink()
    assert len(read_csv(tmp_path / "target.csv")) == N + 1


@pytest.mark.parametrize(("as_json", "name"), [(False, "/dev/stdout"), (True, "/dev/stdout"), (False, "-")])
def test_a_submission_to_stdout_is_the_csv_alone_the_report_going_to_stderr(tmp_path, weights, as_json, name):
    import subprocess
    import sys

    source = layout_2024(tmp_path / "t.pkl")
    args = ["predict", str(weights), "--input", str(source), "--output", name, "-q"]
    done = subprocess.run(
        [sys.executable, "-m", "cerberus", *args, *(["--json"] if as_json else [])],
        cwd=tmp_path,  # where a file named "-" would land
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = list(csv.reader(done.stdout.splitlines()))
    assert rows[0] == ["ID", "Labels"] and len(rows) == N + 1
    report = json.loads(done.stderr)["output"] if as_json else done.stderr
    assert "/dev/stdout" in report
    assert not (tmp_path / "-").exists()


def test_an_output_that_is_a_fifo_is_written_into_not_replaced(tmp_path, weights):
    import os
    import threading

    source = layout_2024(tmp_path / "t.pkl")
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    received = []
    # a daemon: were the FIFO replaced, its reader would wait for a writer for ever
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    predict_unlabeled(weights, source, fifo)
    assert fifo.is_fifo()
    reader.join(timeout=30)
    assert received[0].splitlines()[0] == "ID,Labels" and len(received[0].splitlines()) == N + 1


def test_weights_whose_outputs_overflow_write_no_submission(tmp_path):
    torch.manual_seed(0)
    state = build_model(Architecture(blocks=(1, 1), channels=(8, 16))).state_dict()
    # Finite weights that overflow on every image: the last block's output is 1e30 everywhere.
    state["layer2.0.bn2.weight"].zero_()
    state["layer2.0.bn2.bias"].fill_(1e30)
    state["linear.weight"][0] = 1e10
    torch.save(state, tmp_path / "huge.pt")
    source = layout_2024(tmp_path / "t.pkl")
    message = rf"huge\.pt: the model's outputs are not finite for {N} of {N} "
    with pytest.raises(CheckpointError, match=message):
        predict_unlabeled(tmp_path / "huge.pt", source, tmp_path / "sub.csv", probs_path=tmp_path / "p.csv")
    assert not (tmp_path / "sub.csv").exists() and not (tmp_path / "p.csv").exists()


def test_predict_never_overwrites_a_binary_file(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(weights.read_bytes())
    for flag in ("--output", "--probs"):
        outputs = {"--output": tmp_path / "sub.csv", "--probs": tmp_path / "p.csv", flag: checkpoint}
        args = [str(weights), "--input", str(source), *(x for kv in outputs.items() for x in map(str, kv))]
        result = runner.invoke(app, ["predict", *args])
        assert result.exit_code == 2
        assert (
            result.stderr
            == f"Error: {checkpoint} holds binary data (a checkpoint?), not a CSV; give another file name\n"
        )
        assert checkpoint.read_bytes() == weights.read_bytes()
    (tmp_path / "sub.csv").write_text("id,label\n")  # an earlier submission is replaced
    result = runner.invoke(
        app, ["predict", str(weights), "--input", str(source), "--output", str(tmp_path / "sub.csv")]
    )
    assert result.exit_code == 0 and len(read_csv(tmp_path / "sub.csv")) == N + 1


def test_an_output_under_a_file_says_so(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CerberusError, match=r"afile/x\.csv: .*afile is a file, not a folder"):
        predict_unlabeled(weights, source, tmp_path / "afile" / "x.csv")


def test_predict_flag_errors(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    out = tmp_path / "o.csv"  # absolute: a relative name would land in the cwd, not under tmp_path
    result = runner.invoke(app, ["predict", str(weights), "--input", str(source), "--output", str(out),
                                 "--layout", "nhwc"])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == "Error: --layout: choose chw or hwc, got 'nhwc'\n"
    assert not out.exists()
    result = runner.invoke(app, ["predict", str(weights), "--input", str(tmp_path / "nope.pkl"),
                                 "--output", str(out)])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'nope.pkl'}: no such file\n"
    assert not out.exists()


def test_predict_takes_the_design_of_a_plain_state_dict_from_flags(tmp_path, monkeypatch):
    """Every stage widens, so strided and pooling designs have the same tensors: the flag decides."""
    model = varied_model(Architecture(blocks=(1, 1), channels=(8, 16), downsample="pool"), kaggle_inputs())
    weights = tmp_path / "pool.pt"
    torch.save(model.state_dict(), weights)
    logits = by_hand(model, images_chw())
    expected_labels = logits.argmax(1).tolist()
    assert len(set(expected_labels)) > 1
    source = layout_2024(tmp_path / "t.pkl")
    monkeypatch.chdir(tmp_path)  # --output defaults to submission.csv here
    result = runner.invoke(app, ["predict", str(weights), "--input", str(source), "--downsample", "pool",
                                 "--probs", "p.csv", *FP32])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert [int(row[1]) for row in read_csv(tmp_path / "submission.csv")[1:]] == expected_labels
    torch.testing.assert_close(read_probs(tmp_path / "p.csv"), logits.softmax(1), rtol=0, atol=1e-5)
    # without the flag the weights are read as strided, and a note says so
    result = runner.invoke(app, ["predict", str(weights), "--input", str(source), "--output", "s.csv", *FP32])
    assert result.exit_code == 0, result.stderr
    assert "read as strided; if they were trained with downsample = 'pool'" in result.stderr
    # the other design predicts otherwise: the labels above show which design was run
    assert [int(row[1]) for row in read_csv(tmp_path / "s.csv")[1:]] != expected_labels
    result = runner.invoke(app, ["predict", str(weights), "--input", str(source), "--blocks", "2", "1"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --blocks: the weights have blocks [1, 1], not [2, 1]\n"


def test_ids_may_be_a_list_of_numpy_scalars(tmp_path):
    ids = [np.int64(i) for i in range(200, 200 + N)]
    path = write_pickle(tmp_path / "t.pkl", {b"data": images_chw().reshape(N, 3072), b"ids": ids})
    got, _ = read_unlabeled(path)
    assert got == list(range(200, 200 + N)) and all(type(i) is int for i in got)


def test_predict_refuses_two_options_naming_one_file(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    before = source.read_bytes()
    sub = tmp_path / "sub.csv"
    (tmp_path / "link.csv").symlink_to(sub)
    cases = [
        (["--output", str(sub), "--probs", str(sub)], f"--output and --probs both name {sub.resolve()}"),
        (["--output", str(source)], f"--input and --output both name {source.resolve()}"),
        (["--output", str(tmp_path / "o.csv"), "--probs", str(tmp_path / "." / "t.pkl")],
         f"--input and --probs both name {source.resolve()}"),
        (["--output", str(sub), "--probs", str(tmp_path / "link.csv")],
         f"--output and --probs both name {sub.resolve()}"),
    ]  # fmt: skip
    for flags, message in cases:
        result = runner.invoke(app, ["predict", str(weights), "--input", str(source), *flags])
        assert result.exit_code == 2, result.output
        assert result.stderr == f"Error: {message}; give each its own file\n"
    assert source.read_bytes() == before
    assert not sub.exists() and not (tmp_path / "o.csv").exists()
    model_bytes = weights.read_bytes()
    for flag in ("--output", "--probs"):
        result = runner.invoke(app, ["predict", str(weights), "--input", str(source), flag, str(weights)])
        assert result.exit_code == 2, result.output
        assert f"Error: the checkpoint and {flag} both name {weights.resolve()}" in result.stderr
    assert weights.read_bytes() == model_bytes
    sidecar = weights.with_name(weights.name + ".sha256")
    sidecar.write_text("0" * 64 + f"  {weights.name}\n")
    result = runner.invoke(app, ["predict", str(weights), "--input", str(source), "--output", str(sidecar)])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"Error: the checkpoint's checksum file and --output both name {sidecar.resolve()}; "
        "give each its own file\n"
    )


def test_predict_refuses_a_hard_link_to_the_input(tmp_path, weights):
    source = layout_2024(tmp_path / "t.pkl")
    hard = tmp_path / "hard.pkl"
    hard.hardlink_to(source)
    with pytest.raises(ConfigError) as err:
        predict_unlabeled(weights, source, hard)
    assert str(err.value) == (
        f"--input and --output name the same file ({source.resolve()} and {hard.resolve()}); "
        "give each its own file"
    )


def test_predict_refuses_a_model_without_ten_outputs_before_inference(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "cifar100.pt"
    torch.save(
        build_model(Architecture(blocks=(1, 1), channels=(8, 16), num_classes=100)).state_dict(), weights
    )
    source, out = layout_2024(tmp_path / "t.pkl"), tmp_path / "sub.csv"
    seen = []
    with pytest.raises(CheckpointError) as err:
        predict_unlabeled(weights, source, out, progress=lambda done, total: seen.append(done))
    assert str(err.value) == f"{weights}: the model has 100 outputs but the dataset has 10 classes"
    assert seen == []  # no image was predicted
    result = runner.invoke(app, ["predict", str(weights), "--input", str(source), "--output", str(out)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {weights}: the model has 100 outputs but the dataset has 10 classes\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, "1", *range(2, N)], "id 1 appears more than once (given as 1 and '1')"),
        (["7", *range(1, N - 1), 7], "id 7 appears more than once (given as '7' and 7)"),
        (np.array([*range(N - 1), 3]).astype(str), "id 3 appears more than once"),
    ],
)
def test_ids_that_the_csv_writes_alike_are_duplicates(tmp_path, ids, message):
    path = write_pickle(tmp_path / "t.pkl", {b"data": images_chw().reshape(N, 3072), b"ids": ids})
    with pytest.raises(DataError) as err:
        read_unlabeled(path)
    assert str(err.value) == f"{path}: {message}; every image needs its own id"
