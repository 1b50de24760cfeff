"""The recipes' augmentations, all timm's: RandAugment/AutoAugment and random erasing per image (on the loader
workers), mixup/cutmix and label smoothing per batch, and the loss their soft targets need.

Resumable and reproducible: an image's augmentation depends only on (seed, epoch, index) and a batch's mixing
only on (seed, step), never on the state of a process, so a run resumed after a kill draws what it would have.
"""
import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torchvision import transforms

from utils.images import CROP_SCALE, Preprocess, to_rgb, train_pixels


def posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the black image Pillow gave before 13 refused 0 bits.

    RandAugment's `inc1` posterize keeps 4 - int(magnitude / 10 * 4) bits, 0 at magnitude 10, which
    `rand-m9-mstd0.5` draws for about 2% of its posterize ops: with Pillow 13 one such image stops a run.
    """
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


# timm's ops look their function up in NAME_TO_OP when a transform is built: every one built after this import
# posterizes through the function above
auto_augment.NAME_TO_OP.update({name: posterize for name, op in auto_augment.NAME_TO_OP.items()
                                if op is auto_augment.posterize})


def check_auto_augment(aa: str | None) -> None:
    """A one-line ValueError unless timm's transform factory accepts the auto-augment string `aa` (None: off)."""
    if aa is None:
        return
    try:
        create_transform(32, is_training=True, auto_augment=aa)
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"--aa {aa!r}: not an auto-augment string timm knows ({error or 'malformed'}); expected "
                         "e.g. rand-m9-mstd0.5-inc1 (RandAugment), original or v0 (AutoAugment), augmix-m5") from None


class SeededTransform:
    """Runs `transform` with Python's and numpy's global random states seeded from torch's CPU generator.

    timm's crop, RandAugment and random erasing draw from `random` (and numpy); `data_utils.Augmented` seeds
    only torch's generator for each image, by (seed, epoch, index). Seeding the other two from it makes the
    image's augmentation a function of that key too, in any worker; the caller's states are put back.
    """

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        seed = int(torch.randint(2 ** 31 - 1, (1,)).item())
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self) -> str:
        return f"SeededTransform({self.transform!r})"


def recipe_train_transform(img_size: int, augment: str, aa: str | None, reprob: float,
                           preprocess: Preprocess = Preprocess()) -> Callable:
    """timm's ImageNet training transform: random resized crop (bicubic), flip for `augment='flip'`, the
    auto-augment `aa`, the normalisation of `preprocess`, random erasing with probability `reprob` (per-pixel
    noise). Its float32 images pass through `DeviceBatches` as they are.

    `augment='crop'` keeps its milder crop and no flip; timm's crop scale (0.08-1) replaces `flip`'s 0.05-1.
    """
    check_auto_augment(aa)
    if augment not in CROP_SCALE:
        raise ValueError(f"--augment {augment!r} with --aa/--reprob: expected one of {sorted(CROP_SCALE)}")
    timm_transform = create_transform(
        img_size, is_training=True, scale=CROP_SCALE[augment] if augment == 'crop' else None,
        hflip=0.5 if augment == 'flip' else 0.0, color_jitter=None, auto_augment=aa, interpolation='bicubic',
        mean=preprocess.mean, std=preprocess.std, re_prob=reprob,
        re_mode='pixel', re_count=1)
    return SeededTransform(transforms.Compose([transforms.Lambda(to_rgb), timm_transform]))


def train_transform(img_size: int, augment: str, aa: str | None, reprob: float,
                    preprocess: Preprocess = Preprocess()) -> Callable:
    """timm's transform (`recipe_train_transform`) when --aa or --reprob is on, else the project's own uint8 one
    (`train_pixels`, normalised on the device)."""
    if aa is not None or reprob > 0:
        return recipe_train_transform(img_size, augment, aa, reprob, preprocess)
    return train_pixels(img_size, augment, preprocess)


def step_seed(seed: int, step: int) -> int:
    """A 32-bit seed for the mixing of optimizer step `step` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


class BatchMixup:
    """timm.data.Mixup (batch mode) whose draws depend on the optimizer step, not on how its batch is split.

    What holds for any split of a global batch over processes and accumulation steps: every micro-batch of
    step s draws the same decision (mix or not, mixup or cutmix), the same lambda and the same cutmix box, seeded
    by (seed, s) exactly as `timm.data.Mixup` draws them after `np.random.seed(step_seed(seed, s))`. What does not:
    timm pairs image i of a batch of n with image n-1-i, and each micro-batch pairs its own images, so the
    partners change with the split (pairing across micro-batches would need every process's images).
    A micro-batch of odd length (files skipped by --skip_corrupt) mixes all but its last image, whose target
    is its own label, smoothed.
    """

    def __init__(self, mixup: float, cutmix: float, prob: float, switch_prob: float, smoothing: float,
                 num_classes: int, seed: int):
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode='batch',
                           label_smoothing=smoothing, num_classes=num_classes)
        self.seed, self.num_classes, self.smoothing = seed, num_classes, smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images (in place) and soft targets (batch, num_classes) for optimizer step `step`."""
        targets = mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        even = len(labels) - len(labels) % 2
        if even:
            numpy_state = np.random.get_state()
            np.random.seed(step_seed(self.seed, step))
            try:
                _, targets[:even] = self.mixup(images[:even], labels[:even])
            finally:
                np.random.set_state(numpy_state)
        return images, targets


def build_mixup(mixup: float, cutmix: float, prob: float, switch_prob: float, smoothing: float, num_classes: int,
                seed: int, micro_batch: int) -> BatchMixup | None:
    """The batch mixing of a recipe, or None when mixup and cutmix are both off."""
    check_mixup_batch(mixup, cutmix, micro_batch)
    if mixup <= 0 and cutmix <= 0:
        return None
    return BatchMixup(mixup, cutmix, prob, switch_prob, smoothing, num_classes, seed)


def check_mixup_batch(mixup: float, cutmix: float, micro_batch: int) -> None:
    """A one-line ValueError when mixing is on and a micro-batch has no even number of images to pair."""
    if (mixup > 0 or cutmix > 0) and (micro_batch < 2 or micro_batch % 2):
        raise ValueError(f"--mixup {mixup} / --cutmix {cutmix} with micro-batches of {micro_batch} images: mixing "
                         "pairs the images of a micro-batch, expected an even number of at least 2 per process "
                         "and accumulation step")


def train_loss(mixing: bool, smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss: timm's soft-target cross-entropy under mixing, its label-smoothing one with smoothing
    alone, plain cross-entropy otherwise (the `vit` recipe, as before)."""
    if mixing:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return F.cross_entropy
