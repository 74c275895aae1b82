"""CNN: a small ResNet (He et al. 2016) for small images, 8x8 digits to 32x32 CIFAR.

A 3x3 stem, then one stage of residual blocks per width, halving height and width at the start of every stage
after the first, then global average pooling and a linear head (class logits, or values for float targets). No
7x7 stem and no max-pool: on images this small they would throw away most of the pixels before the first block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.config.schema import CNNConfig
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.models.meta import meta_device


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU; the shortcut is a 1x1 conv when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != (1, 1) or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CNN(nn.Module):
    """Maps images (B, C, H, W) to (B, num_outputs): class logits, or one value per float target."""

    def __init__(self, cfg: CNNConfig, *, input_shape: tuple[int, int, int], num_outputs: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.stem = nn.Sequential(
            nn.Conv2d(channels, cfg.widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(cfg.widths[0]), nn.ReLU()
        )
        blocks = []
        in_channels = cfg.widths[0]
        for stage, out_channels in enumerate(cfg.widths):
            # Halve each spatial dim at a new stage, but a dim already down to 1 stays at stride 1.
            stride = (2 if stage > 0 and height > 1 else 1, 2 if stage > 0 and width > 1 else 1)
            height, width = (height + stride[0] - 1) // stride[0], (width + stride[1] - 1) // stride[1]
            for index in range(cfg.blocks_per_stage):
                blocks.append(BasicBlock(in_channels, out_channels, stride=stride if index == 0 else (1, 1)))
                in_channels = out_channels
        # A flat list rather than stages, so sharding and checkpointing see every block alike.
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(in_channels, num_outputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.stem(inputs)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))

    @torch.no_grad()
    def init_weights(self) -> None:
        """He initialization for convolutions (as torchvision's ResNet), identity BatchNorm with fresh running
        statistics, torch's default for the classifier; drawn from torch's global RNG."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # weight 1, bias 0, and the running statistics and counter
        self.head.reset_parameters()


def build_cnn(cfg: CNNConfig, data: DataSpec) -> CNN:
    """A ResNet for ``data``'s images.

    Args:
        cfg: the model settings.
        data: the image data it trains on; its samples must be (C, H, W).
    """
    shape = data.input_shape
    assert shape is not None  # image data has one (DataSpec)
    if len(shape) != 3:
        raise UserError(
            f"model=cnn needs images shaped (channels, height, width), but the data's samples are shaped "
            f"{shape}; use model=mlp for feature vectors"
        )
    return CNN(cfg, input_shape=shape, num_outputs=data.num_outputs)


def cnn_blocks(model: CNN) -> list[nn.Module]:
    """The residual blocks of every stage, in order."""
    return list(model.blocks)


def cnn_flops_per_token(cfg: CNNConfig, data: DataSpec, model: CNN, *, non_embedding_params: int) -> float:
    """Training FLOPs per sample: the forward's convolutions and matmuls as torch counts them, times 3.

    A convolution's FLOPs depend on the feature-map sizes, not just the weights, so they are counted on a
    fresh copy of the model on the meta device: nothing is computed or allocated, and ``model`` (perhaps
    on a GPU, its BatchNorm statistics part of the training state) is not touched. The backward costs about
    twice the forward (gradients for the inputs and for the weights), hence the 3.

    Args:
        cfg: the model settings.
        data: the image data, for the sample shape.
        model: the built model (unused: see above).
        non_embedding_params: unused; convolutions are counted directly.
    """
    assert data.input_shape is not None  # image data has one (DataSpec)
    with meta_device():
        probe = build_cnn(cfg, data).eval()  # eval: BatchNorm in training mode rejects one 1x1 sample
        sample = torch.zeros(1, *data.input_shape)
    with FlopCounterMode(display=False) as counter:
        probe(sample)
    return 3.0 * counter.get_total_flops()
