"""Step3 vision tower, downsamplers and projector: the reference (vLLM's step3_vl; docs/model.md).

Module names follow the checkpoint exactly: `Step3VisionEncoder` is what sits under the
`vision_model.` prefix, and `build_vision_heads` returns the top-level `vit_downsampler`,
`vit_downsampler2` and `vit_large_projector`. Everything builds on the meta device.

Two details are easy to get wrong and are kept on purpose:
- LayerNorm sits on the *branch output*: `h = h + LN1(Attn(h))`, `h = h + LN2(MLP(h))`.
- The 3 pad tokens prepended before the layers are copies of the CLS token *after* its
  position embedding was added (vLLM `embeddings[:, 0, :]`), not raw `class_embedding`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from step3_edge.config import Step3Config, Step3VisionConfig
from step3_edge.errors import ImageError, PromptError

PAD_TP_SIZE = 4  # tokens in front of the patches: 3 CLS copies + CLS (vLLM "hard code for padding")
# Crops per vision-tower call. The crop rule has no upper bound: a 64x20000 image gives 336
# crops, whose activations in one batch (and the attention scores of an exported graph)
# exhausted 24 GB with `tiny`'s 32-wide ViT. Step3's ViT at 8 crops: ~0.6 GB per MLP tensor.
CROPS_PER_CALL = 8


def crop_batches(crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An image's crops [n, 3, S, S] in tower calls of at most CROPS_PER_CALL (none for n = 0)."""
    return crops.split(CROPS_PER_CALL) if crops.shape[0] else ()


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's quick_gelu: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def resize_position_embedding(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Position table [G*G+1, w] (row 0 = CLS) for a `grid` x `grid` patch grid.

    Returns `table` itself when grid == G. Otherwise the G x G part is resized bicubically in
    fp32 (antialias, align_corners=False) and cast back; the CLS row is kept unchanged.
    """
    n, w = table.shape
    src = math.isqrt(n - 1)
    assert src * src == n - 1, f"position table has {n} rows, not G*G+1"
    if src == grid:
        return table
    cls_row, pos = table[:1], table[1:]                                   # [1, w], [G*G, w]
    pos = pos.reshape(1, src, src, w).permute(0, 3, 1, 2).to(torch.float32)  # [1, w, G, G]
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", antialias=True,
                        align_corners=False)                              # [1, w, g, g]
    pos = pos.to(table.dtype).permute(0, 2, 3, 1).reshape(grid * grid, w)  # [g*g, w]
    return torch.cat([cls_row, pos], dim=0)                               # [g*g+1, w]


class Step3VisionEmbeddings(nn.Module):
    def __init__(self, v: Step3VisionConfig) -> None:
        super().__init__()
        self.patch_size = v.patch_size
        self.num_channels = v.num_channels
        grid = v.image_size // v.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, v.hidden_size))
        self.patch_embedding = nn.Conv2d(v.num_channels, v.hidden_size, kernel_size=v.patch_size,
                                         stride=v.patch_size, bias=True)
        self.position_embedding = nn.Embedding(grid * grid + 1, v.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] pixels -> [B, 4 + N, w] tokens (3 CLS copies, CLS, N patches)."""
        _check_pixels(pixel_values, self.num_channels, self.patch_size)
        b = pixel_values.shape[0]
        x = pixel_values.to(self.patch_embedding.weight.dtype)
        patches = self.patch_embedding(x)                        # [B, w, g, g]
        grid = patches.shape[-1]
        patches = patches.flatten(2).transpose(1, 2)             # [B, N, w]
        cls = self.class_embedding.expand(b, 1, -1)              # [B, 1, w]
        h = torch.cat([cls, patches], dim=1)                     # [B, 1+N, w]
        h = h + resize_position_embedding(self.position_embedding.weight, grid)  # [B, 1+N, w]
        pad = h[:, :1].expand(b, PAD_TP_SIZE - 1, -1)            # [B, 3, w]
        return torch.cat([pad, h], dim=1)                        # [B, 4+N, w]


class Step3VisionAttention(nn.Module):
    def __init__(self, v: Step3VisionConfig) -> None:
        super().__init__()
        self.num_heads = v.num_attention_heads
        self.head_dim = v.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=True)
        self.out_proj = nn.Linear(v.hidden_size, v.hidden_size, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        qkv = self.qkv_proj(h)                                                    # [B, T, 3w]
        qkv = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                   # [B, H, T, d]
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)             # [B, H, T, d]
        return self.out_proj(o.transpose(1, 2).reshape(b, t, w))                  # [B, T, w]


class Step3VisionMLP(nn.Module):
    def __init__(self, v: Step3VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size, bias=True)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(h)))                 # [B, T, w]


class Step3VisionEncoderLayer(nn.Module):
    """One ViT layer with LayerNorm on the branch outputs (not pre-norm, as in vLLM's step3_vl)."""

    def __init__(self, v: Step3VisionConfig) -> None:
        super().__init__()
        self.self_attn = Step3VisionAttention(v)
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = Step3VisionMLP(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, w] -> [B, T, w]."""
        h = h + self.layer_norm1(self.self_attn(h))
        h = h + self.layer_norm2(self.mlp(h))
        return h


class Step3VisionLayers(nn.Module):
    def __init__(self, v: Step3VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Step3VisionEncoderLayer(v) for _ in range(v.num_hidden_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


class Step3VisionEncoder(nn.Module):
    """The ViT stored under `vision_model.`: pixels [B, 3, S, S] -> patch features [B, N, w].

    N = (S / patch)^2; the 4 prefix tokens (3 CLS copies + CLS) take part in attention and are
    dropped from the output. S = image_size uses the position table as stored; any other
    multiple of the patch size (504 px crops) resizes it bicubically.
    """

    def __init__(self, config: Step3VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Step3VisionEmbeddings(config)
        self.transformer = Step3VisionLayers(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] -> [B, N, w] in the parameters' dtype."""
        h = self.embeddings(pixel_values)                        # [B, 4+N, w]
        h = self.transformer(h)                                  # [B, 4+N, w]
        return h[:, PAD_TP_SIZE:]                                # [B, N, w]


def build_vision_heads(cfg: Step3Config) -> dict[str, nn.Module]:
    """The top-level checkpoint modules after the ViT, keyed by their checkpoint prefix:
    `vit_downsampler` (Conv2d w->o, k2, s=understand_projector_stride), `vit_downsampler2`
    (Conv2d o->2o, k3 s2 p1) and `vit_large_projector` (Linear 2o->text hidden)."""
    v = cfg.vision_config
    w, o = v.hidden_size, v.output_hidden_size
    return {
        "vit_downsampler": nn.Conv2d(w, o, kernel_size=2, stride=cfg.understand_projector_stride,
                                     padding=0, bias=True),
        "vit_downsampler2": nn.Conv2d(o, 2 * o, kernel_size=3, stride=2, padding=1, bias=True),
        "vit_large_projector": nn.Linear(2 * o, cfg.text_config.hidden_size,
                                         bias=cfg.projector_bias),
    }


def project_features(features: torch.Tensor, vit_downsampler: nn.Module,
                     vit_downsampler2: nn.Module, vit_large_projector: nn.Module) -> torch.Tensor:
    """ViT features [B, N, w] (N a square, row-major patches) -> LLM embeddings [B, N', hidden].

    Two convs then the projector, with no activation anywhere; 728 px gives N' = 169 and a
    504 px crop N' = 81 (`Step3Config.vision_tokens`).
    """
    b, n, w = features.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ImageError(f"vision features hold {n} tokens, which is not a square grid",
                         "pass the ViT output of one square view ([B, g*g, w])")
    x = features.transpose(1, 2).reshape(b, w, g, g)             # [B, w, g, g]
    x = vit_downsampler(x)                                       # [B, o, g1, g1]
    x = vit_downsampler2(x)                                      # [B, 2o, g2, g2]
    x = x.flatten(2).transpose(1, 2)                             # [B, g2*g2, 2o]
    return vit_large_projector(x)                                # [B, N', hidden]


def encode_images(images: list, tower: Step3VisionEncoder,
                  heads: tuple[nn.Module, nn.Module, nn.Module], dtype: torch.dtype
                  ) -> torch.Tensor:
    """Vision features for a list of ImageViews, in token order: for each image its crops
    (raster order, `CROPS_PER_CALL` per tower call) then its global view, each view through
    the tower and `project_features` with `heads` -> [n_image_tokens, hidden]."""
    feats = []
    for views in images:
        for crops in crop_batches(views.crops):
            f = project_features(tower(crops.to(dtype)), *heads)
            feats.append(f.reshape(-1, f.shape[-1]))                    # [n*81, h]
        g = project_features(tower(views.global_view[None].to(dtype)), *heads)
        feats.append(g[0])                                              # [169, h]
    return torch.cat(feats)


def embed_with_images(embed_tokens: nn.Module, input_ids: torch.Tensor, image_token_id: int,
                      images: list | None, encode: Callable[[list], torch.Tensor]
                      ) -> torch.Tensor:
    """Token embeddings [B, T, h] with the features `encode(images)` [n, h] written at the n
    `<im_patch>` positions of input_ids [B, T]."""
    x = embed_tokens(input_ids)                                         # [B, T, h]
    slots = input_ids == image_token_id
    n_slots = int(slots.sum())
    if not images:
        if n_slots:
            raise PromptError(f"the prompt holds {n_slots} <im_patch> tokens but no image",
                              "pass the images, or remove the image placeholders")
        return x
    feats = encode(images)
    if feats.shape[0] != n_slots:
        raise PromptError(f"{feats.shape[0]} image features for {n_slots} <im_patch> "
                          "tokens", "build the prompt with Step3Processor so each image "
                          "placeholder is expanded to its token layout")
    x = x.clone()
    x[slots] = feats.to(x.dtype)
    return x


def _check_pixels(pixel_values: torch.Tensor, channels: int, patch: int) -> None:
    shape = tuple(pixel_values.shape)
    if (len(shape) != 4 or shape[1] != channels or shape[2] != shape[3]
            or shape[2] % patch or shape[2] == 0):
        raise ImageError(
            f"pixel_values has shape {list(shape)}, expected [B, {channels}, S, S] with S a "
            f"positive multiple of {patch}",
            "preprocess images with the Step3 processor (728 px views, 504 px crops)")
