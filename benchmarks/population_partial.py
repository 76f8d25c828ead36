"""Partial retraining candidates for the population harness: retrain the top of the network from scratch.

A retrained model treats a forgotten class (or forgotten samples) as never seen. These candidates reproduce
that mechanism on the top of the network only: the network is cut before its last ``k`` parametrised
blocks, the inputs at the cut are computed once for the retain data (eval-mode bottom), the top is
re-initialised (seeded, each module's own ``reset_parameters``) and trained from scratch on the cached
inputs with the original's own recipe (the optimizer and scheduler its ``configure_optimizers`` builds,
restricted to the top's parameters; the original's epochs and batch size). The bottom is never run in
train mode and never receives a gradient: it stays bit-for-bit the original's (its "mask").

Blocks are found generically with ``torch.fx``: a *cut point* is a node through which everything
downstream depends on the rest of the graph (one tensor crosses the cut: never inside a residual unit);
the graph between consecutive cut points is a segment; segments without a weight matrix (norms,
activations, pooling, flattening) join the segment before them; each result with parameters is a block.
BatchNorm inside the top trains in train mode on the cached inputs (its running statistics reset with it),
as it would in retraining.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population.py --plugin benchmarks/population_partial.py \
        --methods top_retrain_1 top_retrain_2 --out-suffix _partial
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from population_methods import distill, retrain_budget  # noqa: F401  (M's masked-logit distillation)
from population_task import Method, Task

SOURCE_AT_IMPORT = Path(__file__).read_text()


# -- cutting the network --------------------------------------------------------------------
@dataclass
class Split:
    """The network cut before its last ``k`` blocks: ``bottom(x) -> z``, ``top(z) -> logits`` (sharing modules)."""

    bottom: fx.GraphModule
    top: fx.GraphModule
    top_modules: list[str]  # qualified names of the modules the top calls
    top_params: dict[str, nn.Parameter]  # qualified name in the model -> parameter
    blocks: list[list[str]]  # every block's module names, in forward order


def _own_params(model: nn.Module, target: str) -> list[tuple[str, nn.Parameter]]:
    mod = model.get_submodule(target)
    return [(f"{target}.{n}", p) for n, p in mod.named_parameters()]


def _has_matrix(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(p.dim() >= 2 for _, p in _own_params(model, node.target))
    if node.op == "get_attr":
        attr = model.get_parameter(node.target) if node.target in dict(model.named_parameters()) else None
        return attr is not None and attr.dim() >= 2
    return False


def _has_params(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(_own_params(model, node.target))
    return node.op == "get_attr" and node.target in dict(model.named_parameters())


def cut_points(graph: fx.Graph) -> list[int]:
    """Indices ``c`` of compute nodes such that every later compute node reads only node ``c``, later nodes,
    or attributes (one tensor crosses a cut after node ``c``)."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(nodes)}
    earliest = [len(nodes)] * (len(nodes) + 1)  # suffix min of the earliest non-attr input read from j on
    for j in range(len(nodes) - 1, -1, -1):
        reads = [index[a] for a in nodes[j].all_input_nodes if a.op != "get_attr"]
        earliest[j] = min([earliest[j + 1]] + reads)
    out = next(n for n in graph.nodes if n.op == "output")
    last_read = min(index[a] for a in out.all_input_nodes)
    points = []
    for c in range(len(nodes) - 1):
        if nodes[c].op == "get_attr":
            continue
        if earliest[c + 1] >= c and last_read >= c:
            points.append(c)
    return points


def split_network(model: nn.Module, k: int) -> Split:
    """Trace ``model`` and cut it before its last ``k`` blocks (see the module docstring)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # data-dependent control flow etc.
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx ({err}); partial retraining needs a cut") from err
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    points = cut_points(gm.graph)
    # segments (c_i, c_{i+1}] between consecutive cut points; parameterless or matrix-less ones join the previous
    bounds = points + [len(nodes) - 1]
    segments: list[tuple[int, int]] = []  # (cut index before the segment, last node index)
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = nodes[a + 1: b + 1]
        if segments and not any(_has_matrix(model, n) for n in seg):
            segments[-1] = (segments[-1][0], b)
        else:
            segments.append((a, b))
    blocks = [(a, b) for a, b in segments if any(_has_params(model, n) for n in nodes[a + 1: b + 1])]
    if not 1 <= k <= len(blocks) - 1:
        raise ValueError(f"k={k} blocks to retrain; {type(model).__name__} has {len(blocks)} blocks, allowed are 1..{len(blocks) - 1}")
    cut = blocks[-k][0]
    names = [[n.target for n in nodes[a + 1: b + 1] if n.op == "call_module" and _has_params(model, n)] for a, b in blocks]

    bottom_graph, env = fx.Graph(), {}
    for n in nodes[: cut + 1]:
        env[n] = bottom_graph.node_copy(n, lambda a: env[a])
    bottom_graph.output(env[nodes[cut]])
    top_graph, env2 = fx.Graph(), {}
    env2[nodes[cut]] = top_graph.placeholder("z")
    for n in nodes[cut + 1:]:
        env2[n] = top_graph.node_copy(n, lambda a: env2[a])
    out = next(n for n in gm.graph.nodes if n.op == "output")
    top_graph.output(env2[out.args[0]])
    bottom, top = fx.GraphModule(model, bottom_graph), fx.GraphModule(model, top_graph)  # share the model's modules
    top_nodes = nodes[cut + 1:]
    top_modules = [n.target for n in top_nodes if n.op == "call_module"]
    params: dict[str, nn.Parameter] = {}
    for n in top_nodes:
        if n.op == "call_module":
            params.update(_own_params(model, n.target))
        elif n.op == "get_attr" and n.target in dict(model.named_parameters()):
            params[n.target] = model.get_parameter(n.target)
    bottom_ids = {id(p) for n in nodes[: cut + 1] if n.op == "call_module" for _, p in _own_params(model, n.target)}
    if bottom_ids & {id(p) for p in params.values()}:
        raise ValueError(f"{type(model).__name__} shares parameters between the bottom and the top of the cut")
    return Split(bottom, top, top_modules, params, names)


@torch.no_grad()
def cut_inputs(bottom: nn.Module, dataset, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The bottom's outputs (eval mode) and labels for ``dataset``, computed once."""
    bottom.eval()
    zs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch):
        zs.append(bottom(x))
        ys.append(y.long())
    return torch.cat(zs), torch.cat(ys)


def _own_recipe(model: nn.Module, params: dict[str, nn.Parameter]):
    """The model's own optimizer (and per-epoch scheduler), with its parameter groups restricted to ``params``."""
    conf = model.configure_optimizers()
    opt, sched = (conf[0][0], conf[1][0]["scheduler"] if conf[1] else None) if isinstance(conf, tuple) else (conf, None)
    keep = {id(p) for p in params.values()}
    for group in opt.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]
    opt.param_groups = [g for g in opt.param_groups if g["params"]]
    return opt, sched


@torch.no_grad()
def forget_subspace(z_retain: torch.Tensor, z_forget: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, r) of the cut-space directions where a forget sample carries more energy than a
    retain sample (generalised eigenvalues of the second moments, C_f v = lambda C_r v, lambda > 1)."""
    zr, zf = z_retain.flatten(1).double(), z_forget.flatten(1).double()
    cr, cf = zr.T @ zr / len(zr), zf.T @ zf / len(zf)
    d = cr.shape[0]
    evals, evecs = torch.linalg.eigh(cr + 1e-6 * cr.diagonal().mean() * torch.eye(d, dtype=cr.dtype))
    w = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T  # C_r^{-1/2}
    lam, u = torch.linalg.eigh(w @ cf @ w)
    v = w @ u[:, lam > 1]
    if v.shape[1] == 0:
        return torch.zeros(d, 0, dtype=z_retain.dtype)
    q, _ = torch.linalg.qr(v)
    return q.to(z_retain.dtype)


def _fold_projection(split: Split, model: nn.Module, q: torch.Tensor) -> None:
    """Fold z -> z - Q Q^T z into every nn.Linear that reads the cut input (refuses any other reader)."""
    placeholder = next(n for n in split.top.graph.nodes if n.op == "placeholder")
    readers = list(placeholder.users)
    mods = [model.get_submodule(n.target) if n.op == "call_module" else None for n in readers]
    if not all(isinstance(m, nn.Linear) for m in mods):
        raise ValueError("the forget-subspace projection needs the top to read the cut input with nn.Linear layers only")
    proj = torch.eye(q.shape[0], dtype=q.dtype) - q @ q.T
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(m.weight @ proj)


@torch.no_grad()
def _mean_phi(top: nn.Module, z: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Mean logit-scaled confidence (logit_y - logsumexp of the others) of ``top`` on cached inputs, eval mode."""
    was = top.training
    top.eval()
    total = 0.0
    for zb, yb in zip(z.split(batch), y.split(batch)):
        logits = top(zb).double()
        others = logits.scatter(1, yb[:, None], float("-inf"))
        total += float((logits.gather(1, yb[:, None]).squeeze(1) - torch.logsumexp(others, 1)).sum())
    top.train(was)
    return total / len(z)


def retrain_top(task: Task, k: int, model: nn.Module | None = None, project: bool = False,
                match_fit: bool = False) -> nn.Module:
    """Cut before the last ``k`` blocks, re-initialise the top (seeded) and train it from scratch on the retain
    data's cached cut inputs with the original's recipe (optimizer, scheduler, epochs, batch size).
    ``project`` (class requests): the top trains on, and reads, the cut inputs with the forget-dominant
    subspace removed (:func:`forget_subspace`), so it cannot use what only the forgotten class has.
    ``match_fit``: the schedule's length follows the original's own fit instead: stop after the first epoch whose
    mean confidence on the retain cut inputs reaches the original's (measured before the reset), else continue
    past the schedule at its last learning rate, up to twice its epochs (the logit scale of a top trained on
    fixed features is set by the original's fit on the same data, not by the epoch count)."""
    model = task.original if model is None else model
    split = split_network(model, k)
    z, y = cut_inputs(split.bottom, task.datamodule.retain_set)
    target = _mean_phi(split.top, z, y) if match_fit else None
    q = None
    if project and task.datamodule.request.kind == "class":
        q = forget_subspace(z, cut_inputs(split.bottom, task.datamodule.forget_set)[0])
        z = z - (z.flatten(1) @ q @ q.T).view_as(z)
    torch.manual_seed(task.seed)
    for name in split.top_modules:
        mod = model.get_submodule(name)
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
        if hasattr(mod, "reset_running_stats"):
            mod.reset_running_stats()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in split.top_params.values():
        p.requires_grad_(True)
    opt, sched = _own_recipe(model, split.top_params)
    bs, epochs = int(task.recipe["batch_size"]), int(task.recipe["epochs"])
    gen = torch.Generator().manual_seed(task.seed)
    split.top.train()
    for epoch in range(2 * epochs if match_fit else epochs):
        perm = torch.randperm(len(z), generator=gen)
        for j in perm.split(bs):
            opt.zero_grad()
            F.cross_entropy(split.top(z[j]), y[j]).backward()
            opt.step()
        if sched is not None and epoch < epochs - 1:
            sched.step()
        if target is not None and _mean_phi(split.top, z, y) >= target:
            break
    if q is not None:
        _fold_projection(split, model, q)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return model.eval()


def param_share(model: nn.Module, k: int) -> float:
    """Share of the model's parameter elements the top-``k`` retraining updates."""
    split = split_network(model, k)
    return sum(p.numel() for p in split.top_params.values()) / sum(p.numel() for p in model.parameters())


def state_digest(model: nn.Module, names: list[str]) -> str:
    """SHA-256 of the named entries of ``model.state_dict()`` (to check the bottom stays bit-for-bit)."""
    sd, h = model.state_dict(), hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update(sd[n].detach().cpu().numpy().tobytes())
    return h.hexdigest()


# -- methods ---------------------------------------------------------------------------------
def _top(k: int) -> Method:
    def method(task: Task) -> nn.Module:
        return retrain_top(task, k)
    method.__name__ = method.__qualname__ = f"top_retrain_{k}"
    method.__doc__ = f"Re-initialise the last {k} block(s) and retrain them from scratch on cached retain cut inputs."
    return method


def _project_top(k: int) -> Method:
    def method(task: Task) -> nn.Module:
        return retrain_top(task, k, project=True)
    method.__name__ = method.__qualname__ = f"top_retrain_proj_{k}"
    method.__doc__ = (f"Class requests: the top-{k} retraining on cut inputs without the forget-dominant subspace "
                      f"(folded into the top's first linear layer); sample requests: the top-{k} retraining alone.")
    return method


def _fit_top(k: int) -> Method:
    def method(task: Task) -> nn.Module:
        return retrain_top(task, k, match_fit=True)
    method.__name__ = method.__qualname__ = f"top_retrain_fit_{k}"
    method.__doc__ = f"The top-{k} retraining, trained until its retain confidence reaches the original's (<= 2x epochs)."
    return method


def _distill_top(k: int, fraction: float = 0.06) -> Method:
    def method(task: Task) -> nn.Module:
        model = task.original
        if task.datamodule.request.kind == "class":  # the masked-logit target needs a forgotten logit
            model = distill(task, steps=retrain_budget(task, fraction))  # in place; its teacher is a copy
        return retrain_top(task, k, model)
    method.__name__ = method.__qualname__ = f"distill_top_retrain_{k}"
    method.__doc__ = (f"Class requests: masked-logit distillation of the whole model ({fraction:.0%} of retraining's "
                      f"steps), then the top-{k} retraining; sample requests: the top-{k} retraining alone.")
    return method


PEERS: dict[str, Method] = {
    "top_retrain_1": _top(1),  # = head_retrain: the whole linear head re-initialised and retrained
    "top_retrain_2": _top(2),
    "top_retrain_3": _top(3),
    "top_retrain_proj_1": _project_top(1),
    "top_retrain_proj_2": _project_top(2),
    "top_retrain_fit_1": _fit_top(1),
    "top_retrain_fit_2": _fit_top(2),
    "distill_top_retrain_1": _distill_top(1),
    "distill_top_retrain_2": _distill_top(2),
}
