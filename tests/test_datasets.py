"""Tests for datasets.py and tools/prepare_digits.py on small data written to tmp_path."""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from datasets import (CorruptImageError, DatasetError, DatasetNotFoundError, INatDataset,
                      build_dataset, build_transform, load_rgb)

from conftest import load_module

REPO = Path(__file__).resolve().parents[1]


def make_args(data_path, **overrides):
    """The fields main.py's parser provides, with its defaults."""
    fields = dict(data_path=str(data_path), data_set='IMAGEFOLDER', input_size=32, color_jitter=0.4,
                  aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.25,
                  remode='pixel', recount=1, inat_category='name')
    fields.update(overrides)
    return argparse.Namespace(**fields)


def write_image(path, value, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, (value, value, value)).save(path)


def make_image_folder(root, classes=('cat', 'dog', 'emu'), per_class=2):
    for split in ('train', 'val'):
        for label, name in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / name / f'{i}.png', 40 * label)
    return root


def load_prepare_digits():
    return load_module('tools/prepare_digits.py')


def test_image_folder_counts_classes_and_labels(tmp_path):
    make_image_folder(tmp_path, classes=('b', 'a', 'c', 'd'), per_class=3)
    dataset, num_classes = build_dataset(False, make_args(tmp_path))
    assert num_classes == 4
    assert dataset.classes == ['a', 'b', 'c', 'd']
    assert len(dataset) == 12
    image, label = dataset[len(dataset) - 1]
    assert image.shape == (3, 32, 32)
    assert label == 3


def test_train_split_applies_augmentation_pipeline(tmp_path):
    make_image_folder(tmp_path, per_class=1)
    dataset, num_classes = build_dataset(True, make_args(tmp_path, data_set='IMNET', input_size=48))
    image, label = dataset[0]
    assert num_classes == 3 and label == 0
    assert image.shape == (3, 48, 48)


def test_missing_data_path_is_named(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(DatasetNotFoundError, match='data path .*nowhere does not exist'):
        build_dataset(True, make_args(missing))


def test_missing_val_folder_is_named(tmp_path):
    write_image(tmp_path / 'train' / 'a' / '0.png', 0)
    with pytest.raises(FileNotFoundError, match=r'val folder .*val does not exist'):
        build_dataset(True, make_args(tmp_path))


def test_split_without_class_folders(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    with pytest.raises(DatasetError, match='no class folders in .*train'):
        build_dataset(True, make_args(tmp_path))


def test_empty_class_folder_is_named(tmp_path):
    make_image_folder(tmp_path, classes=('a', 'b'))
    (tmp_path / 'train' / 'zebra').mkdir()
    (tmp_path / 'val' / 'zebra').mkdir()
    (tmp_path / 'train' / 'zebra' / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match=r"no images in 1 class folder\(s\) of .*train: \['zebra'\]"):
        build_dataset(True, make_args(tmp_path))


def test_differing_class_lists_name_the_classes(tmp_path):
    make_image_folder(tmp_path, classes=('a', 'b'))
    write_image(tmp_path / 'train' / 'only_train' / '0.png', 0)
    write_image(tmp_path / 'val' / 'only_val' / '0.png', 0)
    with pytest.raises(DatasetError, match=r"only in train: \['only_train'\], only in val: \['only_val'\]"):
        build_dataset(False, make_args(tmp_path))


def test_unknown_data_set_lists_valid_names(tmp_path):
    with pytest.raises(DatasetError, match="unknown data_set 'MNIST'; choose one of: CIFAR, CIFAR10, .*IMNET"):
        build_dataset(True, make_args(tmp_path, data_set='MNIST'))


def test_cifar_alias_means_cifar100_and_missing_copy_is_explained(tmp_path):
    with pytest.raises(DatasetNotFoundError, match='CIFAR100 folder .*cifar-100-python.*--download'):
        build_dataset(True, make_args(tmp_path, data_set='CIFAR'))


def test_corrupt_image_error_names_the_file(tmp_path):
    make_image_folder(tmp_path, classes=('a',), per_class=1)
    broken = tmp_path / 'val' / 'a' / 'broken.png'
    broken.write_bytes(b'\x00garbage, not a PNG' * 10)
    dataset, _ = build_dataset(False, make_args(tmp_path))
    index = [str(path) for path, _ in dataset.samples].index(str(broken))
    with pytest.raises(CorruptImageError, match=re.escape(f'cannot read image {broken}: ')):
        dataset[index]
    assert isinstance(CorruptImageError('x'), ValueError)


def test_load_rgb_converts_grayscale(tmp_path):
    Image.new('L', (5, 4), 200).save(tmp_path / 'gray.png')
    image = load_rgb(tmp_path / 'gray.png')
    assert image.mode == 'RGB' and image.size == (5, 4)
    assert image.getpixel((0, 0)) == (200, 200, 200)


def test_eval_transform_224_resizes_to_256_then_crops():
    transform = build_transform(False, make_args('.', input_size=224))
    resize, crop = transform.transforms[0], transform.transforms[1]
    assert resize.size == 256
    assert resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert crop.size == (224, 224)
    # A 640x480 image: shorter side -> 256, then the 224 centre crop.
    assert transform(Image.new('RGB', (640, 480))).shape == (3, 224, 224)


def test_eval_crop_ratio_scales_resize():
    transform = build_transform(False, make_args('.', input_size=384, eval_crop_ratio=1.0))
    assert transform.transforms[0].size == 384
    assert build_transform(False, make_args('.', input_size=384)).transforms[0].size == 438


def test_eval_transform_32_keeps_whole_image_and_normalizes():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    output = build_transform(False, make_args('.', input_size=32))(Image.fromarray(pixels))
    assert output.shape == (3, 32, 32)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(output, expected)


def test_small_train_transform_uses_padded_random_crop():
    transform = build_transform(True, make_args('.', input_size=32))
    crop = transform.transforms[0]
    assert isinstance(crop, transforms.RandomCrop)
    assert crop.size == (32, 32) and crop.padding == 4
    large = build_transform(True, make_args('.', input_size=224))
    assert type(large.transforms[0]).__name__ == 'RandomResizedCropAndInterpolation'


def make_inat(root, year=2018):
    """Four species in two genera; train has all four, val two of them."""
    categories = [
        {'id': i, 'name': name, 'genus': genus, 'family': 'F', 'order': 'O', 'class': 'C',
         'phylum': 'P', 'kingdom': 'K', 'supercategory': 'S'}
        for i, (name, genus) in enumerate([('wolf', 'Canis'), ('jackal', 'Canis'),
                                           ('lion', 'Panthera'), ('tiger', 'Panthera')])]
    (root / 'categories.json').write_text(json.dumps(categories))

    def split(name, category_ids):
        images, annotations = [], []
        for image_id, category_id in enumerate(category_ids):
            file_name = f'train_val{year}/S/{category_id}/{name}_{image_id}.jpg'
            write_image(root / file_name, 50 * category_id, size=(10, 10))
            images.append({'id': image_id + 100, 'file_name': file_name})
            annotations.append({'id': image_id, 'image_id': image_id + 100, 'category_id': category_id})
        (root / f'{name}{year}.json').write_text(json.dumps({'images': images, 'annotations': annotations}))

    split('train', [3, 0, 1, 2, 0])
    split('val', [2, 1])


def test_inat_labels_by_taxonomy_level(tmp_path):
    make_inat(tmp_path)
    by_name = INatDataset(tmp_path, train=True, category='name')
    assert by_name.classes == ['jackal', 'lion', 'tiger', 'wolf']
    assert by_name.targets == [2, 3, 0, 1, 3]  # tiger, wolf, jackal, lion, wolf
    val_by_genus = INatDataset(tmp_path, train=False, category='genus')
    assert val_by_genus.classes == ['Canis', 'Panthera']
    assert val_by_genus.targets == [1, 0]
    image, label = val_by_genus[0]
    assert image.size == (10, 10) and image.getpixel((0, 0)) == (100, 100, 100) and label == 1


def test_build_dataset_inat19_and_alias(tmp_path):
    make_inat(tmp_path, year=2019)
    dataset, num_classes = build_dataset(False, make_args(tmp_path, data_set='INAT19', inat_category='genus'))
    assert num_classes == 2 and len(dataset) == 2
    assert dataset[1][0].shape == (3, 32, 32)
    with pytest.raises(DatasetNotFoundError, match='annotation file .*train2018.json does not exist'):
        build_dataset(False, make_args(tmp_path, data_set='INAT18'))


def test_inat_rejects_unknown_level_and_unseen_val_labels(tmp_path):
    make_inat(tmp_path)
    with pytest.raises(DatasetError, match="unknown iNaturalist category level 'species'; choose one of: kingdom"):
        INatDataset(tmp_path, category='species')
    val = json.loads((tmp_path / 'val2018.json').read_text())
    categories = json.loads((tmp_path / 'categories.json').read_text())
    categories.append(dict(categories[0], id=4, name='dingo'))
    (tmp_path / 'categories.json').write_text(json.dumps(categories))
    val['annotations'][0]['category_id'] = 4
    (tmp_path / 'val2018.json').write_text(json.dumps(val))
    with pytest.raises(DatasetError, match=r"val2018.json has name labels that train2018.json lacks: \['dingo'\]"):
        INatDataset(tmp_path, train=False, category='name')


def test_prepare_digits_writes_stratified_split_once(tmp_path, capsys):
    prepare_digits = load_prepare_digits()
    out = tmp_path / 'digits'
    counts = prepare_digits.prepare_digits(out, size=16)
    assert counts == {'train': 1437, 'val': 360}
    for split, count in counts.items():
        class_dirs = sorted(p.name for p in (out / split).iterdir())
        assert class_dirs == [str(d) for d in range(10)]
        assert len(list((out / split).glob('*/*.png'))) == count
    train_names = {p.name for p in (out / 'train').glob('*/*.png')}
    val_names = {p.name for p in (out / 'val').glob('*/*.png')}
    assert not train_names & val_names and len(train_names | val_names) == 1797
    assert not list(tmp_path.glob('.digits.partial-*'))

    # Sample 0 (a zero): averaging 2x2 blocks of the 16 px image recovers the 8x8 scan * 255/16.
    zero = Image.open(out / ('train' if '0000.png' in train_names else 'val') / '0' / '0000.png')
    assert zero.mode == 'RGB' and zero.size == (16, 16)
    pixels = np.asarray(zero, dtype=np.float64)[..., 0]
    blocks = pixels.reshape(8, 2, 8, 2).mean(axis=(1, 3))  # (16, 16) -> (8, 8)
    scan = load_digits().images[0] * 255 / 16
    assert np.abs(blocks - scan).mean() < 20
    assert np.corrcoef(blocks.ravel(), scan.ravel())[0, 1] > 0.95

    capsys.readouterr()
    assert prepare_digits.prepare_digits(out, size=16) is None
    assert 'already holds 1797 images' in capsys.readouterr().out
    with pytest.raises(FileExistsError, match='16x16 images, not 32x32'):
        prepare_digits.prepare_digits(out, size=32)

    dataset, num_classes = build_dataset(False, make_args(out))
    assert num_classes == 10 and len(dataset) == 360


def test_prepare_digits_command_line(tmp_path):
    out = tmp_path / 'data' / 'digits'
    command = [sys.executable, str(REPO / 'tools' / 'prepare_digits.py'), '--out', str(out), '--size', '32']
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert 'train: 1437 images' in result.stdout and 'val: 360 images' in result.stdout
    assert Image.open(next(out.glob('val/*/*.png'))).size == (32, 32)
    assert len(list(out.glob('*/*/*.png'))) == 1797
