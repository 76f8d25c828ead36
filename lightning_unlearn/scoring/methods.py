"""The built-in scoring methods, in registry order (``grad_x_act`` first: the default).

Scores are signed so that a positive score means "this channel supports the forget target
(the true-label logit)"; ``ablation`` is literally the drop of that logit when the channel
is zeroed, and ``grad_x_act`` is its first-order Taylor estimate.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any

import torch
from captum.attr import LayerActivation, LayerConductance, LayerGradCam, LayerGradientXActivation
from torch import Tensor, nn

from lightning_unlearn.scoring.base import ChannelScorer, channel_axis, channels_first, out_channels, register_scorer


def _sum_per_channel(attr: Tensor) -> Tensor:
    """(N, C, *positions) attributions -> (C,) summed over samples and positions."""
    return attr.detach().reshape(attr.shape[0], attr.shape[1], -1).sum(dim=(0, 2)).double()


def _per_channel(layer: nn.Module, attr: Tensor) -> Tensor:
    """Attributions of ``layer``'s output shape -> (C,) summed over samples and positions (tokens included)."""
    return _sum_per_channel(channels_first(layer, attr))


def _per_row(t: Tensor) -> Tensor:
    """Sum of a parameter's elements per output channel (dim 0)."""
    return t.reshape(t.shape[0], -1).sum(1)


@register_scorer
class GradientXActivation(ChannelScorer):
    """captum ``LayerGradientXActivation`` over all layers in one backward pass."""

    name = "grad_x_act"

    def __init__(self, model: nn.Module, layers: list[nn.Module], **options: Any) -> None:
        super().__init__(model, layers)
        self._captum = LayerGradientXActivation(model, self.layers)

    def score_batch(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [_per_channel(layer, a) for layer, a in zip(self.layers, self._captum.attribute(x, target=y))]


@register_scorer
class Ablation(ChannelScorer):
    """Drop of the target logit when a channel is zeroed; batched, same numbers as captum ``LayerFeatureAblation``."""

    name = "ablation"
    default_max_samples = 512
    max_rows = 4096  # samples x ablated channels in one forward pass

    def score_batch(self, x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.no_grad():
            original = self.model(x).gather(1, y[:, None]).squeeze(1)
            return [self._ablate_layer(layer, x, y, original).double() for layer in self.layers]

    def _ablate_layer(self, layer: nn.Module, x: Tensor, y: Tensor, original: Tensor) -> Tensor:
        """Drop of the target logit when each output channel of ``layer`` is zeroed, summed over the batch.

        Channels are ablated K at a time in one forward pass: the layer's output is replicated K
        times inside a forward hook, so only the layers after it run on the K-fold batch. A model
        whose tail mixes tensors from before the layer (a residual across it) cannot take that
        batch; it falls back to repeating the input, which recomputes the prefix too.
        """
        n = x.shape[0]
        channels = out_channels(layer)
        chunk = max(1, self.max_rows // n)
        total = torch.zeros(channels, device=x.device)
        for start in range(0, channels, chunk):
            k = min(chunk, channels - start)
            keep = torch.ones(k, channels, device=x.device)
            keep[torch.arange(k), torch.arange(start, start + k)] = 0
            logits = self._ablated_logits(layer, x, keep)
            target = logits.gather(1, y.repeat(k)[:, None]).squeeze(1)
            total[start : start + k] = (original.repeat(k) - target).view(k, n).sum(1)
        return total

    def _ablated_logits(self, layer: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
        k, n = keep.shape[0], x.shape[0]

        def keep_shape(out: Tensor) -> list[int]:  # (k, 1, ...) with the channels on the layer's channel axis
            shape = [k] + [1] * out.dim()
            shape[1 + channel_axis(layer, out.dim())] = keep.shape[1]
            return shape

        def expand(_, __, out):
            return (out.unsqueeze(0) * keep.view(keep_shape(out))).reshape(k * n, *out.shape[1:])

        def in_place(_, __, out):
            return (out.view(k, n, *out.shape[1:]) * keep.view(keep_shape(out))).reshape(out.shape)

        handle = layer.register_forward_hook(expand)
        try:
            logits = self.model(x)
            if logits.shape[0] == k * n:
                return logits
        except RuntimeError:
            pass
        finally:
            handle.remove()
        handle = layer.register_forward_hook(in_place)
        try:
            return self.model(x.repeat(k, *([1] * (x.dim() - 1))))
        finally:
            handle.remove()


@register_scorer
class GradCam(ChannelScorer):
    """captum ``LayerGradCam`` per layer, kept per channel (no summation over channels). Over tokens (a Linear
    layer's ``(N, tokens, C)`` output) captum would average the gradient over the channels; there each channel is
    weighted by its own gradient averaged over the tokens, Grad-CAM's rule with the channels last."""

    name = "gradcam"

    def __init__(self, model: nn.Module, layers: list[nn.Module], **options: Any) -> None:
        super().__init__(model, layers)
        self._captum = [LayerGradCam(model, layer) for layer in self.layers]
        self._gradients = LayerGradientXActivation(model, self.layers, multiply_by_inputs=False)
        self._activations = LayerActivation(model, self.layers)

    def score_batch(self, x: Tensor, y: Tensor) -> list[Tensor]:
        scores = [m.attribute(x, target=y, attr_dim_summation=False) for m in self._captum]
        tokens = [i for i, (layer, s) in enumerate(zip(self.layers, scores)) if channel_axis(layer, s.dim()) != 1]
        if tokens:
            gradients, activations = self._gradients.attribute(x, target=y), self._activations.attribute(x)
            for i in tokens:
                g, a = (channels_first(self.layers[i], t) for t in (gradients[i], activations[i]))
                scores[i] = g.mean(dim=tuple(range(2, g.dim())), keepdim=True) * a
        return [_sum_per_channel(s) if i in tokens else _per_channel(layer, s)
                for i, (layer, s) in enumerate(zip(self.layers, scores))]


@register_scorer
class Conductance(ChannelScorer):
    """captum ``LayerConductance`` per layer with ``n_steps`` integration steps."""

    name = "conductance"
    default_max_samples = 512

    def __init__(self, model: nn.Module, layers: list[nn.Module], n_steps: int = 16, **options: Any) -> None:
        if not (isinstance(n_steps, Integral) and n_steps >= 1):
            raise ValueError(f"conductance n_steps must be an integer >= 1, got {n_steps!r}")
        super().__init__(model, layers)
        self.n_steps = n_steps
        self._captum = [LayerConductance(model, layer) for layer in self.layers]

    def score_batch(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [_per_channel(layer, m.attribute(x, target=y, n_steps=self.n_steps))
                for layer, m in zip(self.layers, self._captum)]


@register_scorer
class WeightSaliency(ChannelScorer):
    """SalUn-style: |gradient of the forget loss| per parameter, accumulated over the data, summed per channel."""

    name = "weight_saliency"

    def score_batch(self, x: Tensor, y: Tensor) -> list[list[Tensor]]:
        """Signed gradient sums per parameter (weight, bias) of each layer; ``|.|`` is taken in ``finalize``."""
        params = [[p for p in (layer.weight, layer.bias) if p is not None] for layer in self.layers]
        flat = [p for ps in params for p in ps]
        flags = [p.requires_grad for p in flat]
        try:
            for p in flat:
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(self.model(x), y, reduction="sum")
                grads = iter(torch.autograd.grad(loss, flat))
        finally:
            for p, flag in zip(flat, flags):
                p.requires_grad_(flag)
        return [[next(grads).double() for _ in ps] for ps in params]

    def finalize(self, sums: list, count: int) -> list[Tensor]:
        return super().finalize([sum(_per_row(g.abs()) for g in grads) for grads in sums], count)
