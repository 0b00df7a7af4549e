"""Frozen image encoders by name: ``create_encoder(name, weights)`` -> (B, 3, H, W) -> (B, embed_dim).

Entries are declared in :mod:`.entries`; ``list_encoders()`` names them. ``inference_encoder(encoder,
backend, device)`` runs one faster (OpenVINO on the CPU by default), with the same embeddings.
"""

from . import entries  # noqa: F401  (registers the encoders)
from .backends import (
    BACKENDS,
    EXACT_TOLERANCE,
    BackendUnavailableError,
    OpenVINOEncoder,
    check_backend_settings,
    inference_encoder,
    max_relative_error,
    resolve_device,
)
from .registry import (
    Encoder,
    EncoderSpec,
    WeightsUnavailableError,
    create_encoder,
    create_network,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)

__all__ = [
    "BACKENDS",
    "EXACT_TOLERANCE",
    "BackendUnavailableError",
    "Encoder",
    "EncoderSpec",
    "OpenVINOEncoder",
    "WeightsUnavailableError",
    "check_backend_settings",
    "create_encoder",
    "create_network",
    "get_encoder_spec",
    "inference_encoder",
    "list_encoders",
    "max_relative_error",
    "register_encoder",
    "resolve_device",
]
