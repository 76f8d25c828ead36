"""Federated unlearning on MNIST: 10 clients, Dirichlet(0.5), SmallCNN; class, client and sample requests.

Trains the federation once (FedAvg, server checkpoint per round: a rerun resumes), then for
each request runs federated retraining (the reference), our method and the baselines, writes
one JSON per (request, method) under ``--out`` and a markdown table ``federated_mnist.md`` (``--prefix``
names the files). ``--reset`` (default: the library's, ``UnlearnConfig.reset``) is how ours and the other
masked methods remove the selected channels before repairing them; it is recorded in every result.

    python benchmarks/federated_mnist.py --data-root ../shared/data/mnist
    python benchmarks/federated_mnist.py --data-root ../shared/data/mnist --reset none --prefix federated_mnist_none
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data import FederatedDataModule, load_mnist
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn
from lightning_unlearn._io import write_json
from lightning_unlearn.federated import baselines as B
from lightning_unlearn.federated.protocol import HEAD_LR_SCALE
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.reset import RESETS
from lightning_unlearn.request import ForgetRequest

METHODS = ("ours", "head_rows_only", "ours_random_label", "finetune", "random_channels", "cdp", "federaser")
CLASS_ONLY = ("head_rows_only", "ours_random_label")  # controls that only make sense for class requests
RESETTABLE = ("ours", "head_rows_only", "ours_random_label", "random_channels")  # methods that honour --reset
LABELS = {"original": "original", "retrain": "retrain (reference)",
          "ours": "**ours (best default: explained channels + forgotten head row)**",
          "head_rows_only": "control: forgotten head row only", "ours_random_label": "ours, forget-aware (random labels)",
          "finetune": "fine-tune all", "random_channels": "random channels (same ratio + head row)", "cdp": "CDP",
          "federaser": "FedEraser"}


def rounds_arg(value: str) -> int | str:
    """``--unlearn-rounds``: an integer >= 1 or ``auto``."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {value!r}")
    return int(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True, help="folder with the MNIST idx .gz files")
    p.add_argument("--out", default="benchmarks/results", help="where JSONs and the markdown table go")
    p.add_argument("--prefix", default="federated_mnist", help="file names: <prefix>_<request>_<method>.json, ...")
    p.add_argument("--checkpoint-dir", default="outputs/federated_mnist", help="server checkpoints (resume)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=8, help="FedAvg rounds (training and retraining)")
    p.add_argument("--local-steps", type=int, default=25, help="local steps per client per FedAvg round")
    p.add_argument("--lr", type=float, default=3e-3, help="SmallCNN Adam learning rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--store-every", type=int, default=2, help="FedEraser: store client updates every n rounds")
    p.add_argument("--ratio", type=float, default=0.05, help="fraction of channels per layer to update")
    p.add_argument("--method", default="grad_x_act", help="channel scoring method")
    p.add_argument("--unlearn-rounds", type=rounds_arg, default=1,
                   help="masked rounds of ours (under early stopping their cap; 'auto': a share of FedAvg's rounds); "
                        "the baselines run this many, one round for 'auto'")
    p.add_argument("--unlearn-steps", type=steps, default=5,
                   help="local steps per client per unlearning round; 'auto': the library's federated budget "
                        "(one local epoch per client and round)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="learning-rate multiplier of the masked rounds")
    p.add_argument("--head-lr-scale", type=float, default=HEAD_LR_SCALE,
                   help="learning-rate multiplier of the forgotten classes' head rows (class requests)")
    p.add_argument("--objective", default="auto", help="objective of ours and random channels")
    p.add_argument("--reset", choices=("auto", *RESETS), default=UnlearnConfig().reset,
                   help="remove the selected channels before the masked rounds (ours, its controls, random channels); "
                        "auto: the library's default for the request")
    p.add_argument("--calibrate", default="auto", choices=("auto", "head", "none"),
                   help="head calibration of ours and its controls (auto: head on class requests)")
    p.add_argument("--calibrate-epochs", type=steps, default="auto",
                   help="rounds of the head calibration (one local epoch each); 'auto': FedAvg rounds x local epochs")
    p.add_argument("--score-samples", type=int, default=64, help="forget samples scored per client (at most)")
    p.add_argument("--forget-client", type=int, default=3)
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--sample-fraction", type=float, default=0.01, help="sample request: this fraction of the training set")
    p.add_argument("--requests", default="class,client,sample")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated; NAME@RESET runs a masked method with another reset than --reset "
                        "(e.g. ours,ours@none,random_channels)")
    p.add_argument("--train-only", action="store_true", help="only train (and checkpoint) the federation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    try:
        for spec in args.methods.split(","):
            method_spec(spec)  # fail before any training on an unknown method or reset
    except ValueError as err:
        p.error(str(err))
    return args


def method_spec(spec: str) -> tuple[str, str | None]:
    """``"ours"`` -> ("ours", None); ``"ours@none"`` -> ("ours", "none"): the method and its reset override."""
    name, _, reset = spec.partition("@")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed methods are {list(METHODS)}")
    if reset and (reset not in RESETS or name not in RESETTABLE):
        raise ValueError(f"method spec {spec!r}: a reset override must be one of {list(RESETS)} "
                         f"on one of {list(RESETTABLE)}")
    return name, reset or None


def steps(value: str) -> int | str:
    """``--unlearn-steps``: an integer >= 1 or ``"auto"``."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {value!r}")
    return int(value)


def make_request(kind: str, args, n_train: int) -> ForgetRequest:
    if kind == "class":
        return ForgetRequest(classes=[args.forget_class])
    if kind == "client":
        return ForgetRequest(clients=[args.forget_client])
    if kind == "sample":
        rng = np.random.default_rng(args.seed)
        return ForgetRequest(sample_ids=rng.choice(n_train, int(args.sample_fraction * n_train), replace=False).tolist())
    raise ValueError(f"unknown request kind {kind!r}; allowed are ['class', 'client', 'sample']")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train, test = load_mnist(args.data_root)
    fdm = FederatedDataModule(train, test, num_clients=args.clients, partition="dirichlet", alpha=args.alpha,
                              seed=args.seed, batch_size=args.batch_size)
    fdm.setup("fit")
    print(fdm.summary_table())
    fdm.plot_partition(out / f"{args.prefix}_partition.png")
    torch.manual_seed(args.seed)
    sim = FederatedSimulation(
        fdm, SmallCNN(lr=args.lr), rounds=args.rounds, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
        store_every=args.store_every, trainer_kwargs={"max_steps": args.local_steps},
    )
    training = sim.train(resume=True)
    print(f"FedAvg: test acc {training.history[-1].get('test_acc', float('nan')):.4f}, "
          f"orchestration overhead {training.overhead_fraction:.1%} of local compute")
    if args.train_only:
        return
    layers = sim.layers()
    head = [n for n, i in layers.items() if i.is_head]
    fixed = 1 if args.unlearn_rounds == "auto" else args.unlearn_rounds  # the baselines' rounds: no stopping rule
    common = dict(rounds=fixed, max_steps=args.unlearn_steps, seed=args.seed)
    # the baselines outside UnlearnConfig take a step count; None = their one local epoch, as "auto" for ours
    baseline = dict(common, max_steps=None if args.unlearn_steps == "auto" else args.unlearn_steps)
    rates = dict(lr_scale=args.lr_scale, head_lr_scale=args.head_lr_scale)

    def ours(req, plan, reset, layers_=None, objective=args.objective):
        return federated_unlearn(sim.model, sim.clients, req, method=args.method, ratio=args.ratio, objective=objective,
                                 layers=layers_, max_samples=args.score_samples, reset=reset, calibrate=args.calibrate,
                                 calibrate_epochs=args.calibrate_epochs,
                                 trained_epochs=args.rounds * sim.local_epochs, **rates,
                                 **dict(common, rounds=args.unlearn_rounds))

    runners = {
        "ours": ours,
        "head_rows_only": lambda req, plan, reset: ours(req, plan, reset, layers_=head),
        "ours_random_label": lambda req, plan, reset: ours(req, plan, reset, objective="random_label"),
        "finetune": lambda req, plan, reset: B.federated_finetune(sim.model, sim.clients, plan, layers, **baseline),
        "random_channels": lambda req, plan, reset: B.federated_random_channels(
            sim.model, sim.clients, plan, layers, ratio=args.ratio, objective=args.objective, reset=reset,
            **rates, **common),
        "cdp": lambda req, plan, reset: B.federated_cdp(sim.model, sim.clients, plan, layers, args.ratio,
                                                        max_samples=args.score_samples, **baseline),
        "federaser": lambda req, plan, reset: B.federated_eraser(sim.model, sim.clients, plan, training.store,
                                                                  local_steps=args.local_steps, seed=args.seed),
    }
    summary = {"config": vars(args), "training": {"wall_s": training.wall_s, "history": training.history,
                                                   "overhead_fraction": training.overhead_fraction}, "requests": {}}
    for kind in args.requests.split(","):
        request = make_request(kind, args, len(train))
        plan = sim.request(request)
        original = sim.evaluate(sim.model)
        retrained = B.federated_retrain(sim.model, sim.clients, plan, args.rounds, seed=args.seed)
        retrained_metrics = sim.evaluate(retrained.model)
        rows = {"original": _row(original, None, training.bytes_per_round, training.wall_s, None),
                "retrain": _row(retrained_metrics, 1.0, retrained.bytes["fedavg_round"], retrained.timings_s["retrain"], 1.0)}
        relearn_target = original["forget_acc"] - RELEARN_TOLERANCE
        rows["retrain"]["relearn_steps"] = relearn(retrained.model, sim, relearn_target, args.seed)
        for spec in args.methods.split(","):
            name, reset = method_spec(spec)
            if name in CLASS_ONLY and kind != "class":
                continue  # no head rows to isolate; the forget-aware variant is studied separately there
            method = name if reset in (None, args.reset) else f"{name}_reset_{reset}"
            result = runners[name](request, plan, reset or args.reset)
            record = sim.report(result, original, retrained, retrained_metrics)
            record["timings_s"].update({k: v for k, v in result.timings_s.items() if k not in record["timings_s"]})
            write_json(record, out / f"{args.prefix}_{kind}_{method}.json")
            rows[method] = _row(record["metrics"]["unlearned"], record["mask"]["fraction"],
                                record["bytes"]["unlearning_round"], record["timings_s"]["total"],
                                record["speedup_vs_retrain"], record)
            rows[method]["relearn_steps"] = record["relearn_steps"] = relearn(result.model, sim, relearn_target, args.seed)
            rows[method]["calibration_bytes"] = record["bytes"].get("calibration")
            write_json(record, out / f"{args.prefix}_{kind}_{method}.json")
            print(f"[{kind}] {method}: {rows[method]}")
        summary["requests"][kind] = {"request": request.to_dict() if kind != "sample" else
                                     {"kind": "sample", "count": len(request.sample_ids)}, "rows": rows,
                                     "fedavg_round_bytes": training.bytes_per_round}
    write_json(summary, out / f"{args.prefix}_summary.json")
    (out / f"{args.prefix}.md").write_text(markdown(summary))
    print(markdown(summary))


RELEARN_TOLERANCE = 0.02  # relearned: forget accuracy back within 2 points of the original's (the demo's rule)
RELEARN_SAMPLES = 1000  # forget samples the relearning mixes in (a seeded subsample)


def relearn(model, sim, target: float, seed: int) -> int | None:
    """Relearn steps (:func:`~lightning_unlearn.evidence.evaluate.relearn_steps`, central evaluation by the
    benchmark: the server never runs it) until the forget accuracy reaches ``target``; None: not within 200 steps."""
    from lightning_unlearn.evidence.evaluate import relearn_steps

    if target <= 0:
        return None
    return relearn_steps(model, sim.evaluation_datamodule, target, max_samples=RELEARN_SAMPLES, seed=seed)


def _row(metrics, fraction, bytes_round, wall, speedup, record=None) -> dict:
    row = {k: metrics.get(k) for k in ("forget_acc", "remaining_acc", "test_acc")}
    row.update({"params_updated": fraction, "bytes_round": bytes_round, "wall_s": wall, "speedup": speedup})
    if record is not None:
        row["storage_bytes"] = record["extra"].get("storage_bytes")
        row["statistics_bytes"] = record["bytes"].get("statistics")
        row.update(rounds=record["extra"].get("rounds"), bytes_total=record["bytes"].get("total"))
    return row


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _bytes(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB"


def markdown(summary: dict) -> str:
    lines = []
    for kind, block in summary["requests"].items():
        rows = block["rows"]
        reset = summary["config"].get("reset", "none")
        lines += [f"#### {kind}-level request: `{json.dumps(block['request'])}` (reset: {reset})", "",
                  "| method | forget acc % | remaining acc % | test acc % | relearn steps | % params updated | "
                  "bytes / round | wall s | speedup vs retrain |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            speed = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
            note = f" (+{_bytes(r['storage_bytes'])} stored)" if r.get("storage_bytes") else ""
            note += f" (+{_bytes(r['statistics_bytes'])} statistics round)" if r.get("statistics_bytes") else ""
            note += f" (+{_bytes(r['calibration_bytes'])} head calibration)" if r.get("calibration_bytes") else ""
            relearned = r.get("relearn_steps", "-")
            relearned = ">200" if relearned is None else relearned
            lines.append(f"| {label(name)} | {_pct(r['forget_acc'])} | {_pct(r['remaining_acc'])} | "
                         f"{_pct(r['test_acc'])} | {relearned} | {_pct(r['params_updated'])} | "
                         f"{_bytes(r['bytes_round'])}{note} | "
                         f"{r['wall_s']:.1f} | {speed} |")
        if "ours" in rows:
            lines += ["", targets_line(rows, block["fedavg_round_bytes"])]
        lines.append("")
    return "\n".join(lines)


def label(name: str) -> str:
    """The table label of a row name (``ours_reset_none``: ours with the reset overridden)."""
    base, _, reset = name.partition("_reset_")
    return f"{LABELS.get(base, base)}, reset {reset}" if reset else LABELS.get(name, name)


def targets_line(rows: dict, fedavg_round: float) -> str:
    ours, ref = rows["ours"], rows["retrain"]
    checks = {
        "forget within 1 pt of retrain": abs(ours["forget_acc"] - ref["forget_acc"]) <= 0.01,
        "remaining within 1 pt of retrain": abs(ours["remaining_acc"] - ref["remaining_acc"]) <= 0.01,
        ">= 20x faster than retrain": (ours["speedup"] or 0) >= 20,
        "<= 10% of a FedAvg round's bytes": ours["bytes_round"] <= 0.10 * fedavg_round,
    }
    if "relearn_steps" in ours and "relearn_steps" in ref:  # None: not relearned within the 200 steps
        steps = [math.inf if r["relearn_steps"] is None else r["relearn_steps"] for r in (ours, ref)]
        checks["relearn steps >= retrain's"] = steps[0] >= steps[1]
    gap = 100 * (ours["forget_acc"] - ref["forget_acc"])
    side = "equal to" if abs(gap) < 0.005 else ("above (under-forgetting)" if gap > 0 else "below (over-forgetting)")
    return ("Targets for ours: " + "; ".join(f"{k}: {'met' if v else '**missed**'}" for k, v in checks.items())
            + f". Forget accuracy {side} the retrained model's ({gap:+.2f} pts).")


PAGE_SUMMARIES = [  # (summary file, heading); the current defaults first
    ("federated_calibration_summary.json", "Class and client requests at the current defaults (class: head "
                                           "calibration, no reset; client: dampen)"),
    ("federated_calibration_before_summary.json", "Class request at the previous class default (dampen, no "
                                                  "calibration)"),
    *((f"federated_reset_seed{s}_summary.json", f"Client and sample requests, reset dampen, none and reinit, seed {s} "
       "(client requests keep dampen, sample requests take none)") for s in range(3)),
    ("federated_requests_dampen_summary.json", "Client and sample requests with reset dampen (the sample default "
                                              "before the three-seed comparison above)"),
    ("federated_requests_summary.json", "Client and sample requests: reset reinit vs none, explained vs random channels"),
    ("federated_requests_epoch_summary.json", "Client and sample requests with an automatic step budget"),
    ("federated_mnist_summary.json", "Every method, class, client and sample requests at the current defaults "
                                     "(each method on the same federation, one after another)"),
]


def _command(config: dict) -> str:
    """The command line that reproduces a summary, from the configuration it records."""
    parts = ["python benchmarks/federated_mnist.py --data-root ../shared/data/mnist"]
    for key in ("seed", "prefix", "reset", "requests", "methods", "unlearn_steps", "calibrate", "calibrate_epochs"):
        if key in config and str(config[key]) != str(PAGE_DEFAULTS.get(key)):
            parts.append(f"--{key.replace('_', '-')} {config[key]}")
    return " ".join(parts)


PAGE_DEFAULTS = {"seed": 0, "prefix": "federated_mnist", "unlearn_steps": 5, "calibrate": "auto", "calibrate_epochs": "auto"}


def render_page(results: Path) -> str:
    """docs/benchmarks/federated_mnist.md from the summaries of PAGE_SUMMARIES and the command-line run's record."""
    import pagekit

    records = {name: pagekit.load(results, name) for name, _ in PAGE_SUMMARIES}
    cli = pagekit.load(results, "federated_requests_cli_digits.json")
    first = records["federated_mnist_summary.json"]["config"]
    intro = (f"MNIST, {first['clients']} clients, Dirichlet({first['alpha']}) partition, SmallCNN, "
             f"{first['rounds']} FedAvg rounds of {first['local_steps']} local steps (lr {first['lr']}); "
             f"explained channels ({first['method']}, ratio {first['ratio']} per layer); requests: class "
             f"{first['forget_class']}, client {first['forget_client']}, a random {100 * first['sample_fraction']:g}% "
             "of the training samples. Retraining the federation without the forgotten data is the reference "
             "(speed-up = its wall time / the method's). The per-(request, method) JSONs beside each summary hold "
             "the masks, timings and histories. Targets: forget and remaining accuracy within 1 point of retraining, "
             "20x faster than retraining, a masked round under 10% of a FedAvg round's bytes.")
    commands = [_command(r["config"]) for r in records.values()] + [c for c in cli["commands"]]
    lines = pagekit.header("Federated unlearning (MNIST)", "federated_mnist.py",
                           [*records, "federated_requests_cli_digits.json"], commands,
                           [f"{r['config'].get('threads', 1)} torch thread; cores not recorded" for r in records.values()]
                           + [pagekit.machine(cli)], intro)
    for name, title in PAGE_SUMMARIES:
        rec = records[name]
        lines += [f"## {title}", "", f"`{_command(rec['config'])}` (`{name}`; unlearning: "
                  f"{rec['config']['unlearn_rounds']} masked round(s) of {rec['config']['unlearn_steps']} steps).", ""]
        lines += markdown(rec).replace("#### ", "### ").splitlines() + [""]
    lines += ["## From the command line (digits, one client leaves)", "",
              "`configs/digits_fed.yaml` (5 clients, Dirichlet 0.5, client 1 leaves) through `lightning-unlearn fit / "
              f"unlearn / evaluate` at commit {cli['commit']}, with reset reinit (then the default) and none; no file "
              "records this run at the current default (dampen). Forget = accuracy on the leaving client's "
              "training data.", ""]
    rows = []
    for reset, run in cli["runs"].items():
        m, rl, b = run["metrics"], run["relearn_steps"], run["bytes_moved"]
        for model in ("original", "unlearned", "retrained"):
            steps = {"unlearned": rl.get("relearn_steps_unlearned"), "retrained": rl.get("relearn_steps_retrained")}
            rows.append([reset if model == "unlearned" else "", model, pagekit.pct(m[model]["forget_acc"]),
                         pagekit.pct(m[model]["remaining_acc"]), pagekit.pct(m[model]["test_acc"]),
                         steps.get(model, "-") if steps.get(model) is not None else "-",
                         f"{b['unlearning_round'] / 1e3:.1f} kB" if model == "unlearned" else "-"])
    lines += pagekit.table(["reset", "model", "forget % (leaving client's data)", "remaining %", "test %",
                            "relearn steps", "bytes / masked round"], rows)
    return pagekit.finish(lines)


if __name__ == "__main__":
    main()
