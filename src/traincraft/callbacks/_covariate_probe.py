"""Layer selection and the per-layer accumulator behind CovariateShiftMonitor: everything stays on the device."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from torch import nn

from traincraft.metrics import moments as M

RELU_TYPES = (nn.ReLU, nn.ReLU6)
SATURATING_TYPES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
ACTIVATION_MODULE = nn.modules.activation.__name__
PERCENTILES = (15.0, 50.0, 85.0)
#: Modules that make a model a sequence model, whose 3-D activations are ``(N, T, features)``, not ``(N, C, L)``.
SEQUENCE_TYPES = (nn.Embedding, nn.MultiheadAttention, nn.RNNBase, nn.TransformerEncoderLayer,
                  nn.TransformerDecoderLayer)
FeatureAxis = Literal["auto", "channels", "last"]


def is_sequence_model(root: nn.Module) -> bool:
    """True when ``root`` holds embeddings, attention or recurrent layers: its 3-D activations are sequences."""
    return any(isinstance(m, SEQUENCE_TYPES) for m in root.modules())


def feature_dim(module: nn.Module, ndim: int, axis: FeatureAxis, sequence: bool) -> int:
    """The dimension of a layer input that holds its features (channels); every other one is reduced.

    ``auto``: LayerNorm normalizes the trailing dimension, so its features are the last one; BatchNorm, InstanceNorm
    and GroupNorm normalize per channel, dimension 1. Activations follow the layout: ``(N, C)`` and
    ``(N, C, *spatial)`` with 2 or more spatial dimensions use dimension 1; a 3-D input is ``(N, T, features)``
    (last) in a sequence model (see :func:`is_sequence_model`) and ``(N, C, L)`` (dimension 1) otherwise.
    """
    if axis == "channels" or ndim == 2:
        return 1
    if axis == "last" or isinstance(module, nn.LayerNorm):
        return ndim - 1
    if isinstance(module, NORM_TYPES):
        return 1
    return ndim - 1 if ndim == 3 and sequence else 1


def is_default_layer(module: nn.Module) -> bool:
    """The inputs of nonlinearities and normalization layers: where covariate shift and saturation show."""
    cls = type(module)
    return (cls.__module__ == ACTIVATION_MODULE and not isinstance(module, (nn.MultiheadAttention, nn.Softmax))) or (
        isinstance(module, NORM_TYPES)
    )


def is_compiled(root: nn.Module) -> bool:
    """True when ``root`` or a submodule is wrapped by ``torch.compile`` (or Lightning compiled its forward).

    Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): a hook added after
    a graph was compiled is silently never called, so hooks on such models must exist before the first forward.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    return getattr(root, "_compiler_ctx", None) is not None or any(isinstance(m, OptimizedModule)
                                                                  for m in root.modules())


def select_layers(root: nn.Module, patterns: Optional[Sequence[str]]) -> list[tuple[str, nn.Module]]:
    """Modules of ``root`` matched by a type name (``"ReLU"``) or a glob on their name (``"model.blocks.*.act"``);
    the default set when ``patterns`` is ``None``."""
    named = [(name, module) for name, module in root.named_modules() if name]
    if patterns is None:
        chosen = [(name, m) for name, m in named if is_default_layer(m)]
        if not chosen:
            raise ValueError(
                f"CovariateShiftMonitor: {type(root).__name__} has no activation or normalization modules to monitor (functional "
                "activations cannot be hooked). Pass layers=[...] with module names or type names, e.g. "
                f"{[n for n, _ in named[:4]]}."
            )
        return chosen
    chosen = [
        (name, m)
        for name, m in named
        if any(type(m).__name__ == p or fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
    if not chosen:
        types = sorted({type(m).__name__ for _, m in named})
        raise ValueError(
            f"layers={list(patterns)} match no module of {type(root).__name__}. Use module type names ({types}) or "
            f"globs on module names (e.g. {[n for n, _ in named[:6]]})."
        )
    return chosen


class LayerProbe:
    """Statistics of one layer's input, accumulated over the batches seen while the probe is attached."""

    def __init__(self, name: str, module: nn.Module, max_rows: int, percentile_samples: int,
                 axis: FeatureAxis = "auto", sequence: bool = False) -> None:
        self.name, self.module = name, module
        self.axis, self.sequence = axis, sequence
        self.max_rows, self.percentile_samples = max_rows, percentile_samples
        self.saturating = next((kind for cls, kind in SATURATING_TYPES.items() if isinstance(module, cls)), None)
        self.relu = isinstance(module, RELU_TYPES)
        self.batchnorm = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        self.handle: Optional[Any] = None
        self.active = True  # read by the hook: a persistent hook (compiled models) is switched, not removed
        self.reset()

    def reset(self) -> None:
        self.moments = M.RunningMoments()
        self.fraction_sum: Optional[torch.Tensor] = None
        self.samples: list[torch.Tensor] = []
        self.bn_sum: Optional[torch.Tensor] = None
        self.batches = 0

    def attach(self) -> None:
        if self.handle is None:
            self.handle = self.module.register_forward_pre_hook(self._hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple) -> None:
        if not self.active or not args or not isinstance(args[0], torch.Tensor) or args[0].ndim < 2:
            return
        full = args[0].detach()
        x = full[: self.max_rows]
        dim = feature_dim(module, x.ndim, self.axis, self.sequence)
        # the one layout copy, (features, values): every statistic below reads it
        v = M.channels_first(x) if dim == 1 else x.reshape(-1, x.shape[-1]).t().contiguous()
        batch = M.moments_of_rows(v)
        self.moments.merge(batch)
        if self.relu:
            fraction = (v <= 0).sum(1, dtype=torch.float32)
        elif self.saturating:
            fraction = (v.abs() > M.saturation_threshold(self.saturating)).sum(1, dtype=torch.float32)
        else:
            fraction = None
        if fraction is not None:
            self.fraction_sum = fraction if self.fraction_sum is None else self.fraction_sum + fraction
        stride = max(1, -(-v.shape[1] // self.percentile_samples))
        self.samples.append(v[:, ::stride].float())
        if self.batchnorm and module.running_mean is not None:
            # BatchNorm normalizes with statistics of the whole batch, so compare those, not the subsample's.
            count, mean, m2 = batch if dim == 1 and x.shape[0] == full.shape[0] else M.channel_moments(full)
            gap, ratio = M.batchnorm_gap(mean, m2 / (count - 1).clamp_min(1), module.running_mean,
                                         module.running_var, module.eps)
            pair = torch.stack([gap, ratio])
            self.bn_sum = pair if self.bn_sum is None else self.bn_sum + pair
        self.batches += 1

    def result(self) -> Optional[dict[str, torch.Tensor]]:
        """Per-channel device tensors of what was seen since the last reset, or ``None`` if nothing was."""
        if self.batches == 0:
            return None
        samples = torch.cat(self.samples, dim=1)
        if samples.shape[1] > self.percentile_samples:
            samples = samples[:, :: -(-samples.shape[1] // self.percentile_samples)]
        out = {
            "mean": self.moments.mean.float(),
            "std": self.moments.std(unbiased=False).float(),
            "percentiles": M.quantiles_of_rows(samples, [p / 100 for p in PERCENTILES]),
            "samples": samples,
        }
        if self.fraction_sum is not None:
            out["dead_frac" if self.relu else "sat_frac"] = self.fraction_sum / self.moments.count.float()
        if self.bn_sum is not None:
            out["bn_mean_gap"], out["bn_var_ratio"] = self.bn_sum / self.batches
        return out
