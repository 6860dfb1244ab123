"""Newton, saddle-free Newton and CG against dense references, and the claims of examples/newton_saddle.py:
Newton converges to the saddle (toy: within 1e-6), gradient descent and saddle-free Newton leave it, the latter
faster; on the small network, Newton solved by CG over Hessian-vector products stalls at the saddle too."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from traincraft.metrics.hessian import hessian_vector_operator
from traincraft.metrics.newton import conjugate_gradient, dense_hessian, newton_step, saddle_free_step

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "newton_saddle.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("newton_saddle", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _symmetric(n, seed, shift):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return (a + a.T) / 2 + shift * torch.eye(n, dtype=torch.float64), torch.randn(n, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(("shift", "negative"), [(8.0, False), (0.5, True)], ids=["positive-definite", "indefinite"])
def test_conjugate_gradient_matches_a_dense_solve(shift, negative):
    h, b = _symmetric(12, 0, shift)
    assert bool((torch.linalg.eigvalsh(h) < 0).any()) == negative
    result = conjugate_gradient(lambda v: h @ v, b, max_iterations=60, tolerance=1e-12)
    torch.testing.assert_close(result.solution, torch.linalg.solve(h, b), rtol=1e-8, atol=1e-10)
    assert result.negative_curvature == negative and result.iterations <= 60


def test_newton_and_saddle_free_steps_against_numpy():
    h, g = _symmetric(6, 1, 0.3)
    torch.testing.assert_close(newton_step(g, h), torch.from_numpy(-np.linalg.solve(h.numpy(), g.numpy())))
    w, q = np.linalg.eigh(h.numpy())
    reference = -(q @ np.diag(1 / np.maximum(np.abs(w), 0.7)) @ q.T) @ g.numpy()
    torch.testing.assert_close(saddle_free_step(g, h, damping=0.7), torch.from_numpy(reference))
    # along every eigen-direction the saddle-free step goes downhill: gᵀ d < 0 component by component
    d = saddle_free_step(g, h)
    assert bool(((q.T @ g.numpy()) * (q.T @ d.numpy()) <= 1e-12).all())


def test_cg_over_network_hessian_vector_products_matches_the_dense_solve(example):
    net, x, y = example.network_problem()
    params = list(net.parameters())
    hvp, grad = hessian_vector_operator(example.network_loss(net, x, y), params)
    dense = dense_hessian(hvp, grad.numel())
    assert bool((torch.linalg.eigvalsh(dense) < 0).any())  # indefinite: beside the saddle
    result = conjugate_gradient(hvp, grad, max_iterations=60, tolerance=1e-6)
    torch.testing.assert_close(result.solution.double(), torch.linalg.solve(dense, grad.double()), rtol=1e-3, atol=1e-5)


def test_on_the_toy_function_newton_converges_to_the_saddle_and_the_others_escape(example):
    paths = {method: example.run_toy(method, steps=40) for method in example.METHODS}
    assert paths["Newton"][-1].norm() <= 1e-6  # the saddle at the origin
    minimum = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for method in ("gradient descent", "saddle-free Newton"):
        assert (paths[method][-1] - minimum).norm() < 0.1, method  # left the saddle for the minimum (0, 1)
        assert example.toy_loss(paths[method][-1]) < -0.24
    first = {m: int(torch.nonzero(paths[m][:, 1].abs() > 0.5)[0]) for m in ("gradient descent", "saddle-free Newton")}
    assert first["saddle-free Newton"] * 3 < first["gradient descent"]  # escapes several times faster


def test_on_the_network_newton_by_cg_stalls_at_the_saddle(example):
    spectrum = example.network_saddle_spectrum()
    assert spectrum.min() < -0.1 < 0.1 < spectrum.max()  # a strict saddle at zero weights
    runs = {method: example.run_network(method, steps=25) for method in example.METHODS}
    assert runs["Newton"]["distance"][-1] < 1e-5
    saddle_loss = runs["Newton"]["loss"][-1]
    for method in ("gradient descent", "saddle-free Newton"):
        assert runs[method]["distance"][-1] > 1.0 and runs[method]["loss"][-1] < saddle_loss - 0.15, method
    sfn_steps = next(i for i, v in enumerate(runs["saddle-free Newton"]["loss"]) if v < saddle_loss - 0.1)
    gd_steps = next(i for i, v in enumerate(runs["gradient descent"]["loss"]) if v < saddle_loss - 0.1)
    assert sfn_steps < gd_steps
