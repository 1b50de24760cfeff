"""Pretrained ViT weights in the layouts people hold, mapped onto this model's names.

One entry point for every tool: `read(path)` recognises the layout by the file's keys and renames
the tensors; `load_into(model, weights, ...)` fits them to a model (position embeddings resized to
its image size, head kept or left fresh, routers kept at their initialisation unless the file has
this model's routers) and names in one line whatever does not fit. Layouts:

- Google `.npz`, vit_jax (the 2020 checkpoints and AugReg: `Transformer/encoderblock_0/...`) and
  big_vision (`params/...`, blocks stacked or not);
- timm ViT state dicts (`.safetensors`, `.pth`, `.bin`: `blocks.0.attn.qkv.weight`), maybe wrapped
  in a 'state_dict' or 'model' entry;
- ViT-pytorch state dicts, which use this model's names;
- checkpoints written by train.py (a dict with 'state_dict' and 'config').
"""
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np
import torch
from scipy import ndimage

from .attention import as_grid
from .config import get_config, with_added_fields
from . import timm_trar
from .modeling import VisionTransformer
from .reading import check_file, one_line, read_checkpoint
from .trar import check_router_keys

LAYOUTS = ("Google .npz (vit_jax 'Transformer/encoderblock_0/...' or big_vision 'params/...')",
           "timm ViT state dict ('blocks.0.attn.qkv.weight'; .safetensors, .pth or .bin)",
           "ViT-pytorch state dict ('transformer.encoder.layer.0.attn.query.weight')",
           "train.py checkpoint (a dict with 'state_dict' and 'config')")
POSEMB = 'transformer.embeddings.position_embeddings'
PATCH = 'transformer.embeddings.patch_embeddings.weight'
HEAD = ('head.weight', 'head.bias')
PRE_LOGITS = ('pre_logits.fc.weight', 'pre_logits.fc.bias')  # the 2020 checkpoints' representation layer

Convert = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _same(w: torch.Tensor) -> tuple[torch.Tensor]:
    return (w,)


@dataclass(frozen=True)
class Rule:
    """One file key (pattern) and the model names it becomes; `{i}` is a block index, `{rest}` any suffix."""
    theirs: str
    ours: tuple[str, ...]
    convert: Convert = _same

    def match(self, key: str, pattern_of: Callable[['Rule'], str]) -> dict | None:
        found = _regex(pattern_of(self)).fullmatch(key)
        return found.groupdict() if found else None


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{rest\}', r'(?P<rest>[\w.]+)')
    return re.compile(escaped)


# ---------------------------------------------------------------------------------------------
# Layouts: each a list of rules from the file's names to this model's.


def _google_rules(prefix: str, big_vision: bool) -> list[Rule]:
    """vit_jax (MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) or big_vision (_0, _1, _0)."""
    mha, norm2, mlp = ('MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0') if big_vision else \
        ('MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')
    block, layer = f'{prefix}Transformer/encoderblock_{{i}}/', 'transformer.encoder.layer.{i}.'

    def t(w):  # a Dense kernel (in, out) -> Linear weight (out, in)
        return (w.T,)

    def heads_in(w):  # (D, heads, D/heads) -> (D, D), and its (heads, D/heads) bias -> (D,)
        return (w.reshape(w.shape[0], -1).T,) if w.dim() == 3 else (w.reshape(-1),)

    rules = [
        Rule(f'{prefix}embedding/kernel', (PATCH,), lambda w: (w.permute(3, 2, 0, 1),)),
        Rule(f'{prefix}embedding/bias', ('transformer.embeddings.patch_embeddings.bias',)),
        Rule(f'{prefix}cls', ('transformer.embeddings.cls_token',)),
        Rule(f'{prefix}pos_embedding' if big_vision else f'{prefix}Transformer/posembed_input/pos_embedding',
             (POSEMB,)),
        Rule(f'{prefix}Transformer/encoder_norm/scale', ('transformer.encoder.encoder_norm.weight',)),
        Rule(f'{prefix}Transformer/encoder_norm/bias', ('transformer.encoder.encoder_norm.bias',)),
        Rule(f'{prefix}head/kernel', ('head.weight',), t),
        Rule(f'{prefix}head/bias', ('head.bias',)),
        Rule(f'{prefix}pre_logits/kernel', (PRE_LOGITS[0],), t),
        Rule(f'{prefix}pre_logits/bias', (PRE_LOGITS[1],)),
        Rule(f'{block}{mha}/out/kernel', (f'{layer}attn.out.weight',), lambda w: (w.reshape(-1, w.shape[-1]).T,)),
        Rule(f'{block}{mha}/out/bias', (f'{layer}attn.out.bias',)),
    ]
    for part in ('query', 'key', 'value'):
        rules += [Rule(f'{block}{mha}/{part}/kernel', (f'{layer}attn.{part}.weight',), heads_in),
                  Rule(f'{block}{mha}/{part}/bias', (f'{layer}attn.{part}.bias',), heads_in)]
    for j, part in ((0, 'fc1'), (1, 'fc2')):
        rules += [Rule(f'{block}{mlp}/Dense_{j}/kernel', (f'{layer}ffn.{part}.weight',), t),
                  Rule(f'{block}{mlp}/Dense_{j}/bias', (f'{layer}ffn.{part}.bias',))]
    for theirs, ours in (('LayerNorm_0', 'attention_norm'), (norm2, 'ffn_norm')):
        rules += [Rule(f'{block}{theirs}/scale', (f'{layer}{ours}.weight',)),
                  Rule(f'{block}{theirs}/bias', (f'{layer}{ours}.bias',))]
    return rules


def _timm_rules() -> list[Rule]:
    """timm's VisionTransformer: fused qkv, norm1/norm2, mlp.fc1/fc2, blocks.N."""
    block, layer = 'blocks.{i}.', 'transformer.encoder.layer.{i}.'
    rules = [
        Rule('patch_embed.proj.weight', (PATCH,)),
        Rule('patch_embed.proj.bias', ('transformer.embeddings.patch_embeddings.bias',)),
        Rule('cls_token', ('transformer.embeddings.cls_token',)),
        Rule('pos_embed', (POSEMB,)),
        Rule('norm.weight', ('transformer.encoder.encoder_norm.weight',)),
        Rule('norm.bias', ('transformer.encoder.encoder_norm.bias',)),
        Rule('head.weight', ('head.weight',)),
        Rule('head.bias', ('head.bias',)),
        *(Rule(name, (name,)) for name in PRE_LOGITS),
    ]
    for kind in ('weight', 'bias'):
        rules += [Rule(f'{block}attn.qkv.{kind}', tuple(f'{layer}attn.{p}.{kind}' for p in ('query', 'key', 'value')),
                       lambda w: tuple(w.chunk(3))),
                  Rule(f'{block}attn.proj.{kind}', (f'{layer}attn.out.{kind}',)),
                  Rule(f'{block}norm1.{kind}', (f'{layer}attention_norm.{kind}',)),
                  Rule(f'{block}norm2.{kind}', (f'{layer}ffn_norm.{kind}',)),
                  Rule(f'{block}mlp.fc1.{kind}', (f'{layer}ffn.fc1.{kind}',)),
                  Rule(f'{block}mlp.fc2.{kind}', (f'{layer}ffn.fc2.{kind}',))]
    return rules


def _own_rules() -> list[Rule]:
    """ViT-pytorch's names, this model's own (routers included)."""
    layer = 'transformer.encoder.layer.{i}.'
    names = ['transformer.embeddings.patch_embeddings.weight', 'transformer.embeddings.patch_embeddings.bias',
             'transformer.embeddings.cls_token', POSEMB, 'transformer.encoder.encoder_norm.weight',
             'transformer.encoder.encoder_norm.bias', *HEAD, *PRE_LOGITS, f'{layer}attn.router.{{rest}}']
    names += [f'{layer}{module}.{kind}' for module in ('attn.query', 'attn.key', 'attn.value', 'attn.out', 'ffn.fc1',
                                                         'ffn.fc2', 'attention_norm', 'ffn_norm')
              for kind in ('weight', 'bias')]
    return [Rule(name, (name,)) for name in names]


# What each layout has that this ViT cannot hold: (key pattern, what it is).
UNSUPPORTED = {
    'timm': [(r'^reg_token$', 'registers (reg_token)'),
             (r'^dist_token$', 'a distillation token (dist_token, as in distilled DeiT)'),
             (r'^fc_norm\.', 'global-average pooling (fc_norm)'),
             (r'^attn_pool\.', 'attention pooling (attn_pool)'),
             (r'^norm_pre\.', 'a pre-norm (norm_pre, as in CLIP)'),
             (r'\.ls[12]\.', 'layer scale (ls1/ls2)'),
             (r'\.[qk]_norm\.', 'query-key norms (q_norm/k_norm)'),
             (r'^patch_embed\.backbone\.', 'a hybrid CNN stem (patch_embed.backbone)')],
    'google': [(r'MAPHead_0/', 'attention pooling (MAPHead_0)'),
               (r'(^|/)conv_root/', 'a hybrid CNN stem (conv_root)')],
    'own': [(r'hybrid_model\.', 'a hybrid CNN stem (hybrid_model)')],
}


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Pretrained:
    """A file's weights under this model's names, and what is known of where they came from."""
    path: Path
    layout: str  # 'vit_jax', 'big_vision', 'timm', 'vit_pytorch' or 'train.py'
    tensors: dict[str, torch.Tensor]
    rules: list[Rule]
    checkpoint: dict = field(default_factory=dict)  # a train.py checkpoint's other entries (config, class_names...)
    num_heads: int | None = None  # known from Google's per-head kernels only

    @property
    def num_classes(self) -> int | None:
        head = self.tensors.get('head.weight')
        return None if head is None else head.shape[0]

    @property
    def has_routers(self) -> bool:
        return any('.attn.router.' in key for key in self.tensors)

    def file_key(self, ours: str) -> str:
        """The file's name for one of this model's names (for messages)."""
        for rule in self.rules:
            for index, name in enumerate(rule.ours):
                groups = rule.match(ours, lambda r: r.ours[index])
                if groups is not None:
                    return rule.theirs.format(**groups)
        return ours

    def architecture(self) -> dict[str, object]:
        """Patch size, width, depth, MLP width (and heads when known) of the file's ViT."""
        t = self.tensors
        found = {}
        if PATCH in t and t[PATCH].dim() == 4:
            found['patch'] = tuple(t[PATCH].shape[-2:])
            found['width'] = t[PATCH].shape[0]
        layers = {int(key.split('.')[3]) for key in t if key.startswith('transformer.encoder.layer.')}
        found['depth'] = max(layers) + 1 if layers else 0
        fc1 = t.get('transformer.encoder.layer.0.ffn.fc1.weight')
        if fc1 is not None:
            found['mlp'] = fc1.shape[0]
        if self.num_heads is not None:
            found['heads'] = self.num_heads
        return found


def read(path: str | Path, ema: bool = False) -> Pretrained:
    """The weights of a pretrained file, renamed to this model's names; a one-line ValueError otherwise.

    `ema`: the weight average a train.py checkpoint of a --model_ema run holds, instead of its live weights.
    """
    path = Path(path)
    check_file(path, 'weights file', 'a weights file (.npz, .safetensors, .pth, .bin or .ckpt)')
    entries = None
    if path.suffix != '.npz':
        entries = _read_safetensors(path) if path.suffix == '.safetensors' else _read_torch(path)
    if ema:
        if not isinstance(entries, dict) or not isinstance(entries.get('ema_state_dict'), dict):
            raise ValueError(f"{path} holds no EMA weights: expected a train.py checkpoint of a run with --model_ema")
        entries = {**entries, 'state_dict': entries['ema_state_dict']}
    if entries is None:
        return from_google_arrays(_read_npz(path), path)
    return _from_state_dict(path, entries)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}  # read every array now: a cut file fails here
    except Exception as error:  # zipfile, numpy and the OS raise many types for a damaged archive
        raise ValueError(f"{path} is not a readable .npz file (truncated or an interrupted download?): "
                         f"{type(error).__name__}: {one_line(error, limit=200)}") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as error:  # SafetensorError, OSError
        raise ValueError(f"{path} is not a readable .safetensors file (truncated or an interrupted download?): "
                         f"{one_line(error, limit=200)}") from None


def _read_torch(path: Path) -> dict:
    return read_checkpoint(path)  # weights-only: no pickle runs


def _unknown(path: Path, keys) -> ValueError:
    shown = ', '.join(sorted(map(str, keys))[:4]) or 'none'
    return ValueError(f"{path} has no ViT layout this loader knows (keys: {shown}); expected one of: "
                      + '; '.join(LAYOUTS))


def from_google_arrays(arrays: dict[str, np.ndarray], path: Path | str = 'weights') -> Pretrained:
    """Google's arrays (vit_jax or big_vision keys) under this model's names."""
    prefix = next((p for p in ('', 'opt/target/', 'params/', 'params/img/') if f'{p}embedding/kernel' in arrays), None)
    if prefix is None:
        raise _unknown(path, arrays)
    arrays = {key: value for key, value in arrays.items() if key.startswith(prefix)}  # not the optimizer's state
    odd = next((key for key, value in arrays.items() if value.dtype.kind != 'f'), None)
    if odd is not None:
        raise ValueError(f"{path}: {odd} holds {arrays[odd].dtype} values; expected floating-point weights")
    big_vision = prefix.startswith('params/') or f'{prefix}pos_embedding' in arrays \
        or f'{prefix}Transformer/encoderblock/LayerNorm_0/scale' in arrays
    arrays = _unstack_blocks(arrays, prefix)
    _check_supported(path, 'google', arrays)
    if f'{prefix}cls' not in arrays:
        raise ValueError(f"{path} cannot be held by this ViT: it has no class token ({prefix}cls), so it pools "
                         "globally (global-average pooling); this model classifies from its class token")
    pos_key = f'{prefix}pos_embedding' if big_vision else f'{prefix}Transformer/posembed_input/pos_embedding'
    if pos_key not in arrays:
        raise ValueError(f"{path} cannot be held by this ViT: it has no learned position embedding {pos_key} "
                         "(fixed sin-cos position embeddings?)")
    tensors = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}
    query = tensors.get(f'{prefix}Transformer/encoderblock_0/'
                        f'MultiHeadDotProductAttention_{0 if big_vision else 1}/query/kernel')
    pretrained = _rename(path, 'big_vision' if big_vision else 'vit_jax', tensors, _google_rules(prefix, big_vision))
    pretrained.num_heads = query.shape[1] if query is not None and query.dim() == 3 else None
    return pretrained


def _unstack_blocks(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """big_vision's scanned `Transformer/encoderblock/...` (layers stacked on axis 0) as one entry per layer."""
    stacked = f'{prefix}Transformer/encoderblock/'
    out = {}
    for key, value in arrays.items():
        if key.startswith(stacked) and value.ndim > 0:
            for i, layer in enumerate(value):
                out[f'{prefix}Transformer/encoderblock_{i}/{key[len(stacked):]}'] = layer
        else:
            out[key] = value
    return out


def _from_state_dict(path: Path, entries: dict) -> Pretrained:
    checkpoint = {}
    state = entries
    for wrapper in ('model', 'state_dict'):
        if isinstance(state.get(wrapper), dict):
            if wrapper == 'state_dict':
                checkpoint = {key: value for key, value in state.items() if key != 'state_dict'}
            state = state[wrapper]
    odd = next((key for key in state if not isinstance(key, str)), None)
    if odd is not None:
        raise ValueError(f"{path}: entry {odd!r} is named by a {type(odd).__name__}; expected weight names (strings)")
    tensors = {key.removeprefix('module.'): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if isinstance(checkpoint.get('config'), dict) and 'timm_name' in checkpoint['config']:  # train.py, a timm model
        check_weights(path, tensors)
        return Pretrained(path, 'train.py', tensors, [], checkpoint)
    if 'patch_embed.proj.weight' in tensors:
        _check_supported(path, 'timm', tensors)
        if 'cls_token' not in tensors:
            raise ValueError(f"{path} cannot be held by this ViT: it has no class token (cls_token), so it pools "
                             "globally (global-average pooling); this model classifies from its class token")
        return _rename(path, 'timm', tensors, _timm_rules())
    if PATCH in tensors or any(key.startswith('transformer.embeddings.') for key in tensors):
        layout = 'train.py' if 'config' in checkpoint else 'vit_pytorch'
        _check_supported(path, 'own', tensors)
        pretrained = _rename(path, layout, tensors, _own_rules())
        pretrained.checkpoint = checkpoint
        return pretrained
    raise _unknown(path, tensors or state)


def _check_supported(path: Path, family: str, keys) -> None:
    what = [label for pattern, label in UNSUPPORTED[family] if any(re.search(pattern, key) for key in keys)]
    if what:
        timm = "; timm builds it: --model_type timm:<its timm name> (docs/timm.md)" if family == 'timm' else ''
        raise ValueError(f"{path} cannot be held by this ViT: it has {', '.join(what)}{timm}")


def check_weights(path: Path | str, tensors: dict[str, torch.Tensor]) -> None:
    """The one rule for weights: every tensor floating-point and finite, else a one-line error naming it."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} holds {str(value.dtype).removeprefix('torch.')} values; "
                             "expected floating-point weights")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: {key} holds NaN or infinite values; expected finite weights")


def _rename(path: Path, layout: str, tensors: dict[str, torch.Tensor], rules: list[Rule]) -> Pretrained:
    """Apply `rules` to every key, each tensor checked by `check_weights` and made float32; a key no rule knows is
    named in a one-line error."""
    check_weights(path, tensors)
    renamed, unknown = {}, []
    for key, value in tensors.items():
        value = value.float()
        for rule in rules:
            groups = rule.match(key, lambda r: r.theirs)
            if groups is not None:
                try:
                    parts = rule.convert(value)
                except RuntimeError as error:  # a reshape or permute of an array of the wrong rank
                    raise ValueError(f"{path}: {key} of shape {tuple(value.shape)} is malformed: "
                                     f"{one_line(error, limit=200)}") from None
                renamed.update({name.format(**groups): part.contiguous() for name, part in zip(rule.ours, parts)})
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" (and {len(unknown) - 4} more)" if len(unknown) > 4 else ''
        raise ValueError(f"{path} cannot be held by this ViT: entries {', '.join(unknown[:4])}{more} "
                         f"have no place in it ({layout} layout)")
    return Pretrained(path, layout, renamed, rules)


# ---------------------------------------------------------------------------------------------
# Fitting to a model


def resize_posemb(posemb: torch.Tensor, grid: tuple[int, int], path: Path | str = 'checkpoint') -> torch.Tensor:
    """A (1, [1 +] g*g, D) position embedding as (1, 1 + grid_h*grid_w, D).

    A table without a class position (big_vision, timm's no_embed_class) gets a zero one; another grid is
    resized as the official code does (scipy zoom, order 1).
    """
    if posemb.dim() == 2:
        posemb = posemb[None]
    if posemb.dim() != 3 or posemb.shape[0] != 1:
        raise ValueError(f"{path}: position embedding of shape {tuple(posemb.shape)}; expected (1, tokens, width)")
    tokens, wanted = posemb.shape[1], grid[0] * grid[1]
    if tokens == wanted + 1:
        return posemb
    if tokens == wanted or (_is_square(tokens) and not _is_square(tokens - 1)):
        posemb = torch.cat([posemb.new_zeros(1, 1, posemb.shape[-1]), posemb], dim=1)  # no class position
        tokens += 1
    if not _is_square(tokens - 1) or tokens < 2:
        raise ValueError(f"{path}: position embedding of {posemb.shape[1]} tokens is neither 1 + a square grid "
                         f"nor this model's 1 + {grid[0]}x{grid[1]}")
    if tokens == wanted + 1:
        return posemb
    side = math.isqrt(tokens - 1)
    patches = posemb[0, 1:].double().numpy().reshape(side, side, -1)
    patches = ndimage.zoom(patches, (grid[0] / side, grid[1] / side, 1), order=1)
    patches = torch.from_numpy(patches.reshape(1, wanted, -1)).to(posemb.dtype)
    return torch.cat([posemb[:, :1], patches], dim=1)


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _config_architecture(config: ml_collections.ConfigDict) -> dict[str, object]:
    return {'patch': tuple(as_grid(config.patches.size)), 'width': config.hidden_size,
            'depth': config.transformer.num_layers, 'mlp': config.transformer.mlp_dim,
            'heads': config.transformer.num_heads}


def _describe(value) -> str:
    return f'{value[0]}x{value[1]}' if isinstance(value, tuple) else str(value)


def check_architecture(model: VisionTransformer, weights: Pretrained) -> None:
    """One line naming every dimension (patch size, width, depth, MLP width, heads) where file and model differ."""
    theirs, ours = weights.architecture(), _config_architecture(model.config)
    differ = [f"{name} {_describe(value)} vs {_describe(ours[name])}" for name, value in theirs.items()
              if value != ours[name]]
    if differ:
        raise ValueError(f"{weights.path} holds another ViT than this model's config ({', '.join(differ)}, "
                         "file vs model): choose the matching --model_type")


@torch.no_grad()
def load_into(model: VisionTransformer, weights: Pretrained, head: bool, routers: bool) -> None:
    """Copy `weights` into `model`, position embeddings resized to its grid.

    `head`: load the file's classifier (it must exist and have the model's classes), else leave the model's.
    `routers`: load the file's routers (they must be this model's), else they keep their initialisation.
    A mismatch raises one ValueError line that names it.
    """
    check_architecture(model, weights)
    if routers:
        check_router_keys(weights.tensors, model.config.transformer.pooling)
    state = dict(weights.tensors)
    if POSEMB in state:
        state[POSEMB] = resize_posemb(state[POSEMB], model.grid, weights.path)

    own = model.state_dict()

    def wanted(key: str) -> bool:
        if key in PRE_LOGITS and key not in own:
            return False  # a model without the representation layer ignores the file's, as fine-tuning does
        return (head or key not in HEAD + PRE_LOGITS) and (routers or '.attn.router.' not in key)

    problems = [f"missing {weights.file_key(key)}" for key in own if wanted(key) and key not in state]
    problems += [f"unexpected {weights.file_key(key)}" for key in state if wanted(key) and key not in own]
    problems += [f"{weights.file_key(key)}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
                 for key in own if wanted(key) and key in state and state[key].shape != own[key].shape]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ''
        raise ValueError(f"{weights.path} does not fit this model ({len(problems)} problems): "
                         f"{'; '.join(problems[:6])}{more}")
    for key, value in own.items():
        if wanted(key):
            value.copy_(state[key])


def load_pretrained(model: VisionTransformer, path: str | Path | Pretrained) -> Pretrained:
    """Start a fine-tune from a pretrained file: the backbone loads, routers keep their initialisation.

    The head loads only when the model has no zero_head and the file's classes are the model's;
    otherwise the model's fresh head stays.
    """
    weights = path if isinstance(path, Pretrained) else read(path)
    keep_head = not model.zero_head and weights.num_classes == model.num_classes
    load_into(model, weights, head=keep_head, routers=False)
    return weights


def build_model(weights: Pretrained, model_type: str = 'ViT-B_16', orders: list[int] | None = None,
                img_size: int | None = None, num_classes: int | None = None) -> VisionTransformer:
    """The whole model a file holds, head included, in eval mode, for prediction and evaluation.

    A train.py checkpoint carries its config, image size and classes (`img_size` may override the size).
    Other files take the config from `model_type`, a plain ViT unless `orders` is given or the file has
    routers; the image size from the position embeddings; the classes from the head.
    """
    if weights.layout == 'train.py':
        missing = [key for key in ('config', 'img_size', 'num_classes') if key not in weights.checkpoint]
        if missing:
            raise ValueError(f"{weights.path} is not a complete train.py checkpoint: it lacks {', '.join(missing)}")
        if 'timm_name' in weights.checkpoint['config']:
            return timm_trar.from_checkpoint({**weights.checkpoint, 'state_dict': weights.tensors}, img_size)
        config = ml_collections.ConfigDict(with_added_fields(weights.checkpoint['config']))
        img_size = img_size or weights.checkpoint['img_size']
    else:
        config = get_config(model_type)
        if orders is not None:
            config.transformer.orders = list(orders)
        elif not weights.has_routers:
            config.transformer.orders = []
        if PRE_LOGITS[0] in weights.tensors:  # the head reads the representation layer's output
            config.representation_size = weights.tensors[PRE_LOGITS[0]].shape[0]
        img_size = img_size or _image_size(weights, config)
    if weights.num_classes is None:
        raise ValueError(f"{weights.path} has no classifier head: it can start a fine-tune "
                         "(train.py --pretrained_dir) but cannot predict")
    if num_classes is not None and num_classes != weights.num_classes:
        raise ValueError(f"--num_classes {num_classes} does not match the {weights.num_classes} classes "
                         f"of {weights.path}")
    try:
        model = VisionTransformer(config, img_size=img_size, num_classes=weights.num_classes)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise ValueError(f"{weights.path}: cannot build its model: {one_line(error, limit=200)}") from None
    load_into(model, weights, head=True, routers=weights.has_routers)
    return model.eval()


def _image_size(weights: Pretrained, config: ml_collections.ConfigDict) -> int:
    """The square image size the file's position embeddings were trained at."""
    posemb = weights.tensors.get(POSEMB)
    if posemb is None:
        raise ValueError(f"{weights.path} has no position embeddings")
    if posemb.dim() not in (2, 3):
        raise ValueError(f"{weights.path}: position embedding of shape {tuple(posemb.shape)}; "
                         "expected (1, tokens, width)")
    tokens = posemb.shape[-2]
    side = math.isqrt(tokens - 1) if _is_square(tokens - 1) else math.isqrt(tokens) if _is_square(tokens) else None
    if side is None:
        raise ValueError(f"{weights.path}: position embedding of {tokens} tokens is not a square grid; "
                         "pass --img_size")
    return side * int(as_grid(config.patches.size)[0])
