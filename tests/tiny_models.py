"""Tiny real modules for torch-module tests (importable as `tests.tiny_models:make_cnn`)."""

from __future__ import annotations

import torch


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) -> (B, 10)
        x = torch.relu(self.conv1(pixel_values))
        x = torch.relu(self.conv2(x))  # (B, 16, 8, 8)
        return self.head(x.mean(dim=(2, 3)))


def make_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


#: family torch-module options for `make_cnn` (what a recipe's `model:` section states)
CNN_OPTIONS = {"inputs": [{"name": "pixel_values", "shape": [1, 3, 16, 16]}], "outputs": ["logits"]}


class TinyMobileNet(torch.nn.Module):
    """Depthwise-separable blocks with BatchNorm (random statistics, so channel ranges differ as in trained nets)
    and ReLU6: the structure of MobileNet / EfficientNet-Lite at 32 x 32."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                 nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(block(16, 24, 1), block(24, 32, 2), block(32, 32, 1))
        self.head = nn.Linear(32, classes)
        generator = torch.Generator().manual_seed(0)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):  # trained-looking statistics: wide per-channel scales
                c = module.num_features
                module.weight.data = torch.rand(c, generator=generator) * 3 + 0.2
                module.bias.data = torch.randn(c, generator=generator) * 0.5
                module.running_mean.data = torch.randn(c, generator=generator) * 0.5
                module.running_var.data = torch.rand(c, generator=generator) * 2 + 0.05

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, 10)
        x = self.blocks(self.stem(pixel_values))  # (B, 32, 8, 8)
        return self.head(x.mean(dim=(2, 3)))


def make_mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyMobileNet().eval()


def make_mobilenet_wide_head() -> torch.nn.Module:
    """TinyMobileNet with a 512-class head: the classifier holds most of its weights, as in ImageNet CNNs."""
    torch.manual_seed(0)
    return TinyMobileNet(classes=512).eval()


#: family image-classifier options for `make_mobilenet` (32 x 32 RGB, ImageNet normalisation)
MOBILENET_OPTIONS = {"preprocessing": {"resize": 36, "crop": 32}, "outputs": ["logits"]}
