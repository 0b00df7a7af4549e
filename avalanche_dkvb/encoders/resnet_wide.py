"""SwAV's ResNet-50 wN: ResNet-50 with every width multiplied by N, stem included.

Unlike torchvision's ``wide_resnet50_2`` (only the bottleneck interiors widened), SwAV's ``resnet50w2``
doubles the stem (128 channels), the bottleneck interiors and the block outputs (layer1..4 give 512, 1024,
2048, 4096 channels): 93.9M parameters. Keys follow SwAV's checkpoints once their ``module.`` prefix and
training heads are removed (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...).
SwAV pads by 1 with a separate layer and then convolves the stem with padding 2: the same as padding 3.
"""

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, conv1x1

__all__ = ["ResNet50W"]


class ResNet50W(nn.Module):
    """SwAV ResNet-50 wN backbone: (B, 3, H, W) -> (B, 2048 * widen), layer4 + global average pool."""

    def __init__(self, widen: int = 2):
        super().__init__()
        width = 64 * widen
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
        for index, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), start=1):
            planes = width * 2 ** (index - 1)
            setattr(self, f"layer{index}", _stage(in_channels, planes, blocks, stride))
            in_channels = planes * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C) globally average-pooled features of the last stage."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _stage(in_channels: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` bottlenecks of interior width ``planes``; the first projects its shortcut
    (channels always change between stages here)."""
    out_channels = planes * Bottleneck.expansion
    shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    first = Bottleneck(in_channels, planes, stride, downsample=shortcut)
    return nn.Sequential(first, *(Bottleneck(out_channels, planes) for _ in range(blocks - 1)))
