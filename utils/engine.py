"""Training up to the next evaluation, evaluation, mixed precision and the measurements train.py logs.

The engine trains and measures and returns what it measured; train.py decides when to evaluate, logs and saves."""
import math
import resource
import time
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from utils import dist_util
from utils.errors import raise_lost_interrupt

# apex's opt levels and their native torch.amp equivalents (apex is unmaintained).
OPT_LEVELS = {
    'O0': 'float32: no autocast, no loss scaling',
    'O1': 'autocast (per-op casting, float32 master weights); fp16 adds loss scaling',
    'O2': "the same as O1: native autocast replaces apex's 'almost fp16' model casting",
    'O3': 'weights and activations cast to the low-precision dtype, no loss scaling: a speed baseline only',
}


@dataclass
class Precision:
    """How a step runs in reduced precision: autocast dtype, whole-model cast (O3) and the loss scaler."""
    device_type: str
    dtype: torch.dtype | None = None  # None: float32 throughout
    cast_model: bool = False
    scaler: torch.amp.GradScaler | None = None
    static_scale: float | None = None  # a fixed loss scale, kept even after an overflowing step

    @classmethod
    def from_args(cls, fp16: bool, opt_level: str, amp_dtype: str, loss_scale: float,
                  device: torch.device) -> 'Precision':
        """`--fp16 --fp16_opt_level --amp_dtype --loss_scale` as native torch.amp settings (see OPT_LEVELS).

        fp16 autocast gets a GradScaler: dynamic when `loss_scale` is 0 (start at 2^16, halve on overflow,
        double after 2000 good steps), fixed at `loss_scale` otherwise. bf16 has float32's range and needs none.
        """
        if opt_level not in OPT_LEVELS:
            raise ValueError(f"unknown fp16_opt_level {opt_level!r}; expected one of {sorted(OPT_LEVELS)}")
        if not fp16 or opt_level == 'O0':
            return cls(device.type)
        dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}[amp_dtype]
        if opt_level == 'O3':
            return cls(device.type, dtype, cast_model=True)
        if dtype == torch.bfloat16:
            return cls(device.type, dtype)
        static_scale = float(loss_scale) if loss_scale > 0 else None
        scaler = torch.amp.GradScaler(device.type, init_scale=static_scale or 2.0 ** 16, growth_interval=2000)
        return cls(device.type, dtype, scaler=scaler, static_scale=static_scale)

    @property
    def model_dtype(self) -> torch.dtype:
        return self.dtype if self.cast_model else torch.float32

    def autocast(self):
        if self.dtype is None or self.cast_model:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters, max_grad_norm: float) -> None:
        """Unscale, clip the global gradient norm (0 = no clipping), step, update the loss scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when the gradients overflowed
            self.scaler.update(self.static_scale)
        else:
            optimizer.step()


@dataclass
class RunState:
    """Where a run stands: saved in every checkpoint, restored on resume."""
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps done in this epoch
    best_acc: float = 0.0
    final_acc: float | None = None
    seconds: float = 0.0
    val_images: int = 0  # images counted by the last evaluation
    ema_best_acc: float = 0.0  # --model_ema: the weight average's accuracies
    ema_final_acc: float | None = None
    # Indices of the unreadable files skipped (--skip_corrupt) by any process: each file counts once.
    skipped_train: list[int] = field(default_factory=list)
    skipped_val: list[int] = field(default_factory=list)

    @property
    def skipped_images(self) -> int:
        return len(self.skipped_train) + len(self.skipped_val)


def add_skipped(known: list[int], local: list[int]) -> None:
    """Add to `known` (in place) the skipped file indices that any process saw, `local` being this process's."""
    for indices in dist_util.all_gather_objects(local):
        known.extend(sorted(set(indices) - set(known)))


@dataclass
class TrainingData:
    """The training loader, placed at an epoch and an optimizer step within it: the order of the samples is a
    function of (seed, epoch), so a run continues mid-epoch exactly where it stopped."""
    # Its sampler and dataset have `set_epoch` (utils.data_utils.ShardedSampler, Augmented), or its dataset places
    # itself (utils.shards.TrainingShards: set_epoch(epoch, start)).
    loader: DataLoader
    samples_per_step: int  # this process's samples per optimizer step: micro-batch x accumulation steps

    def at(self, epoch: int, epoch_step: int) -> DataLoader:
        start = epoch_step * self.samples_per_step
        if hasattr(self.loader.sampler, 'set_epoch'):
            self.loader.sampler.set_epoch(epoch, start=start)
            self.loader.dataset.set_epoch(epoch)
        else:
            self.loader.dataset.set_epoch(epoch, start=start)
        return self.loader


@dataclass
class Optimization:
    """What an optimizer step needs besides the model and the data."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    accumulation: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 0.0  # 0: no clipping
    tau: Callable[[int], float] | None = None  # hard routing: the Gumbel-softmax temperature of a step
    # The recipe's parts (utils/recipes.py): the loss against the targets; mixup/cutmix as
    # `mix(images, labels, step) -> (images, soft targets)`; timm's EMA of the weights, updated after every step.
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    mix: Callable | None = None
    ema: Any = None  # timm.utils.ModelEmaV3


@dataclass
class TrainStats:
    """What `train_until` did, for train.py to log: `logs` holds (step, scalars) every `log_every` steps."""
    logs: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    steps: int = 0
    loss: float = math.nan  # the last step's mean loss


def train_until(model: torch.nn.Module, data: TrainingData, optimization: Optimization, state: RunState,
                until: int, log_every: int = 10, progress=None) -> TrainStats:
    """Optimizer steps from `state.step` up to step `until`, over as many epochs as that takes.

    Every `log_every` steps and at `until` it records the loss, learning rate, throughput, peak memory,
    temperature (hard routing) and mean routing weights; `progress` (a tqdm bar) is moved on every step.
    """
    stats, meter = TrainStats(), Throughput()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    images_per_step = data.samples_per_step * dist_util.get_world_size()
    while state.step < until:
        epoch_ended = True
        for loss, lr in optimizer_steps(model, data.at(state.epoch, state.epoch_step), optimization, state):
            raise_lost_interrupt()
            stats.steps, stats.loss = stats.steps + 1, loss
            meter.count(images_per_step)
            if progress is not None:
                progress.update(1)
            if state.step % log_every == 0 or state.step == until:
                scalars = step_scalars(module, loss, lr, meter.rate(), optimization, state.step)
                stats.logs.append((state.step, scalars))
                if progress is not None:
                    progress.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.2e}',
                                         img_s=f"{scalars['train/images_per_second']:.1f}")
            if state.step >= until:
                epoch_ended = False
                break
        if epoch_ended:
            state.epoch, state.epoch_step = state.epoch + 1, 0
    return stats


def step_scalars(model: torch.nn.Module, loss: float, lr: float, images_per_second: float,
                 optimization: Optimization, step: int) -> dict[str, float]:
    """The training scalars logged after `step` (routing weights are the last micro-batch's)."""
    device = next(model.parameters()).device
    scalars = {'train/loss': loss, 'train/lr': lr, 'train/images_per_second': images_per_second,
               'train/peak_memory_mib': peak_memory_mib(device)}
    if optimization.tau is not None:
        scalars['train/tau'] = optimization.tau(step - 1)
    return {**scalars, **routing_scalars(model)}


def optimizer_steps(model: torch.nn.Module, loader, optimization: Optimization, state: RunState):
    """Yield (mean loss, learning rate) after each optimizer step over the rest of this epoch's micro-batches.

    Each step sums the gradients of `accumulation` micro-batches, each loss divided by `accumulation`
    (DDP averages over processes and synchronises on the last micro-batch only), so the step's gradient
    is the mean over the global batch however it is split. Then: unscale, clip, optimizer, scheduler.
    The loss is the global batch's mean, the learning rate the step's own. `state.skipped_train` lists the
    files skipped by all processes; a global batch of only unreadable files stops the run with a ValueError
    (it would train on nothing).
    """
    distributed = isinstance(model, DistributedDataParallel)
    module = model.module if distributed else model
    device = next(model.parameters()).device
    opt, accumulation = optimization, optimization.accumulation
    # Over processes: loss sum, readable images, newly skipped files.
    step_totals = torch.zeros(3, device=device, dtype=torch.float64)
    step_skipped: list[int] = []
    model.train()
    for micro_step, (images, labels, skipped) in enumerate(loader, start=1):
        if opt.tau is not None and (micro_step - 1) % accumulation == 0:  # a step's first micro-batch
            module.set_tau(opt.tau(state.step))
        new = [index for index in skipped if index not in state.skipped_train]
        step_skipped += new
        step_totals[1] += len(labels)  # Python numbers: no host-to-device copy on the training path
        step_totals[2] += len(new)
        last_micro = micro_step % accumulation == 0
        with model.no_sync() if distributed and not last_micro else nullcontext():
            loss = micro_batch_loss(model, images, labels, opt.precision, device, opt.criterion,
                                    None if opt.mix is None else partial(opt.mix, step=state.step))
            opt.precision.backward(loss / accumulation)
        step_totals[0] += loss.detach()
        if not last_micro:
            continue
        loss_sum, readable, newly_skipped = dist_util.all_reduce_sum(step_totals).tolist()
        step_totals.zero_()
        if newly_skipped:
            add_skipped(state.skipped_train, step_skipped)
        step_skipped = []
        if not readable:
            raise ValueError(f"step {state.step + 1}: no image of its global batch could be read (all skipped by "
                             "--skip_corrupt): expected readable training images")
        mean_loss = loss_sum / (accumulation * dist_util.get_world_size())
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"non-finite loss {mean_loss} at step {state.step + 1}")
        lr = opt.optimizer.param_groups[0]['lr']  # this step's: the scheduler moves on to the next one's
        opt.precision.step(opt.optimizer, model.parameters(), opt.max_grad_norm)
        opt.scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
        state.step, state.epoch_step = state.step + 1, state.epoch_step + 1
        if opt.ema is not None:
            opt.ema.update(module, step=state.step)
        yield mean_loss, lr


def micro_batch_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: Precision,
                     device: torch.device, criterion: Callable = F.cross_entropy,
                     mix: Callable | None = None) -> torch.Tensor:
    """The loss (`criterion`, cross-entropy by default) of one micro-batch, mixed by `mix` if given; one whose files
    were all skipped gives a zero-weighted stand-in, which keeps DDP's processes in step."""
    images = images.to(device=device, dtype=precision.model_dtype, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    weight = 1.0
    if len(labels) == 0:
        images, labels, weight = images.new_zeros((1, *images.shape[1:])), labels.new_zeros(1), 0.0
    if mix is not None:
        images, labels = mix(images, labels)
    with precision.autocast():
        logits = model(images)
    return criterion(logits.float(), labels) * weight


@dataclass
class Evaluation:
    """What `evaluate` measures over a validation set (every process's shard together)."""
    accuracy: float  # top-1
    top5: float  # the true class among the 5 highest logits (among all of them when there are fewer)
    loss: float  # mean cross-entropy
    images: int
    routing: list[list[float]] | None = None  # routed models: mean routing weight per layer and order


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, precision: Precision,
             skipped: list[int] | None = None) -> Evaluation:
    """Top-1 and top-5 accuracy, mean loss, number of images and (routed models) mean routing weights.

    Each process evaluates its shard; the sums are reduced over processes, so every image counts once.
    `skipped`, if given, gets the indices of the unreadable files that any process skipped, each once.
    """
    model.eval()
    device = next(model.parameters()).device
    routed = getattr(model, 'is_routed', False)
    routing_shape = (model.config.transformer.num_layers, len(model.config.transformer.orders)) if routed else (0, 0)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 correct, top-5 correct, count, loss sum
    routing = torch.zeros(routing_shape, dtype=torch.float64, device=device)  # summed over images
    local_skipped = []
    for images, labels, batch_skipped in loader:
        if skipped is not None:
            local_skipped += batch_skipped
        if len(labels) == 0:  # every file of this batch was skipped
            continue
        images = images.to(device=device, dtype=precision.model_dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        totals[0] += (top[:, 0] == labels).sum()
        totals[1] += (top == labels[:, None]).any(dim=-1).sum()
        totals[2] += len(labels)
        totals[3] += F.cross_entropy(logits, labels, reduction='sum')
        if routed:
            routing += model.routing_weights().double().sum(dim=1)  # (layers, batch, orders) -> (layers, orders)
    dist_util.all_reduce_sum(totals)
    dist_util.all_reduce_sum(routing)
    if skipped is not None:
        add_skipped(skipped, local_skipped)
    model.train()
    correct, correct5, count, loss_sum = totals.tolist()
    if count == 0:
        raise ValueError("the validation set has no readable images")
    return Evaluation(correct / count, correct5 / count, loss_sum / count, int(count),
                      (routing / count).tolist() if routed else None)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak memory allocated to tensors; CPU: peak resident set size of this process (ru_maxrss)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Throughput:
    """Images per second since the last reading (or `reset`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def count(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.reset()
        return rate


def routing_scalars(model: torch.nn.Module) -> dict[str, float]:
    """Mean routing weight of every layer and order over the last batch, as `routing/layerLL_orderO`."""
    weights = model.routing_weights() if hasattr(model, 'routing_weights') else None
    if weights is None:
        return {}
    orders = model.config.transformer.orders
    return {f'routing/layer{layer:02d}_order{order}': weight
            for layer, per_order in enumerate(weights.float().mean(dim=1).tolist())
            for order, weight in zip(orders, per_order)}
