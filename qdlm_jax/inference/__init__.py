"""Denoising generation (LLaDA and Dream loops, one jit each) and Monte Carlo likelihood."""
