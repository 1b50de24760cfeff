"""Tar shards from scripts/make_shards.py, streamed with webdataset: their metadata, and `ShardImages`.
"""
import contextlib
import functools
import glob
import io
import itertools
import json
import logging
import os
import stat
import tarfile
from typing import BinaryIO, Callable, Iterator

import torch
from PIL import Image

from utils.errors import one_line
from utils.images import IMAGE_EXTENSIONS, Skipped, UnreadableImage, open_image, transformed_batch


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


TAR_BLOCK = 512
PLAN_AHEAD = 16  # samples whose random draws are made before their decoding (`transformed_batch`)
READ_BUFFER = 1 << 20  # bytes per read of a shard's stream


def tar_members(stream: BinaryIO, url: str) -> Iterator[dict]:
    """The members of an uncompressed ustar stream, the format scripts/make_shards.py writes, as webdataset's
    sample parts ({'fname', 'data', '__url__'}, which `group_by_keys` groups).

    It reads the 512-byte headers itself: webdataset's own iterator goes through Python's tarfile, about
    130 us an image here, which made shards slower than the folder reader (docs/data.md). A short header or
    member, a header whose checksum is wrong and any member that is not a regular file raise tarfile.ReadError.
    """
    header = read_exactly(stream, TAR_BLOCK)
    while True:
        if not header or header == bytes(TAR_BLOCK):  # the stream's end, or the archive's end-of-archive blocks
            return
        if len(header) < TAR_BLOCK:
            raise tarfile.ReadError('unexpected end of data')
        try:
            checksum, size = (int(header[at:at + 12].split(b'\0', 1)[0].strip() or b'0', 8)
                              for at in (148, 124))
        except ValueError:
            raise tarfile.ReadError('invalid header') from None
        if checksum != 256 + sum(header[:148]) + sum(header[156:]):  # the field counts as 8 spaces
            raise tarfile.ReadError('bad checksum')
        name = header[:100].split(b'\0', 1)[0].decode('utf-8', 'replace')
        prefix = header[345:500].split(b'\0', 1)[0] if header[257:262] == b'ustar' else b''
        if prefix:
            name = f"{prefix.decode('utf-8', 'replace')}/{name}"
        if header[156:157] not in (b'0', b'\0'):
            raise tarfile.ReadError(f"member {name} is of tar type {header[156:157]!r}: expected a regular file")
        data = read_exactly(stream, size)
        padding = -size % TAR_BLOCK
        after = read_exactly(stream, padding + TAR_BLOCK)  # the member's padding and the next header, in one read
        if len(data) < size or len(after) < padding:
            raise tarfile.ReadError('unexpected end of data')
        yield {'fname': name, 'data': data, '__url__': url}
        header = after[padding:]


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    """`size` bytes of `stream`, fewer only at its end: read a READ_BUFFER at a time, so that a damaged header's
    size field (up to 8 GiB) allocates only what the stream holds, and a pipe's short reads are joined."""
    data = stream.read(min(size, READ_BUFFER))
    if len(data) == size or not data:
        return data
    parts, done = [data], len(data)
    while done < size:
        part = stream.read(min(size - done, READ_BUFFER))
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b''.join(parts)


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[tuple[dict, Iterator[dict]]]:
    """A shard's metadata (its first member), checked, and an iterator over its other members (`tar_members`),
    from one stream that webdataset's `gopen` opens (a path, or any URL it reads). ShardError names the shard."""
    from webdataset.gopen import gopen
    try:
        if os.path.exists(url) and not stat.S_ISREG(os.stat(url).st_mode):  # a local FIFO would block forever
            raise ShardError(f"cannot read shard {url}: not a regular file (FIFOs, devices and sockets are never "
                             "opened)")
        stream = gopen(url, bufsize=READ_BUFFER)
    except OSError as error:
        raise ShardError(f"cannot read shard {url}: {one_line(error)}") from None
    with stream:
        members = tar_members(stream, url)
        try:
            first = next(members, None)
            if first is None or first['fname'] != SHARD_META:
                raise ShardError(f"shard {url} does not start with {SHARD_META}: expected a shard written by "
                                 "scripts/make_shards.py")
            meta = json.loads(first['data'])
        except (OSError, tarfile.TarError, ValueError) as error:
            raise ShardError(f"cannot read shard {url}: {one_line(error)}") from None
        if not isinstance(meta, dict) or meta.get('format') != SHARD_FORMAT:
            found = meta.get('format') if isinstance(meta, dict) else meta
            raise ShardError(f"shard {url} has format {found!r}: expected {SHARD_FORMAT!r}")
        yield meta, members


def read_shard_meta(url: str) -> dict:
    """The metadata member that starts every shard scripts/make_shards.py writes, or a one-line ShardError."""
    with open_shard(url) as (meta, _):
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
        self.urls, self.root = shard_urls(pattern), pattern  # root: where the images are, for messages
        meta = read_shard_meta(self.urls[0])
        if len(self.urls) != meta['shards']:
            raise ValueError(f"{pattern} matches {len(self.urls)} shards; its shards say there are {meta['shards']}")
        self.classes, self.folders, self.size = meta['classes'], meta['folders'], meta['total']
        # Every shard holds shard_size images but the last, the rest; plan: the hash of the images' order
        self.shard_size, self.plan = meta['shard_size'], meta['plan']
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.rank, self.world_size, self.skip_corrupt = rank, world_size, skip_corrupt

    def __len__(self) -> int:
        return self.size  # images in all shards (each process reads about 1 / world_size of them)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples(self, shard: int) -> Iterator[tuple[int, dict | None]]:
        """(index, {extension: bytes}) of shard `shard`'s images, in order, checked against its metadata; the
        bytes are None for an image lost to a damaged shard (`skip_corrupt`)."""
        from webdataset.tariterators import group_by_keys
        url = self.urls[shard]
        with open_shard(url) as (meta, members):
            if meta.get('shard') != shard or meta.get('plan') != self.plan:
                raise ShardError(f"shard {url} is shard {meta.get('shard')} of plan {str(meta.get('plan'))[:12]}: "
                                 f"expected shard {shard} of plan {str(self.plan)[:12]} (the pattern's shards, in "
                                 "order)")
            first, count = meta['first'], meta['images']
            seen = 0
            try:
                for sample in group_by_keys(members):
                    index = first + seen
                    if sample['__key__'] != f'{index:09d}':
                        raise ShardError(f"shard {url}: sample {sample['__key__']!r} where {index:09d} was expected")
                    seen += 1
                    yield index, sample
            except (OSError, EOFError, ValueError, tarfile.TarError) as error:  # a damaged tar
                reason = str(error.args[0]) if error.args else type(error).__name__  # group_by_keys appends to args
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
        yield from self._transformed((shard, sample) for shard in range(mine, len(self.urls), split)
                                     for sample in self._samples(shard))

    def _transformed(self, samples: Iterator[tuple[int, tuple[int, dict | None]]]) -> Iterator:
        """Each (shard, `_samples` item) transformed (seeded by seed, epoch and index), or Skipped: PLAN_AHEAD of
        them at a time, their random draws before their decoding (`transformed_batch`)."""
        while chunk := list(itertools.islice(samples, PLAN_AHEAD)):
            readable = [(shard, index, data) for shard, (index, data) in chunk if data is not None]
            done = iter(transformed_batch(
                [functools.partial(self._decode, self.urls[shard], index, data) for shard, index, data in readable],
                self.transform, [(self.seed, self.epoch, index) for _, index, _ in readable],
                [index for _, index, _ in readable], self.skip_corrupt))
            yield from (Skipped(index) if data is None else next(done) for _, (index, data) in chunk)

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


class TrainingShards(ShardImages):
    """Training batches from shards: every process takes the same number of micro-batches an epoch, each image
    at most once, and a run resumes exactly mid-epoch.

    An epoch's stream is the shards in an order shuffled by (seed, epoch), each shard's images in their stored
    order (scripts/make_shards.py shuffled them once). Its first steps x global_batch images are used, where
    steps = images // global_batch; the rest, fewer than a global batch, are dropped this epoch (other images
    next epoch), as `ShardedSampler` does. Process r takes the r-th contiguous part of them, so it opens about
    1 / world of the shards (one partial shard at each end). Its part is cut into micro-batches of consecutive
    images; loader worker w of W reads the w-th contiguous run of them and the DataLoader takes one batch from
    each worker in turn. So the micro-batches are the same for any --num_workers (their order is not), and each
    worker streams its own shards. `set_epoch(epoch, start)` places the epoch after `start` of this process's
    samples: whole shards before a worker's next image are not opened, images before it in its shard are read
    but not decoded, so a resumed run gets the micro-batches an uninterrupted one would (same processes,
    batch and --num_workers).
    """

    def __init__(self, pattern: str, transform: Callable, seed: int, rank: int, world_size: int, skip_corrupt: bool,
                 global_batch: int, micro_batch: int):
        super().__init__(pattern, transform, seed, rank, world_size, skip_corrupt)
        self.steps_per_epoch = self.size // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the shards {pattern} hold {self.size} images, fewer than one global batch of "
                             f"{global_batch}")
        self.per_rank, self.micro_batch = global_batch // world_size, micro_batch
        self.per_rank *= self.steps_per_epoch
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start  # this process's samples left this epoch

    def shard_order(self) -> list[int]:
        """The epoch's shards in stream order, shuffled by (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.urls), generator=generator).tolist()

    def worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        """The stream positions [begin, end) loader worker `worker` of `workers` still reads this epoch."""
        batches, done = self.per_rank // self.micro_batch, self.start // self.micro_batch
        logical = (worker + done) % workers  # the DataLoader asks worker 0 first: it takes the next batch's run
        share, extra = divmod(batches, workers)
        first = logical * share + min(logical, extra)  # the run's first micro-batch
        count = share + (logical < extra)
        taken = len(range(logical, done, workers))  # batches of this run already used (before `start`)
        base = self.rank * self.per_rank
        return base + (first + taken) * self.micro_batch, base + (first + count) * self.micro_batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        begin, end = self.worker_range(worker, workers)
        yield from self._transformed(self._needed(begin, end))

    def _needed(self, begin: int, end: int) -> Iterator[tuple[int, tuple[int, dict | None]]]:
        """(shard, `_samples` item) of the stream positions [begin, end)."""
        position = 0  # of the shard's first image in the stream
        for shard in self.shard_order():
            count = min(self.shard_size, self.size - shard * self.shard_size)
            if position + count > begin and position < end:
                needed = itertools.islice(self._samples(shard), end - position)  # no image past `end` is read
                for at, sample in enumerate(needed, start=position):
                    if at >= begin:
                        yield shard, sample
            position += count
            if position >= end:
                return
