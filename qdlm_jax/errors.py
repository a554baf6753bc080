"""Errors users can fix; the CLI prints them as one line and exits with status 2."""


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed or does not match the model."""
