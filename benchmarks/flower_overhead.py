"""Flower vs in-process federation: wall time and bytes per round for the same training and unlearning.

Same federation (3 iid clients), same initial model, schedule and seeds in both engines. Per
round: wall time, the clients' summed local training time and the difference (orchestration);
payload bytes (identical by construction, checked here) and Flower's wire bytes; plus Flower's
one-off start-up (Ray, worker imports, first contact). Writes ``flower_<dataset>.json`` and
``flower_overhead.md`` under ``--out``.

    python benchmarks/flower_overhead.py --datasets digits,mnist --data-root ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import copy
import functools
import platform
import time
from pathlib import Path

import numpy as np
import torch

from flwr.simulation import run_simulation

from lightning_unlearn.federated import FederatedSimulation, federated_unlearn, make_client_app, run_fedavg
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn._io import write_json
from lightning_unlearn.federated import FederatedPartitions
from lightning_unlearn.federated.flower import FedAvgPlan, FlowerRunResult, UnlearnPlan, make_server_app
from lightning_unlearn.mask.arrays import get_arrays, set_arrays
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.request import ForgetRequest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="digits", help="comma-separated: digits, mnist")
    p.add_argument("--data-root", default=None, help="MNIST folder (for mnist)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--train-rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--unlearn-rounds", type=int, default=2)
    p.add_argument("--unlearn-steps", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--workers", default="1", help="comma-separated Flower worker counts (Ray CPUs, 1 CPU per client)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _summary(rows: list[dict]) -> dict[str, float]:
    keys = ("round_s", "local_compute_s", "overhead_s", "bytes_down", "bytes_up")
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    if rows and "wire_down" in rows[0]:
        out.update({k: float(np.mean([r[k] for r in rows])) for k in ("wire_down", "wire_up")})
    return out


def in_process(args, parts: FederatedPartitions, init: torch.nn.Module, model_fn, request: ForgetRequest) -> dict:
    fdm = parts.datamodule()
    sim = FederatedSimulation(fdm, model_fn(), rounds=args.train_rounds, seed=args.seed, progress=False,
                              trainer_kwargs={"max_steps": args.local_steps})
    sim.model.load_state_dict(init.state_dict())
    fed = Federation(sim.clients.grid, len(sim.clients))
    t0 = time.perf_counter()
    fedavg = run_fedavg(sim.model, fed, args.train_rounds, seed=args.seed, progress=False)
    t1 = time.perf_counter()
    sim.request(request)
    result = federated_unlearn(sim.model, fed, request, ratio=args.ratio, rounds=args.unlearn_rounds,
                               max_steps=args.unlearn_steps, seed=args.seed, early_stopping=False)  # fixed rounds
    t2 = time.perf_counter()
    return {"training": _summary(fedavg.history), "unlearning": _summary(result.history),
            "wall_s": {"training": t1 - t0, "unlearning": t2 - t1, "total": t2 - t0},
            "metrics": {"original": sim.evaluate(sim.model), "unlearned": sim.evaluate(result.model)},
            "mask_sha256": result.mask.sha256(), "history": {"training": fedavg.history, "unlearning": result.history}}


def flower(args, parts, init, model_fn, request, workers: int) -> dict:
    """Flower's own simulation engine (Ray, 1 CPU per client, ``workers`` CPUs) running the library's apps."""
    def server_model():
        model = model_fn()
        set_arrays(model, get_arrays(init))
        return model

    t0, res = time.perf_counter(), FlowerRunResult()
    train = FedAvgPlan(rounds=args.train_rounds, seed=args.seed)
    unlearn = UnlearnPlan(request, ratio=args.ratio, rounds=args.unlearn_rounds, max_steps=args.unlearn_steps,
                          seed=args.seed, evaluate=False, early_stopping=False)
    run_simulation(make_server_app(server_model, args.clients, train, unlearn, sink=res),
                   make_client_app(model_fn, parts, trainer_kwargs={"max_steps": args.local_steps}),
                   num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {
                       "num_cpus": workers, "logging_level": "ERROR", "log_to_driver": False}})
    wall = time.perf_counter() - t0
    fdm = parts.datamodule()
    sim = FederatedSimulation(fdm, model_fn(), rounds=1, progress=False)  # evaluation only (the oracle)
    sim.request(request)
    sim.model.load_state_dict({**sim.model.state_dict(), **res.arrays})
    return {"workers": workers, "training": _summary(res.training), "unlearning": _summary(res.unlearning),
            "wall_s": {**res.timings_s, "with_engine_start_stop": wall},
            "metrics": {"unlearned": sim.evaluate(sim.model)}, "mask_sha256": res.mask.sha256(),
            "history": {"training": res.training, "unlearning": res.unlearning}}


TABLE_HEAD = ["| dataset | engine | FedAvg round s | local compute s | overhead s | unlearn round s | overhead s | "
              "payload B/round (FedAvg, unlearn) | wire B/round (FedAvg, unlearn) | start-up s | forget acc |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]


def table_rows(record: dict) -> list[str]:
    """One row per engine of one dataset's record (flower_<dataset>.json)."""
    dataset, ref, lines = record["dataset"], record["in_process"], []
    for name, r in [("in-process", ref)] + [(f"Flower ({f['workers']} worker{'s' if f['workers'] > 1 else ''})", f)
                                         for f in record["flower"]]:
        t, u = r["training"], r["unlearning"]
        wire = f"{t['wire_down'] + t['wire_up']:,.0f}, {u['wire_down'] + u['wire_up']:,.0f}" if "wire_down" in t else "-"
        start = r["wall_s"].get("with_engine_start_stop", 0) - r["wall_s"].get("total", 0) + r["wall_s"].get("connect", 0) \
            if "connect" in r["wall_s"] else 0.0
        lines.append(f"| {dataset} | {name} | {t['round_s']:.2f} | {t['local_compute_s']:.2f} | {t['overhead_s']:.2f} | "
                     f"{u['round_s']:.2f} | {u['overhead_s']:.2f} | {t['bytes_down'] + t['bytes_up']:,.0f}, "
                     f"{u['bytes_down'] + u['bytes_up']:,.0f} | {wire} | {start:.1f} | "
                     f"{r['metrics']['unlearned']['forget_acc']:.3f} |")
    return lines


def render_page(results: Path) -> str:
    """docs/benchmarks/flower_overhead.md from flower_digits.json and flower_mnist.json."""
    import pagekit

    names = ["flower_digits.json", "flower_mnist.json"]
    records = [pagekit.load(results, n) for n in names]
    c = records[0]["config"]
    intro = (f"The same federation in two engines: {c['clients']} iid clients, SmallCNN, the same initial model and "
             f"seeds, {c['train_rounds']} FedAvg rounds of {c['local_steps']} local steps, then forgetting class "
             f"{c['forget_class']} with {c['unlearn_rounds']} masked rounds of {c['unlearn_steps']} steps at ratio "
             f"{c['ratio']}. In-process: the library's own loop; Flower: Flower's `run_simulation` (its simulation "
             "engine on Ray, 1 CPU per client; workers = the CPUs given to Ray) with the library's apps. Means per round; local compute = the "
             "clients' summed time inside their training loops; overhead = round time minus that (orchestration: "
             "serialisation, transport, Trainer set-up; negative when 2 workers train in parallel); start-up = "
             "Flower's one-off cost (Ray start and stop, worker imports, first contact). Payload bytes are identical "
             "in both engines (checked by the script).")
    lines = pagekit.header("Flower vs in-process federation", "flower_overhead.py", names,
                           [f"python benchmarks/flower_overhead.py --datasets {c['datasets']} --data-root "
                            f"../shared/data/mnist --workers {c['workers']}"],
                           [pagekit.machine(r) for r in records], intro)
    lines += TABLE_HEAD + [row for r in records for row in table_rows(r)]
    return pagekit.finish(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    lines = list(TABLE_HEAD)
    for dataset in args.datasets.split(","):
        parts = FederatedPartitions(dataset, args.clients, "iid", seed=args.seed, batch_size=32,
                                    data_root=args.data_root if dataset == "mnist" else None)
        model_fn = functools.partial(SmallCNN, lr=3e-3)
        torch.manual_seed(args.seed)
        init = model_fn()
        request = ForgetRequest(classes=[args.forget_class])
        record = {"config": vars(args), "dataset": dataset, "host": {"cpus": torch.get_num_threads(),
                  "machine": platform.machine(), "python": platform.python_version()}}
        record["in_process"] = ref = in_process(args, parts, copy.deepcopy(init), model_fn, request)
        record["flower"] = []
        for workers in [int(w) for w in args.workers.split(",")]:
            fl = flower(args, parts, copy.deepcopy(init), model_fn, request, workers)
            for phase in ("training", "unlearning"):  # same payload per round in both engines
                assert (fl[phase]["bytes_down"], fl[phase]["bytes_up"]) == (ref[phase]["bytes_down"], ref[phase]["bytes_up"])
            fl["per_round_overhead_vs_in_process_s"] = {
                p: fl[p]["round_s"] - ref[p]["round_s"] for p in ("training", "unlearning")}
            fl["same_mask_as_in_process"] = fl["mask_sha256"] == ref["mask_sha256"]
            record["flower"].append(fl)
        write_json(record, out / f"flower_{dataset}.json")
        lines += table_rows(record)
        print("\n".join(lines))
    (out / "flower_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
