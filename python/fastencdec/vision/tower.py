"""A CLIP-style vision transformer (ViT) whose attention runs through ``fastencdec.ops``.

The reference tower is CLIP ViT-L/14 at 336 px: a 14x14 patch convolution (no bias),
a class token, learned absolute position embeddings, a LayerNorm before the first
layer ("pre_layrnorm" in Hugging Face's naming), pre-LayerNorm layers with a
quick-GELU MLP. Features are the hidden states after ``feature_layer`` (Hugging
Face's ``hidden_states`` index: 0 = the normed embeddings, -2 = the second-to-last
layer's output), patch tokens only: ``(image_size / patch_size)^2`` tokens of
``width`` per crop (576 x 1024 for the reference).

Layers after the feature layer never influence the output, so they are not built
(a checkpoint's extra layers are skipped on load). Attention is
``ops.self_attention(causal=False, rope=False)``: the C++ (CPU) and Triton (GPU)
kernels serve it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..argcheck import int_at_least, positive_int

__all__ = ["VisionConfig", "VisionTower", "VISION_PRESETS", "ACTIVATIONS"]

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class VisionConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    n_layers: int = 24          # the checkpoint's depth; layers past feature_layer are not built
    n_heads: int = 16
    mlp_dim: int = 4096
    feature_layer: int = -2     # Hugging Face hidden_states index of the features
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("image_size", "patch_size", "width", "n_layers", "n_heads", "mlp_dim"):
            setattr(self, name, positive_int(f"vision {name}", getattr(self, name)))
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if self.width % self.n_heads:
            raise ValueError(f"vision width ({self.width}) must be a multiple of n_heads "
                             f"({self.n_heads})")
        self.feature_layer = int_at_least("vision feature_layer", self.feature_layer,
                                          -(self.n_layers + 1))
        if not self.feature_layer <= self.n_layers:
            raise ValueError(f"vision feature_layer must lie in [-{self.n_layers + 1}, "
                             f"{self.n_layers}], got {self.feature_layer}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"vision activation must be one of {ACTIVATIONS}, "
                             f"got {self.activation!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"vision norm_eps must be > 0, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        return self.grid ** 2

    @property
    def layers_used(self) -> int:
        """Layers run (and built): those up to the feature layer."""
        return self.feature_layer % (self.n_layers + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VisionConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> VisionConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> VisionConfig:
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; choose one of "
                             f"{sorted(VISION_PRESETS)}")
        return cls(**VISION_PRESETS[name])


VISION_PRESETS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14-336: 576 patch tokens of width 1024 per crop
    "clip-vit-l-336": dict(image_size=336, patch_size=14, width=1024, n_layers=24, n_heads=16,
                           mlp_dim=4096, feature_layer=-2, activation="quick_gelu"),
    # tests and demos: 32 px crops, 16 tokens of width 64 (head_dim 32), 2 layers run
    "tiny": dict(image_size=32, patch_size=8, width=64, n_layers=3, n_heads=2, mlp_dim=128,
                 feature_layer=-2, activation="quick_gelu"),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        self.patch_embedding = nn.Conv2d(3, config.width, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.tokens_per_crop + 1, config.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [N, grid*grid, width], row-major
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        shape = (n, length, self.n_heads, self.head_dim)
        o = ops.self_attention(self.q_proj(x).view(shape), self.k_proj(x).view(shape),
                               self.v_proj(x).view(shape), causal=False, rope=False)
        return self.out_proj(o.reshape(n, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)
        self.act = quick_gelu if config.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """``forward(pixels [N, 3, S, S]) -> [N, tokens_per_crop, width]`` patch features."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.layers_used))
        self.apply(_init_weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise TypeError("pixels must be a floating-point torch.Tensor [N, 3, S, S]")
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must have shape [N, 3, {size}, {size}], "
                             f"got {list(pixels.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:]  # patch tokens; the class token is dropped

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    # CLIP-like scale: small normal weights, zero biases, unit LayerNorms
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, Embeddings):
        nn.init.normal_(module.class_embedding, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
