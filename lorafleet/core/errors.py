"""One error hierarchy. A UserError is something the user can fix; the CLI prints it without a traceback."""

from __future__ import annotations


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""


class UserError(LorafleetError):
    """Bad input, config, data or environment: the message says what to fix."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the field and what it accepts."""
