"""Evaluation: held-out likelihood bounds, the arithmetic exact-match task, baselines."""
