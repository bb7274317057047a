"""Pre-registered statistics of the study (pure numpy/scipy): see docs/statistics.md."""

from lbt.stats.aggregate import StatsInputError, StatsWarning, aggregate_cells
from lbt.stats.effect_size import combined_directional, effect_size
from lbt.stats.holm import holm
from lbt.stats.report import primary_report
from lbt.stats.tost import tost

__all__ = [
    "StatsInputError",
    "StatsWarning",
    "aggregate_cells",
    "combined_directional",
    "effect_size",
    "holm",
    "primary_report",
    "tost",
]
