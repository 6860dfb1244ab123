"""How DataDriftMonitor turns a batch into per-sample features ``(samples, features)``: the model's output, the
output of one named module, or a function of the batch; sequence outputs reduced along time. Every way this can go
wrong on a given model or batch is named here, with what to set instead."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

Reduce = Literal["mean", "last", "flatten"]
Forward = Literal["input", "unpack"]
# what a failed model call may raise that a wrong configuration explains; anything else (out of memory) passes
_CALL_ERRORS = (TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError)
_SEQUENCE_MODULES = (nn.Embedding, nn.EmbeddingBag, nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
                     nn.TransformerEncoderLayer, nn.LSTM, nn.GRU, nn.RNN)


def import_callable(path: str) -> Callable[[Any], torch.Tensor]:
    """``"package.module.function"`` → the function (so that YAML configurations can name one)."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"features={path!r} is not a dotted import path; give 'package.module.function' (a function "
                         f"of the batch returning a (samples, ...) tensor) or pass the callable itself.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"features={path!r}: cannot import module {module_name!r} ({err}). Check the spelling and "
                         f"that the module is importable (installed, or on PYTHONPATH).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:12]
        raise ValueError(f"features={path!r}: module {module_name!r} has no callable {name!r}; its public callables "
                         f"include {public}.")
    return fn


def reduce_features(x: torch.Tensor, how: Reduce) -> torch.Tensor:
    """A ``(samples, ...)`` tensor as ``(samples, features)`` float32.

    ``(B,)`` → one feature; ``(B, D)`` as is; ``(B, T, D)`` is read as a batch-first sequence (time, then features)
    and reduced over time: ``"mean"`` averages the steps, ``"last"`` keeps the last one, ``"flatten"`` keeps all
    (``T·D`` features, so every batch needs the same length); ``(B, C, *spatial)`` maps average the spatial
    dimensions (one feature per channel) or, with ``"flatten"``, keep them.
    """
    x = x.detach().float()  # bf16 / fp16 outputs: the statistics run in float32 (and float64 inside the KS test)
    if x.ndim == 1:
        return x[:, None]
    if x.ndim == 2:
        return x
    if how == "flatten":
        return x.flatten(1)
    if x.ndim == 3:
        return x.mean(1) if how == "mean" else x[:, -1]
    if how == "last":
        raise ValueError(f"reduce='last' keeps the last time step of (batch, time, features) outputs; these features "
                         f"have shape {tuple(x.shape)} ({x.ndim}-D). Use reduce='mean' (one feature per channel) "
                         f"or reduce='flatten'.")
    return x.flatten(2).mean(2)


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The first tensor of a nested batch, depth first in order (mappings by their values)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, Mapping):
            item = list(item.values())
        if isinstance(item, (tuple, list)):
            pending.extend(reversed(item))  # a stack: the first item is looked at next
    return None


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, Mapping):
        return "dict {" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} (" + ", ".join(_shape(v) for v in value) + ")"
    return type(value).__name__


def _required_positional(fn: Callable) -> Optional[list[str]]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins, some compiled wrappers: nothing to say statically
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def suggested_layers(module: nn.Module, limit: int = 12) -> list[str]:
    """Module names worth suggesting: embeddings and sequence blocks first, then the rest in order."""
    named = [(n, m) for n, m in module.named_modules() if n]
    first = [n for n, m in named if isinstance(m, _SEQUENCE_MODULES)]
    return (first + [n for n, _ in named if n not in first])[:limit]


class FeatureExtractor:
    """Per-sample features of one batch, computed the same way for the reference and the current sample.

    The model runs (``layer`` set or no ``features``) as ``model(batch[input_key])`` (``forward="input"``) or
    ``model(*batch)`` / ``model(**batch)`` (``forward="unpack"``); ``layer``'s first output in that call is kept
    (an embedding applied to the inputs, then to the targets, gives the inputs'). ``features`` is called on the
    whole batch instead and the model does not run.
    """

    def __init__(self, layer: Optional[str], features: Union[str, Callable[[Any], torch.Tensor], None],
                 input_key: Union[int, str, None], forward: Forward, reduce: Reduce) -> None:
        self.layer, self.input_key, self.forward, self.reduce = layer, input_key, forward, reduce
        self.name = features if isinstance(features, str) else getattr(features, "__qualname__", None)
        self.fn = import_callable(features) if isinstance(features, str) else features

    def describe(self) -> str:
        if self.fn is not None:
            return f"features={self.name or self.fn!r}"
        return "the model's output" if self.layer is None else f"the output of layer {self.layer!r}"

    # ---------------------------------------------------------------------------------------- before any batch
    def check_module(self, module: nn.Module) -> None:
        """What can be told without a batch: the layer exists, and ``model(input)`` fits ``forward``'s signature."""
        if self.fn is not None:
            return
        if self.layer is not None:
            resolve_layer(module, self.layer)
        required = _required_positional(module.forward)
        if self.forward == "input" and required is not None and len(required) > 1:
            cls = type(module).__name__
            raise TypeError(
                f"DataDriftMonitor computes {self.describe()} by calling {cls}(input) with one argument, but "
                f"{cls}.forward requires {len(required)}: ({', '.join(required)}). Pass forward='unpack' to call "
                f"{cls}(*batch) (or {cls}(**batch) for dict batches) together with layer= a module whose output "
                f"keeps one row per sample, e.g. one of {suggested_layers(module)}; or pass features= a function "
                f"of the batch (a callable, or 'package.module.function') that returns (samples, ...) features."
            )

    # ---------------------------------------------------------------------------------------- per batch
    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self.fn is not None:
            raw, samples = self.fn(batch), None
        else:
            raw, samples = self._run_model(module, batch)
        out = raw[0] if isinstance(raw, (tuple, list)) and raw else raw  # (output, state) of RNNs and the like
        where = self.describe()
        if not isinstance(out, torch.Tensor) or out.ndim == 0:
            raise ValueError(f"DataDriftMonitor: {where} is {_shape(out)}, not a (samples, ...) tensor. "
                             + self._fix(module))
        if not (out.is_floating_point() or out.is_complex()):
            raise ValueError(
                f"DataDriftMonitor: {where} has dtype {out.dtype} (shape {tuple(out.shape)}); drift tests compare "
                f"floating-point features. Token ids and class indices are labels, not measurements: take the "
                f"output of an embedding or a later layer (layer=), or return float features from features=."
            )
        if out.is_complex():
            raise ValueError(f"DataDriftMonitor: {where} is complex ({out.dtype}); return real features, e.g. "
                             f"torch.view_as_real(x).flatten(1) or x.abs(), from features=.")
        if samples is not None and out.shape[0] != samples:
            raise ValueError(
                f"DataDriftMonitor: {where} has shape {tuple(out.shape)}: {out.shape[0]} rows for a batch of "
                f"{samples} samples, so its rows are not samples (the output flattens the batch, e.g. "
                f".view(-1, vocab_size), or puts time first). " + self._fix(module)
            )
        return reduce_features(out, self.reduce)

    def _fix(self, module: nn.Module) -> str:
        return (f"Set layer= a module whose output has one row per sample, e.g. one of {suggested_layers(module)} "
                f"(3-D outputs are read as (batch, time, features) and reduced with reduce="
                f"{self.reduce!r}), or features= a function of the batch that returns (samples, ...) features.")

    def _arguments(self, module: nn.Module, batch: Any) -> tuple[tuple, dict, Any, str]:
        """``(args, kwargs, the input, how the call reads)`` of the model call on ``batch``."""
        cls = type(module).__name__
        if self.forward == "unpack":
            if isinstance(batch, Mapping):
                return (), dict(batch), batch, f"{cls}(**batch)"
            if isinstance(batch, (tuple, list)):
                return tuple(batch), {}, batch, f"{cls}(*batch)"
            return (batch,), {}, batch, f"{cls}(batch)"
        if isinstance(batch, Mapping):
            if self.input_key is None or self.input_key not in batch:
                got = "no input_key" if self.input_key is None else f"input_key={self.input_key!r}"
                raise ValueError(
                    f"DataDriftMonitor: the batch is a dict with keys {list(batch)} and {got} names none of them. "
                    f"Pass input_key= the key of the model's input (one of {list(batch)}), forward='unpack' to "
                    f"call {cls}(**batch), or features= a function of the batch."
                )
            return (batch[self.input_key],), {}, batch[self.input_key], f"{cls}(batch[{self.input_key!r}])"
        if isinstance(batch, (tuple, list)):
            key = 0 if self.input_key is None else self.input_key
            if not isinstance(key, int) or not -len(batch) <= key < len(batch):
                raise ValueError(
                    f"DataDriftMonitor: input_key={self.input_key!r} does not index the batch, a "
                    f"{type(batch).__name__} of {len(batch)} elements ({_shape(batch)}). Pass an integer in "
                    f"[0, {len(batch)}) or None (element 0)."
                )
            return (batch[key],), {}, batch[key], f"{cls}(batch[{key}])"
        if self.input_key is not None:
            raise ValueError(f"DataDriftMonitor: input_key={self.input_key!r} picks part of a tuple, list or dict "
                             f"batch, but the batch is {_shape(batch)}. Set input_key=None.")
        return (batch,), {}, batch, f"{cls}(batch)"

    def _run_model(self, module: nn.Module, batch: Any) -> tuple[Any, Optional[int]]:
        args, kwargs, inputs, call = self._arguments(module, batch)
        first = _first_tensor(inputs)
        samples = first.shape[0] if first is not None and first.ndim > 0 else None
        captured: list[Any] = []
        handle = None
        if self.layer is not None:
            handle = resolve_layer(module, self.layer).register_forward_hook(
                lambda _m, _a, out: captured.append(out) if not captured else None)
        try:
            output = module(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except _CALL_ERRORS as err:
            kind = next(k for k in _CALL_ERRORS if isinstance(err, k))
            raise kind(self._call_failed(module, batch, inputs, call, err)) from err
        finally:
            if handle is not None:
                handle.remove()
        if self.layer is None:
            return output, samples
        if not captured:
            raise ValueError(f"DataDriftMonitor: layer {self.layer!r} did not run during {call}. Choose a module "
                             f"that the forward pass uses, e.g. one of {suggested_layers(module)}.")
        return captured[0], samples

    def _call_failed(self, module: nn.Module, batch: Any, inputs: Any, call: str, err: Exception) -> str:
        cls = type(module).__name__
        try:
            signature = f"{cls}.forward{inspect.signature(module.forward)}"
        except (TypeError, ValueError):
            signature = f"{cls}.forward"
        hints = []
        if self.forward == "input" and isinstance(batch, (tuple, list, Mapping)) and len(batch) > 1:
            hints.append(f"forward='unpack' to call {cls}(*batch) / {cls}(**batch) if forward takes the batch's "
                         f"parts as arguments")
        first = _first_tensor(inputs)
        if first is not None and not (first.is_floating_point() or first.is_complex()):
            hints.append(f"layer= an embedding or sequence module (the input is {first.dtype} ids), e.g. one of "
                         f"{suggested_layers(module)}")
        hints.append("features= a function of the batch (a callable, or 'package.module.function') that returns "
                     "(samples, ...) features without calling the model")
        return (f"DataDriftMonitor computes {self.describe()} by calling {call} on each batch ({_shape(batch)}); "
                f"that call failed with {type(err).__name__}: {err}. The signature is {signature}. Pass "
                + "; or ".join(hints) + ".")


def resolve_layer(root: nn.Module, layer: Optional[str]) -> nn.Module:
    if layer is None:
        return root
    try:
        return root.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in root.named_modules() if name]
        raise ValueError(
            f"layer={layer!r} is not a module of {type(root).__name__}; use None (the model's output) or one of "
            f"{names[:12]}{' ...' if len(names) > 12 else ''}."
        ) from None
