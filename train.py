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
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from model.config import CONFIGS, get_config, parse_orders
from model.modeling import VisionTransformer
from utils import checkpoint as checkpoints
from utils import dist_util
from utils.data_utils import (AUGMENTS, DATASETS, Augmented, ShardedSampler, UnreadableImage, collate_skipping_none,
                              get_eval_transform, get_train_transform, load_split)
from utils.scheduler import DECAY_TYPES, TAU_POLICIES, build_scheduler, tau_at

OFFICIAL_URL = 'https://storage.googleapis.com/vit_models/imagenet21k/{}.npz'

# Native torch.amp equivalents of apex's opt levels (apex is unmaintained).
OPT_LEVELS = {
    'O0': 'float32: no autocast, no loss scaling',
    'O1': 'autocast (per-op casting, float32 master weights) with loss scaling for fp16',
    'O2': 'the same as O1: native autocast replaces apex\'s "almost fp16" model casting',
    'O3': 'weights and activations in the low-precision dtype, no loss scaling: a speed baseline only',
}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--name', required=True, help='name of this run: outputs go to <output_dir>/<name>/')
    p.add_argument('--dataset', choices=DATASETS, default='cifar10')
    p.add_argument('--data_dir', default='./data', help='dataset root (imagenet: train/ and val/ below it)')
    p.add_argument('--model_type', choices=sorted(CONFIGS), default='ViT-B_16')
    p.add_argument('--pretrained_dir', default='checkpoint/ViT-B_16.npz',
                   help="Google's official .npz checkpoint; 'none' trains from scratch")
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
    p.add_argument('--max_grad_norm', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--gradient_accumulation_steps', type=int, default=1)
    p.add_argument('--fp16', action='store_true', help='mixed precision with torch.amp')
    p.add_argument('--fp16_opt_level', choices=sorted(OPT_LEVELS), default='O2', help='; '.join(
        f'{level}: {meaning}' for level, meaning in OPT_LEVELS.items()))
    p.add_argument('--loss_scale', type=float, default=0, help='0: dynamic loss scaling; a power of two: static')
    p.add_argument('--amp_dtype', choices=('fp16', 'bf16'), default='fp16', help='bf16 needs no loss scaling')
    p.add_argument('--resume_path', default=None, help='a last.ckpt to continue exactly')
    p.add_argument('--num_workers', type=int, default=4)
    p.add_argument('--orders', default=None, help="span orders, e.g. '0,1,2', or 'none' for a plain ViT")
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config field, e.g. transformer.dropout_rate=0.0 (repeatable)')
    p.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    p.add_argument('--augment', choices=AUGMENTS, default='flip')
    p.add_argument('--tau_policy', choices=TAU_POLICIES, default='slow', help='temperature schedule of hard routing')
    p.add_argument('--skip_corrupt', action='store_true', help='skip unreadable images with a warning and a count')
    p.add_argument('--local_rank', type=int, default=-1, help=argparse.SUPPRESS)  # torchrun sets LOCAL_RANK
    args = p.parse_args(argv)
    if args.loss_scale < 0 or (args.loss_scale > 0 and not math.log2(args.loss_scale).is_integer()):
        p.error(f"--loss_scale {args.loss_scale:g}: expected 0 (dynamic) or a power of two")
    for flag in ('train_batch_size', 'eval_batch_size', 'eval_every', 'num_steps', 'gradient_accumulation_steps'):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    return args


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The named config with --orders and every --set KEY=VALUE applied."""
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
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(node[field], list) and isinstance(value, (tuple, int)):
            value = list(value) if isinstance(value, tuple) else [value]
        try:
            node[field] = value
        except TypeError as error:
            raise ValueError(f"--set {key}={text}: {error}") from None
    return config


def load_pretrained(model: VisionTransformer, args: argparse.Namespace) -> None:
    if args.pretrained_dir in (None, '', 'none'):
        return
    path = Path(args.pretrained_dir)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} is missing; download it from "
                                f"{OFFICIAL_URL.format(args.model_type)} or pass --pretrained_dir none")
    model.load_from(np.load(path))


def amp_setup(args: argparse.Namespace, device: torch.device):
    """(autocast context factory, GradScaler or None, dtype to cast the model to or None)."""
    if not args.fp16 or args.fp16_opt_level == 'O0':
        return nullcontext, None, None
    dtype = torch.bfloat16 if args.amp_dtype == 'bf16' else torch.float16
    if args.fp16_opt_level == 'O3':
        return nullcontext, None, dtype
    scaler = None
    if dtype == torch.float16:
        static = args.loss_scale > 0
        scaler = torch.amp.GradScaler(device.type, init_scale=args.loss_scale if static else 2.0 ** 16,
                                      growth_interval=2 ** 31 - 1 if static else 2000)
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, None


@torch.no_grad()
def evaluate(model: VisionTransformer, loader: DataLoader, device: torch.device, autocast) -> tuple[float, float]:
    """Top-1 accuracy and mean loss over this process's shard, summed over all processes."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, count, loss sum
    for images, labels, _ in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images.to(next(model.parameters()).dtype)).float()
        totals += torch.stack([(logits.argmax(-1) == labels).sum().double(), torch.tensor(len(labels), device=device,
                               dtype=torch.float64), F.cross_entropy(logits, labels, reduction='sum').double()])
    dist_util.all_reduce_sum(totals)
    model.train()
    correct, count, loss_sum = totals.tolist()
    return correct / count, loss_sum / count


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory; CPU: peak resident set size of this process."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_routing(writer: SummaryWriter, model: VisionTransformer, step: int) -> None:
    weights = model.routing_weights()
    if weights is None:
        return
    for layer, per_order in enumerate(weights.float().mean(dim=1).tolist()):
        for order, weight in zip(model.config.transformer.orders, per_order):
            writer.add_scalar(f'routing/layer{layer:02d}_order{order}', weight, step)


@dataclass
class RunState:
    """Where a run stands: saved in every checkpoint, restored on resume."""
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps done in this epoch
    best_acc: float = 0.0
    final_acc: float | None = None
    seconds: float = 0.0
    skipped_images: int = 0


class Throughput:
    """Images per second since the last reading."""

    def __init__(self):
        self.start, self.images = time.time(), 0

    def count(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        now = time.time()
        rate = self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return rate


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler,
                    scaler, autocast, args: argparse.Namespace, state: RunState, set_tau, after_step) -> bool:
    """Optimizer steps over the rest of this epoch's micro-batches; True once `num_steps` are done.

    Each step accumulates `gradient_accumulation_steps` micro-batches (DDP synchronises on the last one),
    then unscales, clips, steps the optimizer and then the scheduler.
    """
    accumulation = args.gradient_accumulation_steps
    distributed = isinstance(model, DistributedDataParallel)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    model.train()
    for micro_step, (images, labels, skipped) in enumerate(loader, start=1):
        if set_tau is not None:
            set_tau(state.step)
        state.skipped_images += skipped
        images = images.to(device=device, dtype=dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        last_micro = micro_step % accumulation == 0
        with model.no_sync() if distributed and not last_micro else nullcontext():
            with autocast():
                loss = F.cross_entropy(model(images).float(), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {state.step + 1}; the last good "
                                         f"checkpoint is {Path(args.output_dir) / args.name / 'last.ckpt'}")
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if not last_micro:
            continue
        if scaler is not None:
            scaler.unscale_(optimizer)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.epoch_step = state.step + 1, state.epoch_step + 1
        after_step(loss)
        if state.step >= args.num_steps:
            return True
    return False


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
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    config = build_config(args)
    train_set = Augmented(load_split(args.dataset, args.data_dir, True, args.skip_corrupt),
                          get_train_transform(args.img_size, args.augment), args.seed)
    val_set = Augmented(load_split(args.dataset, args.data_dir, False, args.skip_corrupt),
                        get_eval_transform(args.img_size), args.seed)
    model = VisionTransformer(config, img_size=args.img_size, num_classes=len(train_set.classes), zero_head=True)
    identity = {'model_type': args.model_type, 'img_size': args.img_size, 'num_classes': len(train_set.classes),
                'config': config.to_dict()}
    resume = checkpoints.load(args.resume_path) if args.resume_path else None
    if resume is not None:
        checkpoints.check_compatible(resume, identity)
        model.load_state_dict(resume['state_dict'])
    else:
        load_pretrained(model, args)

    autocast, scaler, cast_dtype = amp_setup(args, device)
    model.to(device=device, dtype=cast_dtype)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9,
                                weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, args.decay_type, args.warmup_steps, args.num_steps)

    sampler = ShardedSampler(len(train_set), args.train_batch_size, rank, world, args.seed)
    loader_options = dict(num_workers=args.num_workers, collate_fn=collate_skipping_none,
                          pin_memory=device.type == 'cuda', generator=torch.Generator())
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, drop_last=True, **loader_options)
    val_loader = DataLoader(val_set, batch_size=args.eval_batch_size, sampler=range(rank, len(val_set), world),
                            **loader_options)

    state = RunState()
    if resume is not None:
        optimizer.load_state_dict(resume['optimizer'])
        scheduler.load_state_dict(resume['scheduler'])
        if scaler is not None and resume.get('scaler'):
            scaler.load_state_dict(resume['scaler'])
        state = RunState(**{field: resume[field] for field in RunState.__dataclass_fields__})
        if len(resume['rng']) == world:
            checkpoints.set_rng_state(resume['rng'][rank])
        elif main_process:
            print(f"warning: checkpoint was written by {len(resume['rng'])} processes, this run has {world}: "
                  "random states are not restored", file=sys.stderr)

    out_dir = Path(args.output_dir) / args.name
    writer = None
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out_dir))
    routed_hard = model.is_routed and config.transformer.routing == 'hard'
    tau = lambda s: tau_at(s, args.num_steps, args.warmup_steps, config.transformer.tau_max,
                           config.transformer.tau_min, args.tau_policy)
    seconds_before, start_time = state.seconds, time.time()
    meter = Throughput()

    def save(improved: bool) -> None:
        state.seconds = seconds_before + time.time() - start_time
        checkpoint = {
            'state_dict': model.state_dict(), **asdict(state), **identity, 'dataset': args.dataset,
            'class_names': list(train_set.classes), 'args': vars(args),
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None,
            'rng': dist_util.all_gather_objects(checkpoints.rng_state()),
        }
        if main_process:
            checkpoints.save_atomic(checkpoint, out_dir / 'last.ckpt')
            if improved:
                checkpoints.save_atomic(checkpoint, out_dir / 'best.ckpt')
        dist_util.barrier()

    def after_step(loss: torch.Tensor, progress: tqdm) -> None:
        """Log, and every eval_every steps evaluate and checkpoint."""
        progress.update(1)
        meter.count(args.train_batch_size)
        if main_process and (state.step % 10 == 0 or state.step == args.num_steps):
            lr, throughput = scheduler.get_last_lr()[0], meter.rate()
            progress.set_postfix(loss=f'{loss.item():.4f}', lr=f'{lr:.2e}', img_s=f'{throughput:.1f}')
            scalars = {'train/loss': loss.item(), 'train/lr': lr, 'train/images_per_second': throughput,
                       'train/peak_memory_mib': peak_memory_mib(device)}
            if routed_hard:
                scalars['train/tau'] = tau(state.step)
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, state.step)
            log_routing(writer, model, state.step)
        if state.step % args.eval_every and state.step != args.num_steps:
            return
        accuracy, val_loss = evaluate(model, val_loader, device, autocast)
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"non-finite validation loss at step {state.step}; the last good "
                                     f"checkpoint is {out_dir / 'last.ckpt'}")
        improved = accuracy > state.best_acc
        state.final_acc, state.best_acc = accuracy, max(state.best_acc, accuracy)
        if main_process:
            writer.add_scalar('val/accuracy', accuracy, state.step)
            writer.add_scalar('val/loss', val_loss, state.step)
            progress.write(f"step {state.step}: validation accuracy {accuracy:.4f} (best {state.best_acc:.4f})")
        save(improved)

    with tqdm(total=args.num_steps, initial=state.step, disable=not main_process, desc=args.name,
              dynamic_ncols=True) as progress:
        while state.step < args.num_steps:
            sampler.set_epoch(state.epoch, start=state.epoch_step * args.train_batch_size // world)
            train_set.set_epoch(state.epoch)
            finished = train_one_epoch(ddp_model, train_loader, optimizer, scheduler, scaler, autocast, args, state,
                                       set_tau=(lambda step: model.set_tau(tau(step))) if routed_hard else None,
                                       after_step=lambda loss: after_step(loss, progress))
            if not finished:
                state.epoch, state.epoch_step = state.epoch + 1, 0

    if state.final_acc is None:  # resumed from the final checkpoint: nothing left to train
        state.final_acc, _ = evaluate(model, val_loader, device, autocast)
    results = {
        'name': args.name, 'model_type': args.model_type, 'orders': list(config.transformer.orders),
        'img_size': args.img_size, 'dataset': args.dataset, 'best_acc': state.best_acc,
        'final_acc': state.final_acc, 'steps': state.step, 'seconds': round(seconds_before + time.time() - start_time, 2),
        'peak_memory_mib': round(peak_memory_mib(device), 1),
        'peak_memory_kind': 'cuda_max_allocated' if device.type == 'cuda' else 'cpu_max_rss',
        'world_size': world, 'skipped_images': state.skipped_images,
    }
    if main_process:
        writer.close()
        (out_dir / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
        if state.skipped_images:
            print(f"skipped {state.skipped_images} unreadable images", file=sys.stderr)
        print(json.dumps(results), flush=True)
    dist_util.cleanup()
    return results


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, UnreadableImage) as error:
        message = str(error).strip().splitlines()[-1]  # errors from data-loading workers end with the cause
        sys.exit(f"error: {message.partition('UnreadableImage: ')[2] or message}")
