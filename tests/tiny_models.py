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
