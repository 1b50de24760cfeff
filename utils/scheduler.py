"""Learning-rate schedules (linear warmup, then cosine or linear decay) and TRAR's temperature policies."""
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAY_TYPES = ('cosine', 'linear')
TAU_POLICIES = ('slow', 'fast', 'finetune')


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_type: str) -> float:
    """Multiplier of the base learning rate after `step` optimizer steps."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if decay_type == 'cosine':
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer: Optimizer, decay_type: str, warmup_steps: int, total_steps: int,
                    warmup_from: float = 0.0, decay_to: float = 0.0) -> LambdaLR:
    """Warmup then decay, stepped once per optimizer step (after `optimizer.step()`).

    The warmup starts from `warmup_from` and the decay ends at `decay_to`, as fractions of each group's peak lr
    (timm's warmup_lr_init and lr_min over the peak lr; 0 and 0 give `lr_factor` itself, bit for bit).
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"unknown decay_type {decay_type!r}; expected one of {DECAY_TYPES}")

    def factor(step: int) -> float:
        floor = warmup_from if step < warmup_steps else decay_to
        return floor + (1.0 - floor) * lr_factor(step, warmup_steps, total_steps, decay_type)

    return LambdaLR(optimizer, factor)


def tau_at(step: int, total_steps: int, warmup_steps: int, tau_max: float, tau_min: float, policy: str) -> float:
    """Gumbel-softmax temperature of hard routing for optimizer step `step` (0-based), after TRAR's policies.

    TRAR (TRAR-VQA's train engine) anneals once per epoch, and only its `slow` ramp ends at the last epoch
    (README, "Differences from the original TRAR code"); here the shapes are laid over the run's optimizer
    steps, every policy reaching tau_min at the last step:
    - slow: linear from tau_max to tau_min over the whole run;
    - fast: linear from tau_max to 1 during the warmup steps, then linear from 1 to tau_min;
    - finetune: for a model that already routes well (e.g. a continued run), linear from 1 to tau_min.
    """
    if policy not in TAU_POLICIES:
        raise ValueError(f"unknown tau policy {policy!r}; expected one of {TAU_POLICIES}")
    last = max(1, total_steps - 1)
    if policy == 'slow':
        return tau_max - (tau_max - tau_min) * min(1.0, step / last)
    if policy == 'fast' and step < warmup_steps:
        return tau_max - (tau_max - 1.0) * step / warmup_steps
    start = warmup_steps if policy == 'fast' else 0
    progress = min(1.0, (step - start) / max(1, last - start))
    return 1.0 - (1.0 - tau_min) * progress
