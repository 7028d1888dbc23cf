"""ldm_engine's exception types. Each subclasses ValueError or TypeError, so callers that catch
the built-in types keep working."""


class CheckpointError(ValueError):
    """A model file or folder cannot be loaded: missing, corrupt, mismatched or unsafe."""


class InvalidInputError(ValueError):
    """An argument to Engine.generate() or an op is out of its allowed range."""


class BackendUnavailableError(ValueError):
    """A requested backend (triton, cuda, onnxruntime, tensorrt) is not available here."""


class NonFiniteOutputError(ValueError):
    """A generation produced NaN / Inf values that could not be recovered; the message names the stage."""
