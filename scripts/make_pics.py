"""Export sample digits from the held-out (val) part of the digits set to pic/, named by true label.

    python scripts/make_pics.py            # pic/digit_0.png ... pic/digit_9.png and pic/1.jpg

Uses the same fixed split as training (`utils.data_utils.digits_split`), so none of these images
was seen by a model trained on `digits`. pic/1.jpg, test.py's default image, is the first val `1`.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402

sys.path.insert(0, str(ROOT))
from utils.data_utils import digits_split  # noqa: E402


def first_of_each_label(labels: np.ndarray) -> dict[int, int]:
    """label -> index of its first occurrence."""
    return {int(label): int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=ROOT / 'pic')
    parser.add_argument('--size', type=int, default=32,
                        help="side of the saved images: the demo's --img_size, so that test.py sees exactly the pixels "
                             "training's evaluation transform makes of the 8x8 originals (the same bilinear resize)")
    args = parser.parse_args()
    images, labels = digits_split('val')
    args.out.mkdir(parents=True, exist_ok=True)
    for label, index in first_of_each_label(labels).items():
        picture = Image.fromarray(images[index]).resize((args.size, args.size), Image.BILINEAR)
        picture.save(args.out / f'digit_{label}.png')
        if label == 1:
            picture.convert('RGB').save(args.out / '1.jpg', quality=95)
        print(f"{args.out / f'digit_{label}.png'}: val image {index}, label {label}")


if __name__ == '__main__':
    main()
