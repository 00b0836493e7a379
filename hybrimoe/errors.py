"""User-facing errors: raised for bad input (files, flags, requests), printed without a traceback."""


class HybrimoeError(Exception):
    """Base class of every error whose message is meant for the user."""


class ConfigError(HybrimoeError):
    """A config.json or a flag that the engine cannot accept."""


class CheckpointError(HybrimoeError):
    """A missing, unexpected, misshaped, corrupt or truncated checkpoint file or tensor."""


class TraceError(HybrimoeError):
    """A routing trace that cannot be read."""


class BudgetError(HybrimoeError):
    """A memory budget that cannot hold what it must."""
