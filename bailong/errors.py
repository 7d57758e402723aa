"""Errors every package raises: kept apart so a component's config can raise them without importing the checks."""


class ConfigError(ValueError):
    """A configuration value outside its valid range; the message names the key, the value and what was expected."""
