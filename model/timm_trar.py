"""TRAR in any timm Vision Transformer: a routed attention layer with timm's `Attention` interface.

`trar_vit(name_or_model, orders, pooling, routing)` builds (or takes) a timm `VisionTransformer`, lets timm load
its weights (a local file through `pretrained_cfg_overlay=dict(file=...)`, or the hub), then swaps every block's
`Attention` for a `RoutedAttention` that keeps the same modules (`qkv`, `q_norm`, `k_norm`, `norm`, `proj`: timm's
weights and names unchanged) and adds TRAR's `Router` (`attn.router.*`, its own initialisation). Every prefix
token (class, registers, distillation) is global in every order; models without a class token and non-square
grids work. With no orders the model is timm's own, untouched.
"""
import copy
from pathlib import Path
from typing import Sequence

import ml_collections
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .attention import Spans, as_grid, implementation_for, routed_attention, routed_attention_maps
from .config import get_config
from .reading import one_line
from .trar import Router, check_routing


class RoutedAttention(Attention):
    """timm's `Attention` whose attention is TRAR's routed mix over span orders.

    Parameters and names are `Attention`'s (`qkv`, `q_norm`, `k_norm`, `norm`, `proj`, optional `gate`) plus
    `router`; `spans` is the model's one `Spans` (grid, orders, prefix tokens), shared by its layers, and
    `implementation` the routed attention it asks for ('auto': by device; `model.attention.implementation_for`).
    `last_alphas` holds the routing weights of the last forward pass; with `keep_map` set, `last_map` holds the
    mixed (B, H, N, N) attention map.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, spans: Spans, pooling: str = 'avg', routing: str = 'soft',
                 binarize: bool = False, router_dropout: float = 0.1, implementation: str = 'auto',
                 **attention_kwargs):
        super().__init__(dim, num_heads, **attention_kwargs)
        check_routing(pooling, routing)
        implementation_for('cpu', implementation)  # a bad name fails here, in one line
        self.spans, self.implementation = spans, implementation
        self.router = Router(dim, len(spans.orders), pooling, routing, binarize, dropout_rate=router_dropout)
        self.last_alphas: torch.Tensor | None = None
        self.keep_map = False
        self.last_map: torch.Tensor | None = None

    @classmethod
    def from_attention(cls, attention: Attention, spans: Spans, **routing) -> 'RoutedAttention':
        """The routed twin of a timm `Attention`: the same modules (weights shared, unchanged) and a fresh router."""
        if type(attention) is not Attention:
            raise ValueError(f"{type(attention).__name__} is not timm's Attention; TRAR routes timm's plain "
                             "multi-head attention only")
        dim, weight = attention.qkv.in_features, attention.qkv.weight
        with torch.device('meta'):  # timm's modules are taken below: nothing to allocate or initialise
            routed = cls(dim, attention.num_heads, attn_head_dim=attention.head_dim,
                         dim_out=attention.proj.out_features, spans=spans, **routing)
        for name, module in attention.named_children():  # qkv, q_norm, k_norm, attn_drop, norm, proj, gate ...
            setattr(routed, name, module)
        routed.fused_attn = attention.fused_attn
        router = routed.router  # built on the meta device: built again, initialised, where the weights are
        routed.router = Router(dim, len(spans.orders), router.pooling, router.routing, router.binarize,
                               dropout_rate=routing.get('router_dropout', 0.1)).to(weight.device, weight.dtype)
        return routed.train(attention.training)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("TRAR routed attention takes no attn_mask or is_causal: its span masks are its own")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        alphas = self.router(x)
        self.last_alphas = alphas.detach()
        if self.keep_map:
            self.last_map = routed_attention_maps(q, k, self.spans.tensors_on(q.device)[0], alphas).detach()
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = routed_attention(q, k, v, alphas, self.spans, dropout_p, implementation=self.implementation,
                             binarized=self.router.binarize)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def trar_vit(model: str | VisionTransformer, orders: Sequence[int] = (0, 1, 2), pooling: str = 'avg',
             routing: str = 'soft', *, binarize: bool = False, router_dropout: float = 0.1,
             implementation: str = 'auto', weights: str | Path | None = None,
             **create_kwargs) -> VisionTransformer:
    """A timm ViT (a name for `timm.create_model`, or an instance) with TRAR routed attention in every block.

    `weights`: a local file (`.safetensors`, `.pth`, `.bin`, or a Google `.npz`) or a hub id (`timm/...`,
    `hf-hub:timm/...`) that timm loads into the named model before routing; `create_kwargs` go to
    `timm.create_model` (`pretrained=True` takes the name's own hub weights, `num_classes`, `img_size`...).
    `implementation`: the routed attention the layers ask for ('auto' or a name of `model.attention.IMPLEMENTATIONS`).
    With `orders` empty the model is timm's, unchanged. Routers are initialised fresh.
    """
    if isinstance(model, str):
        model = create(model, weights, **create_kwargs)
    elif weights is not None or create_kwargs:
        raise ValueError("weights and create_kwargs apply to a model name; this model is already built")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer; TRAR routes timm's "
                         "VisionTransformer family (AugReg, DeiT, DeiT III, MAE, BEiT-style GAP, DINOv2, CLIP, SigLIP)")
    orders = list(orders)
    check_routing(pooling, routing)
    if not orders:
        return model
    if getattr(model, 'dynamic_img_size', False):
        raise ValueError("a timm ViT with dynamic_img_size has no fixed patch grid to route over; "
                         "create it with dynamic_img_size=False")
    spans = Spans(tuple(model.patch_embed.grid_size), orders, model.num_prefix_tokens)
    spans.to(next(model.parameters()).device)
    for index, block in enumerate(model.blocks):
        attention = getattr(block, 'attn', None)
        if attention is None:
            raise ValueError(f"blocks.{index} ({type(block).__name__}) has no separate attention to route")
        try:
            block.attn = RoutedAttention.from_attention(attention, spans, pooling=pooling, routing=routing,
                                                        binarize=binarize, router_dropout=router_dropout,
                                                        implementation=implementation)
        except ValueError as error:
            raise ValueError(f"blocks.{index}.attn: {error}") from None
    return model


def create(name: str, weights: str | Path | None = None, **create_kwargs) -> VisionTransformer:
    """`timm.create_model(name)` with its weights from a local file or a hub id (None: as `create_kwargs` say)."""
    if weights is not None:
        source = str(weights)
        if Path(source).exists():
            path = Path(source)
            overlay = dict(file=str(path), custom_load=path.suffix == '.npz')
        else:
            overlay = dict(hf_hub_id=source.removeprefix('hf-hub:'), source='hf-hub')
        overlay = {**create_kwargs.get('pretrained_cfg_overlay', {}), **overlay}
        create_kwargs = dict(create_kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
        if 'hf_hub_id' in overlay:
            from huggingface_hub.errors import EntryNotFoundError, HFValidationError
            try:
                return timm.create_model(name, **create_kwargs)
            except (OSError, EntryNotFoundError, HFValidationError) as error:  # not cached offline, not on the hub
                raise ValueError(f"weights {source} are neither a local file nor a hub repository that can be read "
                                 f"({type(error).__name__}: {one_line(error, limit=200)})") from None
    return timm.create_model(name, **create_kwargs)


def routed_layers(model: nn.Module) -> list[RoutedAttention]:
    """The routed attention layers of a model, in order."""
    return [module for module in model.modules() if isinstance(module, RoutedAttention)]


def routing_weights(model: nn.Module) -> torch.Tensor | None:
    """Routing weights of the last forward pass: (num_layers, B, len(orders)), or None."""
    alphas = [layer.last_alphas for layer in routed_layers(model)]
    if not alphas or alphas[0] is None:
        return None
    return torch.stack(alphas)


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the Gumbel-softmax temperature of every router (hard routing)."""
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    for layer in routed_layers(model):
        layer.router.tau.fill_(tau)


# ---------------------------------------------------------------------------------------------
# A timm ViT for the scripts (train.py, eval.py, test.py): `--model_type timm:<name>`

PREFIX = 'timm:'
# The fields of model/config.py's `transformer` that a timm model takes (its architecture is timm's).
ROUTING_FIELDS = ('pooling', 'routing', 'binarize', 'eval_noise', 'tau_max', 'tau_min', 'dropout_rate', 'attention')


def is_timm(model_type: str) -> bool:
    """Whether a `--model_type` names a timm model (`timm:<name>`)."""
    return str(model_type).startswith(PREFIX)


def timm_config(model_type: str, orders: Sequence[int] = (0, 1, 2)) -> ml_collections.ConfigDict:
    """The config of a `timm:<name>` model: its name and TRAR's routing fields, as `model/config.py` has them.

    The architecture is timm's (the name); `transformer.num_layers` is filled in when the model is built.
    """
    name = model_type.removeprefix(PREFIX)
    if not name or name.split('.')[0] not in timm.list_models(name.split('.')[0]):
        raise ValueError(f"--model_type {model_type!r}: expected timm:<a timm model name>, e.g. "
                         "timm:vit_base_patch16_224.augreg_in21k")
    routing = {field: get_config('testing').transformer[field] for field in ROUTING_FIELDS}
    return ml_collections.ConfigDict({'timm_name': name, 'transformer': {**routing, 'orders': list(orders)}})


class TimmViT(nn.Module):
    """A timm ViT, routed by `trar_vit` when its config has orders, with the interface of this repository's
    `VisionTransformer` that the scripts use: `config`, `img_size`, `grid`, `num_classes`, `is_routed`,
    `routing_weights()`, `set_tau()`, `attention_maps()`. Its state dict is timm's under `vit.`.

    `weights` (a local file or hub id) are loaded by timm; `keep_head` loads the file's head of `num_classes`
    classes (prediction), otherwise timm keeps it only when its classes are the model's; `zero_head` zeroes it.
    """

    def __init__(self, config: ml_collections.ConfigDict, img_size: int | Sequence[int] | None = None,
                 num_classes: int | None = None, weights: str | Path | None = None, keep_head: bool = False,
                 zero_head: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        t = config.transformer
        given = {key: value for key, value in (('img_size', img_size and as_grid(img_size)),
                                               ('num_classes', num_classes)) if value is not None}
        if keep_head and num_classes is not None:  # the file's head has these classes: load it, never drop it
            given['pretrained_cfg_overlay'] = dict(num_classes=num_classes)
        try:
            self.vit = trar_vit(config.timm_name, list(t.orders), t.pooling, t.routing, binarize=t.binarize,
                                router_dropout=t.dropout_rate, implementation=t.get('attention', 'auto'),
                                weights=weights, drop_path_rate=drop_path_rate, **given)
        except RuntimeError as error:  # timm's strict load: missing keys, other shapes
            raise ValueError(f"{weights}: timm cannot load it into {config.timm_name}: "
                             f"{' '.join(str(error).split())[:300]}") from None
        for layer in routed_layers(self.vit):
            layer.router.eval_noise = t.eval_noise
        self.config = copy.deepcopy(config)  # the caller's stays as given; this one knows the depth
        self.config.transformer.num_layers = len(self.vit.blocks)
        self.num_classes = self.vit.num_classes
        self.img_size = tuple(self.vit.patch_embed.img_size)
        self.grid = tuple(self.vit.patch_embed.grid_size)
        self.zero_head = zero_head
        if zero_head:  # a fine-tune's fresh head starts at zero, as this repository's VisionTransformer's does
            for name, parameter in self.vit.named_parameters():
                if name.startswith('head'):
                    nn.init.zeros_(parameter)

    @property
    def is_routed(self) -> bool:
        return len(self.config.transformer.orders) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def routing_weights(self) -> torch.Tensor | None:
        return routing_weights(self.vit)

    def attention_implementation(self, device: torch.device | str | None = None) -> str | None:
        """The routed attention implementation this model runs on `device` (default: where its weights are)."""
        if not self.is_routed:
            return None
        device = next(self.parameters()).device if device is None else device
        return implementation_for(device, self.config.transformer.get('attention', 'auto'))

    def set_tau(self, tau: float) -> None:
        set_tau(self.vit, tau)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the (B, heads, 1 + patches, 1 + patches) attention map used (the routed mix when routed):
        token 0 is the first prefix token (the class token) and the other prefix tokens are left out; without a
        prefix token, token 0 is the mean over the patch queries."""
        layers = routed_layers(self.vit)
        inputs, hooks = [], [block.attn.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
                             for block in self.vit.blocks]
        for layer in layers:
            layer.keep_map = True
        try:
            self.vit(x)
            maps = [layer.last_map for layer in layers] or [_plain_map(block.attn, tokens)
                                                              for block, tokens in zip(self.vit.blocks, inputs)]
        finally:
            for hook in hooks:
                hook.remove()
            for layer in layers:
                layer.keep_map, layer.last_map = False, None
        prefix = self.vit.num_prefix_tokens
        if prefix == 0:
            return [F.pad(torch.cat([m.mean(dim=2, keepdim=True), m], dim=2), (1, 0)) for m in maps]
        keep = [0, *range(prefix, maps[0].shape[-1])]
        return [m[:, :, keep][:, :, :, keep] for m in maps]


def _plain_map(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    """The (B, H, N, N) attention map of timm's `Attention` on its input tokens x."""
    B, N, _ = x.shape
    q, k, _ = attention.qkv(x).reshape(B, N, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attention.q_norm(q), attention.k_norm(k)
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


def data_config(model: nn.Module | str) -> dict:
    """timm's preprocessing of a model's pretrained weights (`resolve_data_config`): mean, std, interpolation,
    crop_pct. `model`: a built model, or a `timm:<name>` (built empty, on the meta device, to read its config)."""
    if isinstance(model, str):
        with torch.device('meta'):
            model = timm.create_model(model.removeprefix(PREFIX))
    vit = model.vit if isinstance(model, TimmViT) else model
    return timm.data.resolve_data_config({}, model=vit)


def from_checkpoint(checkpoint: dict, img_size: int | None = None) -> TimmViT:
    """The model a train.py checkpoint of a timm model holds (its config names the timm model), in eval mode."""
    config = ml_collections.ConfigDict(checkpoint['config'])
    model = TimmViT(config, img_size or checkpoint['img_size'], checkpoint['num_classes'])
    model.load_state_dict(checkpoint['state_dict'])
    return model.eval()


def pretrained_model(model_type: str, weights: str | Path, orders: Sequence[int] = (), img_size: int | None = None,
                     num_classes: int | None = None) -> TimmViT:
    """A `timm:<name>` model with its weights and head from a local file or hub id, in eval mode (eval.py, test.py)."""
    return TimmViT(timm_config(model_type, orders), img_size, num_classes, weights, keep_head=True).eval()

