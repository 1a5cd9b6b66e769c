"""SASSHA, a sharpness-aware second-order optimizer, for single-device and distributed training."""

from sassha_dist.optimizer import AUTHORS_PRESET, Sassha, SasshaOptions, StepReport

__all__ = ["AUTHORS_PRESET", "Sassha", "SasshaOptions", "StepReport"]
__version__ = "0.1.0"
