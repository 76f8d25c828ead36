"""Candidate unlearning procedures for the population harness, each a ``Task -> nn.Module`` function.

``default`` is the library's ``unlearn()`` at its defaults; the rest are candidates measured against
retraining (kept short; the winner is ported into the library later). Shared pieces: seeded forget /
retain batch streams, a masked-logit distillation target (DELETE, CVPR 2025: the original's softmax with
the forgotten class's logit removed), parameter masks that keep everything outside them bit-for-bit.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn import unlearn
from population_task import Method, Task

SOURCE_AT_IMPORT = Path(__file__).read_text()  # part of every candidate's cache key (population_task.method_fingerprint)


# -- shared pieces ----------------------------------------------------------------------
def _stream(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded shuffled batches of ``dataset``."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=gen, drop_last=False)
    while True:
        for x, y in loader:
            yield x, y.long()


def _norm_eval(model: nn.Module) -> nn.Module:
    """Train mode with every BatchNorm's running statistics fixed (the library's invariant during unlearning)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def forgotten_logit_mask(y: torch.Tensor, num_classes: int, classes: tuple[int, ...]) -> torch.Tensor:
    """Boolean (batch, classes): the logits to remove from the target (the request's classes; else each sample's label)."""
    mask = torch.zeros(len(y), num_classes, dtype=torch.bool)
    if classes:
        mask[:, list(classes)] = True
    else:
        mask[torch.arange(len(y)), y] = True
    return mask


@torch.no_grad()
def masked_target(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                  classes: tuple[int, ...]) -> torch.Tensor:
    """The original's softmax over the classes left after removing the forgotten logits (DELETE's target)."""
    logits = teacher(x).float()
    logits = logits.masked_fill(forgotten_logit_mask(y, num_classes, classes), float("-inf"))
    return logits.softmax(1)


class FrozenOutside:
    """Restores every parameter element outside ``masks`` after each step (exact freeze, whatever the optimizer)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
        self.masks = masks
        self.saved = {} if masks is None else {n: p.detach().clone() for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())

    def trainable(self) -> list[nn.Parameter]:
        if self.masks is None:
            return list(self.params.values())
        return [p for n, p in self.params.items() if n in self.masks and bool(self.masks[n].any())]

    @torch.no_grad()
    def restore(self) -> None:
        if self.masks is None:
            return
        for n, p in self.params.items():
            m = self.masks.get(n)
            if m is None:
                p.copy_(self.saved[n])
            else:
                p.copy_(torch.where(m, p, self.saved[n]))


def perturbed(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A copy of image batch ``x`` shifted by up to one pixel each way, plus noise of 10% of its std (seeded)."""
    sh = torch.randint(-1, 2, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=sh, dims=(-2, -1)) + 0.1 * x.std() * torch.randn(x.shape, generator=gen)


def keep_loss(kind: str, model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The retain term: cross-entropy on labels (``"ce"``) or KL toward the original's softmax (``"kl"``)."""
    if kind == "ce":
        return F.cross_entropy(model(x), y)
    with torch.no_grad():
        target = teacher(x).float().softmax(1)
    return F.kl_div(F.log_softmax(model(x), 1), target, reduction="batchmean")


def distill(task: Task, steps: int = 100, lr: float = 1e-3, batch: int = 32,
            masks: dict[str, torch.Tensor] | None = None, model: nn.Module | None = None,
            copies: int = 0, keep: str = "ce") -> nn.Module:
    """Masked-logit distillation: forget samples toward the original's softmax without the forgotten logit,
    retain samples by cross-entropy; Adam, ``batch`` forget + ``batch`` retain per step. ``copies`` > 0: the
    target is the mean over that many perturbed copies of each forget sample (the original next to the sample,
    closer to how it treats unseen samples of the class). ``keep``: the retain term, ``"ce"`` (cross-entropy on
    labels: keeps training, sharpens every logit) or ``"kl"`` (toward the original's own softmax: keeps the function)."""
    model = task.original if model is None else model
    teacher = copy.deepcopy(task.original).eval()
    dm, classes = task.datamodule, tuple(task.datamodule.request.classes)
    forget, retain = _stream(dm.forget_set, batch, task.seed), _stream(dm.retain_set, batch, task.seed + 1)
    torch.manual_seed(task.seed)
    _norm_eval(model)
    frozen = FrozenOutside(model, masks)
    opt = torch.optim.Adam(frozen.trainable(), lr=lr)
    gen = torch.Generator().manual_seed(task.seed + 2)
    for _ in range(steps):
        (xf, yf), (xr, yr) = next(forget), next(retain)
        if copies:
            target = sum(masked_target(teacher, perturbed(xf, gen), yf, task.num_classes, classes)
                         for _ in range(copies)) / copies
        else:
            target = masked_target(teacher, xf, yf, task.num_classes, classes)
        loss = F.kl_div(F.log_softmax(model(xf), 1), target, reduction="batchmean") + keep_loss(keep, model, teacher, xr, yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        frozen.restore()
    return model.eval()


def head_layer(model: nn.Module) -> nn.Linear:
    """The classifier head: the last ``nn.Linear`` in module order."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to calibrate")
    return linears[-1]


@torch.no_grad()
def head_inputs(model: nn.Module, dataset: Dataset, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input features (eval mode) and labels of ``dataset``, computed once."""
    head, feats, labels = head_layer(model), [], []
    hook = head.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    was = model.training
    model.eval()
    try:
        for x, y in DataLoader(dataset, batch_size=batch):
            model(x)
            labels.append(y.long())
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


def _optimizer(recipe: dict, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The original's optimizer kind and settings (SGD gets momentum 0.9)."""
    name, lr, wd = recipe.get("optimizer", "Adam"), recipe.get("lr", 1e-3), recipe.get("weight_decay", 0.0)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    return getattr(torch.optim, name, torch.optim.Adam)(params, lr=lr, weight_decay=wd)


def head_fit(task: Task, model: nn.Module | None = None, epochs: float | None = None,
             all_rows: bool = False) -> nn.Module:
    """Re-initialise only the forgotten classes' head rows (seeded) and fit them on retain features computed once,
    for the original's schedule (epochs x batches, its optimizer): how retraining pushes a never-seen class down."""
    model = task.original if model is None else model
    classes = list(task.datamodule.request.classes)
    if not classes:
        return model.eval()
    head = head_layer(model)
    if all_rows:  # a linear probe: every row re-initialised and refit on the retain features
        classes = list(range(head.out_features))
    x, y = head_inputs(model, task.datamodule.retain_set)
    gen = torch.Generator().manual_seed(task.seed)
    fresh = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    torch.manual_seed(task.seed)
    fresh.reset_parameters()
    w_rows = fresh.weight.detach()[classes].clone().requires_grad_(True)
    b_rows = fresh.bias.detach()[classes].clone().requires_grad_(True) if head.bias is not None else None
    with torch.no_grad():  # the other rows' logits never change: computed once
        base = F.linear(x, head.weight, head.bias)
    opt = _optimizer(task.recipe, [w_rows] + ([b_rows] if b_rows is not None else []))
    bs = int(task.recipe.get("batch_size", 64))
    per_epoch = -(-len(x) // bs)
    steps = int(round((epochs if epochs is not None else task.recipe.get("epochs", 10)) * per_epoch))
    idx = torch.tensor(classes)
    # softmax of the forgotten rows by hand, the other rows' share summed once (no autograd: ~3x faster per step)
    shift = base.max(1, keepdim=True).values.detach()
    base_sum = (base - shift).exp().sum(1, keepdim=True) - (base[:, classes] - shift).exp().sum(1, keepdim=True)
    is_row = (y[:, None] == idx[None]).float()  # (N, rows): one-hot of the forgotten rows (0 on retain data)
    with torch.no_grad():
        for step in range(steps):
            if step % per_epoch == 0:
                perm = torch.randperm(len(x), generator=gen)
            j = perm[(step % per_epoch) * bs:][:bs]
            rows = x[j] @ w_rows.T + (b_rows if b_rows is not None else 0)  # (B, rows)
            e = (rows - shift[j]).exp()
            p = e / (base_sum[j] + e.sum(1, keepdim=True))  # softmax probability of each forgotten row
            g = (p - is_row[j]) / len(j)  # d mean-CE / d row logits
            w_rows.grad = g.T @ x[j]
            if b_rows is not None:
                b_rows.grad = g.sum(0)
            opt.step()
    with torch.no_grad():
        head.weight[classes] = w_rows.detach()
        if b_rows is not None:
            head.bias[classes] = b_rows.detach()
    return model.eval()


def channel_masks(model: nn.Module, scores: dict[str, torch.Tensor], ratio: float, seed: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """Per layer, the top ``ratio`` of output channels by score (``seed``: random channels instead); a channel
    owns row c of every parameter of its module (weight, bias, norm affine)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    masks = {}
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not own:
            continue
        channels = own[0][1].shape[0]
        if seed is not None:
            score = torch.rand(channels, generator=gen)
        else:
            score = sum(scores[f"{mname}.{n}" if mname else n].reshape(channels, -1).sum(1) for n, _ in own)
        keep = max(1, int(round(ratio * channels)))
        chosen = torch.zeros(channels, dtype=torch.bool)
        chosen[score.topk(keep).indices] = True
        for n, p in own:
            masks[f"{mname}.{n}" if mname else n] = chosen.view(-1, *([1] * (p.dim() - 1))).expand_as(p).clone()
    return masks


def distill_grad_scores(task: Task, batches: int = 4, batch: int = 32) -> dict[str, torch.Tensor]:
    """|gradient x weight| of the distillation loss at the original (what the target needs to move)."""
    model, dm = copy.deepcopy(task.original), task.datamodule
    _norm_eval(model)
    forget = _stream(dm.forget_set, batch, task.seed)
    model.zero_grad()
    for _ in range(batches):
        xf, yf = next(forget)
        target = masked_target(task.original.eval(), xf, yf, task.num_classes, tuple(dm.request.classes))
        F.kl_div(F.log_softmax(model(xf), 1), target, reduction="batchmean").backward()
    return {n: (p.grad * p).abs().detach() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def retrain_budget(task: Task, fraction: float) -> int:
    """Steps = ``fraction`` of retraining's optimizer steps (epochs x steps per epoch), at least 5."""
    return max(5, int(round(fraction * task.recipe["epochs"] * task.recipe["steps_per_epoch"])))


@torch.no_grad()
def _phi(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x).double()
    others = logits.scatter(1, y[:, None], float("-inf"))
    return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(others, 1)


@torch.no_grad()
def memorisation_gap(model: nn.Module, task: Task, n: int = 512) -> torch.Tensor:
    """Per class: median phi on retain (trained) samples minus median phi on held-out test samples, under ``model``."""
    model.eval()
    dm, gen = task.datamodule, torch.Generator().manual_seed(task.seed)
    def sample(ds):
        idx = torch.randperm(len(ds), generator=gen)[:n].tolist()
        xs, ys = zip(*(ds[i] for i in idx))
        return torch.stack(xs), torch.as_tensor(ys).long()
    (xr, yr), (xt, yt) = sample(dm.retain_set), sample(dm.test_dataset)
    pr, pt = _phi(model, xr, yr), _phi(model, xt, yt)
    gap = torch.zeros(task.num_classes, dtype=torch.float64)
    for c in range(task.num_classes):
        if (yr == c).any() and (yt == c).any():
            gap[c] = (pr[yr == c].median() - pt[yt == c].median()).clamp(min=0)
    return gap


def heldout_distill(task: Task, steps: int, lr: float = 1e-3, batch: int = 32, noise: float = 0.0,
                    keep: str = "ce") -> nn.Module:
    """(b) Forget samples distilled toward the original's softmax with the true logit lowered by its class's
    memorisation gap (train-vs-held-out median phi): a held-out-like confidence; retain samples by cross-entropy.
    ``noise``: seeded Gaussian noise (this fraction of each tensor's std) added first (c)."""
    model, teacher = task.original, copy.deepcopy(task.original).eval()
    gap = memorisation_gap(teacher, task).float()
    torch.manual_seed(task.seed)
    if noise > 0:
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1:
                    p.add_(noise * p.std() * torch.randn_like(p))
    dm = task.datamodule
    forget, retain = _stream(dm.forget_set, batch, task.seed), _stream(dm.retain_set, batch, task.seed + 1)
    _norm_eval(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        (xf, yf), (xr, yr) = next(forget), next(retain)
        with torch.no_grad():
            logits = teacher(xf).float()
            target = logits.scatter_add(1, yf[:, None], -gap[yf][:, None]).softmax(1)
        loss = F.kl_div(F.log_softmax(model(xf), 1), target, reduction="batchmean") + keep_loss(keep, model, teacher, xr, yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def augment_distill(task: Task, steps: int, lr: float = 1e-3, batch: int = 32, copies: int = 4) -> nn.Module:
    """(b) Forget samples distilled toward the original's mean softmax on perturbed copies (1-pixel shifts and
    noise): the model's behaviour next to the sample, not on it; retain samples by cross-entropy."""
    model, teacher = task.original, copy.deepcopy(task.original).eval()
    dm = task.datamodule
    forget, retain = _stream(dm.forget_set, batch, task.seed), _stream(dm.retain_set, batch, task.seed + 1)
    gen = torch.Generator().manual_seed(task.seed)
    torch.manual_seed(task.seed)
    _norm_eval(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        (xf, yf), (xr, yr) = next(forget), next(retain)
        with torch.no_grad():
            probs = 0
            for _c in range(copies):
                sh = torch.randint(-1, 2, (2,), generator=gen).tolist()
                xa = torch.roll(xf, shifts=sh, dims=(-2, -1))
                xa = xa + 0.1 * xf.std() * torch.randn(xf.shape, generator=gen)
                probs = probs + teacher(xa).float().softmax(1) / copies
        loss = F.kl_div(F.log_softmax(model(xf), 1), probs, reduction="batchmean") + F.cross_entropy(model(xr), yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def reinit_repair(task: Task, share: float, steps: int, lr: float = 1e-3, batch: int = 64) -> nn.Module:
    """(b) Destroy then repair: re-initialise (seeded) the ``share`` of weight elements with the largest
    |forget-loss gradient x weight|, then train the whole model on retain data for ``steps`` Adam steps."""
    model, dm = task.original, task.datamodule
    _norm_eval(model)
    xf, yf = next(_stream(dm.forget_set, 256, task.seed))
    model.zero_grad()
    F.cross_entropy(model(xf), yf).backward()
    torch.manual_seed(task.seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2 or p.grad is None:
                continue
            score = (p.grad * p).abs().flatten()
            k = max(1, int(share * score.numel()))
            idx = score.topk(k).indices
            fresh = torch.empty_like(p)
            nn.init.kaiming_uniform_(fresh, a=5 ** 0.5)
            p.view(-1)[idx] = fresh.view(-1)[idx]
    model.zero_grad()
    retain = _stream(dm.retain_set, batch, task.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        xr, yr = next(retain)
        loss = F.cross_entropy(model(xr), yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -- methods ------------------------------------------------------------------------------
def default(task: Task) -> nn.Module:
    """The library's ``unlearn()`` at its defaults."""
    torch.manual_seed(task.seed)
    return unlearn(task.original, task.datamodule, inplace=True).model.eval()


def _library_sources() -> str:
    import lightning_unlearn

    root = Path(lightning_unlearn.__file__).parent
    return "".join(f.read_text() for f in sorted(root.rglob("*.py")))


default.fingerprint = _library_sources()  # its cache key follows the library, not this file


def distill_whole(task: Task) -> nn.Module:
    """Reference row: DELETE-style masked-logit distillation of the whole model, 100 Adam steps lr 1e-3, 32+32."""
    return distill(task)


def headfit(task: Task) -> nn.Module:
    """(a) Head-row calibration alone: forgotten rows re-initialised and fit on retain features, original's schedule."""
    return head_fit(task)


def distill_headfit(task: Task) -> nn.Module:
    """(a) Whole-model distillation, then the head-row calibration."""
    return head_fit(task, distill(task))


def _distill_masked(ratio: float, random: bool = False) -> Method:
    def method(task: Task) -> nn.Module:
        scores = {} if random else distill_grad_scores(task)
        masks = channel_masks(task.original, scores, ratio, seed=task.seed if random else None)
        return distill(task, masks=masks)
    method.__name__ = method.__qualname__ = f"distill_{'random' if random else 'gradmask'}_{int(ratio * 100)}"
    method.__doc__ = f"(a, d) Distillation restricted to {ratio:.0%} of each layer's channels ({'random' if random else 'distillation gradient x weight'})."
    return method


def _distill_budget(fraction: float, then_headfit: bool = False, copies: int = 0, keep: str = "ce") -> Method:
    def method(task: Task) -> nn.Module:
        model = distill(task, steps=retrain_budget(task, fraction), copies=copies, keep=keep)
        return head_fit(task, model) if then_headfit else model
    method.__name__ = method.__qualname__ = (f"distill{'_aug' if copies else ''}{'_headfit' if then_headfit else ''}"
                                             f"{'_kl' if keep == 'kl' else ''}_b{int(fraction * 100)}")
    return method


def _masked_headfit(ratio: float) -> Method:
    def method(task: Task) -> nn.Module:
        masks = channel_masks(task.original, distill_grad_scores(task), ratio)
        return head_fit(task, distill(task, steps=retrain_budget(task, 0.06), masks=masks))
    method.__name__ = method.__qualname__ = f"gradmask_{int(ratio * 100)}_headfit_b6"
    method.__doc__ = f"(a) Distillation on {ratio:.0%} of each layer's channels (gradient x weight), then the head-row fit."
    return method


CANDIDATES: dict[str, Method] = {
    "default": default,
    "distill_whole": distill_whole,
    "headfit": headfit,
    "distill_headfit": distill_headfit,
    **{f"distill_gradmask_{r}": _distill_masked(r / 100) for r in (5, 10, 30)},
    "distill_random_10": _distill_masked(0.10, random=True),
    **{f"distill_b{f}": _distill_budget(f / 100) for f in (3, 6)},
    **{f"distill_headfit_b{f}": _distill_budget(f / 100, True) for f in (3, 6)},
    "distill_aug_headfit_b6": _distill_budget(0.06, True, copies=4),
    "distill_headfit_kl_b6": _distill_budget(0.06, True, keep="kl"),
    "distill_aug_headfit_kl_b6": _distill_budget(0.06, True, copies=4, keep="kl"),
    **{f"gradmask_{r}_headfit_b6": _masked_headfit(r / 100) for r in (10, 30)},
}


def heldout_b6(task: Task) -> nn.Module:
    """(b) Held-out-like target, 6% of retraining's steps."""
    return heldout_distill(task, retrain_budget(task, 0.06))


def heldout_noise_b6(task: Task) -> nn.Module:
    """(b, c) The same after seeded Gaussian noise (2% of each tensor's std)."""
    return heldout_distill(task, retrain_budget(task, 0.06), noise=0.02)


def augment_b6(task: Task) -> nn.Module:
    """(b) Perturbed-copies target, 6% of retraining's steps."""
    return augment_distill(task, retrain_budget(task, 0.06))


def reinit30_repair_b10(task: Task) -> nn.Module:
    """(b) Destroy 30% (forget-gradient-explained), repair on retain for 10% of retraining's steps."""
    return reinit_repair(task, 0.3, retrain_budget(task, 0.10))


def heldout_kl_b6(task: Task) -> nn.Module:
    """(b) Held-out-like target, retain samples kept at the original's softmax (KL), 6% of retraining's steps."""
    return heldout_distill(task, retrain_budget(task, 0.06), keep="kl")


def heldout_kl_noise_b6(task: Task) -> nn.Module:
    """(b, c) The same after seeded Gaussian noise (2% of each tensor's std)."""
    return heldout_distill(task, retrain_budget(task, 0.06), noise=0.02, keep="kl")


def noop(task: Task) -> nn.Module:
    """Doing nothing (the original itself, as a method: its timing and the same population code path)."""
    return task.original.eval()


def _add_noise(model: nn.Module, noise: float, seed: int) -> nn.Module:
    """(c) Seeded Gaussian noise, ``noise`` x each weight tensor's std (biases and norm scales left alone)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
    return model


def distill_headfit_noise_b6(task: Task) -> nn.Module:
    """(a, c) Seeded noise (5% of each weight tensor's std), distillation (6% of retraining's steps), head-row fit."""
    _add_noise(task.original, 0.05, task.seed)
    return head_fit(task, distill(task, steps=retrain_budget(task, 0.06)))


def reinit30_distill_headfit_b10(task: Task) -> nn.Module:
    """(a) Destroy 30% of weights (largest forget-gradient x weight, seeded re-init), repair by the masked-logit
    distillation for 10% of retraining's steps, then the head-row fit."""
    model, dm = task.original, task.datamodule
    teacher = copy.deepcopy(model).eval()
    _norm_eval(model)
    xf, yf = next(_stream(dm.forget_set, 256, task.seed))
    model.zero_grad()
    F.cross_entropy(model(xf), yf).backward()
    torch.manual_seed(task.seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2 or p.grad is None:
                continue
            score = (p.grad * p).abs().flatten()
            idx = score.topk(max(1, int(0.3 * score.numel()))).indices
            fresh = torch.empty_like(p)
            nn.init.kaiming_uniform_(fresh, a=5 ** 0.5)
            p.view(-1)[idx] = fresh.view(-1)[idx]
    model.zero_grad()
    task = Task(original=teacher, datamodule=dm, recipe=task.recipe, num_classes=task.num_classes, seed=task.seed)
    return head_fit(task, distill(task, steps=retrain_budget(task, 0.10), model=model))


def neighbour_distill(task: Task, steps: int, lr: float = 1e-3, batch: int = 32) -> nn.Module:
    """(a) Forget samples trained by cross-entropy toward the original's best remaining class (hard label: a
    retrained model sends them confidently to a neighbour), retain samples by cross-entropy."""
    model, teacher, dm = task.original, copy.deepcopy(task.original).eval(), task.datamodule
    classes = tuple(dm.request.classes)
    forget, retain = _stream(dm.forget_set, batch, task.seed), _stream(dm.retain_set, batch, task.seed + 1)
    torch.manual_seed(task.seed)
    _norm_eval(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        (xf, yf), (xr, yr) = next(forget), next(retain)
        label = masked_target(teacher, xf, yf, task.num_classes, classes).argmax(1)
        loss = F.cross_entropy(model(xf), label) + F.cross_entropy(model(xr), yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def neighbour_headfit_b6(task: Task) -> nn.Module:
    """(a) Hard neighbour labels for 6% of retraining's steps, then the head-row fit."""
    return head_fit(task, neighbour_distill(task, retrain_budget(task, 0.06)))


def probe_b0(task: Task) -> nn.Module:
    """(a) The whole head re-initialised and refit on the original's retain features for its schedule (body kept)."""
    return head_fit(task, all_rows=True)


def distill_probe_b6(task: Task) -> nn.Module:
    """(a) Distillation (6% of retraining's steps), then the whole head refit on retain features."""
    return head_fit(task, distill(task, steps=retrain_budget(task, 0.06)), all_rows=True)


def _adam_recipe(task: Task) -> Task:
    recipe = {**task.recipe, "optimizer": "Adam", "lr": 1e-3, "weight_decay": 0.0}
    return Task(original=task.original, datamodule=task.datamodule, recipe=recipe, num_classes=task.num_classes,
                seed=task.seed)


def distill_headfit_adam_b6(task: Task) -> nn.Module:
    """(a) Distillation (6%), then the head-row fit with Adam lr 1e-3 whatever the original's optimizer (Adam's
    normalised steps keep pushing the never-seen logit down after its probability is tiny; SGD's stop)."""
    return head_fit(_adam_recipe(task), distill(task, steps=retrain_budget(task, 0.06)))


def headfit_adam(task: Task) -> nn.Module:
    """(a) The head-row fit alone, with Adam lr 1e-3 for the original's epochs x batches."""
    return head_fit(_adam_recipe(task))


def local_heldout(task: Task, steps: int, lr: float = 1e-3, batch: int = 32, copies: int = 4) -> nn.Module:
    """(b) Per-sample held-out estimate: each forget sample's true logit lowered by how much more confident the
    original is on it than on its perturbed copies (clipped at 0; a memorised atypical sample drops most);
    distilled toward that softmax, retain samples kept at the original's softmax (KL)."""
    model, teacher, dm = task.original, copy.deepcopy(task.original).eval(), task.datamodule
    forget, retain = _stream(dm.forget_set, batch, task.seed), _stream(dm.retain_set, batch, task.seed + 1)
    gen = torch.Generator().manual_seed(task.seed + 2)
    torch.manual_seed(task.seed)
    _norm_eval(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        (xf, yf), (xr, yr) = next(forget), next(retain)
        with torch.no_grad():
            logits = teacher(xf).float()
            near = torch.stack([_phi(teacher, perturbed(xf, gen), yf) for _ in range(copies)]).mean(0).float()
            drop = (_phi(teacher, xf, yf).float() - near).clamp(min=0)
            target = logits.scatter_add(1, yf[:, None], -drop[:, None]).softmax(1)
        loss = F.kl_div(F.log_softmax(model(xf), 1), target, reduction="batchmean") + keep_loss("kl", model, teacher, xr, yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def local_heldout_b3(task: Task) -> nn.Module:
    """(b) The per-sample held-out estimate, 3% of retraining's steps."""
    return local_heldout(task, retrain_budget(task, 0.03))


def local_heldout_b6(task: Task) -> nn.Module:
    """(b) The per-sample held-out estimate, 6% of retraining's steps."""
    return local_heldout(task, retrain_budget(task, 0.06))


def heldout_kl_b3(task: Task) -> nn.Module:
    """(b) Held-out-like target with the KL retain term, 3% of retraining's steps."""
    return heldout_distill(task, retrain_budget(task, 0.03), keep="kl")


SAMPLE_CANDIDATES: dict[str, Method] = {
    "local_heldout_b3": local_heldout_b3,
    "local_heldout_b6": local_heldout_b6,
    "heldout_kl_b3": heldout_kl_b3,
    "heldout_kl_b6": heldout_kl_b6,
    "heldout_kl_noise_b6": heldout_kl_noise_b6,
    "heldout_b6": heldout_b6,
    "heldout_noise_b6": heldout_noise_b6,
    "augment_b6": augment_b6,
    "reinit30_repair_b10": reinit30_repair_b10,
}
CANDIDATES.update(SAMPLE_CANDIDATES)
CANDIDATES.update({"distill_headfit_noise_b6": distill_headfit_noise_b6,
                   "neighbour_headfit_b6": neighbour_headfit_b6, "distill_headfit_adam_b6": distill_headfit_adam_b6,
                   "headfit_adam": headfit_adam, "probe_b0": probe_b0, "distill_probe_b6": distill_probe_b6,
                   "reinit30_distill_headfit_b10": reinit30_distill_headfit_b10})
