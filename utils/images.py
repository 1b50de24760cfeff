"""Images: opening and decoding with one-line errors, the uint8 training and evaluation transforms, their
normalisation (`Preprocess`, `normalize`) and the per-sample seeding of a transform (`transformed`,
`transformed_batch`).
"""
import functools
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from utils.errors import one_line


AUGMENTS = ('flip', 'crop', 'none')
CROP_SCALE = {'flip': (0.05, 1.0), 'crop': (0.5, 1.0)}
IMAGE_EXTENSIONS = frozenset(IMG_EXTENSIONS)  # what torchvision's ImageFolder reads, for training and test.py
logger = logging.getLogger(__name__)


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message names the file."""


class Skipped(NamedTuple):
    """What a dataset yields for an unreadable file it skips: the file's index, so that it is counted once."""
    index: int


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


def jpeg_pixels(image: Image.Image) -> torch.Tensor | None:
    """An RGB or grayscale JPEG `open_image` opened, decoded by torchvision into RGB uint8 (3, H, W): libjpeg-turbo
    as in PIL, the same pixels, with no PIL image to copy into a tensor. None for other images (PIL decodes them);
    UnreadableImage for a damaged one."""
    if image.format != 'JPEG' or image.mode not in ('RGB', 'L') or getattr(image, 'fp', None) is None:
        return None
    name = getattr(image, 'filename', '') or 'in memory'
    try:
        size = image.fp.seek(0, os.SEEK_END)
        image.fp.seek(0)
        data = bytearray(size)  # the file's bytes copied once, into memory the tensor shares
        if image.fp.readinto(data) != size:
            raise OSError(f"the file has fewer than the {size} bytes it had")
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (OSError, RuntimeError) as error:
        raise UnreadableImage(f"cannot read image {name}: damaged or truncated ({one_line(error)})") from None
    finally:
        image.close()


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise UnreadableImage: one line naming the file and why."""
    return decode(open_image(path))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, keeping the contrast of images of more than 8 bits.

    16-bit modes (I;16*) have a full scale of 65535. 32-bit modes (I, F) have none: their own range,
    minimum to maximum of the finite values, becomes 0 to 255 (a constant image becomes black, NaN black).
    An RGB image is returned as it is (PIL's convert would copy it: a tenth of the training transform's time).
    """
    if image.mode == 'RGB':
        return image
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


class EvalPixels:
    """The evaluation transform in uint8: decode, RGB, resize (and centre crop, see `Preprocess`), all by PIL:
    torchvision's pixels exactly. It draws nothing: its `plan` is empty, its `render` the whole transform (so that
    `transformed_batch` opens a batch's files before decoding them)."""

    def __init__(self, img_size: int, preprocess: Preprocess = Preprocess()):
        self.img_size, self.preprocess = img_size, preprocess

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.render(image, self.plan(image))

    def plan(self, image: Image.Image) -> None:
        return None

    def render(self, image: Image.Image, plan: None) -> torch.Tensor:
        image, size, preprocess = to_rgb(decode(image)), self.img_size, self.preprocess
        if preprocess.crop_pct == 1.0 and not preprocess.keep_aspect:
            image = TF.resize(image, [size, size], preprocess.resample)
        else:
            image = TF.center_crop(TF.resize(image, int(size / preprocess.crop_pct), preprocess.resample), [size, size])
        return to_uint8_tensor(image)


def eval_pixels(img_size: int, preprocess: Preprocess = Preprocess()) -> EvalPixels:
    """The evaluation transform in uint8 (`EvalPixels`)."""
    return EvalPixels(img_size, preprocess)


class TrainPixels:
    """The training transform in uint8: a random resized crop (aspect ratio 3/4 to 4/3), then a horizontal
    flip with probability 1/2 if `flip`.

    The random draws are torchvision's RandomResizedCrop and RandomHorizontalFlip's, in their order, so a
    seeded sample gets the same crop box and flip. A JPEG whose crop keeps img_size pixels or more each way at
    1/2, 1/4 or 1/8 size is decoded at that size (`Image.draft`, PIL); any other JPEG is decoded by torchvision
    (`jpeg_pixels`) and its crop resized on the tensor (torch's uint8 antialiased resize: within a few levels of
    PIL's, and faster); other formats get exactly torchvision's transforms on the PIL image.
    """

    def __init__(self, img_size: int, scale: tuple[float, float], flip: bool, preprocess: Preprocess = Preprocess()):
        self.img_size, self.scale, self.flip, self.resample = img_size, scale, flip, preprocess.resample
        self.ratio = (3 / 4, 4 / 3)

    def reduction(self, width: int, height: int) -> int:
        """The largest DCT scaling 1/r (r in 8, 4, 2) that leaves a crop of width x height img_size pixels or
        more each way; 1 if none."""
        return next((r for r in (8, 4, 2) if min(width, height) / r >= self.img_size), 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.render(image, self.plan(image))

    def plan(self, image: Image.Image) -> tuple[int, int, int, int, bool]:
        """The random draws: the crop box (top, left, height, width) and whether to flip."""
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        return top, left, height, width, self.flip and bool(torch.rand(1) < 0.5)

    def render(self, image: Image.Image, plan: tuple[int, int, int, int, bool]) -> torch.Tensor:
        """The pixels of a `plan`: decoding, crop, resize and flip, with no random draw."""
        top, left, height, width, flip = plan
        full_width, full_height = image.size
        reduce = self.reduction(width, height)
        size = [self.img_size, self.img_size]
        pixels = jpeg_pixels(image) if reduce == 1 else None
        if pixels is not None:
            # torch's vectorised uint8 resize reads channels-last memory; a view of the decoded HWC pixels
            # would take its generic path, about 1.6x slower than copying the crop first.
            crop = pixels[None, :, top:top + height, left:left + width].contiguous(memory_format=torch.channels_last)
            pixels = F.interpolate(crop, size=size, mode=self.resample.value, antialias=True)[0]
            return pixels.flip(-1) if flip else pixels
        image = to_rgb(decode(image, draft=(full_width // reduce, full_height // reduce) if reduce > 1 else None))
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


def transformed(load: Callable[[], tuple[Image.Image, int]], transform: Callable, key: tuple, index: int,
                skip_corrupt: bool) -> tuple[torch.Tensor, int] | Skipped:
    """`transform` of the loaded image with torch's CPU generator seeded by `key` for this sample only (not
    torch.manual_seed, which would also reseed the CUDA generators that dropout uses). An unreadable image
    raises UnreadableImage or, with `skip_corrupt`, is logged and gives `Skipped(index)`."""
    def apply() -> tuple[torch.Tensor, int]:
        image, target = load()
        return transform(image), target
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
        return skipping(apply, index, skip_corrupt)


def transformed_batch(loads: list[Callable[[], tuple[Image.Image, int]]], transform: Callable, keys: list[tuple],
                      indices: list[int], skip_corrupt: bool) -> list[tuple[torch.Tensor, int] | Skipped]:
    """`transformed` of several samples, the same results: for a transform with `plan` and `render`
    (`TrainPixels`), every sample's random draws first, each under its own seed, then every sample's decoding and
    resizing. The draws and file openings of a batch then run together, not each after a decode has emptied the
    caches, which made them several times slower (docs/data.md)."""
    if not hasattr(transform, 'plan'):
        return [transformed(load, transform, key, index, skip_corrupt)
                for load, key, index in zip(loads, keys, indices)]
    plans = [transformed(load, lambda image: (image, transform.plan(image)), key, index, skip_corrupt)
             for load, key, index in zip(loads, keys, indices)]  # ((image, plan), target) or Skipped
    return [item if isinstance(item, Skipped) else
            skipping(lambda item=item: (transform.render(*item[0]), item[1]), index, skip_corrupt)
            for item, index in zip(plans, indices)]


def skipping(make: Callable, index: int, skip_corrupt: bool):
    """`make()`, or for an unreadable image (UnreadableImage) `Skipped(index)` with `skip_corrupt` (logged), else
    the error with the flag that skips such files."""
    try:
        return make()
    except UnreadableImage as error:
        if not skip_corrupt:
            raise UnreadableImage(f"{error} (use --skip_corrupt to skip such files)") from None
        logger.warning("skipping %s", error)
        return Skipped(index)
