"""DeltaBarDelta against a plain numpy transcription of Jacobs' rule, on a quadratic, and from YAML."""

import numpy as np
import pytest
import torch
import yaml

from traincraft.cli import TraincraftCLI
from traincraft.optim.delta_bar_delta import DeltaBarDelta


def _reference(w0, grads_of, steps, lr, kappa, phi, theta, weight_decay):
    """Jacobs (1988), per weight: ε += κ on agreeing signs of δ̄(t-1) and δ(t), ε *= 1-φ on a flip; w -= ε δ."""
    w = w0.copy()
    eps = np.full_like(w, lr)
    bar = np.zeros_like(w)
    for t in range(steps):
        delta = grads_of(w, t) + weight_decay * w
        agree = bar * delta
        eps = np.where(agree > 0, eps + kappa * lr, np.where(agree < 0, eps * (1 - phi), eps))
        bar = (1 - theta) * delta + theta * bar
        w = w - eps * delta
    return w, eps


def test_matches_a_numpy_transcription_of_jacobs_rule():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    a = a @ a.T / 6 + np.eye(6) * 0.1
    noise = rng.normal(size=(20, 6)) * 0.3  # gradients whose signs sometimes flip

    def grads_of(w, t):
        return a @ w + noise[t]

    w0 = rng.normal(size=6)
    expected_w, expected_eps = _reference(w0, grads_of, 20, lr=0.05, kappa=0.2, phi=0.3, theta=0.6, weight_decay=0.01)
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = DeltaBarDelta([w], lr=0.05, kappa=0.2, phi=0.3, theta=0.6, weight_decay=0.01)
    for t in range(20):
        w.grad = torch.from_numpy(grads_of(w.detach().numpy(), t))
        opt.step()
    np.testing.assert_allclose(w.detach().numpy(), expected_w, rtol=1e-10)
    np.testing.assert_allclose(0.05 * opt.state[w]["gain"].numpy(), expected_eps, rtol=1e-10)


def test_beats_sgd_at_the_same_rate_on_an_ill_conditioned_quadratic():
    """The flat direction's rate grows while its gradient keeps its sign; the steep one's shrinks when it flips."""
    curvatures = torch.tensor([10.0, 0.01])

    def run(opt_cls, **kwargs):
        w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        opt = opt_cls([w], lr=0.15, **kwargs)
        for _ in range(200):
            opt.zero_grad()
            (0.5 * curvatures * w**2).sum().backward()
            opt.step()
        return (0.5 * curvatures * w.detach() ** 2).sum().item()

    sgd, dbd = run(torch.optim.SGD), run(DeltaBarDelta, kappa=0.1, phi=0.5)
    assert dbd < 0.1 * sgd, (sgd, dbd)


@pytest.mark.parametrize("kwargs, match", [({"lr": 0.0}, "lr must be > 0"), ({"phi": 1.0}, r"phi must be in \[0, 1\)"),
                                           ({"theta": -0.1}, "theta"), ({"max_gain": 0.0}, "max_gain")])
def test_bad_arguments_are_rejected_with_the_allowed_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaBarDelta([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_max_gain_bounds_the_rates_and_the_state_round_trips():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = DeltaBarDelta([w], lr=0.01, kappa=1.0, max_gain=3.0)
    for _ in range(10):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert opt.state[w]["gain"].item() == 3.0
    clone = DeltaBarDelta([torch.nn.Parameter(torch.tensor([1.0]))], lr=0.01, kappa=1.0, max_gain=3.0)
    clone.load_state_dict(opt.state_dict())
    assert clone.state_dict()["state"][0]["gain"].item() == 3.0


def test_usable_from_yaml_through_the_cli(tmp_path):
    config = tmp_path / "dbd.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"model": "mlp", "optimizer": {
        "class_path": "traincraft.optim.DeltaBarDelta", "init_args": {"lr": 0.05, "kappa": 0.02}}}}}))
    cli = TraincraftCLI(args=["fit", f"--config={config}", "--data.init_args.image_size=8", "--trainer.max_epochs=1",
                              "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, DeltaBarDelta) and optimizer.defaults["kappa"] == 0.02
    assert cli.trainer.global_step == 4 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
