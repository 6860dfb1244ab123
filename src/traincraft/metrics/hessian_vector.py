"""Hessian-vector products by double backward (Pearlmutter 1994), and the diagnosis of a model that refuses them.

H is never formed: :func:`hessian_vector_operator` returns ``v ↦ Hv`` on flat vectors that concatenate all
parameters, which the spectrum estimators (:mod:`traincraft.metrics.spectrum`) and the trace and threshold
functions (:mod:`traincraft.metrics.hessian`) take. Nothing is copied to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

Operator = Callable[[Tensor], Tensor]

_NO_DOUBLE_BACKWARD = (
    "the model does not support double backward, which Hessian-vector products need ({error}). Replace "
    "operations marked @once_differentiable (some custom autograd Functions and fused kernels) with "
    "differentiable ones, or do not use the curvature probe with this model."
)


class DoubleBackwardError(RuntimeError):
    """The loss's graph cannot be differentiated twice; ``reason`` says what autograd found."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def _no_double_backward(reason: str) -> DoubleBackwardError:
    return DoubleBackwardError(_NO_DOUBLE_BACKWARD.format(error=reason), reason)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat fp32 vector."""
    return torch.cat([t.reshape(-1).float() for t in tensors])


def hessian_vector_operator(loss: Tensor, params: Sequence[Tensor]) -> tuple[Operator, Tensor]:
    """Build ``v ↦ Hv`` for ``loss`` w.r.t. ``params``, and return it with the flat gradient.

    The gradient graph is built once (``create_graph=True``) and kept, so each product costs one extra backward.

    Raises:
        RuntimeError: the graph cannot be differentiated twice.
    """
    params = list(params)
    if loss.ndim != 0:
        raise ValueError(f"the loss must be a scalar; got shape {tuple(loss.shape)}. Reduce it (mean) first.")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=False)]
    if not any(g.requires_grad for g in grads):
        raise _no_double_backward("the gradient has no graph")
    # A once-differentiable backward leaves an error node in the gradient's graph; autograd raises only if a
    # product happens to traverse it, and may otherwise silently drop those second-order terms.
    blocked = _first_error_node([g.grad_fn for g in grads if g.grad_fn is not None])
    if blocked is not None:
        raise _no_double_backward(f"found a {blocked} node in the gradient's graph")
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]
    differentiable = [g for g in grads if g.requires_grad]
    index = [i for i, g in enumerate(grads) if g.requires_grad]

    def hvp(vector: Tensor) -> Tensor:
        pieces = [piece.view(shape).to(params[i].dtype) for i, (piece, shape) in enumerate(zip(vector.split(numels), shapes, strict=False))]
        try:
            products = torch.autograd.grad(
                differentiable, params, grad_outputs=[pieces[i] for i in index], retain_graph=True, allow_unused=True
            )
        except RuntimeError as error:
            if "modified by an inplace operation" in str(error):
                raise RuntimeError(
                    "the weights (or a tensor the loss depends on) changed in place after this Hessian-vector "
                    "operator was built, e.g. by an optimizer step; build a new operator at the current weights."
                ) from error
            raise _no_double_backward(str(error).splitlines()[0]) from error
        return torch.cat([
            (torch.zeros(n, device=vector.device) if h is None else h.reshape(-1).float()) for h, n in zip(products, numels, strict=False)
        ])

    return hvp, flatten([g.detach() for g in grads])


def _first_error_node(roots: list) -> Optional[str]:
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if name in ("Error", "DelayedError"):
            return name
        stack.extend(fn for fn, _ in node.next_functions)
    return None


def module_without_double_backward(model: nn.Module, compute_loss: Callable[[], Tensor]) -> Optional[str]:
    """Qualified name of the innermost module of ``model`` whose forward cannot be differentiated twice.

    Runs ``compute_loss()`` once with forward hooks that record each module's first call, then replays the calls
    innermost first (the order in which they return), differentiating each module's outputs twice with respect to
    its inputs and parameters. ``""`` means ``model``'s own forward outside its submodules; ``None``: no module
    fails alone. Slow (a diagnosis, for the error message): call it only after a product failed.
    """
    names = {id(module): name for name, module in model.named_modules()}
    calls: dict[int, tuple[nn.Module, tuple, dict]] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.setdefault(id(module), (module, _detach(args), _detach(kwargs)))

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in model.modules()]
    try:
        with torch.enable_grad():
            compute_loss()
    finally:
        for handle in handles:
            handle.remove()
    for module, args, kwargs in calls.values():  # dicts keep insertion order: children return before parents
        if not _twice_differentiable(module, args, kwargs):
            return names.get(id(module))
    return None


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _leaves(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return []


def _with_grad(value: Any, leaves: list[Tensor]) -> Any:
    """A copy of ``value`` whose float tensors are fresh non-leaf tensors of new leaves (appended to ``leaves``):
    non-leaf, so that in-place modules (``ReLU(inplace=True)``) replay as they ran."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            return value
        leaves.append(value.detach().clone().requires_grad_(True))
        return leaves[-1].clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_with_grad(v, leaves) for v in value)
    if isinstance(value, dict):
        return {k: _with_grad(v, leaves) for k, v in value.items()}
    return value


def _twice_differentiable(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    leaves: list[Tensor] = []
    with torch.enable_grad():
        args, kwargs = _with_grad(args, leaves), _with_grad(kwargs, leaves)
        inputs = leaves + [p for p in module.parameters() if p.requires_grad]
        try:
            outputs = [o for o in _leaves(module(*args, **kwargs)) if o.requires_grad]
        except Exception:  # the replay itself fails (a module with side conditions): no verdict on it
            return True
        if not outputs or not inputs:
            return True
        try:
            # cotangents that require grad: a once-differentiable backward then leaves its error node in the
            # gradient's graph (or, worse, a gradient without a graph, which would silently drop second-order terms)
            weights = [torch.randn_like(o, dtype=torch.float32).requires_grad_(True) for o in outputs]
            total = sum((o.float() * w).sum() for o, w in zip(outputs, weights, strict=True))
            grads = [g for g in torch.autograd.grad(total, inputs, create_graph=True, allow_unused=True) if g is not None]
            if any(not g.requires_grad for g in grads) or _first_error_node([g.grad_fn for g in grads]) is not None:
                return False
            if grads:
                second = sum((g.float() * torch.randn_like(g, dtype=torch.float32)).sum() for g in grads)
                torch.autograd.grad(second, inputs, allow_unused=True)
        except RuntimeError:
            return False
    return True


def params_of(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of ``module``, in a fixed order."""
    return [p for p in module.parameters() if p.requires_grad]
