"""Federated remove-then-repair on MNIST (class 3): ours with reset none vs reinit, random channels with each.

Same federation as ``benchmarks/federated_mnist.py`` (10 clients, Dirichlet 0.5, SmallCNN, 8 FedAvg rounds of
25 local steps; a rerun resumes the training checkpoint). Reports forget / remaining / test accuracy, steps to
relearn the class (target: original forget accuracy - 0.05, at most 200 steps; None: not within them), bytes
per masked round and of the statistics round, against federated retraining and a FedAvg round.

    python benchmarks/federated_reset.py --data-root ../shared/data/mnist --rounds 1 --steps 5 --ratio 0.05
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from lightning_unlearn.data import FederatedDataModule, load_mnist
from lightning_unlearn.evidence.evaluate import relearn_steps
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn
from lightning_unlearn._io import write_json
from lightning_unlearn.federated import baselines as B
from lightning_unlearn.federated.runner import fedavg_round_bytes
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.request import ForgetRequest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--checkpoint-dir", default="outputs/federated_mnist")
    p.add_argument("--rounds", type=int, default=1, help="masked unlearning rounds")
    p.add_argument("--steps", type=int, default=5, help="local steps per client per masked round")
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_mnist(args.data_root)
    fdm = FederatedDataModule(train, test, num_clients=10, partition="dirichlet", alpha=0.5, seed=args.seed, batch_size=64)
    fdm.setup("fit")
    torch.manual_seed(args.seed)
    sim = FederatedSimulation(fdm, SmallCNN(lr=3e-3), rounds=8, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
                              trainer_kwargs={"max_steps": 25}, progress=False)
    sim.train(resume=True)
    request = ForgetRequest(classes=[3])
    plan = sim.request(request)
    layers = sim.layers()
    original = sim.evaluate(sim.model)
    target = original["forget_acc"] - 0.05

    def row(model, bytes_=None) -> dict:
        relearn = relearn_steps(copy.deepcopy(model), sim.evaluation_datamodule, target, max_samples=256,
                                max_steps=200, seed=args.seed)
        return {**{k: sim.evaluate(model)[k] for k in ("forget_acc", "remaining_acc", "test_acc")},
                "relearn_steps": relearn, **(bytes_ or {})}

    retrained = B.federated_retrain(sim.model, sim.clients, plan, 8, seed=args.seed, progress=False)
    rows = {"original": row(sim.model), "retrain": row(retrained.model, {"round": retrained.bytes["fedavg_round"]})}
    common = dict(rounds=args.rounds, max_steps=args.steps, seed=args.seed, ratio=args.ratio, max_samples=64)
    for reset in ("none", "reinit"):
        for name, run in (("ours", lambda: federated_unlearn(sim.model, sim.clients, request, reset=reset, **common)),
                          ("random_channels", lambda: B.federated_random_channels(sim.model, sim.clients, plan, layers,
                                                                                   reset=reset, **common))):
            result = run()
            rows[f"{name}/{reset}"] = row(result.model, {"round": result.bytes["unlearning_round"],
                                                         "statistics": result.bytes.get("statistics", 0),
                                                         "fraction": result.mask.fraction})
            print(f"{name}/{reset}: {rows[f'{name}/{reset}']}", flush=True)
    summary = {"config": vars(args), "relearn_target": target, "fedavg_round_bytes": fedavg_round_bytes(sim.model, 10),
               "rows": rows}
    write_json(summary, Path(args.out) / f"federated_reset_r{args.rounds}_s{args.steps}_q{args.ratio}.json")
    print("| method | forget % | remaining % | test % | relearn steps | bytes / round | statistics round |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        kb = lambda v: "-" if v is None else f"{v / 1e3:.1f} kB"  # noqa: E731
        print(f"| {name} | {100 * r['forget_acc']:.2f} | {100 * r['remaining_acc']:.2f} | {100 * r['test_acc']:.2f} | "
              f"{r['relearn_steps'] if r['relearn_steps'] is not None else '> 200'} | {kb(r.get('round'))} | "
              f"{kb(r.get('statistics')) if r.get('statistics') else '-'} |")
    print(f"FedAvg round: {summary['fedavg_round_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
