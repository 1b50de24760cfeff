"""Named fine-tuning recipes, as data, and the train.py flags they set.

`vit` is the 2020 Google fine-tune the original code used (SGD momentum 0.9, gradient clipping, random-resized
crop and flip) and stays the default: with it every other part is off and training is what it always was.
`deit` and `mae` are the published recipes (DeiT's main.py defaults; MAE's FINETUNE.md for ViT-B/16), built on
timm's parts. Learning rates are the published ones at the published global batch (1024 for both); both papers
scale them linearly with the batch, which is left to the user. Step counts (--num_steps,
--warmup_steps) are not part of a recipe: they depend on the dataset.

Any flag given on the command line overrides the recipe's value; `resolve` says which did.
"""
import argparse
from typing import Any

from utils.images import AUGMENTS

# The value every recipe gives each flag it sets; a flag a recipe does not name keeps the `vit` value.
RECIPES: dict[str, dict[str, Any]] = {
    'vit': dict(opt='momentum', learning_rate=3e-2, weight_decay=0.0, wd_exclude='none', layer_decay=None,
                min_lr=0.0, warmup_lr=0.0, max_grad_norm=1.0, drop_path=0.0, augment='flip', aa=None, reprob=0.0,
                mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.0,
                model_ema=False, model_ema_decay=0.9999),
    # DeiT (Touvron et al. 2021), main.py defaults: batch 1024 at lr 5e-4 x 1024 / 512, 300 epochs, 5 warmup.
    'deit': dict(opt='adamw', learning_rate=1e-3, weight_decay=0.05, wd_exclude='timm', layer_decay=None,
                 min_lr=1e-5, warmup_lr=1e-6, max_grad_norm=0.0, drop_path=0.1, augment='flip',
                 aa='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0, mixup_prob=1.0,
                 mixup_switch_prob=0.5, smoothing=0.1, model_ema=True, model_ema_decay=0.99996),
    # MAE fine-tune of ViT-B/16 (He et al. 2022, FINETUNE.md): batch 1024, blr 5e-4 x 1024 / 256, 100 epochs,
    # 5 warmup, layer decay 0.65, no EMA.
    'mae': dict(opt='adamw', learning_rate=2e-3, weight_decay=0.05, wd_exclude='timm', layer_decay=0.65,
                min_lr=1e-6, warmup_lr=0.0, max_grad_norm=0.0, drop_path=0.1, augment='flip',
                aa='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0, mixup_prob=1.0,
                mixup_switch_prob=0.5, smoothing=0.1, model_ema=False, model_ema_decay=0.9999),
}
WD_EXCLUDE = ('none', 'timm')

HELP = {
    'opt': "optimizer, any name timm.optim.create_optimizer_v2 knows: momentum (SGD, momentum 0.9), sgd (the same, "
           "Nesterov), adamw, lamb, ...",
    'learning_rate': 'peak learning rate (of the top layer, under --layer_decay)',
    'weight_decay': 'weight decay (decoupled for adamw)',
    'wd_exclude': "parameters without weight decay: 'none' (every parameter decays, as the original code) or "
                  "'timm' (1-D parameters, the CLS token and position embeddings, timm's rule)",
    'layer_decay': 'layer-wise lr decay: block i gets lr x decay^(depth - i) (timm); none turns it off',
    'min_lr': 'learning rate the decay ends at',
    'warmup_lr': 'learning rate the linear warmup starts from',
    'max_grad_norm': 'global gradient-norm clip; 0 turns it off',
    'drop_path': 'stochastic depth of the last block, linear over depth from 0 (timm)',
    'augment': "flip: random resized crop and flip; crop: milder crop, no flip (digits, text); none",
    'aa': "timm auto-augment string, e.g. rand-m9-mstd0.5-inc1 (RandAugment) or original (AutoAugment); none",
    'reprob': 'random-erasing probability (timm, per-pixel noise)',
    'mixup': 'mixup alpha (timm.data.Mixup); 0 turns it off',
    'cutmix': 'cutmix alpha; 0 turns it off',
    'mixup_prob': 'probability that a batch is mixed at all',
    'mixup_switch_prob': 'probability of cutmix rather than mixup when both are on',
    'smoothing': 'label smoothing',
    'model_ema': 'keep an exponential moving average of the weights (timm.utils.ModelEmaV3), evaluated and saved',
    'model_ema_decay': 'EMA decay per optimizer step',
}
RATES = ('learning_rate', 'weight_decay', 'min_lr', 'warmup_lr', 'max_grad_norm', 'mixup', 'cutmix')
PROBABILITIES = ('drop_path', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'smoothing')


def _optional_float(text: str) -> float | None:
    return None if text.lower() == 'none' else float(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ('none', '') else text


def _bool(text: str) -> bool:
    try:
        return {'true': True, 'yes': True, '1': True, 'false': False, 'no': False, '0': False}[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false") from None


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """`--recipe` and one flag per recipe field; a flag left out takes the recipe's value (see `resolve`)."""
    parser.add_argument('--recipe', choices=sorted(RECIPES), default='vit',
                        help='named fine-tuning recipe (utils/recipes.py); any flag below overrides its value')
    types = {'opt': str, 'wd_exclude': str, 'augment': str, 'aa': _optional_str, 'layer_decay': _optional_float,
             'model_ema': _bool}
    choices = {'wd_exclude': WD_EXCLUDE, 'augment': AUGMENTS}
    for field in RECIPES['vit']:
        values = ', '.join(f"{name}: {recipe[field]}" for name, recipe in RECIPES.items())
        parser.add_argument(f'--{field}', type=types.get(field, float), choices=choices.get(field),
                            default=argparse.SUPPRESS, help=f"{HELP[field]} ({values})")


def resolve(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """Fill every recipe field `args` lacks with `args.recipe`'s value; return the overrides given on the
    command line as {field: (recipe value, value used)}. Raises a one-line ValueError on a bad value."""
    recipe = RECIPES[args.recipe]
    overrides = {}
    for field, value in recipe.items():
        if hasattr(args, field):
            if getattr(args, field) != value:
                overrides[field] = (value, getattr(args, field))
        else:
            setattr(args, field, value)
    check(args)
    return overrides


def check(args: argparse.Namespace) -> None:
    """One-line errors for recipe values no part can use."""
    for field in RATES:
        if getattr(args, field) < 0:
            raise ValueError(f"--{field} {getattr(args, field)}: expected a non-negative number")
    for field in PROBABILITIES:
        value = getattr(args, field)
        if not 0 <= value <= 1 or (field == 'drop_path' and value == 1):
            bound = '1)' if field == 'drop_path' else '1]'
            raise ValueError(f"--{field} {value}: expected a probability in [0, {bound}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer_decay {args.layer_decay}: expected a factor in (0, 1], or none")
    if not 0 <= args.model_ema_decay < 1:
        raise ValueError(f"--model_ema_decay {args.model_ema_decay}: expected a decay in [0, 1)")
    if args.min_lr > args.learning_rate:
        raise ValueError(f"--min_lr {args.min_lr}: expected at most --learning_rate {args.learning_rate}")
    if args.layer_decay is not None and args.wd_exclude == 'none' and args.weight_decay > 0:
        raise ValueError("--layer_decay with --wd_exclude none: timm's layer-decay groups always exclude 1-D "
                         "parameters from weight decay; expected --wd_exclude timm")
    import timm.optim
    if args.opt.lower() not in timm.optim.list_optimizers():
        raise ValueError(f"--opt {args.opt!r}: expected an optimizer timm knows, e.g. momentum, sgd, adamw, lamb")
    from utils.augment import check_auto_augment
    check_auto_augment(args.aa)
    if args.aa is not None or args.reprob > 0:
        if args.augment == 'none':
            raise ValueError(f"--aa {args.aa} / --reprob {args.reprob} with --augment none: expected --augment "
                             "flip or crop (the crop the augmentation starts from)")


def describe(args: argparse.Namespace, overrides: dict[str, tuple[Any, Any]]) -> str:
    """The recipe and every override in one line, printed at the start of a run."""
    shown = ', '.join(f"{field}={getattr(args, field)}" for field in RECIPES['vit'])
    changed = '; overridden: ' + ', '.join(f"{field} {old} -> {new}" for field, (old, new) in overrides.items()) \
        if overrides else ''
    return f"recipe {args.recipe}: {shown}{changed}"


def settings(args: argparse.Namespace, overrides: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The recipe's name, the values used and the overrides, for results.json and the run's config."""
    return {'name': args.recipe, **{field: getattr(args, field) for field in RECIPES['vit']},
            'overridden': sorted(overrides)}
