"""Model configurations: the ViT family with TRAR routing fields.

Configs are data. Edit the TRAR fields here (or override them from the command line with
`train.py --orders 0,1,2` / `--set transformer.pooling=fc`):

- `transformer.orders`: span orders routed over in every block. Order 0 is global attention,
  order `o` lets a patch attend to the (2o+1)x(2o+1) window around it on the patch grid.
  `[]` is a plain ViT with no routing parameters at all.
- `transformer.pooling`: how the router summarises the tokens: `avg` (mean), `attention` (TRAR's
  `AttFlat`: an MLP scores the tokens, then their weighted sum, a linear merge and a LayerNorm; its
  dropout rate is `transformer.dropout_rate`) or `fc` (one linear score per token, softmax, weighted sum).
- `transformer.routing`: `soft` (softmax over orders) or `hard` (Gumbel-softmax with temperature
  tau, annealed from `tau_max` to `tau_min` during training).
- `transformer.binarize`: use the one-hot argmax of the routing weights at evaluation (either
  routing), so each sample computes a single span.
- `transformer.attention`: which implementation computes routed attention: `auto` (by device: docs/attention.md)
  or one of `model.attention.IMPLEMENTATIONS`; the environment variable `TRAR_ATTENTION` overrides it.
- `transformer.eval_noise`: hard routing samples Gumbel noise at evaluation too, as the original
  TRAR code does (evaluation is then random); off, evaluation uses `softmax(logits / tau)`, and with
  `binarize` the argmax of the logits. README's "Differences from the original TRAR code" lists why.

The patch grid (the original code's hand-edited `img_scale`) is derived from the image size and
patch size by the model; a config that still sets `img_scale` must agree with it.
"""
import copy
import math

import ml_collections

from .attention.settings import CHOICES as ATTENTION_CHOICES


def _vit_config(patch: int, hidden: int, mlp: int, heads: int, layers: int,
                orders: tuple[int, ...] = (0, 1, 2)) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.patches = ml_collections.ConfigDict({'size': (patch, patch)})
    config.hidden_size = hidden
    config.transformer = ml_collections.ConfigDict()
    config.transformer.mlp_dim = mlp
    config.transformer.num_heads = heads
    config.transformer.num_layers = layers
    config.transformer.attention_dropout_rate = 0.0
    config.transformer.dropout_rate = 0.1
    config.transformer.orders = list(orders)
    config.transformer.pooling = 'avg'
    config.transformer.routing = 'soft'
    config.transformer.tau_max = 10.0
    config.transformer.tau_min = 0.1
    config.transformer.binarize = False
    config.transformer.eval_noise = False
    config.transformer.attention = 'auto'
    config.classifier = 'token'
    config.representation_size = None
    return config


def get_testing():
    """A tiny but non-degenerate config: 32-px images give an 8x8 grid; routes over [0, 1]."""
    return _vit_config(patch=4, hidden=32, mlp=64, heads=2, layers=2, orders=(0, 1))


def get_demo_config():
    """The demo's model (scripts/demo.sh trains it on 32-px digits; benchmarks/bench.py --preset demo times it).

    A 4-layer, 64-wide ViT with 4-px patches (an 8x8 grid on 32-px images), every block routed over global
    attention (order 0), the 3x3 (order 1) and the 5x5 neighbourhood (order 2); no dropout (the demo uses
    weight decay instead).
    """
    config = _vit_config(patch=4, hidden=64, mlp=128, heads=4, layers=4, orders=(0, 1, 2))
    config.transformer.dropout_rate = 0.0
    return config


def get_b16_config():
    """ViT-B/16 with the original TRAR defaults: orders [0, 1, 2], avg pooling, soft routing."""
    return _vit_config(patch=16, hidden=768, mlp=3072, heads=12, layers=12)


def get_b32_config():
    """ViT-B/32."""
    return _vit_config(patch=32, hidden=768, mlp=3072, heads=12, layers=12)


def get_l16_config():
    """ViT-L/16."""
    return _vit_config(patch=16, hidden=1024, mlp=4096, heads=16, layers=24)


def get_l32_config():
    """ViT-L/32."""
    return _vit_config(patch=32, hidden=1024, mlp=4096, heads=16, layers=24)


def get_h14_config():
    """ViT-H/14."""
    return _vit_config(patch=14, hidden=1280, mlp=5120, heads=16, layers=32)


CONFIGS = {
    'ViT-B_16': get_b16_config(),
    'ViT-B_32': get_b32_config(),
    'ViT-L_16': get_l16_config(),
    'ViT-L_32': get_l32_config(),
    'ViT-H_14': get_h14_config(),
    'testing': get_testing(),
    'demo': get_demo_config(),
}


# Fields added after checkpoints were first written, with the value that keeps an older checkpoint's behaviour.
ADDED_FIELDS = {('transformer', 'eval_noise'): False, ('transformer', 'attention'): 'auto'}


def with_added_fields(saved: dict) -> dict:
    """A config saved as a dict (in a checkpoint), completed with the fields added since it was written."""
    saved = copy.deepcopy(saved)
    for (*groups, field), value in ADDED_FIELDS.items():
        node = saved
        for group in groups:
            node = node.setdefault(group, {})
        node.setdefault(field, value)
    return saved


def parse_orders(text: str) -> list[int]:
    """Span orders from the command line: '0,1,2' -> [0, 1, 2]; 'none' -> [] (a plain ViT)."""
    if text.strip().lower() in ('none', ''):
        return []
    try:
        return [int(part) for part in text.split(',')]
    except ValueError:
        raise ValueError(f"orders {text!r}: expected comma-separated integers like '0,1,2' or 'none'") from None


def get_config(model_type: str) -> ml_collections.ConfigDict:
    """A private copy of a named config, safe to modify."""
    if model_type not in CONFIGS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(CONFIGS)}")
    return copy.deepcopy(CONFIGS[model_type])


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise a one-line ValueError naming the first field whose value cannot build a model; return the config.

    Sizes are positive integers, heads divide the hidden size, rates are finite and in [0, 1), the hard-routing
    temperatures are finite with 0 < tau_min <= tau_max. What depends on the image size (orders against the
    patch grid) is checked by the model.
    """
    t = config.transformer

    def fail(key: str, value, expected: str):
        raise ValueError(f"{key} {value!r}: expected {expected}")

    def positive_int(key: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(key, value, 'a positive integer')

    size = config.patches.size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(
            isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size):
        fail('patches.size', size, 'two positive integers like (16, 16)')
    for key, value in (('hidden_size', config.hidden_size), ('transformer.mlp_dim', t.mlp_dim),
                       ('transformer.num_heads', t.num_heads), ('transformer.num_layers', t.num_layers)):
        positive_int(key, value)
    if config.hidden_size % t.num_heads:
        fail('transformer.num_heads', t.num_heads, f'a divisor of hidden_size {config.hidden_size}')
    for key in ('dropout_rate', 'attention_dropout_rate'):
        rate = t[key]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            fail(f'transformer.{key}', rate, 'a number in [0, 1)')
    if t.routing == 'hard' and not 0 < t.tau_min <= t.tau_max:
        raise ValueError(f"transformer.tau_min {t.tau_min:g}, transformer.tau_max {t.tau_max:g}: "
                         "expected 0 < tau_min <= tau_max for hard routing")
    for key in ('tau_min', 'tau_max'):
        tau = t[key]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            fail(f'transformer.{key}', tau, 'a finite positive number')
    orders = list(t.orders)
    if any(isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in orders) or len(set(orders)) != len(orders):
        fail('transformer.orders', orders, 'distinct non-negative integers like [0, 1, 2]')
    for key in ('binarize', 'eval_noise'):
        if not isinstance(t.get(key, False), bool):
            fail(f'transformer.{key}', t[key], 'true or false')
    attention = t.get('attention', 'auto')
    if not isinstance(attention, str) or attention not in ATTENTION_CHOICES:
        fail('transformer.attention', attention, f"one of {', '.join(ATTENTION_CHOICES)}")
    if config.classifier != 'token':
        fail('classifier', config.classifier, "'token'")
    representation = config.get('representation_size')
    if representation is not None:
        positive_int('representation_size', representation)
    return config
