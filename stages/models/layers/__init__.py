"""Reusable blocks of the stage-two networks."""
from stages.models.layers.slca import SLCA

__all__ = ["SLCA"]
