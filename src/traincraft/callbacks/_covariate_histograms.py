"""Histograms of a layer's input over time, kept on the host after the logging copy, drawn as one image."""

from __future__ import annotations

from typing import Optional

import numpy as np


class HistogramHistory:
    """One histogram per log over bin edges fixed at the first log (so columns are comparable over time)."""

    def __init__(self, bins: int = 48, max_columns: int = 200) -> None:
        self.bins, self.max_columns = bins, max_columns
        self.edges: Optional[np.ndarray] = None
        self.columns: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        if self.edges is None:
            lo, hi = np.percentile(values, [0.5, 99.5])
            pad = max(hi - lo, 1e-3) * 0.5  # room for the distribution to move
            self.edges = np.linspace(lo - pad, hi + pad, self.bins + 1)
        clipped = np.clip(values, self.edges[0], self.edges[-1])
        self.columns.append(np.histogram(clipped, bins=self.edges)[0].astype(np.float64))
        if len(self.columns) > self.max_columns:  # keep every other old column: the whole run stays visible
            self.columns = self.columns[: -self.max_columns // 2 : 2] + self.columns[-self.max_columns // 2 :]

    def image(self, column_px: int = 4, row_px: int = 3) -> Optional[np.ndarray]:
        """(H, W, 3) uint8: time to the right, values upwards, brightness the density of each column."""
        if not self.columns:
            return None
        grid = np.stack(self.columns, axis=1)[::-1]  # high values on top
        grid = np.sqrt(grid / np.maximum(grid.max(axis=0, keepdims=True), 1.0))
        grid = np.repeat(np.repeat(grid, row_px, axis=0), column_px, axis=1)
        # a dark-blue -> yellow ramp: readable without a colormap library
        low, high = np.array([20.0, 24.0, 82.0]), np.array([253.0, 231.0, 37.0])
        return (low + grid[..., None] * (high - low)).round().astype(np.uint8)
