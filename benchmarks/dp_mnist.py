"""DP-SGD or unlearning? Federated MNIST, class- and sample-level requests, with the same evidence for both.

Rows per request: the non-DP original; non-DP + our unlearning; retraining without the forget
data (the reference); per-client DP-SGD at each epsilon without unlearning; DP + our unlearning.
Columns: test / forget accuracy, MIA-efficacy (with its shadow classifier's accuracy), loss-attack
AUC on the forget data, training and unlearning time. Writes ``dp_mnist.json``, ``dp_mnist.md``
and ``dp_mnist_utility_vs_mia.png`` under ``--out``.

    python benchmarks/dp_mnist.py --data-root ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_unlearn.data import FederatedDataModule, UnlearningDataModule, load_mnist
from lightning_unlearn.evidence import evaluate_model
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn
from lightning_unlearn._io import write_json
from lightning_unlearn.federated import baselines as B
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.privacy import attach_client_dp, make_dp_compatible
from lightning_unlearn.request import ForgetRequest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True, help="folder with the MNIST idx .gz files")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--train-samples", type=int, default=20_000, help="seeded MNIST training subsample (CPU budget)")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    p.add_argument("--rounds", type=int, default=6, help="FedAvg rounds (training, DP training and retraining)")
    p.add_argument("--local-steps", type=int, default=20, help="local steps per client per round")
    p.add_argument("--batch-size", type=int, default=64, help="(expected, under Poisson sampling) batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="SmallCNN Adam learning rate (DP and non-DP alike)")
    p.add_argument("--epsilons", default="1,3,8", help="per-client target epsilons of the DP runs")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ratio", type=float, default=0.05, help="ours: fraction of channels per layer to update")
    p.add_argument("--unlearn-steps", type=int, default=5, help="ours: local steps per client in the masked round")
    p.add_argument("--lr-scale", type=float, default=10.0, help="ours: lr multiplier of class-level masked rounds")
    p.add_argument("--score-samples", type=int, default=64, help="ours: forget samples scored per client")
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--sample-fraction", type=float, default=0.01, help="sample request: this fraction of the training set")
    p.add_argument("--eval-samples", type=int, default=1000, help="cap per split for MIA and the loss attack")
    p.add_argument("--requests", default="class,sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--render-only", action="store_true", help="re-render the table and plot from dp_mnist.json")
    p.add_argument("--timing", type=int, default=0, metavar="REPS",
                   help="only measure the cost of a DP-SGD local fit vs a plain one, interleaved REPS times")
    return p.parse_args(argv)


def subsample(dataset: TensorDataset, n: int, seed: int) -> TensorDataset:
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return TensorDataset(*(t[idx] for t in dataset.tensors))


def make_request(kind: str, args, n_train: int) -> ForgetRequest:
    if kind == "class":
        return ForgetRequest(classes=[args.forget_class])
    rng = np.random.default_rng(args.seed)
    return ForgetRequest(sample_ids=rng.choice(n_train, int(args.sample_fraction * n_train), replace=False).tolist())


class Bench:
    """The shared data and schedule; builds, trains and evaluates federations."""

    def __init__(self, args) -> None:
        self.args = args
        train, test = load_mnist(args.data_root)
        self.train = subsample(train, args.train_samples, args.seed)
        self.fdm = FederatedDataModule(self.train, test, num_clients=args.clients, partition="dirichlet",
                                       alpha=args.alpha, seed=args.seed, batch_size=args.batch_size)
        self.fdm.setup("fit")
        self.steps = {"max_steps": args.local_steps}

    def model(self, dp: bool) -> SmallCNN:
        torch.manual_seed(self.args.seed)
        model = SmallCNN(lr=self.args.lr)
        if dp:
            make_dp_compatible(model)  # BatchNorm -> GroupNorm, before the server copies the model
        return model

    def federation(self, epsilon: float | None):
        sim = FederatedSimulation(self.fdm, self.model(epsilon is not None), rounds=self.args.rounds,
                                  seed=self.args.seed, trainer_kwargs=self.steps, progress=False)
        privacy = None
        if epsilon is not None:
            # budget: every local step of training plus the masked unlearning round of each request
            planned = self.args.rounds * self.args.local_steps + self.args.unlearn_steps * len(self.args.requests.split(","))
            privacy = attach_client_dp(sim.clients, target_epsilon=epsilon, steps=planned, delta=self.args.delta,
                                       max_grad_norm=self.args.max_grad_norm)
        torch.manual_seed(self.args.seed)
        sim.train()
        return sim, privacy

    def eval_dm(self, request: ForgetRequest, plan) -> UnlearningDataModule:
        return UnlearningDataModule(self.fdm.train_dataset, self.fdm.test_dataset, request, batch_size=512,
                                    seed=self.args.seed, num_classes=self.fdm.num_classes,
                                    forget_indices=plan.forget_indices)

    def evaluate(self, model, dm: UnlearningDataModule) -> dict[str, Any]:
        m = evaluate_model(model, dm, seed=self.args.seed, max_samples=self.args.eval_samples, probe=False)
        return {k: m[k] for k in ("test_acc", "forget_acc", "remaining_acc", "mia_efficacy", "mia_shadow_acc",
                                  "mia_informative", "loss_auc")}

    def unlearn(self, sim, request: ForgetRequest):
        a = self.args
        layers = None
        if request.kind == "class":  # the recipe of benchmarks/federated_mnist.py: the forgotten head rows
            layers = [n for n, i in sim.layers().items() if i.is_head]
        # pinned (the library's "auto" recipe may change): random labels on the head row for a class, retain-only else
        objective = "random_label" if request.kind == "class" else "retain"
        return federated_unlearn(sim.model, sim.clients, request, method="grad_x_act", ratio=a.ratio, objective=objective,
                                 layers=layers, max_steps=a.unlearn_steps, max_samples=a.score_samples, seed=a.seed,
                                 lr_scale=a.lr_scale if request.kind == "class" else 1.0, head_lr_scale=None)


def measure_overhead(bench: Bench, reps: int) -> dict[str, Any]:
    """Seconds of one client's local fit (``local_steps`` steps), plain vs DP-SGD, interleaved in one process.

    The federated wall times above include whatever else ran on the machine; alternating the two
    fits back to back cancels slow drifts. The DP fit's noise is fixed (no calibration) and its
    epsilon accounting, run at the fit's end, is timed apart.
    """
    from lightning_unlearn._training import fit
    from lightning_unlearn._training import SeededData
    from lightning_unlearn.privacy import DifferentialPrivacy

    data = SeededData(bench.fdm.client_dataset(0), bench.args.batch_size, bench.args.seed)
    plain, private, accounting = [], [], []
    for _ in range(reps):
        for dp in (False, True):
            model = bench.model(dp)
            callbacks = [DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=bench.args.max_grad_norm)] if dp else []
            t0 = time.perf_counter()
            fit(model, data, 1, callbacks, {"max_steps": bench.args.local_steps})
            (private if dp else plain).append(time.perf_counter() - t0)
            if dp:
                t1 = time.perf_counter()
                callbacks[0]._epsilon_cache = (None, 0.0)
                _ = callbacks[0].epsilon
                accounting.append(time.perf_counter() - t1)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"reps": reps, "local_steps": bench.args.local_steps, "batch_size": bench.args.batch_size,
            "plain_fit_s": plain, "dp_fit_s": private, "epsilon_accounting_s": accounting,
            "median_plain_s": med(plain), "median_dp_s": med(private), "median_ratio": med(private) / med(plain)}


def dp_info(privacy, when: str) -> dict[str, Any]:
    eps = privacy.epsilons()
    worst_id, worst = privacy.worst()
    noise = {cid: cb.noise_multiplier for cid, cb in privacy.callbacks.items()}
    return {f"epsilon_{when}": worst, f"worst_client_{when}": worst_id, f"epsilon_per_client_{when}": eps,
            "noise_multiplier_per_client": noise}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        import json

        results = json.loads((out / "dp_mnist.json").read_text())
        (out / "dp_mnist.md").write_text(markdown(results))
        plot(results, out / "dp_mnist_utility_vs_mia.png")
        print(markdown(results))
        return results
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.timing:
        timing = measure_overhead(Bench(args), args.timing)
        write_json(timing, out / "dp_mnist_timing.json")
        print(timing)
        return timing
    started = time.perf_counter()
    bench = Bench(args)
    kinds = args.requests.split(",")
    epsilons = [float(e) for e in args.epsilons.split(",")]

    sims: dict[str, tuple] = {"non-DP": bench.federation(None)}
    for eps in epsilons:
        sims[f"DP eps={eps:g}"] = bench.federation(eps)
        print(f"trained DP eps={eps:g}: worst client epsilon {sims[f'DP eps={eps:g}'][1].worst()[1]:.3f}, "
              f"{sims[f'DP eps={eps:g}'][0].timings_s['training']:.1f}s", flush=True)

    results: dict[str, Any] = {"config": vars(args), "requests": {}}
    for kind in kinds:
        request = make_request(kind, args, len(bench.train))
        rows: list[dict[str, Any]] = []
        base, _ = sims["non-DP"]
        plan = base.request(request)
        dm = bench.eval_dm(request, plan)
        train_s = base.timings_s["training"]
        rows.append({"setting": "non-DP (original)", "family": "original", "epsilon": None,
                     **bench.evaluate(base.model, dm), "train_s": train_s, "unlearn_s": None})
        ours = bench.unlearn(base, request)
        rows.append({"setting": "non-DP + ours", "family": "ours", "epsilon": None,
                     **bench.evaluate(ours.model, dm), "train_s": train_s, "unlearn_s": ours.timings_s["total"],
                     "params_updated": ours.mask.fraction})
        retrained = B.federated_retrain(base.model, base.clients, plan, args.rounds, seed=args.seed, progress=False)
        rows.append({"setting": "retrain (reference)", "family": "retrain", "epsilon": None,
                     **bench.evaluate(retrained.model, dm), "train_s": None, "unlearn_s": retrained.timings_s["retrain"]})
        for eps in epsilons:
            sim, privacy = sims[f"DP eps={eps:g}"]
            sim.request(request)
            dp_train_s = sim.timings_s["training"]
            trained = dp_info(privacy, "training")
            rows.append({"setting": f"DP eps={eps:g}", "family": "dp", "target_epsilon": eps,
                         "epsilon": trained["epsilon_training"], **trained,
                         **bench.evaluate(sim.model, dm), "train_s": dp_train_s, "unlearn_s": None})
            if kind == "class":  # random-label rounds feed combined retain/forget batches: no Poisson sampling
                with privacy.paused():
                    result = bench.unlearn(sim, request)
                dp_note = "masked round without DP (forget-aware objective)"
            else:  # retain-only masked round, still DP-SGD at every client: the mask acts after clip + noise
                result = bench.unlearn(sim, request)
                dp_note = "masked round with DP-SGD"
            after = dp_info(privacy, "after_unlearning")
            rows.append({"setting": f"DP eps={eps:g} + ours", "family": "dp+ours", "target_epsilon": eps,
                         "epsilon": after["epsilon_after_unlearning"], **after, "dp_note": dp_note,
                         **bench.evaluate(result.model, dm), "train_s": dp_train_s,
                         "unlearn_s": result.timings_s["total"], "params_updated": result.mask.fraction})
        for row in rows:
            print(f"[{kind}] {_line(row)}", flush=True)
        results["requests"][kind] = {"request": request.to_dict() if kind == "class" else
                                     {"kind": "sample", "count": len(request.sample_ids)}, "rows": rows}
    results["wall_s"] = time.perf_counter() - started
    results["client_sizes"] = [len(bench.fdm.client_indices(k)) for k in range(args.clients)]
    write_json(results, out / "dp_mnist.json")
    (out / "dp_mnist.md").write_text(markdown(results))
    plot(results, out / "dp_mnist_utility_vs_mia.png")
    print(markdown(results))
    print(f"total {results['wall_s'] / 60:.1f} min")
    return results


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _s(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _line(row: dict) -> str:
    return (f"{row['setting']}: test {_pct(row['test_acc'])} forget {_pct(row['forget_acc'])} "
            f"MIA {_pct(row['mia_efficacy'])} [{_pct(row['mia_shadow_acc'])}] AUC {_pct(row['loss_auc'])} "
            f"eps {row['epsilon'] if row['epsilon'] is None else round(row['epsilon'], 2)}")


def markdown(results: dict) -> str:
    lines = []
    for kind, block in results["requests"].items():
        lines += [f"#### {kind}-level request: `{block['request']}`", "",
                  "| setting | worst-client epsilon | test acc % | forget acc % | MIA-eff % [shadow acc %] | "
                  "loss-attack AUC % | train s | unlearn s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in block["rows"]:
            eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
            flag = "" if r["mia_informative"] else "!"
            lines.append(f"| {r['setting']} | {eps} | {_pct(r['test_acc'])} | {_pct(r['forget_acc'])} | "
                         f"{_pct(r['mia_efficacy'])} [{_pct(r['mia_shadow_acc'])}{flag}] | {_pct(r['loss_auc'])} | "
                         f"{_s(r['train_s'])} | {_s(r['unlearn_s'])} |")
        lines.append("")
    return "\n".join(lines)


STYLE = {"original": ("black", "s"), "ours": ("tab:blue", "o"), "retrain": ("tab:green", "*"),
         "dp": ("tab:red", "^"), "dp+ours": ("tab:purple", "D")}


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["requests"])
    panels = (("mia_efficacy", "MIA-efficacy on forget data (%; higher = looks unseen)\n"
                                "black edge: shadow acc < 55%, uninformative"),
              ("loss_auc", "loss-attack AUC on forget data (%; 50 = no trace)"),
              ("forget_acc", "forget accuracy (%; retrain = the target)"))
    fig, axes = plt.subplots(len(kinds), len(panels), figsize=(16, 4.4 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for r in results["requests"][kind]["rows"]:
                color, marker = STYLE[r["family"]]
                x, y = 100 * r[key], 100 * r["test_acc"]
                ax.scatter(x, y, c=color, marker=marker, s=70, edgecolors="k" if not r["mia_informative"] and j == 0 else None)
                ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{kind}-level request")
            ax.grid(alpha=0.3)
    fig.suptitle("Utility vs membership inference: DP-SGD (per-client) vs unlearning, federated MNIST")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_page(results: Path) -> str:
    """docs/benchmarks/dp_mnist.md from dp_mnist.json and dp_mnist_timing.json."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pagekit

    rec, timing = pagekit.load(results, "dp_mnist.json"), pagekit.load(results, "dp_mnist_timing.json")
    c = rec["config"]
    intro = (f"Federated MNIST: a seeded {c['train_samples']:,}-sample subsample of the training set, {c['clients']} "
             f"clients with Dirichlet({c['alpha']}) label skew (sizes {', '.join(map(str, rec['client_sizes']))}), "
             f"SmallCNN, FedAvg {c['rounds']} rounds x {c['local_steps']} local steps. DP runs: local DP-SGD at every "
             f"client (`attach_client_dp`, GroupNorm model from `make_dp_compatible`), clipping norm "
             f"{c['max_grad_norm']}, delta {c['delta']}, target epsilons {c['epsilons']} (worst client shown). Rows: "
             "the non-DP original; non-DP + unlearning; retraining without the forget data (the reference); DP-SGD at "
             "each epsilon without unlearning; DP + unlearning. MIA-eff: SalUn's SVC attack (shadow accuracy in "
             "brackets, `!` when below 55%: the score is then uninformative); loss-attack AUC on the forget data "
             "(50 = no trace). The plot is `benchmarks/results/dp_mnist_utility_vs_mia.png`.")
    lines = pagekit.header("DP-SGD vs unlearning (MNIST, federated)", "dp_mnist.py",
                           ["dp_mnist.json", "dp_mnist_timing.json"],
                           ["python benchmarks/dp_mnist.py --data-root ../shared/data/mnist",
                            f"python benchmarks/dp_mnist.py --data-root ../shared/data/mnist --timing {timing['reps']}"],
                           [f"{c.get('threads', 1)} torch thread; cores not recorded"], intro)
    lines += [f"Total wall time {rec['wall_s'] / 60:.1f} min.", ""]
    lines += markdown(rec).replace("#### ", "## ").splitlines()
    lines += ["## Cost of a DP-SGD step", "",
              f"{timing['reps']} interleaved repeats of {timing['local_steps']} local steps, batch "
              f"{timing['batch_size']}: median plain fit {timing['median_plain_s']:.2f} s, DP-SGD fit "
              f"{timing['median_dp_s']:.2f} s ({timing['median_ratio']:.2f}x); epsilon accounting "
              f"{min(timing['epsilon_accounting_s']):.2f}-{max(timing['epsilon_accounting_s']):.2f} s."]
    return pagekit.finish(lines)


if __name__ == "__main__":
    main()
