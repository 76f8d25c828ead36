"""Evidence benchmark: per-example attacks, the challenge score, relearn time and tug-of-war per method.

Memorising regime: SmallCNN without weight decay, trained long enough for 100% training
accuracy on a few thousand images (digits: all 1,347 training images; MNIST: a seeded
subset). Per dataset, K+1 originals are trained on all training data (K form the population
the unlearning methods are run on, the last one is the "original under test"); per request
(class 3; a random 10% of the training samples) three populations of K models are retrained
from scratch: on the retain set minus a 10% retain audit sample (the offline attack's
references; the audit points measure retain-side exposure), on the whole retain set (the
"retrained" population of U-LiRA and the challenge score) and the same again with other seeds
(the retrain row's population: the attack's calibration check). Two more retrained models with
fresh seeds: the retrain method's model under test and the reference of ToW. Every model is
cached under --cache-dir (lightning_unlearn.evidence.references), so a rerun only evaluates.

Per method: accuracies, offline-LiRA AUC / TPR@1%FPR (forget vs held-out test samples of the
same classes, against the references), U-LiRA AUC (the method run on the K originals vs the K
retrained models, leave-one-out target models), the NeurIPS'23
challenge forget score and final score (same populations), relearn steps, retain-side
exposure (offline LiRA on the audit sample, original vs unlearned), ToW against the "retrain"
model, and the unlearning time. Writes benchmarks/results/evidence_<dataset>.json and
prints the markdown table (--render prints it again from the saved JSON).

    .venv/bin/python benchmarks/evidence.py --datasets digits
    .venv/bin/python benchmarks/evidence.py --datasets mnist --mnist-root ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from central import PARAMS as CENTRAL_PARAMS  # noqa: E402

from lightning_unlearn import ForgetRequest, UnlearnConfig
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._io import write_json
from lightning_unlearn._training import quiet_lightning
from lightning_unlearn.baselines import run_method
from lightning_unlearn.data import load_digits_datasets, load_mnist
from lightning_unlearn.evidence import relearn_time
from lightning_unlearn.evidence.attacks import (
    INFORMATIVE_AUC,
    evidence_sets,
    logit_confidence,
    offline_attack,
    offline_scores,
    population_challenge_score,
    population_statistics,
    retain_exposure,
    tug_of_war,
    ulira_attack,
)
from lightning_unlearn.evidence.evaluate import random_samples_request
from lightning_unlearn.evidence.references import train_originals, train_references, unlearned_population
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.models import SmallCNN

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Evidence: per-example attacks, challenge score, relearn time"
METHODS = ("retrain", "ours", "default", "random_channels", "output_row", "finetune", "random_label", "salun",
           "neggrad_plus")
# The same recipes as benchmarks/central.py (the controls share the core method's objective). ``default``: the
# library's own defaults (``unlearn(model, dm)``: remove, then repair, step budget and stopping rule); ``ours``:
# central.py's fixed recipe (3 epochs of capped ascent, no stopping rule).
PARAMS: dict[str, dict[str, Any]] = {name: CENTRAL_PARAMS.get(name, {}) for name in METHODS}


#: --default-config: UnlearnConfig overrides for the ``default`` method (e.g. another objective), set in main().
DEFAULT_OVERRIDES: dict[str, Any] = {}


def _baseline(name: str) -> str:
    return "selective" if name in ("default", "ours") else name  # the benchmark's "ours" is the library's "selective"


def _recipe(name: str, args) -> dict[str, Any]:
    """The population cache key: a method's parameters and epochs (plus the library defaults for ``default``)."""
    extra = {"defaults": UnlearnConfig.build(**DEFAULT_OVERRIDES).to_dict()} if name == "default" else {}
    return {**PARAMS[name], "epochs": method_epochs(name, args), **extra}
RETRAIN_TEST_SEED, RETRAIN_TOW_SEED = 7001, 7002  # fresh retrained models, not references (their seeds are hashed)


def load(dataset: str, args) -> tuple[TensorDataset, TensorDataset]:
    if dataset == "digits":
        return load_digits_datasets(seed=0)
    if dataset == "mnist":
        train, test = load_mnist(args.mnist_root)
        gen = torch.Generator().manual_seed(1234)
        i = torch.randperm(len(train), generator=gen)[: args.mnist_train].sort().values
        j = torch.randperm(len(test), generator=gen)[: args.mnist_test].sort().values
        return (TensorDataset(train.tensors[0][i].clone(), train.tensors[1][i].clone()),
                TensorDataset(test.tensors[0][j].clone(), test.tensors[1][j].clone()))
    raise ValueError(f"unknown dataset {dataset!r}; allowed datasets are ['digits', 'mnist']")


def unlearn_fn(name: str, epochs: int):
    kw = PARAMS[name]

    def run(model, dm, seed):
        return run_method(_baseline(name), model, dm, epochs=epochs, seed=seed, **kw).model

    return run


def method_epochs(name: str, args) -> int | None:
    if name == "default":
        return None  # the step budget and the stopping rule decide
    return args.epochs if name == "retrain" else args.unlearn_epochs


def fill_cache(dm, args) -> None:
    """--shard j/P: train only members j, j+P, ... of every population (run P of these at once, then a plain run)."""
    j, p = args.shard
    template, k, cache = SmallCNN(), args.references, dict(cache_dir=args.cache_dir, progress=False)
    mine = range(j, k, p)
    sets = evidence_sets(dm, args.retain_sample, 0, args.max_samples)
    train_references(template, dm, k, args.epochs, exclude=sets["audit"], indices=mine, **cache)
    train_references(template, dm, k, args.epochs, indices=mine, **cache)
    train_references(template, dm, k, args.epochs, seed=1, indices=mine, **cache)
    for name in args.methods:
        if name != "retrain":
            unlearned_population(template, dm, unlearn_fn(name, method_epochs(name, args)), name,
                                 _recipe(name, args), k, args.epochs, indices=mine, **cache)


def run_request(dataset, req_name, request, train, test, originals, args) -> list[dict[str, Any]]:
    dm = UnlearningDataModule(train, test, request, batch_size=args.batch_size, seed=0, num_classes=10)
    template, k = SmallCNN(), args.references
    cache = dict(cache_dir=args.cache_dir, progress=False)
    sets = evidence_sets(dm, args.retain_sample, 0, args.max_samples)
    t0 = time.perf_counter()
    # offline LiRA and retain exposure: references that never saw the audit sample
    audit_refs = train_references(template, dm, k, args.epochs, exclude=sets["audit"], **cache)
    ref_s = time.perf_counter() - t0
    # U-LiRA and the challenge score: exact retraining (the whole retain set), and a second,
    # independent population of it for the retrain row (the attack's calibration check)
    refs = train_references(template, dm, k, args.epochs, **cache)
    retrain_population = train_references(template, dm, k, args.epochs, seed=1, **cache).models
    original = originals.models[k]
    tow_reference = run_method("retrain", original, dm, epochs=args.epochs, seed=RETRAIN_TOW_SEED).model.eval()
    forget = Subset(train, sets["forget"].tolist())
    heldout = Subset(test, sets["forget_heldout"].tolist())
    audit = torch.utils.data.ConcatDataset([Subset(train, sets["audit"].tolist()), Subset(test, sets["audit_heldout"].tolist())])
    audit_out = population_statistics(audit_refs.models, audit)
    before = offline_scores(logit_confidence(original, audit)[0], audit_out)
    retain_eval = Subset(train, np.random.default_rng(0).choice(dm.retain_indices, min(1000, len(dm.retain_indices)), replace=False).tolist())
    neg_metrics = split_accuracies(tow_reference, dm)
    target = split_accuracies(original, dm)["forget_acc"] - 0.02
    is_class = request.kind == "class"
    eval_set = Subset(test, dm.forget_test_indices.tolist()) if is_class else None

    def row_for(name: str, model, seconds: float, population) -> dict[str, Any]:
        acc = split_accuracies(model, dm)
        offline = offline_attack({name: model}, audit_refs.models, forget, heldout)[name]
        after = offline_scores(logit_confidence(model, audit)[0], audit_out)
        exposure = retain_exposure(before, after, len(sets["audit"]), seed=0)
        ul = ulira_attack(population, refs.models, forget)
        ch = population_challenge_score(population, refs.models, forget, retain_eval, test)
        steps = relearn_time(model, forget, dm.retain_set, target, eval_set, 10, max_steps=args.relearn_steps,
                             eval_every=5, seed=0)
        return {
            "dataset": dataset, "request": req_name, "method": name, "params": PARAMS.get(name, {}),
            **{key: acc[key] for key in ("forget_acc", "remaining_acc", "test_acc", "forget_train_acc", "retain_train_acc")},
            "lira_auc": offline.auc, "lira_tpr_at_1pct_fpr": offline.tpr_at_1pct_fpr, "lira": offline.to_dict(),
            "ulira_auc": ul.auc, "ulira_tpr_at_1pct_fpr": ul.tpr_at_1pct_fpr, "ulira": ul.to_dict(),
            "forget_score": ch["forget_score"], "final_score": ch["final_score"], "challenge": ch,
            "relearn_steps": steps if steps is not None else args.relearn_steps + 5, "relearned": steps is not None,
            "retain_auc_before": exposure["before"]["auc"], "retain_auc_after": exposure["after"]["auc"],
            "retain_more_exposed": exposure["more_exposed"], "retain_exposure": exposure,
            "tow": tug_of_war(acc, neg_metrics), "seconds": seconds,
        }

    rows = [row_for("(original)", original, float("nan"), originals.models[:k])]
    _log(rows[-1])
    for name in args.methods:
        t0 = time.perf_counter()
        seed = RETRAIN_TEST_SEED if name == "retrain" else 0
        model = run_method(_baseline(name), original, dm, epochs=method_epochs(name, args), seed=seed,
                           **PARAMS[name]).model.eval()
        seconds = time.perf_counter() - t0
        population = retrain_population if name == "retrain" else unlearned_population(
            template, dm, unlearn_fn(name, method_epochs(name, args)), name, _recipe(name, args), k, args.epochs,
            **cache).models
        rows.append(row_for(name, model, seconds, population))
        _log(rows[-1])
    for r in rows:
        r["reference_training_s"] = ref_s
    return rows


def _log(r: dict[str, Any]) -> None:
    print(f"[{r['dataset']} {r['request']}] {r['method']}: forget {r['forget_acc']:.3f} test {r['test_acc']:.3f} "
          f"LiRA {r['lira_auc']:.3f} U-LiRA {r['ulira_auc']:.3f} F {r['forget_score']:.3f} final {r['final_score']:.3f} "
          f"relearn {r['relearn_steps']} retain {r['retain_auc_before']:.3f}->{r['retain_auc_after']:.3f} "
          f"ToW {r['tow']:.3f} ({r['seconds']:.1f}s)", flush=True)


def run_dataset(dataset: str, args) -> dict[str, Any]:
    start = time.perf_counter()
    train, test = load(dataset, args)
    dm_all = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=args.batch_size, num_classes=10)
    reqs = {"class 3": ForgetRequest(classes=[3]), "random 10%": random_samples_request(len(train), fraction=0.1, seed=0)}
    if args.shard is not None:
        j, p = args.shard
        train_originals(SmallCNN(), dm_all, args.references + 1, args.epochs, cache_dir=args.cache_dir,
                        indices=range(j, args.references + 1, p), progress=False)
        for req_name in args.requests:
            fill_cache(UnlearningDataModule(train, test, reqs[req_name], batch_size=args.batch_size, num_classes=10), args)
        return {}
    originals = train_originals(SmallCNN(), dm_all, args.references + 1, args.epochs, cache_dir=args.cache_dir, progress=False)
    original = originals.models[args.references]
    train_acc = float(logit_confidence(original, train)[1].mean())
    test_acc = float(logit_confidence(original, test)[1].mean())
    print(f"[{dataset}] original: train acc {train_acc:.4f} test acc {test_acc:.4f}", flush=True)
    rows = []
    for req_name in args.requests:
        rows += run_request(dataset, req_name, reqs[req_name], train, test, originals, args)
    return {"dataset": dataset, "rows": rows, "original_train_acc": train_acc, "original_test_acc": test_acc,
            "num_train": len(train), "num_test": len(test), "elapsed_s": time.perf_counter() - start}


# -- markdown -------------------------------------------------------------------------
COLUMNS = (
    ("forget_acc", "forget acc (%)", "pct"), ("remaining_acc", "remaining acc (%)", "pct"), ("test_acc", "test acc (%)", "pct"),
    ("lira_auc", "offline LiRA AUC", "auc"), ("lira_tpr_at_1pct_fpr", "TPR@1%FPR (%)", "pct"), ("ulira_auc", "U-LiRA AUC", "auc"),
    ("forget_score", "forget score F", "f3"), ("final_score", "final score", "f3"), ("relearn_steps", "relearn steps", "int"),
    ("retain", "retain AUC before->after", "retain"), ("tow", "ToW", "f3"), ("seconds", "time (s)", "f1"),
)


CHANCE_BAND = 0.05  # a fresh retrained model must score 0.5 +- this, or the attack's columns are withheld
# Retain exposure is not withheld: it scores other samples (retain audit points) and the forget-side control does not test it.
ATTACK_COLUMNS = {"lira": ("lira_auc", "lira_tpr_at_1pct_fpr"), "ulira": ("ulira_auc",)}


def withheld(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Per attack: True when the retrain control is not at chance (the attack is miscalibrated here)."""
    retrain = next((r for r in rows if r["method"] == "retrain"), None)
    if retrain is None:
        return {"lira": True, "ulira": True}
    return {a: abs(retrain[f"{a}_auc"] - 0.5) > CHANCE_BAND for a in ATTACK_COLUMNS}


def _cell(row: dict[str, Any], key: str, kind: str, informative: bool, hidden: set[str] = frozenset()) -> str:
    if key in hidden:
        return "(withheld)"
    if kind == "retain":
        flag = " (more exposed)" if row["retain_more_exposed"] else ""
        return f"{row['retain_auc_before']:.2f}->{row['retain_auc_after']:.2f}{flag}"
    v = row.get(key)
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if kind == "auc":
        return f"{v:.3f}" if informative or key != "lira_auc" else f"{v:.3f}*"
    if kind == "pct":
        return f"{100 * v:.1f}"
    if kind == "int":
        return f"{int(v)}" + ("" if row.get("relearned", True) else "+")
    return f"{v:.{kind[1]}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    informative = next(r for r in rows if r["method"] == "(original)")["lira_auc"] >= INFORMATIVE_AUC
    hidden = {col for attack, bad in withheld(rows).items() if bad for col in ATTACK_COLUMNS[attack]}
    lines = ["| method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = [_cell(r, k, kind, informative, hidden if r["method"] != "retrain" else set()) for k, _, kind in COLUMNS]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return lines


INTRO = (
    "Generated by `benchmarks/evidence.py` from `benchmarks/results/evidence_<dataset>.json`. Memorising regime: "
    "SmallCNN, Adam lr 1e-3, no weight decay, batch 64, trained to (about) 100% training accuracy. Per dataset K+1 "
    "originals (all training data; K are the population every method is run on, one is the original under test); "
    "per request three populations of K models retrained from scratch (retain set minus a 10% audit sample: the "
    "offline attack's references; the whole retain set: U-LiRA's and the challenge's retrained population; the same "
    "with other seeds: the retrain row's population, i.e. the attacks' calibration check). Every method unlearns for "
    "3 epochs (retrain: full training) with the recipes of benchmarks/central.py. Columns: accuracies as in the "
    "centralised table; **offline LiRA AUC** and TPR@1%FPR: the method's model under test, forget samples vs held-out "
    "test samples of the same classes, z-score against the references (what `lightning-unlearn evaluate --attack "
    "ulira` reports; `*` = the original's AUC is below 0.70, the attack cannot see membership and the number ranks "
    "nothing); **U-LiRA AUC**: likelihood ratio per forget sample between the method's K unlearned models and the K "
    "retrained ones, leave-one-out held-out models (0.5 = indistinguishable from retraining, 1 = every model "
    "recognised); **forget score F** and **final score**: the NeurIPS 2023 challenge's metric on the same two "
    "populations (F of two retrained populations at K = 8 is ~0.27, not 1: compare with the retrain row); "
    "**relearn steps**: Adam steps (batch 32, half forget, half retain) until forget accuracy is back within 2 "
    "points of the original's, checked every 5 steps (+ = not within 100); **retain AUC before->after**: offline "
    "LiRA on the audit sample of retain points under the original and the unlearned model, '(more exposed)' when "
    "the 95% paired-bootstrap interval of the change lies above 0; **ToW**: tug-of-war against a fresh retrained "
    "model; time: the method's own run (one loaded CPU thread). A column is withheld when the retrain row of its "
    "attack is not within 0.5 +- 0.05."
)


def markdown(results: list[dict[str, Any]], args) -> str:
    out = [SECTION, "", INTRO, ""]
    for res in results:
        d = res["dataset"]
        out += [f"### {d}", "",
                f"Command: `{res['command']}` ({res['elapsed_s'] / 60:.1f} min on 1 CPU thread of a shared 2-core machine). "
                f"K = {res['config']['references']} models per population, {res['config']['epochs']} training epochs; "
                f"{res['num_train']} training / {res['num_test']} test images; original: train acc "
                f"{100 * res['original_train_acc']:.1f}%, test acc {100 * res['original_test_acc']:.1f}%.", ""]
        for req in dict.fromkeys(r["request"] for r in res["rows"]):
            rows = [r for r in res["rows"] if r["request"] == req]
            orig = rows[0]
            retrain = next((r for r in rows if r["method"] == "retrain"), None)
            verdict = (f"offline LiRA informative (the original's AUC {orig['lira_auc']:.3f} >= {INFORMATIVE_AUC})"
                       if orig["lira_auc"] >= INFORMATIVE_AUC else
                       f"offline LiRA: **attack uninformative** (the original's AUC {orig['lira_auc']:.3f} < "
                       f"{INFORMATIVE_AUC}; its AUCs, marked *, do not rank methods)")
            u_verdict = (f"U-LiRA: the original, not unlearned at all, scores {orig['ulira_auc']:.3f}"
                         + ("" if orig["ulira_auc"] >= INFORMATIVE_AUC else
                            " (the forget samples leave little trace; a method scoring higher moved away from "
                            "retraining in another way, it does not remember more)"))
            bad = withheld(rows)
            names = {"lira": "offline LiRA", "ulira": "U-LiRA"}
            chance = ("" if retrain is None else
                      " Retrain control: " + "; ".join(
                          f"{names[a]} AUC {retrain[a + '_auc']:.3f} "
                          + (f"(**not at chance** (|AUC - 0.5| > {CHANCE_BAND}): its columns are withheld)" if bad[a] else "(at chance)")
                          for a in names) + ".")
            out += [f"#### {d}, forget {req}", "", f"Attack on the original: {verdict}; {u_verdict}.{chance}", ""]
            out += table(rows) + [""]
    return "\n".join(out)


PAGE_GROUPS = [
    ("At the library's defaults", ["evidence_digits_default.json", "evidence_digits_default_retain.json"],
     "`default` is `unlearn` with the library's defaults (the second file: with `objective=\"retain\"`); `ours` "
     "is the fixed recipe of the method comparison below (3 epochs of capped ascent on the same channels, no reset, "
     "no stopping rule). The K = 8 reference populations are the cached ones of the comparison below."),
    ("Methods compared (fixed recipes)", ["evidence_digits.json", "evidence_mnist.json", "evidence_mnist_class3_k8.json"],
     "Every baseline of `lightning_unlearn.baselines` with the recipes of `benchmarks/central.py`; `ours` is the "
     "explained-channel method at those recipes (not the library's current defaults)."),
]


def render_page(results: Path) -> str:
    """docs/benchmarks/evidence.md: the defaults first, then the method comparison, then the CLI attack's cost."""
    import pagekit

    names = [n for _, files, _ in PAGE_GROUPS for n in files] + ["evidence_digits_cheap.json"]
    records = {n: pagekit.load(results, n) for n in names}
    intro = INTRO.split(". ", 1)[1]  # the first sentence names the old section's files
    lines = pagekit.header("Evidence: per-example attacks, challenge score, relearn time", "evidence.py", names,
                           [records[n]["command"] for n in names],
                           ["1 CPU thread of a shared 2-core machine (elapsed minutes per file below)"], intro)
    for title, files, note in PAGE_GROUPS:
        lines += [f"## {title}", "", note, ""]
        body = markdown([records[n] for n in files], None).split(INTRO, 1)[1]
        lines += body.strip("\n").splitlines() + [""]
    cheap_rec = records["evidence_digits_cheap.json"]
    ulira = cheap_rec["result"]["ulira"]
    lines += ["## Cost of the command-line attack", "",
              f"`{cheap_rec['command']}`: {cheap_rec['references']} reference models of {cheap_rec['epochs']} epochs "
              f"trained into an empty cache in {cheap_rec['attack_evidence_s']:.0f} s; the same call with the cache "
              f"filled {cheap_rec['attack_evidence_cached_s']:.1f} s; training the original and unlearning "
              f"{cheap_rec['original_and_unlearning_s']:.0f} s. Forget AUC of the unlearned model "
              f"{ulira['forget']['auc']:.3f} ({'informative' if ulira['informative'] else 'uninformative'}: "
              f"{ulira['informative_rule']}).", ""]
    return pagekit.finish(lines)


def cheap(args) -> dict[str, Any]:
    """What ``lightning-unlearn evaluate --attack ulira --references K`` costs on digits: one call, an empty cache."""
    import tempfile

    from lightning_unlearn.evidence.attacks import attack_evidence

    train, test = load("digits", args)
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=args.batch_size, num_classes=10)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        original = train_originals(SmallCNN(), dm, 1, args.epochs, cache_dir=cache, progress=False).models[0]
        unlearned = run_method("selective", original, dm, epochs=args.unlearn_epochs, **PARAMS["ours"]).model
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = attack_evidence(original, unlearned, dm, references=args.references, epochs=args.epochs,
                              cache_dir=cache, progress=False, retain_sample=args.retain_sample)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = attack_evidence(original, unlearned, dm, references=args.references, epochs=args.epochs,
                                cache_dir=cache, progress=False, retain_sample=args.retain_sample)
        cached_s = time.perf_counter() - t0
    assert again["ulira"]["cache"]["trained"] == 0
    res = {"references": args.references, "epochs": args.epochs, "attack_evidence_s": first_s,
           "attack_evidence_cached_s": cached_s, "original_and_unlearning_s": setup_s, "result": out}
    print(f"cheap mode: K={args.references}, {args.epochs} epochs: attack_evidence {first_s:.1f}s "
          f"(cached rerun {cached_s:.1f}s; training the original + unlearning {setup_s:.1f}s)", flush=True)
    return res


def _shard(text: str) -> tuple[int, int]:
    j, p = (int(v) for v in text.split("/"))
    if not 0 <= j < p:
        raise argparse.ArgumentTypeError(f"shard must be J/P with 0 <= J < P, got {text!r}")
    return j, p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits"], choices=["digits", "mnist"])
    p.add_argument("--requests", nargs="+", default=["class 3", "random 10%"], choices=["class 3", "random 10%"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--references", type=int, default=8, help="K: references and population size per method")
    p.add_argument("--epochs", type=int, default=40, help="training epochs of originals and retrained models")
    p.add_argument("--unlearn-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--retain-sample", type=int, default=500)
    p.add_argument("--max-samples", type=int, default=1000)
    p.add_argument("--relearn-steps", type=int, default=100)
    p.add_argument("--mnist-root", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--mnist-train", type=int, default=3000)
    p.add_argument("--mnist-test", type=int, default=2000)
    p.add_argument("--cache-dir", default=str(ROOT / "outputs" / "references"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cheap", action="store_true", help="time only attack_evidence (the CLI's call) on digits class 3")
    p.add_argument("--render", action="store_true", help="print the markdown of the saved results only")
    p.add_argument("--out", default=None, help="results file name under benchmarks/results/ (one dataset; default evidence_<dataset>)")
    p.add_argument("--shard", type=_shard, default=None, metavar="J/P",
                   help="only train members J, J+P, ... of every population into the cache (no evaluation)")
    p.add_argument("--default-config", default="{}", help="UnlearnConfig overrides (JSON) for the 'default' method")
    args = p.parse_args(argv)
    DEFAULT_OVERRIDES.update(json.loads(args.default_config))
    PARAMS["default"] = dict(DEFAULT_OVERRIDES)
    torch.set_num_threads(args.threads)
    if args.render:
        names = [args.out] if args.out else [f"evidence_{d}" for d in args.datasets]
        results = [json.loads((ROOT / "benchmarks" / "results" / f"{n}.json").read_text()) for n in names]
        print(markdown(results, args))
        return 0
    if args.cheap:
        with quiet_lightning():
            res = cheap(args)
        res["command"] = ".venv/bin/python benchmarks/evidence.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_json(res, ROOT / "benchmarks" / "results" / "evidence_digits_cheap.json")
        return 0
    results = []
    with quiet_lightning():
        for d in args.datasets:
            res = run_dataset(d, args)
            if args.shard is not None:
                continue
            res["command"] = ".venv/bin/python benchmarks/evidence.py " + shlex.join(argv if argv is not None else sys.argv[1:])
            res["config"] = {k: v for k, v in vars(args).items()}
            write_json(res, ROOT / "benchmarks" / "results" / f"{args.out or 'evidence_' + d}.json")
            results.append(res)
    if results:
        print(markdown(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
