"""One encoder factory keyed by name, in the style of timm's ``create_model`` registry.

Each entry is an :class:`EncoderSpec` that declares, in one place, the architecture, the layer and
pooling that give the embedding, the embedding size, the preprocessing and where the weights come from.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import transforms as T

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

WeightsArg = str | os.PathLike | None
StateDict = dict[str, Tensor]


class WeightsUnavailableError(RuntimeError):
    """An encoder's default weights could not be fetched (typically: no network access)."""


def keep_checkpoint(state_dict: Mapping[str, Tensor], network: nn.Module) -> StateDict:
    """Checkpoint converter for checkpoints already in the network's own key layout."""
    return dict(state_dict)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that defines one encoder's embedding.

    ``build()`` returns the whole randomly initialised network, in the key layout checkpoints are
    loaded into; ``fetch_default()`` returns the raw default checkpoint (it may download);
    ``convert_checkpoint(raw, network)`` maps a raw checkpoint (default or local file) to the network's
    keys; ``to_embedding(network)`` cuts the loaded network down to the module that maps
    (B, 3, H, W) images to (B, embed_dim) embeddings.
    """

    name: str
    architecture: str
    layer: str
    embed_dim: int
    input_size: int | None
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str
    build: Callable[[], nn.Module]
    fetch_default: Callable[[], Mapping[str, Tensor]]
    to_embedding: Callable[[nn.Module], nn.Module]
    convert_checkpoint: Callable[[Mapping[str, Tensor], nn.Module], StateDict] = keep_checkpoint

    def __post_init__(self):
        if (self.input_size is None) != (self.interpolation == "none"):
            raise ValueError(
                f"Encoder {self.name!r}: interpolation must be 'none' exactly when input_size is None "
                f"(raw input, no resize); got input_size={self.input_size}, "
                f"interpolation={self.interpolation!r}."
            )

    def transform(self) -> Callable:
        """Torchvision transform: PIL image -> (3, S, S) normalised float tensor.

        With ``input_size`` S, the shorter side is resized to S (``interpolation``) and the centre
        S x S is cropped (a plain resize for square images); with ``input_size=None`` the image keeps
        its native size (e.g. raw 32 x 32 CIFAR images).
        """
        steps: list[Callable] = [_ToRGB()]
        if self.input_size is not None:
            mode = T.InterpolationMode(self.interpolation)
            steps += [T.Resize(self.input_size, interpolation=mode), T.CenterCrop(self.input_size)]
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def fingerprint(self, weights: WeightsArg = "default") -> dict:
        """Everything that determines the embedding, as a JSON-serialisable dict (a cache key).

        ``weights`` as in :func:`create_encoder`: "default" -> the declared source, a path -> the
        file's SHA-256, None -> "random-init" (not reproducible across processes unless seeded).
        """
        return {
            "name": self.name,
            "architecture": self.architecture,
            "layer": self.layer,
            "embed_dim": self.embed_dim,
            "input_size": self.input_size,
            "resize": "shorter side + center crop" if self.input_size is not None else "none",
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": _weights_identity(self, weights),
        }


class _ToRGB:
    """PIL image -> RGB PIL image (grayscale and RGBA images become 3-channel)."""

    def __call__(self, image):
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class Encoder(nn.Module):
    """Frozen image encoder: (B, 3, H, W) normalised float images -> (B, embed_dim) embeddings.

    Always in eval mode (``train()`` keeps it in eval, so BatchNorm statistics never drift) and its
    parameters do not require gradients. ``spec`` is its :class:`EncoderSpec`. Runs in channels-last
    memory format: on CPU about 1.6x faster for EfficientNet-Lite (1.1x for ResNet-50), same
    embeddings up to float rounding.
    """

    backend = "eager"  # as for every module of ``encoders.inference_encoder``: what runs it

    def __init__(self, spec: EncoderSpec, body: nn.Module, weights: WeightsArg):
        super().__init__()
        self.spec = spec
        self.body = body.to(memory_format=torch.channels_last)
        self._fingerprint = spec.fingerprint(weights)  # hashes a checkpoint file as just loaded
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Encoder:
        """Stay in eval mode whatever ``mode`` is: the encoder is frozen."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, embed_dim); the batch is made channels-last first."""
        return self.body(images.contiguous(memory_format=torch.channels_last))

    def fingerprint(self) -> dict:
        """``spec.fingerprint`` for the weights this encoder was created with."""
        return dict(self._fingerprint)


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add ``spec`` to the registry under ``spec.name``; returns it."""
    if spec.name in _REGISTRY:
        raise ValueError(f"An encoder named {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    """Sorted names of all registered encoders."""
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown encoder {name!r}. Expected one of: {', '.join(list_encoders())}."
        ) from None


def create_network(name: str, weights: WeightsArg = "default") -> nn.Module:
    """The whole network of encoder ``name`` (classifier or projection head included), in eval mode.

    ``weights``: "default" = the entry's pretrained weights (may download), a path = that local
    checkpoint loaded strictly, None = random init. Useful to sanity-check weights by classification.
    """
    spec = get_encoder_spec(name)
    path = _checkpoint_path(weights)
    network = spec.build()
    if weights is not None:
        raw = _fetch_default(spec) if path is None else _read_checkpoint(path)
        source = spec.weights if path is None else str(path)
        _load_strict(spec, network, spec.convert_checkpoint(raw, network), source)
    return network.eval()


def create_encoder(name: str, weights: WeightsArg = "default") -> Encoder:
    """Frozen encoder ``name``: (B, 3, H, W) float batch -> (B, embed_dim) embeddings, in eval mode.

    ``weights``: "default" = the entry's pretrained weights (downloaded where needed; offline for
    EfficientNet-Lite), a path = that local state-dict checkpoint loaded strictly, None = random init.
    Preprocess images with ``encoder.spec.transform()``.
    """
    spec = get_encoder_spec(name)
    return Encoder(spec, spec.to_embedding(create_network(name, weights)), weights)


def _checkpoint_path(weights: WeightsArg) -> Path | None:
    """None for "default"/None; else the checkpoint path, which must exist."""
    if weights is None or weights == "default":
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint file not found: '{path}'. Expected weights='default' (pretrained), "
            "weights=None (random init) or the path of an existing state-dict file."
        )
    return path


def _fetch_default(spec: EncoderSpec) -> Mapping[str, Tensor]:
    """The raw default checkpoint of ``spec``; download failures become WeightsUnavailableError."""
    try:
        return spec.fetch_default()
    except OSError as err:
        raise WeightsUnavailableError(
            f"Could not fetch the default weights of encoder {spec.name!r} ({spec.weights}): {err}. "
            "They are downloaded on first use and this machine seems to have no network access. "
            "Download the checkpoint on a machine with internet, copy it here and pass "
            "weights=<local checkpoint path> (or weights=None for random init). "
            "Encoders with offline default weights: tf_efficientnet_lite0/1/2."
        ) from err


def _read_checkpoint(path: Path) -> Mapping[str, Tensor]:
    """State dict stored at ``path`` (.safetensors or torch file; 'state_dict'/'model' entries unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"The checkpoint {path} holds a {type(checkpoint).__name__}, expected a state dict.")
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def _load_strict(spec: EncoderSpec, network: nn.Module, state_dict: StateDict, source: str) -> None:
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"The checkpoint {source} does not fit encoder {spec.name!r} ({spec.architecture}); "
            f"expected a state dict with exactly the network's keys and shapes. {err}"
        ) from err


def _weights_identity(spec: EncoderSpec, weights: WeightsArg) -> str:
    if weights is None:
        return "random-init"
    path = _checkpoint_path(weights)
    if path is None:
        return spec.weights
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"
