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
that looks for a design to train in the study, once :data:`GRACE_SECONDS` have passed without a
heartbeat (:func:`fail_stale_trials`); their designs may then be drawn again.

A search folder holds the results of one study: :data:`FOLDER_MARK` names it (its name, and the
``uid`` the study records when it is created), so a second study is refused there rather than
writing over the first one's results.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from cerberus.config import ExperimentConfig, config_from_dict
from cerberus.errors import CerberusError, ConfigError
from cerberus.files import atomic_write, to_json
from cerberus.search.results import TrialRecord
from cerberus.search.space import SearchSpace

HEARTBEAT_SECONDS = 60  # a running trial writes a heartbeat this often...
GRACE_SECONDS = 300  # ...and counts as dead (failed) after this long without one

PrunerName = Literal["hyperband", "halving", "none"]


def default_storage(out_dir: Path) -> str:
    """``sqlite:///<out>/study.db``, the path absolute and escaped (a folder named ``a?b`` too)."""
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(Path(out_dir).resolve() / "study.db")).render_as_string()


def normal_storage(url: str) -> str:
    """``url`` with an SQLite file's path made absolute, so that workers started in different
    folders name one database alike (other URLs as given)."""
    database = _sqlite_database(url)
    if database in (None, "", ":memory:"):
        return url
    from sqlalchemy.engine import make_url

    absolute = os.path.normpath(Path(database).absolute())  # "w1/../shared.db" is "shared.db"
    return make_url(url).set(database=absolute).render_as_string(hide_password=False)


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
    database = _sqlite_database(url) if fcntl is not None else None
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


def _sqlite_database(url: str) -> str | None:
    """The database of an SQLite URL (a path, ``:memory:`` or ``""``); None for other URLs, and
    for SQLite's URI form (``?uri=true``), which names no plain path."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # a bad URL: opening the storage says so
        return None
    return None if parsed.query.get("uri") else parsed.database or ""


def _check_lasting(url: str) -> None:
    """Refuse an in-memory SQLite storage: the study would vanish with this process, and its
    heartbeat thread (another connection) would find no tables."""
    if _sqlite_database(url) in ("", ":memory:"):
        raise ConfigError(
            f"--storage {url}: an in-memory study vanishes with this process and cannot be resumed "
            "or shared; name a file, e.g. sqlite:///study.db"
        )


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a failure to read or write the study storage (a damaged SQLite file, a database
    server gone) into one :class:`~cerberus.errors.CerberusError` naming the storage."""
    import optuna
    import sqlalchemy.exc

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
        cause = err.__cause__ if isinstance(err, optuna.exceptions.StorageInternalError) else err
        detail = str(cause or err).splitlines()[0] if str(cause or err) else type(err).__name__
        raise CerberusError(
            f"{_storage_name(url)}: the study storage cannot be read or written: {detail}"
        ) from None


def _storage_name(url: str) -> str:
    database = _sqlite_database(url)
    return f"study file {database}" if database not in (None, "", ":memory:") else f"--storage {url}"


def _sqlite_without_studies(url: str) -> bool:
    """Whether ``url`` names an SQLite file that does not exist or holds no Optuna storage (no
    ``version_info`` table): opening it would create the file, or write Optuna's tables into it."""
    database = _sqlite_database(url)
    if database in (None, "", ":memory:"):
        return False
    path = Path(database)
    if not path.exists():
        return True
    try:  # read-only: looking changes nothing
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'version_info'"
            )
            return tables.fetchone() is None
    except sqlite3.Error:  # damaged, or not a database: opening the storage says so
        return False


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
            database = _sqlite_database(url)
            damaged = isinstance(err, sqlalchemy.exc.DatabaseError) and not isinstance(
                err,
                sqlalchemy.exc.OperationalError,  # locked, or cannot be opened: not the content
            )
            if damaged and database and Path(database).is_file():
                raise CerberusError(  # a file that is there but cannot be read: damaged (exit 1)
                    f"{_storage_name(url)}: cannot open the study storage (damaged, or not an Optuna "
                    f"study): {detail}"
                ) from None
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

    _check_lasting(storage)
    if not create and _sqlite_without_studies(storage):  # reading only: create no file, no tables
        raise ConfigError(f"no study named {study_name!r} in {storage}")
    sampler = optuna.samplers.TPESampler(seed=seed)
    fingerprint = _space_fingerprint(space)
    with _creation_lock(storage), storage_errors(storage):
        store = _open_storage(storage)
        settings = dict(
            storage=store, study_name=study_name, sampler=sampler, pruner=_make_pruner(pruner, epochs)
        )
        created = False
        try:
            if create:
                try:
                    study = optuna.create_study(direction="maximize", **settings)
                    created = True
                except optuna.exceptions.DuplicatedStudyError:  # it exists: load it
                    study = optuna.load_study(**settings)
            else:
                study = optuna.load_study(**settings)
        except KeyError:
            raise ConfigError(f"no study named {study_name!r} in {storage}") from None
        if created:  # the name search folders know it by; only its creator writes it (no race)
            study.set_user_attr("uid", uuid.uuid4().hex)
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


def fail_stale_trials(study) -> None:
    """Mark failed the running trials whose process died (no heartbeat for :data:`GRACE_SECONDS`):
    their claims on designs lapse, and the designs may be drawn again."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


FOLDER_MARK = "study.json"  # in a search folder: the study whose results it holds


def folder_study(out_dir: Path) -> dict[str, Any] | None:
    """The study a search folder holds the results of (``study``, ``uid``, ``storage``), or None
    for a folder that names none (new, or from before folders named their study)."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file, not a folder for the search")
    path = folder / FOLDER_MARK
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CerberusError(
            f"{path}: cannot read which study this folder holds ({err.strerror or err})"
        ) from None
    except ValueError:
        raise CerberusError(
            f"{path}: damaged; remove it (the folder's study is then read from leaderboard.json and "
            "trials/) or choose another --out"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("study"), str):
        raise ConfigError(f"{path}: not a search folder's record of its study; choose another --out")
    return data


def trial_prefix(study_name: str) -> str:
    """The part of a trial folder's name (``<prefix>-0007``) that names its study."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", study_name)


def _leaderboard_study(out_dir: Path) -> dict[str, Any] | None:
    """``study`` and ``storage`` as a folder's leaderboard.json records them, if it does."""
    try:
        data = json.loads((Path(out_dir) / "leaderboard.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("study"), str):
        storage = data.get("storage")
        return {"study": data["study"], "storage": storage if isinstance(storage, str) else None}
    return None


def _check_results(out_dir: Path, study_name: str) -> None:
    """For a folder without :data:`FOLDER_MARK`: refuse it if its results are another study's,
    as its leaderboard.json names it, or else its trial folders' names (``<study>-0007``)."""
    recorded = _leaderboard_study(out_dir)
    if recorded is not None:
        if recorded["study"] != study_name:
            raise ConfigError(
                f"--out {out_dir}: holds the results of study {recorded['study']!r} (leaderboard.json); "
                "choose another --out"
            )
        return
    found = (re.fullmatch(r"(.+)-\d{4,}", p.name) for p in (Path(out_dir) / "trials").glob("*"))
    others = sorted({m.group(1) for m in found if m} - {trial_prefix(study_name)})
    if others:
        raise ConfigError(
            f"--out {out_dir}: holds the trials of another study (trials/{others[0]}-NNNN); "
            "choose another --out"
        )


def check_folder(out_dir: Path, study_name: str, uid: str | None = None) -> dict[str, Any] | None:
    """Refuse a search folder that holds another study's results: another name (from
    :data:`FOLDER_MARK`, or from the results of a folder without one), or (``uid``: the study's,
    once open) a study created anew under the same name. Returns the folder's record, if any."""
    owner = folder_study(out_dir)
    if owner is None:
        _check_results(out_dir, study_name)
        return None
    if owner["study"] != study_name or (None not in (uid, owner.get("uid")) and owner.get("uid") != uid):
        anew = " (another study created under that name)" if owner["study"] == study_name else ""
        raise ConfigError(
            f"--out {out_dir}: holds the results of study {owner['study']!r}{anew}, in "
            f"{owner.get('storage', 'a storage not recorded')}; choose another --out"
        )
    return owner


def missing_study(out_dir: Path, owner: dict[str, Any] | None, study_name: str, storage: str) -> ConfigError:
    """The refusal when a folder that holds results needs its study and ``storage`` lacks it."""
    recorded = (owner or _leaderboard_study(out_dir) or {}).get("storage")
    if isinstance(recorded, str) and normal_storage(recorded) != storage:  # a worker that forgot --storage
        return ConfigError(
            f"--out {out_dir}: holds the results of study {study_name!r} in {recorded}; pass "
            f"--storage {recorded} to continue it, or choose another --out"
        )
    if owner is not None:
        return ConfigError(
            f"--out {out_dir}: holds the results of study {study_name!r}, which {storage} no longer "
            "holds (deleted?); choose another --out, or remove the folder to start again there"
        )
    held = [name for name in ("leaderboard.json", "trials/") if (Path(out_dir) / name.rstrip("/")).exists()]
    return ConfigError(
        f"--out {out_dir}: holds the results ({', '.join(held)}) of study {study_name!r}, which {storage} "
        "does not hold (deleted?); choose another --out, or remove them to start again there"
    )


def claim_folder(out_dir: Path, study, storage: str) -> None:
    """Check that ``out_dir`` holds this open study's results, or none (:func:`check_folder`),
    and name the study there, with where it is now (a study from before studies recorded a
    ``uid`` is not named)."""
    uid = study.user_attrs.get("uid")
    owner = check_folder(out_dir, study.study_name, uid)
    record = {"study": study.study_name, "uid": uid, "storage": storage}
    if uid is not None and owner != record:
        atomic_write(Path(out_dir) / FOLDER_MARK, to_json(record, indent=2) + "\n")


def holds_results(out_dir: Path) -> bool:
    """Whether a folder holds a search's results (a leaderboard, trial folders)."""
    folder = Path(out_dir)
    return (folder / "leaderboard.json").exists() or any((folder / "trials").glob("*"))


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
        note=next((attrs[key] for key in _NOTES if attrs.get(key)), "") or _SILENT.get(state, ""),
    )


# The note of a trial that ended without saying why: its process was killed (its heartbeat
# stopped, see fail_stale_trials) or crashed.
_SILENT = {"failed": "no result: its process died or crashed"}


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
