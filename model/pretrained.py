"""Pretrained ViT weights in the layouts people hold, mapped onto this model's names.

`read(path)` recognises the layout by the file's keys and renames the tensors; `load_into(model, weights, ...)` fits
them to a model (position embeddings resized to its image size, head kept or left fresh, routers kept at their
initialisation unless the file has this model's) and names in one line whatever does not fit. Layouts: Google `.npz`
(vit_jax, as the 2020 checkpoints and AugReg; big_vision, blocks stacked or not), timm ViT state dicts
(`.safetensors`, `.pth`, `.bin`, maybe wrapped in 'model' or 'state_dict'), ViT-pytorch state dicts (this model's
names) and train.py checkpoints. Only the names are written here, in one table (NAMES); timm converts Google's
arrays (`_load_weights`) and resizes position embeddings (`resample_abs_pos_embed`).
"""
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

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

POSEMB = 'transformer.embeddings.position_embeddings'
PATCH = 'transformer.embeddings.patch_embeddings.weight'
HEAD = ('head.weight', 'head.bias')
PRE_LOGITS = ('pre_logits.fc.weight', 'pre_logits.fc.bias')  # the 2020 checkpoints' representation layer
BLOCK, LAYER, GOOGLE_BLOCK = 'blocks.{i}.', 'transformer.encoder.layer.{i}.', 'Transformer/encoderblock_{i}/'
ROUTER = r'transformer\.encoder\.layer\.\d+\.attn\.router\.'  # this model's routers: no other layout has them

# ---------------------------------------------------------------------------------------------
# Names: each row a timm ViT module, this model's (ViT-pytorch's) and Google's (vit_jax's; big_vision numbers some
# otherwise: BIG_VISION). `{i}` is a block index; timm's fused qkv is three rows.

MODULES = [('patch_embed.proj', 'transformer.embeddings.patch_embeddings', 'embedding'),
           ('norm', 'transformer.encoder.encoder_norm', 'Transformer/encoder_norm'),
           ('head', 'head', 'head'), ('pre_logits.fc', 'pre_logits.fc', 'pre_logits'),
           *((BLOCK + 'attn.qkv', f'{LAYER}attn.{part}', f'{GOOGLE_BLOCK}MultiHeadDotProductAttention_1/{part}')
             for part in ('query', 'key', 'value')),
           (BLOCK + 'attn.proj', LAYER + 'attn.out', GOOGLE_BLOCK + 'MultiHeadDotProductAttention_1/out'),
           (BLOCK + 'norm1', LAYER + 'attention_norm', GOOGLE_BLOCK + 'LayerNorm_0'),
           (BLOCK + 'norm2', LAYER + 'ffn_norm', GOOGLE_BLOCK + 'LayerNorm_2'),
           (BLOCK + 'mlp.fc1', LAYER + 'ffn.fc1', GOOGLE_BLOCK + 'MlpBlock_3/Dense_0'),
           (BLOCK + 'mlp.fc2', LAYER + 'ffn.fc2', GOOGLE_BLOCK + 'MlpBlock_3/Dense_1')]
NAMES = [('cls_token', 'transformer.embeddings.cls_token', 'cls'),
         ('pos_embed', POSEMB, 'Transformer/posembed_input/pos_embedding'),
         *((f'{timm}.{kind}', f'{ours}.{kind}', f'{google}/{google_kind}') for timm, ours, google in MODULES
           for kind, google_kind in (('weight', 'scale' if 'norm' in timm else 'kernel'), ('bias', 'bias')))]
BIG_VISION = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0', 'LayerNorm_2': 'LayerNorm_1',
              'MlpBlock_3': 'MlpBlock_0', 'Transformer/posembed_input/pos_embedding': 'pos_embedding'}


def _rows(key: str, column: int) -> list[tuple[str, str, str]]:
    """The rows of NAMES whose `column` (0: timm, 1: this model) is `key`, its block index filled in."""
    found = re.match(re.escape(('blocks.', 'transformer.encoder.layer.')[column]) + r'(\d+)\.', key)
    generic, i = (key, '') if found is None else ((BLOCK, LAYER)[column] + key[found.end():], found[1])
    return [tuple(name.format(i=i) for name in row) for row in NAMES if row[column] == generic]


def own_names(key: str) -> tuple[str, ...]:
    """This model's names of a timm ViT tensor (three for the fused qkv); () for one that has no place here."""
    return tuple(row[1] for row in _rows(key, 0))


def _google(name: str, prefix: str, big_vision: bool, stacked: bool) -> str:
    """A vit_jax name (NAMES' third column) in a Google file: big_vision's, whose blocks may be stacked on axis 0."""
    for vit_jax, theirs in BIG_VISION.items() if big_vision else ():
        name = name.replace(vit_jax, theirs)
    return prefix + (re.sub(r'encoderblock_\d+/', 'encoderblock/', name) if stacked else name)


def google_name(key: str, google: tuple[str, bool, bool]) -> str:
    """Google's name of a timm ViT tensor (the query's for the fused qkv), as timm's `_load_weights` reads it from a
    file of `google` = (key prefix, big_vision, stacked blocks)."""
    return _google(_rows(key, 0)[0][2], *google)


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
    checkpoint: dict = field(default_factory=dict)  # a train.py checkpoint's other entries (config, class_names...)
    num_heads: int | None = None  # known from Google's per-head kernels only
    google: tuple[str, bool, bool] = ('', False, False)  # a Google file's key prefix, big_vision, stacked blocks

    @property
    def num_classes(self) -> int | None:
        return self.tensors['head.weight'].shape[0] if 'head.weight' in self.tensors else None

    @property
    def has_routers(self) -> bool:
        return any('.attn.router.' in key for key in self.tensors)

    def file_key(self, ours: str) -> str:
        """The file's name for one of this model's names (for messages)."""
        rows = _rows(ours, 1) if self.layout in ('timm', 'vit_jax', 'big_vision') else None
        if not rows:
            return ours
        return rows[0][0] if self.layout == 'timm' else _google(rows[0][2], *self.google)


def read(path: str | Path, ema: bool = False) -> Pretrained:
    """The weights of a pretrained file, renamed to this model's names; a one-line ValueError otherwise. `ema`: the
    weight average a train.py checkpoint of a --model_ema run holds, instead of its live weights."""
    path = Path(path)
    check_file(path, 'weights file', 'a weights file (.npz, .safetensors, .pth, .bin or .ckpt)')
    entries = None if path.suffix in ('.npz', '.safetensors') else read_checkpoint(path)
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            entries = load_file(str(path))
        elif path.suffix == '.npz':
            with np.load(path, allow_pickle=False) as archive:
                entries = {key: archive[key] for key in archive.files}  # read every array now: a cut file fails here
    except Exception as error:  # zipfile, numpy, safetensors and the OS raise many types for a damaged file
        raise ValueError(f"{path} is not a readable {path.suffix} file (truncated or an interrupted download?): "
                         f"{type(error).__name__}: {one_line(error, limit=200)}") from None
    if ema:
        if not isinstance(entries.get('ema_state_dict'), dict):
            raise ValueError(f"{path} holds no EMA weights: expected a train.py checkpoint of a run with --model_ema")
        entries = {**entries, 'state_dict': entries['ema_state_dict']}
    return from_google_arrays(entries, path) if path.suffix == '.npz' else _from_state_dict(path, entries)


def _refuse(path: Path | str, problems: list[str], layout: str | None = None) -> None:
    """One line listing what does not fit, if anything (with `layout`: the file's entries with no place here)."""
    problems = list(dict.fromkeys(problems))  # timm's fused qkv is named once for its query, key and value
    shown = 4 if layout else 6
    listed = ('; ', ', ')[bool(layout)].join(problems[:shown])
    listed += f" (and {len(problems) - shown} more)" if len(problems) > shown else ''
    if problems and layout is not None:
        raise ValueError(f"{path} cannot be held by this ViT: entries {listed} have no place in it ({layout} layout)")
    if problems:
        raise ValueError(f"{path} does not fit this model ({len(problems)} problems): {listed}")


def _unknown(path: Path, keys) -> ValueError:
    shown = ', '.join(sorted(map(str, keys))[:4]) or 'none'
    return ValueError(f"{path} has no ViT layout this loader knows (keys: {shown}); expected one of: Google .npz "
                      "(vit_jax 'Transformer/encoderblock_0/...' or big_vision 'params/...'); timm ViT state dict "
                      "('blocks.0.attn.qkv.weight'; .safetensors, .pth or .bin); ViT-pytorch state dict "
                      "('transformer.encoder.layer.0.attn.query.weight'); train.py checkpoint (a dict with "
                      "'state_dict' and 'config')")


def _check_supported(path: Path | str, family: str, keys, class_token: str | None = None) -> None:
    """One line naming what the file has (or, with `class_token`, lacks) that this ViT cannot hold."""
    what = [label for pattern, label in UNSUPPORTED[family] if any(re.search(pattern, key) for key in keys)]
    if class_token is not None and class_token not in keys:
        what.append(f"no class token ({class_token}), so it pools globally (global-average pooling); this model "
                    "classifies from its class token")
    if what:
        timm = "; timm builds it: --model_type timm:<its timm name> (docs/timm.md)" if family == 'timm' else ''
        raise ValueError(f"{path} cannot be held by this ViT: it has {', '.join(what)}{timm}")


def check_weights(path: Path | str, tensors: dict[str, torch.Tensor | np.ndarray]) -> None:
    """The one rule for weights: every tensor (or array) floating-point and finite, else a one-line error naming it."""
    for key, value in tensors.items():
        if not (value.is_floating_point() if isinstance(value, torch.Tensor) else value.dtype.kind == 'f'):
            raise ValueError(f"{path}: {key} holds {str(value.dtype).removeprefix('torch.')} values; "
                             "expected floating-point weights")
        if not bool(torch.isfinite(torch.as_tensor(value)).all()):
            raise ValueError(f"{path}: {key} holds NaN or infinite values; expected finite weights")


def from_google_arrays(arrays: dict[str, np.ndarray], path: Path | str = 'weights') -> Pretrained:
    """Google's arrays (vit_jax or big_vision keys) under this model's names: every key checked first (all those out
    of place or missing named in one line; timm's reader would stop at the first), then timm's `_load_weights` converts
    the arrays into a timm ViT of the file's shapes, whose names `own_names` maps."""
    prefix = next((p for p in ('', 'opt/target/', 'params/', 'params/img/') if f'{p}embedding/kernel' in arrays), None)
    if prefix is None:
        raise _unknown(path, arrays)
    arrays = {key: value for key, value in arrays.items() if key.startswith(prefix)}  # not the optimizer's state
    check_weights(path, arrays)  # named as in the file
    stacked = f'{prefix}Transformer/encoderblock/LayerNorm_0/scale' in arrays
    google = (prefix, prefix.startswith('params/') or f'{prefix}pos_embedding' in arrays or stacked, stacked)
    layout = 'big_vision' if google[1] else 'vit_jax'
    _check_supported(path, 'google', arrays, f'{prefix}cls')
    depth = arrays[f'{prefix}Transformer/encoderblock/LayerNorm_0/scale'].shape[0] if stacked else 1 + max(
        (int(key.split('encoderblock_')[1].split('/')[0]) for key in arrays if 'encoderblock_' in key), default=-1)
    kernel = arrays[f'{prefix}embedding/kernel']  # (patch, patch, channels, width)
    if kernel.ndim != 4:
        raise ValueError(f"{path}: {prefix}embedding/kernel of shape {kernel.shape} is malformed: "
                         "expected (patch, patch, channels, width)")
    expected = dict.fromkeys(_google(row[2].format(i=i), *google) for row in NAMES for i in range(max(depth, 1)))
    _refuse(path, [key for key in arrays if key not in expected], layout)
    optional = tuple(part for part in (f'{prefix}head/', f'{prefix}pre_logits/')  # a head, a representation layer
                     if not any(key.startswith(part) for key in arrays))
    _refuse(path, [f'missing {key}' for key in expected if key not in arrays and not key.startswith(optional)])
    query, fc1, head, posemb = (arrays.get(google_name(key, google)) for key in (
        'blocks.0.attn.qkv.weight', 'blocks.0.mlp.fc1.weight', HEAD[0], 'pos_embed'))
    class_positions, side = _posemb_grid(posemb, path)  # big_vision's table has no class position
    num_heads = query.shape[-2] if query.ndim == 3 + stacked else None  # per-head kernels (D, heads, D/heads)
    source = path
    if not (isinstance(path, Path) and path.suffix == '.npz' and path.is_file()):  # arrays not read from a file
        np.savez(source := io.BytesIO(), **arrays)
        source.seek(0)
    try:  # a timm ViT of the arrays' shapes, filled by timm's reader
        vit = TimmVisionTransformer(
            img_size=(side * kernel.shape[0], side * kernel.shape[1]), patch_size=kernel.shape[:2],
            in_chans=kernel.shape[2], embed_dim=kernel.shape[-1], depth=depth, num_heads=num_heads or 1,
            mlp_ratio=(fc1.shape[-1] + 0.5) / kernel.shape[-1], num_classes=0 if head is None else head.shape[-1],
            no_embed_class=not class_positions, weight_init='skip')
        _load_weights(vit, source, prefix=prefix)
    except (AssertionError, RuntimeError, ValueError, KeyError, IndexError) as error:  # arrays that disagree in shape
        raise ValueError(f"{path}: timm cannot read its arrays as one ViT: {one_line(error, limit=200)}") from None
    state = vit.state_dict()
    dense, bias = (google_name(key, google) for key in PRE_LOGITS)
    if dense in arrays:  # the representation layer, which timm no longer reads
        state.update(zip(PRE_LOGITS, (torch.from_numpy(arrays[dense].T.copy()), torch.from_numpy(arrays[bias].copy()))))
    return _from_timm(path, layout, state, num_heads=num_heads, google=google)


def _from_state_dict(path: Path, entries: dict) -> Pretrained:
    state, checkpoint = entries['model'] if isinstance(entries.get('model'), dict) else entries, {}
    if isinstance(state.get('state_dict'), dict):  # a train.py checkpoint's other entries: config, class_names...
        checkpoint, state = {key: value for key, value in state.items() if key != 'state_dict'}, state['state_dict']
    odd = next((key for key in state if not isinstance(key, str)), None)
    if odd is not None:
        raise ValueError(f"{path}: entry {odd!r} is named by a {type(odd).__name__}; expected weight names (strings)")
    tensors = {key.removeprefix('module.'): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    timm_model = isinstance(checkpoint.get('config'), dict) and 'timm_name' in checkpoint['config']  # train.py's
    if not (timm_model or 'patch_embed.proj.weight' in tensors or any(key.startswith('transformer.embeddings.')
                                                                      for key in tensors)):
        raise _unknown(path, tensors or state)
    check_weights(path, tensors)
    if timm_model:
        return Pretrained(path, 'train.py', tensors, checkpoint)
    if 'patch_embed.proj.weight' in tensors:
        _check_supported(path, 'timm', tensors, 'cls_token')
        return _from_timm(path, 'timm', tensors)
    layout = 'train.py' if 'config' in checkpoint else 'vit_pytorch'
    _check_supported(path, 'own', tensors)
    _refuse(path, [key for key in tensors if not _rows(key, 1) and not re.match(ROUTER, key)], layout)
    return Pretrained(path, layout, {key: value.float() for key, value in tensors.items()}, checkpoint)


def _from_timm(path: Path | str, layout: str, tensors: dict[str, torch.Tensor], **found) -> Pretrained:
    """A timm ViT state dict (weights checked) under this model's names, in float32; a key with no place here is
    named in one line."""
    _refuse(path, [key for key in tensors if not own_names(key)], layout)
    renamed = {}
    for key, value in tensors.items():
        names = own_names(key)
        renamed.update(zip(names, value.float().chunk(3) if len(names) == 3 and value.dim() else (value.float(),)))
    return Pretrained(path, layout, renamed, **found)


# ---------------------------------------------------------------------------------------------
# Fitting to a model


def _posemb_grid(posemb: torch.Tensor | np.ndarray, path: Path | str) -> tuple[int, int]:
    """(class positions: 1, or 0 as in big_vision's and timm's no_embed_class tables; grid side) of a position
    embedding (1, [1 +] side*side, width); one line otherwise."""
    tokens = posemb.shape[-2] if posemb.ndim in (2, 3) else 0
    square = [n >= 0 and math.isqrt(n) ** 2 == n for n in (tokens, tokens - 1)]
    class_positions = 0 if square[0] and not square[1] else 1
    side = math.isqrt(max(tokens - class_positions, 0))
    if side == 0 or side * side != tokens - class_positions:
        raise ValueError(f"{path}: position embedding of shape {tuple(posemb.shape)}; expected (1, [1 +] g*g, width)")
    return class_positions, side


def resize_posemb(posemb: torch.Tensor, grid: tuple[int, int], path: Path | str = 'checkpoint') -> torch.Tensor:
    """A (1, [1 +] g*g, D) position embedding as (1, 1 + grid_h*grid_w, D): a table without a class position
    (big_vision, timm's no_embed_class) gets a zero one; another grid is resized as the official code does (scipy
    zoom, order 1), which is timm's `resample_abs_pos_embed` bilinear with the corners aligned, not antialiased."""
    if posemb.dim() == 2:
        posemb = posemb[None]
    if posemb.dim() != 3 or posemb.shape[0] != 1:
        raise ValueError(f"{path}: position embedding of shape {tuple(posemb.shape)}; expected (1, tokens, width)")
    wanted = grid[0] * grid[1]
    class_positions, side = (posemb.shape[1] - wanted, 0) if posemb.shape[1] - wanted in (0, 1) else \
        _posemb_grid(posemb, path)
    if not class_positions:
        posemb = torch.cat([posemb.new_zeros(1, 1, posemb.shape[-1]), posemb], dim=1)
    return resample_abs_pos_embed(posemb, list(grid), [side, side], num_prefix_tokens=1, interpolation='bilinear',
                                  antialias=False, align_corners=True) if side else posemb


def _architecture(tensors: dict[str, torch.Tensor], heads: int | None) -> dict[str, object]:
    """Patch size, width, depth, MLP width (and heads when known) of a ViT's tensors under this model's names."""
    found = {}
    if PATCH in tensors and tensors[PATCH].dim() == 4:
        found.update(patch='{}x{}'.format(*tensors[PATCH].shape[-2:]), width=tensors[PATCH].shape[0])
    layers = [int(key.split('.')[3]) for key in tensors if key.startswith('transformer.encoder.layer.')]
    found['depth'] = 1 + max(layers, default=-1)
    if 'transformer.encoder.layer.0.ffn.fc1.weight' in tensors:
        found['mlp'] = tensors['transformer.encoder.layer.0.ffn.fc1.weight'].shape[0]
    return found if heads is None else {**found, 'heads': heads}


@torch.no_grad()
def load_into(model: VisionTransformer, weights: Pretrained, head: bool, routers: bool) -> None:
    """Copy `weights` into `model`, position embeddings resized to its grid; one ValueError line names any mismatch.
    `head`: load the file's classifier (it must exist and have the model's classes), else leave the model's.
    `routers`: load the file's routers (they must be this model's), else they keep their initialisation."""
    theirs, own = _architecture(weights.tensors, weights.num_heads), model.state_dict()
    ours = _architecture(own, model.config.transformer.num_heads)
    differ = [f"{name} {value} vs {ours.get(name)}" for name, value in theirs.items() if value != ours.get(name)]
    if differ:  # every dimension (patch size, width, depth, MLP width, heads) where file and model differ
        raise ValueError(f"{weights.path} holds another ViT than this model's config ({', '.join(differ)}, "
                         "file vs model): choose the matching --model_type")
    if routers:
        check_router_keys(weights.tensors, model.config.transformer.pooling)
    state = dict(weights.tensors)
    if POSEMB in state:
        state[POSEMB] = resize_posemb(state[POSEMB], model.grid, weights.path)

    def wanted(key: str) -> bool:
        if key in PRE_LOGITS and key not in own:
            return False  # a model without the representation layer ignores the file's, as fine-tuning does
        return (head or key not in HEAD + PRE_LOGITS) and (routers or '.attn.router.' not in key)

    problems = [f"missing {weights.file_key(key)}" for key in own if wanted(key) and key not in state]
    problems += [f"unexpected {weights.file_key(key)}" for key in state if wanted(key) and key not in own]
    problems += [f"{weights.file_key(key)}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
                 for key in own if wanted(key) and key in state and state[key].shape != own[key].shape]
    _refuse(weights.path, problems)
    for key, value in own.items():
        if wanted(key):
            value.copy_(state[key])


def load_pretrained(model: VisionTransformer, path: str | Path | Pretrained) -> Pretrained:
    """Start a fine-tune from a pretrained file: the backbone loads, routers keep their initialisation, the head loads
    only when the model has no zero_head and the file has its classes (otherwise the model's fresh head stays)."""
    weights = path if isinstance(path, Pretrained) else read(path)
    keep_head = not model.zero_head and weights.num_classes == model.num_classes
    load_into(model, weights, head=keep_head, routers=False)
    return weights


def build_model(weights: Pretrained, model_type: str = 'ViT-B_16', orders: list[int] | None = None,
                img_size: int | None = None, num_classes: int | None = None) -> VisionTransformer:
    """The whole model a file holds, head included, in eval mode, for prediction and evaluation. A train.py checkpoint
    carries its config, image size and classes (`img_size` may override the size). Other files take the config from
    `model_type`, a plain ViT unless `orders` is given or the file has routers; the image size from the position
    embeddings; the classes from the head."""
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
        if POSEMB not in weights.tensors:
            raise ValueError(f"{weights.path} has no position embeddings")
        img_size = img_size or _posemb_grid(weights.tensors[POSEMB], weights.path)[1] * as_grid(config.patches.size)[0]
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
