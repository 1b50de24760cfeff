"""Datasets, transforms and the resumable sharded sampler.

Datasets: `cifar10`, `cifar100` (torchvision), `imagenet` (ImageFolder trees `train/` and `val/` under
`--data_dir`) and `digits`, the handwritten-digits set inside scikit-learn's wheel (real data, offline).

Augmentation randomness is a function of (seed, epoch, sample index) only, so it does not change with
`--num_workers` or the number of processes, and a resumed run sees the same augmented images.
"""
import logging
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms

from utils.errors import one_line

DATASETS = ('cifar10', 'cifar100', 'imagenet', 'digits')
AUGMENTS = ('flip', 'crop', 'none')
CROP_SCALE = {'flip': (0.05, 1.0), 'crop': (0.5, 1.0)}
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
IMAGENET_NAMES = Path(__file__).parent / 'imagenet_classes.txt'
# torchvision reads them from the downloaded data; these need none.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

logger = logging.getLogger(__name__)


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, 16-bit I;16, 32-bit I or F) to 8-bit RGB."""
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith('I;16') or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert('RGB')


def get_eval_transform(img_size: int) -> Callable:
    """The evaluation transform (also what test.py uses): RGB, resize, [-1, 1] normalisation."""
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize((img_size, img_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ])


def get_train_transform(img_size: int, augment: str) -> Callable:
    """The training transform.

    `flip`: ViT fine-tuning's random resized crop (scale 0.05-1) and horizontal flip, as the original code;
    `crop`: a milder random resized crop (scale 0.5-1) without the flip, for images whose mirror image is
    another class (digits, text); `none`: the evaluation transform.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
    if augment == 'none':
        return get_eval_transform(img_size)
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.RandomResizedCrop((img_size, img_size), scale=CROP_SCALE[augment]),
        *([transforms.RandomHorizontalFlip()] if augment == 'flip' else []),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ])


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed train/val split of scikit-learn's 1797 digits: (images uint8 (n, 8, 8), labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_x, val_x, train_y, val_y = train_test_split(
        images, digits.target, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
    return (train_x, train_y) if split == 'train' else (val_x, val_y)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as 8x8 grayscale PIL images, labels 0-9."""

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str):
        self.images, self.targets = digits_split(split)

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode='L'), int(self.targets[index])


class ImageFiles(Dataset):
    """An ImageFolder tree read with clear errors: a corrupt file names itself, or is skipped.

    `classes` are readable names (ImageNet-1k's for its WNID folders), `folders` the folder names.
    """

    def __init__(self, root: Path, skip_corrupt: bool):
        folder = datasets.ImageFolder(str(root))
        self.root, self.samples, self.skip_corrupt = root, folder.samples, skip_corrupt
        self.folders = folder.classes  # the class folder names, sorted: label i is folders[i]
        self.classes = imagenet_names(folder.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image | None, int]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                image.load()
                return image.copy(), target
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            if not self.skip_corrupt:
                raise UnreadableImage(f"cannot read image {path}: {error} "
                                      "(use --skip_corrupt to skip such files)") from None
            logger.warning("skipping unreadable image %s: %s", path, error)
            return None, target


class TorchvisionImages(Dataset):
    """A torchvision dataset (CIFAR) exposed through `load`."""

    def __init__(self, dataset):
        self.dataset, self.classes = dataset, dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self.dataset[index]


class Augmented(Dataset):
    """Applies a transform with randomness seeded by (seed, epoch, index); yields None for skipped files."""

    def __init__(self, source: Dataset, transform: Callable, seed: int):
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        image, target = self.source.load(index)
        if image is None:
            return None
        # torchvision's random transforms draw from torch's CPU generator: seed it for this sample only
        # (not torch.manual_seed, which would also reseed the CUDA generators that dropout uses).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.transform(image), target


def collate_skipping_none(batch: list, image_shape: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack (image, label) pairs, dropping the None of skipped files: (images, labels, number skipped).

    A batch whose files were all skipped gives an empty (0, *image_shape) tensor; the training loop then
    runs a zero-weighted stand-in, so every process still takes part in DDP's gradient reduction.
    """
    kept = [item for item in batch if item is not None]
    images = torch.stack([image for image, _ in kept]) if kept else torch.zeros((0, *image_shape))
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return images, labels, len(batch) - len(kept)


def imagenet_1k_names() -> list[str]:
    """ImageNet-1k's 1000 readable class names (tench, goldfish, ...) in the standard class index order."""
    return IMAGENET_NAMES.read_text().splitlines()


def imagenet_names(classes: list[str]) -> list[str]:
    """Readable names for ImageNet-1k's 1000 WNID folders (n01440764, ...), whose sorted order is the
    standard class index order; any other folder names are kept as they are."""
    if len(classes) == 1000 and all(re.fullmatch(r'n\d{8}', name) for name in classes):
        return imagenet_1k_names()
    return list(classes)


def check_same_classes(train: Dataset, val: Dataset) -> None:
    """Raise a one-line error unless two ImageFolder splits have the same class folders, so that a label
    means the same class in both (the other datasets fix their classes)."""
    if not isinstance(train, ImageFiles) or train.folders == val.folders:
        return
    only_train = sorted(set(train.folders) - set(val.folders))
    only_val = sorted(set(val.folders) - set(train.folders))
    first = f"{only_train[0]!r} is only in {train.root}" if only_train else f"{only_val[0]!r} is only in {val.root}"
    raise ValueError(f"{val.root} has {len(val.folders)} classes and {train.root} {len(train.folders)}: "
                     f"expected the same class folders, but {first}")


def _cifar(name: str, data_dir: Path, train: bool):
    cls = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100
    try:
        return cls(str(data_dir), train=train, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError or OSError offline
        folder = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
        raise FileNotFoundError(
            f"{name} is not in {data_dir / folder} and could not be downloaded ({one_line(error)}); download "
            f"{cls.url} and extract it into {data_dir}") from None


def load_split(dataset: str, data_dir: str, train: bool, skip_corrupt: bool = False) -> Dataset:
    """The raw (untransformed) split of a dataset, with `.classes` and `.load(index) -> (PIL image, label)`."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if dataset == 'digits':
        return DigitsDataset('train' if train else 'val')
    root = Path(data_dir)
    if dataset == 'imagenet':
        folder = root / ('train' if train else 'val')
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet folder {folder} is missing; expected ImageFolder trees "
                                    f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (from image-net.org)")
        return ImageFiles(folder, skip_corrupt)
    return TorchvisionImages(_cifar(dataset, root, train))


def class_names(dataset: str, data_dir: str = './data') -> list[str]:
    """Class names in label order; CIFAR-100's need the data (downloaded if missing)."""
    if dataset == 'digits':
        return list(DigitsDataset.classes)
    if dataset == 'cifar10':
        return list(CIFAR10_CLASSES)
    if dataset == 'imagenet':
        folder = Path(data_dir) / 'val'
        if folder.is_dir():
            return imagenet_names(datasets.ImageFolder(str(folder)).classes)
        return imagenet_1k_names()
    return list(load_split(dataset, data_dir, train=False).classes)


class ShardedSampler(Sampler):
    """A (seed, epoch)-shuffled order of a dataset, split across processes and resumable mid-epoch.

    Every epoch has `steps * batch_per_step` indices in all; process `rank` takes every
    `world_size`-th of them. So step s of epoch e uses the same global batch whatever the number of
    processes or accumulation steps, and `set_epoch(e, start)` skips the `start` samples this
    process already used.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.steps_per_epoch = size // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {size} samples, fewer than one global batch of {global_batch}")
        self.per_rank = self.steps_per_epoch * global_batch // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        mine = order[:self.per_rank * self.world_size][self.rank::self.world_size]
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
