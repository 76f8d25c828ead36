"""Population harness: can an auditor with K reference models tell an unlearned model from retraining?

Per cell (dataset x architecture x request): K originals trained to memorise their training set with
the architecture's own optimizer schedule, K models retrained on the retain data with the same schedule,
K with half and K with double that schedule (the "schedule band"), and each method applied to each
original (a :class:`Task` per member; see ``population_task.py``). Every population is cached by content
hash (``lightning_unlearn.evidence.references``), so a rerun only evaluates. Per method: forget /
remaining / test accuracy, mean logit-scaled confidence on the forget data, U-LiRA raw and
class-calibrated (each forget sample's statistic minus the same model's mean statistic on held-out test
samples of its class), the NeurIPS'23 challenge score, relearn steps, and the wall-time ratio to
retraining with the original's schedule (both timed in this run).

U-LiRA is leave-one-out on both sides (``attacks.ulira_scores``): the held-out unlearned and retrained
model are scored by Gaussians fitted without either, so two halves of one population score 0.5 in
expectation (the "retrained (halves)" row measures it: mean over random half splits).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population.py --datasets digits --archs SmallCNN
    .venv/bin/python benchmarks/population.py --plugin benchmarks/peers/supreme_methods.py --methods scrub
    .venv/bin/python benchmarks/population.py --render      # docs/benchmarks/population.md from the JSONs
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES  # noqa: E402
from evidence import load  # noqa: E402  (digits, or the seeded MNIST subset the evidence benchmark uses)
from population_methods import CANDIDATES  # noqa: E402
from population_task import Method, Task, load_plugin, method_fingerprint  # noqa: E402

from lightning_unlearn import ForgetRequest  # noqa: E402
from lightning_unlearn.data import UnlearningDataModule  # noqa: E402
from lightning_unlearn._io import write_json  # noqa: E402
from lightning_unlearn._training import quiet_lightning, reinitialize  # noqa: E402
from lightning_unlearn.evidence import relearn_time  # noqa: E402
from lightning_unlearn.evidence.attacks import challenge_score, logit_confidence, roc_result, ulira_scores  # noqa: E402
from lightning_unlearn.evidence.references import derived_seed, train_originals, train_references, unlearned_population  # noqa: E402
from lightning_unlearn.models import SmallCNN  # noqa: E402

__all__ = ["Task", "Method", "METHODS", "load_plugin"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: Selectable methods: the library default and the candidates of population_methods.py; --plugin adds PEERS.
METHODS: dict[str, Method] = dict(CANDIDATES)


# -- cells ----------------------------------------------------------------------------------
class SmallCNNGroupNorm(SmallCNN):
    """The library's SmallCNN with GroupNorm (4 groups) instead of BatchNorm: a normaliser without running statistics."""

    def norm_layer(self, num_channels: int) -> nn.Module:
        return nn.GroupNorm(4, num_channels)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    **ARCHITECTURES,
    "SmallCNN-GN": lambda num_classes=10, image_size=8, epochs=20: SmallCNNGroupNorm(num_classes=num_classes),
}


@dataclass(frozen=True)
class DataSpec:
    epochs: int  # the originals' schedule (memorising)
    batch_size: int
    image_size: int


DATASETS = {"digits": DataSpec(epochs=30, batch_size=64, image_size=8),
            "mnist": DataSpec(epochs=12, batch_size=64, image_size=28)}
REQUESTS = ("class3", "samples100")


def make_request(name: str, n_train: int) -> ForgetRequest:
    if name == "class3":
        return ForgetRequest(classes=[3])
    rng = np.random.default_rng(0)
    return ForgetRequest(sample_ids=sorted(rng.choice(n_train, size=100, replace=False).tolist()))


def recipe_of(template: nn.Module, spec: DataSpec, arch: str, n_train: int, epochs: int) -> dict[str, Any]:
    """The original's training as a method sees it: optimizer class and settings from ``configure_optimizers``."""
    conf = copy.deepcopy(template).configure_optimizers()
    opt = conf[0][0] if isinstance(conf, tuple) else conf
    group = opt.param_groups[0]
    return {"architecture": arch, "epochs": epochs, "batch_size": spec.batch_size,
            "optimizer": type(opt).__name__, "lr": float(group["lr"]), "weight_decay": float(group.get("weight_decay", 0.0)),
            "steps_per_epoch": -(-n_train // spec.batch_size), "scheduler": isinstance(conf, tuple)}


# -- statistics -----------------------------------------------------------------------------
def calibrate(phi_forget: np.ndarray, forget_labels: np.ndarray, phi_heldout: np.ndarray,
              heldout_labels: np.ndarray) -> np.ndarray:
    """Class-calibrated statistics: each forget sample's phi minus the same model's mean phi on held-out samples
    of its class. Shapes (models, N_forget), (models, N_heldout) -> (models, N_forget)."""
    out = np.empty_like(phi_forget)
    for c in np.unique(forget_labels):
        held = heldout_labels == c
        if not held.any():
            raise ValueError(f"no held-out samples of class {int(c)} to calibrate against")
        out[:, forget_labels == c] = phi_forget[:, forget_labels == c] - phi_heldout[:, held].mean(1, keepdims=True)
    return out


def ulira_auc(unlearned: np.ndarray, retrained: np.ndarray) -> float:
    """U-LiRA AUC with leave-one-out on both sides (library ``ulira_scores``): 0.5 = indistinguishable."""
    pos, neg = ulira_scores(unlearned, retrained)
    return roc_result(pos.ravel(), neg.ravel()).auc


def split_aucs(first: np.ndarray, second: np.ndarray, splits: int = 10, seed: int = 0) -> list[float]:
    """U-LiRA AUC of ``first``'s members in one random half against ``second``'s in the other, for ``splits`` draws
    of member-disjoint halves (member i of both populations shares its data and seeds)."""
    rng, k = np.random.default_rng(seed), len(first) // 2
    aucs = []
    for _ in range(splits):
        order = rng.permutation(len(first))
        aucs.append(ulira_auc(first[order[:k]], second[order[k:2 * k]]))
    return aucs


def halves_auc(population: np.ndarray, splits: int = 10, seed: int = 0) -> float:
    """Mean U-LiRA AUC of random half/half splits of ONE population (expected 0.5: the attack's calibration)."""
    return float(np.mean(split_aucs(population, population, splits, seed)))


@dataclass
class PopStats:
    """Everything the tables need from one population of models."""

    phi_forget: np.ndarray  # (K, N_forget)
    phi_test: np.ndarray  # (K, N_test)
    forget_correct: np.ndarray
    test_correct: np.ndarray
    retain_acc: np.ndarray  # (K,)


def population_stats(models: list[nn.Module], dm: UnlearningDataModule, retain_eval: Subset) -> PopStats:
    pf, pt, fc, tc, ra = [], [], [], [], []
    for m in models:
        m.eval()
        a, b = logit_confidence(m, dm.forget_set)
        c, d = logit_confidence(m, dm.test_dataset)
        pf.append(a), fc.append(b), pt.append(c), tc.append(d)
        ra.append(logit_confidence(m, retain_eval)[1].mean())
    return PopStats(np.stack(pf), np.stack(pt), np.stack(fc), np.stack(tc), np.asarray(ra))


def accuracies(s: PopStats, dm: UnlearningDataModule) -> dict[str, float]:
    """Population means: forget (class: forgotten-class test acc; samples: forget-set acc), remaining, test."""
    test_y = dm.test_targets.numpy()
    if dm.request.kind == "class":
        in_forget = np.isin(test_y, dm.request.classes)
        forget, remaining = s.test_correct[:, in_forget].mean(), s.test_correct[:, ~in_forget].mean()
    else:
        forget, remaining = s.forget_correct.mean(), s.retain_acc.mean()
    return {"forget_acc": float(forget), "remaining_acc": float(remaining), "test_acc": float(s.test_correct.mean()),
            "forget_train_acc": float(s.forget_correct.mean()), "retain_acc": float(s.retain_acc.mean())}


# -- training and timing ----------------------------------------------------------------------
def train_plain(model: nn.Module, dataset, epochs: int, batch_size: int, seed: int) -> nn.Module:
    """Retraining as a plain loop with the model's own ``configure_optimizers`` (no Trainer overhead): the cost
    unlearning is compared with. Per-epoch schedulers step once per epoch, as the architectures declare."""
    model = reinitialize(model, seed).train()
    conf = model.configure_optimizers()
    opt, sched = (conf[0][0], conf[1][0]["scheduler"]) if isinstance(conf, tuple) else (conf, None)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y.long()).backward()
            opt.step()
        if sched is not None:
            sched.step()
    return model.eval()


def make_task(original: nn.Module, train, test, request, spec: DataSpec, recipe: dict, seed: int) -> Task:
    dm = UnlearningDataModule(train, test, request, batch_size=spec.batch_size, seed=seed, num_classes=10)
    return Task(original=original, datamodule=dm, recipe=dict(recipe), num_classes=10, seed=seed)


# -- one cell -------------------------------------------------------------------------------
def run_cell(dataset: str, arch: str, req_name: str, args) -> dict[str, Any]:
    spec = DATASETS[dataset]
    epochs = args.epochs or spec.epochs
    train, test = load(dataset, args)
    request = make_request(req_name, len(train))
    dm = UnlearningDataModule(train, test, request, batch_size=spec.batch_size, seed=0, num_classes=10)
    build = lambda e: ARCHS[arch](num_classes=10, image_size=spec.image_size, epochs=e)  # noqa: E731
    template, k = build(epochs), args.k
    recipe = recipe_of(template, spec, arch, len(train), epochs)
    cache = dict(cache_dir=args.cache_dir, progress=False)
    log = lambda msg: print(f"[{dataset} {arch} {req_name}] {msg}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    originals = train_originals(template, dm, k, epochs, **cache)
    retrained = train_references(template, dm, k, epochs, seed=0, **cache)
    half_e, double_e = max(1, epochs // 2), 2 * epochs
    half = train_references(build(half_e), dm, k, half_e, seed=1, **cache)
    double = train_references(build(double_e), dm, k, double_e, seed=2, **cache)
    log(f"reference populations ready in {time.perf_counter() - t0:.0f}s")
    rng = np.random.default_rng(0)
    retain_eval = Subset(train, np.sort(rng.choice(dm.retain_indices, min(500, len(dm.retain_indices)), replace=False)).tolist())
    forget_y = dm.train_targets.numpy()[dm.forget_indices]
    test_y = dm.test_targets.numpy()
    eval_set = Subset(test, dm.forget_test_indices.tolist()) if request.kind == "class" else dm.forget_set

    # retraining's cost, timed in this run (plain loop, the original's schedule); CPU seconds of this
    # single-threaded process are the ratio's basis (wall time on a machine shared by other jobs is noise)
    t0, c0 = time.perf_counter(), time.process_time()
    train_plain(copy.deepcopy(template), dm.retain_set, epochs, spec.batch_size, seed=12345)
    retrain_wall, retrain_s = time.perf_counter() - t0, time.process_time() - c0
    log(f"retraining (plain loop, {epochs} epochs) {retrain_s:.2f} CPU s ({retrain_wall:.2f} s wall)")

    r_stats = population_stats(retrained.models, dm, retain_eval)
    r_acc = accuracies(r_stats, dm)
    r_cal = calibrate(r_stats.phi_forget, forget_y, r_stats.phi_test, test_y)
    orig_forget_acc = accuracies(population_stats(originals.models[:1], dm, retain_eval), dm)["forget_acc"]
    target = orig_forget_acc - 0.02

    def row(name: str, models: list[nn.Module], seconds: float | None, kind: str, wall: float | None = None) -> dict[str, Any]:
        s = population_stats(models, dm, retain_eval)
        acc = accuracies(s, dm)
        cal = calibrate(s.phi_forget, forget_y, s.phi_test, test_y)
        ch = challenge_score(s.phi_forget, r_stats.phi_forget, acc["retain_acc"], r_acc["retain_acc"],
                             acc["test_acc"], r_acc["test_acc"])
        steps = []
        for m in models[: args.relearn_models]:
            st = relearn_time(m, dm.forget_set, dm.retain_set, target, eval_set, 10, max_steps=args.relearn_steps,
                              eval_every=5, seed=0)
            steps.append(st if st is not None else args.relearn_steps + 5)
        out = {"method": name, "kind": kind, **acc,
               "confidence": float(s.phi_forget.mean()), "confidence_std_models": float(s.phi_forget.mean(1).std()),
               "confidence_quantiles": np.quantile(s.phi_forget, [0.1, 0.5, 0.9]).tolist(),
               "ulira_raw": ulira_auc(s.phi_forget, r_stats.phi_forget), "ulira_cal": ulira_auc(cal, r_cal),
               "forget_score": ch["forget_score"], "final_score": ch["final_score"],
               "relearn_steps": float(np.mean(steps)), "relearn_each": steps,
               "seconds": seconds, "wall_seconds": wall, "speedup": (retrain_s / seconds) if seconds else None}
        log(f"{name}: forget {acc['forget_acc']:.3f} rem {acc['remaining_acc']:.3f} test {acc['test_acc']:.3f} "
            f"conf {out['confidence']:+.1f} U-LiRA {out['ulira_raw']:.3f}/{out['ulira_cal']:.3f} "
            f"relearn {out['relearn_steps']:.0f} x{out['speedup'] or 0:.1f}")
        return out

    rows = [row("original", originals.models, None, "reference")]
    halves = {"method": "retrained (two halves)", "kind": "reference", **r_acc,
              "confidence": float(r_stats.phi_forget.mean()), "confidence_std_models": float(r_stats.phi_forget.mean(1).std()),
              "confidence_quantiles": np.quantile(r_stats.phi_forget, [0.1, 0.5, 0.9]).tolist(),
              "ulira_raw": halves_auc(r_stats.phi_forget), "ulira_cal": halves_auc(r_cal),
              "forget_score": None, "final_score": None, "seconds": retrain_s, "speedup": 1.0}
    steps = [relearn_time(m, dm.forget_set, dm.retain_set, target, eval_set, 10, max_steps=args.relearn_steps,
                          eval_every=5, seed=0) for m in retrained.models[: args.relearn_models]]
    halves["relearn_each"] = [s if s is not None else args.relearn_steps + 5 for s in steps]
    halves["relearn_steps"] = float(np.mean(halves["relearn_each"]))
    rows.append(halves)
    log(f"retrained halves: U-LiRA {halves['ulira_raw']:.3f}/{halves['ulira_cal']:.3f} conf {halves['confidence']:+.1f}")
    rows.append(row(f"retrain, half schedule ({half_e} ep)", half.models, retrain_s / 2, "reference"))
    rows.append(row(f"retrain, double schedule ({double_e} ep)", double.models, retrain_s * 2, "reference"))
    for name in args.methods:
        method = METHODS[name]
        settings = {"fingerprint": method_fingerprint(method), "recipe": recipe}

        def fn(model, _dm, seed, method=method):
            return method(make_task(model, train, test, request, spec, recipe, seed))

        pop = unlearned_population(template, dm, fn, name, settings, k, epochs, **cache)
        # the method's cost, timed in this run on member 0 (a fresh copy)
        work = make_task(copy.deepcopy(originals.models[0]), train, test, request, spec, recipe, derived_seed("unlearned", 0, 0))
        t0, c0 = time.perf_counter(), time.process_time()
        with quiet_lightning():
            method(work)
        wall, seconds = time.perf_counter() - t0, time.process_time() - c0
        rows.append(row(name, pop.models, seconds, "method", wall))
    return {"dataset": dataset, "architecture": arch, "request": req_name, "k": k, "epochs": epochs,
            "batch_size": spec.batch_size, "recipe": recipe, "num_train": len(train), "num_test": len(test),
            "num_forget": int(len(dm.forget_indices)), "retrain_s": retrain_s, "retrain_wall_s": retrain_wall, "relearn_target": target,
            "original_train_acc": float(np.mean([logit_confidence(m, retain_eval)[1].mean() for m in originals.models])),
            "rows": rows}


# -- the page -------------------------------------------------------------------------------
COLUMNS = (("forget_acc", "forget acc", "pct"), ("remaining_acc", "remaining acc", "pct"), ("test_acc", "test acc", "pct"),
           ("confidence", "mean conf (phi)", "f1"), ("ulira_raw", "U-LiRA raw", "f3"), ("ulira_cal", "U-LiRA cal", "f3"),
           ("forget_score", "challenge F", "f3"), ("relearn_steps", "relearn", "f0"), ("speedup", "x faster", "f1"))


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{100 * v:.1f}" if kind == "pct" else f"{v:.{kind[1]}f}"


INTRO = (
    "Per cell K originals (memorising: the architecture's own optimizer and schedule), K retrained on the retain data "
    "(same schedule), K with half / double the schedule, and each method run on each original. **U-LiRA**: "
    "leave-one-out on both sides, positives = held-out method models, negatives = held-out retrained models, "
    "per forget sample (0.5 = indistinguishable); *raw* on phi = logit_y - logsumexp(others), *cal* on phi "
    "minus the same model's mean phi on held-out test samples of the sample's class. The 'retrained (two "
    "halves)' row is the attack's own calibration (mean over 10 half splits of the retrained population, "
    "4 vs 4). **mean conf**: mean phi on the forget data. **challenge F**: NeurIPS'23 forget score against "
    "the retrained population. **relearn**: mean Adam steps to get forget accuracy back within 2 points of "
    "the original's (first models of the population; 105 = not within 100). **x faster**: retraining "
    "(plain loop, original's schedule) / the method's call, both timed in the same run on one member, in CPU "
    "seconds of the single-threaded process (wall time on this shared 2-core machine is dominated by other "
    "jobs; the JSON keeps both). Accuracies are population means (class: forget = forgotten class "
    "on test; samples: forget = forget-set accuracy, remaining = retain-train accuracy).")


def library_note(res: dict[str, Any]) -> str:
    """Which library commit the cell's last run used (recorded since the harness records it; older cells say nothing)."""
    lib = res.get("library") or {}
    if not lib.get("git_commit"):
        return ""
    edits = f" with uncommitted edits to {len(lib['uncommitted'])} library file(s)" if lib.get("uncommitted") else ""
    return f", library at commit {lib['git_commit'][:7]}{edits}"


def cell_sections(results: list[dict[str, Any]]) -> list[str]:
    """One section per cell: its settings, the command that measured it, and its table (reference rows in italics)."""
    out = []
    for res in results:
        out += [f"## {res['dataset']} / {res['architecture']} / {res['request']}", "",
                f"K = {res['k']}, {res['epochs']} epochs, batch {res['batch_size']}, {res['recipe']['optimizer']} "
                f"lr {res['recipe']['lr']:g} wd {res['recipe']['weight_decay']:g}{' + cosine' if res['recipe']['scheduler'] else ''}; "
                f"{res['num_train']} train / {res['num_test']} test, {res['num_forget']} forget samples; originals' "
                f"retain-train accuracy {100 * res['original_train_acc']:.1f}%; retraining {res['retrain_s']:.1f} CPU s. "
                f"Command: `{res.get('command', '?')}` on {res.get('machine', '?')}{library_note(res)}.", "",
                "| method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for r in res["rows"]:
            name = r["method"] if r["kind"] == "method" else f"*{r['method']}*"
            out.append(f"| {name} | " + " | ".join(_fmt(r.get(k), kind) for k, _, kind in COLUMNS) + " |")
        out.append("")
    return out


def cell_results(results_dir: Path = RESULTS) -> list[dict[str, Any]]:
    """The committed cells of this harness, in page order (runs with --out-suffix have pages of their own)."""
    cells = [results_dir / result_path(d, a, r).name for d in DATASETS for a in ARCHS for r in REQUESTS]
    return [json.loads(f.read_text()) for f in cells if f.exists()]


def render_page(results: Path = RESULTS) -> str:
    """docs/benchmarks/population.md: the library default against retraining per cell, the cells not run (with their
    measured cost), the peers against the default, the evidence-against-share curve, then every cell's full table."""
    import pagekit
    import population_cost
    import population_curve

    cells = cell_results(results)
    sources = [result_path(c["dataset"], c["architecture"], c["request"]).name for c in cells]
    sources += [peers_file(results, c).name for c in cells if peers_file(results, c).exists()]
    lines = pagekit.header(
        "Population evidence: can an auditor tell unlearning from retraining?", "population.py", sources,
        ["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population.py --datasets DATASET --archs ARCH --requests "
         "REQUEST --methods METHOD ... (each cell below names its exact command)"],
        [c.get("machine") or pagekit.UNKNOWN_MACHINE for c in cells],
        "Can an auditor with K reference models tell an unlearned model from retraining? Per cell (dataset x "
        f"architecture x request) K = {' or '.join(sorted({str(c['k']) for c in cells}))} originals, retrained, "
        "half- and double-schedule retrained and unlearned models; the columns are defined above the full tables "
        "at the end of the page.")
    lines += ["## The library default against retraining", "",
              "Per cell, the default's U-LiRA AUC next to the attack's own floor (two halves of the retrained "
              "population) and the schedule band (honest retraining with half and with double the original's "
              "schedule, scored against the retrained population): a method is as good as retraining on this "
              "evidence when it sits at or below the band.", ""]
    lines += pagekit.table(
        ["cell", "default raw", "default cal", "retrained halves raw / cal", "schedule band raw", "schedule band cal",
         "original raw / cal", "default x faster"],
        [[f"{c['dataset']} / {c['architecture']} / {c['request']}", _fmt(d.get("ulira_raw"), "f3"),
          _fmt(d.get("ulira_cal"), "f3"),
          f"{_fmt(h.get('ulira_raw'), 'f3')} / {_fmt(h.get('ulira_cal'), 'f3')}",
          " - ".join(_fmt(v, "f3") for v in sorted(b["ulira_raw"] for b in band)),
          " - ".join(_fmt(v, "f3") for v in sorted(b["ulira_cal"] for b in band)),
          f"{_fmt(o.get('ulira_raw'), 'f3')} / {_fmt(o.get('ulira_cal'), 'f3')}", _fmt(d.get("speedup"), "f1")]
         for c in cells
         for d, h, o, band in [(population_curve.row(c, "default"), population_curve.row(c, population_curve.HALVES),
                                population_curve.row(c, "original"), population_curve.band(c))]])
    lines += [""] + population_cost.section(results, {(c["dataset"], c["architecture"]) for c in cells})
    lines += peer_section(results, cells)
    lines += population_curve.section(cells) + ["## Every cell, every method", "", INTRO, ""] + cell_sections(cells)
    return pagekit.finish(lines)


def peers_file(results: Path, cell: dict[str, Any]) -> Path:
    """The peers' results of a cell (written by benchmarks/peers/run_population.py)."""
    return results / f"peers_{cell['dataset']}_{cell['architecture']}_{cell['request']}.json"


def peer_section(results: Path, cells: list[dict[str, Any]]) -> list[str]:
    """Per cell with peers' results (``peers_<cell>.json``, benchmarks/peers/): each peer's AUC and speed next to the
    default's, and whether it has both a lower AUC and a lower cost (a higher speed-up over retraining, each
    measured against retraining in its own run)."""
    rows = []
    for c in cells:
        path = peers_file(results, c)
        default = next((r for r in c["rows"] if r["method"] == "default"), None)
        if not path.exists() or default is None:
            continue
        for r in json.loads(path.read_text())["rows"]:
            if r["kind"] != "method":
                continue
            faster = (r.get("speedup") or 0) > (default.get("speedup") or 0)
            beats = [m for m in ("raw", "cal") if faster and r[f"ulira_{m}"] < default[f"ulira_{m}"]]
            rows.append([f"{c['dataset']} / {c['architecture']} / {c['request']}", r["method"],
                         _fmt(r["forget_acc"], "pct"), _fmt(r["ulira_raw"], "f3"), _fmt(r["ulira_cal"], "f3"),
                         _fmt(r.get("speedup"), "f1"), f"{_fmt(default['ulira_raw'], 'f3')} / "
                         f"{_fmt(default['ulira_cal'], 'f3')} / {_fmt(default.get('speedup'), 'f1')}",
                         " and ".join(beats) if beats else "no"])
    if not rows:
        return []
    import pagekit

    return ["## Peers against the default", "",
            "The peers of the [peers page](peers.md) (SUPREME's own code at its own defaults, same cached populations) "
            "next to the library default of the same cell. *Lower AUC and cost* names the U-LiRA view (raw, cal) on "
            "which the peer has a lower AUC than the default while being faster relative to retraining (each speed-up "
            "is retraining's CPU time over the method's, both timed in the run that produced the row; the peers "
            "ran in their own process).", ""] + pagekit.table(
        ["cell", "peer", "forget acc", "U-LiRA raw", "U-LiRA cal", "x faster", "default raw / cal / x faster",
         "lower AUC and cost"], rows) + [""]


def render_assets(results: Path, out: Path) -> list[Path]:
    """The page's figure: docs/benchmarks/population_fraction_curve.png."""
    import population_curve

    return [population_curve.plot(cell_results(results), out / population_curve.FIGURE)]


def library_state() -> dict[str, Any]:
    """The library code this run uses: its git commit, whether lightning_unlearn/ has uncommitted edits, and the
    SHA-256 of its sources as read at import (the default's cache key follows them: ``population_methods``)."""
    import hashlib
    import subprocess

    from population_methods import default

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD") or None,
            "uncommitted": git("status", "--porcelain", "--", "lightning_unlearn").splitlines(),
            "sources_sha256": hashlib.sha256(default.fingerprint.encode()).hexdigest()}


def merge(res: dict[str, Any], path: Path) -> dict[str, Any]:
    """Keep the method rows of an earlier run of this cell that this run did not redo (reference rows are redone)."""
    if not path.exists():
        return res
    old = json.loads(path.read_text())
    done = {r["method"] for r in res["rows"]}
    kept = [r for r in old.get("rows", []) if r["kind"] == "method" and r["method"] not in done]
    for r in kept:
        r.setdefault("command", old.get("command"))
    res["rows"] = res["rows"] + kept
    return res


def result_path(dataset: str, arch: str, req: str) -> Path:
    return RESULTS / f"population_{dataset}_{arch}_{req}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plugin", action="append", default=[], help="a .py file exposing PEERS: dict[str, Method]")
    p.add_argument("--datasets", nargs="+", default=["digits"], choices=list(DATASETS))
    p.add_argument("--archs", nargs="+", default=["SmallCNN", "SmallCNN-GN", "MLP", "ResNetBN"], choices=list(ARCHS))
    p.add_argument("--requests", nargs="+", default=list(REQUESTS), choices=list(REQUESTS))
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all built-in)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--epochs", type=int, default=None, help="override the dataset's memorising schedule")
    p.add_argument("--relearn-models", type=int, default=3)
    p.add_argument("--relearn-steps", type=int, default=100)
    p.add_argument("--mnist-root", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--mnist-train", type=int, default=2000)
    p.add_argument("--mnist-test", type=int, default=1000)
    p.add_argument("--cache-dir", default=str(ROOT / "outputs" / "population"))
    p.add_argument("--out-suffix", default="", help="appended to each result file name")
    p.add_argument("--render", action="store_true", help="write docs/benchmarks/population.md and its figure from the JSONs only")
    args = p.parse_args(argv)
    try:
        for path in args.plugin:
            METHODS.update(load_plugin(path))
    except ValueError as err:
        p.error(str(err))
    if args.k < 6:
        p.error(f"--k must be >= 6 (two halves of >= 3 models each for the calibration row), got {args.k}")
    args.methods = args.methods or list(CANDIDATES)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; allowed are {sorted(METHODS)}")
    if args.render:
        import render_all

        return render_all.main(["--only", "population"])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec|stopped \\(plateau\\)).*")
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.machine()} CPU, 1 thread (torch {torch.__version__}), shared 2-core host"
    library = library_state()
    with quiet_lightning():
        for d in args.datasets:
            for a in args.archs:
                for r in args.requests:
                    res = run_cell(d, a, r, args)
                    res.update(command=command, machine=machine, library=library)
                    write_json(merge(res, result_path(d, a, r + args.out_suffix)), result_path(d, a, r + args.out_suffix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
