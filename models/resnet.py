"""ResNet: a residual convolutional image classifier with BatchNorm.

References:
  He et al. 2016, "Deep Residual Learning for Image Recognition", Table 1 (ResNet-18: BasicBlock
    [2, 2, 2, 2]; ResNet-50: Bottleneck [3, 4, 6, 3]).
  torchvision models/resnet.py (stride on the 3x3 conv of the bottleneck, "ResNet v1.5"; counts
    11,689,512 for ResNet-18 and 25,557,032 for ResNet-50 with a 1000-class head).

BatchNorm is left in whatever mode the caller sets (train() uses batch statistics and updates
the running ones, a buffer mutation that torch.export records). No parallelism knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common


@dataclass(frozen=True)
class ResNetConfig:
    block: str = "bottleneck"           # "basic" (2 x 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1)
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64                     # channels after the stem; doubled at every stage
    num_classes: int = 1000
    in_channels: int = 3
    image_size: int = 224

    def __post_init__(self):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"ResNetConfig: block={self.block!r}; expected 'basic' or 'bottleneck'")
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"ResNetConfig: layers={self.layers} needs at least one block per stage")

    @classmethod
    def tiny(cls) -> "ResNetConfig":
        return cls(block="basic", layers=(1, 1), width=8, num_classes=10, image_size=32)

    @classmethod
    def resnet18(cls) -> "ResNetConfig":
        return cls(block="basic", layers=(2, 2, 2, 2))

    @classmethod
    def resnet50(cls) -> "ResNetConfig":
        return cls()


PRESETS: dict[str, tuple] = {
    "tiny": (ResNetConfig.tiny, None, None),
    "resnet18": (ResNetConfig.resnet18, 11.69e6, "torchvision resnet18: 11,689,512"),
    "resnet50": (ResNetConfig.resnet50, 25.56e6, "torchvision resnet50: 25,557,032"),
}


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(c_in, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3)
        # 1x1 projection when the shape changes (He et al. option B), identity otherwise.
        needs_proj = stride != 1 or c_in != planes
        self.shortcut = conv_bn(c_in, planes, 1, stride) if needs_proj else nn.Identity()

    def forward(self, x):                                           # [B, C_in, H, W]
        out = F.relu(self.conv1(x))
        out = self.conv2(out)                                       # [B, planes, H/s, W/s]
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = conv_bn(c_in, planes, 1)
        self.conv2 = conv_bn(planes, planes, 3, stride)
        self.conv3 = conv_bn(planes, c_out, 1)
        needs_proj = stride != 1 or c_in != c_out
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if needs_proj else nn.Identity()

    def forward(self, x):                                           # [B, C_in, H, W]
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)                                       # [B, 4 * planes, H/s, W/s]
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.config = cfg
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        self.stem = conv_bn(cfg.in_channels, cfg.width, 7, stride=2)  # [B, w, H/2, W/2]
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # [B, w, H/4, W/4]
        stages, c_in = [], cfg.width
        for i, n_blocks in enumerate(cfg.layers):
            planes = cfg.width * 2 ** i
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(c_in, planes, stride=2 if (i > 0 and j == 0) else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        self._init_params()

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place, e.g. after `to_empty()` from meta."""
        _common.reset_submodules(self)
        self._init_params()

    def _init_params(self) -> None:
        """Kaiming-normal convs (fan_out, as torchvision), unit BatchNorm; no-op cost on meta."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images):                                      # images: [B, C, H, W]
        x = self.pool(F.relu(self.stem(images)))                    # [B, w, H/4, W/4]
        x = self.stages(x)                                          # [B, c_last, H/2^k, W/2^k]
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)                  # [B, c_last]
        return self.fc(x)                                           # [B, num_classes] logits


# --- zoo glue -----------------------------------------------------------------------------
def example_inputs(cfg: ResNetConfig, batch_size: int, device="cpu", seed: int = 0) -> tuple:
    return (_common.randn((batch_size, cfg.in_channels, cfg.image_size, cfg.image_size), device, seed),)


def make_targets(model: ResNet, inputs: tuple, seed: int = 1) -> torch.Tensor:
    (images,) = inputs
    return _common.randint(model.config.num_classes, (images.shape[0],), images.device, seed)  # [B]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def build(size: str = "tiny", batch_size: int | None = None, device="cpu"):
    if size not in PRESETS:
        raise KeyError(f"resnet: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: ResNet(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 256)
    return model, example_inputs(cfg, bs, device)


def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def resnet18(batch_size: int = 256, device="meta"):
    return build("resnet18", batch_size, device)


def resnet50(batch_size: int = 256, device="meta"):
    return build("resnet50", batch_size, device)
