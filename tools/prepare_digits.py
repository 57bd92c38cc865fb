"""Write scikit-learn's handwritten digits as an ImageFolder tree for the CPU demo.

The 1,797 real 8x8 scans (10 classes) ship inside scikit-learn, so nothing is downloaded. They
are split once, stratified 80/20 with a fixed seed, scaled from 0..16 to 0..255, upscaled with
bicubic interpolation and saved as RGB PNGs:

    <out>/train/<digit>/<index>.png    <out>/val/<digit>/<index>.png

where <index> is the sample's position in load_digits(). Usage:

    python tools/prepare_digits.py --out data/digits --size 32
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_IMAGES = 1797


def split_indices(targets, val_fraction=0.2, seed=0):
    """Stratified {'train': indices, 'val': indices}, the same on every machine."""
    train, val = train_test_split(
        np.arange(len(targets)), test_size=val_fraction, stratify=targets, random_state=seed)
    return {'train': np.sort(train), 'val': np.sort(val)}


def digit_image(scan, size):
    """8x8 array of 0..16 -> size x size RGB PIL image."""
    gray = np.round(scan * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC).convert('RGB')


def _existing_count(out, size):
    """Number of PNGs already in out; raise if they cannot be the dataset asked for."""
    pngs = sorted(out.glob('*/*/*.png'))
    if len(pngs) != NUM_IMAGES:
        raise FileExistsError(
            f'{out} exists with {len(pngs)} PNG files instead of {NUM_IMAGES}; delete it or pick another --out.')
    with Image.open(pngs[0]) as image:
        if image.size != (size, size):
            raise FileExistsError(
                f'{out} holds {image.size[0]}x{image.size[1]} images, not {size}x{size}; '
                'delete it or pick another --out.')
    return len(pngs)


def _write_split(root, images, targets, indices):
    for index in indices:
        class_dir = root / str(targets[index])
        class_dir.mkdir(parents=True, exist_ok=True)
        images[index].save(class_dir / f'{index:04d}.png')


def prepare_digits(out, size=32, val_fraction=0.2, seed=0):
    """Write the dataset to out unless it is already there.

    Returns:
        {'train': count, 'val': count}, or None when out already held the dataset.
    """
    out = Path(out)
    if out.exists():
        print(f'{out} already holds {_existing_count(out, size)} images; nothing to do.')
        return None

    digits = load_digits()
    images = [digit_image(scan, size) for scan in digits.images]
    splits = split_indices(digits.target, val_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the destination and rename at the end, so an interrupted run never leaves
    # a half-written dataset at `out` that a later run would mistake for a complete one.
    staging = Path(tempfile.mkdtemp(prefix=f'.{out.name}.partial-', dir=out.parent))
    try:
        for split, indices in splits.items():
            _write_split(staging / split, images, digits.target, indices)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    counts = {split: len(indices) for split, indices in splits.items()}
    for split, indices in splits.items():
        per_class = np.bincount(digits.target[indices], minlength=10).tolist()
        print(f'{split}: {counts[split]} images, per class {per_class}')
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=Path('data/digits'), help='destination folder')
    parser.add_argument('--size', type=int, default=32, help='side length of the saved images in pixels')
    parser.add_argument('--val-fraction', type=float, default=0.2, help='share of each class held out for val')
    parser.add_argument('--seed', type=int, default=0, help='seed of the stratified split')
    args = parser.parse_args()
    prepare_digits(args.out, args.size, args.val_fraction, args.seed)


if __name__ == '__main__':
    main()
