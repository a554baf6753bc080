"""Errors users can fix. Each names the file, key or value at fault and what was expected;
the CLI prints any `UserError` as one line and exits with status 2 (no traceback)."""


class UserError(Exception):
    """Base of every error a user fixes by changing an input (path, flag, config value)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file or directory is missing, malformed or does not match the model."""


class ConfigError(UserError, ValueError):
    """A model config value is missing or invalid."""


class ConfigOverrideError(UserError, ValueError):
    """A `--config` file or a `--config.key=value` override is missing or invalid."""


class DataSourceError(UserError, RuntimeError):
    """A data source could not be read, fetched or verified."""
