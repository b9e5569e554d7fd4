"""The Optuna study: open (or create) it in a storage, and read its trials as records.

The study lives in any Optuna storage; the default is an SQLite file in the search folder
(``sqlite:///<out>/study.db``): embedded, and resumable - running the same search again adds
``trials`` more trials to the same study. Several processes or machines pointed at one storage
and study name share the study; each runs its own ``trials`` trials. For many machines use a
server database, e.g. PostgreSQL (``pip install psycopg2-binary``)::

    createdb cerberus
    cerberus search space.toml --trials 20 --study wide \\
        --storage postgresql://user:password@dbhost/cerberus          # on every machine

Trials that die with their process (kill -9, power loss) are marked failed by the next process
that starts a trial in the study (Optuna heartbeats, :data:`HEARTBEAT_SECONDS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from cerberus.config import ExperimentConfig, config_from_dict
from cerberus.errors import ConfigError
from cerberus.search.results import TrialRecord
from cerberus.search.space import SearchSpace

HEARTBEAT_SECONDS = 60  # a running trial writes a heartbeat this often...
GRACE_SECONDS = 300  # ...and counts as dead (failed) after this long without one

PrunerName = Literal["hyperband", "halving", "none"]


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def _make_pruner(name: PrunerName, epochs: int):
    import optuna

    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner: expected hyperband, halving or none, got {name!r}")


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Serialise opening a SQLite storage: processes creating one new file at once would race."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    database = None
    if url.startswith("sqlite") and fcntl is not None:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    lock = Path(database).with_name(f".{Path(database).name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(
            f"--storage {url}: cannot open the study storage in {lock.parent}: {err.strerror}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel if we die
        yield
    finally:
        os.close(fd)


def _sqlite_file_missing(url: str) -> bool:
    """Whether ``url`` names an SQLite file that does not exist (opening it would create it)."""
    if not url.startswith("sqlite"):
        return False
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # a bad URL: opening the storage says so
        return False
    database = parsed.database
    if not database or database == ":memory:" or parsed.query.get("uri"):
        return False
    return not Path(database).exists()


def _open_storage(url: str):
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for other processes' writes
    for attempt in range(1, 4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                )
        except ImportError as err:
            raise ConfigError(f"--storage {url}: the database driver is not installed ({err})") from None
        except Exception as err:  # sqlalchemy's: bad URL, unreachable server, unreadable file
            # Two processes creating the tables of a new server database at once: one loses, and
            # finds them created when it tries again.
            if attempt < 3 and isinstance(err, sqlalchemy.exc.DBAPIError) and not url.startswith("sqlite"):
                time.sleep(attempt)
                continue
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"--storage {url}: cannot open the study storage: {detail}") from None


def _space_fingerprint(space: SearchSpace) -> dict[str, Any]:
    return json.loads(space.model_dump_json(exclude={"min_params"}))


# Settings of the trial config that are not part of the recipe: the design and name each trial
# sets, where a worker finds the data and how it runs (workers sharing a study differ), and what
# trials never do. Precision, layout and sync_bn stay in: they can change what a trial learns.
NOT_RECIPE = (
    "name",
    "model",
    # where the data and the work are, which may differ between workers sharing a study
    "data.root",
    "data.download",
    "data.url",
    "train.device",
    "train.threads",
    "train.compile",
    "train.eval_batch_size",
    # what trials never do: they write no checkpoints and never see the test set
    "train.checkpoint_every",
    "train.save_every_epochs",
    "data.test_subset",
    "train.test_tta",
    "train.test_every_epoch",
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}``."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _recipe(config: ExperimentConfig) -> dict[str, Any]:
    flat = _flatten(config.model_dump(mode="json"))
    return {
        key: value
        for key, value in flat.items()
        if not any(key == skip or key.startswith(f"{skip}.") for skip in NOT_RECIPE)
    }


def trial_recipe(trial_data: dict[str, Any]) -> dict[str, Any]:
    """The resolved trial config (defaults filled in) as dotted keys, without :data:`NOT_RECIPE`:
    what a study records so that all its trials train alike."""
    return _recipe(config_from_dict(trial_data, enforce_budget=False, model_replaced=True))


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(key for key in current.keys() | recorded.keys() if recorded.get(key) != current.get(key))


def open_study(
    space: SearchSpace,
    *,
    study_name: str,
    storage: str,
    pruner: PrunerName = "hyperband",
    epochs: int = 10,
    seed: int | None = None,
    create: bool = True,
    recipe: dict[str, Any] | None = None,
):
    """Create or load the study (maximising validation accuracy) and check it is this space's.

    With ``create=False`` a study that does not exist is refused, and an SQLite file that does
    not exist is not created.

    With ``recipe`` (:func:`trial_recipe`), also check that the study's trials were trained with
    it; a study without one records it.
    """
    import optuna

    if not create and _sqlite_file_missing(storage):  # reading only: create no file (nor its lock)
        raise ConfigError(f"no study named {study_name!r} in {storage}")
    sampler = optuna.samplers.TPESampler(seed=seed)
    fingerprint = _space_fingerprint(space)
    with _creation_lock(storage):
        store = _open_storage(storage)
        try:
            if create:
                study = optuna.create_study(
                    storage=store,
                    study_name=study_name,
                    direction="maximize",
                    sampler=sampler,
                    pruner=_make_pruner(pruner, epochs),
                    load_if_exists=True,
                )
            else:
                study = optuna.load_study(
                    study_name=study_name, storage=store, sampler=sampler, pruner=_make_pruner(pruner, epochs)
                )
        except KeyError:
            raise ConfigError(f"no study named {study_name!r} in {storage}") from None
        recorded = study.user_attrs.get("space")
        if recorded is None:
            study.set_user_attr("space", fingerprint)
        else:  # keys the space gained after the study was created (stem_kernel) had their default
            recorded = {**_space_fingerprint(SearchSpace()), **recorded}
        recorded_recipe = study.user_attrs.get("recipe") if recipe is not None else None
        if recipe is not None and recorded_recipe is None and recorded in (None, fingerprint):
            study.set_user_attr("recipe", recipe)  # studies from before recipes were recorded, too
        elif recorded_recipe is not None:  # settings added to the config since had their default
            recorded_recipe = {**_recipe(ExperimentConfig()), **recorded_recipe}
    if recorded is not None and recorded != fingerprint:
        differ = sorted(key for key in fingerprint if recorded.get(key) != fingerprint[key])
        raise ConfigError(
            f"study {study_name!r} in {storage} was created with another search space "
            f"(it differs in: {', '.join(differ)}); use the same space, or a new --study name"
        )
    if recorded_recipe is not None and recorded_recipe != recipe:
        differ = [
            f"{key} = {_shown(recorded_recipe.get(key))} in the study, {_shown(recipe.get(key))} now"
            for key in _differences(recorded_recipe, recipe)
        ]
        raise ConfigError(
            f"study {study_name!r} in {storage} was trained with another trial config "
            f"({'; '.join(differ)}); use the same --config and --set, or a new --study name"
        )
    return study


def _shown(value: Any) -> str:
    """A setting's value as JSON (which --set takes for numbers, booleans and lists)."""
    return "unset" if value is None else json.dumps(value)


def rejection_settings(note: str) -> list[str]:
    """The settings a rejected trial's note names (``["train.whiten_stem"]``): each line of the
    error that starts with a dotted setting."""
    lines = note.removeprefix("invalid config: ").splitlines()
    found = (re.match(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\b", line) for line in lines)
    return list(dict.fromkeys(m.group(1) for m in found if m))


def trial_record(trial) -> TrialRecord:
    """One Optuna trial as the leaderboard shows it (a rejected design is Optuna's PRUNED; a draw
    of a design the study already held, ``skipped``, its FAIL).

    The note says why a trial was rejected, pruned or failed (diverged: ``error``; stopped by a
    signal: ``interrupted``; an error that stopped the search: ``fatal``)."""
    import optuna

    attrs = trial.user_attrs
    state = {
        optuna.trial.TrialState.COMPLETE: "complete",
        optuna.trial.TrialState.PRUNED: "pruned",
        optuna.trial.TrialState.FAIL: "failed",
        optuna.trial.TrialState.RUNNING: "running",
        optuna.trial.TrialState.WAITING: "waiting",
    }[trial.state]
    if state == "pruned" and "rejected" in attrs:
        state = "rejected"
    if state == "failed" and "duplicate" in attrs:
        state = "skipped"
    accuracy = attrs.get("best_val_accuracy")
    if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None:
        accuracy = trial.value
    return TrialRecord(
        number=trial.number,
        state=state,
        design=attrs.get("design"),
        label=attrs.get("label", ""),
        params=attrs.get("params"),
        macs=attrs.get("macs"),
        val_accuracy=accuracy,
        epochs=attrs.get("epochs", 0),
        epochs_planned=attrs.get("epochs_planned"),
        note=next((attrs[key] for key in _NOTES if attrs.get(key)), ""),
    )


# The user attributes that say why a trial did not complete, as the leaderboard's note.
_NOTES = ("rejected", "pruned", "error", "interrupted", "fatal")

# The leaderboard's order of states: trials that trained to the end first, then those with a
# partial accuracy or none yet (pruned; running or waiting in another worker), then those that
# failed (diverged, interrupted, or stopped by an error), and designs never trained last.
STATE_ORDER = ("complete", "pruned", "running", "waiting", "failed", "rejected")


def leaderboard(study) -> list[TrialRecord]:
    """Every trial by state (:data:`STATE_ORDER`: complete, pruned, running, waiting, failed,
    rejected), and within a state the best validation accuracy first, then by number.

    A pruned or interrupted trial's accuracy is partial (fewer epochs), so it never ranks above a
    completed trial. Skipped draws (a design the study already held) are left out: nothing was
    trained.
    """
    records = [r for r in map(trial_record, study.get_trials(deepcopy=False)) if r.state != "skipped"]
    return sorted(
        records,
        key=lambda r: (
            STATE_ORDER.index(r.state),
            r.val_accuracy is None,
            -(r.val_accuracy or 0.0),
            r.number,
        ),
    )
