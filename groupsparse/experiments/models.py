"""Models of the pruning experiments, written out (no torchvision): MLP (LeNet-300-100), LeNet-5, CIFAR ResNets
(He et al. 2016, option A shortcuts: parameter-free, so every prunable weight is a real conv) and VGG16-BN."""

from __future__ import annotations

import math

from torch import nn
import torch.nn.functional as F

MODELS = ("mlp", "lenet5", "resnet20", "resnet56", "vgg16")


def _kaiming_convs(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class MLP(nn.Module):
    """LeNet-300-100: two ReLU hidden layers of 300 and 100 units (flattens image inputs)."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden=(300, 100)):
        super().__init__()
        dims = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class LeNet5(nn.Module):
    """LeNet-5 with padded 5x5 convs so it also fits 8x8 digits (1x8x8 -> 16x2x2) as well as 32x32 images."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        side = image_size // 4
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def shortcut(self, x):
        # Option A: subsample and zero-pad the channels (no parameters to prune or to leave dense).
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stages of 16/32/64 channels, n basic blocks each."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth: got {depth}, expected 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_convs(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG16 with BatchNorm, CIFAR variant: 13 convs, one Linear(512, classes) head."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10):
        super().__init__()
        layers, cin, side = [], in_channels, image_size
        for v in _VGG16:
            if v == "M":
                if side >= 2:  # small inputs (8x8 digits) run out of resolution before the 5th pool
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)
        _kaiming_convs(self)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    """Build ``name`` for inputs of ``input_shape`` ((features,) or (C, H, W)).

    Flat inputs of a square number of features (digits: 64) are viewed as 1xHxW images by the conv models.
    """
    if name not in MODELS:
        raise ValueError(f"model: got {name!r}, expected one of {MODELS}")
    if not isinstance(input_shape, tuple) or len(input_shape) not in (1, 3):
        raise ValueError(f"input_shape: got {input_shape!r}, expected (features,) or (C, H, W)")
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes)
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ValueError(f"input_shape: got {input_shape} for {name}, expected square images")
        return _Unflatten(build_model(name, (1, side, side), num_classes), (1, side, side))
    c, h, w = input_shape
    if name == "lenet5":
        return LeNet5(c, h, num_classes)
    if name == "resnet20":
        return CifarResNet(20, c, num_classes)
    if name == "resnet56":
        return CifarResNet(56, c, num_classes)
    return VGG16(c, h, num_classes)


class _Unflatten(nn.Module):
    def __init__(self, net: nn.Module, shape):
        super().__init__()
        self.net = net
        self.shape = shape

    def forward(self, x):
        return self.net(x.reshape(len(x), *self.shape))


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every Conv and Linear weight (biases and norms excluded, as the authors did), by qualified name."""
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out[f"{mname}.weight" if mname else "weight"] = m.weight
    return out
