"""Fine-tune a Vision Transformer with TRAR routed attention spans.

    python train.py --name cifar10-trar --dataset cifar10 --pretrained_dir checkpoint/ViT-B_16.npz
    torchrun --nproc_per_node 8 train.py --name imagenet-trar --dataset imagenet --data_dir /path/to/imagenet ...

`--train_batch_size` is the global batch: each process runs micro-batches of
global / (processes x accumulation steps), so 8 processes and 1 process with 8 accumulation steps
train the same model. The last line on stdout is a JSON summary, also written to results.json.
`--resume auto` continues this run's own last.ckpt when there is one (a requeued or restarted job), else starts.

`main` wires the pieces, each built by a small function below, then loops: utils/engine.py trains up to the
next evaluation and returns what it measured; `main` evaluates, logs and saves (utils/checkpoint.py).
"""
import sys

if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting("interrupted before the first training step; this run wrote no checkpoint")

import argparse  # noqa: E402 (the handler above comes first)
import ast
import json
import math
import random
import signal
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import ml_collections
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from model.config import CONFIGS, get_config, parse_orders, validate_config, with_added_fields
from model import pretrained as pretrained_weights
from model import timm_trar
from model.modeling import VisionTransformer
from utils import checkpoint as checkpoints
from utils import dist_util, recipes, tool
from utils.augment import build_mixup, check_mixup_batch, train_loss, train_transform
from utils.checkpoint import CheckpointSaver
from utils.data_utils import (DATASETS, Augmented, DeviceBatches, ShardedSampler, check_same_classes,
                              EvaluationSet, collate_skipping_none, evaluation_set, load_split)
from utils.images import Preprocess, UnreadableImage, eval_pixels, preprocess_of
from utils.shards import ShardImages, TrainingShards
from utils.engine import (OPT_LEVELS, Evaluation, Optimization, Precision, RunState, TrainingData, TrainStats,
                          evaluate, peak_memory_mib, train_until)
from utils.errors import RunError, command_line, stop_at_first_interrupt
from utils.files import RunFolder, describe, write_atomic
from utils.optim import build_ema, build_optimizer
from utils.scheduler import DECAY_TYPES, TAU_POLICIES, build_scheduler, tau_at

OFFICIAL_URL = 'https://storage.googleapis.com/vit_models/imagenet21k/{}.npz'
OFFICIAL_MODELS = ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14')
# Arguments that shape the trajectory: resuming with other values continues, but not exactly.
TRAJECTORY_ARGS = ('dataset', 'shards', 'seed', 'train_batch_size', 'num_steps', 'decay_type', 'warmup_steps',
                   'tau_policy', 'fp16', 'fp16_opt_level', 'amp_dtype', 'recipe', *recipes.RECIPES['vit'])
LOG_EVERY = 10  # steps between training scalars in TensorBoard


# ---------------------------------------------------------------------------------------------
# Arguments and config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--name', required=True, help='name of this run: outputs go to <output_dir>/<name>/')
    p.add_argument('--dataset', choices=DATASETS, default=None,
                   help="default cifar10; with --shards only a label recorded with the run (default 'shards')")
    p.add_argument('--data_dir', default='./data', help='dataset root (imagenet: train/ and val/ below it)')
    p.add_argument('--model_type', default='ViT-B_16',
                   help=f"one of {', '.join(sorted(CONFIGS))}, or timm:<timm model name> (--pretrained_dir: a local "
                        "file or hub id that timm loads)")
    p.add_argument('--pretrained_dir', default='checkpoint/ViT-B_16.npz',
                   help="weights to start from: Google .npz, timm .safetensors/.pth/.bin, a ViT-pytorch state dict "
                        "or a train.py checkpoint (new fine-tune, fresh head); 'none' trains from scratch")
    p.add_argument('--output_dir', default='output')
    p.add_argument('--img_size', type=int, default=224)
    p.add_argument('--train_batch_size', type=int, default=512, help='global batch size over all processes')
    p.add_argument('--eval_batch_size', type=int, default=64, help='per-process evaluation batch size')
    p.add_argument('--eval_every', type=int, default=100, help='evaluate and checkpoint every this many steps')
    p.add_argument('--num_steps', type=int, default=10000, help='optimizer steps in all')
    p.add_argument('--decay_type', choices=DECAY_TYPES, default='cosine')
    p.add_argument('--warmup_steps', type=int, default=500)
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--gradient_accumulation_steps', type=int, default=1)
    p.add_argument('--fp16', action='store_true', help='mixed precision with torch.amp (dtype: --amp_dtype)')
    p.add_argument('--fp16_opt_level', choices=sorted(OPT_LEVELS), default='O2', help='; '.join(
        f'{level}: {meaning}' for level, meaning in OPT_LEVELS.items()))
    p.add_argument('--loss_scale', type=float, default=0, help='fp16: 0 dynamic loss scaling, a power of two static')
    p.add_argument('--amp_dtype', choices=('fp16', 'bf16'), default=None,
                   help='with --fp16: fp16 (the default) or bf16, which needs no loss scaling')
    p.add_argument('--resume_path', default=None, help='a last.ckpt to continue exactly')
    p.add_argument('--overwrite', action='store_true',
                   help="replace the checkpoints, results and logs of a previous run of this --name")
    p.add_argument('--num_workers', type=int, default=4, help='data-loading processes per training process')
    p.add_argument('--orders', default=None, help="span orders, e.g. '0,1,2', or 'none' for a plain ViT")
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config field, e.g. transformer.dropout_rate=0.0 (repeatable)')
    p.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    p.add_argument('--tau_policy', choices=TAU_POLICIES, default='slow', help='temperature schedule of hard routing')
    p.add_argument('--skip_corrupt', action='store_true', help='skip unreadable images with a warning and a count')
    p.add_argument('--shards', default=None,
                   help="train on tar shards from scripts/make_shards.py instead of --data_dir: "
                        "'shards/train-{000000..001281}.tar', a glob or a URL pattern (with --val_shards)")
    p.add_argument('--val_shards', default=None, help='the validation shards, with --shards')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (training and evaluation)')
    p.add_argument('--local_rank', '--local-rank', type=int, default=-1,
                   help='ignored (torchrun sets LOCAL_RANK); accepted for torch.distributed.launch')
    p.add_argument('--resume', choices=('auto',), default=None,
                   help="auto: continue this run's own last.ckpt (<output_dir>/<name>/last.ckpt) when it exists and "
                        "was trained with the same settings, else start afresh (for requeued or restarted jobs)")
    p.add_argument('--attention', default=None,
                   help="routed attention implementation: auto (chosen by device) or a name, e.g. shared_scores, "
                        "flex, triton, dense; sets config transformer.attention (default: the config's)")
    recipes.add_recipe_arguments(p.add_argument_group('recipe (utils/recipes.py; a flag overrides its value)'))
    return p


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every value checked (one line naming a bad one)."""
    p = build_parser()
    args = p.parse_args(argv)
    tool.check_finite(p, args)
    tool.check_folder_name(p, 'name', args.name)
    if args.model_type not in CONFIGS and not timm_trar.is_timm(args.model_type):
        p.error(f"--model_type {args.model_type!r}: expected one of {', '.join(sorted(CONFIGS))}, or timm:<name>")
    try:
        args.recipe_overrides = {field: list(values) for field, values in recipes.resolve(args).items()}
    except ValueError as error:
        p.error(str(error))
    if (args.shards is None) != (args.val_shards is None):
        p.error("--shards and --val_shards: expected both (training and validation shards) or neither")
    if args.dataset is None:  # a shards run never records a dataset it did not read
        args.dataset = 'shards' if args.shards else 'cifar10'
    if args.loss_scale < 0 or (args.loss_scale > 0 and not math.log2(args.loss_scale).is_integer()):
        p.error(f"--loss_scale {args.loss_scale:g}: expected 0 (dynamic) or a power of two")
    for flag in ('img_size', 'train_batch_size', 'eval_batch_size', 'eval_every', 'num_steps',
                 'gradient_accumulation_steps'):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    for flag in ('warmup_steps', 'num_workers'):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} {getattr(args, flag)}: expected a non-negative number")
    if args.warmup_steps >= args.num_steps:
        p.error(f"--warmup_steps {args.warmup_steps}: expected fewer than --num_steps {args.num_steps}")
    if args.amp_dtype is not None and not args.fp16:
        p.error(f"--amp_dtype {args.amp_dtype} takes effect only with --fp16: expected --fp16 --amp_dtype "
                f"{args.amp_dtype}, or no --amp_dtype for float32")
    if args.resume and args.resume_path:
        p.error(f"--resume {args.resume} and --resume_path {args.resume_path}: expected one of them")
    args.amp_dtype = args.amp_dtype or 'fp16'
    return args




def parse_field(key: str, text: str, current):
    """The text of `--set key=text` as a value of the field's current type."""
    try:
        if isinstance(current, bool):
            return {'true': True, 'yes': True, '1': True, 'false': False, 'no': False, '0': False}[text.lower()]
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if key.endswith('orders'):
            return parse_orders(text.strip('[]()'))
        value = ast.literal_eval(text)
        if isinstance(current, tuple):  # patches.size=16 means (16, 16)
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(current)
        if isinstance(current, list):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        return value
    except (KeyError, ValueError, SyntaxError, TypeError):
        kinds = {bool: 'true or false', int: 'an integer', float: 'a number', tuple: 'a tuple like (16, 16)',
                 list: 'a list like [0, 1]'}
        raise ValueError(f"--set {key}={text}: expected {kinds.get(type(current), 'a Python literal')}") from None


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The named config with --orders and every --set KEY=VALUE applied, checked."""
    timm_model = timm_trar.is_timm(args.model_type)
    config = timm_trar.timm_config(args.model_type) if timm_model else get_config(args.model_type)
    if args.orders is not None:
        config.transformer.orders = parse_orders(args.orders)
    for assignment in args.set:
        key, sep, text = assignment.partition('=')
        if not sep:
            raise ValueError(f"--set {assignment!r}: expected KEY=VALUE")
        *parents, field = key.split('.')
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or field not in node:
            raise ValueError(f"--set {key}: no such config field in {args.model_type}")
        if isinstance(node[field], ml_collections.ConfigDict):
            raise ValueError(f"--set {key}={text}: {key} is a group of fields; expected one of "
                             + ', '.join(f'{key}.{name}' for name in node[field]))
        node[field] = parse_field(key, text, node[field])
    if args.attention is not None:
        config.transformer.attention = args.attention  # validate_config names a bad one
    return config if timm_model else validate_config(config)


def read_pretrained(args: argparse.Namespace) -> pretrained_weights.Pretrained | None:
    """The weights to start from (any layout model/pretrained.py reads); None for --pretrained_dir 'none' or empty."""
    if args.pretrained_dir in (None, '', 'none') or timm_trar.is_timm(args.model_type):  # timm loads its own
        return None
    path = Path(args.pretrained_dir)
    if not path.exists():
        source = (f"download it from {OFFICIAL_URL.format(args.model_type)}" if args.model_type in OFFICIAL_MODELS
                  else f"Google publishes none for {args.model_type}")
        raise FileNotFoundError(f"pretrained checkpoint {path} is missing; {source} or pass --pretrained_dir none")
    return pretrained_weights.read(path)




def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def announce(args: argparse.Namespace, device: torch.device, main_process: bool) -> None:
    """The recipe and its overrides (stdout), and a warning for precision that is slow on this device."""
    if main_process:
        print(recipes.describe(args, args.recipe_overrides), flush=True)
    if args.fp16 and device.type == 'cpu' and main_process:
        print("warning: --fp16 on a CPU: autocast there runs slower than float32; it is for trying mixed "
              "precision out, not for speed", file=sys.stderr)


def micro_batch_size(args: argparse.Namespace, world: int) -> int:
    """Each process's micro-batch: the global batch over processes and accumulation steps (even, to mix)."""
    accumulation = args.gradient_accumulation_steps
    if args.train_batch_size % (world * accumulation):
        raise ValueError(f"--train_batch_size {args.train_batch_size} is not divisible by {world} processes x "
                         f"{accumulation} accumulation steps")
    micro_batch = args.train_batch_size // (world * accumulation)
    check_mixup_batch(args.mixup, args.cutmix, micro_batch)
    return micro_batch


# ---------------------------------------------------------------------------------------------
# The run folder and resuming


def changed_settings(saved: dict, args: argparse.Namespace) -> list[str]:
    """The trajectory settings (TRAJECTORY_ARGS) a checkpoint's run had other than this one's."""
    return [f"--{key} {saved.get(key)!r} -> {getattr(args, key)!r}" for key in TRAJECTORY_ARGS
            if key in saved and saved[key] != getattr(args, key)]


def auto_resume_path(args: argparse.Namespace, out_dir: Path) -> str | None:
    """--resume auto: this run's last.ckpt when it exists and its settings match, None to start afresh; says which.

    A last.ckpt with other settings is another run: refused, or with --overwrite replaced by a fresh start.
    """
    last = out_dir / 'last.ckpt'
    if not last.is_file():
        print(f"--resume auto: no {last} yet, starting afresh", file=sys.stderr, flush=True)
        return None
    saved = checkpoints.load(last, checkpoints.RESUME_KEYS)
    changed = changed_settings(saved.get('args', {}), args)
    if changed and not args.overwrite:
        raise ValueError(f"--resume auto: {last} was trained with other settings ({', '.join(changed)}): expected "
                         "the same settings to continue it, or --overwrite to start afresh")
    if changed:
        print(f"--resume auto: {last} has other settings, starting afresh (--overwrite)", file=sys.stderr, flush=True)
        return None
    print(f"--resume auto: continuing {last} from step {saved['step']}", file=sys.stderr, flush=True)
    return str(last)


def resume_from(args: argparse.Namespace, out_dir: Path, main_process: bool) -> str | None:
    """The checkpoint this run continues (--resume_path, or --resume auto's choice); None for a new run.
    The main process decides and every process follows (a collective)."""
    if args.resume != 'auto':
        return args.resume_path
    choice, refused = None, None
    if main_process:
        try:
            choice = auto_resume_path(args, out_dir)
        except (ValueError, OSError) as error:
            refused = error
    dist_util.raise_first_error(refused)
    return dist_util.all_gather_objects(choice)[0]


def take_run_folder(out_dir: Path, resume_path: str | None, overwrite: bool, main_process: bool) -> RunFolder | None:
    """The run folder, checked and locked by the main process before anything slow; every process stops if it
    is refused."""
    run_folder, refused = None, None
    if main_process:
        try:
            run_folder = RunFolder(out_dir, resume_path, overwrite)
        except ValueError as error:
            refused = error
    dist_util.raise_first_error(refused)
    return run_folder


def read_resume(path: str | None, identity: dict, args: argparse.Namespace, main_process: bool) -> dict | None:
    """The checkpoint to continue, checked to be of this model; a warning names the settings that changed."""
    if path is None:
        return None
    resume = checkpoints.load(path, checkpoints.RESUME_KEYS)
    checkpoints.check_compatible({**resume, 'config': with_added_fields(resume['config'])}, identity)
    changed = changed_settings(resume.get('args', {}), args)
    if changed and main_process:
        print("warning: resuming with other settings, the run will not match an uninterrupted one: "
              + ', '.join(changed), file=sys.stderr)
    return resume


def restore(resume: dict, optimization: Optimization, rank: int, world: int, main_process: bool) -> RunState:
    """Optimizer, scheduler, loss scaler and random states from `resume`; returns where the run stood."""
    optimization.optimizer.load_state_dict(resume['optimizer'])
    optimization.scheduler.load_state_dict(resume['scheduler'])
    scaler = optimization.precision.scaler
    if scaler is not None and resume.get('scaler'):
        scaler.load_state_dict(resume['scaler'])
    if optimization.ema is not None:
        if resume.get('ema_state_dict') is None:
            print("warning: the checkpoint holds no EMA weights (written without --model_ema): the average starts "
                  "from its weights", file=sys.stderr)
        else:
            optimization.ema.module.load_state_dict(resume['ema_state_dict'])
    if len(resume['rng']) == world:
        checkpoints.set_rng_state(resume['rng'][rank])
    elif main_process:
        print(f"warning: the checkpoint was written by {len(resume['rng'])} processes, this run has {world}: "
              "random states are not restored", file=sys.stderr)
    return RunState(**{field: resume[field] for field in RunState.__dataclass_fields__ if field in resume})


def checkpoint_state(model: VisionTransformer, optimization: Optimization, state: RunState, identity: dict,
                     args: argparse.Namespace, class_names: list[str]) -> dict:
    """Everything an exact resume needs (a collective: it gathers every process's random states)."""
    scaler = optimization.precision.scaler
    return {
        'state_dict': model.state_dict(), **asdict(state), **identity, 'dataset': args.dataset,
        'class_names': class_names, 'args': vars(args),
        'optimizer': optimization.optimizer.state_dict(), 'scheduler': optimization.scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'ema_state_dict': optimization.ema.module.state_dict() if optimization.ema is not None else None,
        'rng': dist_util.all_gather_objects(checkpoints.rng_state()),
    }


# ---------------------------------------------------------------------------------------------
# Model, optimisation and data


def build_model(args: argparse.Namespace, config: ml_collections.ConfigDict, num_classes: int,
                resume: dict | None, pretrained, main_process: bool) -> VisionTransformer:
    """The model, with the weights of the run it continues or of the pretrained checkpoint (new head)."""
    if timm_trar.is_timm(args.model_type):  # timm loads --pretrained_dir (a file or hub id) unless it resumes
        start = None if resume is not None or args.pretrained_dir in (None, '', 'none') else args.pretrained_dir
        model = timm_trar.TimmViT(config, args.img_size, num_classes, weights=start, zero_head=True,
                                  drop_path_rate=args.drop_path)
    else:
        model = VisionTransformer(config, img_size=args.img_size, num_classes=num_classes, zero_head=True,
                                  drop_path_rate=args.drop_path)
    if resume is not None:
        model.load_state_dict(resume['state_dict'])
    elif pretrained is not None:
        pretrained_weights.load_pretrained(model, pretrained)
        if pretrained.layout == 'train.py' and main_process:
            print(f"note: {pretrained.path} is a train.py checkpoint: its weights start a new fine-tune with a fresh "
                  f"head; to continue that run instead, pass --resume_path {pretrained.path}", file=sys.stderr)
    return model


def build_optimization(args: argparse.Namespace, model: VisionTransformer, device: torch.device,
                       world: int, micro_batch: int) -> tuple[torch.nn.Module, Optimization]:
    """The model on its device (compiled, DDP-wrapped for several processes) and what its steps need: the recipe's
    optimizer, warmup then decay, mixed precision, hard routing's temperature schedule, the recipe's loss, mixing
    and weight average (utils/recipes.py)."""
    precision = Precision.from_args(args.fp16, args.fp16_opt_level, args.amp_dtype, args.loss_scale, device)
    model.to(device=device, dtype=precision.model_dtype)
    ema = build_ema(model, args.model_ema_decay) if args.model_ema else None  # not compiled: it only evaluates
    model.attention_implementation(device)  # an implementation the device cannot run fails here, before training
    if args.compile:
        model.compile()  # in place: the state dict keeps its keys, DDP wraps the compiled module
    trained = model
    if world > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = build_optimizer(model, args.opt, args.learning_rate, args.weight_decay, args.wd_exclude,
                                args.layer_decay)
    peak = args.learning_rate or 1.0  # the warmup's start and the floor as fractions of the peak
    scheduler = build_scheduler(optimizer, args.decay_type, args.warmup_steps, args.num_steps,
                                args.warmup_lr / peak, args.min_lr / peak)
    mix = build_mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing,
                      model.num_classes, args.seed, micro_batch)
    transformer = model.config.transformer
    tau = None
    if model.is_routed and transformer.routing == 'hard':
        tau = partial(tau_at, total_steps=args.num_steps, warmup_steps=args.warmup_steps, tau_max=transformer.tau_max,
                      tau_min=transformer.tau_min, policy=args.tau_policy)
    return trained, Optimization(optimizer, scheduler, precision, args.gradient_accumulation_steps,
                                 args.max_grad_norm, tau, train_loss(mix is not None, args.smoothing), mix, ema)


def build_datasets(args: argparse.Namespace, preprocess: Preprocess) -> tuple[Augmented | TrainingShards,
                                                                             EvaluationSet]:
    """The training set (folders, downloads or --shards) and this process's part of the validation set with its
    sampler (`evaluation_set`: every image counted once), with the same classes; uint8 pixels (`preprocess`
    resamples them)."""
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    transform = train_transform(args.img_size, args.augment, args.aa, args.reprob, preprocess)
    if args.shards:
        train_set = TrainingShards(args.shards, transform, args.seed, rank, world, args.skip_corrupt,
                                   args.train_batch_size, micro_batch_size(args, world))
        train_images = train_set
        val_images = ShardImages(args.val_shards, rank=rank, world_size=world, skip_corrupt=args.skip_corrupt)
    else:
        out_dir = Path(args.output_dir) / args.name  # each split's file list is cached there
        train_images = load_split(args.dataset, args.data_dir, True, args.skip_corrupt, out_dir / 'train_files.txt')
        val_images = load_split(args.dataset, args.data_dir, False, args.skip_corrupt, out_dir / 'val_files.txt')
        train_set = Augmented(train_images, transform, args.seed)
    check_same_classes(train_images, val_images)
    return train_set, evaluation_set(val_images, eval_pixels(args.img_size, preprocess), rank, world)


def build_loaders(args: argparse.Namespace, train_set: Augmented | TrainingShards, validation: EvaluationSet,
                  micro_batch: int, device: torch.device, preprocess: Preprocess) -> tuple[TrainingData, DataLoader]:
    """The training order is a function of (seed, epoch), resumable mid-epoch; validation is split into disjoint
    parts, so every image is counted exactly once. Batches are normalised on the device (`preprocess`)."""
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    collate = partial(collate_skipping_none, image_shape=(3, args.img_size, args.img_size))
    options = dict(num_workers=args.num_workers, collate_fn=collate, pin_memory=device.type == 'cuda',
                   generator=torch.Generator())
    if isinstance(train_set, TrainingShards):  # shards place and split themselves
        train_loader = DataLoader(train_set, batch_size=micro_batch, **options)
    else:
        sampler = ShardedSampler(len(train_set), args.train_batch_size, rank, world, args.seed)
        train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, drop_last=True, **options)
    val_set, val_sampler = validation
    val_loader = DataLoader(val_set, batch_size=args.eval_batch_size, sampler=val_sampler, **options)
    train_loader, val_loader = (DeviceBatches(loader, device, preprocess) for loader in (train_loader, val_loader))
    return TrainingData(train_loader, args.train_batch_size // world), val_loader


# ---------------------------------------------------------------------------------------------
# Logging and results


def evaluate_average(optimization: Optimization, val_loader: DataLoader) -> Evaluation | None:
    """The EMA weights' evaluation (--model_ema), None without them."""
    ema = optimization.ema
    return evaluate(ema.module, val_loader, optimization.precision) if ema is not None else None


def evaluation_line(state: RunState, evaluation: Evaluation, averaged: Evaluation | None) -> str:
    line = f"step {state.step}: validation accuracy {evaluation.accuracy:.4f} (best {state.best_acc:.4f})"
    return line + (f"; EMA {averaged.accuracy:.4f} (best {state.ema_best_acc:.4f})" if averaged else '')


def record_evaluation(state: RunState, evaluation: Evaluation, averaged: Evaluation | None = None) -> bool:
    """Note an evaluation (and the EMA's, if any) in the run's state; True when accuracy improved on the best so
    far (the live weights' accuracy: best.ckpt follows it)."""
    if not math.isfinite(evaluation.loss):
        raise FloatingPointError(f"non-finite validation loss at step {state.step}")
    improved = evaluation.accuracy > state.best_acc
    state.final_acc, state.best_acc = evaluation.accuracy, max(state.best_acc, evaluation.accuracy)
    state.val_images = evaluation.images
    if averaged is not None:
        state.ema_final_acc, state.ema_best_acc = averaged.accuracy, max(state.ema_best_acc, averaged.accuracy)
    return improved


def log_to_tensorboard(writer: SummaryWriter, stats: TrainStats, evaluation: Evaluation, step: int,
                       averaged: Evaluation | None = None) -> None:
    for logged_step, scalars in stats.logs:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, logged_step)
    for prefix, result in (('val/', evaluation), ('val/ema_', averaged)):
        if result is not None:
            for tag, value in (('accuracy', result.accuracy), ('loss', result.loss), ('top5', result.top5)):
                writer.add_scalar(f'{prefix}{tag}', value, step)


def results_of(args: argparse.Namespace, model: VisionTransformer, state: RunState, device: torch.device) -> dict:
    """The run's summary: results.json and the last line on stdout."""
    return {
        'name': args.name, 'model_type': args.model_type, 'orders': list(model.config.transformer.orders),
        'attention': model.attention_implementation(device),
        'img_size': args.img_size, 'dataset': args.dataset, 'best_acc': state.best_acc, 'final_acc': state.final_acc,
        'steps': state.step, 'seconds': round(state.seconds, 2),
        'peak_memory_mib': round(peak_memory_mib(device), 1),
        'peak_memory_kind': 'cuda_max_allocated' if device.type == 'cuda' else 'cpu_max_rss',
        'val_images': state.val_images, 'world_size': dist_util.get_world_size(),
        'skipped_images': state.skipped_images,
        'recipe': recipes.settings(args, args.recipe_overrides),
        **({'ema_best_acc': state.ema_best_acc, 'ema_final_acc': state.ema_final_acc} if args.model_ema else {}),
    }


def write_results(results: dict, out_dir: Path, saver: CheckpointSaver) -> None:
    try:
        write_atomic(out_dir / 'results.json', lambda tmp: tmp.write_text(json.dumps(results, indent=2) + '\n'))
    except OSError as error:
        raise RunError(f"cannot write {out_dir / 'results.json'}: {describe(error)}; "
                       f"{saver.where_to_continue()}") from None
    if results['skipped_images']:
        print(f"skipped {results['skipped_images']} unreadable images", file=sys.stderr)
    print(json.dumps(results), flush=True)


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    device = dist_util.init_distributed(args.device)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    main_process = rank == 0
    micro_batch = micro_batch_size(args, world)
    announce(args, device, main_process)
    config = build_config(args)
    out_dir = Path(args.output_dir) / args.name
    resume_path = resume_from(args, out_dir, main_process)
    run_folder = take_run_folder(out_dir, resume_path, args.overwrite, main_process)
    pretrained = None if resume_path else read_pretrained(args)  # read before the data is scanned
    seed_everything(args.seed + rank)

    preprocess = preprocess_of(args.model_type)
    train_set, validation = build_datasets(args, preprocess)
    identity = {'model_type': args.model_type, 'img_size': args.img_size, 'num_classes': len(train_set.classes),
                'config': config.to_dict()}
    resume = read_resume(resume_path, identity, args, main_process)
    model = build_model(args, config, len(train_set.classes), resume, pretrained, main_process)
    trained, optimization = build_optimization(args, model, device, world, micro_batch)
    data, val_loader = build_loaders(args, train_set, validation, micro_batch, device, preprocess)
    state = restore(resume, optimization, rank, world, main_process) if resume is not None else RunState()
    saver = CheckpointSaver(out_dir, main_process, resume_path, state.step)
    checkpoint = partial(checkpoint_state, model, optimization, state, identity, args, list(train_set.classes))
    writer = SummaryWriter(str(out_dir)) if main_process else None
    started = time.time() - state.seconds

    own_signals = threading.current_thread() is threading.main_thread()  # only the main thread may set them
    sigint = stop_at_first_interrupt() if own_signals else None
    try:
        with tqdm(total=args.num_steps, initial=state.step, disable=not main_process, desc=args.name,
                  dynamic_ncols=True) as progress:
            while state.step < args.num_steps:
                next_evaluation = min(args.num_steps, (state.step // args.eval_every + 1) * args.eval_every)
                stats = train_until(trained, data, optimization, state, next_evaluation, LOG_EVERY, progress)
                evaluation = evaluate(model, val_loader, optimization.precision, skipped=state.skipped_val)
                averaged = evaluate_average(optimization, val_loader)
                improved = record_evaluation(state, evaluation, averaged)
                if main_process:
                    log_to_tensorboard(writer, stats, evaluation, state.step, averaged)
                    progress.write(evaluation_line(state, evaluation, averaged))
                state.seconds = time.time() - started
                saver.save(checkpoint, state.step, improved)
        state.seconds = time.time() - started
        results = results_of(args, model, state, device)
        if main_process:
            writer.close()
            write_results(results, out_dir, saver)
            run_folder.release()
    except FloatingPointError as error:
        raise FloatingPointError(f"{error}; {saver.where_to_continue()}") from None
    except KeyboardInterrupt:  # the process is stopping: later SIGINTs stay ignored
        raise saver.interrupted(state.step) from None
    if own_signals:
        signal.signal(signal.SIGINT, sigint)
    del trained  # before its process group: torch 2.11 with gloo hung at exit in most 4-process runs
    dist_util.cleanup()
    return results


if __name__ == '__main__':
    command_line(main, 'train.py', expected=(ValueError, OSError, FloatingPointError, UnreadableImage),
                 interrupted="interrupted before the first training step; this run wrote no checkpoint")
