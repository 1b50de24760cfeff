"""Datasets, their seeded augmentation and the resumable sharded sampler.

Datasets: `cifar10`, `cifar100` (torchvision), `imagenet` (ImageFolder trees `train/` and `val/` under
`--data_dir`, read by utils/folders.py, or tar shards, utils/shards.py) and `digits`, the handwritten-digits set
inside scikit-learn's wheel (real data, offline).

Augmentation randomness is a function of (seed, epoch, sample index) only, so it does not change with
`--num_workers` or the number of processes, and a resumed run sees the same augmented images.

The loader workers only decode, crop, resize and flip, in uint8 (utils/images.py); batches are collated in
uint8 and converted and normalised on the device (`DeviceBatches`) with the parameters of a `Preprocess`.
"""
import functools
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import datasets

from utils.errors import one_line
from utils.folders import ImageFiles, class_folders, imagenet_1k_names, imagenet_names
from utils.images import Preprocess, Skipped, normalize, transformed_batch
from utils.shards import ShardImages


DATASETS = ('cifar10', 'cifar100', 'imagenet', 'digits')
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# torchvision reads them from the downloaded data; these need none.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


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


class TorchvisionImages(Dataset):
    """A torchvision dataset (CIFAR) exposed through `load`."""

    def __init__(self, dataset):
        self.dataset, self.classes = dataset, dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self.dataset[index]


class Augmented(Dataset):
    """Reads and transforms a source's images with randomness seeded by (seed, epoch, index).

    An unreadable image raises UnreadableImage, or, if the source has `skip_corrupt` set, is logged and
    yields `Skipped(index)`.
    """

    def __init__(self, source: Dataset, transform: Callable, seed: int):
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """A batch's samples, which a DataLoader asks for at once: `[self[i] for i in indices]`, with the random
        draws of all of them before their decoding (`transformed_batch`)."""
        return transformed_batch([functools.partial(self.source.load, index) for index in indices], self.transform,
                                 [(self.seed, self.epoch, index) for index in indices], indices,
                                 getattr(self.source, 'skip_corrupt', False))


def collate_skipping_none(batch: list, image_shape: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[int]]:
    """Stack (image, label) pairs, setting aside skipped files: (images, labels, indices of the skipped files).

    A batch whose files were all skipped gives an empty (0, *image_shape) uint8 tensor; the training loop
    then runs a zero-weighted stand-in, so every process still takes part in DDP's gradient reduction.
    """
    kept = [item for item in batch if not isinstance(item, Skipped)]
    images = torch.stack([image for image, _ in kept]) if kept else torch.zeros((0, *image_shape), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return images, labels, [item.index for item in batch if isinstance(item, Skipped)]


class DeviceBatches:
    """A loader's (uint8 images, labels, skipped) batches with the images moved to `device` and normalised
    there (`normalize`): the workers and the host-to-device copy move a quarter of float32's bytes."""

    def __init__(self, loader: Iterable, device: torch.device, preprocess: Preprocess = Preprocess()):
        self.loader, self.device, self.preprocess = loader, device, preprocess

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # the loader's sampler, dataset, ...
        if name == 'loader':  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        for images, labels, skipped in self.loader:
            images = images.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = normalize(images, self.preprocess)
            yield images, labels.to(self.device, non_blocking=True), skipped


def check_same_classes(train: Dataset, val: Dataset) -> None:
    """Raise a one-line error unless two ImageFolder splits (or sets of shards) have the same class folders, so
    that a label means the same class in both (the other datasets fix their classes)."""
    if not isinstance(train, (ImageFiles, ShardImages)) or train.folders == val.folders:
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


def load_split(dataset: str, data_dir: str, train: bool, skip_corrupt: bool = False,
               file_list: Path | None = None) -> Dataset:
    """The raw (untransformed) split of a dataset, with `.classes` and `.load(index) -> (PIL image, label)`;
    `file_list`: where an ImageFolder split caches its file list (see `scan_image_folder`)."""
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
        return ImageFiles(folder, skip_corrupt, file_list)
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
            return imagenet_names(class_folders(folder))
        return imagenet_1k_names()
    return list(load_split(dataset, data_dir, train=False).classes)


EvaluationSet = tuple[Dataset, Iterable | None]  # a split's dataset and this process's sampler (None: shards)


def evaluation_set(images: Dataset, transform: Callable, rank: int, world_size: int) -> EvaluationSet:
    """A split's images (`load_split` or `ShardImages`) with the evaluation transform, and the sampler giving
    this process its disjoint part (None for shards, which split themselves), so every image counts once."""
    if isinstance(images, ShardImages):
        images.transform = transform
        return images, None
    return Augmented(images, transform, seed=0), range(rank, len(images), world_size)


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
