"""The report's pictures: one function per panel, each drawing what a run logged into a PNG (matplotlib, Agg).

A panel function takes a :class:`~traincraft.report._data.RunMetrics` and returns a :class:`Panel`, or ``None``
when the run logged none of its keys; :data:`PANELS` pairs each with the one line that says which callback adds
it. Long series are reduced to a min and a max per pixel column before drawing, so a one-step spike in a
100,000-step run still shows; y axes go logarithmic when positive values span more than two decades.

The panels live by theme in private modules (``_training_panels.py``, ``_layer_panels.py``,
``_system_panels.py``) over one drawing kit (``_plotting.py``); this module names them all and orders them.
"""

from __future__ import annotations

from collections.abc import Callable

from traincraft.report._data import RunMetrics
from traincraft.report._layer_panels import activations, dead_saturated
from traincraft.report._plotting import Panel, reduce_for_plot  # noqa: F401 - public here
from traincraft.report._system_panels import distributed, drift, throughput
from traincraft.report._training_panels import (  # noqa: F401 - lr_groups is public here
    depth_profile,
    gradients,
    learning_rate,
    loss_accuracy,
    lr_groups,
    sharpness,
)

#: Every panel, in report order, with the line the report prints when the run logged none of its keys.
PANELS: tuple[tuple[Callable[[RunMetrics], Panel | None], str], ...] = (
    (loss_accuracy, "left out: loss and accuracy — train with traincraft.modules.ImageClassifier (or self.log "
                    "'train/loss', 'val/loss', 'train/acc', 'val/acc') to log them"),
    (learning_rate, "left out: learning rate — add LearningRateMonitor(log_update_ratio=True, log_oscillation=True) "
                    "to log lr-<group>, lr-<group>-update_ratio, lr-<group>-update_cosine"),
    (gradients, "left out: gradients — add GradientClipping(mode='norm', threshold=1.0) to log grad/norm_pre, "
                "grad/norm_post, grad/clipped_frac, grad/skipped_steps"),
    (depth_profile, "left out: depth profile — add GradientClipping(log_layer_norms=True, log_depth_profile=True) "
                    "to log grad/norm/<param> and grad/depth_slope"),
    (sharpness, "left out: sharpness — add CurvatureMonitor() to log curvature/eta_lambda, curvature/lambda_max, "
                "curvature/lambda_min"),
    (activations, "left out: activation statistics — add CovariateShiftMonitor() to log "
                  "covshift/<stage>/<layer>/mean and /std"),
    (dead_saturated, "left out: dead and saturated units — add CovariateShiftMonitor() to log "
                     "covshift/<stage>/<layer>/dead_frac and /sat_frac"),
    (drift, "left out: drift — add DataDriftMonitor() to log drift/ks_pvalue_min and drift/mmd_pvalue"),
    (distributed, "left out: distributed — train with strategy=DataParallelStrategy() to log comm/bytes, "
                  "ddp/step_time_spread, ddp/noise_scale"),
    (throughput, "left out: throughput — add lightning.pytorch.callbacks.ThroughputMonitor(batch_size_fn=...) to "
                 "log samples_per_sec"),
)


def draw_panels(run: RunMetrics) -> tuple[list[Panel], list[str]]:
    """Every panel the run has the keys for, and one line per panel left out saying which callback adds it."""
    panels, left_out = [], []
    for draw, missing in PANELS:
        panel = draw(run)
        if panel is None:
            left_out.append(missing)
        else:
            panels.append(panel)
    return panels, left_out
