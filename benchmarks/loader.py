"""Input-pipeline benchmark: images/s per loader process, the float32 pipeline and the uint8 one side by side.

    python benchmarks/loader.py              # about a minute: in process (CPU time), 1, 2 and all-core workers
    python benchmarks/loader.py --num_workers 4,8,16 --images 2048 --device cuda   # on a GPU machine
    python benchmarks/loader.py scan --files 1281167              # the ImageFolder scan at ImageNet's size

Loader rows. The JPEGs are made from real photographs that ship with the installed packages (matplotlib's
grace_hopper.jpg, scikit-learn's china.jpg and flower.jpg; smooth noise only if none is installed): random
crops resized to ImageNet-like sizes (`imagenet_like_size`: mostly 500 px on the long side, 4:3, 3:2 or square,
a tenth smaller and a tenth larger, up to 1600 px) and saved at quality 90. Each configuration reads them
through a DataLoader as train.py does: `float32` is the pipeline before the uint8 one (a decoded copy of each
image converted to RGB, then torchvision's RandomResizedCrop, RandomHorizontalFlip, ToTensor and Normalize on PIL
images; Resize, ToTensor and Normalize for evaluation), `float32, no copies` the same without its two copies of
each decoded image (in process only), `uint8` is `utils.images`' `train_pixels` / `eval_pixels` with uint8
batches (on CUDA also moved and normalised on the device, `DeviceBatches`); `uint8 shards` reads the same JPEGs
from tar shards (scripts/make_shards.py, `ShardImages`), `vs_folder_uint8` its rate over the folder reader's; the
folder reader lists the images in the shards' order, so both draw the same crop of each image.
`--num_workers 0` loads in this process: every configuration's loader gives one batch in turn, each timed by this
process's CPU time, over `--rounds` x `--passes` epochs, so all of them share every stretch of a shared machine's
load. With workers, configurations run interleaved, round by round, and the table shows each one's best round
(the least disturbed by other work on the machine); images/s per worker is the loader's images/s divided by its
workers.
`--device cuda` adds GPU decoding (torchvision.io.decode_jpeg on CUDA) as a row.

Scan rows. `scan` builds a tree of empty files (1000 class folders) on a tmpfs (/dev/shm, else the temporary
folder), then times `scan_image_folder` cold (no cached list) and with the cached list it writes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting()

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from utils import folders  # noqa: E402
from utils.data_utils import Augmented, DeviceBatches, collate_skipping_none, load_split  # noqa: E402
from utils.errors import command_line  # noqa: E402
from utils.images import Preprocess, decode, eval_pixels, to_rgb, train_pixels  # noqa: E402
from utils.shards import ShardImages  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'scripts'))
import make_shards  # noqa: E402

CLASSES = 8
NO_COPIES = 'float32, no copies'


def photographs() -> tuple[list[Image.Image], str]:
    """Real photographs that ship with installed packages, RGB; smooth noise when none is installed."""
    found, names = [], []
    try:
        import matplotlib
        path = Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg'
        found.append(Image.open(path).convert('RGB'))
        names.append('grace_hopper.jpg (matplotlib)')
    except (ImportError, OSError):
        pass
    try:
        from sklearn.datasets import load_sample_images
        for name, pixels in zip(('china.jpg', 'flower.jpg'), load_sample_images().images):
            found.append(Image.fromarray(pixels))
            names.append(f'{name} (scikit-learn)')
    except (ImportError, OSError):
        pass
    if not found:
        rng = np.random.default_rng(0)
        coarse = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        found.append(Image.fromarray(coarse).resize((1000, 800), Image.BICUBIC))
        names.append('smooth noise (neither matplotlib nor scikit-learn is installed)')
    return found, ', '.join(names)


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn to resemble ImageNet's training images (mean about 400 x 350, most 500 px on the
    long side): long side 500 with probability 0.8, else 200-499 or 501-1600; aspect 4:3, 3:2 or 1:1;
    a quarter portrait."""
    kind = rng.random()
    long_side = 500 if kind < 0.8 else int(rng.integers(200, 500)) if kind < 0.9 else int(rng.integers(501, 1601))
    short_side = round(long_side / rng.choice([4 / 3, 4 / 3, 3 / 2, 1.0]))
    return (short_side, long_side) if rng.random() < 0.25 else (long_side, short_side)


def write_photos(root: Path, count: int, seed: int = 0) -> tuple[float, str]:
    """`count` ImageNet-like JPEGs under root/<class>/ (see the module docstring); (mean KiB, sources)."""
    sources, names = photographs()
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        photo = sources[i % len(sources)]
        width, height = imagenet_like_size(rng)
        # A random region of the photograph with the target's aspect ratio, at least half its shorter side.
        fit = min(photo.width / width, photo.height / height)
        region = fit * rng.uniform(0.5, 1.0)
        w, h = width * region, height * region
        left, top = rng.uniform(0, photo.width - w), rng.uniform(0, photo.height - h)
        image = photo.resize((width, height), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / f'class{i % CLASSES}'
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, 'JPEG', quality=90)
        (folder / f'{i:06d}.JPEG').write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total / count / 1024, names


def as_before(image: Image.Image) -> Image.Image:
    """Decoding as the pipeline before the uint8 one did it: a decoded copy (read_image) converted to RGB (to_rgb
    called PIL's convert, which copies an RGB image too)."""
    image = decode(image).copy()
    return image.convert('RGB') if image.mode == 'RGB' else to_rgb(image)


def float32_transform(img_size: int, train: bool, copies: bool = True) -> transforms.Compose:
    """The float32 pipeline that the uint8 one replaces, as it was: torchvision on PIL images. `copies=False`
    leaves out its two copies of each decoded image, which the uint8 pipeline also left out."""
    steps = ([transforms.RandomResizedCrop((img_size, img_size), scale=(0.05, 1.0)), transforms.RandomHorizontalFlip()]
             if train else [transforms.Resize((img_size, img_size))])
    to_pil = as_before if copies else lambda image: to_rgb(decode(image))
    return transforms.Compose([transforms.Lambda(to_pil), *steps, transforms.ToTensor(),
                               transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))])


def pipelines(img_size: int) -> dict[tuple[str, str], object]:
    preprocess = Preprocess()
    return {('train', 'float32'): float32_transform(img_size, train=True),
            ('train', NO_COPIES): float32_transform(img_size, train=True, copies=False),
            ('train', 'uint8'): train_pixels(img_size, 'flip', preprocess),
            ('eval', 'float32'): float32_transform(img_size, train=False),
            ('eval', NO_COPIES): float32_transform(img_size, train=False, copies=False),
            ('eval', 'uint8'): eval_pixels(img_size, preprocess)}


def make_loader(source, transform, img_size: int, workers: int, batch: int, device: torch.device) -> DataLoader:
    """A DataLoader as train.py builds one over `source`: an ImageFolder split, or the pattern of its shards."""
    if isinstance(source, str):
        dataset, shuffle = ShardImages(source, transform), False
    else:
        dataset, shuffle = Augmented(source, transform, seed=0), True
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle, num_workers=workers, drop_last=True,
                      collate_fn=functools.partial(collate_skipping_none, image_shape=(3, img_size, img_size)),
                      pin_memory=device.type == 'cuda', persistent_workers=workers > 0)


def loader_rate(source, transform, img_size: int, workers: int, batch: int, device: torch.device,
                passes: int) -> float:
    """Images/s through a DataLoader with `workers` loader processes over `passes` epochs, timed from its first
    batch (worker start-up excluded)."""
    loader = make_loader(source, transform, img_size, workers, batch, device)
    batches = DeviceBatches(loader, device) if device.type == 'cuda' else loader
    images, start = 0, None
    for epoch in range(passes):
        for pictures, _, _ in batches:
            if start is None:
                start = time.perf_counter()
                continue
            images += len(pictures)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def in_process_rates(loaders: dict, passes: int) -> dict:
    """Images per CPU second of each loader (no workers: it loads in this process), their batches taken in turn,
    one from each loader, each timed by this process's CPU time. The loaders share every stretch of the run, so a
    slower or faster spell of a shared machine changes them alike; each loader's first batch is left out."""
    seconds, images = dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, 0)

    def timed(key, loader: DataLoader, skip_first: bool):
        iterator = iter(loader)
        while True:
            start = time.process_time()
            batch = next(iterator, None)
            if batch is None:
                return
            if not skip_first:
                seconds[key] += time.process_time() - start
                images[key] += len(batch[0])
            skip_first = False
            yield

    for epoch in range(passes):
        for _ in zip(*(timed(key, loader, epoch == 0) for key, loader in loaders.items())):
            pass
    return {key: images[key] / seconds[key] for key in loaders}


def gpu_decode_rate(root: Path, img_size: int, batch: int, passes: int) -> float:
    """Images/s of torchvision.io.decode_jpeg on CUDA, batched, plus a resize to img_size x img_size there;
    the files are read into memory first (reading is not timed)."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F
    files = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in sorted(root.rglob('*.JPEG'))]
    chunks = [files[i:i + batch] for i in range(0, len(files) - batch + 1, batch)]

    def run(chunk):
        decoded = decode_jpeg(chunk, device='cuda')
        return torch.stack([F.resize(image, [img_size, img_size], antialias=True) for image in decoded])

    run(chunks[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(passes):
        for chunk in chunks:
            run(chunk)
    torch.cuda.synchronize()
    return passes * len(chunks) * batch / (time.perf_counter() - start)


def loader_table(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix='loader-bench-') as tmp:
        root = Path(tmp) / 'train'
        started = time.perf_counter()
        kib, sources = write_photos(root, args.images)
        print(f"{args.images} JPEGs from {sources}: {kib:.0f} KiB on average, written in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        source = load_split('imagenet', tmp, train=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its line per shard
            make_shards.main(['--data_dir', tmp, '--split', 'train', '--out', str(Path(tmp) / 'shards'),
                              '--shard_size', str(max(1, args.images // 16)), '--seed', '0'])
        # The folder's sample i is the shards' sample i, so both readers draw the same crop of each image.
        source.samples = make_shards.shuffled(source.samples, seed=0)
        shards = str(Path(tmp) / 'shards' / 'train-*.tar')
        transforms_ = pipelines(args.img_size)
        transforms_['train', 'uint8 shards'] = transforms_['train', 'uint8']
        transforms_['eval', 'uint8 shards'] = transforms_['eval', 'uint8']
        source_of = {kind: shards if kind.endswith('shards') else source for _, kind in transforms_}
        best: dict[tuple, float] = {}
        if 0 in args.num_workers and device.type == 'cpu':  # in this process, batches interleaved
            loaders = {(split, kind, 0): make_loader(source_of[kind], transform, args.img_size, 0, args.batch_size,
                                                     device) for (split, kind), transform in transforms_.items()}
            for key, rate in in_process_rates(loaders, args.rounds * args.passes).items():
                best[key] = rate
            print("in-process rows done", flush=True)
        # With workers the table times wall-clock rounds, too unsteady to resolve the copies' few percent: the
        # no-copies pipeline is measured in process only (and a GPU machine's time goes to the rest).
        pooled = [workers for workers in args.num_workers if workers or device.type != 'cpu']
        configs = [(split, kind, workers) for workers in pooled for split, kind in transforms_ if kind != NO_COPIES]
        for round_ in range(args.rounds if configs else 0):
            for split, kind, workers in configs:
                rate = loader_rate(source_of[kind], transforms_[split, kind], args.img_size, workers,
                                   args.batch_size, device, args.passes)
                best[split, kind, workers] = max(rate, best.get((split, kind, workers), 0.0))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        rows = []
        for split, kind, workers in [key for workers in args.num_workers for split, kind in transforms_
                                     if (key := (split, kind, workers)) in best]:
            rate = best[split, kind, workers]
            baseline = best[split, 'float32', workers]  # shards: against the folder's float32 pipeline
            rows.append({'pipeline': split, 'dtype': kind, 'workers': workers, 'images_s': round(rate, 1),
                         'images_s_per_worker': round(rate / max(workers, 1), 1),
                         'speedup': round(rate / baseline, 2),
                         'vs_folder_uint8': round(rate / best[split, 'uint8', workers], 2) if 'shards' in kind else ''})
        if device.type == 'cuda':
            rate = gpu_decode_rate(root, args.img_size, args.batch_size, args.passes)
            rows.append({'pipeline': 'eval (resize only)', 'dtype': 'uint8, decode_jpeg on CUDA', 'workers': 0,
                         'images_s': round(rate, 1), 'images_s_per_worker': '', 'speedup': ''})
    return rows


def scan_table(args: argparse.Namespace) -> list[dict]:
    """Times the ImageFolder scan of `args.files` empty files, cold and with the cached file list."""
    base = Path('/dev/shm') if Path('/dev/shm').is_dir() else Path(tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix='scan-bench-', dir=base))
    try:
        root = tmp / 'train'
        started = time.perf_counter()
        per_class = -(-args.files // 1000)
        made = 0
        for c in range(1000):
            folder = root / f'n{c:08d}'
            folder.mkdir(parents=True)
            for i in range(min(per_class, args.files - made)):
                (folder / f'n{c:08d}_{i}.JPEG').touch()
            made += min(per_class, args.files - made)
        print(f"{made} empty files in 1000 folders under {tmp} ({base} is "
              f"{'a tmpfs' if base.as_posix() == '/dev/shm' else 'the temporary folder'}), made in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        cache = tmp / 'file_list'
        rows = []
        for label, cached in (('cold', None), ('writes the cached list', cache), ('with the cached list', cache)):
            started = time.perf_counter()
            _, samples = folders.scan_image_folder(root, cache=cached)
            seconds = time.perf_counter() - started
            assert len(samples) == made
            rows.append({'scan': label, 'files': made, 'seconds': round(seconds, 2)})
            print(rows[-1], flush=True)
        return rows
    finally:
        shutil.rmtree(tmp)


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    for row in rows:
        print('| ' + ' | '.join(str(row.get(column, '')) for column in columns) + ' |')


def worker_counts(text: str) -> list[int]:
    """'1,2,N' -> [1, 2, os.cpu_count()], duplicates dropped."""
    counts = [os.cpu_count() or 1 if part.strip().upper() == 'N' else int(part) for part in text.split(',')]
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"--num_workers {text}: expected non-negative integers or N")
    return list(dict.fromkeys(counts))


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', nargs='?', choices=('loader', 'scan'), default='loader')
    p.add_argument('--images', type=int, default=96, help='JPEGs to make (loader)')
    p.add_argument('--img_size', type=int, default=224)
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--num_workers', type=worker_counts, default=worker_counts('0,1,2,N'),
                   help="comma-separated loader worker counts; N is this machine's cores; 0 loads in this process, "
                        "timed by its CPU time (steady on a shared machine)")
    p.add_argument('--rounds', type=int, default=2, help='rounds over every configuration; the best one is shown')
    p.add_argument('--passes', type=int, default=1, help='epochs over the JPEGs per measurement')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                   help='cuda: pinned batches normalised on the GPU, and a GPU-decode row')
    p.add_argument('--files', type=int, default=1_281_167, help='empty files to scan (scan)')
    p.add_argument('--json', default=None, help='also write the rows to this JSON file')
    args = p.parse_args(argv)
    for flag in ('images', 'img_size', 'batch_size', 'rounds', 'passes', 'files'):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    if args.images < 2 * args.batch_size:
        p.error(f"--images {args.images}: expected at least two batches of --batch_size {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args(argv)
    torch.set_num_threads(1)  # one core per loader process, as DataLoader workers run
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, Pillow {Image.__version__}", flush=True)
    rows = scan_table(args) if args.what == 'scan' else loader_table(args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + '\n')
    return rows


if __name__ == '__main__':
    command_line(main, 'loader.py')
