"""Federated population: can an auditor with K reference federations tell federated unlearning from retraining?

The federated counterpart of ``population.py`` (same statistics, same attack, its functions reused). One data
partition (scikit-learn digits, 5 clients, Dirichlet(0.5) label skew, partition seed 0: the set-up of
``configs/digits_fed.yaml``) is held fixed, as the central harness holds its training set fixed; member i of the
population differs in its model initialisation and the clients' data order (seed ``derived_seed``). Per member:
the FedAvg original (SmallCNN, ``--rounds`` rounds of one local epoch), federated retraining without the forgotten
data (``baselines.federated_retrain``, the same schedule), retraining with half and with double the rounds (the
schedule band) and ``federated_unlearn`` at the library's defaults (``trained_epochs`` = rounds x local epochs, as
``federated_mnist.py`` passes it). Every model is cached by content hash under ``--cache-dir`` (with the timing
of the call that made it), so a rerun only evaluates.

U-LiRA is ``population.ulira_auc`` (leave-one-out on both sides, ``attacks.ulira_scores``), raw and
class-calibrated (``population.calibrate``); the "retrained (two halves)" row is the attack's own floor (~0.5).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated_population.py --members 8
    .venv/bin/python benchmarks/federated_population.py --render   # docs/benchmarks/federated_population.md only
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from population import (  # noqa: E402  (the central harness: its statistics and attack, not a copy)
    REQUESTS, _fmt, accuracies, calibrate, halves_auc, library_state, make_request, population_stats, split_aucs,
    ulira_auc,
)

from lightning_unlearn._io import load_torch_file, save_torch, write_json  # noqa: E402
from lightning_unlearn._training import quiet_lightning, reinitialize  # noqa: E402
from lightning_unlearn.config import UnlearnConfig  # noqa: E402
from lightning_unlearn.data import FederatedDataModule, UnlearningDataModule, load_digits_datasets  # noqa: E402
from lightning_unlearn.data.federated import FederatedForgetPlan  # noqa: E402
from lightning_unlearn.evidence.references import (  # noqa: E402
    cache_key, dataset_fingerprint, derived_seed, model_description,
)
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn  # noqa: E402
from lightning_unlearn.federated import baselines as B  # noqa: E402
from lightning_unlearn.federated.fedavg import deploy_model  # noqa: E402
from lightning_unlearn.federated.federation import as_federation  # noqa: E402
from lightning_unlearn.mask.arrays import get_arrays  # noqa: E402
from lightning_unlearn.models import SmallCNN  # noqa: E402
from lightning_unlearn.request import ForgetRequest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLIENTS, ALPHA, PARTITION_SEED, LR, BATCH = 5, 0.5, 0, 3e-3, 32  # configs/digits_fed.yaml's federation
CENTRAL = "population_digits_SmallCNN_{request}.json"
#: The resolved defaults the page names (as ``federated_unlearn`` resolves them for the request; one masked round).
RESOLVED = ("method", "ratio", "scope", "objective", "reset", "calibrate", "calibrate_epochs", "epochs", "max_steps",
            "lr_scale", "head_lr_scale")  # the central harness's cell on the same data and model


def result_path(request: str, results: Path = RESULTS) -> Path:
    return results / f"federated_population_{request}.json"


# -- cached members ---------------------------------------------------------------------------
class Cache:
    """Models under ``<dir>/<kind>/<key>/<kind>_<i>.pt`` (key: SHA-256 of what made them), each with the wall and CPU
    seconds of the call that made it; loaded with ``weights_only=True`` and checked against key and index."""

    def __init__(self, folder: Path, template: nn.Module) -> None:
        self.folder, self.template = folder, template

    def path(self, kind: str, parts: dict[str, Any], i: int) -> tuple[str, Path]:
        key = cache_key({"kind": kind, **parts})
        return key, self.folder / kind / key / f"{kind}_{i}.pt"

    def has(self, kind: str, parts: dict[str, Any], i: int) -> bool:
        return self.path(kind, parts, i)[1].exists()

    def get(self, kind: str, parts: dict[str, Any], i: int, make: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
        """The cached model, or ``make()``'s (timed: only the call itself, so prepare what it needs before)."""
        key, path = self.path(kind, parts, i)
        if path.exists():
            blob = load_torch_file(path, f"cached {kind} model")
            if not isinstance(blob, dict) or blob.get("key") != key or blob.get("index") != i:
                raise ValueError(f"{path} does not belong to cache key {key[:12]} index {i}; delete it and run again")
            model = copy.deepcopy(self.template)
            model.load_state_dict(blob["state_dict"])
            return model.eval(), dict(blob["timing"])
        t0, c0 = time.perf_counter(), time.process_time()
        model = make()
        timing = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        save_torch({"key": key, "index": i, "state_dict": model.state_dict(), "timing": timing}, path)
        return model.eval(), timing


class Member:
    """Population member i: its federation (built only when a model of it has to be trained) and cached models."""

    def __init__(self, i: int, fdm: FederatedDataModule, cache: Cache, base: dict[str, Any], rounds: int) -> None:
        self.i, self.fdm, self.cache, self.base, self.rounds = i, fdm, cache, base, rounds
        self.seed = derived_seed("federated-original", 0, i)
        self._sim: FederatedSimulation | None = None

    def original(self) -> tuple[nn.Module, dict]:
        return self.cache.get("original", self._original_parts(), self.i, lambda: self.sim().model)

    def _original_parts(self) -> dict[str, Any]:
        return {**self.base, "rounds": self.rounds, "seed": self.seed}

    def sim(self) -> FederatedSimulation:
        """The trained federation, its clients holding the deployed original (FedAvg's, or the cached one's)."""
        if self._sim is None:
            model = reinitialize(SmallCNN(lr=LR), self.seed)
            self._sim = FederatedSimulation(self.fdm, model, rounds=self.rounds, seed=self.seed, progress=False)
            if self.cache.has("original", self._original_parts(), self.i):
                model.load_state_dict(self.original()[0].state_dict())
                deploy_model(as_federation(self._sim.clients), get_arrays(model))
            else:
                self._sim.train()
        return self._sim

    def _with_plan(self, kind: str, parts: dict[str, Any], request: ForgetRequest,
                   make: Callable[[FederatedSimulation, FederatedForgetPlan], nn.Module]) -> tuple[nn.Module, dict]:
        """A cached model of ``kind``; else the federation is readied and handed the request (untimed), then
        ``make`` (timed)."""
        if self.cache.has(kind, parts, self.i):
            return self.cache.get(kind, parts, self.i, lambda: None)
        sim = self.sim()
        plan = sim.request(request)
        return self.cache.get(kind, parts, self.i, lambda: make(sim, plan))

    def retrained(self, request: ForgetRequest, rounds: int) -> tuple[nn.Module, dict]:
        seed = derived_seed(f"federated-retrain-{rounds}", 0, self.i)
        parts = {**self.base, "rounds": rounds, "seed": seed, "request": request.to_dict()}
        return self._with_plan("retrained", parts, request, lambda sim, plan: B.federated_retrain(
            sim.model, sim.clients, plan, rounds, seed=seed, progress=False).model)

    def unlearned(self, request: ForgetRequest, library: str) -> tuple[nn.Module, dict]:
        seed = derived_seed("federated-unlearn", 0, self.i)
        parts = {**self.base, "rounds": self.rounds, "original_seed": self.seed, "seed": seed,
                 "request": request.to_dict(), "library_sources": library}
        return self._with_plan("unlearned", parts, request, lambda sim, plan: federated_unlearn(
            sim.model, sim.clients, request, trained_epochs=self.rounds * sim.local_epochs, seed=seed).model)


# -- one request ------------------------------------------------------------------------------
def split_spread(first: np.ndarray, second: np.ndarray, splits: int = 10, seed: int = 0) -> list[float]:
    """[mean, min, max] of ``population.split_aucs``: the AUC at K/2 and how much it moves with the draw of members
    (first = second: the floor, ``population.halves_auc``)."""
    aucs = split_aucs(first, second, splits, seed)
    return [float(np.mean(aucs)), float(np.min(aucs)), float(np.max(aucs))]


def run_request(req_name: str, members: list[Member], train, test, fdm: FederatedDataModule, rounds: int,
                library: str, log: Callable[[str], None]) -> dict[str, Any]:
    request = make_request(req_name, len(train))
    plan = fdm.forget_plan(request)
    dm = UnlearningDataModule(train, test, request, batch_size=BATCH, seed=0, num_classes=10,
                              forget_indices=plan.forget_indices)
    rng = np.random.default_rng(0)
    picked = rng.choice(dm.retain_indices, min(500, len(dm.retain_indices)), replace=False)
    retain_eval = Subset(train, np.sort(picked).tolist())  # as population.run_cell
    forget_y, test_y = dm.train_targets.numpy()[dm.forget_indices], dm.test_targets.numpy()
    half, double = max(1, rounds // 2), 2 * rounds
    pops: dict[str, tuple[list[nn.Module], list[dict]]] = {}
    t0 = time.perf_counter()
    for name, get in [("original", lambda m: m.original()), ("retrained", lambda m: m.retrained(request, rounds)),
                      ("half", lambda m: m.retrained(request, half)),
                      ("double", lambda m: m.retrained(request, double)),
                      ("ours", lambda m: m.unlearned(request, library))]:
        with quiet_lightning(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pops[name] = tuple(map(list, zip(*(get(m) for m in members))))
        log(f"{name}: {len(members)} members ready ({time.perf_counter() - t0:.0f}s so far)")
    stats = {name: population_stats(models, dm, retain_eval) for name, (models, _) in pops.items()}
    cal = {name: calibrate(s.phi_forget, forget_y, s.phi_test, test_y) for name, s in stats.items()}
    timing = {name: {k: float(np.mean([t[k] for t in times])) for k in ("wall_s", "cpu_s")}
              for name, (_, times) in pops.items()}

    def row(label: str, name: str, kind: str, raw: float, calibrated: float) -> dict[str, Any]:
        s = stats[name]
        out = {"method": label, "population": name, "kind": kind, **accuracies(s, dm),
               "confidence": float(s.phi_forget.mean()), "ulira_raw": raw, "ulira_cal": calibrated,
               "half_k_raw": split_spread(s.phi_forget, stats["retrained"].phi_forget),
               "half_k_cal": split_spread(cal[name], cal["retrained"]),
               "wall_s": timing[name]["wall_s"], "cpu_s": timing[name]["cpu_s"],
               "speedup_cpu": timing["retrained"]["cpu_s"] / timing[name]["cpu_s"],
               "speedup_wall": timing["retrained"]["wall_s"] / timing[name]["wall_s"]}
        log(f"{label}: forget {out['forget_acc']:.3f} rem {out['remaining_acc']:.3f} test {out['test_acc']:.3f} "
            f"conf {out['confidence']:+.1f} U-LiRA {raw:.3f}/{calibrated:.3f} cpu {out['cpu_s']:.2f}s")
        return out

    vs_retrained = lambda name: (ulira_auc(stats[name].phi_forget, stats["retrained"].phi_forget),  # noqa: E731
                                 ulira_auc(cal[name], cal["retrained"]))
    rows = [row("original", "original", "reference", *vs_retrained("original")),
            row("retrained (two halves)", "retrained", "reference", halves_auc(stats["retrained"].phi_forget),
                halves_auc(cal["retrained"])),
            row(f"retrain, half schedule ({half} rounds)", "half", "reference", *vs_retrained("half")),
            row(f"retrain, double schedule ({double} rounds)", "double", "reference", *vs_retrained("double")),
            row("federated_unlearn (defaults)", "ours", "method", *vs_retrained("ours"))]
    resolved = UnlearnConfig.build(None).resolved(request, "federated").to_dict()  # as federated_unlearn resolves it
    return {"request": req_name, "request_spec": request.to_dict() if request.kind == "class" else
            {"kind": "sample", "count": len(request.sample_ids)}, "k": len(members), "rounds": rounds,
            "num_train": len(train), "num_test": len(test), "num_forget": int(len(dm.forget_indices)),
            "clients_forgetting": plan.forgetting_clients, "clients_dropped": plan.dropped,
            "original_train_acc": float(np.mean(stats["original"].retain_acc)),
            "original_test_acc": float(stats["original"].test_correct.mean()),
            "models_wall_s": float(sum(t["wall_s"] for _, times in pops.values() for t in times)),
            "unlearn_config": {k: v for k, v in resolved.items() if k in RESOLVED}, "rows": rows}


# -- the page ---------------------------------------------------------------------------------
COLUMNS = (("forget_acc", "forget acc", "pct"), ("remaining_acc", "remaining acc", "pct"),
           ("test_acc", "test acc", "pct"), ("confidence", "mean conf (phi)", "f1"), ("ulira_raw", "U-LiRA raw", "f3"),
           ("ulira_cal", "U-LiRA cal", "f3"), ("cpu_s", "CPU s / member", "f2"), ("wall_s", "wall s / member", "f2"),
           ("speedup_cpu", "x faster (CPU)", "f1"))


def reading(cell: dict[str, Any]) -> list[str]:
    """Where the default lands, in words, from the cell's numbers: against the band, the original and retraining."""
    by = {r["population"]: r for r in cell["rows"]}
    ours, out = by["ours"], []
    for view in ("raw", "cal"):
        band = sorted(by[b][f"ulira_{view}"] for b in ("half", "double"))
        auc, orig = ours[f"ulira_{view}"], by["original"][f"ulira_{view}"]
        where = "below" if auc < band[0] else "inside" if auc <= band[1] else "above"
        out.append(f"{view} {auc:.3f}: {where} the schedule band ({band[0]:.3f} - {band[1]:.3f}), "
                   f"{'below' if auc < orig else 'at or above'} the original's {orig:.3f}")
    acc = (f"forget accuracy {100 * ours['forget_acc']:.1f}% (retrained {100 * by['retrained']['forget_acc']:.1f}%, "
           f"original {100 * by['original']['forget_acc']:.1f}%)")
    return [f"Reading: the default's U-LiRA AUC is {'; '.join(out)}; {acc}; {ours['speedup_cpu']:.1f}x faster than "
            "federated retraining in CPU time.", ""]


def spread(row: dict[str, Any], view: str) -> str:
    """The row's AUC at K/2: mean (min - max over the member draws)."""
    mean, low, high = row[f"half_k_{view}"]
    return f"{mean:.3f} ({low:.3f} - {high:.3f})"


def central_row(results: Path, request: str) -> dict[str, Any] | None:
    """The central harness's default on the same data, model and request (population.md), if that file exists."""
    path = results / CENTRAL.format(request=request)
    if not path.exists():
        return None
    return next((r for r in json.loads(path.read_text())["rows"] if r["method"] == "default"), None)


def render_page(results: Path = RESULTS) -> str:
    """docs/benchmarks/federated_population.md from benchmarks/results/federated_population_<request>.json."""
    import pagekit

    cells = [json.loads(p.read_text()) for p in (result_path(r, results) for r in REQUESTS) if p.exists()]
    centrals = [CENTRAL.format(request=c["request"]) for c in cells if central_row(results, c["request"])]
    first = cells[0]["settings"]
    intro = (
        f"Can an auditor with K reference federations tell `federated_unlearn` from federated retraining? scikit-learn "
        f"digits, {first['clients']} clients with a Dirichlet({first['alpha']}) label-skewed partition (partition seed "
        f"{first['partition_seed']}, the federation of `configs/digits_fed.yaml`: the label skew the federated engine "
        "is built for, where iid clients would be close to the central case), SmallCNN (Adam lr "
        f"{first['lr']:g}, batch {first['batch_size']}), FedAvg with {first['rounds']} rounds of one local epoch. The "
        "partition is the same for every member, as the central harness trains every original on the same data; "
        "member i differs in its initialisation and the clients' data order. Per member: the FedAvg original, "
        "federated retraining on the retain data with the same schedule (`baselines.federated_retrain`), retraining "
        "with half and double the rounds (the schedule band), and `federated_unlearn` at the library's defaults "
        "(`trained_epochs` = rounds x local epochs). **U-LiRA** is the central harness's (`population.ulira_auc`: "
        "leave-one-out on both sides, per forget sample, 0.5 = indistinguishable), *raw* on phi = logit_y - "
        "logsumexp(others), *cal* on phi minus the same model's mean phi on test samples of the sample's class; "
        "every row is scored against the retrained population, except 'retrained (two halves)', the attack's own "
        "floor (mean over 10 random half splits of the retrained population). **CPU s / member**, **wall s / "
        "member**: mean over the members of the call that made the model (one process, one torch thread, clients "
        "run one after another in process; timed when the model was trained and cached). **x faster**: "
        "retraining's mean CPU seconds / the row's. Accuracies are population means (class: forget = the forgotten "
        "class on test; samples: forget = forget-set accuracy, remaining = retain-train accuracy).")
    lines = pagekit.header("Federated population evidence: can an auditor tell federated unlearning from retraining?",
                           "federated_population.py", [result_path(c["request"]).name for c in cells] + centrals,
                           [c["command"] for c in cells], [c["machine"] for c in cells], intro)
    lines += ["## Summary", "",
              "Federated unlearning's U-LiRA AUC against retraining (raw / cal), next to the attack's floor (two "
              "halves of the retrained population), the schedule band (honest federated retraining with half and "
              "double the rounds) and the original; as on the [central population page](population.md), a method is "
              "as good as retraining on this evidence when it sits at or below the band. *At K/2* repeats the attack "
              f"with half the members on each side (K/2 = {' or '.join(sorted({str(c['k'] // 2) for c in cells}))}; "
              "10 random member-disjoint draws: mean, and the range over the draws in brackets), which shows how much "
              "one draw of members moves the AUC. The last column is the central harness's default on the same data, "
              "architecture and "
              "request (K = 8, central training).", ""]
    pair = lambda r: f"{_fmt(r['ulira_raw'], 'f3')} / {_fmt(r['ulira_cal'], 'f3')}"  # noqa: E731
    summary = []
    for c in cells:
        by = {r["population"]: r for r in c["rows"]}
        central = central_row(results, c["request"])
        summary.append([c["request"], c["k"], pair(by["ours"]), spread(by["ours"], "raw"), spread(by["ours"], "cal"),
                        pair(by["retrained"]), f"{spread(by['retrained'], 'raw')} / {spread(by['retrained'], 'cal')}",
                        " - ".join(_fmt(v, "f3") for v in sorted(by[b]["ulira_raw"] for b in ("half", "double"))),
                        " - ".join(_fmt(v, "f3") for v in sorted(by[b]["ulira_cal"] for b in ("half", "double"))),
                        pair(by["original"]), _fmt(by["ours"]["speedup_cpu"], "f1"),
                        pair(central) if central else "-"])
    lines += pagekit.table(["request", "K", "ours raw / cal", "ours raw at K/2", "ours cal at K/2",
                            "retrained halves raw / cal", "halves at K/2 raw / cal", "schedule band raw",
                            "schedule band cal", "original raw / cal", "ours x faster (CPU)",
                            "central default raw / cal"], summary) + [""]
    for c in cells:
        spec = c["request_spec"]
        what = f"class {spec['classes']}" if spec["kind"] == "class" else f"{spec['count']} random training samples"
        dropped = f" (dropped, no retain data: {c['clients_dropped']})" if c["clients_dropped"] else ""
        lines += [f"## {c['request']}: {what}", "",
                  f"K = {c['k']}, {c['rounds']} FedAvg rounds; {c['num_train']} train / {c['num_test']} test, "
                  f"{c['num_forget']} forget samples held by clients {c['clients_forgetting']}{dropped}; originals' "
                  f"retain-train accuracy {100 * c['original_train_acc']:.1f}%, "
                  f"test {100 * c['original_test_acc']:.1f}%. "
                  f"Command: `{c['command']}` (library at commit {str(c['library']['git_commit'])[:7]}"
                  f"{', with uncommitted library edits' if c['library']['uncommitted'] else ''}). Making this "
                  f"request's {len(c['rows']) - 1} x {c['k']} models (the originals are shared by the requests) took "
                  f"{c['models_wall_s']:.0f} s wall in all, as timed when each was made. The original's CPU s is "
                  "FedAvg's training. `federated_unlearn` resolved its defaults to "
                  + ", ".join(f"{k} {v}" for k, v in c["unlearn_config"].items()) + ", one masked round"
                  + (f" (calibrate_epochs auto: {c['rounds']} one-epoch calibration rounds, FedAvg's rounds x local "
                     "epochs)." if c["unlearn_config"]["calibrate"] == "head" else "."), ""]
        lines += reading(c) + pagekit.table(["model"] + [t for _, t, _ in COLUMNS] + ["raw at K/2", "cal at K/2"],
                               [[r["method"] if r["kind"] == "method" else f"*{r['method']}*"]
                                + [_fmt(None if (k, r["population"]) == ("speedup_cpu", "original") else r.get(k), kind)
                                   for k, _, kind in COLUMNS] + [spread(r, "raw"), spread(r, "cal")]
                                for r in c["rows"]]) + [""]
    lines += ["## What the numbers mean, and what they do not", "",
              "- AUC 0.5 means the auditor's per-sample likelihood ratio ranks held-out unlearned and held-out "
              "retrained models at chance; the two-halves row shows how close to 0.5 two samples of the *same* "
              "population land with this K (its spread is the noise of the whole table).",
              "- The schedule band is what honest retraining scores when its length differs from the reference's: "
              "an auditor who knows the exact schedule separates even that from the reference, so AUCs inside or "
              "below the band are what retraining itself would show under a schedule mismatch.",
              "- A wide band (the sample request here) means the raw statistic follows the schedule: retraining with "
              "fewer or more rounds moves every sample's confidence, so on that view even honest retraining is far "
              "from 0.5; the calibrated view subtracts each model's own confidence on the class and is the tighter "
              "test.",
              "- The originals and retrained models are cached under keys of data, partition, model, schedule, "
              "request and seed (as the central harness's references); the unlearned models' keys also hold the "
              "library's sources, so a library change remakes them and only them.",
              "- K is small (U-LiRA's Gaussians use a pooled variance over samples because K < 64), there is one "
              f"dataset (digits: 8x8 images, {cells[0]['num_train']} training samples), one architecture (SmallCNN "
              "with BatchNorm), "
              "one partition and one federation size; the numbers say nothing about other data, models, larger "
              "federations or a stronger auditor (one who sees the clients' updates rather than the final model).",
              "- The speed is CPU time of an in-process simulation (clients run one after another, no network): in a "
              "deployment the rounds' latency and bytes count as well (see [Federated (MNIST)](federated_mnist.md)).",
              ""]
    return pagekit.finish(lines)


# -- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=8, help="K: federations per population (>= 6)")
    p.add_argument("--rounds", type=int, default=30, help="FedAvg rounds of one local epoch (original and retraining)")
    p.add_argument("--requests", nargs="+", default=list(REQUESTS), choices=list(REQUESTS))
    p.add_argument("--cache-dir", default=str(ROOT / "outputs" / "federated_population"))
    p.add_argument("--render", action="store_true",
                   help="write docs/benchmarks/federated_population.md from the JSONs only")
    args = p.parse_args(argv)
    if args.members < 6:
        p.error(f"--members must be >= 6 (two halves of >= 3 models each for the calibration row), got {args.members}")
    if args.rounds < 2:
        p.error(f"--rounds must be >= 2 (the half schedule needs at least one round), got {args.rounds}")
    if args.render:
        import render_all

        return render_all.main(["--only", "federated_population"])
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated_population.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    library = library_state()
    train, test = load_digits_datasets(seed=0)
    fdm = FederatedDataModule(train, test, num_clients=CLIENTS, partition="dirichlet", alpha=ALPHA,
                              seed=PARTITION_SEED, batch_size=BATCH)
    fdm.setup("fit")
    template = SmallCNN(lr=LR)
    settings = {"clients": CLIENTS, "partition": "dirichlet", "alpha": ALPHA, "partition_seed": PARTITION_SEED,
                "lr": LR, "batch_size": BATCH, "rounds": args.rounds, "local_epochs": 1, "architecture": "SmallCNN"}
    base = {"data": dataset_fingerprint(train), "partition": [np.asarray(fdm.client_indices(k)).tolist()
                                                              for k in range(CLIENTS)],
            "model": model_description(template), "batch_size": BATCH, "local_epochs": 1}
    members = [Member(i, fdm, Cache(Path(args.cache_dir), template), base, args.rounds) for i in range(args.members)]
    for req in args.requests:
        log = lambda msg: print(f"[federated digits {req}] {msg}", flush=True)  # noqa: E731
        t0 = time.perf_counter()
        res = run_request(req, members, train, test, fdm, args.rounds, library["sources_sha256"], log)
        res.update(command=command, settings=settings, library=library, run_wall_s=time.perf_counter() - t0,
                   machine=f"{platform.machine()} CPU, 1 thread (torch {torch.__version__}), shared 2-core host")
        write_json(res, result_path(req))
        log(f"wrote {result_path(req)} ({res['run_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
