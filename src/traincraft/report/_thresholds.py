"""The thresholds of the health report's rules (:mod:`traincraft.report.diagnoses` re-exports each).

``docs/diagnoses.md`` says, for each, where it comes from and how it was calibrated on healthy runs.
"""

#: ``curvature/stability_ratio`` (η·λ_max over the optimizer's threshold, 2 for SGD) above which a probe counts as
#: unstable. 1 is the edge of stability, where training hovers (Cohen et al. 2021); 1.5 is clearly past it.
STABILITY_MARGIN = 1.5
#: Relative fall of the training loss after an unstable probe below which training made no progress.
STUCK_LOSS = 0.1
#: EMA of cos(Δθₜ, Δθₜ₋₁) below which a group's weights go back and forth (SLIDE 23: "oscillates").
OSCILLATION_COSINE = -0.3
#: Consecutive logs the oscillation must last (the EMA already averages ~10 steps).
OSCILLATION_LOGS = 3
#: ‖Δθ‖/‖θ‖ per step below which weights barely move; ~1e-3 is the usual healthy order (Karpathy's rule of thumb).
LOW_UPDATE_RATIO = 1e-4
#: Relative fall of the training loss below which it counts as flat.
FLAT_LOSS = 0.05
#: A gradient norm this many times the median of the preceding logs is a spike (a cliff, SLIDE 29).
SPIKE_FACTOR = 10.0
#: A spike counts when the training loss within the next logs exceeds this many times its preceding median (and
#: by a tenth of the starting loss at least).
LOSS_JUMP = 1.5
#: Smallest over largest per-layer gradient norm (weights) below which gradients vanish through depth (SLIDE 32).
VANISHING_RATIO = 1e-3
#: ``grad/depth_slope`` below which each layer towards the input gets ≤ e^-1.0 ≈ 0.37 times the gradient.
DEPTH_SLOPE_VANISHING = -1.0
#: Fraction of a ReLU layer's inputs ≤ 0 above which most of its units are dead (0.5 is healthy).
DEAD_FRACTION = 0.95
#: Fraction of a tanh/sigmoid layer's inputs in the flat tails above which the layer is saturated.
SATURATED_FRACTION = 0.5
#: Consecutive validation checks that must declare drift.
DRIFT_CONSECUTIVE = 2
#: Median ``ddp/step_time_spread`` (slowest over median rank) above which one rank holds the others back. With
#: two ranks the median is their mean: 1.3 means the slow one takes 1.86× as long as the fast one.
STRAGGLER_SPREAD = 1.3
#: Relative rise of the validation loss above its minimum, while the training loss keeps falling.
OVERFIT_RISE = 0.1
