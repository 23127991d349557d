"""Errors raised by diffaccel."""


class DiffaccelError(Exception):
    """Base class of every error diffaccel raises on purpose."""


class UnsupportedPipelineError(DiffaccelError, TypeError):
    """A feature was asked of a pipeline or model it does not support; the message names what is."""


class UnsupportedCombinationError(DiffaccelError, ValueError):
    """A feature met an input it cannot handle correctly (raised instead of giving wrong images)."""
