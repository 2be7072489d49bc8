"""The reference ResNets in PyTorch, written after torchvision's and timm's code.

Neither torchvision nor timm is installable on these machines (only torch is),
so this module carries the references' structure: the same module names, kernel
sizes, paddings, strides (v1.5), BatchNorm defaults and shortcut layouts. The
equivalence tests and ``scripts/benchmark_training.py`` use it; torch is a dev
dependency only, so nothing else in the package imports this module.

- ``ResNet``: torchvision ``resnet.py`` (ResNet, ResNeXt, Wide ResNet), with
  timm's deep (and tiered) stem and ResNet-D average-pool shortcut (``resnet18d``,
  ``resnet10t``).
- ``PreActResNet``: timm ``resnetv2.py`` with pre-activation basic /
  bottleneck blocks (``BatchNormAct2d`` = BN then ReLU, "fixed" zero-padded
  stem pool).
"""

import torch
from torch import nn


def _downsample(inplanes, planes, stride, avg_down):
    if not avg_down:
        return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                             nn.BatchNorm2d(planes))
    pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
            if stride != 1 else nn.Identity())
    return nn.Sequential(pool, nn.Conv2d(inplanes, planes, 1, 1, bias=False),
                         nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1,
                 base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1,
                 base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64,
                 stem="imagenet", avg_down=False, zero_init_residual=False):
        super().__init__()
        self.inplanes = 64
        self.groups, self.base_width, self.avg_down = groups, width_per_group, avg_down
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:  # timm's deep stem, stem_width 32; "tiered": 24 channels first
            first = 24 if stem == "deep_tiered" else 32
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, first, 3, 2, 1, bias=False), nn.BatchNorm2d(first), nn.ReLU(True),
                nn.Conv2d(first, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(True),
                nn.Conv2d(32, 64, 3, 1, 1, bias=False))
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        if zero_init_residual:  # as torchvision: each block's last BN gamma starts at 0
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _downsample(self.inplanes, planes * block.expansion, stride,
                                     self.avg_down)
        extra = {"groups": self.groups, "base_width": self.base_width}
        layers = [block(self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm layer of resnetv2: BatchNorm, then ReLU."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class DownsampleConv(nn.Module):
    """timm's pre-activation projection: a strided 1x1 conv, no norm."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv = nn.Conv2d(inplanes, planes, 1, stride, bias=False)

    def forward(self, x):
        return self.conv(x)


class PreActBasic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.downsample = (DownsampleConv(inplanes, planes, stride)
                           if stride != 1 or inplanes != planes else None)
        self.norm1 = BatchNormAct2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.norm2 = BatchNormAct2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        return self.conv2(self.norm2(self.conv1(x_preact))) + shortcut


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        out = planes * 4
        self.downsample = (DownsampleConv(inplanes, out, stride)
                           if stride != 1 or inplanes != out else None)
        self.norm1 = BatchNormAct2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.norm2 = BatchNormAct2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.norm3 = BatchNormAct2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv2(self.norm2(self.conv1(x_preact)))
        return self.conv3(self.norm3(x)) + shortcut


class Stage(nn.Module):
    def __init__(self, block, inplanes, planes, blocks, stride):
        super().__init__()
        self.blocks = nn.Sequential(block(inplanes, planes, stride), *[
            block(planes * block.expansion, planes) for _ in range(1, blocks)])

    def forward(self, x):
        return self.blocks(x)


class PreActResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, stem="imagenet"):
        super().__init__()
        cifar = stem == "cifar"
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, 64, 3 if cifar else 7, 1 if cifar else 2,
                                               1 if cifar else 3, bias=False))
        if not cifar:
            self.stem.add_module("pad", nn.ConstantPad2d(1, 0.0))
            self.stem.add_module("pool", nn.MaxPool2d(3, 2))
        stages, inplanes = [], 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stages.append(Stage(block, inplanes, planes, blocks, 1 if i == 0 else 2))
            inplanes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.norm = BatchNormAct2d(inplanes)
        self.head = nn.Module()
        self.head.fc = nn.Conv2d(inplanes, num_classes, 1)  # timm: a 1x1 conv head

    def forward(self, x):
        x = self.norm(self.stages(self.stem(x)))
        x = self.head.fc(x.mean((2, 3), keepdim=True))
        return torch.flatten(x, 1)


def build_reference(options, num_classes, stem, zero_init_residual=False):
    """The PyTorch reference for one entry of ``keras_resnet.MODELS``.

    ``zero_init_residual`` (v1 only, as in Keras: a pre-activation block ends in a conv).
    """
    from keras_resnet.model import RESNET_SPECS

    kind, layers = RESNET_SPECS[options["depth"]]
    if options.get("preact"):
        return PreActResNet(PreActBasic if kind == "basic" else PreActBottleneck, layers,
                            num_classes, stem=stem)
    block = BasicBlock if kind == "basic" else Bottleneck
    width = int(options.get("base_width", 64) * options.get("width_multiplier", 1))
    return ResNet(block, layers, num_classes, groups=options.get("cardinality", 1),
                  width_per_group=width, stem=stem, avg_down=options.get("avg_down", False),
                  zero_init_residual=zero_init_residual)


def randomize_bn_statistics(model, seed=0):
    """Give every BatchNorm non-trivial statistics, so eval mode tests them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model
