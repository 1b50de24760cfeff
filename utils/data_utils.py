"""Datasets, transforms and the resumable sharded sampler.

Datasets: `cifar10`, `cifar100` (torchvision), `imagenet` (ImageFolder trees `train/` and `val/` under
`--data_dir`) and `digits`, the handwritten-digits set inside scikit-learn's wheel (real data, offline).

Augmentation randomness is a function of (seed, epoch, sample index) only, so it does not change with
`--num_workers` or the number of processes, and a resumed run sees the same augmented images.

The loader workers only decode, crop, resize and flip, in uint8 (`train_pixels`, `eval_pixels`); batches
are collated in uint8 and converted and normalised on the device (`normalize`, `DeviceBatches`) with
the parameters of a `Preprocess`.
"""
import functools
import glob
import io
import itertools
import json
import logging
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from utils.errors import one_line
from utils.files import write_atomic

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


def open_image(file: str | Path, name: str | None = None) -> Image.Image:
    """Open an image without decoding it (`decode` does), or raise UnreadableImage: one line naming it and why.

    `file` is a path or a binary file object (then `name` names it in messages). Only regular files are
    opened: FIFOs, devices and sockets never are.
    """
    name = name or str(file)
    try:
        if isinstance(file, (str, Path)) and not stat.S_ISREG(os.stat(file).st_mode):
            raise UnreadableImage(f"cannot read image {name}: not a regular file (FIFOs, devices and sockets "
                                  "are never opened)")
        image = Image.open(file)
    except Image.DecompressionBombError:
        raise UnreadableImage(f"cannot read image {name}: it exceeds PIL's pixel limit Image.MAX_IMAGE_PIXELS = "
                              f"{Image.MAX_IMAGE_PIXELS}, which guards against decompression bombs") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"cannot read image {name}: not an image format PIL can read") from None
    except FileNotFoundError:
        raise UnreadableImage(f"cannot read image {name}: no such file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"cannot read image {name}: damaged or truncated ({one_line(error)})") from None
    image.filename = name  # what `decode` names in its messages
    return image


def decode(image: Image.Image, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image `open_image` opened (a no-op for a decoded one), or raise UnreadableImage.

    `draft` asks a JPEG for a reduced-size decode, the DCT scaled by 1/2, 1/4 or 1/8, no smaller than
    `draft` (PIL's `Image.draft`); other formats ignore it.
    """
    name = getattr(image, 'filename', '') or 'in memory'
    try:
        if draft is not None:
            image.draft(None, draft)
        image.load()
        if getattr(image, 'fp', None) is not None:  # multi-frame formats keep their file open after load
            decoded = image.copy()
            image.close()
            return decoded
        return image
    except (OSError, SyntaxError, ValueError) as error:
        image.close()
        raise UnreadableImage(f"cannot read image {name}: damaged or truncated ({one_line(error)})") from None


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise UnreadableImage: one line naming the file and why."""
    return decode(open_image(path))


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


INTERPOLATIONS = {'bilinear': InterpolationMode.BILINEAR, 'bicubic': InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs; the defaults are the original ViT code's.

    `mean` and `std` normalise each channel of pixels scaled to [0, 1]; `interpolation` ('bilinear' or
    'bicubic') resamples every resize. `crop_pct` 1.0 resizes the whole evaluation image to img_size x img_size;
    below 1 (timm's DeiT: 0.9), or with `keep_aspect` (timm's evaluation at any crop_pct), its shorter side is
    resized to floor(img_size / crop_pct) and the centre img_size x img_size kept.
    """
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = 'bilinear'
    crop_pct: float = 1.0
    keep_aspect: bool = False

    @classmethod
    def from_timm(cls, data_config: dict) -> 'Preprocess':
        """A timm model's pretrained preprocessing (`timm.data.resolve_data_config`): its mean and std,
        interpolation and centre crop, as timm's own evaluation transform does them."""
        return cls(tuple(data_config['mean']), tuple(data_config['std']), data_config['interpolation'],
                   float(data_config['crop_pct']), keep_aspect=data_config.get('crop_mode', 'center') != 'squash')

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: expected one of {tuple(INTERPOLATIONS)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct {self.crop_pct}: expected a number in (0, 1]")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} and std {self.std}: expected 3 numbers each, std positive")
        object.__setattr__(self, 'mean', tuple(float(m) for m in self.mean))  # lists in, hashable tuples kept
        object.__setattr__(self, 'std', tuple(float(s) for s in self.std))

    @property
    def resample(self) -> InterpolationMode:
        return INTERPOLATIONS[self.interpolation]


def preprocess_of(model: 'torch.nn.Module | str') -> Preprocess:
    """How a model's images become inputs: a timm model's (a `timm:<name>` model type or a built one) as its
    pretrained weights were preprocessed, else the original ViT code's."""
    from model import timm_trar
    if isinstance(model, timm_trar.TimmViT) or (isinstance(model, str) and timm_trar.is_timm(model)):
        return Preprocess.from_timm(timm_trar.data_config(model))
    return Preprocess()


@functools.lru_cache(maxsize=16)
def _channel_stats(preprocess: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1)
    return (torch.tensor(preprocess.mean, device=device).view(shape),
            torch.tensor(preprocess.std, device=device).view(shape))


def normalize(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 images (..., 3, H, W) to normalised float32, on their device: the operations of torchvision's
    ToTensor and Normalize in their order, so the result is bit for bit theirs."""
    mean, std = _channel_stats(preprocess, images.device)
    return images.float().div_(255).sub_(mean).div_(std)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    return TF.pil_to_tensor(image)


def eval_pixels(img_size: int, preprocess: Preprocess = Preprocess()) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform in uint8: decode, RGB, resize (and centre crop, see `Preprocess`)."""
    def transform(image: Image.Image) -> torch.Tensor:
        image = to_rgb(decode(image))
        if preprocess.crop_pct == 1.0 and not preprocess.keep_aspect:
            image = TF.resize(image, [img_size, img_size], preprocess.resample)
        else:
            image = TF.center_crop(TF.resize(image, int(img_size / preprocess.crop_pct), preprocess.resample),
                                   [img_size, img_size])
        return to_uint8_tensor(image)
    return transform


class TrainPixels:
    """The training transform in uint8: a random resized crop (aspect ratio 3/4 to 4/3), then a horizontal
    flip with probability 1/2 if `flip`.

    The random draws are torchvision's RandomResizedCrop and RandomHorizontalFlip's, in their order, so a
    seeded sample gets the same crop box and flip. A JPEG is decoded at 1/2, 1/4 or 1/8 size (`Image.draft`)
    when the crop still has img_size pixels or more each way there; otherwise the pixels are exactly those of
    torchvision's transforms on the full-size image.
    """

    def __init__(self, img_size: int, scale: tuple[float, float], flip: bool, preprocess: Preprocess = Preprocess()):
        self.img_size, self.scale, self.flip, self.resample = img_size, scale, flip, preprocess.resample
        self.ratio = (3 / 4, 4 / 3)

    def reduction(self, width: int, height: int) -> int:
        """The largest DCT scaling 1/r (r in 8, 4, 2) that leaves a crop of width x height img_size pixels or
        more each way; 1 if none."""
        return next((r for r in (8, 4, 2) if min(width, height) / r >= self.img_size), 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        flip = self.flip and bool(torch.rand(1) < 0.5)
        full_width, full_height = image.size
        reduce = self.reduction(width, height)
        image = decode(image, draft=(full_width // reduce, full_height // reduce) if reduce > 1 else None)
        image = to_rgb(image)
        size = [self.img_size, self.img_size]
        if image.size == (full_width, full_height):
            image = TF.resized_crop(image, top, left, height, width, size, self.resample)
        else:  # the crop box in the reduced image's coordinates
            scale_x, scale_y = image.width / full_width, image.height / full_height
            box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
            image = image.resize(size, TF.pil_modes_mapping[self.resample], box=box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(image)


def train_pixels(img_size: int, augment: str, preprocess: Preprocess = Preprocess()) -> Callable[[Image.Image],
                                                                                                  torch.Tensor]:
    """The training transform in uint8.

    `flip`: ViT fine-tuning's random resized crop (scale 0.05-1) and horizontal flip, as the original code;
    `crop`: a milder random resized crop (scale 0.5-1) without the flip, for images whose mirror image is
    another class (digits, text); `none`: the evaluation transform. `data_config` (a timm model's: mean, std,
    interpolation) replaces the [-1, 1] normalisation and bilinear resampling.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
    if augment == 'none':
        return eval_pixels(img_size, preprocess)
    return TrainPixels(img_size, CROP_SCALE[augment], augment == 'flip', preprocess)


def normalized(pixels: Callable[[Image.Image], torch.Tensor], preprocess: Preprocess) -> Callable:
    """A uint8 transform followed by `normalize` on the CPU: for single images (test.py, plots)."""
    return lambda image: normalize(pixels(image), preprocess)


def get_eval_transform(img_size: int, preprocess: Preprocess = Preprocess()) -> Callable:
    """The evaluation transform (also what test.py uses): a float32 normalised (3, H, W) tensor."""
    return normalized(eval_pixels(img_size, preprocess), preprocess)


def get_train_transform(img_size: int, augment: str, preprocess: Preprocess = Preprocess()) -> Callable:
    """The training transform (see `train_pixels`), normalised on the CPU."""
    return normalized(train_pixels(img_size, augment, preprocess), preprocess)


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


FILE_LIST_HEADER = 'image-folder file list v2'


class _FolderScan:
    """One `scan_image_folder` pass: one os.scandir per folder, a stat per folder and per link only.

    A file's id is (its folder's device, its inode as the folder lists it, `DirEntry.inode()`), so a regular
    file costs no stat; a link's target is looked up in its own folder's listing (read once per folder), so
    both names of a file get the same id even where a file system's listed inodes differ from stat's.
    """

    def __init__(self):
        self.walked: set[tuple[int, int]] = set()  # folder ids
        self.folders: list[str] = []  # every folder walked, for the cached list's check
        self.listings: dict[str, tuple[int, dict[str, int]]] = {}  # folder -> (device, name -> listed inode)

    @staticmethod
    def folder_id(path: str | Path) -> tuple[int, int]:
        info = os.stat(path)
        return info.st_dev, info.st_ino

    def listed_id(self, path: str) -> tuple[int, int] | None:
        """The id of the regular file a link points to (None: anything else, or dangling)."""
        try:
            target = os.path.realpath(path)
            if not stat.S_ISREG(os.stat(target).st_mode):
                return None
            folder, name = os.path.split(target)
            if folder not in self.listings:
                with os.scandir(folder) as entries:
                    self.listings[folder] = os.stat(folder).st_dev, {entry.name: entry.inode() for entry in entries}
            device, inodes = self.listings[folder]
            return (device, inodes[name]) if name in inodes else None
        except OSError:
            return None

    def file_id(self, entry: os.DirEntry, device: int) -> tuple[int, int] | None:
        """`image_file_id` of a listed file, without a stat unless it is a link (or its type is unknown)."""
        name = entry.name
        if name.startswith('.') or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            return None
        try:
            if entry.is_symlink():
                return self.listed_id(entry.path)
            return (device, entry.inode()) if entry.is_file(follow_symlinks=False) else None
        except OSError:
            return None

    def walk(self, folder: str) -> Iterator[tuple[str, tuple[int, int]]]:
        """(path, id) of the image files under `folder`, in os.walk's order (top-down, names sorted)."""
        files, subfolders = [], []
        try:  # an unreadable folder is passed over, as os.walk does
            device = os.stat(folder).st_dev
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        is_folder = entry.is_dir()  # follows links, as os.walk(followlinks=True)
                    except OSError:
                        is_folder = False
                    (subfolders if is_folder else files).append(entry)
        except OSError:
            return
        self.folders.append(folder)
        for entry in sorted(files, key=lambda e: e.name):
            file_id = self.file_id(entry, device)
            if file_id is not None:
                yield entry.path, file_id
        ids = {}
        for entry in subfolders:
            try:
                ids[entry.name] = self.folder_id(entry.path)
            except OSError:
                continue
        keep = [name for name in sorted(ids) if not name.startswith('.') and ids[name] not in self.walked]
        self.walked.update(ids[name] for name in keep)
        for name in keep:
            yield from self.walk(os.path.join(folder, name))


def scan_image_folder(root: Path, cache: Path | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """The class folders of an ImageFolder tree and its (image path, label) samples, label i being folder i.

    Images are the files `is_image_file` accepts, in any sub-folder of a class folder. Links to folders are
    followed, but no real folder is walked twice (the split folder and the class folders count as walked),
    so a link loop adds nothing; every real file is one sample: a file reached again from its own class is
    left out, and one reached from two classes is an error, since it would carry two labels.

    `cache`, if given, is a file list this function writes (and only such a file: anything else there is left
    alone). It is used while every folder the scan walked still has the device, inode and modification time
    it had, which adding, removing or renaming a file in it changes.
    """
    root = Path(root)
    if cache is not None:
        cached = read_file_list(cache, root)
        if cached is not None:
            return cached
    folders = class_folders(root)
    scan = _FolderScan()
    scan.walked = {scan.folder_id(root)} | {scan.folder_id(root / name) for name in folders}
    owner: dict[tuple[int, int], tuple[str, str]] = {}  # each image file's id -> (its class folder, its path)
    samples = []
    for label, name in enumerate(folders):
        found = []
        for path, file_id in scan.walk(str(root / name)):
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
    if cache is not None:
        write_file_list(cache, root, [str(root), *scan.folders], folders, samples)
    return folders, samples


def _folder_stamp(path: str) -> str:
    info = os.stat(path)
    return f'{info.st_dev} {info.st_ino} {info.st_mtime_ns}'


def write_file_list(cache: Path, root: Path, walked: list[str], folders: list[str],
                    samples: list[tuple[str, int]]) -> None:
    """Write the file list of `scan_image_folder` (atomically); a file there that is not one is left alone."""
    if not cache.parent.is_dir():  # e.g. a process on a node without the run folder
        return
    if cache.exists() and not _is_file_list(cache):
        logger.warning("not caching the file list of %s: %s exists and is not such a list", root, cache)
        return
    if any('\n' in path for path, _ in samples) or any('\n' in folder for folder in walked):
        return  # a line per file
    prefix = str(root) + os.sep
    lines = [FILE_LIST_HEADER, str(root), str(len(walked)), *(f'{_folder_stamp(f)} {f}' for f in walked),
             str(len(folders)), *folders, *_class_blocks(samples, len(folders), len(prefix))]
    try:
        write_atomic(cache, lambda tmp: tmp.write_text('\n'.join(lines) + '\n'))
    except OSError as error:
        logger.warning("cannot cache the file list of %s in %s: %s", root, cache, one_line(error))


def _class_blocks(samples: list[tuple[str, int]], classes: int, cut: int) -> list[str]:
    """Per class, its number of files then their paths with the first `cut` characters (root/) cut."""
    paths: list[list[str]] = [[] for _ in range(classes)]
    for path, label in samples:
        paths[label].append(path[cut:])
    return [line for group in paths for line in (str(len(group)), *group)]


def _is_file_list(cache: Path) -> bool:
    try:
        with open(cache) as f:
            return f.readline().rstrip('\n') == FILE_LIST_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def read_file_list(cache: Path, root: Path) -> tuple[list[str], list[tuple[str, int]]] | None:
    """The folders and samples a file list holds, if it lists `root` and every folder it walked is unchanged."""
    try:
        if not stat.S_ISREG(os.stat(cache).st_mode):
            return None
        lines = cache.read_text().split('\n')
        if lines[0] != FILE_LIST_HEADER or lines[1] != str(root):
            return None
        walked = int(lines[2])
        for line in lines[3:3 + walked]:
            device, inode, mtime, folder = line.split(' ', 3)
            if _folder_stamp(folder) != f'{device} {inode} {mtime}':
                return None
        at = 3 + walked
        count = int(lines[at])
        folders = lines[at + 1:at + 1 + count]
        prefix = str(root) + os.sep
        samples = []
        at += 1 + count
        for label in range(count):  # per class: its number of files, then their paths below root
            files = int(lines[at])
            samples.extend(zip(map(prefix.__add__, lines[at + 1:at + 1 + files]), itertools.repeat(label)))
            at += 1 + files
        return folders, samples
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


class ImageFiles(Dataset):
    """An ImageFolder tree (see `scan_image_folder`) read with clear errors: a corrupt file names itself, or is
    skipped (`skip_corrupt`, see `Augmented`). `classes` are readable names (ImageNet-1k's for its WNID
    folders), `folders` the folder names."""

    def __init__(self, root: Path, skip_corrupt: bool, file_list: Path | None = None):
        self.folders, self.samples = scan_image_folder(root, file_list)  # label i is folders[i]
        self.root, self.skip_corrupt = root, skip_corrupt
        self.classes = imagenet_names(self.folders)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The image opened, not yet decoded (transforms decode it, at reduced size where they can)."""
        path, target = self.samples[index]
        return open_image(path), target


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
        return transformed(lambda: self.source.load(index), self.transform, (self.seed, self.epoch, index), index,
                           getattr(self.source, 'skip_corrupt', False))


def transformed(load: Callable[[], tuple[Image.Image, int]], transform: Callable, key: tuple, index: int,
                skip_corrupt: bool) -> tuple[torch.Tensor, int] | Skipped:
    """`transform` of the loaded image with torch's CPU generator seeded by `key` for this sample only (not
    torch.manual_seed, which would also reseed the CUDA generators that dropout uses). An unreadable image
    raises UnreadableImage or, with `skip_corrupt`, is logged and gives `Skipped(index)`."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            image, target = load()
            return transform(image), target
        except UnreadableImage as error:
            if not skip_corrupt:
                raise UnreadableImage(f"{error} (use --skip_corrupt to skip such files)") from None
            logger.warning("skipping %s", error)
            return Skipped(index)


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


SHARD_FORMAT = 'trar-vit image shards v1'
SHARD_META = '__meta__'  # each shard's first member (JSON); webdataset's readers skip __*__ names


def shard_urls(pattern: str) -> list[str]:
    """The shards of a pattern: braces as webdataset expands them (a-{000000..000099}.tar), else a local glob."""
    from webdataset.shardlists import expand_urls
    urls = expand_urls(pattern) if '{' in pattern else sorted(glob.glob(pattern))
    if not urls:
        raise FileNotFoundError(f"no shards match {pattern}; expected tar files from scripts/make_shards.py, "
                                "e.g. shards/train-{000000..000099}.tar or 'shards/train-*.tar'")
    return urls


class ShardError(UnreadableImage):
    """A shard that cannot be read; the message names it."""


def read_shard_meta(url: str) -> dict:
    """The metadata member that starts every shard scripts/make_shards.py writes, or a one-line ShardError."""
    from webdataset import gopen
    try:
        with gopen(url) as stream, tarfile.open(fileobj=stream, mode='r|') as tar:
            member = next(iter(tar), None)
            if member is None or member.name != SHARD_META:
                raise ShardError(f"shard {url} does not start with {SHARD_META}: expected a shard written by "
                                 "scripts/make_shards.py")
            meta = json.loads(tar.extractfile(member).read())
    except (OSError, tarfile.TarError, ValueError) as error:
        raise ShardError(f"cannot read shard {url}: {one_line(error)}") from None
    if meta.get('format') != SHARD_FORMAT:
        raise ShardError(f"shard {url} has format {meta.get('format')!r}: expected {SHARD_FORMAT!r}")
    return meta


class ShardImages(torch.utils.data.IterableDataset):
    """Images and labels streamed from tar shards (scripts/make_shards.py; webdataset reads them).

    The shards are split across processes and their loader workers: shard i goes to worker
    i mod (world x workers), so one pass reads every image exactly once over all of them. Each sample is
    transformed like `Augmented`'s (seeded by seed, epoch and its index in the shards), so the pixels do not
    depend on the split. Class names come from the shards' metadata. A shard that ends early, a sample
    without its class index and an unreadable image raise a one-line UnreadableImage naming the shard, or,
    with `skip_corrupt`, give `Skipped(index)` for each image lost.
    """

    def __init__(self, pattern: str, transform: Callable | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, skip_corrupt: bool = False):
        self.urls = shard_urls(pattern)
        meta = read_shard_meta(self.urls[0])
        if len(self.urls) != meta['shards']:
            raise ValueError(f"{pattern} matches {len(self.urls)} shards; its shards say there are {meta['shards']}")
        self.classes, self.folders, self.size = meta['classes'], meta['folders'], meta['total']
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.rank, self.world_size, self.skip_corrupt = rank, world_size, skip_corrupt

    def __len__(self) -> int:
        return self.size  # images in all shards (each process reads about 1 / world_size of them)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples(self, url: str) -> Iterator[tuple[int, dict]]:
        """(index, {extension: bytes}) of one shard's images, in order, checked against its metadata."""
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener
        meta = read_shard_meta(url)
        first, count = meta['first'], meta['images']
        seen = 0
        try:
            for sample in group_by_keys(tar_file_expander(url_opener([{'url': url}]))):
                index = first + seen
                if sample['__key__'] != f'{index:09d}':
                    raise ShardError(f"shard {url}: sample {sample['__key__']!r} where {index:09d} was expected")
                seen += 1
                yield index, sample
        except (OSError, EOFError, ValueError, tarfile.TarError) as error:  # a damaged tar
            reason = str(error.args[0]).split(' @ ')[0] if error.args else type(error).__name__  # webdataset adds where
            self._lost(url, first + seen, first + count, one_line(reason))
            yield from ((i, None) for i in range(first + seen, first + count))
            return
        if seen != count:
            self._lost(url, first + seen, first + count, f"it holds {seen} of its {count} images")
            yield from ((i, None) for i in range(first + seen, first + count))

    def _lost(self, url: str, start: int, end: int, why: str) -> None:
        message = f"shard {url} is damaged or truncated ({why}): images {start} to {end - 1} are lost"
        if not self.skip_corrupt:
            raise ShardError(f"{message} (use --skip_corrupt to skip them)")
        logger.warning("skipping %s", message)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        split, mine = self.world_size * workers, self.rank * workers + worker
        for url in self.urls[mine::split]:
            for index, sample in self._samples(url):
                if sample is None:
                    yield Skipped(index)
                    continue
                yield transformed(lambda: self._decode(url, index, sample), self.transform,
                                  (self.seed, self.epoch, index), index, self.skip_corrupt)

    def _decode(self, url: str, index: int, sample: dict) -> tuple[Image.Image, int]:
        images = [key for key in sample if '.' + key in IMAGE_EXTENSIONS]
        if 'cls' not in sample or len(images) != 1:
            raise UnreadableImage(f"shard {url}: sample {index:09d} has {sorted(k for k in sample if k[0] != '_')}; "
                                  "expected one image and its class index (.cls)")
        try:
            label = int(sample['cls'])
        except ValueError:
            raise UnreadableImage(f"shard {url}: sample {index:09d} has class index {sample['cls'][:20]!r}; expected "
                                  f"an integer") from None
        if not 0 <= label < len(self.classes):
            raise UnreadableImage(f"shard {url}: sample {index:09d} has class index {label}; expected 0 to "
                                  f"{len(self.classes) - 1}")
        return open_image(io.BytesIO(sample[images[0]]), f"{url}:{index:09d}.{images[0]}"), label


def evaluation_set(images: Dataset, transform: Callable, rank: int, world_size: int) -> tuple[Dataset, Iterable | None]:
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
