"""Exceptions raised by the model package (configuration, checkpoints, generation input).

All derive from ``ModelError`` and from ``ValueError``, so callers that already
catch bad-argument errors catch these too; the message always names the
offending file, tensor, preset or request.
"""


class ModelError(ValueError):
    """Base class of every error raised by ``models``."""


class UnsupportedModelError(ModelError):
    """The HF config describes an architecture or feature this decoder does not implement."""


class UnknownPresetError(ModelError):
    """A preset name that is not in ``models.PRESETS``."""


class CheckpointError(ModelError):
    """A checkpoint directory is missing, corrupt, or does not match the config."""


class GenerationInputError(ModelError):
    """A generation request that cannot be served (too long, empty, bad sampling settings)."""
