"""Decoders from fetched values (B, C, V) to logits (B, n_classes), by name.

Shape legend: B batch, C codebooks, V value size.
"""

from __future__ import annotations

import torch
from torch import nn

from avalanche_dkvb.validation import check_positive_int


class MeanDecoder(nn.Module):
    """The paper's non-parametric decoder: the mean over codebooks of the fetched values, used
    directly as logits (softmax lives in the loss). Needs V == number of classes. No parameters."""

    def __init__(self, num_codebooks: int, value_dim: int, num_classes: int):
        super().__init__()
        if value_dim != num_classes:
            raise ValueError(
                f"The non-parametric 'mean' decoder uses the values as logits, so value_dim must equal "
                f"num_classes; got value_dim={value_dim}, num_classes={num_classes}. Set "
                f"value_dim={num_classes} or use decoder='linear'."
            )
        self.num_classes = num_classes

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values.mean(dim=1)  # (B, C, V) -> (B, V): average over codebooks, never over V


class LinearDecoder(nn.Module):
    """A trainable linear map from all fetched values, concatenated, to logits: (B, C*V) -> (B, n)."""

    def __init__(self, num_codebooks: int, value_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(num_codebooks * value_dim, num_classes)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.linear(values.flatten(1))


class MLPDecoder(nn.Module):
    """The authors' "mlp-128" decoder: all fetched values, concatenated, through one hidden ReLU layer:
    (B, C*V) -> (B, hidden) -> (B, n)."""

    def __init__(self, num_codebooks: int, value_dim: int, num_classes: int, hidden_dim: int = 128):
        super().__init__()
        check_positive_int("hidden_dim", hidden_dim)
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.Linear(num_codebooks * value_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, num_classes))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.mlp(values.flatten(1))


DECODERS = {"mean": MeanDecoder, "linear": LinearDecoder, "mlp": MLPDecoder}


def create_decoder(name: str, num_codebooks: int, value_dim: int, num_classes: int) -> nn.Module:
    """The decoder registered as ``name`` ("mean", "linear" or "mlp")."""
    if name not in DECODERS:
        raise ValueError(f"Unknown decoder {name!r}; expected one of {sorted(DECODERS)}.")
    check_positive_int("num_classes", num_classes)
    return DECODERS[name](num_codebooks, value_dim, num_classes)
