"""Head calibration: refit the forgotten classes' head rows the way retraining would have set them.

A model retrained without a class pushes that class's logit down on every training step; a short repair
stops far above it, and a per-example attack sees the difference. Re-initialising only the forgotten rows of
the classifier head (the layer's own initialisation, seeded) and fitting them on the retain data's head
features, for the original's number of steps with the module's own optimizer, reproduces that push at the
cost of a linear problem: the features and the other rows' logits are computed once, and the gradient of the
forgotten rows' softmax is written by hand (no autograd graph through the model).

The retain data never moves a row along the direction only the forgotten class's features occupy, so a random
initialisation's component there decides how far the forgotten logit falls on the forgotten data (measured on
four architectures: up to 5 logits from one seed to the next, enough to flip a per-example attack). Given the
forget data, a re-initialised row may not start out favouring the class it must forget: a positive component
along its class's mean forget feature is reflected to the same size, negative (a draw that is already negative
is kept).
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.data.batches import eval_batches

log = logging.getLogger(__name__)

__all__ = ["calibrate_head", "fit_rows", "head_features", "initial_rows", "linear_head", "optimizer_recipe", "require_rows_in_mask"]

OptimizerFactory = Callable[[list[Tensor]], Optimizer]


def linear_head(model: nn.Module, head_name: str | None) -> nn.Linear:
    """The ``nn.Linear`` named ``head_name`` (the layer :func:`~lightning_unlearn.scoring.layers.discover_layers`
    marks ``is_head``); one line naming what it is otherwise."""
    module = dict(model.named_modules()).get(head_name) if head_name is not None else None
    if not isinstance(module, nn.Linear):
        kind = type(module).__name__ if module is not None else "no layer"
        raise ValueError(f"calibrate='head' needs a Linear classifier head; {type(model).__name__}'s head "
                         f"{head_name!r} is {kind}; allowed: a model whose last layer is nn.Linear, or calibrate='none'")
    return module


def require_rows_in_mask(masks: Mapping[str, Tensor], head_name: str, classes: Sequence[int]) -> None:
    """The calibration writes only the forgotten rows: they must be trainable in the mask (``head_rows``)."""
    rows = list(classes)
    for pname in ("weight", "bias"):
        key = f"{head_name}.{pname}" if head_name else pname
        if key in masks and not bool(masks[key][rows].all()):
            raise ValueError(f"calibrate='head' refits head rows {rows} but the mask does not select them in {key}; "
                             "allowed: head_rows='auto' (the forgotten classes' rows) or a list containing them")


def optimizer_recipe(optimizer: Optimizer) -> OptimizerFactory:
    """A factory for a fresh optimizer of ``optimizer``'s class with its first parameter group's settings (not its
    state). Lightning's and Opacus' wrappers are unwrapped to the torch optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner = getattr(inner, "original_optimizer", inner)
    group = inner.param_groups[0]
    accepted = inspect.signature(type(inner).__init__).parameters
    # only what the constructor takes (torch's AdamW keeps Adam's ``decoupled_weight_decay`` in its defaults)
    settings = {k: copy.deepcopy(group[k]) for k in inner.defaults if k in group and k != "params" and k in accepted}
    return functools.partial(type(inner), **settings)


@torch.no_grad()
def _not_favouring_forget_means(weight: Tensor, rows: Sequence[int], features: Tensor, labels: Tensor) -> None:
    """Reflect a positive component of each row of ``weight`` (rows ``rows`` of the head) along the mean forget
    feature of that row's class to the same size, negative (rows whose class has no forget sample are left as
    drawn)."""
    for i, row in enumerate(rows):
        of_class = features[labels == row]
        if len(of_class):
            u = of_class.mean(0).to(weight.device)
            norm = u.dot(u)
            if norm > 0:
                weight[i] -= 2 * (weight[i].dot(u) / norm).clamp(min=0) * u


def initial_rows(
    head: nn.Linear, rows: Sequence[int], seed: int, forget: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor | None]:
    """Rows ``rows`` of ``head`` re-initialised by the layer's own ``reset_parameters`` seeded with ``seed`` (the
    global CPU random stream is left as it was), as float32 (weight, bias) on the head's device. ``forget``: head
    features and labels of forget data (or one mean feature per class with that class as its label): a row may
    not start out favouring its class (:func:`_not_favouring_forget_means`). The central calibration and the
    federated one (whose server only sees each class's mean forget feature) start from the same rows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(head).cpu()
        fresh.reset_parameters()
    device = head.weight.device
    with torch.no_grad():
        weight = fresh.weight.detach()[list(rows)].float().to(device)
        if forget is not None:
            _not_favouring_forget_means(weight, rows, *forget)
    bias = fresh.bias.detach()[list(rows)].float().to(device) if head.bias is not None else None
    return weight, bias


@torch.no_grad()
def head_features(model: nn.Module, head: nn.Linear, batches: Iterable) -> tuple[Tensor, Tensor]:
    """The head's inputs and the labels of every ``(x, y)`` batch, the model in eval mode (each module's mode is
    put back afterwards)."""
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach().float()))
    device = head.weight.device
    modes = eval_modes(model)
    try:
        for batch in eval_batches(batches):
            model(batch[0].to(device))
            labels.append(batch[1].to(device).long())
    finally:
        hook.remove()
        restore_modes(modes)
    if not feats:
        raise ValueError("calibrate='head' got no retain batches to compute head features on")
    return torch.cat(feats).flatten(1), torch.cat(labels)


def fit_rows(
    head: nn.Linear,
    rows: Sequence[int],
    weight: Tensor,
    bias: Tensor | None,
    x: Tensor,
    y: Tensor,
    optimizer: Optimizer,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Fit rows ``rows`` of ``head`` (their float32 values ``weight``/``bias``, the parameters of ``optimizer``) for
    ``steps`` steps of mean cross-entropy over all logits on head features ``x`` with labels ``y``, the other rows
    fixed as in ``head``; batches of ``batch_size`` in an order reshuffled by ``generator`` every pass over ``x``.
    The softmax gradient is written by hand: the other rows' logits are computed once. Shared by
    :func:`calibrate_head` and the federated clients' calibration rounds."""
    device, has_bias = head.weight.device, head.bias is not None
    index = torch.tensor(list(rows), device=device)
    with torch.no_grad():
        # the other rows' logits never change: their softmax denominator is summed once (shifted for stability)
        kept = torch.ones(head.out_features, dtype=torch.bool, device=device)
        kept[index] = False
        base = F.linear(x, head.weight.float()[kept], head.bias.float()[kept] if has_bias else None)
        if kept.any():
            shift = base.max(1, keepdim=True).values
            others = (base - shift).exp().sum(1, keepdim=True)
        else:  # every row refit
            shift = others = torch.zeros(len(x), 1, device=device)
        is_row = (y[:, None] == index[None]).float()  # one-hot of the refit rows (0 on retain samples of a class request)
    per_epoch = -(-len(x) // batch_size)
    order = torch.arange(len(x))
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=generator)
        j = order[(step % per_epoch) * batch_size:][:batch_size].to(device)
        with torch.no_grad():
            logits = x[j] @ weight.T + (bias if bias is not None else 0)
            e = (logits - shift[j]).exp()
            p = e / (others[j] + e.sum(1, keepdim=True))  # softmax probability of each refit row
            g = (p - is_row[j]) / len(j)  # d mean cross-entropy / d refit-row logits
            weight.grad = g.T @ x[j]
            if bias is not None:
                bias.grad = g.sum(0)
        optimizer.step()


def calibrate_head(
    model: nn.Module,
    retain_loader: Iterable,
    classes: Sequence[int],
    head_name: str,
    optimizer_factory: OptimizerFactory,
    steps: int,
    seed: int,
    batch_size: int | None = None,
    forget_loader: Iterable | None = None,
) -> int:
    """Re-initialise rows ``classes`` of the Linear head ``head_name`` and fit them for ``steps`` optimizer steps
    on the retain data's head features (mean cross-entropy over all logits, the other rows fixed). Returns the
    number of elements written. Seeded with ``seed`` (a local generator; the global RNG is forked around the
    layer's ``reset_parameters``); ``batch_size``: default ``retain_loader.batch_size``; ``forget_loader``: the
forget data: each re-initialised row starts with a non-positive component along its class's mean forget feature."""
    head = linear_head(model, head_name)
    rows = sorted({int(c) for c in classes})
    if not rows or rows[0] < 0 or rows[-1] >= head.out_features:
        raise ValueError(f"head rows {rows} are not rows of {head_name!r} (0..{head.out_features - 1})")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    # the user's CPU random stream is left as it was: iterating a DataLoader draws from it, and the layer's own
    # initialisation is seeded with ``seed`` inside the fork
    with torch.random.fork_rng(devices=[]):
        x, y = head_features(model, head, retain_loader)
        forget = head_features(model, head, forget_loader) if forget_loader is not None else None
    bs = int(batch_size or getattr(retain_loader, "batch_size", None) or 64)
    has_bias = head.bias is not None
    weight, bias = initial_rows(head, rows, seed, forget)
    weight.requires_grad_(True)
    if bias is not None:
        bias.requires_grad_(True)
    optimizer = optimizer_factory([weight] + ([bias] if bias is not None else []))
    fit_rows(head, rows, weight, bias, x, y, optimizer, steps, bs, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        head.weight[rows] = weight.detach().to(head.weight.dtype)
        if bias is not None:
            head.bias[rows] = bias.detach().to(head.bias.dtype)
    changed = len(rows) * (head.in_features + int(has_bias))
    log.info("head calibration: rows %s of %s refit for %d steps on %d retain features", rows, head_name, steps, len(x))
    return changed
