"""Calibration feeders (clean, masked, trajectory) and certainty-guided token weights."""
from qdlm_jax.calibration.feeders import CalibBatch, CalibSpec, MODES, build_calibration
