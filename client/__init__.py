"""seqserve.client: call a seqserve server from Python (blocking `Client`, asyncio `AsyncClient`).

Needs neither torch nor ONNX Runtime. Results are plain frozen dataclasses (`GenerationResult`,
`TokenPiece`, `ModelInfo`); failures are typed exceptions (`InvalidArgument`, `Overloaded`,
`DeadlineExceeded`, `Unavailable`, `Cancelled`, `ServerError`, all `SeqserveClientError`).

    from seqserve.client import Client

    with Client("localhost:50051") as client:
        print(client.generate("25 November 2026").text)
"""

from __future__ import annotations

from seqserve.client.aio import AsyncClient
from seqserve.client.blocking import Client
from seqserve.client.channel import ADDRESS_ENV, RetryPolicy
from seqserve.client.errors import (Cancelled, DeadlineExceeded, InvalidArgument, Overloaded, SeqserveClientError,
                                    ServerError, Unavailable)
from seqserve.client.results import (FinishReason, GeneratedSequence, GenerationResult, HealthStatus, ModelDims,
                                     ModelInfo, ServerLimits, SpecialTokens, Timings, TokenPiece, Usage)

__all__ = [
    "ADDRESS_ENV", "AsyncClient", "Cancelled", "Client", "DeadlineExceeded", "FinishReason", "GeneratedSequence",
    "GenerationResult", "HealthStatus", "InvalidArgument", "ModelDims", "ModelInfo", "Overloaded", "RetryPolicy",
    "SeqserveClientError", "ServerError", "ServerLimits", "SpecialTokens", "Timings", "TokenPiece", "Unavailable",
    "Usage",
]
