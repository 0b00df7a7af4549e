"""The DKVB model: frozen encoder -> key-value bottleneck -> decoder.

Data flow: images (B, ...) -> encoder -> embeddings (B, D) -> key indices (B, C*k)
-> values (B, C, V) -> decoder -> logits (B, n_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from avalanche_dkvb.bottleneck import KeyValueBottleneck
from avalanche_dkvb.decoders import MeanDecoder, create_decoder


class DKVBModel(nn.Module):
    """Encoder (frozen, always in eval mode, no gradients), bottleneck and decoder.

    Pass ``encoder=None`` when the inputs already are embeddings (the encoder is then the identity).
    """

    def __init__(self, bottleneck: KeyValueBottleneck, decoder: nn.Module, encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.Identity()
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.bottleneck = bottleneck
        self.decoder = decoder

    @property
    def uses_mean_decoder(self) -> bool:
        return isinstance(self.decoder, MeanDecoder)

    @property
    def num_classes(self) -> int:
        """Number of logits: value_dim for the mean decoder, the decoder's output size otherwise."""
        return self.decoder.num_classes

    def train(self, mode: bool = True) -> "DKVBModel":
        """Switch bottleneck and decoder; the encoder stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: inputs (B, ...) -> embeddings (B, D)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.embed(x)))

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters training may change: the values and, if parametric, the decoder's."""
        return {name: p for name, p in self.named_parameters()
                if not name.startswith("encoder.") and p.requires_grad}


def create_dkvb_model(
    input_dim: int,
    num_classes: int,
    *,
    num_codebooks: int = 256,
    num_keys: int = 4096,
    key_dim: int = 14,
    value_dim: int | None = None,
    decoder: str = "mean",
    encoder: nn.Module | None = None,
    **bottleneck_kwargs,
) -> DKVBModel:
    """A DKVB model with the paper's defaults (C 256, K 4096, d_key 14, d_value = classes, mean
    decoder, zero values). ``decoder`` is "mean", "linear" or "mlp" (:data:`DECODERS`);
    ``bottleneck_kwargs`` go to :class:`KeyValueBottleneck` (e.g. ``top_k=4, top_k_reduction="mean"``;
    the authors' ``"sum"`` is the default)."""
    value_dim = num_classes if value_dim is None else value_dim
    bottleneck = KeyValueBottleneck(input_dim, num_codebooks, num_keys, key_dim, value_dim, **bottleneck_kwargs)
    return DKVBModel(bottleneck, create_decoder(decoder, num_codebooks, value_dim, num_classes), encoder)
