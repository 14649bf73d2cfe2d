"""Exceptions a caller can catch. Messages say what went wrong and what to do."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class OutOfBlocksError(EngineError):
    """The KV cache has too few free blocks for the request; nothing was changed."""


class SequenceIdError(EngineError, LookupError):
    """A sequence id is unknown, or already in use."""


class CheckpointError(EngineError):
    """A model or tokenizer directory is missing, incomplete or malformed."""


class WorkerError(EngineError):
    """A tensor-parallel rank died or failed; the engine cannot step any more (start another)."""


class InvalidRequestError(EngineError, ValueError):
    """A request's parameters or prompt are invalid; other requests are unaffected."""
