"""Vision Transformer with TRAR routed attention spans.

Module names follow ViT-pytorch, so its state dicts load directly into a plain model
(`transformer.embeddings.*`, `transformer.encoder.layer.{i}.attn.{query,key,value,out}`, `head`).
A routed model adds `attn.router.*` to every block. Pretrained weights of other layouts: `pretrained.py`.
"""
from collections import OrderedDict
from typing import Mapping, Sequence

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, calculate_drop_path_rates
from torch import nn

from .attention import Spans, as_grid, implementation_for, routed_attention, routed_attention_maps
from .config import validate_config
from .trar import Router, check_routing


class Embeddings(nn.Module):
    """Patch embedding, CLS token and learned position embedding."""

    def __init__(self, config: ml_collections.ConfigDict, img_size: tuple[int, int]):
        super().__init__()
        patch = as_grid(config.patches.size)
        for side, p in zip(img_size, patch):
            if side % p:
                raise ValueError(f"image size {img_size} is not divisible by the patch size {patch}")
        self.grid = (img_size[0] // patch[0], img_size[1] // patch[1])
        hidden = config.hidden_size
        self.patch_embeddings = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], hidden))
        self.dropout = nn.Dropout(config.transformer.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position_embeddings)


class Attention(nn.Module):
    """Multi-head self-attention; routed over span orders when the block has a router.

    A routed block attends over `spans` (the model's one `Spans`, shared by its blocks; built from `grid` and the
    config's orders when not given) with the implementation `config.transformer.attention` asks for ('auto': by
    device; see `model.attention.implementation_for`).
    """

    def __init__(self, config: ml_collections.ConfigDict, grid: tuple[int, int], spans: Spans | None = None):
        super().__init__()
        hidden, self.num_heads = config.hidden_size, config.transformer.num_heads
        if hidden % self.num_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {self.num_heads}")
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout_p = config.transformer.attention_dropout_rate
        self.proj_dropout = nn.Dropout(self.dropout_p)
        t = config.transformer
        orders = list(t.orders)
        self.implementation = t.get('attention', 'auto')  # older configs lack it, as they lack eval_noise
        self.router = Router(hidden, len(orders), t.pooling, t.routing, t.binarize, dropout_rate=t.dropout_rate,
                             eval_noise=t.get('eval_noise', False)) if orders else None
        self.spans = (spans if spans is not None else Spans(grid, orders)) if orders else None
        self.last_alphas: torch.Tensor | None = None

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, H, N, D / H)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, return_map: bool = False):
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        dropout_p = self.dropout_p if self.training else 0.0
        attention_map = None
        if self.router is None:
            if return_map:
                attention_map = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
                context = attention_map @ v
            else:
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            alphas = self.router(x)
            self.last_alphas = alphas.detach()
            if return_map:
                attention_map = routed_attention_maps(q, k, self.spans.tensors_on(q.device)[0], alphas)
                context = attention_map.to(v.dtype) @ v
            else:
                context = routed_attention(q, k, v, alphas, self.spans, dropout_p, implementation=self.implementation,
                                           binarized=self.router.binarize)
        out = self.proj_dropout(self.out(context.transpose(1, 2).flatten(2)))
        return out, attention_map


class Mlp(nn.Module):
    """The feed-forward block: Linear, GELU, Linear, with dropout."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.transformer.mlp_dim)
        self.fc2 = nn.Linear(config.transformer.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.transformer.dropout_rate)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight)
        nn.init.normal_(self.fc1.bias, std=1e-6)
        nn.init.normal_(self.fc2.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer block; `drop_path` is the rate of stochastic depth on both residual branches."""

    def __init__(self, config: ml_collections.ConfigDict, grid: tuple[int, int], spans: Spans | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = Attention(config, grid, spans)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn = Mlp(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # as timm's ViT Block

    def forward(self, x: torch.Tensor, return_map: bool = False):
        attended, attention_map = self.attn(self.attention_norm(x), return_map)
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.ffn(self.ffn_norm(x))), attention_map


class Encoder(nn.Module):
    """The stack of blocks and the final norm; builds the `Spans` (orders checked against the grid, masks and layout
    as buffers) that every block shares.

    Stochastic depth grows linearly over the blocks from 0 to `drop_path_rate`, timm's rule.
    """

    def __init__(self, config: ml_collections.ConfigDict, grid: tuple[int, int], drop_path_rate: float = 0.0):
        super().__init__()
        orders = list(config.transformer.orders)
        self.spans = Spans(grid, orders) if orders else None
        rates = calculate_drop_path_rates(drop_path_rate, config.transformer.num_layers)
        self.layer = nn.ModuleList(Block(config, grid, self.spans, rate) for rate in rates)
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor, return_maps: bool = False):
        maps = []
        for block in self.layer:
            x, attention_map = block(x, return_maps)
            maps.append(attention_map)
        return self.encoder_norm(x), maps


class Transformer(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict, img_size: tuple[int, int], drop_path_rate: float = 0.0):
        super().__init__()
        self.embeddings = Embeddings(config, img_size)
        self.encoder = Encoder(config, self.embeddings.grid, drop_path_rate)

    def forward(self, x: torch.Tensor, return_maps: bool = False):
        return self.encoder(self.embeddings(x), return_maps)


class VisionTransformer(nn.Module):
    """ViT classifier; every block routes its attention over `config.transformer.orders` (TRAR).

    `orders=[]` gives a plain ViT with no routing parameters. `img_size` is an int or (h, w).
    `drop_path_rate`: stochastic depth of the last block (a training setting, not part of the config).
    """

    def __init__(self, config: ml_collections.ConfigDict, img_size: int | Sequence[int] = 224,
                 num_classes: int = 21843, zero_head: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate {drop_path_rate}: expected a rate in [0, 1)")
        self.config = config
        self.img_size = as_grid(img_size)
        self.num_classes = num_classes
        self.zero_head = zero_head
        validate_config(config)
        self.transformer = Transformer(config, self.img_size, drop_path_rate)
        self.grid = self.transformer.embeddings.grid
        check_routing(config.transformer.pooling, config.transformer.routing)
        _check_img_scale(config, self.grid)
        # The pre-logits layer of ViT's ImageNet-21k models (vit_jax, timm): Dense + tanh, when the config asks for it.
        representation = config.get('representation_size')
        self.pre_logits = nn.Identity()
        if representation:
            fc = nn.Linear(config.hidden_size, representation)
            self.pre_logits = nn.Sequential(OrderedDict(fc=fc, act=nn.Tanh()))
        self.head = nn.Linear(representation or config.hidden_size, num_classes)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def is_routed(self) -> bool:
        return len(self.config.transformer.orders) > 0

    def attention_implementation(self, device: torch.device | str | None = None) -> str | None:
        """The routed attention implementation this model runs on `device` (default: where its weights are), as
        `config.transformer.attention` and the overrides resolve it; None for a plain ViT."""
        if not self.is_routed:
            return None
        device = next(self.parameters()).device if device is None else device
        return implementation_for(device, self.config.transformer.get('attention', 'auto'))

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (3, *self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"input of shape {tuple(x.shape)}; expected (batch, {', '.join(map(str, expected))})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, num_classes) logits."""
        self._check_input(x)
        tokens, _ = self.transformer(x)
        return self.head(self.pre_logits(tokens[:, 0]))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the (B, heads, N, N) attention map actually used (the routed mix for TRAR)."""
        self._check_input(x)
        _, maps = self.transformer(x, return_maps=True)
        return maps

    def routing_weights(self) -> torch.Tensor | None:
        """Routing weights of the last forward pass: (num_layers, B, len(orders)), or None."""
        alphas = [block.attn.last_alphas for block in self.transformer.encoder.layer]
        if not self.is_routed or alphas[0] is None:
            return None
        return torch.stack(alphas)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps free of weight decay (timm's ViT: pos_embed, cls_token)."""
        return {'transformer.embeddings.position_embeddings', 'transformer.embeddings.cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth for timm's layer-wise lr decay, as timm's ViT: the embeddings are layer 0,
        block i (its router included) layer i + 1, the final norm the last block's, the head (unmatched) the top."""
        return dict(stem=r'^transformer\.embeddings',
                    blocks=[(r'^transformer\.encoder\.layer\.(\d+)', None),
                            (r'^transformer\.encoder\.encoder_norm', (99999,))])

    def set_tau(self, tau: float) -> None:
        """Set the Gumbel-softmax temperature of every router (hard routing)."""
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        for block in self.transformer.encoder.layer:
            if block.attn.router is not None:
                block.attn.router.tau.fill_(tau)

    def load_from(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load Google's `.npz` arrays (e.g. `np.load('imagenet21k/ViT-B_16.npz')`), vit_jax or big_vision keys.

        Loads everything but the head when `zero_head`; resizes the position-embedding grid when the image
        size differs; routers keep their initialisation. Whatever does not fit raises one ValueError line.
        Other layouts (timm, ViT-pytorch, train.py checkpoints): `model.pretrained.load_pretrained`.
        """
        from .pretrained import from_google_arrays, load_into
        load_into(self, from_google_arrays(dict(weights)), head=not self.zero_head, routers=False)


def _check_img_scale(config: ml_collections.ConfigDict, grid: tuple[int, int]) -> None:
    """The original code's hand-set `img_scale` (grid side) is accepted only when it agrees."""
    for scope in (config, config.transformer):
        scale = scope.get('img_scale')
        if scale is not None and tuple(as_grid(scale)) != grid:
            raise ValueError(f"config img_scale={scale} disagrees with the {grid[0]}x{grid[1]} patch grid "
                             "of this image and patch size; remove img_scale, it is derived now")
