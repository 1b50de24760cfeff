"""Export sample digits from the held-out (val) part of the digits set to pic/, named by true label.

    python scripts/make_pics.py            # pic/digit_0.png ... pic/digit_9.png and pic/1.jpg

Uses the same fixed split as training (`utils.data_utils.digits_split`), so none of these images
was seen by a model trained on `digits`. pic/1.jpg, test.py's default image, is the first val `1`.
Files are written by utils/outputs.py's rule: an existing file is replaced only if this project wrote it
(each picture carries the mark), and every name is checked before the first is written.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == '__main__':  # a Ctrl-C or the machine's OSError during the slow imports below: one line too
    from utils.errors import starting
    starting()

import argparse  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

from utils import outputs, tool  # noqa: E402
from utils.errors import command_line  # noqa: E402
from utils.data_utils import digits_split  # noqa: E402
from utils.files import write_atomic  # noqa: E402

TOOL = 'make_pics.py'
MAX_SIZE = 1024  # the originals are 8x8: larger pictures only repeat pixels


def first_of_each_label(labels: np.ndarray) -> dict[int, int]:
    """label -> index of its first occurrence."""
    return {int(label): int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)}


def save_marked(picture: Image.Image, path: Path) -> None:
    """Save atomically, with this tool's mark (a PNG text chunk or a JPEG comment)."""
    if path.suffix == '.png':
        info = PngImagePlugin.PngInfo()
        info.add_text('Software', outputs.mark(TOOL))
        write_atomic(path, lambda tmp: picture.save(tmp, pnginfo=info))
    else:
        write_atomic(path, lambda tmp: picture.convert('RGB').save(tmp, quality=95, comment=outputs.mark(TOOL)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=TOOL, description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=ROOT / 'pic')
    parser.add_argument('--size', type=int, default=32,
                        help="side of the saved images: the demo's --img_size, so that test.py sees exactly the pixels "
                             "training's evaluation transform makes of the 8x8 originals (the same bilinear resize)")
    args = parser.parse_args(argv)
    if not 1 <= args.size <= MAX_SIZE:
        parser.error(f"--size {args.size}: expected a side from 1 to {MAX_SIZE} pixels")
    images, labels = digits_split('val')
    firsts = first_of_each_label(labels)
    names = [f'digit_{label}.png' for label in firsts] + ['1.jpg']
    for name in names:  # all checked before the first is written
        outputs.check_output(args.out / name, '--out', (Path(name).suffix,))
    for label, index in firsts.items():
        picture = Image.fromarray(images[index]).resize((args.size, args.size), Image.BILINEAR)
        save_marked(picture, args.out / f'digit_{label}.png')
        if label == 1:
            save_marked(picture, args.out / '1.jpg')
        print(f"{args.out / f'digit_{label}.png'}: val image {index}, label {label}")


if __name__ == '__main__':
    command_line(main, TOOL, expected=tool.EXPECTED)
