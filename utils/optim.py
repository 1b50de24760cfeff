"""The recipes' optimizer and weight average, timm's: `create_optimizer_v2` (parameter groups without weight
decay, layer-wise lr decay) and `ModelEmaV3`.

TRAR's routers are parts of their block: under layer decay a router's lr is its block's, and its weights decay
like any other Linear (its biases, 1-D, do not). This holds for timm models (`--model_type timm:<name>`) too:
their parameters are grouped by the wrapped timm ViT's own `group_matcher()` and `no_weight_decay()`, where a
router is `blocks.{i}.attn.router.*`, in block i's layer. The Gumbel temperature is not a parameter: it follows
--tau_policy over the run's steps, whatever the lr schedule.
"""
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from model.timm_trar import TimmViT

MOMENTUM = 0.9  # SGD's momentum (opt 'momentum' or 'sgd'), as the original code


def build_optimizer(model: torch.nn.Module, opt: str, lr: float, weight_decay: float, wd_exclude: str,
                    layer_decay: float | None) -> torch.optim.Optimizer:
    """timm's optimizer `opt` over `model`'s parameters.

    wd_exclude 'none': one group, every parameter decays (the `vit` recipe: exactly torch.optim.SGD(model.parameters(),
    lr, momentum=0.9, weight_decay) as before). 'timm': no decay on 1-D parameters and `model.no_weight_decay()`
    (CLS token, position embeddings); with `layer_decay`, timm's groups by depth (`model.group_matcher()`), each
    group's lr scaled by its `lr_scale` here, since the schedule (a LambdaLR) multiplies each group's own lr.
    A TimmViT is grouped by the timm ViT it wraps, whose rules timm knows (the wrapper has none).
    """
    if wd_exclude not in ('none', 'timm'):
        raise ValueError(f"wd_exclude {wd_exclude!r}: expected 'none' or 'timm'")
    if wd_exclude == 'none' and layer_decay is None:
        return create_optimizer_v2(model.parameters(), opt, lr=lr, weight_decay=weight_decay, momentum=MOMENTUM)
    grouped = model.vit if isinstance(model, TimmViT) else model  # the same parameters, under timm's names
    optimizer = create_optimizer_v2(grouped, opt, lr=lr, weight_decay=weight_decay, momentum=MOMENTUM,
                                    filter_bias_and_bn=wd_exclude == 'timm', layer_decay=layer_decay)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return optimizer


def build_ema(model: torch.nn.Module, decay: float) -> ModelEmaV3:
    """timm's EMA of `model`'s parameters, updated after every optimizer step with `ema.update(model, step)`,
    `step` the steps done, as timm's train.py: the first step's weights are copied, later ones averaged.

    Buffers are copied, not averaged: the routers' Gumbel temperature of the EMA model is the live model's.
    """
    return ModelEmaV3(model, decay=decay, exclude_buffers=True)
