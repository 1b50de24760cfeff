"""Write an ImageFolder split into tar shards (webdataset's format) that train.py and eval.py can stream.

    python scripts/make_shards.py --data_dir /path/to/imagenet --split val --out shards/
    python scripts/make_shards.py --data_dir /path/to/imagenet --split train --out shards/ --shard_size 1000

Shard i is <out>/<split>-<i:06d>.tar. It starts with __meta__ (JSON: the class names and folders, which images
it holds, how many in all), then per image <index:09d>.<ext> (the file's bytes, not re-encoded) and
<index:09d>.cls (its class index). The images are shuffled once, by --seed, so every shard mixes the classes.
The output is deterministic: the same tree, --seed and --shard_size give the same bytes. An interrupted run
continues where it stopped: finished shards of the same plan are kept, the rest are written. A file at a
shard's name that this script did not write for this plan is never replaced: the run stops with one line.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting()

import argparse
import hashlib
import io
import json
import os
import tarfile

import numpy as np

from utils.folders import imagenet_names, scan_image_folder  # noqa: E402
from utils.shards import SHARD_FORMAT, SHARD_META, ShardError, open_shard  # noqa: E402
from utils.errors import command_line  # noqa: E402
from utils.files import write_atomic  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_dir', required=True, help='dataset root holding <split>/<class>/<images>')
    p.add_argument('--split', default='train', help='the folder under --data_dir to write (train, val)')
    p.add_argument('--out', required=True, help='folder for the shards')
    p.add_argument('--shard_size', type=int, default=1000, help='images per shard (the last holds the rest)')
    p.add_argument('--seed', type=int, default=0, help='the shuffle of the images over the shards')
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard_size {args.shard_size}: expected a positive integer")
    return args


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular file with fixed owner, mode and time, so that the same input gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, '', ''
    tar.addfile(info, io.BytesIO(data))


def shard_meta(plan: dict, shard: int, first: int, count: int) -> dict:
    return {'format': SHARD_FORMAT, **plan, 'shard': shard, 'first': first, 'images': count}


def existing_meta(path: Path) -> dict | None:
    """The metadata of a complete shard at `path` (a regular file whose every member reads), None if it is not one
    (a FIFO or other special file is never opened)."""
    if not path.is_file():
        return None
    try:
        with open_shard(str(path)) as (meta, members):
            count = sum(1 for _ in members)
        return meta if count == 2 * meta.get('images', -1) else None
    except (ShardError, OSError, tarfile.TarError):
        return None


def shuffled(samples: list, seed: int) -> list:
    """The samples in their order over the shards: shuffled once by `seed`, so that shards mix the classes."""
    return [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]


def make_shards(args: argparse.Namespace) -> list[Path]:
    """Write (or finish writing) the shards; their paths."""
    root = Path(args.data_dir) / args.split
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected --data_dir holding {args.split}/<class>/<images>")
    folders, samples = scan_image_folder(root)
    relative = [(os.path.relpath(path, root), label) for path, label in shuffled(samples, args.seed)]
    digest = hashlib.sha256(json.dumps([relative, args.shard_size]).encode()).hexdigest()
    shards = -(-len(samples) // args.shard_size)
    plan = {'split': args.split, 'classes': imagenet_names(folders), 'folders': folders, 'total': len(samples),
            'shards': shards, 'seed': args.seed, 'shard_size': args.shard_size, 'plan': digest}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    planned = []
    for shard in range(shards):
        first = shard * args.shard_size
        planned.append((out / f'{args.split}-{shard:06d}.tar', first,
                        shard_meta(plan, shard, first, min(args.shard_size, len(samples) - first))))
    done = set()
    for path, _, meta in planned:  # every place checked before any shard is written: nothing half done
        if path.exists() or path.is_symlink():
            if existing_meta(path) != meta:
                raise FileExistsError(f"{path} exists and is not shard {meta['shard']} of this plan (another tree, "
                                      "--seed or --shard_size, a damaged shard, or not a shard): expected a new --out, "
                                      "or remove it")
            done.add(path)  # written by an earlier run of this plan
    for path, first, meta in planned:
        if path in done:
            continue

        def write(tmp: Path, first=first, meta=meta) -> None:
            with tarfile.open(tmp, mode='w', format=tarfile.USTAR_FORMAT) as tar:
                add_member(tar, SHARD_META, json.dumps(meta, sort_keys=True).encode())
                for index in range(first, first + meta['images']):
                    file, label = relative[index]
                    extension = os.path.splitext(file)[1].lower()
                    add_member(tar, f'{index:09d}{extension}', (root / file).read_bytes())
                    add_member(tar, f'{index:09d}.cls', str(label).encode())
        write_atomic(path, write)
        print(f"wrote {path} ({meta['images']} images)", flush=True)
    return [path for path, _, _ in planned]


def main(argv: list[str] | None = None) -> list[Path]:
    args = get_args(argv)
    paths = make_shards(args)
    pattern = f"{args.split}-{{{0:06d}..{len(paths) - 1:06d}}}.tar"
    print(f"{len(paths)} shards in {args.out}: pass --shards '{Path(args.out) / pattern}'", flush=True)
    return paths


if __name__ == '__main__':
    command_line(main, 'make_shards.py')
