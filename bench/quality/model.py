"""A small ViT for 8×8 digits: 2×2 patches, a class token, pre-norm blocks with separate q/k/v/out.

Tensor names follow the usual ViT layout, so the engine's default embedding pattern (``embed``)
keeps ``patch_embed``, ``pos_embed`` and ``cls_embed`` out of OPCM's projection, while every
attention and MLP weight is a "linear" tensor it projects (DESIGN §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

PATCH = 2
IMAGE = 8
TOKENS = (IMAGE // PATCH) ** 2


@dataclass(frozen=True)
class BackboneConfig:
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        shape = (b, n, self.heads, d // self.heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config.width, config.mlp_ratio * config.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Backbone(nn.Module):
    """Images (B, 8, 8) → features (B, width): the final LayerNorm of the class token."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(PATCH * PATCH, config.width)
        self.cls_embed = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS + 1, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)

    @staticmethod
    def patches(images: Tensor) -> Tensor:
        b = images.shape[0]
        x = images.reshape(b, IMAGE // PATCH, PATCH, IMAGE // PATCH, PATCH)
        return x.permute(0, 1, 3, 2, 4).reshape(b, TOKENS, PATCH * PATCH)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(self.patches(images))
        x = torch.cat([self.cls_embed.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


def backbone_state(model: Backbone) -> dict[str, Tensor]:
    """The backbone's weights as a flat, contiguous, detached float32 state dict (what gets saved)."""
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in model.state_dict().items()}
