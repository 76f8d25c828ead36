"""How many masked rounds the federated repair needs, per architecture: one fixed round against the stopping rule.

Digits, 4 clients with a Dirichlet(0.5) label skew, FedAvg for ``--rounds`` rounds of one local epoch; then each
request (a client leaves, a class, 50 random samples) is unlearned with ``federated_unlearn`` at the library's
defaults twice: ``rounds=1`` (the default before the stopping rule) and ``rounds="auto"`` (masked rounds until
the clients' retain accuracy is back within ``stop_tolerance`` of the deployed model's, at most a quarter of the
FedAvg rounds), against federated retraining with the same schedule. The architectures are small user models the
defaults were not tuned on: torch's own TransformerEncoder (Adam), a self-attention model (AdamW with a per-step
OneCycle schedule), an MLP (SGD momentum with a StepLR schedule), a residual network with BatchNorm (SGD momentum
and weight decay), and the library's SmallCNN (Adam). A run whose masked round diverges is recorded with its error.

Writes ``<prefix>.json`` under ``--out`` (the page renders from it).

    python benchmarks/federated_recovery.py
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_unlearn._io import write_json
from lightning_unlearn.callbacks.divergence import DivergenceError
from lightning_unlearn.data.datasets import load_digits_datasets
from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.federated import FederatedSimulation, federated_retrain, federated_unlearn
from lightning_unlearn.models import ClassifierModule, SmallCNN
from lightning_unlearn.request import ForgetRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pagekit import RESULTS, finish, header, load, pct, table  # noqa: E402

NAME = "federated_recovery"


class TorchEncoder(ClassifierModule):
    """torch's ``nn.TransformerEncoder`` over the image's 8 rows as tokens; Adam."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.reshape(len(x), 8, 8))).mean(1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


class Attention(ClassifierModule):
    """One self-attention block with LayerNorms over the 8 rows; AdamW with a per-step OneCycle schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm1 = nn.Linear(8, 32), nn.LayerNorm(32)
        self.attn, self.norm2 = nn.MultiheadAttention(32, 4, batch_first=True), nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.norm1(self.embed(x.reshape(len(x), 8, 8)))
        h = self.norm2(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=3e-3, total_steps=steps), "interval": "step"}}


class MLP(ClassifierModule):
    """Two hidden ReLU layers; SGD with momentum and a StepLR schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)]


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNetBN(ClassifierModule):
    """A stem and two residual blocks with BatchNorm, global average pooling; SGD with momentum and weight decay."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks, self.fc = nn.Sequential(_Block(16), _Block(16)), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


ARCHS = {"torch_encoder": TorchEncoder, "attention_onecycle": Attention, "mlp_steplr": MLP, "resnet_bn": ResNetBN,
         "smallcnn": lambda: SmallCNN(lr=3e-3)}
VARIANTS = {"one round": 1, "stopping rule": "auto"}
DAMAGE_POINTS = 5  # the page names runs that lost more remaining accuracy than this, in points, without an error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--prefix", default=NAME)
    p.add_argument("--rounds", type=int, default=40, help="FedAvg rounds (one local epoch each); retraining too")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--requests", default="client,class,sample")
    p.add_argument("--full-requests-archs", default="torch_encoder,resnet_bn,smallcnn",
                   help="architectures that also run the class and sample requests (the others: client only)")
    return p.parse_args(argv)


def make_request(kind: str, seed: int, n: int) -> ForgetRequest:
    if kind == "client":
        return ForgetRequest(clients=[1])
    if kind == "class":
        return ForgetRequest(classes=[3])
    return ForgetRequest(sample_ids=np.random.default_rng(seed).choice(n, 50, replace=False).tolist())


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    train, test = load_digits_datasets(seed=0)
    full = args.full_requests_archs.split(",")
    cells = []
    for name in args.archs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            fdm = FederatedDataModule(train, test, num_clients=4, partition="dirichlet", alpha=0.5, seed=seed,
                                      batch_size=32)
            sim = FederatedSimulation(fdm, ARCHS[name](), rounds=args.rounds, local_epochs=1, seed=seed,
                                      progress=False)
            t0 = time.perf_counter()
            sim.train()
            train_s = time.perf_counter() - t0
            for kind in args.requests.split(","):
                if kind != "client" and name not in full:
                    continue
                request = make_request(kind, seed, len(train))
                plan = sim.request(request)
                deployed = sim.evaluate(sim.model)
                t0 = time.perf_counter()
                retrained = sim.evaluate(federated_retrain(sim.model, sim.clients, plan, args.rounds, seed=seed,
                                                           progress=False).model)
                cell = {"arch": name, "seed": seed, "request": kind, "deployed": deployed, "retrained": retrained,
                        "train_s": train_s, "retrain_s": time.perf_counter() - t0, "runs": {}}
                for label, rounds in VARIANTS.items():
                    t0 = time.perf_counter()
                    try:
                        res = federated_unlearn(sim.model, sim.clients, request, rounds=rounds,
                                                trained_epochs=args.rounds)
                    except DivergenceError as err:  # reported as it is: the defaults failed on this model
                        cell["runs"][label] = {"error": str(err), "wall_s": time.perf_counter() - t0}
                        continue
                    wall = time.perf_counter() - t0
                    cell["runs"][label] = {"metrics": sim.evaluate(res.model), "wall_s": wall, "bytes": res.bytes,
                                           **{k: res.extra.get(k) for k in ("rounds", "round_cap", "stop_reason",
                                                                            "deployed", "checks")}}
                cells.append(cell)
                print(name, seed, kind, {k: v.get("error") or (round(v["metrics"]["forget_acc"], 3),
                                                               round(v["metrics"]["remaining_acc"], 3), v["rounds"])
                                         for k, v in cell["runs"].items()}, flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"command": " ".join(["python benchmarks/federated_recovery.py", *(argv or sys.argv[1:])]),
              "config": vars(args), "cells": cells, "git_commit": commit,
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, 1 torch thread, torch {torch.__version__}"}
    write_json(record, Path(args.out) / f"{args.prefix}.json")


def summary(cells: list[dict]) -> list[str]:
    """The client requests' gaps, in points: forget accuracy against retraining's, remaining against the deployed
    model's (the repair restores the deployed model's, it cannot know a retrained one's)."""
    ran = [c for c in cells if c["request"] == "client" and not any("error" in r for r in c["runs"].values())]

    def span(run: str, what: str, ref: str) -> str:
        gaps = [100 * (c["runs"][run]["metrics"][what] - c[ref][what]) for c in ran]
        return f"{min(gaps):+.1f} to {max(gaps):+.1f}"

    rounds = [c["runs"]["stopping rule"]["rounds"] for c in ran]
    failed = sorted({f"{c['arch']} {c['request']} (seed {c['seed']})" for c in cells
                     if any("error" in r for r in c["runs"].values())})
    damaged = [f"{c['arch']} {c['request']} (seed {c['seed']}: {pct(rule['metrics']['remaining_acc'])} vs "
               f"{pct(c['deployed']['remaining_acc'])})" for c in cells
               if "error" not in (rule := c["runs"]["stopping rule"])
               and 100 * (c["deployed"]["remaining_acc"] - rule["metrics"]["remaining_acc"]) > DAMAGE_POINTS]
    return [f"Client requests (a dampening reset, then the repair), in points: forget accuracy minus retraining's "
            f"{span('stopping rule', 'forget_acc', 'retrained')} with the stopping rule "
            f"({min(rounds)}-{max(rounds)} rounds), {span('one round', 'forget_acc', 'retrained')} after one round; "
            f"remaining accuracy minus the deployed model's {span('stopping rule', 'remaining_acc', 'deployed')} "
            f"with the rule, {span('one round', 'remaining_acc', 'deployed')} after one round (the runs that "
            "finished). Class and sample requests remove nothing by default: one round either way, no check.", "",
            *([f"**Diverged at the defaults** (a masked round's loss went non-finite; the run stops with the message "
               f"below the table): {', '.join(failed)}.", ""] if failed else []),
            *([f"**Damaged without an error** (remaining accuracy more than {DAMAGE_POINTS} points below the deployed "
               f"model's, stopping rule run): {', '.join(damaged)}.", ""] if damaged else [])]


def render_page(results: Path) -> str:
    rec = load(results, f"{NAME}.json")
    lines = header("Federated repair rounds", f"{NAME}.py", [f"{NAME}.json"], [rec["command"]], [rec["machine"]],
                   __doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`"))
    head = ["model", "request", "seed", "retrained forget / rem. %", "deployed forget / rem. %",
            "one round: forget / rem. %", "kB", "s", "stopping rule: forget / rem. %", "rounds (cap)", "stop", "kB",
            "s"]
    rows, errors = [], []
    pair = lambda m: f"{pct(m['forget_acc'])} / {pct(m['remaining_acc'])}"  # noqa: E731

    def run_cells(run: dict, rule: bool) -> list:
        """accuracies, kB, s; the stopping rule's also rounds (cap) and stop after the accuracies."""
        if "error" in run:
            errors.append(run["error"])
            out, rounds = ["diverged", "-", f"{run['wall_s']:.1f}"], ["-", "-"]
        else:
            out = [pair(run["metrics"]), f"{run['bytes']['total'] / 1e3:.0f}", f"{run['wall_s']:.1f}"]
            rounds = [f"{run['rounds']} ({run['round_cap']})", run["stop_reason"] or "-"]
        return out[:1] + rounds + out[1:] if rule else out

    for c in rec["cells"]:
        rows.append([c["arch"], c["request"], c["seed"], pair(c["retrained"]), pair(c["deployed"]),
                     *run_cells(c["runs"]["one round"], False), *run_cells(c["runs"]["stopping rule"], True)])
    lines += summary(rec["cells"]) + table(head, rows)
    lines += ["", "Forget: accuracy on the forget data (the leaving client's training data, the class's test "
              "samples, the forgotten samples); rem.: remaining test accuracy. kB: the request's bytes in all "
              "(scoring, statistics round, masked rounds, checks; not the head calibration's); s: wall seconds of "
              "`federated_unlearn`. `stop`: `recovered` (retain accuracy back within `stop_tolerance` of the "
              "deployed model's), `plateau`, `round cap`, or `-` when nothing was removed (no reset, a retain-only "
              "repair: one round, no check).", ""]
    if errors:
        lines += ["The divergence messages, as the runs stopped:", "", *sorted({f"- `{e}`" for e in errors}), ""]
    return finish(lines)


if __name__ == "__main__":
    main()
