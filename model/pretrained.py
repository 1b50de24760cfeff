"""Pretrained ViT weights in the layouts people hold, mapped onto this model's names.

One entry point for every tool: `read(path)` recognises the layout by the file's keys and renames
the tensors; `load_into(model, weights, ...)` fits them to a model (position embeddings resized to
its image size, head kept or left fresh, routers kept at their initialisation unless the file has
this model's routers) and names in one line whatever does not fit. Layouts:

- Google `.npz`, vit_jax (the 2020 checkpoints and AugReg: `Transformer/encoderblock_0/...`) and
  big_vision (`params/...`, blocks stacked or not), converted by timm's `_load_weights` once the keys are checked;
- timm ViT state dicts (`.safetensors`, `.pth`, `.bin`: `blocks.0.attn.qkv.weight`), maybe wrapped
  in a 'state_dict' or 'model' entry;
- ViT-pytorch state dicts, which use this model's names;
- checkpoints written by train.py (a dict with 'state_dict' and 'config').
"""
import functools
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer, _load_weights

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


def _google_names(prefix: str, big_vision: bool, stacked: bool) -> list[Rule]:
    """Google's names of timm's ViT parameters, to check a file's keys up front and name them in messages (timm's
    `_load_weights` converts the arrays). vit_jax: MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3;
    big_vision: _0, _1, _0, its blocks maybe stacked on axis 0 (`encoderblock/`)."""
    mha, norm2, mlp = ('MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0') if big_vision else \
        ('MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')
    names = {'embedding/kernel': 'patch_embed.proj.weight', 'embedding/bias': 'patch_embed.proj.bias',
             'cls': 'cls_token', 'Transformer/encoder_norm/scale': 'norm.weight',
             'Transformer/encoder_norm/bias': 'norm.bias', 'head/kernel': HEAD[0], 'head/bias': HEAD[1],
             'pre_logits/kernel': PRE_LOGITS[0], 'pre_logits/bias': PRE_LOGITS[1],
             'pos_embedding' if big_vision else 'Transformer/posembed_input/pos_embedding': 'pos_embed'}
    block = 'Transformer/encoderblock/' if stacked else 'Transformer/encoderblock_{i}/'
    for part in ('query', 'key', 'value'):
        names.update({f'{block}{mha}/{part}/kernel': 'blocks.{i}.attn.qkv.weight',
                      f'{block}{mha}/{part}/bias': 'blocks.{i}.attn.qkv.bias'})
    for theirs, ours, weight in ((f'{mha}/out', 'attn.proj', 'kernel'), (f'{mlp}/Dense_0', 'mlp.fc1', 'kernel'),
                                 (f'{mlp}/Dense_1', 'mlp.fc2', 'kernel'), ('LayerNorm_0', 'norm1', 'scale'),
                                 (norm2, 'norm2', 'scale')):
        names.update({f'{block}{theirs}/{weight}': f'blocks.{{i}}.{ours}.weight',
                      f'{block}{theirs}/bias': f'blocks.{{i}}.{ours}.bias'})
    return [Rule(prefix + theirs, (ours,)) for theirs, ours in names.items()]


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
        *(Rule(name, (name,)) for name in HEAD + PRE_LOGITS),
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
    """ViT-pytorch's names, this model's own: those timm's map to, and the routers."""
    names = [name for rule in _timm_rules() for name in rule.ours]
    names.append('transformer.encoder.layer.{i}.attn.router.{rest}')
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
    renamings: tuple[list[Rule], ...]  # from the file's names to this model's, in the order applied
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
        """The file's name for one of this model's names (for messages): back through each renaming."""
        for rules in reversed(self.renamings):
            ours = next((rule.theirs.format(**groups) for rule in rules for index in range(len(rule.ours))
                         if (groups := rule.match(ours, lambda r: r.ours[index])) is not None), ours)
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
        entries = _read_safetensors(path) if path.suffix == '.safetensors' else read_checkpoint(path)
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


def _listed(items: list[str], shown: int, separator: str) -> str:
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ''
    return separator.join(items[:shown]) + more


def _misfit(path: Path | str, problems: list[str], layout: str | None = None) -> ValueError:
    """One line listing what does not fit; with `layout`, `problems` are the file's entries with no place here."""
    if layout is not None:
        return ValueError(f"{path} cannot be held by this ViT: entries {_listed(problems, 4, ', ')} "
                          f"have no place in it ({layout} layout)")
    return ValueError(f"{path} does not fit this model ({len(problems)} problems): {_listed(problems, 6, '; ')}")


def _unknown(path: Path, keys) -> ValueError:
    shown = ', '.join(sorted(map(str, keys))[:4]) or 'none'
    return ValueError(f"{path} has no ViT layout this loader knows (keys: {shown}); expected one of: "
                      + '; '.join(LAYOUTS))


def from_google_arrays(arrays: dict[str, np.ndarray], path: Path | str = 'weights') -> Pretrained:
    """Google's arrays (vit_jax or big_vision keys) under this model's names.

    The keys and the shapes timm reads the architecture from are checked here, each problem named in one line;
    timm's `_load_weights` converts the arrays into a timm ViT of the file's shapes, whose names `_timm_rules` map.
    """
    prefix = next((p for p in ('', 'opt/target/', 'params/', 'params/img/') if f'{p}embedding/kernel' in arrays), None)
    if prefix is None:
        raise _unknown(path, arrays)
    arrays = {key: value for key, value in arrays.items() if key.startswith(prefix)}  # not the optimizer's state
    odd = next((key for key, value in arrays.items() if value.dtype.kind != 'f'), None)
    if odd is not None:
        raise ValueError(f"{path}: {odd} holds {arrays[odd].dtype} values; expected floating-point weights")
    check_weights(path, {key: torch.from_numpy(value) for key, value in arrays.items()})  # named as in the file
    stacked = f'{prefix}Transformer/encoderblock/LayerNorm_0/scale' in arrays
    big_vision = prefix.startswith('params/') or f'{prefix}pos_embedding' in arrays or stacked
    _check_supported(path, 'google', arrays)
    if f'{prefix}cls' not in arrays:
        raise ValueError(f"{path} cannot be held by this ViT: it has no class token ({prefix}cls), so it pools "
                         "globally (global-average pooling); this model classifies from its class token")
    layout, names = 'big_vision' if big_vision else 'vit_jax', _google_names(prefix, big_vision, stacked)
    google = {rule.ours[0].format(i=0): rule.theirs.format(i=0) for rule in reversed(names)}  # qkv: the query's
    depth = arrays[google['blocks.0.norm1.weight']].shape[0] if stacked else 1 + max(
        (int(key.split('encoderblock_')[1].split('/')[0]) for key in arrays if 'encoderblock_' in key), default=-1)
    kernel = arrays[google['patch_embed.proj.weight']]  # (patch, patch, channels, width)
    if kernel.ndim != 4:
        raise ValueError(f"{path}: {google['patch_embed.proj.weight']} of shape {tuple(kernel.shape)} is malformed: "
                         "expected (patch, patch, channels, width)")
    _check_google_keys(path, layout, arrays, names, max(depth, 1))
    vit, num_heads = _timm_vit_of(path, {name: arrays.get(key) for name, key in google.items()}, stacked, depth)
    try:
        _load_weights(vit, _npz_source(path, arrays), prefix=prefix)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:  # arrays that disagree in shape
        raise ValueError(f"{path}: timm cannot read its arrays as one ViT: {one_line(error, limit=200)}") from None
    state = vit.state_dict()
    if google[PRE_LOGITS[0]] in arrays:  # the representation layer, which timm no longer reads
        state[PRE_LOGITS[0]] = torch.from_numpy(arrays[google[PRE_LOGITS[0]]].T.copy())
        state[PRE_LOGITS[1]] = torch.from_numpy(arrays[google[PRE_LOGITS[1]]].copy())
    pretrained = _rename(path, layout, state, _timm_rules())
    pretrained.renamings = (names, *pretrained.renamings)
    pretrained.num_heads = num_heads
    return pretrained


def _check_google_keys(path: Path | str, layout: str, arrays: dict[str, np.ndarray], names: list[Rule],
                       depth: int) -> None:
    """Every array has a place in a ViT and every one a ViT needs is there (a head and a representation layer are
    optional), else one line naming them; timm's reader would stop at the first."""
    unknown = [key for key in arrays if all(rule.match(key, lambda r: r.theirs) is None for rule in names)]
    if unknown:
        raise _misfit(path, unknown, layout)
    optional = {part for part in ('head/', 'pre_logits/') if not any(f'/{part}' in f'/{key}' for key in arrays)}
    missing = [key for rule in names for key in dict.fromkeys(rule.theirs.format(i=i) for i in range(depth))
               if key not in arrays and not any(part in rule.theirs for part in optional)]
    if missing:
        raise _misfit(path, [f'missing {key}' for key in missing])


def _timm_vit_of(path: Path | str, arrays: dict[str, np.ndarray | None], stacked: bool,
                 depth: int) -> tuple[TimmVisionTransformer, int | None]:
    """An uninitialised timm ViT of the shapes of Google's arrays (by timm's names, block 0's), for `_load_weights`
    to fill; and its heads, when known."""
    kernel, posemb = arrays['patch_embed.proj.weight'], arrays['pos_embed']
    tokens = posemb.shape[-2] if posemb.ndim in (2, 3) else 0
    class_position = not (_is_square(tokens) and not _is_square(tokens - 1))  # big_vision's has none
    side = math.isqrt(tokens - class_position) if tokens >= 2 else 0
    if side == 0 or side * side != tokens - class_position:
        raise ValueError(f"{path}: position embedding of shape {tuple(posemb.shape)} is not (1, [1 +] a square "
                         "grid, width)")
    query = arrays['blocks.0.attn.qkv.weight']
    num_heads = query.shape[-2] if query.ndim == 3 + stacked else None
    width, mlp_dim, head = kernel.shape[-1], arrays['blocks.0.mlp.fc1.weight'].shape[-1], arrays['head.weight']
    try:
        vit = TimmVisionTransformer(
            img_size=(side * kernel.shape[0], side * kernel.shape[1]), patch_size=kernel.shape[:2],
            in_chans=kernel.shape[2], embed_dim=width, depth=depth, num_heads=num_heads or 1,
            mlp_ratio=(mlp_dim + 0.5) / width, num_classes=0 if head is None else head.shape[-1],
            no_embed_class=not class_position, weight_init='skip')
    except (AssertionError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: its arrays make no ViT ({one_line(error, limit=200)})") from None
    return vit, num_heads


def _npz_source(path: Path | str, arrays: dict[str, np.ndarray]) -> Path | io.BytesIO:
    """What `_load_weights` opens: the file `arrays` came from, or the arrays written to memory."""
    if isinstance(path, Path) and path.suffix == '.npz' and path.is_file():
        return path
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    return buffer


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
        return Pretrained(path, 'train.py', tensors, (), checkpoint)
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


def _rename(path: Path | str, layout: str, tensors: dict[str, torch.Tensor], rules: list[Rule]) -> Pretrained:
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
        raise _misfit(path, unknown, layout)
    return Pretrained(path, layout, renamed, (rules,))


# ---------------------------------------------------------------------------------------------
# Fitting to a model


def resize_posemb(posemb: torch.Tensor, grid: tuple[int, int], path: Path | str = 'checkpoint') -> torch.Tensor:
    """A (1, [1 +] g*g, D) position embedding as (1, 1 + grid_h*grid_w, D).

    A table without a class position (big_vision, timm's no_embed_class) gets a zero one; another grid is
    resized as the official code does (scipy zoom, order 1), which is timm's `resample_abs_pos_embed` bilinear
    with the corners aligned and no antialiasing (in float32).
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
    side = math.isqrt(tokens - 1)  # scipy's zoom of order 1 is bilinear with the corners aligned, not antialiased
    return resample_abs_pos_embed(posemb, list(grid), [side, side], num_prefix_tokens=1, interpolation='bilinear',
                                  antialias=False, align_corners=True)


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
        raise _misfit(weights.path, problems)
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
