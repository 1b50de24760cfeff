"""Tar shards from scripts/make_shards.py, streamed with webdataset: their metadata, and `ShardImages`.
"""
import glob
import io
import json
import logging
import tarfile
from typing import Callable, Iterator

import torch
from PIL import Image

from utils.errors import one_line
from utils.images import IMAGE_EXTENSIONS, Skipped, UnreadableImage, open_image, transformed


SHARD_FORMAT = 'trar-vit image shards v1'
SHARD_META = '__meta__'  # each shard's first member (JSON); webdataset's readers skip __*__ names
logger = logging.getLogger(__name__)


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
