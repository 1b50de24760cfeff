"""Fine-tune a Vision Transformer with TRAR routed attention spans.

    python train.py --name cifar10-trar --dataset cifar10 --pretrained_dir checkpoint/ViT-B_16.npz
    torchrun --nproc_per_node 8 train.py --name imagenet-trar --dataset imagenet --data_dir /path/to/imagenet ...

`--train_batch_size` is the global batch: each process runs micro-batches of
global / (processes x accumulation steps), so 8 processes and 1 process with 8 accumulation steps
train the same model. The last line on stdout is a JSON summary, also written to results.json.
"""
import argparse
import ast
import json
import math
import random
import signal
import sys
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
from model.modeling import VisionTransformer
from utils import checkpoint as checkpoints
from utils import dist_util
from utils.data_utils import (AUGMENTS, DATASETS, Augmented, ShardedSampler, UnreadableImage, check_same_classes,
                              collate_skipping_none, get_eval_transform, get_train_transform, load_split)
from utils.engine import (OPT_LEVELS, Precision, RunState, Throughput, evaluate, log_routing, peak_memory_mib,
                          train_one_epoch)
from utils.errors import (RunError, exit_with, interrupts_deferred, one_line, raise_lost_interrupt,
                          stop_at_first_interrupt)
from utils.files import RunFolder, describe, write_atomic
from utils.scheduler import DECAY_TYPES, TAU_POLICIES, build_scheduler, tau_at

OFFICIAL_URL = 'https://storage.googleapis.com/vit_models/imagenet21k/{}.npz'
OFFICIAL_MODELS = ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14')
# Arguments that shape the trajectory: resuming with other values continues, but not exactly.
TRAJECTORY_ARGS = ('dataset', 'seed', 'train_batch_size', 'learning_rate', 'weight_decay', 'num_steps', 'decay_type',
                   'warmup_steps', 'max_grad_norm', 'augment', 'tau_policy', 'fp16', 'fp16_opt_level', 'amp_dtype')


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--name', required=True, help='name of this run: outputs go to <output_dir>/<name>/')
    p.add_argument('--dataset', choices=DATASETS, default='cifar10')
    p.add_argument('--data_dir', default='./data', help='dataset root (imagenet: train/ and val/ below it)')
    p.add_argument('--model_type', choices=sorted(CONFIGS), default='ViT-B_16')
    p.add_argument('--pretrained_dir', default='checkpoint/ViT-B_16.npz',
                   help="weights to start from: Google .npz, timm .safetensors/.pth/.bin, a ViT-pytorch state dict "
                        "or a train.py checkpoint (new fine-tune, fresh head); 'none' trains from scratch")
    p.add_argument('--output_dir', default='output')
    p.add_argument('--img_size', type=int, default=224)
    p.add_argument('--train_batch_size', type=int, default=512, help='global batch size over all processes')
    p.add_argument('--eval_batch_size', type=int, default=64, help='per-process evaluation batch size')
    p.add_argument('--eval_every', type=int, default=100, help='evaluate and checkpoint every this many steps')
    p.add_argument('--learning_rate', type=float, default=3e-2, help='SGD (momentum 0.9) peak learning rate')
    p.add_argument('--weight_decay', type=float, default=0.0)
    p.add_argument('--num_steps', type=int, default=10000, help='optimizer steps in all')
    p.add_argument('--decay_type', choices=DECAY_TYPES, default='cosine')
    p.add_argument('--warmup_steps', type=int, default=500)
    p.add_argument('--max_grad_norm', type=float, default=1.0, help='global gradient-norm clip; 0 turns it off')
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
    p.add_argument('--augment', choices=AUGMENTS, default='flip')
    p.add_argument('--tau_policy', choices=TAU_POLICIES, default='slow', help='temperature schedule of hard routing')
    p.add_argument('--skip_corrupt', action='store_true', help='skip unreadable images with a warning and a count')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (training and evaluation)')
    p.add_argument('--local_rank', '--local-rank', type=int, default=-1,
                   help='ignored (torchrun sets LOCAL_RANK); accepted for torch.distributed.launch')
    args = p.parse_args(argv)
    if args.loss_scale < 0 or (args.loss_scale > 0 and not math.log2(args.loss_scale).is_integer()):
        p.error(f"--loss_scale {args.loss_scale:g}: expected 0 (dynamic) or a power of two")
    for flag in ('img_size', 'train_batch_size', 'eval_batch_size', 'eval_every', 'num_steps',
                 'gradient_accumulation_steps'):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    for flag in ('warmup_steps', 'num_workers', 'max_grad_norm', 'weight_decay', 'learning_rate'):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} {getattr(args, flag)}: expected a non-negative number")
    if args.warmup_steps >= args.num_steps:
        p.error(f"--warmup_steps {args.warmup_steps}: expected fewer than --num_steps {args.num_steps}")
    if args.amp_dtype is not None and not args.fp16:
        p.error(f"--amp_dtype {args.amp_dtype} takes effect only with --fp16: expected --fp16 --amp_dtype "
                f"{args.amp_dtype}, or no --amp_dtype for float32")
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
    config = get_config(args.model_type)
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
    return validate_config(config)


def read_pretrained(args: argparse.Namespace) -> pretrained_weights.Pretrained | None:
    """The weights to start from (any layout model/pretrained.py reads); None for --pretrained_dir 'none' or empty."""
    if args.pretrained_dir in (None, '', 'none'):
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


def warn_if_trajectory_changes(saved: dict, args: argparse.Namespace) -> None:
    changed = [f"--{key} {saved.get(key)!r} -> {getattr(args, key)!r}" for key in TRAJECTORY_ARGS
               if key in saved and saved[key] != getattr(args, key)]
    if changed:
        print("warning: resuming with other settings, the run will not match an uninterrupted one: "
              + ', '.join(changed), file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    device = dist_util.init_distributed(args.device)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    main_process = rank == 0
    accumulation = args.gradient_accumulation_steps
    if args.train_batch_size % (world * accumulation):
        raise ValueError(f"--train_batch_size {args.train_batch_size} is not divisible by {world} processes x "
                         f"{accumulation} accumulation steps")
    micro_batch = args.train_batch_size // (world * accumulation)
    if args.fp16 and device.type == 'cpu' and main_process:
        print("warning: --fp16 on a CPU: autocast there runs slower than float32; it is for trying mixed "
              "precision out, not for speed", file=sys.stderr)
    config = build_config(args)
    # The run folder is checked and locked before anything slow; every process stops if it is refused.
    out_dir = Path(args.output_dir) / args.name
    run_folder, refused = None, None
    if main_process:
        try:
            run_folder = RunFolder(out_dir, args.resume_path, args.overwrite)
        except ValueError as error:
            refused = error
    dist_util.raise_first_error(refused)
    pretrained = None if args.resume_path else read_pretrained(args)  # read before the data is scanned
    seed_everything(args.seed + rank)

    # Data and model.
    train_images = load_split(args.dataset, args.data_dir, True, args.skip_corrupt)
    val_images = load_split(args.dataset, args.data_dir, False, args.skip_corrupt)
    check_same_classes(train_images, val_images)
    train_set = Augmented(train_images, get_train_transform(args.img_size, args.augment), args.seed)
    val_set = Augmented(val_images, get_eval_transform(args.img_size), args.seed)
    num_classes = len(train_set.classes)
    model = VisionTransformer(config, img_size=args.img_size, num_classes=num_classes, zero_head=True)
    identity = {'model_type': args.model_type, 'img_size': args.img_size, 'num_classes': num_classes,
                'config': config.to_dict()}
    resume = checkpoints.load(args.resume_path, checkpoints.RESUME_KEYS) if args.resume_path else None
    if resume is not None:
        checkpoints.check_compatible({**resume, 'config': with_added_fields(resume['config'])}, identity)
        model.load_state_dict(resume['state_dict'])
        if main_process:
            warn_if_trajectory_changes(resume.get('args', {}), args)
    elif pretrained is not None:
        pretrained_weights.load_pretrained(model, pretrained)
        if pretrained.layout == 'train.py' and main_process:
            print(f"note: {pretrained.path} is a train.py checkpoint: its weights start a new fine-tune with a fresh "
                  f"head; to continue that run instead, pass --resume_path {pretrained.path}", file=sys.stderr)

    # Optimisation.
    precision = Precision.from_args(args.fp16, args.fp16_opt_level, args.amp_dtype, args.loss_scale, device)
    model.to(device=device, dtype=precision.model_dtype)
    if args.compile:
        model.compile()  # in place: the state dict keeps its keys, DDP wraps the compiled module
    ddp_model = model
    if world > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9,
                                weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, args.decay_type, args.warmup_steps, args.num_steps)
    routed_hard = model.is_routed and config.transformer.routing == 'hard'

    def tau(step: int) -> float:
        return tau_at(step, args.num_steps, args.warmup_steps, config.transformer.tau_max,
                      config.transformer.tau_min, args.tau_policy)

    # Loaders: the training order is a function of (seed, epoch), resumable mid-epoch; validation
    # is split into disjoint shards, so every image is counted exactly once.
    sampler = ShardedSampler(len(train_set), args.train_batch_size, rank, world, args.seed)
    collate = partial(collate_skipping_none, image_shape=(3, args.img_size, args.img_size))
    loader_options = dict(num_workers=args.num_workers, collate_fn=collate, pin_memory=device.type == 'cuda')
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, drop_last=True,
                              generator=torch.Generator(), **loader_options)
    val_loader = DataLoader(val_set, batch_size=args.eval_batch_size, sampler=range(rank, len(val_set), world),
                            generator=torch.Generator(), **loader_options)

    state = RunState()
    if resume is not None:
        optimizer.load_state_dict(resume['optimizer'])
        scheduler.load_state_dict(resume['scheduler'])
        if precision.scaler is not None and resume.get('scaler'):
            precision.scaler.load_state_dict(resume['scaler'])
        state = RunState(**{field: resume[field] for field in RunState.__dataclass_fields__ if field in resume})
        if len(resume['rng']) == world:
            checkpoints.set_rng_state(resume['rng'][rank])
        elif main_process:
            print(f"warning: the checkpoint was written by {len(resume['rng'])} processes, this run has {world}: "
                  "random states are not restored", file=sys.stderr)

    writer = SummaryWriter(str(out_dir)) if main_process else None
    seconds_before, start_time = state.seconds, time.time()
    meter = Throughput()
    good = {'path': args.resume_path, 'step': state.step}  # the checkpoint with the last good state

    def last_good_state() -> str:
        """Where a run that stops can be continued from, for its error message."""
        if good['path'] is None:
            return "no checkpoint was written yet"
        return f"{good['path']} holds the last good state (step {good['step']}): continue with --resume_path"

    def save(improved: bool) -> None:
        """last.ckpt (and best.ckpt when accuracy improved), with everything an exact resume needs.

        best.ckpt is written first, so that a kill between the two writes cannot leave a last.ckpt
        whose best_acc no best.ckpt on disk has. A Ctrl-C meanwhile stops the run once the write is recorded.
        """
        with interrupts_deferred():
            state.seconds = seconds_before + time.time() - start_time
            checkpoint = {
                'state_dict': model.state_dict(), **asdict(state), **identity, 'dataset': args.dataset,
                'class_names': list(train_set.classes), 'args': vars(args),
                'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'scaler': precision.scaler.state_dict() if precision.scaler is not None else None,
                'rng': dist_util.all_gather_objects(checkpoints.rng_state()),
            }
            failed = None
            if main_process:
                for name in ('best.ckpt', 'last.ckpt') if improved else ('last.ckpt',):
                    try:
                        checkpoints.save_atomic(checkpoint, out_dir / name)
                    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
                        reason = describe(error) if isinstance(error, OSError) else one_line(error)
                        failed = RunError(f"cannot write {out_dir / name}: {reason}; {last_good_state()}")
                        break
            dist_util.raise_first_error(failed)  # also the barrier: every process stops when the write failed
            good.update(path=str(out_dir / 'last.ckpt'), step=state.step)

    def after_step(loss: float, lr: float, progress: tqdm) -> None:
        """Log the step's loss and learning rate; every eval_every steps and at the end, evaluate and checkpoint."""
        raise_lost_interrupt()
        progress.update(1)
        meter.count(args.train_batch_size)
        if main_process and (state.step % 10 == 0 or state.step == args.num_steps):
            throughput = meter.rate()
            progress.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.2e}', img_s=f'{throughput:.1f}')
            scalars = {'train/loss': loss, 'train/lr': lr, 'train/images_per_second': throughput,
                       'train/peak_memory_mib': peak_memory_mib(device)}
            if routed_hard:
                scalars['train/tau'] = tau(state.step - 1)
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, state.step)
            log_routing(writer, model, state.step)
        if state.step % args.eval_every and state.step != args.num_steps:
            return
        evaluation = evaluate(model, val_loader, precision, skipped=state.skipped_val)
        accuracy, val_loss, state.val_images = evaluation.accuracy, evaluation.loss, evaluation.images
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"non-finite validation loss at step {state.step}")
        improved = accuracy > state.best_acc
        state.final_acc, state.best_acc = accuracy, max(state.best_acc, accuracy)
        if main_process:
            writer.add_scalar('val/accuracy', accuracy, state.step)
            writer.add_scalar('val/loss', val_loss, state.step)
            writer.add_scalar('val/top5', evaluation.top5, state.step)
            progress.write(f"step {state.step}: validation accuracy {accuracy:.4f} (best {state.best_acc:.4f})")
        save(improved)
        meter.reset()  # throughput counts training only

    own_signals = threading.current_thread() is threading.main_thread()  # only the main thread may set them
    sigint = stop_at_first_interrupt() if own_signals else None
    try:
        with tqdm(total=args.num_steps, initial=state.step, disable=not main_process, desc=args.name,
                  dynamic_ncols=True) as progress:
            while state.step < args.num_steps:
                sampler.set_epoch(state.epoch, start=state.epoch_step * args.train_batch_size // world)
                train_set.set_epoch(state.epoch)
                finished = train_one_epoch(
                    ddp_model, train_loader, optimizer, scheduler, precision, state, args.num_steps, accumulation,
                    args.max_grad_norm, on_step=lambda loss, lr: after_step(loss, lr, progress),
                    set_tau=(lambda step: model.set_tau(tau(step))) if routed_hard else None)
                if not finished:
                    state.epoch, state.epoch_step = state.epoch + 1, 0
    except FloatingPointError as error:
        raise FloatingPointError(f"{error}; {last_good_state()}") from None
    except KeyboardInterrupt:  # the process is stopping: later SIGINTs stay ignored
        raise RunError(f"interrupted at step {state.step}; {last_good_state()}", code=130) from None
    if own_signals:
        signal.signal(signal.SIGINT, sigint)

    results = {
        'name': args.name, 'model_type': args.model_type, 'orders': list(config.transformer.orders),
        'img_size': args.img_size, 'dataset': args.dataset, 'best_acc': state.best_acc, 'final_acc': state.final_acc,
        'steps': state.step, 'seconds': round(seconds_before + time.time() - start_time, 2),
        'peak_memory_mib': round(peak_memory_mib(device), 1),
        'peak_memory_kind': 'cuda_max_allocated' if device.type == 'cuda' else 'cpu_max_rss',
        'val_images': state.val_images, 'world_size': world, 'skipped_images': state.skipped_images,
    }
    if main_process:
        writer.close()
        try:
            write_atomic(out_dir / 'results.json', lambda tmp: tmp.write_text(json.dumps(results, indent=2) + '\n'))
        except OSError as error:
            raise RunError(f"cannot write {out_dir / 'results.json'}: {describe(error)}; {last_good_state()}") from None
        run_folder.release()
        if state.skipped_images:
            print(f"skipped {state.skipped_images} unreadable images", file=sys.stderr)
        print(json.dumps(results), flush=True)
    del ddp_model  # before its process group: torch 2.11 with gloo hung at exit in most 4-process runs
    dist_util.cleanup()
    return results


if __name__ == '__main__':
    try:
        main()
    except RunError as error:
        exit_with(one_line(error, limit=None), error.code)
    except KeyboardInterrupt:
        exit_with("interrupted before the first training step; this run wrote no checkpoint", 130)
    except (ValueError, OSError, FloatingPointError, UnreadableImage) as error:  # OSError: FileNotFoundError too
        exit_with(one_line(error, limit=None))
