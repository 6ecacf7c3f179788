"""The e-graph optimizer: egglog saturates the rewrite rules, our own extractor picks the cheapest graph."""
from .extract import DeviceCost
from .optimizer import Optimized, optimize, step_estimate

__all__ = ["DeviceCost", "Optimized", "optimize", "step_estimate"]
