"""Errors raised on bad user input. All are ``ValueError`` subclasses, so callers can catch
either the specific class or ``ValueError``; the CLI turns each into one line and exit code 2."""


class LRCompressError(ValueError):
    """Base class of every user-input error lrcompress raises."""


class ConfigError(LRCompressError):
    """A configuration value is invalid (rank, energy, patterns, ...)."""


class RankError(ConfigError):
    """A rank is impossible for a target: names the target, its shape and the rank."""


class TargetError(LRCompressError):
    """No targets were found, or a pattern matched nothing or the wrong kind of module."""


class WeightError(LRCompressError):
    """A weight to be factored holds NaN or Inf."""


class FormatError(LRCompressError):
    """A file is corrupt, of an unsupported kind, or does not match the model."""


class OutputExistsError(LRCompressError):
    """The output file exists and overwriting was not asked for."""


class DegenerateWeightError(WeightError):
    """A weight to be factored is empty, sparse, or not real floating point (int, bool, complex)."""


class SecondOrderError(LRCompressError, RuntimeError):
    """A second derivative (``create_graph=True``) was asked of a first-order written-out backward
    (the factored training paths); the message names the path that supports it."""
