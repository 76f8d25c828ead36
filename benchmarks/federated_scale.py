"""Federated scale in simulation: 100 clients with 10 sampled per round vs 10 clients all sampled.

Both federations split the same data (a 10,000-image MNIST subset, or digits) with a Dirichlet
0.1 partition and train SmallCNN with the library's in-process loop (``make_clients`` +
``run_fedavg``); then the same class request is unlearned with ``federated_unlearn``. Measured:

* memory: the clients' model objects and distinct parameter storages (``make_clients`` gives every
  client one shared working model), RSS and tracemalloc (Python and numpy allocations; torch's
  own allocator is invisible to it) before/after building the clients (tracing only then: it slows
  every allocation, so the timed rounds run without it) and the RSS peak over the first request;
* per round: wall time split into the clients' local compute (inside Lightning's training loop)
  and everything else (orchestration: Trainer set-up, message building and checks, aggregation);
  per client: ms of orchestration and bytes moved;
* the unlearning rounds with the setting's client sampling (``federated_unlearn(fraction=...)``:
  each masked round calls a seeded ``fraction`` of the clients), ``reset="none"``; with 100 clients
  also every client per masked round (fraction 1.0, the protocol before sampling) for comparison;
* the rounds that still ask every client: scoring, and the BatchNorm statistics round after a reset
  (a second ``federated_unlearn`` with ``reset="reinit"`` at the setting's fraction).

Writes ``federated_scale.json`` and ``federated_scale.md`` under ``--out``.

    python benchmarks/federated_scale.py --data-root /work/shared/data/mnist
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from lightning_unlearn._io import write_json
from lightning_unlearn.data import FederatedDataModule, load_digits_datasets, load_mnist
from lightning_unlearn.federated import federated_unlearn, make_clients, run_fedavg
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.federated.messages import tensor_bytes
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.request import ForgetRequest

SETTINGS = (("100 clients, 10 sampled", 100, 0.1), ("10 clients, all sampled", 10, 1.0))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    p.add_argument("--data-root", default="/work/shared/data/mnist", help="folder with the MNIST idx .gz files")
    p.add_argument("--train-size", type=int, default=10_000, help="first N MNIST training images")
    p.add_argument("--test-size", type=int, default=2_000)
    p.add_argument("--rounds", type=int, default=5, help="FedAvg rounds")
    p.add_argument("--local-steps", type=int, default=10, help="optimizer steps per sampled client and round")
    p.add_argument("--unlearn-rounds", type=int, default=2)
    p.add_argument("--unlearn-steps", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--min-client-samples", type=int, default=5,
                   help="Dirichlet redraws until each client holds this many (10 is not reachable for 100 clients, "
                        "alpha 0.1 and 10k images)")
    p.add_argument("--no-all-clients", action="store_true",
                   help="skip the fraction-1.0 unlearning run of the sampled setting (the slowest part)")
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def datasets(args):
    if args.data == "digits":
        return load_digits_datasets(seed=0)
    train, test = load_mnist(args.data_root)
    return Subset(train, range(args.train_size)), Subset(test, range(args.test_size))


def one_setting(name: str, num_clients: int, fraction: float, train, test, args) -> dict:
    gc.collect()
    fdm = FederatedDataModule(train, test, num_clients=num_clients, partition="dirichlet", alpha=args.alpha, seed=0,
                              batch_size=32, min_client_samples=args.min_client_samples)
    fdm.setup("fit")
    torch.manual_seed(0)
    model = SmallCNN()
    model_bytes = tensor_bytes(model.state_dict())
    tracemalloc.start()
    rss0, py0 = rss_bytes(), tracemalloc.get_traced_memory()[0]
    clients = make_clients(fdm, model)
    rss1, (py1, py_peak) = rss_bytes(), tracemalloc.get_traced_memory()
    tracemalloc.stop()  # tracing slows every Python allocation: the timed rounds below run without it
    storages = {p.untyped_storage().data_ptr() for c in clients for p in c.model.parameters()}
    models = {id(c.model) for c in clients}
    federation = Federation(clients.grid, len(clients))
    t0 = time.perf_counter()
    fed = run_fedavg(model, federation, args.rounds, fraction=fraction, seed=0, progress=False,
                     local_config={"max_steps": args.local_steps})
    train_s = time.perf_counter() - t0
    request = ForgetRequest(classes=[3])
    fdm.forget_plan(request)  # fails fast on a request that does not fit; each client resolves its own split

    def unlearn(unlearn_fraction: float, reset: str):
        return federated_unlearn(model, federation, request, rounds=args.unlearn_rounds,
                                 fraction=unlearn_fraction, max_steps=args.unlearn_steps, ratio=0.1, seed=0, reset=reset,
                                 early_stopping=False)  # exactly --unlearn-rounds rounds: their cost is measured

    result = unlearn(fraction, "none")
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reinit = unlearn(fraction, "reinit")
    everyone = unlearn(1.0, "none") if fraction < 1 and not args.no_all_clients else None

    def per_round(rows, clients_of) -> dict:
        n = [clients_of(r) for r in rows]
        over = [r["overhead_s"] for r in rows]
        return {"rounds": len(rows), "clients_per_round": float(np.mean(n)),
                "round_s": float(np.mean([r["round_s"] for r in rows])),
                "local_compute_s": float(np.mean([r["local_compute_s"] for r in rows])),
                "overhead_s": float(np.mean(over)),
                "overhead_ms_per_client": float(np.mean([1000 * o / k for o, k in zip(over, n)])),
                "bytes_per_round": float(np.mean([r["bytes_down"] + r["bytes_up"] for r in rows])),
                "bytes_per_client": float(np.mean([(r["bytes_down"] + r["bytes_up"]) / k for r, k in zip(rows, n)]))}

    def called(row) -> int:  # clients the masked round called (some may hold no retain data and not reply)
        return len(row["sampled"]) if "sampled" in row else num_clients

    def unlearning(res) -> dict:
        return {**per_round(res.history, called), "fraction": res.extra["fraction"],
                "replies_per_round": float(np.mean([r["clients"] for r in res.history])),
                "scoring_s": res.timings_s["scoring"], "scoring_bytes": res.bytes["scoring"],
                "mask_sha256": res.mask.sha256()}

    sizes = [len(fdm.client_indices(k)) for k in range(num_clients)]
    return {
        "setting": name, "num_clients": num_clients, "fraction": fraction,
        "client_samples": {"min": int(min(sizes)), "median": float(np.median(sizes)), "max": int(max(sizes))},
        "model_bytes": model_bytes, "distinct_models": len(models), "distinct_parameter_storages": len(storages),
        "parameters_per_model": sum(1 for _ in model.parameters()),
        "rss_clients_bytes": rss1 - rss0, "tracemalloc_clients_bytes": py1 - py0,
        "rss_clients_bytes_per_client": (rss1 - rss0) / num_clients,
        "tracemalloc_clients_bytes_per_client": (py1 - py0) / num_clients,
        "tracemalloc_clients_peak_bytes": py_peak, "rss_peak_bytes": rss_peak, "train_s": train_s,
        "fedavg": per_round(fed.history, lambda r: len(r["clients"])),
        "unlearning": unlearning(result),
        "unlearning_all_clients": unlearning(everyone) if everyone is not None else None,
        "unlearning_reinit": {**unlearning(reinit), "statistics_round_s": reinit.timings_s["reset"],
                              "statistics_bytes": reinit.bytes.get("statistics", 0)},
        "scoring_s": result.timings_s["scoring"], "scoring_bytes": result.bytes["scoring"],
        "forget_acc_note": "not measured here (see federated_mnist.py); this benchmark measures cost",
    }


def table(results: list[dict]) -> str:
    lines = ["| setting | client samples (min/median/max) | models held (distinct storages) | RSS for the clients, MB (per client, KB) | "
             "FedAvg round s | local compute s | orchestration s | orchestration ms / client | MB / round | KB / client |"
             " unlearning round s (clients) | unlearning orchestration ms / client | scoring s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, u, s = r["fedavg"], r["unlearning"], r["client_samples"]
        lines.append(
            f"| {r['setting']} | {s['min']}/{s['median']:.0f}/{s['max']} | {r['distinct_models']} "
            f"({r['distinct_parameter_storages']} for {r['parameters_per_model']} parameters) | "
            f"{r['rss_clients_bytes'] / 2**20:.1f} ({r['rss_clients_bytes_per_client'] / 1024:.1f}) | "
            f"{f['round_s']:.2f} | {f['local_compute_s']:.2f} | {f['overhead_s']:.2f} | {f['overhead_ms_per_client']:.0f} | "
            f"{f['bytes_per_round'] / 2**20:.2f} | {f['bytes_per_client'] / 1024:.0f} | "
            f"{u['round_s']:.2f} ({u['clients_per_round']:.0f}) | {u['overhead_ms_per_client']:.0f} | {r['scoring_s']:.2f} |")
    return "\n".join(lines) + "\n"


def unlearning_table(results: list[dict]) -> str:
    """One row per unlearning run: the masked rounds, and the all-client scoring (and statistics) rounds."""
    lines = ["| setting | unlearning run | clients called per masked round (replies) | masked round s | local compute s | "
             "orchestration s | orchestration ms / called client | KB / masked round | KB / called client | "
             "scoring round s (KB) | statistics round s (KB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = (("unlearning", "reset none"), ("unlearning_all_clients", "reset none, every client"),
            ("unlearning_reinit", "reset reinit"))
    for r in results:
        for key, label in runs:
            u = r.get(key)
            if u is None:
                continue
            stats = (f"{u['statistics_round_s']:.2f} ({u['statistics_bytes'] / 1024:.0f})"
                     if "statistics_round_s" in u else "-")
            lines.append(
                f"| {r['setting']} | {label}, fraction {u['fraction']:g} | {u['clients_per_round']:.0f} "
                f"({u['replies_per_round']:.0f}) | {u['round_s']:.2f} | {u['local_compute_s']:.2f} | "
                f"{u['overhead_s']:.2f} | {u['overhead_ms_per_client']:.0f} | {u['bytes_per_round'] / 1024:.0f} | "
                f"{u['bytes_per_client'] / 1024:.1f} | {u['scoring_s']:.2f} ({u['scoring_bytes'] / 1024:.1f}) | {stats} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    train, test = datasets(args)
    results = [one_setting(name, n, frac, train, test, args) for name, n, frac in SETTINGS]
    out = Path(args.out)
    record = {"config": vars(args), "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                                            "torch_threads": torch.get_num_threads()}, "results": results}
    write_json(record, out / "federated_scale.json")
    md = table(results) + "\n" + unlearning_table(results)
    (out / "federated_scale.md").write_text(md)
    print(md)


def render_page(results: Path) -> str:
    """docs/benchmarks/federated_scale.md from federated_scale.json."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pagekit

    rec = pagekit.load(results, "federated_scale.json")
    c = rec["config"]
    intro = (f"In-process simulation (`make_clients` + `run_fedavg`, then `federated_unlearn` for class 3): the first "
             f"{c['train_size']:,} {c['data'].upper() if c['data'] == 'mnist' else c['data']} training images split "
             f"with a Dirichlet {c['alpha']} partition (each client at least {c['min_client_samples']} images), "
             f"SmallCNN. FedAvg: {c['rounds']} rounds of at most {c['local_steps']} local steps per sampled client. "
             f"Unlearning: {c['unlearn_rounds']} masked rounds of at most {c['unlearn_steps']} steps, run from the same "
             "model with the setting's client sampling, with every client, and with `reset=\"reinit\"` (adds the "
             "BatchNorm statistics round, which asks every client). Orchestration = round time minus the clients' "
             "summed local compute.")
    lines = pagekit.header("Federated scale: 100 clients", "federated_scale.py", ["federated_scale.json"],
                           [f"python benchmarks/federated_scale.py --data-root ../shared/data/mnist"],
                           [pagekit.machine(rec)], intro)
    lines += ["## Training rounds", "", *table(rec["results"]).splitlines(), "",
              "## Unlearning runs", "", *unlearning_table(rec["results"]).splitlines()]
    return pagekit.finish(lines)


if __name__ == "__main__":
    main()
