"""Datasets, transforms and the resumable sharded sampler.

Datasets: `cifar10`, `cifar100` (torchvision), `imagenet` (ImageFolder trees `train/` and `val/` under
`--data_dir`) and `digits`, the handwritten-digits set inside scikit-learn's wheel (real data, offline).

Augmentation randomness is a function of (seed, epoch, sample index) only, so it does not change with
`--num_workers` or the number of processes, and a resumed run sees the same augmented images.
"""
import logging
import os
import stat
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils.errors import one_line

DATASETS = ('cifar10', 'cifar100', 'imagenet', 'digits')
AUGMENTS = ('flip', 'crop', 'none')
CROP_SCALE = {'flip': (0.05, 1.0), 'crop': (0.5, 1.0)}
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
IMAGENET_NAMES = Path(__file__).parent / 'imagenet_classes.txt'
IMAGENET_WNIDS = Path(__file__).parent / 'imagenet_wnids.txt'  # the 1000 ImageNet-1k WordNet ids, sorted
IMAGE_EXTENSIONS = frozenset(IMG_EXTENSIONS)  # what torchvision's ImageFolder reads, for training and test.py
# torchvision reads them from the downloaded data; these need none.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

logger = logging.getLogger(__name__)


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message names the file."""


class Skipped(NamedTuple):
    """What a dataset yields for an unreadable file it skips: the file's index, so that it is counted once."""
    index: int


def image_file_id(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of an image file, None for anything else; links are followed, so a file has one id.

    An image file is a visible file (not `.name`, not macOS `._name`) with an image extension that is a
    regular file or a link to one: FIFOs, devices and sockets are never opened (reading a FIFO would block
    forever), and a dangling link is no file.
    """
    name = os.path.basename(path)
    if name.startswith('.') or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else None


def is_image_file(path: str | Path) -> bool:
    """Whether training and test.py read `path` as an image (see `image_file_id`)."""
    return image_file_id(path) is not None


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise UnreadableImage: one line naming the file and why."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UnreadableImage(f"cannot read image {path}: not a regular file (FIFOs, devices and sockets "
                                  "are never opened)")
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Image.DecompressionBombError:
        raise UnreadableImage(f"cannot read image {path}: it exceeds PIL's pixel limit Image.MAX_IMAGE_PIXELS = "
                              f"{Image.MAX_IMAGE_PIXELS}, which guards against decompression bombs") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"cannot read image {path}: not an image format PIL can read") from None
    except FileNotFoundError:
        raise UnreadableImage(f"cannot read image {path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"cannot read image {path}: damaged or truncated ({one_line(error)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, keeping the contrast of images of more than 8 bits.

    16-bit modes (I;16*) have a full scale of 65535. 32-bit modes (I, F) have none: their own range,
    minimum to maximum of the finite values, becomes 0 to 255 (a constant image becomes black, NaN black).
    """
    if image.mode.startswith('I;16'):
        array = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    elif image.mode in ('I', 'F'):
        array = np.asarray(image, dtype=np.float64)
        finite = array[np.isfinite(array)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    else:
        return image.convert('RGB')
    pixels = np.clip(np.nan_to_num(array, nan=0.0) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert('RGB')


def get_eval_transform(img_size: int) -> Callable:
    """The evaluation transform (also what test.py uses): RGB, resize, [-1, 1] normalisation."""
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize((img_size, img_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ])


def get_timm_eval_transform(data_config: dict, img_size: tuple[int, int]) -> Callable:
    """timm's evaluation transform for a timm model's pretrained config (mean/std, interpolation, crop_pct; from
    `timm.data.resolve_data_config`), after the conversion to RGB that every transform here starts with."""
    from timm.data import create_transform
    return transforms.Compose([transforms.Lambda(to_rgb),
                               create_transform(**{**data_config, 'input_size': (3, *img_size)}, is_training=False)])


def get_train_transform(img_size: int, augment: str, data_config: dict | None = None) -> Callable:
    """The training transform.

    `flip`: ViT fine-tuning's random resized crop (scale 0.05-1) and horizontal flip, as the original code;
    `crop`: a milder random resized crop (scale 0.5-1) without the flip, for images whose mirror image is
    another class (digits, text); `none`: the evaluation transform. `data_config` (a timm model's: mean, std,
    interpolation) replaces the [-1, 1] normalisation and bilinear resampling.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
    if augment == 'none':
        return (get_timm_eval_transform(data_config, (img_size, img_size)) if data_config
                else get_eval_transform(img_size))
    config = data_config or {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'interpolation': 'bilinear'}
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.RandomResizedCrop((img_size, img_size), scale=CROP_SCALE[augment],
                                     interpolation=transforms.InterpolationMode(config['interpolation'])),
        *([transforms.RandomHorizontalFlip()] if augment == 'flip' else []),
        transforms.ToTensor(),
        transforms.Normalize(mean=config['mean'], std=config['std']),
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


def class_folders(root: Path) -> list[str]:
    """The class folders of an ImageFolder tree: its visible sub-folders (or links to folders), sorted."""
    with os.scandir(root) as entries:
        folders = sorted(entry.name for entry in entries if not entry.name.startswith('.') and entry.is_dir())
    if not folders:
        raise FileNotFoundError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    return folders


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class folders of an ImageFolder tree and its (image path, label) samples, label i being folder i.

    Images are the files `is_image_file` accepts, in any sub-folder of a class folder. Links to folders are
    followed, but no real folder is walked twice (the split folder and the class folders count as walked),
    so a link loop adds nothing; every real file is one sample: a file reached again from its own class is
    left out, and one reached from two classes is an error, since it would carry two labels.
    """
    def folder_id(path: str | Path) -> tuple[int, int]:
        info = os.stat(path)
        return info.st_dev, info.st_ino

    folders = class_folders(root)
    walked = {folder_id(root)} | {folder_id(root / name) for name in folders}
    owner: dict[tuple[int, int], tuple[str, str]] = {}  # each image file's id -> (its class folder, its path)
    samples = []
    for label, name in enumerate(folders):
        found = []
        for folder, subfolders, files in os.walk(root / name, followlinks=True):
            ids = {sub: folder_id(os.path.join(folder, sub)) for sub in subfolders}
            subfolders[:] = [sub for sub in sorted(subfolders) if not sub.startswith('.') and ids[sub] not in walked]
            walked.update(ids[sub] for sub in subfolders)
            for path in (os.path.join(folder, file) for file in sorted(files)):
                file_id = image_file_id(path)
                if file_id is None:
                    continue
                if file_id in owner:  # the same file again
                    other_class, other_path = owner[file_id]
                    if other_class != name:
                        raise ValueError(f"{path} is the file {other_path} of class {other_class!r} too: "
                                         "expected each image in one class folder")
                    continue
                owner[file_id] = (name, path)
                found.append(path)
        if not found:
            raise FileNotFoundError(f"class folder {root / name} has no image files; expected files ending in "
                                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
        samples += [(path, label) for path in sorted(found)]
    return folders, samples


class ImageFiles(Dataset):
    """An ImageFolder tree (see `scan_image_folder`) read with clear errors: a corrupt file names itself, or is
    skipped. `classes` are readable names (ImageNet-1k's for its WNID folders), `folders` the folder names."""

    def __init__(self, root: Path, skip_corrupt: bool):
        self.folders, self.samples = scan_image_folder(root)  # label i is folders[i]
        self.root, self.skip_corrupt = root, skip_corrupt
        self.classes = imagenet_names(self.folders)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image | None, int]:
        path, target = self.samples[index]
        try:
            return read_image(path), target
        except UnreadableImage as error:
            if not self.skip_corrupt:
                raise UnreadableImage(f"{error} (use --skip_corrupt to skip such files)") from None
            logger.warning("skipping %s", error)
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
            return Skipped(index)
        # torchvision's random transforms draw from torch's CPU generator: seed it for this sample only
        # (not torch.manual_seed, which would also reseed the CUDA generators that dropout uses).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.transform(image), target


def collate_skipping_none(batch: list, image_shape: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[int]]:
    """Stack (image, label) pairs, setting aside skipped files: (images, labels, indices of the skipped files).

    A batch whose files were all skipped gives an empty (0, *image_shape) tensor; the training loop then
    runs a zero-weighted stand-in, so every process still takes part in DDP's gradient reduction.
    """
    kept = [item for item in batch if not isinstance(item, Skipped)]
    images = torch.stack([image for image, _ in kept]) if kept else torch.zeros((0, *image_shape))
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return images, labels, [item.index for item in batch if isinstance(item, Skipped)]


def imagenet_1k_names() -> list[str]:
    """ImageNet-1k's 1000 readable class names (tench, goldfish, ...) in the standard class index order."""
    return IMAGENET_NAMES.read_text().splitlines()


def imagenet_names(classes: list[str]) -> list[str]:
    """Readable names for exactly ImageNet-1k's 1000 WNID folders (n01440764, ...; the list ships in
    utils/imagenet_wnids.txt), whose sorted order is the standard class index order; any other folder
    names, even 1000 WordNet ids of another selection, are kept as they are."""
    if list(classes) == IMAGENET_WNIDS.read_text().split():
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
            return imagenet_names(class_folders(folder))
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
