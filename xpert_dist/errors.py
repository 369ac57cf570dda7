"""Exceptions that name the problem: every bad input the user can give maps to one of these."""


class XpertError(Exception):
    """Base class for all errors raised deliberately by xpert-dist."""


class ConfigError(XpertError, ValueError):
    """A configuration value is invalid or inconsistent (the message names the field)."""


class StatisticsError(XpertError, ValueError):
    """Calibration statistics are unusable (NaN/inf, empty, wrong shape)."""


class ModelStructureError(XpertError, ValueError):
    """The model has no known block structure / consumer map, or a named module is missing."""


class DistributedError(XpertError, RuntimeError):
    """A collective failed or a peer rank died; raised on every surviving rank."""
