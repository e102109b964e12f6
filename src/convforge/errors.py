"""Errors that convforge raises for bad input: each one says what was wrong and how to fix it."""

from __future__ import annotations


class ConvforgeError(Exception):
    """A user-facing error: the CLI prints its message without a traceback and exits with 2."""

    exit_code = 2


class DataError(ConvforgeError):
    """A dataset, data spec or image file that cannot be used."""


class ConfigError(ConvforgeError):
    """A configuration value or file that cannot be used."""


class CheckpointError(ConvforgeError):
    """A checkpoint or weight file that cannot be loaded."""


class NonFiniteLossError(ConvforgeError):
    """Training produced a NaN or infinite loss."""

    exit_code = 3


class DiskFullError(ConvforgeError):
    """A write failed because the disk (or quota) is full; earlier files are intact."""

    exit_code = 4
