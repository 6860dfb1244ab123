"""DataDriftMonitor's arguments, checked at construction with messages that say what to pass instead."""

from __future__ import annotations

from typing import Any


def check_arguments(layer: Any, features: Any, input_key: Any, forward: Any, reduce: Any, max_samples: Any,
                    alpha: Any, mmd: Any, num_permutations: Any, ks_method: Any, seed: Any) -> None:
    """Raise ``ValueError``/``TypeError`` for the first argument of ``DataDriftMonitor(...)`` it cannot take."""
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 4:
        raise ValueError(f"max_samples must be an integer >= 4; got {max_samples!r}. Pass e.g. 500.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha!r}. The usual choice is 0.05.")
    if mmd not in ("on_ks", "always", "never"):
        raise ValueError(f"mmd must be 'on_ks', 'always' or 'never'; got {mmd!r}.")
    if ks_method not in ("auto", "exact", "asymp"):
        raise ValueError(f"ks_method must be 'auto', 'exact' or 'asymp'; got {ks_method!r}.")
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 19:
        raise ValueError(
            f"num_permutations must be an integer >= 19 (a p-value below 0.05 needs at least 19); "
            f"got {num_permutations!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer (the permutations' seed, the same on every rank); got {seed!r}.")
    _check_choices(layer, features, input_key, forward, reduce)


def _check_choices(layer: Any, features: Any, input_key: Any, forward: Any, reduce: Any) -> None:
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str) or None; got {type(layer).__name__} {layer!r}.")
    if features is not None and not (isinstance(features, str) or callable(features)):
        raise TypeError(f"features must be a callable features(batch) -> Tensor, a dotted import path "
                        f"'package.module.function', or None; got {type(features).__name__} {features!r}.")
    if features is not None and layer is not None:
        raise ValueError(f"pass layer= or features=, not both (got layer={layer!r}, features={features!r}): layer "
                         f"takes a module's output while the model runs, features computes them from the batch.")
    if forward not in ("input", "unpack"):
        raise ValueError(f"forward must be 'input' (call model(batch[input_key])) or 'unpack' (model(*batch) or "
                         f"model(**batch)); got {forward!r}.")
    if reduce not in ("mean", "last", "flatten"):
        raise ValueError(f"reduce must be 'mean', 'last' or 'flatten' (how (batch, time, features) outputs become "
                         f"per-sample features); got {reduce!r}.")
    if input_key is not None and (isinstance(input_key, bool) or not isinstance(input_key, (int, str))):
        raise TypeError(f"input_key must be an int (tuple/list batches), a str (dict batches) or None; got "
                        f"{type(input_key).__name__} {input_key!r}.")
    if features is not None and (input_key is not None or forward != "input"):
        raise ValueError(f"features= receives the whole batch and does not call the model, so input_key and "
                         f"forward do not apply (got input_key={input_key!r}, forward={forward!r}); drop them, or "
                         f"drop features= to test the model's output.")
    if forward == "unpack" and input_key is not None:
        raise ValueError(f"forward='unpack' passes the whole batch to the model, so input_key={input_key!r} does not "
                         f"apply; drop it, or use forward='input' to call model(batch[input_key]).")
