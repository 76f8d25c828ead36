"""UnlearnConfig: every choice of one unlearning run, with its default in exactly one place.

The in-process loop (:func:`~lightning_unlearn.unlearn`, :class:`~lightning_unlearn.callbacks.SelectiveUnlearning`),
the federated protocol (:func:`~lightning_unlearn.federated.federated_unlearn`), Flower's ``UnlearnPlan``
and the CLI (``lightning-unlearn unlearn --ratio ...``) all take this object. Values are checked when it
is built, so a bad value fails before any work with a line that names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Protocol, Sequence

ENGINES = ("central", "federated")
#: Channel selection over layers: the top ``ratio`` per layer, or over all layers at once.
SCOPES = ("layer", "global")
#: Repair objectives; all but ``"retain"`` add a forget term on forget batches (the module needs the mixin).
#: ``"heldout"``: forget samples distilled toward the original's softmax with the true logit lowered by its
#: class's memorisation gap (sample requests: the samples should look held-out, not mislabelled).
OBJECTIVES = ("random_label", "ascent", "retain", "heldout")
FORGET_AWARE = ("random_label", "ascent", "heldout")
#: Objectives whose forget term needs per-sample targets computed from the original at fit start.
TARGETED = ("heldout",)
#: After the repair: ``"head"`` re-initialises the forgotten classes' head rows and fits them on retain features
#: (:func:`lightning_unlearn.repair.calibration.calibrate_head`); ``"none"`` leaves the head as repaired.
CALIBRATIONS = ("head", "none")
#: ``calibrate_epochs="auto"`` when the original's training epochs are unknown (logged at info).
CALIBRATE_EPOCHS_FALLBACK = 10
#: How the selected slices are removed before the repair (or a callable ``(model, mask, generator) -> changed``).
RESETS = ("none", "reinit", "dampen")
#: BatchNorm running statistics during the repair.
BN_MODES = ("frozen", "selected")

#: The registry of channel-scoring methods, name -> scorer class, in registration order. It lives with the
#: settings (filled by :func:`lightning_unlearn.scoring.register_scorer`), so they check a method name
#: without importing any algorithm.
SCORERS: dict[str, type] = {}


class RequestLike(Protocol):
    """What resolving ``"auto"`` reads from a :class:`~lightning_unlearn.ForgetRequest`."""

    kind: str
    classes: Sequence[int]

#: What ``"auto"`` resolves to on each engine. In a federation retain-only masked rounds with the forgotten head
#: rows at 10x (a forget term on shared body channels cost 1-8 points of remaining accuracy there); class requests
#: run the central procedure: no reset, then refit the forgotten head rows in federated rounds (``calibrate="head"``;
#: on MNIST, docs/benchmarks/federated_mnist.md, a dampening reset before it lost 0.6 points of remaining accuracy,
#: relearned faster and cost a statistics round).
#: One row per request kind, so a default changes in one line. Centrally (population benchmark, digits and an
#: MNIST subset, per-example U-LiRA against retrained populations, docs/benchmarks/population.md): class requests
#: repair on retain data without a reset, then refit the forgotten head rows on retain features
#: (``calibrate="head"``); sample requests distil the forget samples toward a held-out-like target, without a
#: reset (a dampening reset is itself what the attack sees).
AUTO: dict[str, dict[str, Any]] = {
    "central": {
        "class": {"objective": "retain", "reset": "none", "calibrate": "head"},
        "sample": {"objective": "heldout", "reset": "none", "calibrate": "none"},
        "head_lr_scale": None,
    },
    "federated": {
        "class": {"objective": "retain", "reset": "none", "calibrate": "head"},
        # without a reset a leaving client's data stays better recognised than after retraining (federated MNIST,
        # 3 seeds: 1.4-1.6 points); sample requests match retraining without one, as centrally, and not with it
        "client": {"objective": "retain", "reset": "dampen", "calibrate": "none"},
        "sample": {"objective": "retain", "reset": "none", "calibrate": "none"},
        "head_lr_scale": 10.0,
    },
}
#: What the federated engine cannot run yet: the held-out target needs the original's outputs on the retain /
#: forget data, which the server never sees. (The head calibration runs federated: clients send each forgotten
#: class's summed forget head features and train the re-initialised rows in masked rounds.)
CENTRAL_ONLY = {"objective": ("heldout",)}

#: ``max_steps="auto"`` centrally: two epochs of retain batches, at most :data:`AUTO_STEPS_MAX` optimizer
#: steps and at least :data:`AUTO_STEPS_MIN`. The repair restores what the reset removed; beyond ~6,400 retain
#: samples (batch 64) the budget is constant while retraining grows linearly with the data; on small data it
#: is two epochs, never more than a few percent of a training schedule (the floor only keeps a tiny retain set
#: from getting a one-step repair).
AUTO_STEPS_MIN, AUTO_STEPS_MAX = 10, 200
#: ``check_every="auto"``: at most this many checks per budget, at least :data:`AUTO_CHECK_MIN` steps apart.
AUTO_CHECKS, AUTO_CHECK_MIN = 10, 5
#: Federated ``rounds="auto"`` under ``early_stopping``: the masked rounds stop once the clients' retain accuracy is
#: back; their cap is this share of the FedAvg schedule that trained the model (rounds x local epochs, or
#: :data:`CALIBRATE_EPOCHS_FALLBACK` when unknown), so even a repair that never recovers costs at most a quarter of
#: retraining's rounds. Without early stopping, or with nothing removed (no reset, a retain-only repair: nothing to
#: recover), ``"auto"`` is one round.
FEDERATED_ROUNDS_SHARE = 0.25


@dataclass
class UnlearnConfig:
    """How to forget: scoring, selection, objective and update budget.

    Args:
        method: channel scoring method: a registered name (``lightning_unlearn.scoring.SCORING_METHODS``) or a
            :class:`~lightning_unlearn.scoring.ChannelScorer` subclass.
        ratio: fraction of channels to update, in (0, 1]: per layer (``scope="layer"``) or overall.
        scope: ``"layer"`` (top ``ratio`` per layer) or ``"global"``.
        threshold: select channels whose per-layer normalised score is >= this, in [0, 1], instead of ``ratio``.
        contrast: score forget importance relative to retain importance.
        max_samples: score a seeded subsample of the forget set of at most this size (None: the method's default).
        layers: layer names to score and update (None: every Conv/Linear layer).
        include_head: let the classifier head's rows be selected by score like any layer.
        head_rows: head rows always updated; ``"auto"``: the forgotten classes' rows for class requests.
        objective: ``"random_label"``, ``"ascent"``, ``"retain"`` or ``"auto"`` (see :data:`AUTO`).
        forget_weight: weight of the forget term of the forget-aware objectives, >= 0.
        epochs: cap on passes over the retain data (None: no epoch cap centrally, one local epoch per client
            and round when federated).
        max_steps: hard cap on optimizer steps; ``"auto"``: :func:`auto_max_steps` of the retain data centrally,
            no cap per client and round when federated; None: no cap (``epochs`` must then be set).
        early_stopping: check forgetting and remaining accuracy on held-out data every ``check_every`` steps
            and stop once the forget data is forgotten and remaining accuracy has recovered (central engine;
            see :class:`~lightning_unlearn.repair.stopping.StoppingRule`).
        stop_tolerance: accuracy tolerance of the stopping rule, in [0, 1): recovered means within this of the
            original's remaining accuracy; forgotten means at most this above the target.
        patience: checks without a new best remaining accuracy (once forgotten) before stopping.
        check_every: optimizer steps between checks; ``"auto"``: a tenth of the step budget, at least 5.
        check_samples: held-out samples per check set (seeded subsample).
        lr_scale: multiplier of the user's learning rate for the selected channels.
        head_lr_scale: multiplier for the selected head rows (None: ``lr_scale``; ``"auto"``: see :data:`AUTO`).
        bn_stats: ``"frozen"`` (every BatchNorm in eval mode) or ``"selected"``.
        reset: before the repair, ``"dampen"`` the selected slices (x0.1) or ``"reinit"`` them from the model's
            own initialisation (their BatchNorm statistics re-estimated on retain data either way); ``"none"``
            fine-tunes them from their trained values; ``"auto"``: see :data:`AUTO` (centrally ``"none"``: under
            per-example attacks the dampening itself is what gives an unlearned model away; federated, too, except
            ``"dampen"`` for client requests; docs/benchmarks/population.md). A callable ``(model, mask,
            generator) -> changed elements`` is a custom reset.
        seed: seeds scoring subsamples, forget-term labels, the data order and the head calibration.
        calibrate: after the repair, ``"head"`` re-initialises the forgotten classes' head rows (the layer's own
            initialisation, seeded) and fits them on retain features computed once, with the module's optimizer
            for ``calibrate_epochs`` epochs of retain batches: how retraining pushes a never-seen class down.
            Class requests only; federated, clients send each forgotten class's summed forget head features and
            train the re-initialised rows in masked rounds; ``"none"``: no calibration; ``"auto"``: see :data:`AUTO`.
        calibrate_epochs: epochs of the head calibration; ``"auto"``: the original's training epochs when the
            caller knows them (the CLI reads them from ``--ckpt_path``; federated: FedAvg rounds x local epochs,
            one local epoch per calibration round), else :data:`CALIBRATE_EPOCHS_FALLBACK`.
    """

    method: str | Callable[..., Any] = "grad_x_act"
    ratio: float = 0.1
    scope: str = "layer"
    threshold: float | None = None
    contrast: bool = False
    max_samples: int | None = None
    layers: list[str] | None = None
    include_head: bool = False
    head_rows: list[int] | str | None = "auto"
    objective: str = "auto"
    forget_weight: float = 1.0
    epochs: int | None = None
    max_steps: int | str | None = "auto"
    early_stopping: bool = True
    stop_tolerance: float = 0.01
    patience: int = 5
    check_every: int | str = "auto"
    check_samples: int = 512
    lr_scale: float = 1.0
    head_lr_scale: float | str | None = "auto"
    bn_stats: str = "frozen"
    reset: str | Callable[..., int] = "auto"
    seed: int = 0
    calibrate: str = "auto"
    calibrate_epochs: int | str = "auto"

    def __post_init__(self) -> None:
        check_method(self.method)
        check_ratio(self.ratio)
        check_scope(self.scope)
        if self.threshold is not None:
            _check_number("threshold", self.threshold, low=0.0, high=1.0)
        _check_flag("contrast", self.contrast)
        _check_flag("include_head", self.include_head)
        _check_count("max_samples", self.max_samples, allow_none=True)
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers) or not self.layers:
                raise ValueError(f"layers must be a non-empty list of layer names or None, got {self.layers!r}")
            self.layers = list(self.layers)
        if self.head_rows is not None and self.head_rows != "auto":
            if isinstance(self.head_rows, str) or not all(_is_int(r) and r >= 0 for r in self.head_rows):
                raise ValueError(f"head_rows must be 'auto', None or a list of row indices >= 0, got {self.head_rows!r}")
            self.head_rows = sorted({int(r) for r in self.head_rows})
        _check_choice("objective", self.objective, ("auto", *OBJECTIVES))
        _check_number("forget_weight", self.forget_weight, low=0.0)
        _check_count("epochs", self.epochs, allow_none=True)
        if self.max_steps != "auto" and (self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1)):
            raise ValueError(f"max_steps must be an integer >= 1, 'auto' or None, got {self.max_steps!r}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("epochs and max_steps are both None: set a budget (max_steps='auto' is the default)")
        _check_flag("early_stopping", self.early_stopping)
        _check_number("stop_tolerance", self.stop_tolerance, low=0.0)
        if self.stop_tolerance >= 1:
            raise ValueError(f"stop_tolerance must be a finite number >= 0 and < 1, got {self.stop_tolerance!r}")
        _check_count("patience", self.patience)
        if self.check_every != "auto":
            _check_count("check_every", self.check_every)
        _check_count("check_samples", self.check_samples)
        _check_number("lr_scale", self.lr_scale, low=0.0, low_open=True)
        if self.head_lr_scale not in (None, "auto"):
            _check_number("head_lr_scale", self.head_lr_scale, low=0.0, low_open=True)
        check_bn_stats(self.bn_stats)
        check_reset(self.reset)
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _check_choice("calibrate", self.calibrate, ("auto", *CALIBRATIONS))
        if self.calibrate_epochs != "auto":
            _check_count("calibrate_epochs", self.calibrate_epochs)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def build(cls, config: "UnlearnConfig | Mapping[str, Any] | None" = None, **overrides: Any) -> "UnlearnConfig":
        """``config`` (an UnlearnConfig, a mapping of fields, or None for the defaults) with ``overrides`` applied.

        Unknown names fail with the list of fields: nothing is silently ignored.
        """
        if isinstance(config, UnlearnConfig):
            base = {f.name: getattr(config, f.name) for f in fields(config)}
        elif config is None:
            base = {}
        elif isinstance(config, Mapping):
            base = dict(config)
        else:
            raise TypeError(f"config must be an UnlearnConfig, a mapping or None, got {type(config).__name__}")
        merged = {**base, **overrides}
        unknown = sorted(set(merged) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown unlearning setting(s) {unknown}; allowed settings are {field_names()}")
        return cls(**merged)

    def resolved(self, request: RequestLike, engine: str = "central") -> "UnlearnConfig":
        """A copy with every ``"auto"`` replaced by its value for ``request`` on ``engine``."""
        _check_choice("engine", engine, ENGINES)
        auto = AUTO[engine]
        head_rows = self.head_rows
        if head_rows == "auto":
            head_rows = list(request.classes) or None
        kind = request.kind if request.kind in auto else "sample"  # central: client requests resolve as sample ones
        federated = engine == "federated"
        objective = auto[kind]["objective"] if self.objective == "auto" else self.objective
        calibrate = auto[kind]["calibrate"] if self.calibrate == "auto" else self.calibrate
        reset = auto[kind]["reset"] if isinstance(self.reset, str) and self.reset == "auto" else self.reset
        if federated:
            for name, value in (("objective", objective), ("calibrate", calibrate)):
                if value in CENTRAL_ONLY.get(name, ()):
                    raise ValueError(f"{name}={value!r} runs on the central engine only; allowed federated "
                                     f"{name}s are {[v for v in _choices(name) if v not in CENTRAL_ONLY[name]]}")
        if calibrate == "head" and not request.classes:
            raise ValueError(f"calibrate='head' needs a class request (it refits the forgotten classes' head rows), "
                             f"got a {request.kind} request; allowed for it: calibrate='none' or 'auto'")
        return replace(
            self,
            objective=objective,
            calibrate=calibrate,
            reset=reset,
            head_lr_scale=auto["head_lr_scale"] if self.head_lr_scale == "auto" else self.head_lr_scale,
            head_rows=head_rows,
            # a federated masked round is budgeted per client: one local epoch unless capped in steps
            epochs=1 if federated and self.epochs is None else self.epochs,
            max_steps=None if federated and self.max_steps == "auto" else self.max_steps,
        )

    def step_budget(self, retain_batches: int) -> int | None:
        """The central hard cap on optimizer steps for ``retain_batches`` batches per epoch (None: epochs decide)."""
        if self.max_steps == "auto":
            return auto_max_steps(retain_batches)
        return self.max_steps

    def check_interval(self, budget: int | None) -> int:
        """Optimizer steps between two stopping checks: at most :data:`AUTO_CHECKS` per budget (their cost scales
        with the budget, not a fixed share of a small one), at least :data:`AUTO_CHECK_MIN` steps apart."""
        if self.check_every != "auto":
            return int(self.check_every)
        return max(AUTO_CHECK_MIN, -(-(budget or AUTO_STEPS_MAX) // AUTO_CHECKS))

    def calibration_epochs(self, trained_epochs: int | None = None) -> int:
        """Epochs of the head calibration: ``calibrate_epochs``, or for ``"auto"`` the original's ``trained_epochs``
        when known, else :data:`CALIBRATE_EPOCHS_FALLBACK`."""
        if self.calibrate_epochs != "auto":
            return int(self.calibrate_epochs)
        return int(trained_epochs) if trained_epochs else CALIBRATE_EPOCHS_FALLBACK

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a scorer class or reset callable by its name), e.g. for a report."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["layers"] = None if self.layers is None else list(self.layers)
        out["head_rows"] = self.head_rows if not isinstance(self.head_rows, list) else list(self.head_rows)
        out["method"] = method_name(self.method)
        out["reset"] = self.reset if isinstance(self.reset, str) else getattr(self.reset, "__name__", repr(self.reset))
        return out


def auto_max_steps(retain_batches: int) -> int:
    """Two epochs of ``retain_batches``, clamped to [:data:`AUTO_STEPS_MIN`, :data:`AUTO_STEPS_MAX`]."""
    return int(min(max(2 * retain_batches, AUTO_STEPS_MIN), AUTO_STEPS_MAX))


def federated_round_cap(rounds: int | str, stopping: bool, trained_epochs: int | None = None) -> int:
    """The federated repair's masked rounds: ``rounds`` itself (under a ``stopping`` rule: the cap), or for ``"auto"``
    :data:`FEDERATED_ROUNDS_SHARE` of ``trained_epochs`` with the rule and one round without."""
    check_round_cap(rounds)
    if rounds != "auto":
        return int(rounds)
    if not stopping:
        return 1
    return max(1, math.ceil(FEDERATED_ROUNDS_SHARE * (trained_epochs or CALIBRATE_EPOCHS_FALLBACK)))


def check_round_cap(rounds: Any, name: str = "rounds") -> None:
    """``rounds`` of the federated repair: an integer >= 1 or ``"auto"``."""
    if rounds != "auto" and (not _is_int(rounds) or rounds < 1):
        raise ValueError(f"{name} must be an integer >= 1 or 'auto', got {rounds!r}")


def _choices(name: str) -> tuple[str, ...]:
    return {"objective": OBJECTIVES, "calibrate": CALIBRATIONS}[name]


def field_names() -> list[str]:
    """The settings' names, in declaration order."""
    return [f.name for f in fields(UnlearnConfig)]


# -- validators of the settings (the algorithms import them from here) ------------------------------
def method_name(method: Any) -> str:
    """The name of a scoring method given as a name, a scorer class or a scorer instance."""
    return method if isinstance(method, str) else str(getattr(method, "name", "") or type(method).__name__)


def check_method(method: Any) -> Any:
    """A registered method name, or a scorer class/instance (anything with ``score_batch``)."""
    if isinstance(method, str):
        if method not in SCORERS:
            raise ValueError(f"unknown scoring method {method!r}; allowed methods are {list(SCORERS)}")
        return method
    if callable(getattr(method, "score_batch", None)):
        return method
    raise ValueError(f"method must be a scoring method name or a ChannelScorer, got {method!r}; "
                     f"allowed methods are {list(SCORERS)}")


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return ratio


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed scopes are {list(SCOPES)}")
    return scope


def check_reset(reset: Any) -> Any:
    """A reset name or a callable ``(model, mask, generator) -> changed``."""
    if callable(reset):
        return reset
    _check_choice("reset", reset, ("auto", *RESETS))
    return reset


def check_bn_stats(bn_stats: str) -> str:
    _check_choice("bn_stats", bn_stats, BN_MODES)
    return bn_stats


# -- validation helpers: one line naming the value and what is allowed ----------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed values are {list(allowed)}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_count(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")


def _check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        where = " and ".join(p for p in (lo, hi) if p)
        raise ValueError(f"{name} must be a finite number{' ' + where if where else ''}, got {value!r}")
