"""ImageFolder trees: the fast folder scan, its cached file list, and `ImageFiles` reading them (with
ImageNet-1k's readable class names for its WNID folders).
"""
import itertools
import logging
import os
import stat
from pathlib import Path
from typing import Iterator

from PIL import Image
from torch.utils.data import Dataset

from utils.errors import one_line
from utils.files import write_atomic
from utils.images import IMAGE_EXTENSIONS, open_image


IMAGENET_NAMES = Path(__file__).parent / 'imagenet_classes.txt'
IMAGENET_WNIDS = Path(__file__).parent / 'imagenet_wnids.txt'  # the 1000 ImageNet-1k WordNet ids, sorted
logger = logging.getLogger(__name__)


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
