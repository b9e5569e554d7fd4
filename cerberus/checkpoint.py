"""Checkpoints: atomic saves with a SHA-256 sidecar, weights-only loads, architecture inference.

A checkpoint ``last.pt`` is written next to ``last.pt.sha256`` (``sha256sum`` format, so
``sha256sum -c last.pt.sha256`` checks it too). A save never leaves a state in which neither the
old nor the new checkpoint verifies:

1. the new checksum goes to ``.last.pt.sha256.tmp`` (the *pending* sidecar), fsynced;
2. the weights go to ``.last.pt.<random>.tmp``, fsynced, then ``os.replace`` onto ``last.pt``;
3. the pending sidecar is renamed onto ``last.pt.sha256``.

A crash before step 2's rename leaves the old pair intact (plus temporaries that
:func:`remove_stale_temporaries` deletes); a crash between the two renames leaves the new
``last.pt`` with a stale sidecar, and the loader accepts it because the pending sidecar matches,
then finishes the rename.

Loading never executes pickled code unless asked: ``torch.load(weights_only=True)`` refuses any
file that holds Python objects other than tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cerberus.arch import DOWNSAMPLE_MODES, Architecture, check_architecture, needs_projection
from cerberus.errors import CheckpointError, ConfigError
from cerberus.files import fsync_dir, write_synced, write_temporary

FORMAT = "cerberus-checkpoint"
FORMAT_VERSION = 1

_CHUNK = 1 << 20  # bytes read at a time when hashing
_WRAPPER_KEYS = ("model", "net", "state_dict", "model_state_dict")  # where other code puts weights
# added by DataParallel/DDP and torch.compile, and by wrappers that hold the network as an
# attribute (a PyTorch Lightning module's ``self.model`` or ``self.net``); stripped where every key
# has one: no name of this family starts so
_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
_RESAVE_HINT = (
    "load it in the code that made it and save the weights alone: "
    'torch.save(model.state_dict(), "weights.pt")'
)


# --------------------------------------------------------------------------------------------
# Durable writes


def sidecar_path(path: Path) -> Path:
    """``last.pt`` -> ``last.pt.sha256``."""
    return path.with_name(path.name + ".sha256")


def unverified_note(path: Path) -> str | None:
    """What to tell a user loading ``path`` without its sidecar (nothing to check it against)."""
    path = Path(path)
    if sidecar_path(path).exists():
        return None
    return (
        f"{path.name} has no {sidecar_path(path).name} beside it, so its checksum was not verified; "
        "copy the sidecar along with the checkpoint"
    )


def pending_sidecar_path(path: Path) -> Path:
    """``last.pt`` -> ``.last.pt.sha256.tmp``: the checksum of a save in progress."""
    return path.with_name(f".{path.name}.sha256.tmp")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar_line(digest: str, path: Path) -> bytes:
    return f"{digest}  {path.name}\n".encode()


def _check_payload_finite(payload: dict, path: Path) -> None:
    for key in ("model", "ema"):
        state = payload.get(key)
        if isinstance(state, dict):
            bad = first_non_finite(state)
            if bad is not None:
                raise CheckpointError(
                    f"refusing to save {path.name}: {key} weight {bad!r} holds NaN or infinite values"
                )
    if "model" not in payload:  # a bare state_dict
        bad = first_non_finite(payload)
        if bad is not None:
            raise CheckpointError(f"refusing to save {path.name}: {bad!r} holds NaN or infinite values")


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically, with a SHA-256 sidecar (see the module docstring).

    Refuses (writing nothing) when the model or EMA weights hold NaN or infinite values. On an
    ``OSError`` (a full disk, say) the temporaries are removed, the previous checkpoint and its
    sidecar are left intact, and :class:`CheckpointError` says what happened.
    """
    path = Path(path)
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    _check_payload_finite(payload, path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()

    folder, sidecar, pending = path.parent, sidecar_path(path), pending_sidecar_path(path)
    existed = path.exists()
    if not folder.is_dir():
        raise CheckpointError(f"could not write {path.name}: folder {folder} does not exist")
    _settle_pending(path, discard=True)  # never overwrite the checksum a crashed save left pending
    temp: Path | None = None
    replaced = False
    try:
        write_synced(pending, _sidecar_line(digest, path))
        temp = write_temporary(folder, path.name, data)
        os.replace(temp, path)
        replaced, temp = True, None
        fsync_dir(folder)
        _replace_pending(pending, sidecar, digest)
        fsync_dir(folder)
    except BaseException as err:  # a full disk, or a second Ctrl-C: clean up either way
        if temp is not None:
            temp.unlink(missing_ok=True)
        if not replaced:
            pending.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        reason = err.strerror or str(err)
        if replaced:
            # The new checkpoint is in place and its pending sidecar matches it: loads verify.
            raise CheckpointError(
                f"could not finish writing {sidecar.name}: {reason}; {path.name} was written and "
                f"its checksum is kept in {pending.name}"
            ) from None
        state = "the previous checkpoint is intact" if existed else "nothing was written"
        raise CheckpointError(f"could not write {path.name}: {reason}; {state}") from None


def _replace_pending(pending: Path, sidecar: Path, digest: str) -> None:
    try:
        os.replace(pending, sidecar)
    except FileNotFoundError:
        # A concurrent load may have found the new file and finished this very rename.
        if not (sidecar.is_file() and _read_sidecar(sidecar) == digest):
            raise


def _read_sidecar(sidecar: Path) -> str | None:
    """The hex digest a sidecar records, or ``None`` when it is not in sha256sum format."""
    try:
        text = sidecar.read_text(encoding="ascii", errors="replace")
    except OSError as err:
        raise CheckpointError(f"cannot read {sidecar}: {err.strerror or err}") from None
    match = re.match(r"\s*([0-9a-fA-F]{64})\b", text)
    return match.group(1).lower() if match else None


def _settle_pending(path: Path, *, discard: bool = False) -> bool:
    """Finish a save that stopped between its two renames.

    Returns True when ``path`` matches its pending sidecar (the rename onto the sidecar is then
    finished where the folder is writable). A pending sidecar that does not match belongs to a
    save that never replaced ``path``, or to one still running in another process: only the
    writer (``discard=True``) removes it.
    """
    pending = pending_sidecar_path(path)
    if not pending.is_file():
        return False
    expected = _read_sidecar(pending)
    if path.is_file() and expected is not None and expected == sha256_file(path):
        with contextlib.suppress(OSError):  # a read-only folder still loads
            os.replace(pending, sidecar_path(path))
            fsync_dir(path.parent)
        return True
    if discard:
        with contextlib.suppress(OSError):
            pending.unlink()
    return False


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")


def verify_checkpoint(path: Path) -> None:
    """Check ``path`` against its ``.sha256`` sidecar; raise :class:`CheckpointError` on mismatch.

    A file without a sidecar (weights written by other code) has nothing to verify and passes.
    """
    path = Path(path)
    _check_exists(path)
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        _settle_pending(path)
        return
    expected = _read_sidecar(sidecar)
    if expected is None:
        raise CheckpointError(f"{sidecar} is not a sha256sum checksum file")
    if sha256_file(path) == expected:
        return
    if _settle_pending(path):  # a save stopped between its two renames: the new file is whole
        return
    raise CheckpointError(f"checksum mismatch: {path} is corrupt or was modified")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.*.tmp`` files interrupted saves left in ``folder``; return what was removed.

    A pending sidecar that matches its checkpoint is not stale: its rename is finished instead.
    Call this only while no other process writes to ``folder`` (training holds a run lock).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file()):
            continue
        if entry.name.endswith(".sha256.tmp"):
            target = folder / entry.name[1 : -len(".sha256.tmp")]
            if _settle_pending(target, discard=True):
                continue
            if not entry.exists():  # _settle_pending removed it
                removed.append(entry)
                continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------------------------
# Loading


def _unsafe_globals(err: Exception) -> str:
    """The Python names a weights-only load refused, e.g. ``cerberus.model.ResNet``."""
    unique = list(dict.fromkeys(re.findall(r"\bGLOBAL ([\w.]+)", str(err))))
    return ", ".join(unique[:3])


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # older torch.save: a pickled magic number


def _not_a_checkpoint(path: Path, head: bytes) -> CheckpointError:
    if not head:
        return CheckpointError(f"{path} is empty: it is truncated or corrupt")
    if head[:1] == b"\x80":
        return CheckpointError(
            f"{path} is not a PyTorch checkpoint but a plain Python pickle; it was not loaded, "
            "because loading a pickle could run arbitrary code"
        )
    return CheckpointError(
        f"{path} is not a PyTorch checkpoint (expected a file written by torch.save, "
        f"found bytes {head[:8]!r})"
    )


def _describe_load_failure(path: Path, err: Exception, trust_hint: str | None) -> CheckpointError:
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        names = _unsafe_globals(err)
        held = f" ({names})" if names else ""
        if names and trust_hint is not None and all(n.startswith("numpy.") for n in names.split(", ")):
            # numpy numbers beside the weights ({"net": ..., "acc": np.float64(93.1)}): the
            # weights-only loader reads tensors and plain Python values, nothing of numpy's
            return CheckpointError(
                f"{path} holds numpy values beside the weights{held}, which the weights-only loader "
                f"does not read. If you trust the file, {trust_hint}; better, {_RESAVE_HINT}"
            )
        if trust_hint is None:
            return CheckpointError(
                f"{path} holds pickled Python objects{held}, not just weights; it is not a "
                "checkpoint written by cerberus, and loading it could run arbitrary code, so it "
                "was not loaded"
            )
        return CheckpointError(
            f"{path} holds pickled Python objects{held}, not just weights; loading it could run "
            f"arbitrary code, so it was not loaded. If you trust the file, {trust_hint}; "
            f"better, {_RESAVE_HINT}"
        )
    return CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__})")


def load_checkpoint(
    path: Path,
    *,
    trust_pickle: bool = False,
    trust_hint: str | None = "pass --trust-pickle (trust_pickle=True)",
) -> Any:
    """Verify ``path`` against its sidecar (when it has one) and load it onto the CPU.

    Returns what was saved: a Cerberus checkpoint dict, a plain ``state_dict``, a wrapper dict,
    or (only with ``trust_pickle=True``) arbitrary pickled objects such as an ``nn.Module``.
    Without ``trust_pickle`` nothing in the file is executed. With it, the caller should warn.
    ``trust_hint`` says how the caller's user can trust a pickled file (None: they cannot).
    """
    path = Path(path)
    verify_checkpoint(path)
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is truncated or corrupt (its zip directory is missing)")
        try:
            with zipfile.ZipFile(path) as archive:  # torch.save writes <name>/data.pkl and tensors
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__})") from None
        if not any(name.endswith("/data.pkl") for name in names):
            raise CheckpointError(f"{path} is a zip archive, not a PyTorch checkpoint (no data.pkl in it)")
    elif not head.startswith(_LEGACY_MAGIC):
        raise _not_a_checkpoint(path, head)  # torch.load is not even tried: nothing is unpickled
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except (AttributeError, ModuleNotFoundError) as err:
        if not trust_pickle:
            raise _describe_load_failure(path, err, trust_hint) from None
        raise CheckpointError(
            f"{path} refers to Python code that is not available here ({err}); {_RESAVE_HINT}"
        ) from None
    except Exception as err:  # torch raises many types for damaged files
        raise _describe_load_failure(path, err, trust_hint) from None


# --------------------------------------------------------------------------------------------
# State dicts


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:6]]
        more = ", ..." if len(obj) > 6 else ""
        return f"a dict with keys {', '.join(keys)}{more}" if keys else "an empty dict"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def state_dict_from(obj: Any) -> dict[str, torch.Tensor]:
    """The model weights inside whatever a weights file holds, with our parameter names.

    Accepts a Cerberus checkpoint (its ``model`` entry), a plain ``state_dict``, the wrappers
    ``{"net"|"model"|"state_dict"|"model_state_dict": ...}``, and ``nn.Module`` objects; strips
    the ``module.`` prefix DataParallel/DDP add (and ``_orig_mod.`` from torch.compile).
    """
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        check_format(obj)
        obj = obj.get("model")
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if _is_tensor_dict(inner):
                obj = inner
                break
    if not _is_tensor_dict(obj):
        wrappers = ", ".join(repr(k) for k in _WRAPPER_KEYS)
        if isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values()):
            # weights with other things beside them ({"conv1.weight": ..., "epoch": 3}, say)
            others = [
                f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)
            ]
            raise CheckpointError(
                f"found model weights mixed with entries that are not tensors: {', '.join(others[:6])}"
                f"{', ...' if len(others) > 6 else ''}; save the state_dict alone, or under one of {wrappers}"
            )
        raise CheckpointError(
            f"found {_describe(obj)}, not model weights (expected a state_dict, or one under {wrappers})"
        )
    state = dict(obj)
    # torch.optim.swa_utils.AveragedModel adds its averaging count beside the model's weights.
    if (
        "n_averaged" in state
        and len(state) > 1
        and all(k.startswith("module.") for k in state if k != "n_averaged")
    ):
        del state["n_averaged"]
    return _strip_prefixes(state)


def _some(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:3]) + (" ..." if len(keys) > 3 else "")


def check_weights_fit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse ``state`` unless it has exactly ``expected``'s keys and shapes (a model's state_dict).

    The message names the first missing, extra or misshapen keys.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: found {_describe(state)} where the model's weights belong")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        groups = (("missing", missing), ("unexpected", extra))
        parts = [f"{kind} {_some(keys)}" for kind, keys in groups if keys]
        raise CheckpointError(f"{path}: the weights do not fit the architecture ({'; '.join(parts)})")
    for key, value in expected.items():
        given = state[key]
        if not isinstance(given, torch.Tensor) or given.shape != value.shape:
            shape = list(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise CheckpointError(
                f"{path}: {key!r} has shape {shape} but the architecture needs {list(value.shape)}"
            )


def check_format(checkpoint: dict, path: Path | None = None) -> None:
    """Refuse a Cerberus checkpoint written in a newer format than this version reads."""
    version = checkpoint.get("format_version")
    where = f"{path}: " if path is not None else ""
    if version is None:
        raise CheckpointError(f"{where}the checkpoint records no format version; it is damaged")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        written_by = checkpoint.get("cerberus_version", "an unknown version")
        raise CheckpointError(
            f"{where}checkpoint format version {version!r} (written by cerberus {written_by}) is "
            f"newer than this cerberus reads ({FORMAT_VERSION}); upgrade cerberus"
        )


def first_non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def all_finite(state_dict: dict) -> bool:
    """True when every floating-point tensor holds only finite values."""
    return first_non_finite(state_dict) is None


# --------------------------------------------------------------------------------------------
# Architecture inference


_BLOCK_KEY = re.compile(r"layer(\d+)\.(\d+)\.")


def _weight(state: dict[str, torch.Tensor], key: str, dims: int = 4) -> torch.Tensor:
    value = state.get(key)
    if value is None:
        found = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"the weights have no {key!r}, so they are not a CIFAR ResNet of this family (found {found}, ...)"
        )
    if value.dim() != dims:
        raise CheckpointError(f"{key!r} has shape {list(value.shape)}; expected {dims} dimensions")
    if dims == 4 and value.shape[-1] != value.shape[-2]:
        raise CheckpointError(f"{key!r} has a non-square kernel {list(value.shape[-2:])}")
    return value


def _stage_layout(state: dict[str, torch.Tensor]) -> list[int]:
    """Blocks per stage from the ``layerK.J.`` key prefixes."""
    seen: dict[int, set[int]] = {}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            seen.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not seen:
        raise CheckpointError("the weights have no 'layer1.0.*' keys, so they hold no residual stages")
    stages = sorted(seen)
    if stages != list(range(1, len(stages) + 1)):
        raise CheckpointError(f"stages {stages} are not numbered layer1..layer{len(stages)}")
    blocks = []
    for stage in stages:
        indices = sorted(seen[stage])
        if indices != list(range(len(indices))):
            raise CheckpointError(f"layer{stage} has blocks {indices}; expected 0..{len(indices) - 1}")
        blocks.append(len(indices))
    return blocks


def infer_architecture(state_dict: dict[str, torch.Tensor], **overrides: Any) -> Architecture:
    """The :class:`Architecture` a state_dict was built from, from its names and shapes alone.

    Overrides (``blocks=``, ``conv_kernel=``, ``skip_kernel=``, ``pool_size=``, ...; ``None``
    values are ignored) take precedence. ``skip_kernel`` cannot be seen in designs with no
    projection shortcut; it is then 1 unless overridden. ``downsample`` is 'pool' only where the
    weights show it (see :func:`_infer_downsample`), else 'stride'. Inconsistent weights raise
    :class:`CheckpointError` naming the key.
    """
    state = _strip_prefixes(dict(state_dict))
    blocks = _stage_layout(state)
    stem = _weight(state, "conv1.weight")
    if stem.shape[1] != 3:
        raise CheckpointError(f"'conv1.weight' takes {stem.shape[1]} input channels; expected 3 (RGB)")
    cin = stem.shape[0]
    widths: list[int] = []
    conv_kernels: set[int] = set()
    skip_kernels: set[int] = set()
    shortcuts: list[tuple[str, int, int, int, int, bool]] = []  # (prefix, i, j, cin, cout, proj?)
    for i, num_blocks in enumerate(blocks):
        width = _weight(state, f"layer{i + 1}.0.conv1.weight").shape[0]
        for j in range(num_blocks):
            prefix = f"layer{i + 1}.{j}."
            conv1 = _weight(state, prefix + "conv1.weight")
            conv2 = _weight(state, prefix + "conv2.weight")
            if conv1.shape[0] != width or conv2.shape[0] != width:
                raise CheckpointError(
                    f"{prefix + 'conv2.weight'!r}: {conv2.shape[0]} channels where layer{i + 1} has {width}"
                )
            if conv1.shape[1] != cin:
                raise CheckpointError(
                    f"{prefix + 'conv1.weight'!r} takes {conv1.shape[1]} channels but the layer "
                    f"before it gives {cin}"
                )
            conv_kernels.update((conv1.shape[-1], conv2.shape[-1]))
            has_projection = prefix + "shortcut.0.weight" in state
            shortcuts.append((prefix, i, j, cin, width, has_projection))
            if has_projection:
                skip_kernels.add(_weight(state, prefix + "shortcut.0.weight").shape[-1])
            cin = width
        widths.append(width)
    if len(conv_kernels) > 1:
        raise CheckpointError(f"block convs use several kernel sizes {sorted(conv_kernels)}")
    if len(skip_kernels) > 1:
        raise CheckpointError(f"shortcut convs use several kernel sizes {sorted(skip_kernels)}")

    linear = _weight(state, "linear.weight", dims=2)
    num_classes, in_features = linear.shape
    given_blocks = overrides.get("blocks")
    if given_blocks is not None and tuple(given_blocks) != tuple(blocks):
        detail = f"the weights have blocks {list(blocks)}, not {list(given_blocks)}"
        raise ConfigError(f"blocks: {detail}", field="blocks", detail=detail)
    downsample = overrides.get("downsample") or _infer_downsample(shortcuts)
    if downsample not in DOWNSAMPLE_MODES:
        detail = f"must be 'stride' or 'pool', got {downsample!r}"
        raise ConfigError(f"downsample: {detail}", field="downsample", detail=detail)
    probe = Architecture(blocks=tuple(blocks), downsample=downsample, stem_kernel=stem.shape[-1])
    if len(blocks) > probe.max_stages:
        raise CheckpointError(
            f"the weights have {len(blocks)} stages, more than the {probe.max_stages} that fit the "
            f"{probe.stem_side}x{probe.stem_side} map of their stem with downsample={downsample!r}"
        )
    for prefix, i, j, block_in, width, has_projection in shortcuts:
        halves = j == 0 and probe.stage_downsamples(i)
        if has_projection != needs_projection(probe, block_in, width, halves):
            state_of = "has" if has_projection else "lacks"
            rule = "change width" if probe.max_pool_downsampling else "change stride or width"
            raise CheckpointError(
                f"{prefix + 'shortcut.0.weight'!r}: block {state_of} a projection shortcut, which "
                f"this ResNet family (downsample={downsample!r}) gives only to blocks that {rule}"
            )
    pool_size = _infer_pool(in_features, widths[-1], probe.final_side)

    fields: dict[str, Any] = dict(
        blocks=tuple(blocks),
        channels=tuple(widths),
        conv_kernel=conv_kernels.pop(),
        skip_kernel=skip_kernels.pop() if skip_kernels else 1,
        pool_size=pool_size,
        stem_channels=stem.shape[0],
        num_classes=num_classes,
        downsample=downsample,
        stem_kernel=stem.shape[-1],
    )
    for name, value in overrides.items():
        if name not in fields:
            raise ConfigError(f"unknown architecture field {name!r} (choose from {', '.join(fields)})")
        if value is not None:
            fields[name] = tuple(value) if isinstance(value, list) else value
    return check_architecture(Architecture(**fields))


def _infer_downsample(shortcuts) -> str:
    """'pool' where the weights show it, else the usual CIFAR code's 'stride'.

    A pooling design shows itself by a later stage whose first block keeps its width without a
    projection (a strided block would need one). Where every stage widens, the two kinds have
    identical weights (the head cannot tell them apart either: any pooled map size is also a
    strided one's): 'stride' is assumed, and ``downsample=`` overrides it.
    """
    if any(i > 0 and j == 0 and cin == cout and not proj for _, i, j, cin, cout, proj in shortcuts):
        return "pool"
    return "stride"


def _infer_pool(in_features: int, last_width: int, side: int) -> int:
    """P from ``in_features = C_last * (side / P)**2``."""
    for pool in range(1, side + 1):
        if side % pool == 0 and last_width * (side // pool) ** 2 == in_features:
            return pool
    raise CheckpointError(
        f"'linear.weight' takes {in_features} features, which no average pool of the final "
        f"{side}x{side} map of {last_width} channels gives"
    )
