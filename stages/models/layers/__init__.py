"""Reusable blocks of the stage-two networks."""
from .slca import SLCA

__all__ = ["SLCA"]
