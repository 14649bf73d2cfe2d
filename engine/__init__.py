"""selfeval-engine: paged-KV decoding with cheap fork, rollback and self-evaluation scoring."""

from engine.errors import (
    CheckpointError,
    EngineError,
    InvalidRequestError,
    OutOfBlocksError,
    SequenceIdError,
    WorkerError,
)
from engine.sampling import RequestOutput, Sample, SamplingParams

__all__ = [
    "Engine",
    "SamplingParams",
    "Sample",
    "RequestOutput",
    "EngineError",
    "OutOfBlocksError",
    "SequenceIdError",
    "CheckpointError",
    "InvalidRequestError",
    "WorkerError",
    "EngineConfig",
]


def __getattr__(name: str):
    # Engine pulls in torch and transformers; import it on first use.
    if name == "Engine":
        from engine.api import Engine

        return Engine
    if name == "EngineConfig":
        from engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
