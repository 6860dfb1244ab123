"""Curvature of the loss: Hessian-vector products, both ends of the spectrum, trace, and stability thresholds.

Along a direction of curvature h the best learning rate is 1/h and gradient descent diverges above 2/h; the
largest such h is λ_max, the largest *algebraic* eigenvalue of the Hessian H ("sharpness"), which :func:`lanczos`
finds together with λ_min (power iteration finds the largest magnitude, often a negative eigenvalue off a minimum).
H is never formed: every function here reaches it through Hessian-vector products (double backward, Pearlmutter
1994), on flat vectors that concatenate all parameters. Nothing is copied to the host.

Stability thresholds (the value of η·λ at which the iteration on a quadratic stops converging):

================================ ======================== =====================================================
optimizer                        threshold on η·λ         source
================================ ======================== =====================================================
gradient descent                 2                        classical
heavy-ball momentum β            2 + 2β                   Cohen et al. 2021, appendix (Polyak momentum)
Nesterov momentum β              (2 + 2β) / (1 + 2β)      Cohen et al. 2021, appendix
Adam/AdamW (β₁)                  (2 + 2β₁) / (1 - β₁)     Cohen et al. 2022 (38 for β₁ = 0.9), on P⁻¹H
RMSprop (momentum m), Adagrad    2 + 2m, 2                the same analysis, preconditioned
================================ ======================== =====================================================

For the adaptive optimizers the curvature is the *preconditioned* sharpness λ_max(P⁻¹H) with
P = diag(√v̂ + ε) from the optimizer's second-moment state (Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability"); this module computes it as λ_max(D^½ H D^½), D = diag(η/(√v̂ + ε)), which has the same
eigenvalues as η·P⁻¹H and keeps the operator symmetric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

Operator = Callable[[Tensor], Tensor]

_TINY = 1e-30
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


def power_iteration(operator: Operator, init: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Eigenvalue of largest magnitude of a symmetric operator, and its unit eigenvector.

    Not the sharpness off a minimum: where |λ_min| > λ_max it converges to λ_min. Use :func:`lanczos` for λ_max.

    Warm-start with the previous eigenvector: the top eigenvector moves slowly during training, so a few iterations
    from it reach the accuracy that a cold start needs many for. The eigenvalue is the Rayleigh quotient of the
    last iterate.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> value, vector = power_iteration(lambda v: A @ v, torch.ones(3), iterations=50)
        >>> round(value.item(), 4), vector.abs().argmax().item()
        (3.0, 0)
    """
    if iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (operator products); got {iterations!r}. Pass e.g. 20.")
    vector = init.float() / torch.linalg.vector_norm(init.float()).clamp_min(_TINY)
    value = torch.zeros((), device=init.device)
    for _ in range(iterations):
        image = operator(vector)
        value = torch.dot(vector, image)
        vector = image / torch.linalg.vector_norm(image).clamp_min(_TINY)
    return value, vector


class ExtremeEigenpairs(NamedTuple):
    """Both ends of a symmetric operator's spectrum (algebraic order), as device scalars and unit vectors."""

    lambda_min: Tensor
    lambda_max: Tensor
    vector_min: Tensor
    vector_max: Tensor
    quotient: Optional[Tensor] = None  # aᵀHa/aᵀa of the ``also`` vector, when one was given


def lanczos(operator: Operator, starts: Union[Tensor, Sequence[Tensor]], iterations: int,
            generator: Optional[torch.Generator] = None, also: Optional[Tensor] = None) -> ExtremeEigenpairs:
    """Largest and smallest *algebraic* eigenvalues of a symmetric operator, by Lanczos with full reorthogonalization.

    Power iteration converges to the eigenvalue of largest magnitude, which off a minimum (saddles, early training,
    transformers) is often a large negative one; "sharpness" is the largest algebraic eigenvalue. Lanczos builds an
    orthonormal basis Q of the Krylov space of the start vector(s), one operator product per basis vector, and takes
    the extreme eigenpairs of the projected matrix QᵀHQ (Rayleigh-Ritz): both ends of the spectrum converge first,
    faster than power iteration converges to either. Every new vector is orthogonalized twice against the whole
    basis ("twice is enough"), so rounding never produces ghost copies of converged eigenvalues.

    Warm starts: pass the previous probe's extreme vectors as ``starts``; the basis then begins with them
    (orthonormalized: a block Krylov space). Storage is ``iterations`` flat vectors. Nothing syncs with the host:
    the small projected eigenproblem is solved on the device (:func:`extreme_eigenpairs`), and a breakdown (an
    invariant subspace) continues with a random vector orthogonal to the basis instead of branching on a norm.

    Args:
        operator: ``v ↦ Hv`` on flat fp32 vectors, H symmetric.
        starts: one start vector, or several (warm starts); any scale, not all zero.
        iterations: operator products, i.e. the basis size (capped at the dimension).
        generator: for the random vectors that replace a breakdown.
        also: a vector a whose Rayleigh quotient aᵀHa/aᵀa is wanted too (the gradient: the directional
            curvature). It becomes the last basis vector instead of a Krylov one, so a lies in the basis and its
            quotient is read off QᵀHQ exactly, for no extra product (``iterations`` >= 2).

    Example:
        >>> A = torch.diag(torch.tensor([2.0, 1.0, -0.5, -5.0]))  # power iteration would find -5
        >>> pairs = lanczos(lambda v: A @ v, torch.ones(4), iterations=4)
        >>> round(pairs.lambda_max.item(), 4), round(pairs.lambda_min.item(), 4)
        (2.0, -5.0)
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (operator products); got {iterations!r}. Pass e.g. 20.")
    starts = [starts] if isinstance(starts, Tensor) else list(starts)
    if not starts:
        raise ValueError("starts is empty: pass at least one start vector (e.g. torch.randn(n)).")
    size = starts[0].numel()
    if any(s.ndim != 1 or s.numel() != size for s in starts):
        raise ValueError(f"start vectors must be flat and of one size; got shapes {[tuple(s.shape) for s in starts]}. "
                         "Flatten them (traincraft.metrics.hessian.flatten) to the operator's size.")
    device = starts[0].device
    steps = min(iterations, size)
    if also is not None and (steps < 2 or also.shape != starts[0].shape):
        raise ValueError(f"also needs iterations >= 2, a dimension >= 2 and the start's shape; got {iterations} "
                         f"iterations, dimension {size}, shape {tuple(also.shape)}. Raise iterations, pass a flat "
                         "vector of the start's size, or compute the quotient with directional_curvature.")
    basis = torch.zeros(steps, size, device=device)
    projected = torch.zeros(steps, steps, device=device, dtype=torch.float64)
    filled = 0
    for start in starts[:steps]:
        basis[filled] = _orthonormal(start.float(), basis[:filled], generator)
        filled += 1
    for j in range(steps):
        image = operator(basis[j])
        coefficients = basis[:filled] @ image  # column j of QᵀHQ for the vectors so far (i ≤ j among them)
        projected[:filled, j] = coefficients.double()
        if filled < steps:
            last = also is not None and filled == steps - 1
            candidate = also.float() if last else image - coefficients @ basis[:filled]
            basis[filled] = _orthonormal(candidate, basis[:filled], generator)
            filled += 1
    upper = projected.triu()
    projected = upper + upper.T - torch.diag(upper.diagonal())
    low, high, y_low, y_high = extreme_eigenpairs(projected)
    vector_min, vector_max = y_low.float() @ basis, y_high.float() @ basis
    quotient = None
    if also is not None:
        c = (basis @ (also.float() / torch.linalg.vector_norm(also.float()).clamp_min(_TINY))).double()
        quotient = (c @ projected @ c / (c @ c).clamp_min(_TINY)).float()
    return ExtremeEigenpairs(low.float(), high.float(), vector_min, vector_max, quotient)


def _orthonormal(vector: Tensor, basis: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``vector`` orthogonalized (twice) against the rows of ``basis`` and normalized; a random one if it vanishes."""
    scale = torch.linalg.vector_norm(vector)
    for _ in range(2):
        vector = vector - (basis @ vector) @ basis
    norm = torch.linalg.vector_norm(vector)
    fallback = torch.randn(vector.numel(), generator=generator, device=vector.device) if generator is not None \
        else torch.randn(vector.numel(), device=vector.device)
    for _ in range(2):
        fallback = fallback - (basis @ fallback) @ basis
    fallback = fallback / torch.linalg.vector_norm(fallback).clamp_min(_TINY)
    # a breakdown: what is left is rounding noise (relative 1e-5 in fp32), so continue with a fresh direction
    return torch.where(norm > 1e-5 * scale.clamp_min(_TINY), vector / norm.clamp_min(_TINY), fallback)


def extreme_eigenpairs(matrix: Tensor, squarings: int = 60) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(λ_min, λ_max, v_min, v_max) of a small symmetric matrix, on its device and without a host sync.

    ``torch.linalg.eigh`` on CUDA checks its status on the host (and runs small matrices on the CPU). Instead, each
    end is the dominant eigenvector of a positive semi-definite shift (M + rI or rI - M, r a Gershgorin bound),
    found by repeated squaring: after k squarings the power is 2^k, so 60 squarings separate eigenvalues that
    differ by a relative 1e-16. The eigenvalue is the Rayleigh quotient of that vector (exact to second order).

    Example:
        >>> m = torch.tensor([[1.0, 2.0], [2.0, -2.0]], dtype=torch.float64)  # eigenvalues -3 and 2
        >>> [round(x.item(), 6) for x in extreme_eigenpairs(m)[:2]]
        [-3.0, 2.0]
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square symmetric matrix; got shape {tuple(matrix.shape)}. Pass the (k, k) matrix.")
    radius = matrix.abs().sum(dim=1).max()
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    top = _dominant_vector(matrix + radius * eye, squarings)
    bottom = _dominant_vector(radius * eye - matrix, squarings)
    return bottom @ matrix @ bottom, top @ matrix @ top, bottom, top


def _dominant_vector(psd: Tensor, squarings: int) -> Tensor:
    power = psd / torch.linalg.matrix_norm(psd).clamp_min(_TINY)
    for _ in range(squarings):
        power = power @ power
        power = power / torch.linalg.matrix_norm(power).clamp_min(_TINY)
    # the power is now ≈ v vᵀ: its largest column is a multiple of v (index chosen on the device)
    column = torch.index_select(power, 1, (power * power).sum(dim=0).argmax().reshape(1)).reshape(-1)
    vector = power @ column  # one more product cleans the column
    return vector / torch.linalg.vector_norm(vector).clamp_min(_TINY)


def hutchinson_trace(operator: Operator, size: int, samples: int, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> Tensor:
    """Unbiased estimate of tr(H) as the mean of zᵀHz over Rademacher vectors z (Hutchinson 1989).

    Example:
        >>> D = torch.tensor([1.0, 2.0, 3.0])
        >>> hutchinson_trace(lambda v: D * v, 3, samples=1)  # exact for a diagonal operator
        tensor(6.)
    """
    if samples < 1:
        raise ValueError(f"samples must be an integer >= 1; got {samples!r}. Pass e.g. 10 (more: a smaller variance).")
    total = torch.zeros((), device=device)
    for _ in range(samples):
        z = torch.randint(0, 2, (size,), generator=generator, device=device).float() * 2 - 1
        total = total + torch.dot(z, operator(z))
    return total / samples


def directional_curvature(operator: Operator, direction: Tensor) -> Tensor:
    """gᵀHg / ‖g‖²: the curvature along ``direction`` (the gradient: the one a gradient step actually takes).

    It costs one product and bounds λ_max from below, so it rises first when the rate nears 2/λ.

    Example:
        >>> directional_curvature(lambda v: torch.tensor([2.0, 8.0]) * v, torch.tensor([1.0, 1.0]))
        tensor(5.)
    """
    return torch.dot(direction, operator(direction)) / torch.dot(direction, direction).clamp_min(_TINY)


def stability_threshold(optimizer: Optimizer) -> Optional[float]:
    """The value of η·λ (preconditioned for adaptive optimizers) above which ``optimizer`` diverges on a quadratic.

    ``None`` for optimizers without a known threshold. With several parameter groups, the smallest threshold.

    Example:
        >>> p = [nn.Parameter(torch.zeros(1))]
        >>> stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)), stability_threshold(torch.optim.Adam(p))
        (3.8, 38.0)
    """
    values = [_group_threshold(optimizer, group) for group in optimizer.param_groups]
    if any(v is None for v in values):
        return None
    return round(min(values), 12)


def _group_threshold(optimizer: Optimizer, group: dict) -> Optional[float]:
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if group.get("nesterov", False):
            return (2 + 2 * beta) / (1 + 2 * beta)
        return 2 + 2 * beta
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        return (2 + 2 * beta1) / (1 - beta1)
    if isinstance(optimizer, torch.optim.RMSprop):
        return 2 + 2 * float(group.get("momentum", 0.0))
    if isinstance(optimizer, torch.optim.Adagrad):
        return 2.0
    return None


def is_preconditioned(optimizer: Optimizer) -> bool:
    """Whether the optimizer divides by a second-moment estimate (then sharpness means λ_max(P⁻¹H))."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad))


def effective_rate_diagonal(optimizer: Optimizer, params: Sequence[Tensor]) -> Optional[Tensor]:
    """Flat per-weight step size D of one optimizer step on the gradient, for ``params`` in that order.

    η·(1-dampening) for SGD, η/(√v̂ + ε) for Adam/AdamW (η(1-β₁) folded into the threshold instead),
    η/(√v + ε) for RMSprop, η/(√Σg² + ε) for Adagrad; weights the optimizer does not hold get 0. ``None`` for an
    unknown optimizer. Adaptive optimizers without state yet (before their first step) get ``None`` too.
    """
    if _group_threshold(optimizer, optimizer.param_groups[0]) is None:
        return None
    owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for p in params:
        group = owner.get(id(p))
        if group is None:
            pieces.append(torch.zeros(p.numel(), device=p.device))
            continue
        lr = float(group["lr"])
        if isinstance(optimizer, torch.optim.SGD):
            pieces.append(torch.full((p.numel(),), lr * (1 - float(group.get("dampening", 0.0))), device=p.device))
            continue
        state = optimizer.state.get(p, {})
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            second = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
            if second is None:
                return None
            beta2 = float(group["betas"][1])
            correction = 1 - beta2 ** torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)
            denom = (second.float() / correction).sqrt() + float(group["eps"])
        elif isinstance(optimizer, torch.optim.RMSprop):
            if "square_avg" not in state:
                return None
            denom = state["square_avg"].float().sqrt() + float(group["eps"])
        else:  # Adagrad
            if "sum" not in state:
                return None
            decay = 1 + (torch.as_tensor(state["step"], dtype=torch.float32, device=p.device) - 1) * group["lr_decay"]
            lr = lr / decay
            denom = state["sum"].float().sqrt() + float(group["eps"])
        pieces.append((lr / denom).reshape(-1))
    return torch.cat(pieces)


def scaled_operator(operator: Operator, diagonal: Tensor) -> Operator:
    """``v ↦ D^½ H D^½ v``: symmetric, with the eigenvalues of D·H (the step's own curvature, η·λ)."""
    root = diagonal.clamp_min(0).sqrt()
    return lambda v: root * operator(root * v)


def params_of(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of ``module``, in a fixed order."""
    return [p for p in module.parameters() if p.requires_grad]
