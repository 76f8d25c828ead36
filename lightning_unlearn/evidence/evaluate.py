"""One call per question: evaluate a model, compare unlearned with original and retrained, write the report."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from lightning_unlearn._io import RunMarker
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.evidence.attacks import TOW_KEYS, tug_of_war
from lightning_unlearn.evidence.backdoor import attack_success_rate
from lightning_unlearn.evidence.gap import ACC_GAP_KEYS, avg_gap, check_forget_size, check_same_classes, relearn_time
from lightning_unlearn.evidence.membership import loss_attack_auc, mia_efficacy, sample_outputs, subsample
from lightning_unlearn.evidence.plots import plot_channel_scores, plot_mia_histograms, plot_per_class_accuracy
from lightning_unlearn.evidence.probe import probe_accuracy
from lightning_unlearn._io import unique_path
from lightning_unlearn.evidence.report import UnlearningReport, save_weights, weights_sha256
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.request import ForgetRequest, random_samples_request  # noqa: F401 - re-exported


@dataclass(frozen=True)
class BackdoorSpec:
    """How the poisoned samples were triggered, so the attack success rate can be measured."""

    target_class: int
    size: int = 2
    value: float = 1.0


def _heldout_for(dm: UnlearningDataModule) -> Dataset:
    """Non-members for the loss attack: same-class test samples for class requests (class is no confounder)."""
    if dm.request.kind == "class":
        return Subset(dm.test_dataset, dm.forget_test_indices.tolist())
    return dm.test_dataset


def _remaining_test(dm: UnlearningDataModule) -> Dataset:
    return Subset(dm.test_dataset, dm.remaining_test_indices.tolist())


def evaluate_model(
    model: nn.Module,
    dm: UnlearningDataModule,
    seed: int = 0,
    max_samples: int = 2000,
    probe: bool = True,
    backdoor: BackdoorSpec | None = None,
) -> dict[str, Any]:
    """Every per-model metric for ``dm.request``: accuracy splits (+ per class), MIA, loss-attack AUC, probe, ASR."""
    check_forget_size(len(dm.forget_indices), len(dm.train_targets))
    out: dict[str, Any] = split_accuracies(model, dm, max_train_samples=max_samples, per_class=True)
    mia = mia_efficacy(model, dm.retain_set, _remaining_test(dm), dm.forget_set, max_samples, seed)
    out.update(mia_efficacy=mia.efficacy, mia_shadow_acc=mia.shadow_acc, mia_informative=mia.informative)
    out["loss_auc"] = loss_attack_auc(model, dm.forget_set, _heldout_for(dm), max_samples, seed)
    if probe and dm.request.kind == "class":
        result = probe_accuracy(model, dm.test_dataset, dm.request.classes, max_samples, seed)
        out.update(probe_forget_acc=result.forget_acc, probe_acc=result.overall_acc)
    if backdoor is not None:
        out["backdoor_asr"] = attack_success_rate(model, dm.test_dataset, backdoor.target_class, backdoor.size, backdoor.value)
    return out


def evaluate_unlearning(
    original: nn.Module,
    unlearned: nn.Module,
    dm: UnlearningDataModule,
    retrained: nn.Module | None = None,
    seed: int = 0,
    max_samples: int = 2000,
    probe: bool = True,
    relearn: bool = True,
    relearn_max_steps: int = 200,
    relearn_tolerance: float = 0.02,
    backdoor: BackdoorSpec | None = None,
    models: Mapping[str, nn.Module] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics of original, unlearned (and retrained, plus any extra ``models``), and their comparison.

    ``comparison`` holds ``avg_gap`` (SalUn's, to the retrained model, in points), ``acc_gap``
    (the same without MIA-efficacy, for when ``mia_informative`` is False) and relearn steps:
    how many fine-tuning steps each model needs to get forget accuracy back to within
    ``relearn_tolerance`` of the original's (None: not within ``relearn_max_steps``).
    """
    example = dm.train_dataset[0][0][None]
    check_same_classes(original, unlearned, example, "unlearned")
    if retrained is not None:
        check_same_classes(original, retrained, example, "retrained")
    named = {"original": original, "unlearned": unlearned, **({"retrained": retrained} if retrained is not None else {})}
    named.update(models or {})
    kw = dict(seed=seed, max_samples=max_samples, probe=probe, backdoor=backdoor)
    out: dict[str, dict[str, Any]] = {name: evaluate_model(m, dm, **kw) for name, m in named.items()}
    comparison: dict[str, Any] = {}
    if retrained is not None:
        comparison["avg_gap"] = avg_gap(out["unlearned"], out["retrained"])
        comparison["acc_gap"] = avg_gap(out["unlearned"], out["retrained"], ACC_GAP_KEYS)
        comparison["mia_informative"] = bool(out["unlearned"]["mia_informative"] and out["retrained"]["mia_informative"])
        if all(out[m].get(k) is not None for m in ("unlearned", "retrained") for k in TOW_KEYS):
            comparison["tow"] = tug_of_war(out["unlearned"], out["retrained"])
    if relearn:
        target = out["original"]["forget_acc"] - relearn_tolerance
        for name in ("unlearned", "retrained"):
            if name in named:
                comparison[f"relearn_steps_{name}"] = relearn_steps(
                    named[name], dm, target, max_samples=max_samples, max_steps=relearn_max_steps, seed=seed
                )
        comparison["relearn_target_acc"] = target
    out["comparison"] = comparison
    return out


def relearn_steps(
    model: nn.Module,
    dm: UnlearningDataModule,
    target_acc: float,
    max_samples: int | None = None,
    max_steps: int = 200,
    eval_every: int = 5,
    seed: int = 0,
) -> int | None:
    """:func:`relearn_time` on ``dm``'s request: fine-tune on (a seeded subsample of ``max_samples``) forget
    samples mixed with retain samples until the forgotten data's accuracy reaches ``target_acc``; for class
    requests that accuracy is measured on the forgotten classes' test samples, otherwise on the forget set."""
    eval_set = Subset(dm.test_dataset, dm.forget_test_indices.tolist()) if dm.request.kind == "class" else None
    forget = subsample(dm.forget_set, max_samples, seed) if max_samples is not None else dm.forget_set
    return relearn_time(model, forget, dm.retain_set, target_acc, eval_set, dm.num_classes, max_steps=max_steps,
                        eval_every=eval_every, seed=seed)


def write_report(
    out_dir: str | os.PathLike,
    original: nn.Module,
    result: Any,
    dm: UnlearningDataModule,
    method: str,
    params: Mapping[str, Any],
    seed: int,
    retrained: nn.Module | None = None,
    evaluation: Mapping[str, Any] | None = None,
    bytes_moved: Mapping[str, int] | None = None,
    plots: bool = True,
    on_exists: str = "suffix",
    marker: RunMarker | None = None,
    **evaluate_kwargs: Any,
) -> tuple[UnlearningReport, Path]:
    """Save the unlearned weights, the mask, the plots and the JSON report side by side in ``out_dir``.

    ``result`` is an :class:`~lightning_unlearn.UnlearningResult` (``.model``, ``.mask``,
    ``.timings_s``, ``.scores``). Nothing existing is overwritten: names get a ``-N`` suffix
    (or FileExistsError with ``on_exists="error"``). Every name is chosen, and recorded in
    ``marker`` (a :class:`~lightning_unlearn._io.RunMarker`), before the first file is written.
    Returns the report and its path.
    """
    out_dir = Path(out_dir)
    if evaluation is None:
        evaluation = evaluate_unlearning(original, result.model, dm, retrained, seed, **evaluate_kwargs)
    ckpt = unique_path(out_dir / f"{method}.pt", on_exists)
    stem = ckpt.name[: -len(".pt")]
    mask = getattr(result, "mask", None)
    scores = getattr(result, "scores", None)
    names = {"mask": mask is not None, "per_class": plots, "channel_scores": plots and bool(scores), "mia": plots}
    suffix = {"mask": "mask.pt", "per_class": "per_class.png", "channel_scores": "channel_scores.png", "mia": "mia.png"}
    paths = {k: unique_path(out_dir / f"{stem}.{suffix[k]}", on_exists) for k, wanted in names.items() if wanted}
    report_path = unique_path(out_dir / f"{stem}.report.json", on_exists)
    for path in (ckpt, *paths.values(), report_path):
        if marker is not None:
            marker.add(path)
    save_weights(result.model, ckpt, on_exists)
    mask_file = mask.save(paths["mask"]) if mask is not None else None
    written = [str(p) for p in _plots(paths, original, result, dm, retrained, evaluation, seed, on_exists)]
    report = UnlearningReport(
        request=dm.request.to_dict(),
        method=method,
        params=dict(params),
        seed=seed,
        original_sha256=weights_sha256(original),
        unlearned_sha256=weights_sha256(ckpt),
        retrained_sha256=weights_sha256(retrained) if retrained is not None else None,
        metrics={k: v for k, v in evaluation.items() if k != "comparison"},
        comparison=dict(evaluation.get("comparison", {})),
        timings_s=dict(getattr(result, "timings_s", {}) or {}),
        mask=UnlearningReport.mask_summary(mask),
        mask_file=str(mask_file) if mask_file else None,
        checkpoint=str(ckpt),
        bytes_moved=dict(bytes_moved) if bytes_moved else None,
        plots=written,
    )
    return report, report.save(report_path, on_exists)


def _plots(paths, original, result, dm, retrained, evaluation, seed, on_exists) -> list[Path]:
    out = []
    if "per_class" in paths:
        per_class = {k: v["per_class_test_acc"] for k, v in evaluation.items() if k != "comparison"}
        out.append(plot_per_class_accuracy(per_class, paths["per_class"], dm.request.classes, on_exists))
    if "channel_scores" in paths:
        out.append(plot_channel_scores(result.scores, paths["channel_scores"], getattr(result, "mask", None), on_exists))
    if "mia" in paths:
        groups = {
            "members (retain)": subsample(dm.retain_set, 1000, seed),
            "non-members (test)": subsample(_remaining_test(dm), 1000, seed + 1),
            "forget": subsample(dm.forget_set, 1000, seed + 2),
        }
        models = {"original": original, "unlearned": result.model,
                  **({"retrained": retrained} if retrained is not None else {})}
        confidences = {
            name: {g: sample_outputs(m, ds).confidence for g, ds in groups.items()} for name, m in models.items()
        }
        out.append(plot_mia_histograms(confidences, paths["mia"], on_exists))
    return out
