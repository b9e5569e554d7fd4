"""Trials: train designs sampled from the space, a few epochs each, with Optuna.

:func:`run_trials` trains designs sampled from the space with Optuna, for a few epochs each,
and keeps the best by validation accuracy (the test set is never evaluated). Every
epoch reports validation accuracy to a Hyperband (or successive-halving) pruner, which stops poor
trials early.

Only designs within the budget are drawn: the sampler chooses among the design families (every
setting but the blocks) that have one, then each stage's blocks in what the budget leaves. A space
with no design within the budget is refused before anything starts. A design the study already
holds is not trained again: that draw is recorded as a failed trial that the leaderboard hides, and
the next trial takes the nearest design the study does not hold. Workers sharing a study claim a
design before training it, and a trial that finds another claim beside its own gives way.
A design the trial config does not suit (``train.whiten_stem`` with an odd stem width, say) is
recorded as a cheap trial in state ``rejected`` (Optuna state PRUNED, user attribute ``rejected``).
Neither counts towards ``trials``: a call trains ``trials`` trials unless the study comes to hold
every design within the budget, or :data:`MAX_UNTRAINED_DRAWS` designs in a row are rejected, or a
signal stops it (:attr:`SearchResult.stopped` says why).

A trial that fails is Optuna's FAIL, with a user attribute that says why (the leaderboard's note):
``error`` when it diverged (the design stays in the study: it is not drawn again), ``interrupted``
when SIGINT or SIGTERM stopped it, and ``fatal`` when an error that every trial would meet (a
:class:`~cerberus.errors.DataError`, a :class:`~cerberus.errors.ConfigError`) stopped the search.
The design of an interrupted or fatal trial may be drawn again.

The study and its storage: :mod:`cerberus.search.study`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cerberus.arch import Architecture, count_macs, count_params, nhwc_backward_hazard
from cerberus.config import apply_overrides, config_from_dict, override_keys
from cerberus.errors import (
    BudgetError,
    CerberusError,
    ConfigError,
    DivergenceError,
    Interrupted,
    signal_exit_code,
    signal_name,
)
from cerberus.search.enumeration import _Family, families_within_budget, smallest_params
from cerberus.search.results import (
    SearchResult,
    TrialRecord,
    _arch_from_dict,
    check_configs_dir,
    design_config,
    study_pareto,
    write_results,
)
from cerberus.search.space import SearchSpace
from cerberus.search.study import (
    GRACE_SECONDS,
    PrunerName,
    check_folder,
    claim_folder,
    default_storage,
    fail_stale_trials,
    holds_results,
    leaderboard,
    missing_study,
    normal_storage,
    open_study,
    rejection_settings,
    storage_errors,
    trial_prefix,
    trial_recipe,
    trial_record,
)

EventSink = Callable[[dict[str, Any]], None]

# A search stops when this many designs in a row were rejected before training (the trial
# config does not suit them): every one of them is new, so a large space would never run out.
MAX_UNTRAINED_DRAWS = 50


def default_out_dir(study_name: str) -> Path:
    return Path("runs") / f"search-{study_name}"


def check_study_name(study_name: str) -> None:
    """Refuse a study name that cannot name the search folder ``runs/search-<study>``."""
    if not study_name.strip():
        raise ConfigError("--study: the study name is empty; name the study, e.g. --study wide")
    separators = sorted({c for c in study_name if c in "/\\"})
    if separators:
        shown = " or ".join(repr(c) for c in separators)
        raise ConfigError(
            f"--study {study_name!r}: a study name cannot hold {shown} (it names the search folder "
            "runs/search-STUDY); use another name, and --out for the folder"
        )


def trial_base(
    base: dict[str, Any] | None = None, overrides: Sequence[str] = (), *, epochs: int = 10
) -> dict[str, Any]:
    """Config data of every trial: ``base``, then ``train.epochs=<epochs>``, then ``overrides``.

    The test set stays out of trials (``train.test_every_epoch`` is forced off) and they need a
    validation split. The [model] section is replaced per trial, so overrides may not set it.
    """
    if any(text.strip().startswith("model.") for text in overrides):
        raise ConfigError("--set model.*: the model comes from the search space; change the space instead")
    data = apply_overrides(base or {}, [f"train.epochs={epochs}", *overrides])
    data.setdefault("train", {})["test_every_epoch"] = False
    set_by = override_keys(list(overrides))
    config = config_from_dict(
        data, source="trial config", enforce_budget=False, set_by=set_by, model_replaced=True
    )
    if config.data.val_size == 0:
        raise ConfigError(
            "trial config: data.val_size is 0, but trials are ranked by validation accuracy "
            "(the test set is never used to select designs); set data.val_size > 0"
        )
    return data


# A design family (every setting but the blocks) as the sampler's choice: its label, the family
# and its block ranges cut to the budget.
Families = dict[str, tuple[_Family, list[tuple[int, int]]]]


def _suggest_design(trial, families: Families, max_params: int) -> tuple[str, Architecture]:
    """Draw a design within the budget: ``(family label, design)``.

    Optuna's suggestions cannot express the joint constraint ``params <= max_params``, so the
    sampler chooses among the families that have a design within the budget (one categorical,
    fixed for a space and budget), and then the blocks of each stage in what the budget leaves:
    max - const - the blocks chosen before stage i - the fewest of those after it.
    """
    label = trial.suggest_categorical("family", list(families))
    fam, ranges = families[label]
    spent = fam.params([lo for lo, _ in ranges])
    blocks = []
    for i, ((lo, hi), a) in enumerate(zip(ranges, fam.coef_params)):
        b = trial.suggest_int(f"blocks_{i}", lo, min(hi, lo + (max_params - spent) // a))
        spent += (b - lo) * a
        blocks.append(b)
    return label, fam.architecture(blocks)


# The machine a rejection can depend on: oneDNN's channels_last fault is an x86 CPU's alone.
X86_CPU = "x86 CPU"
OTHER_DEVICE = "a GPU or a CPU other than x86"


def trial_machine(trial_data: dict[str, Any]) -> str:
    """Where this process trains trials, as far as a rejection depends on it (:data:`X86_CPU`)."""
    from cerberus.device import resolve_device, x86_cpu  # torch: only when trials train

    device = trial_data.get("train", {}).get("device", "auto")
    return X86_CPU if x86_cpu(resolve_device(device)) else OTHER_DEVICE


def _holding_trials(study, machine: str | None = None):
    """``(trial, design)`` of the trials that hold a design: trained, pruned, rejected, running
    (a claim) or diverged. A trial that failed otherwise (interrupted, its process killed, a
    duplicate draw) does not: its design may be drawn again; nor, for a worker on another
    ``machine``, does a rejection that holds on one kind of machine only (``rejected_on``)."""
    import optuna

    for t in study.get_trials(deepcopy=False):
        design = t.user_attrs.get("design")
        if design is None or (t.state == optuna.trial.TrialState.FAIL and "error" not in t.user_attrs):
            continue
        if machine is not None and t.user_attrs.get("rejected_on", machine) != machine:
            continue
        yield t, _arch_from_dict(design)


def _tried_designs(study, machine: str | None = None) -> dict[Architecture, int]:
    """Designs the study holds (for a worker on ``machine``) -> the lowest trial number of each."""
    tried: dict[Architecture, int] = {}
    for t, arch in _holding_trials(study, machine):
        tried.setdefault(arch, t.number)
    return tried


def _design_holders(study, arch: Architecture, machine: str | None = None) -> list[int]:
    """Numbers of the trials holding ``arch`` (claims of running trials included)."""
    return [t.number for t, held in _holding_trials(study, machine) if held == arch]


def _nearest_untried(fam, ranges, start: Sequence[int], tried, max_params: int) -> tuple[int, ...] | None:
    """The design of ``fam`` within the budget nearest to ``start`` (blocks +-1 a step) that is
    not in ``tried``; None when every one is.

    Fewer blocks never cost more, so the family's designs within the budget are connected by such
    steps: the search visits at most ``len(tried) + 1`` of them.
    """
    start = tuple(start)
    seen, queue = {start}, collections.deque([start])
    while queue:
        blocks = queue.popleft()
        if fam.architecture(blocks) not in tried:
            return blocks
        for i, (lo, hi) in enumerate(ranges):
            for b in (blocks[i] - 1, blocks[i] + 1):
                near = (*blocks[:i], b, *blocks[i + 1 :])
                if lo <= b <= hi and near not in seen and fam.params(near) <= max_params:
                    seen.add(near)
                    queue.append(near)
    return None


def _untried_design(
    families: Families, tried, max_params: int, near: tuple[str, Sequence[int]] | None = None
) -> tuple[str, tuple[int, ...]] | None:
    """A design within the budget that the study does not hold: the nearest to ``near``
    (``(family label, blocks)``) in its family if any, else the one nearest the smallest design
    of the first family that has one. None when the study holds every design within the budget."""
    starts = [near] if near is not None else []
    starts += [(label, [lo for lo, _ in ranges]) for label, (_, ranges) in families.items()]
    for label, blocks in starts:
        fam, ranges = families[label]
        found = _nearest_untried(fam, ranges, blocks, tried, max_params)
        if found is not None:
            return label, found
    return None


class _DuplicateDesign(Exception):
    """The sampler drew a design the study already holds: the draw is recorded as a failed trial
    (which samplers ignore), hidden from the leaderboard, and not counted."""


class _QuietFailures(logging.Filter):
    """Drops Optuna's warnings (a traceback each) about the trials of duplicate draws, which are
    bookkeeping, and of trials another process marked failed, which the search reports itself."""

    def __init__(self, numbers: set[int]):
        super().__init__()
        self.numbers = numbers  # _Objective.quiet

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed ") for n in self.numbers)


def trial_folder(study_name: str, number: int) -> str:
    """``<study>-0007``, in the search folder's ``trials/``."""
    return f"{trial_prefix(study_name)}-{number:04d}"


class _Objective:
    """One Optuna trial: draw a design within the budget, skip it if the study holds it, reject
    it if the trial config does not suit it, else train it and report each epoch."""

    def __init__(self, space, families, base, out_dir, data_dir, train_fn, emit, stop, machine=None):
        self.space, self.families, self.base = space, families, base
        self.machine = machine  # trial_machine(base): which machine-dependent rejections hold
        self.out_dir, self.data_dir, self.train_fn, self.emit = out_dir, data_dir, train_fn, emit
        self.stop = stop  # the search's StopFlag: a signal that came between trials
        self.epochs = base["train"]["epochs"]
        # trial numbers whose failure Optuna need not log: duplicate draws (bookkeeping), and trials
        # another process marked failed while they ran (the search stops with its own message)
        self.quiet: set[int] = set()
        self.number, self.raised = -1, None  # the trial being run, and what its objective raised

    def __call__(self, trial) -> float:
        self.number, self.raised = trial.number, None
        try:
            return self._run(trial)
        except BaseException as err:  # what run_trials tells from Optuna's own errors
            self.raised = err
            raise

    def _note(self, trial, key: str, value: str) -> None:
        """Record why the trial ends, unless another process marked it failed meanwhile (its
        heartbeat lapsed): then nothing can be recorded, and Optuna need not log the trial."""
        import optuna

        try:
            trial.set_user_attr(key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.quiet.add(trial.number)

    def _run(self, trial) -> float:
        import optuna

        label, arch = _suggest_design(trial, self.families, self.space.max_params)
        tried = _tried_designs(trial.study, self.machine)
        holder = tried.get(arch)
        if holder is None:
            # Claim it, then look again: a worker sharing the study may have claimed it too. Each
            # claim is written before its check, so of two claims the later check sees both: a
            # trial keeps the design only when its claim is the only one (both may give way, and
            # the design stays to be drawn again; never do both train it).
            trial.set_user_attr("design", arch.to_dict())
            others = [n for n in _design_holders(trial.study, arch, self.machine) if n != trial.number]
            holder = min(others) if others else None
        if holder is not None:  # not trained again: the next trial takes the nearest untried design
            tried = _tried_designs(trial.study, self.machine)
            untried = _untried_design(self.families, tried, self.space.max_params, (label, arch.blocks))
            if untried is not None:
                label, blocks = untried
                params = {"family": label, **{f"blocks_{i}": b for i, b in enumerate(blocks)}}
                trial.study.enqueue_trial(params)
            trial.set_user_attr("duplicate", holder)
            self.quiet.add(trial.number)
            raise _DuplicateDesign(f"{arch.label()} is the design of trial {holder}")
        params, macs = count_params(arch), count_macs(arch)
        info = dict(design=arch.to_dict(), label=arch.label(), params=params, macs=macs)
        for key, value in {**info, "epochs": 0, "epochs_planned": self.epochs}.items():
            trial.set_user_attr(key, value)
        try:
            config = design_config(arch, self.space.max_params, self.base, name=f"trial-{trial.number:04d}")
        except ConfigError as err:  # the base's settings do not suit this design (whiten_stem)
            # "trial-0007: invalid config\n<setting>: <why>..." -> "invalid config: <setting>: <why>..."
            detail = str(err).removeprefix(f"trial-{trial.number:04d}: invalid config\n")
            trial.set_user_attr("rejected", f"invalid config: {detail}")
            raise optuna.TrialPruned(f"rejected before training: {err}") from None
        hazard = nhwc_backward_hazard(arch) if config.train.channels_last else None
        if hazard is not None:
            from cerberus.device import resolve_device, x86_cpu  # torch: only when it matters

            if x86_cpu(resolve_device(config.train.device)):
                reason = f"train.channels_last: oneDNN trains {hazard} wrongly in channels_last on the CPU"
                trial.set_user_attr("rejected", f"invalid config: {reason}")
                trial.set_user_attr("rejected_on", X86_CPU)  # a GPU worker of the study may train it
                raise optuna.TrialPruned(f"rejected before training: {reason}")
        self.emit(
            {
                "event": "trial_start",
                "trial": trial.number,
                "design": info["label"],
                "params": params,
                "macs": macs,
                "epochs": self.epochs,
            }
        )
        progress: dict[str, Any] = {"epochs": 0, "best": None, "interrupted": None}
        try:
            if self.stop():  # a signal came while this trial was being drawn
                name = signal_name(self.stop.signum)
                progress["interrupted"] = f"interrupted by {name} before training"
                raise Interrupted(f"stopped by {name}", signal_exit_code(self.stop.signum))
            # The runner's own signal handling: SIGINT or SIGTERM finishes the step and raises
            # Interrupted (no checkpoint: trials save none); a second signal stops at once.
            result = self.train_fn(
                config,
                out_dir=self.out_dir / "trials" / trial_folder(trial.study.study_name, trial.number),
                data_dir=self.data_dir,
                on_event=lambda event: self.on_run_event(trial, progress, event),
                evaluate_test=False,
                save_checkpoints=False,
                handle_signals=True,
            )
            if result.best_val_accuracy is None:
                raise ConfigError("trial config: the run reported no validation accuracy")
        except DivergenceError as err:  # this design's fault: the study keeps it
            self._note(trial, "error", str(err))
            raise
        except Interrupted as err:
            name = "SIGTERM" if err.exit_code == 143 else "SIGINT"
            self._note(trial, "interrupted", progress["interrupted"] or f"interrupted by {name}")
            raise
        except KeyboardInterrupt:  # a second signal, or a trainer without signal handling
            self._note(trial, "interrupted", progress["interrupted"] or "interrupted")
            raise
        except CerberusError as err:  # every trial would meet it (data, config): the search stops
            self._note(trial, "fatal", str(err))
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # marked failed meanwhile: run_trials says so
            self.quiet.add(trial.number)
            raise
        return float(result.best_val_accuracy)

    def on_run_event(self, trial, progress: dict[str, Any], event: dict[str, Any]) -> None:
        """Forward the runner's progress; report each epoch's accuracy and maybe prune."""
        import optuna

        kind = event.get("event")
        if kind == "interrupted":  # the runner stopped on a signal; Interrupted follows
            epoch, step = event.get("epoch", 0), event.get("step", 0)
            where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
            progress["interrupted"] = f"interrupted by {event.get('signal', 'a signal')} at {where}"
        if kind == "step":
            self.emit({**event, "event": "trial_step", "trial": trial.number, "epochs": self.epochs})
        if kind != "epoch":
            return
        accuracy = float(event.get("selection_accuracy", event["val_accuracy"]))  # EMA when on
        epoch = progress["epochs"] = progress["epochs"] + 1
        best = progress["best"] = max(accuracy, progress["best"] or accuracy)
        trial.set_user_attr("epochs", epoch)
        trial.set_user_attr("best_val_accuracy", best)
        trial.report(accuracy, epoch)
        self.emit(
            {
                "event": "trial_epoch",
                "trial": trial.number,
                "epoch": epoch,
                "epochs": self.epochs,
                "val_accuracy": accuracy,
                "best_val_accuracy": best,
            }
        )
        if epoch < self.epochs and trial.should_prune():
            reason = f"after epoch {epoch} (val accuracy {accuracy:.4f})"
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)  # propagates out of the runner, which cleans up


def _cannot_tell(err: BaseException) -> bool:
    """Whether ``err`` is Optuna refusing to record the end of a finished trial (or the assertion
    its trial runner raises while handling that refusal)."""
    for e in (err, err.__context__):
        if isinstance(e, ValueError) and str(e).startswith("Cannot tell a "):
            return True
    return False


def _failed_by_another(study, number: int) -> bool:
    """Whether trial ``number`` of this process is FAIL without a note of ours: another process
    marked it failed (its heartbeat had lapsed) while this one ran it."""
    import optuna

    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    notes = ("error", "interrupted", "fatal", "duplicate")
    return (
        trial is not None
        and trial.state == optuna.trial.TrialState.FAIL
        and not any(key in trial.user_attrs for key in notes)
    )


def _held_every_design(study, tried, max_params: int, machine: str | None = None) -> str:
    """Why a search stops when the study holds every design within the budget: how many, and how
    many of them were rejected before training (and the settings that rejected them)."""
    import optuna

    within = {arch for arch in tried if count_params(arch) <= max_params}
    message = f"the study holds every design within the budget ({len(within):,})"
    notes: dict[Architecture, list[str | None]] = {}  # each design's holders' rejection notes
    running: dict[Architecture, bool] = {}  # whether every holder of a design is still running
    for t, arch in _holding_trials(study, machine):
        notes.setdefault(arch, []).append(t.user_attrs.get("rejected"))
        running[arch] = running.get(arch, True) and t.state == optuna.trial.TrialState.RUNNING
    claimed = sum(running.get(arch, False) for arch in within)
    if claimed:  # a worker trains it now, or its process died: the claim lapses without a heartbeat
        message += (
            f"; {claimed:,} of them {'is' if claimed == 1 else 'are'} held by a running trial, "
            f"released if its process has died once {GRACE_SECONDS // 60} minutes pass without its "
            "heartbeat"
        )
    # a design counts as rejected when nothing but rejections holds it (a worker elsewhere may
    # have trained one that this machine rejects)
    rejected = [held[0] for held in (notes.get(arch, [None]) for arch in within) if all(held)]
    if not rejected:
        return message
    n = len(rejected)
    if n == len(within):
        who = "it was" if n == 1 else "all of them were"
    else:
        who = f"{n:,} of them {'was' if n == 1 else 'were'}"
    settings = sorted({key for note in rejected for key in rejection_settings(note)})
    them = "it" if n == 1 else "them"
    if settings:
        verb = "does" if len(settings) == 1 else "do"
        why = f"the trial config's {' and '.join(settings)} {verb} not suit {them}"
    else:
        why = f"the trial config does not suit {them}"
    return f"{message}; {who} rejected before training ({why}; see the leaderboard's notes)"


def run_trials(
    space: SearchSpace,
    *,
    trials: int,
    out_dir: str | Path | None = None,
    study_name: str = "default",
    storage: str | None = None,
    base: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    data_dir: str | None = None,
    pruner: PrunerName = "hyperband",
    seed: int | None = None,
    top: int = 5,
    configs_dir: str | Path | None = None,
    on_event: EventSink | None = None,
    train_fn: Callable[..., Any] | None = None,
) -> SearchResult:
    """Run ``trials`` more trials of the study, then write its results.

    ``base`` is config data for the written configs (the defaults when None); trials train on
    ``base`` with ``train.epochs=10`` and then ``overrides`` (``["train.epochs=3", ...]``). The
    study lives in ``storage`` (default ``sqlite:///<out_dir>/study.db``) under ``study_name``;
    ``trials=0`` only reports on an existing study (and creates no file when there is none).
    Writes ``<out_dir>/pareto.png``, the ``top`` completed designs as train configs in
    ``configs_dir`` (default ``<out_dir>/configs``) and ``<out_dir>/leaderboard.json``.
    ``train_fn`` defaults to :func:`cerberus.runner.train_run`.

    Only designs within the budget, and not yet in the study, are trained; rejected designs do
    not count towards ``trials`` (see the module's docstring). Raises :class:`BudgetError` when no
    design of the space is within the budget, and :class:`ConfigError` when the study was trained
    with another trial config (the resolved config less :data:`~cerberus.search.study.NOT_RECIPE`).
    The result's ``trials_trained`` counts the trials trained, and ``stopped`` says why there
    were fewer than ``trials``.

    Progress goes to ``on_event`` as dicts: ``study``, ``trial_start``, ``trial_step``,
    ``trial_epoch``, ``trial_end`` (a :class:`TrialRecord` as a dict).

    SIGINT (Ctrl-C) and SIGTERM are handled as ``cerberus train`` handles them
    (:func:`cerberus.runner.stop_on_signals`, in the main thread): the running trial finishes its
    step and is marked failed (note ``interrupted by SIGTERM at ...``), the results are written,
    and the call returns with ``interrupted=True`` and ``stopped`` naming the signal (exit 130 or
    143); a second signal stops at once. Running the search again continues the study.

    An error that every trial would meet (:class:`~cerberus.errors.DataError`,
    :class:`~cerberus.errors.ConfigError`, any :class:`~cerberus.errors.CerberusError` but
    divergence) marks the trial failed with the message as its note, writes the results of the
    study, and is raised. The study name must be able to name a folder (``--study``: not empty,
    no path separator), and is checked before anything is created.
    """
    if trials < 0:
        raise ConfigError(f"--trials: must be 0 or more, got {trials}")
    check_study_name(study_name)
    trial_data = trial_base(base, overrides)
    epochs = trial_data["train"]["epochs"]
    families: Families = {}
    if trials:
        families = {fam.label(): (fam, ranges) for fam, ranges in families_within_budget(space)}
        if not families:
            raise BudgetError(
                f"no design of the search space fits the {space.max_params:,}-parameter budget (the "
                f"smallest has {smallest_params(space):,}); raise the budget or search smaller designs"
            )
    if trials and train_fn is None:  # data that is not there fails every trial: say so first
        from cerberus.config import DataConfig
        from cerberus.data import check_available, resolve_data_root

        data = DataConfig.model_validate(trial_data.get("data", {}))  # checked by trial_base already
        check_available(resolve_data_root(data_dir, data.root), data.download)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(study_name)

    def make_out_dir() -> None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"--out {out_dir}: is a file, not a folder for the search") from None
        except OSError as err:
            raise ConfigError(f"--out {out_dir}: cannot create the search folder ({err.strerror})") from None

    # Trials need the folder before the study is made (a study bound to its recipe with nowhere
    # to write would refuse the next search); a report, or a storage that fails, leaves nothing.
    made = trials > 0 and not out_dir.exists()
    if trials:
        make_out_dir()
    storage = normal_storage(storage) if storage else default_storage(out_dir)
    try:
        if trials and top:  # where the configs go at the end: refused now rather than after training
            check_configs_dir(configs_dir if configs_dir is not None else out_dir / "configs")
        # Another study's results are refused before anything is made; a folder that holds
        # results (named by study.json, or from before folders named their study) needs its
        # study to be there already, not one made anew under its name.
        owner = check_folder(out_dir, study_name)
        used = owner is not None or holds_results(out_dir)
        try:
            study = open_study(
                space,
                study_name=study_name,
                storage=storage,
                pruner=pruner,
                epochs=epochs,
                seed=seed,
                create=trials > 0 and not used,
                recipe=trial_recipe(trial_data) if trials else None,
            )
        except ConfigError as err:
            if not used or not str(err).startswith("no study named"):
                raise
            raise missing_study(out_dir, owner, study_name, storage) from None
    except CerberusError:
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if nothing was put in it
        raise
    make_out_dir()
    emit = on_event or (lambda event: None)
    with storage_errors(storage):
        claim_folder(out_dir, study, storage)
        existing = len(leaderboard(study))
    emit(
        {
            "event": "study",
            "study": study_name,
            "storage": storage,
            "out_dir": str(out_dir),
            "existing_trials": existing,
            "trials": trials,
        }
    )
    if train_fn is None and trials:
        from cerberus.runner import train_run as train_fn

    finished: list[TrialRecord] = []  # this call's trials, as the leaderboard shows them
    outcomes: list[str] = []  # the state of every draw, duplicates ("skipped") included

    def after_trial(study, trial) -> None:
        record = trial_record(trial)
        outcomes.append(record.state)
        if record.state != "skipped":
            finished.append(record)
            emit({"event": "trial_end", **finished[-1].to_dict()})

    # SIGINT and SIGTERM between trials set ``stop`` (checked before each draw and before each
    # trial trains); during a trial the runner's own handler takes over and raises Interrupted.
    stop: Any = _NoStop()
    signals: contextlib.AbstractContextManager = contextlib.nullcontext()
    machine = None  # which machine-dependent rejections hold here (trial_machine)
    if trials:
        from cerberus.runner import StopFlag, stop_on_signals

        stop = StopFlag()
        signals = stop_on_signals(stop)
        with contextlib.suppress(CerberusError):  # a device not here: the first trial says so
            machine = trial_machine(trial_data)
    objective = _Objective(space, families, trial_data, out_dir, data_dir, train_fn, emit, stop, machine)
    trained, untrained_draws, stopped, interrupted = 0, 0, "", False
    fatal: CerberusError | None = None
    quiet = _QuietFailures(objective.quiet)
    logging.getLogger("optuna.study._optimize").addFilter(quiet)
    with storage_errors(storage), signals:  # also while the results are written
        try:
            while trained < trials:
                if stop():
                    raise Interrupted(f"stopped by {signal_name(stop.signum)}", signal_exit_code(stop.signum))
                fail_stale_trials(study)  # a dead process's claims lapse
                tried = _tried_designs(study, machine)
                if _untried_design(families, tried, space.max_params) is None:
                    stopped = _held_every_design(study, tried, space.max_params, machine)
                    break
                if untrained_draws >= MAX_UNTRAINED_DRAWS:
                    stopped = (
                        f"the last {MAX_UNTRAINED_DRAWS} designs drawn were rejected before training "
                        "(see the leaderboard's notes)"
                    )
                    break
                objective.number, objective.raised = -1, None
                stopped_by: BaseException | None = None  # a signal that came as the trial ended
                try:
                    study.optimize(
                        objective,
                        n_trials=1,
                        catch=(DivergenceError, _DuplicateDesign),  # that trial fails; the search goes on
                        callbacks=[after_trial],
                    )
                except (ValueError, AssertionError) as err:
                    # Optuna cannot record the end of a trial that another process marked failed
                    # while it ran (its heartbeat lapsed): "Cannot tell a FAIL trial", or an assertion
                    # raised while it handles that. A signal the trial stopped on still stops the
                    # search as a signal; anything else of the trial's own comes out as itself.
                    cause = objective.raised
                    if cause is err or not _cannot_tell(err):
                        raise
                    if isinstance(cause, (KeyboardInterrupt, Interrupted)):
                        stopped_by = cause
                    elif not _failed_by_another(study, objective.number):
                        raise
                    else:
                        raise CerberusError(
                            f"trial {objective.number} was marked failed while it trained: no heartbeat "
                            f"reached the study for over {GRACE_SECONDS // 60} minutes (this process was "
                            "stopped or lost the study storage), so its design went back to the study and "
                            "its result is not recorded; run the search again to go on"
                        ) from None
                if stopped_by is not None:
                    raise stopped_by  # outside the handler: its own chain stays as it was
                if outcomes[-1] in ("complete", "pruned", "failed"):  # trained (failed: diverged)
                    trained, untrained_draws = trained + 1, 0
                elif outcomes[-1] == "rejected":  # a duplicate is not counted: an untried one follows
                    untrained_draws += 1
        except (KeyboardInterrupt, Interrupted) as err:
            interrupted = True
            signum = stop.signum
            if signum is None:
                signum = signal.SIGTERM if getattr(err, "exit_code", 130) == 143 else signal.SIGINT
            stopped = f"interrupted by {signal_name(signum)}"
            stop.signum = signum  # the runner's handler took the signal: a second one stops at once
        except CerberusError as err:  # every trial would meet it: written below, then raised
            fatal = err
        finally:
            logging.getLogger("optuna.study._optimize").removeFilter(quiet)
        records = leaderboard(study)
        result = SearchResult(
            study_name,
            storage,
            out_dir,
            len(finished),
            records,
            study_pareto(records),
            interrupted=interrupted,
            trials_trained=trained,
            stopped=stopped,
            signal_name=signal_name(stop.signum) if interrupted else "",
        )
        write_results(result, space, top=top, base=base, configs_dir=configs_dir)
        if stop() and not interrupted:  # a signal came while they were written: say so in them too
            result.interrupted, result.signal_name = True, signal_name(stop.signum)
            result.stopped = f"interrupted by {result.signal_name}"
            write_results(result, space, top=top, base=base, configs_dir=configs_dir)
    if fatal is not None:
        raise fatal
    return result


class _NoStop:
    """A StopFlag that never stops (a report only: no signal handling, no torch import)."""

    signum = None

    def __call__(self) -> bool:
        return False
