"""Trials: train designs sampled from the space, a few epochs each, with Optuna.

:func:`run_trials` trains designs sampled from the space with Optuna, for a few epochs each,
and keeps the best by validation accuracy (the test set is never evaluated). Every
epoch reports validation accuracy to a Hyperband (or successive-halving) pruner, which stops poor
trials early. Designs over the budget never start training: the sampler narrows each stage's
block range to what the budget leaves (so sampled designs fit), and a combination of widths that
cannot fit even with one block per stage is recorded as a cheap trial in state ``rejected``
(Optuna state PRUNED, user attribute ``rejected``) that counts towards ``--trials``.

The study and its storage: :mod:`cerberus.search.study`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cerberus.arch import STEM_KERNEL, Architecture, count_macs, count_params, nhwc_backward_hazard
from cerberus.config import apply_overrides, config_from_dict, override_keys
from cerberus.errors import BudgetError, ConfigError, DivergenceError, Interrupted
from cerberus.search.enumeration import _family
from cerberus.search.results import SearchResult, TrialRecord, design_config, study_pareto, write_results
from cerberus.search.space import SearchSpace, geometry_suffix
from cerberus.search.study import PrunerName, default_storage, leaderboard, open_study, trial_record

EventSink = Callable[[dict[str, Any]], None]


def default_out_dir(study_name: str) -> Path:
    return Path("runs") / f"search-{study_name}"


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


def _suggest_design(trial, space: SearchSpace) -> tuple[Architecture, bool]:
    """Draw a design; block ranges narrow to what the budget leaves. ``(design, fits)``."""
    # Parameters whose choices depend on the map's geometry (the way of downsampling and the
    # stem kernel) get their own names, as Optuna needs one fixed set of choices per name.
    mode = trial.suggest_categorical("downsample", space.usable_modes())
    stem_kernel = trial.suggest_categorical(
        f"stem_kernel{geometry_suffix((mode, STEM_KERNEL))}", space.stem_kernels(mode)
    )
    geometry = (mode, stem_kernel)
    suffix = geometry_suffix(geometry)
    n = trial.suggest_categorical(f"stages{suffix}", space.stage_counts(geometry))
    if space.channels is not None:
        options = {"-".join(map(str, w)): w for w in space.widths(n)}
        widths = options[trial.suggest_categorical(f"channels_{n}", list(options))]
    else:
        base = trial.suggest_categorical("base_width", space.base_width)
        growth = trial.suggest_categorical("growth", space.growth)
        widths = tuple(max(1, round(base * growth**i)) for i in range(n))
    f = trial.suggest_categorical("conv_kernel", space.conv_kernel)
    k = trial.suggest_categorical("skip_kernel", space.skip_kernel)
    pool = trial.suggest_categorical(f"pool_size_{n}{suffix}", space.pools(n, geometry))
    stem = trial.suggest_categorical("stem_channels", space.stem_channels) or widths[0]
    fam = _family(widths, f, k, pool, stem, *geometry)
    ranges = space.block_ranges(n)
    # Budget left for stage i = max - const - chosen stages before i - the minimum of those after.
    spent = fam.const_params + sum(lo * a for (lo, _), a in zip(ranges, fam.coef_params))
    if spent > space.max_params:
        return fam.architecture([lo for lo, _ in ranges]), False
    blocks = []
    for i, ((lo, hi), a) in enumerate(zip(ranges, fam.coef_params)):
        most = lo + (space.max_params - spent) // a
        b = trial.suggest_int(f"blocks_{i}", lo, min(hi, most))
        spent += (b - lo) * a
        blocks.append(b)
    return fam.architecture(blocks), True


def trial_folder(study_name: str, number: int) -> str:
    """``<study>-0007``: studies sharing an output folder keep their trials apart."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', study_name)}-{number:04d}"


class _Objective:
    """One Optuna trial: draw a design, refuse it if over budget, train it, report each epoch."""

    def __init__(self, space, base, out_dir, data_dir, train_fn, emit):
        self.space, self.base, self.out_dir, self.data_dir = space, base, out_dir, data_dir
        self.train_fn, self.emit = train_fn, emit
        self.epochs = base["train"]["epochs"]

    def __call__(self, trial) -> float:
        import optuna

        arch, fits = _suggest_design(trial, self.space)
        params, macs = count_params(arch), count_macs(arch)
        info = dict(design=arch.to_dict(), label=arch.label(), params=params, macs=macs)
        for key, value in {**info, "epochs": 0, "epochs_planned": self.epochs}.items():
            trial.set_user_attr(key, value)
        try:
            if not fits:  # over even with the fewest blocks: say so rather than train
                raise BudgetError(f"{params:,} parameters, over the {self.space.max_params:,} budget")
            config = design_config(arch, self.space.max_params, self.base, name=f"trial-{trial.number:04d}")
        except BudgetError as err:
            trial.set_user_attr("rejected", f"over budget: {err}")
            raise optuna.TrialPruned(f"rejected before training: {err}") from None
        except ConfigError as err:  # the base's settings do not suit this design (whiten_stem)
            trial.set_user_attr("rejected", f"invalid config: {err}")
            raise optuna.TrialPruned(f"rejected before training: {err}") from None
        hazard = nhwc_backward_hazard(arch) if config.train.channels_last else None
        if hazard is not None:
            from cerberus.device import resolve_device, x86_cpu  # torch: only when it matters

            if x86_cpu(resolve_device(config.train.device)):
                reason = f"train.channels_last: oneDNN trains {hazard} wrongly in channels_last on the CPU"
                trial.set_user_attr("rejected", f"invalid config: {reason}")
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
        progress = {"epochs": 0, "best": None}
        try:
            result = self.train_fn(
                config,
                out_dir=self.out_dir / "trials" / trial_folder(trial.study.study_name, trial.number),
                data_dir=self.data_dir,
                on_event=lambda event: self.on_run_event(trial, progress, event),
                evaluate_test=False,
                save_checkpoints=False,
                handle_signals=False,  # Ctrl-C stops the search now, not after a checkpoint
            )
        except DivergenceError as err:
            trial.set_user_attr("error", str(err))
            raise
        if result.best_val_accuracy is None:
            raise ConfigError("trial config: the run reported no validation accuracy")
        return float(result.best_val_accuracy)

    def on_run_event(self, trial, progress: dict[str, Any], event: dict[str, Any]) -> None:
        """Forward the runner's progress; report each epoch's accuracy and maybe prune."""
        import optuna

        kind = event.get("event")
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
            reason = f"pruned after epoch {epoch} (val accuracy {accuracy:.4f})"
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)  # propagates out of the runner, which cleans up


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
    ``trials=0`` only reports on an existing study. Writes ``<out_dir>/pareto.png``, the ``top``
    completed designs as train configs in ``configs_dir`` (default ``<out_dir>/configs``) and
    ``<out_dir>/leaderboard.json``. ``train_fn`` defaults to :func:`cerberus.runner.train_run`.

    Progress goes to ``on_event`` as dicts: ``study``, ``trial_start``, ``trial_step``,
    ``trial_epoch``, ``trial_end`` (a :class:`TrialRecord` as a dict). Ctrl-C
    (KeyboardInterrupt) marks the running trial failed and returns with ``interrupted=True``;
    running the search again continues the study.
    """
    if trials < 0:
        raise ConfigError(f"--trials: must be 0 or more, got {trials}")
    trial_data = trial_base(base, overrides)
    epochs = trial_data["train"]["epochs"]
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(study_name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out_dir}: cannot create the search folder ({err.strerror})") from None
    storage = storage or default_storage(out_dir)
    study = open_study(
        space,
        study_name=study_name,
        storage=storage,
        pruner=pruner,
        epochs=epochs,
        seed=seed,
        create=trials > 0,
    )
    emit = on_event or (lambda event: None)
    emit(
        {
            "event": "study",
            "study": study_name,
            "storage": storage,
            "out_dir": str(out_dir),
            "existing_trials": len(study.get_trials(deepcopy=False)),
            "trials": trials,
        }
    )
    if train_fn is None and trials:
        from cerberus.runner import train_run as train_fn

    finished: list[TrialRecord] = []

    def after_trial(study, trial) -> None:
        finished.append(trial_record(trial))
        emit({"event": "trial_end", **finished[-1].to_dict()})

    interrupted = False
    try:
        study.optimize(
            _Objective(space, trial_data, out_dir, data_dir, train_fn, emit),
            n_trials=trials,
            catch=(DivergenceError,),  # that trial fails; the search goes on
            callbacks=[after_trial],
        )
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
    records = leaderboard(study)
    result = SearchResult(
        study_name, storage, out_dir, len(finished), records, study_pareto(records), interrupted=interrupted
    )
    write_results(result, space, top=top, base=base, configs_dir=configs_dir)
    return result
