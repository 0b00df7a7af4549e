"""Frozen image encoders by name: ``create_encoder(name, weights)`` -> (B, 3, H, W) -> (B, embed_dim).

Entries are declared in :mod:`.entries`; ``list_encoders()`` names them.
"""

from . import entries  # noqa: F401  (registers the encoders)
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
    "Encoder",
    "EncoderSpec",
    "WeightsUnavailableError",
    "create_encoder",
    "create_network",
    "get_encoder_spec",
    "list_encoders",
    "register_encoder",
]
