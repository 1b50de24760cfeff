"""The model a weights file holds, for the tools that predict with it (eval.py, test.py, scripts/plot_routing.py).

Every check a hand-edited or damaged file needs, in one place and before anything large is built: a train.py
checkpoint's config, image size and class names of the right types and lengths (its weights are finite
floating-point numbers by model/pretrained.py's rule); an image size whose attention fits in memory. Each
failure is one ValueError line.
"""
import math
from pathlib import Path

import ml_collections
import torch

from model import pretrained
from model.config import get_config, with_added_fields
from model.modeling import VisionTransformer
from model.attention import as_grid
from utils.checkpoint import check_config
from utils.errors import one_line

# The types a hand-edited file gets wrong that the model builder would trip over with a traceback.
DEFAULT_MODEL_TYPE = 'ViT-B_16'  # the tools' --model_type when none is given
_BUILD_ERRORS = (IndexError, KeyError, TypeError, AttributeError, RuntimeError)


def check_checkpoint_fields(weights: pretrained.Pretrained) -> None:
    """A train.py checkpoint's config is a dict, its image size and class count positive integers (the count its
    head's), and its class names (when given) a list of one name per class."""
    checkpoint, path = weights.checkpoint, weights.path
    if weights.layout != 'train.py':
        return
    check_config(path, checkpoint)
    for key in ('img_size', 'num_classes'):
        value = checkpoint.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{path}: its {key!r} is {value!r}; expected a positive integer")
    recorded, classes = checkpoint.get('num_classes'), weights.num_classes
    if recorded is not None and classes is not None and recorded != classes:
        raise ValueError(f"{path}: its 'num_classes' is {recorded} but its head has {classes}; expected the same")
    names = checkpoint.get('class_names')
    if names is None:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: its 'class_names' is {_short(names)}; expected a list of names, one per class")
    if classes is not None and len(names) != classes:
        raise ValueError(f"{path}: it names {len(names)} classes but its head has {classes}; "
                         "expected one name per class")


def _short(value) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text[:60]}{' ...' if len(text) > 60 else ''})"


def check_fits_memory(config: ml_collections.ConfigDict, img_size: int, batch: int, device: torch.device | str,
                      flag: str = '--img_size') -> None:
    """Refuse, before anything is built, an image size whose attention maps cannot fit in the device's memory."""
    if 'patches' not in config:  # a timm model's architecture is timm's, known once it is built
        return
    patch = as_grid(config.patches.size)
    tokens = 1 + math.ceil(img_size / patch[0]) * math.ceil(img_size / patch[1])
    # a lower bound: one layer's float32 (tokens, tokens) scores per head and image, as unfused attention holds them
    needed = batch * tokens ** 2 * 4 * config.transformer.num_heads
    available = available_memory(torch.device(device))
    if available is not None and needed > available:
        raise ValueError(f"{flag} {img_size}: {tokens} tokens need about {needed / 2 ** 30:.1f} GiB for the attention "
                         f"of {batch} image(s), more than the {available / 2 ** 30:.1f} GiB available; "
                         "expected a smaller image size")


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (CUDA: the driver's count; CPU: the kernel's MemAvailable), None where unknown."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    try:
        with open('/proc/meminfo') as meminfo:
            for line in meminfo:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_config(weights: pretrained.Pretrained, model_type: str) -> ml_collections.ConfigDict:
    """The config the model will be built from: the checkpoint's (train.py), else `model_type`'s."""
    if weights.layout == 'train.py' and 'config' in weights.checkpoint:
        return ml_collections.ConfigDict(with_added_fields(weights.checkpoint['config']))
    return get_config(model_type)


def check_no_config_flags(weights: pretrained.Pretrained, model_type: str, orders: list[int] | None,
                          num_classes: int | None) -> None:
    """Refuse --model_type, --orders or --num_classes given for a train.py checkpoint, which carries its own config
    and classes: they would be ignored, and the model the user asked for silently replaced by the checkpoint's."""
    if weights.layout != 'train.py':
        return
    checkpoint = weights.checkpoint
    given = {'--orders': (orders, (checkpoint.get('config') or {}).get('transformer', {}).get('orders')),
             '--num_classes': (num_classes, checkpoint.get('num_classes')),
             '--model_type': (None if model_type == DEFAULT_MODEL_TYPE else model_type, checkpoint.get('model_type'))}
    for flag, (value, own) in given.items():
        if value is not None and value != own:
            if flag == '--orders':  # as typed: 0,9 or none
                value, own = (','.join(map(str, orders)) or 'none' for orders in (value, own or []))
            raise ValueError(f"{flag} {value}: {weights.path} is a train.py checkpoint, which carries its own "
                             f"config ({flag.lstrip('-')} {own}); expected no {flag}")


def load_model(path: str | Path, model_type: str = DEFAULT_MODEL_TYPE, orders: list[int] | None = None,
               img_size: int | None = None, num_classes: int | None = None, batch: int = 1,
               device: torch.device | str = 'cpu',
               ema: bool = False) -> tuple[VisionTransformer, pretrained.Pretrained]:
    """The whole model `path` holds (its weight average with `ema`), in eval mode (model/pretrained.py's
    `build_model`), after every check."""
    weights = pretrained.read(path, ema=ema)
    check_checkpoint_fields(weights)  # (finite floating-point weights: model/pretrained.py's check_weights)
    check_no_config_flags(weights, model_type, orders, num_classes)
    try:
        config = model_config(weights, model_type)
        size = img_size or (weights.checkpoint.get('img_size') if weights.layout == 'train.py' else None)
        if size is not None:
            check_fits_memory(config, size, batch, device)
        return pretrained.build_model(weights, model_type, orders, img_size, num_classes), weights
    except _BUILD_ERRORS as error:
        raise ValueError(f"{weights.path}: cannot build a model from it: "
                         f"{type(error).__name__}: {one_line(error, limit=200)}") from None


def class_names_of(weights: pretrained.Pretrained) -> list[str] | None:
    """The class names a train.py checkpoint records (checked by `check_checkpoint_fields`), else None."""
    names = weights.checkpoint.get('class_names') if weights.layout == 'train.py' else None
    return list(names) if names else None
