"""Checkpoints: atomic saves, sidecar checksums, crash safety, weights-only loading, inference."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random

import pytest
import torch
from torch import nn

from cerberus.arch import Architecture
from cerberus.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    all_finite,
    first_non_finite,
    infer_architecture,
    load_checkpoint,
    pending_sidecar_path,
    remove_stale_temporaries,
    save_checkpoint,
    sha256_file,
    sidecar_path,
    state_dict_from,
    verify_checkpoint,
)
from cerberus.errors import CheckpointError, ConfigError
from cerberus.evaluate import load_model
from cerberus.model import build_model

TINY = Architecture(blocks=(1, 1), channels=(8, 16))


def tiny_model(seed: int = 0, arch: Architecture = TINY) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch)


def payload(seed: int = 0, **extra) -> dict:
    model = tiny_model(seed)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "ema": None,
        "epoch": seed,
        "step": 0,
        "architecture": TINY.to_dict(),
        **extra,
    }


def serialized(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def temporaries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class Marker:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------------------------
# Saving and verifying


def test_save_writes_file_and_sha256sum_sidecar(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(3))
    digest = sha256_file(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sidecar_path(path).read_text() == f"{digest}  last.pt\n"
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["linear.weight"], payload(3)["model"]["linear.weight"])
    assert temporaries(tmp_path) == []


def test_overwrite_replaces_checkpoint_and_sidecar(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(1))
    save_checkpoint(path, payload(2))
    assert load_checkpoint(path)["epoch"] == 2
    assert sidecar_path(path).read_text().split()[0] == sha256_file(path)
    assert temporaries(tmp_path) == []


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, payload())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch: .*best\.pt is corrupt or was modified"):
        load_checkpoint(path)


def test_truncated_file_without_sidecar_is_reported(tmp_path):
    path = tmp_path / "weights.pt"
    data = serialized(tiny_model().state_dict())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"weights\.pt is truncated or corrupt"):
        load_checkpoint(path)


def test_legacy_format_truncated_is_reported(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(tiny_model().state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty: it is truncated or corrupt"):
        load_checkpoint(path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_a_zip_archive_is_not_a_checkpoint(tmp_path):
    import zipfile

    path = tmp_path / "bundle.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/readme.txt", "not a torch.save archive")
    with pytest.raises(CheckpointError, match=r"bundle\.pt is a zip archive, not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_a_damaged_zip_directory_is_corrupt(tmp_path):
    path = tmp_path / "weights.pt"
    data = serialized(tiny_model().state_dict())
    at = data.index(b"PK\x01\x02")  # the first central-directory entry; the end record is intact
    path.write_bytes(data[:at] + b"PK\x01\x03" + data[at + 4 :])
    with pytest.raises(CheckpointError, match=r"weights\.pt is truncated or corrupt \(BadZipFile\)"):
        load_checkpoint(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_plain_file_without_sidecar_verifies(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(tiny_model().state_dict(), path)
    verify_checkpoint(path)  # nothing to check, nothing raised
    assert set(load_checkpoint(path)) == set(tiny_model().state_dict())


def test_non_finite_weights_are_refused_and_nothing_written(tmp_path):
    path = tmp_path / "last.pt"
    bad = payload()
    bad["model"]["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"model weight 'layer2\.0\.conv1\.weight' holds NaN"):
        save_checkpoint(path, bad)
    ema = payload(ema=tiny_model().state_dict())
    ema["ema"]["linear.bias"][1] = float("inf")
    with pytest.raises(CheckpointError, match=r"ema weight 'linear\.bias'"):
        save_checkpoint(path, ema)
    assert list(tmp_path.iterdir()) == []


def test_all_finite_passes_integer_buffers_and_names_a_non_finite_float_of_any_width():
    """Integer buffers (BatchNorm's step counters) cannot hold NaN or inf: a state dict with them
    is finite. A NaN or inf in any floating-point tensor, parameter or buffer, fp32 or half
    width, is found and named."""
    state = tiny_model().state_dict()
    integers = [name for name, value in state.items() if not value.is_floating_point()]
    assert integers and all(name.endswith("num_batches_tracked") for name in integers)
    assert all_finite(state) and first_non_finite(state) is None
    cases = [
        ("bn1.weight", torch.float32, float("-inf")),
        ("layer1.0.bn1.running_var", torch.float32, float("nan")),  # a buffer, not a parameter
        ("linear.bias", torch.float16, float("inf")),
        ("linear.weight", torch.bfloat16, float("nan")),
    ]
    for name, dtype, bad in cases:
        broken = dict(state)
        broken[name] = state[name].to(dtype, copy=True)
        broken[name].view(-1)[-1] = bad
        assert first_non_finite(broken) == name and not all_finite(broken)
    assert all_finite(state)  # the original was not modified


# --------------------------------------------------------------------------------------------
# Failures while writing, and crashes


def failing_fsync(monkeypatch, fail_on_call: int):
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("fail_on_call", [1, 2], ids=["pending-sidecar", "weights"])
def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_on_call):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(1))
    before = (path.read_bytes(), sidecar_path(path).read_bytes())
    failing_fsync(monkeypatch, fail_on_call)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, payload(2))
    assert str(err.value) == (
        "could not write last.pt: No space left on device; the previous checkpoint is intact"
    )
    monkeypatch.undo()
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert temporaries(tmp_path) == []
    assert load_checkpoint(path)["epoch"] == 1


def test_interrupt_while_writing_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(1))

    def fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, payload(2))
    monkeypatch.undo()
    assert temporaries(tmp_path) == []
    assert load_checkpoint(path)["epoch"] == 1


def test_disk_full_on_first_save_writes_nothing(tmp_path, monkeypatch):
    failing_fsync(monkeypatch, 2)
    with pytest.raises(CheckpointError, match="No space left on device; nothing was written"):
        save_checkpoint(tmp_path / "last.pt", payload())
    assert list(tmp_path.iterdir()) == []


def crash_between_renames(path, new_payload) -> None:
    """The steps of save_checkpoint by hand, stopping after the weights' rename."""
    data = serialized(new_payload)
    digest = hashlib.sha256(data).hexdigest()
    pending_sidecar_path(path).write_text(f"{digest}  {path.name}\n")
    temp = path.with_name(f".{path.name}.abc123.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def test_crash_between_the_two_renames_still_loads(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(1))
    crash_between_renames(path, payload(2))
    assert sidecar_path(path).read_text().split()[0] != sha256_file(path)  # the sidecar is stale
    assert load_checkpoint(path)["epoch"] == 2
    # the load finished the interrupted rename
    assert not pending_sidecar_path(path).exists()
    assert sidecar_path(path).read_text() == f"{sha256_file(path)}  last.pt\n"


def test_crash_between_renames_of_a_first_save_loads(tmp_path):
    path = tmp_path / "last.pt"
    crash_between_renames(path, payload(4))
    assert load_checkpoint(path)["epoch"] == 4
    assert sidecar_path(path).exists()


def test_save_after_crash_between_renames(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(1))
    crash_between_renames(path, payload(2))
    save_checkpoint(path, payload(3))
    assert load_checkpoint(path)["epoch"] == 3
    assert temporaries(tmp_path) == []


def test_crash_before_the_weights_rename_keeps_old_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(1))
    data = serialized(payload(2))
    pending_sidecar_path(path).write_text(f"{hashlib.sha256(data).hexdigest()}  last.pt\n")
    (tmp_path / ".last.pt.xyz.tmp").write_bytes(data[:100])
    (tmp_path / ".lock").write_text("123\n")
    assert load_checkpoint(path)["epoch"] == 1
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".last.pt.sha256.tmp", ".last.pt.xyz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "last.pt", "last.pt.sha256"]
    assert load_checkpoint(path)["epoch"] == 1


def test_remove_stale_temporaries_finishes_a_matching_pending_sidecar(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(1))
    crash_between_renames(path, payload(2))
    assert remove_stale_temporaries(tmp_path) == []
    verify_checkpoint(path)
    assert sidecar_path(path).read_text().split()[0] == sha256_file(path)


# --------------------------------------------------------------------------------------------
# Pickled objects


def test_pickled_module_is_refused_with_instructions(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save({"net": tiny_model()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "holds pickled Python objects (cerberus.model.ResNet)" in message
    assert "could run arbitrary code" in message
    assert 'torch.save(model.state_dict(), "weights.pt")' in message
    assert "--trust-pickle" in message


def test_trust_pickle_loads_a_module_file(tmp_path):
    path = tmp_path / "seed.pt"
    model = tiny_model(5)
    torch.save({"net": model, "acc": 0.9}, path)
    state = state_dict_from(load_checkpoint(path, trust_pickle=True))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_never_executed(tmp_path, how):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"model": Marker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        load_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# state_dict_from


def test_state_dict_from_accepts_the_usual_wrappers():
    model = tiny_model()
    plain = model.state_dict()
    prefixed = {f"module.{k}": v for k, v in plain.items()}
    for obj in (
        plain,
        payload(),
        {"net": plain, "acc": 93.1, "epoch": 200},
        {"state_dict": prefixed},
        {"model_state_dict": plain, "optimizer_state_dict": {}},
        prefixed,
        {f"module._orig_mod.{k}": v for k, v in plain.items()},
        {"state_dict": {f"model.{k}": v for k, v in plain.items()}, "pytorch-lightning_version": "2.4"},
        {f"net.{k}": v for k, v in plain.items()},
        model,
        nn.DataParallel(model),
    ):
        state = state_dict_from(obj)
        assert list(state) == list(plain)


def test_state_dict_from_unwraps_an_averaged_model():
    model = tiny_model()
    averaged = torch.optim.swa_utils.AveragedModel(model).state_dict()
    assert "n_averaged" in averaged  # beside module.* keys
    state = state_dict_from(averaged)
    assert list(state) == list(model.state_dict())


def test_plain_weights_without_batchnorm_counters_load(tmp_path):
    model = tiny_model(seed=5)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    loaded, info = load_model(path)
    assert info["source"] == "state_dict"
    assert torch.equal(loaded.state_dict()["linear.weight"], state["linear.weight"])


def test_state_dict_from_names_what_it_found():
    with pytest.raises(CheckpointError, match=r"found a dict with keys 'epoch', 'acc', not model weights"):
        state_dict_from({"epoch": 3, "acc": 0.5})
    with pytest.raises(CheckpointError, match=r"found a builtins\.list"):
        state_dict_from([1, 2])


def test_newer_checkpoint_format_is_refused():
    with pytest.raises(CheckpointError, match=r"format version 2 .* newer"):
        state_dict_from({**payload(), "format_version": FORMAT_VERSION + 1})


# --------------------------------------------------------------------------------------------
# Architecture inference


def random_design(rng: random.Random) -> Architecture:
    stages = rng.randint(1, 5)
    stem_kernel = rng.choice([1, 2, 3, 3, 5])
    side = 32 if stem_kernel % 2 else 31  # an even stem kernel leaves 31x31
    for _ in range(stages - 1):
        side = (side + 1) // 2
    return Architecture(
        stem_kernel=stem_kernel,
        blocks=tuple(rng.randint(1, 2) for _ in range(stages)),
        channels=tuple(rng.choice([2, 4, 6, 8]) for _ in range(stages)),
        conv_kernel=rng.choice([1, 3, 5]),
        skip_kernel=rng.choice([1, 3]),
        pool_size=rng.choice([None, *[d for d in range(1, side + 1) if side % d == 0]]),
        stem_channels=rng.choice([None, 3, 4, 8]),
        num_classes=rng.choice([2, 10, 7]),
    )


def has_projection(arch: Architecture) -> bool:
    return len(arch.blocks) > 1 or arch.stem_width != arch.widths[0]


def test_inference_round_trips_random_designs(tmp_path):
    rng = random.Random(1234)
    images = torch.randn(1, 3, 32, 32)
    for trial in range(30):
        arch = random_design(rng)
        model = tiny_model(trial, arch).eval()
        for prefix in ("", "module."):
            path = tmp_path / f"design{trial}{prefix}.pt"
            torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
            inferred = infer_architecture(state_dict_from(load_checkpoint(path)))
            expected = arch if has_projection(arch) else Architecture(**{**arch.__dict__, "skip_kernel": 1})
            assert inferred.to_dict() == expected.to_dict(), f"trial {trial}: {arch.label()}"
            assert inferred.pool == arch.pool and inferred.stem_width == arch.stem_width
            assert inferred.downsample == "stride"
        # the whole path through load_model, from the DataParallel-style file
        loaded, info = load_model(path, overrides={"skip_kernel": arch.skip_kernel})
        assert info["source"] == "state_dict"
        assert info["architecture"] == arch.to_dict()
        with torch.inference_mode():
            assert torch.equal(loaded(images), model(images)), f"trial {trial}"


def test_inference_of_pooling_designs(tmp_path):
    rng = random.Random(99)
    images = torch.randn(1, 3, 32, 32)
    for trial in range(12):
        arch = random_design(rng)
        stem_kernel = arch.stem_kernel if len(arch.blocks) < 5 else 3  # 31 pixels: 4 pooling stages
        changes = {"downsample": "pool", "pool_size": None, "skip_kernel": 1, "stem_kernel": stem_kernel}
        arch = Architecture(**{**arch.__dict__, **changes})
        model = tiny_model(trial, arch).eval()
        path = tmp_path / f"pooled{trial}.pt"
        torch.save(model.state_dict(), path)
        loaded, info = load_model(path, overrides={"downsample": "pool"})
        assert info["architecture"] == arch.to_dict()
        with torch.inference_mode():
            assert torch.equal(loaded(images), model(images)), f"trial {trial}"


def test_pooling_is_inferred_where_the_weights_show_it():
    # layer3 keeps layer2's width without a projection: only a pooling block does that
    shown = Architecture(blocks=(1, 1, 1), channels=(8, 16, 16), stem_channels=4, downsample="pool")
    assert infer_architecture(tiny_model(0, shown).state_dict()).to_dict() == shown.to_dict()
    # every stage widens: the weights of both kinds are the same, and 'stride' is assumed
    hidden = Architecture(blocks=(2, 2), channels=(4, 8), stem_channels=3, downsample="pool")
    state = tiny_model(1, hidden).state_dict()
    assert infer_architecture(state).downsample == "stride"
    assert infer_architecture(state, downsample="pool").to_dict() == hidden.to_dict()
    with pytest.raises(CheckpointError, match=r"'layer3.0.shortcut.0.weight': block lacks a projection"):
        infer_architecture(tiny_model(0, shown).state_dict(), downsample="stride")


def test_too_many_pooling_stages_for_the_stem_are_named():
    strided = Architecture(blocks=(1,) * 5, channels=(4, 8, 8, 8, 8), stem_kernel=2)
    state = tiny_model(0, strided).state_dict()
    assert infer_architecture(state).to_dict() == strided.to_dict()
    message = r"the weights have 5 stages, more than the 4 that fit the 31x31 map of their stem"
    with pytest.raises(CheckpointError, match=message):
        infer_architecture(state, downsample="pool")


def test_skip_kernel_default_and_override_without_projections():
    arch = Architecture(blocks=(2,), channels=(8,), skip_kernel=3)
    state = tiny_model(0, arch).state_dict()
    assert infer_architecture(state).skip_kernel == 1
    assert infer_architecture(state, skip_kernel=3).skip_kernel == 3
    assert infer_architecture(state, pool_size=None).pool_size == 32  # None overrides are ignored


def test_the_seed_resnet24_is_inferred():
    from cerberus.model import resnet24

    arch = infer_architecture(resnet24().state_dict())
    assert arch.to_dict() == Architecture(blocks=(3, 5, 3), channels=(64, 128, 256)).to_dict()


def test_inference_names_the_inconsistent_key():
    state = tiny_model().state_dict()
    del state["linear.weight"]
    with pytest.raises(CheckpointError, match=r"no 'linear\.weight'"):
        infer_architecture(state)

    state = tiny_model().state_dict()
    state["linear.weight"] = torch.zeros(10, 17)
    with pytest.raises(CheckpointError, match=r"'linear.weight' takes 17 features"):
        infer_architecture(state)

    state = tiny_model().state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(16, 5, 3, 3)
    with pytest.raises(CheckpointError, match=r"'layer2.0.conv1.weight' takes 5 channels"):
        infer_architecture(state)

    state = tiny_model().state_dict()
    del state["layer2.0.shortcut.0.weight"]
    with pytest.raises(CheckpointError, match=r"'layer2.0.shortcut.0.weight': block lacks a projection"):
        infer_architecture(state)

    state = {"fc.weight": torch.zeros(10, 512)}
    with pytest.raises(CheckpointError, match=r"no 'layer1\.0\.\*' keys"):
        infer_architecture(state)

    with pytest.raises(ConfigError, match="unknown architecture field 'depth'"):
        infer_architecture(tiny_model().state_dict(), depth=3)


def test_weights_mixed_with_other_entries_name_them():
    state = {**tiny_model().state_dict(), "epoch": 3, "acc": 27.3}
    with pytest.raises(CheckpointError) as info:
        state_dict_from(state)
    assert str(info.value) == (
        "found model weights mixed with entries that are not tensors: 'epoch' (int), 'acc' (float); "
        "save the state_dict alone, or under one of 'model', 'net', 'state_dict', 'model_state_dict'"
    )


def test_numpy_values_beside_the_weights_are_refused_naming_numpy(tmp_path):
    # torch's weights-only loader reads no numpy objects (an array's rebuilder can allocate
    # without bound): the message says what the file holds and how to load it anyway
    import numpy as np

    path = tmp_path / "np.pt"
    torch.save({"net": tiny_model().state_dict(), "acc": np.float64(27.3)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path} holds numpy values beside the weights (numpy.")
    assert "the weights-only loader does not read. If you trust the file, pass --trust-pickle" in str(
        info.value
    )
    assert load_checkpoint(path, trust_pickle=True)["acc"] == np.float64(27.3)
