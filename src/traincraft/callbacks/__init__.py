"""Callbacks for ``Trainer(callbacks=[...])``: one public callback per file.

``AugmentationGallery`` lives with the augmentation code (:mod:`traincraft.augment.gallery`) and is re-exported here.
"""

from traincraft.augment.gallery import AugmentationGallery
from traincraft.callbacks.covariate_shift import CovariateShiftMonitor
from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.callbacks.data_drift import DataDriftMonitor
from traincraft.callbacks.gradient_clipping import GradientClipping
from traincraft.callbacks.hard_example_mining import HardExampleMining
from traincraft.callbacks.health_report import HealthReport
from traincraft.callbacks.lr_governor import LearningRateGovernor
from traincraft.callbacks.lr_monitor import LearningRateMonitor

__all__ = [
    "AugmentationGallery",
    "CovariateShiftMonitor",
    "CurvatureMonitor",
    "DataDriftMonitor",
    "GradientClipping",
    "HardExampleMining",
    "HealthReport",
    "LearningRateGovernor",
    "LearningRateMonitor",
]
