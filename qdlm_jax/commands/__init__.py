"""Subcommands of `qdlm`; one module each (see qdlm_jax/cli.py)."""
