"""Datasets and image transforms for classification training, in the DeiT layout.

`build_dataset(is_train, args)` returns `(dataset, num_classes)` for one split of:

- IMNET / IMAGEFOLDER: `<data_path>/train/<class>/<image>` and `<data_path>/val/<class>/<image>`,
  any number of classes (the class index is the position of the folder name in sorted order);
- CIFAR10 / CIFAR100 (alias CIFAR): torchvision's copies under `<data_path>`;
- INAT (alias INAT18) / INAT19: iNaturalist's JSON annotations under `<data_path>`.

Every problem a user can cause (a wrong path, an empty class folder, splits with different
classes, an unreadable image) raises one of the errors below with a message that names the file
or folder and says what to do.
"""
import json
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import datasets, transforms

INAT_CATEGORY_LEVELS = ('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name')
# Inputs at or below this size are treated like CIFAR: they are used at their native scale.
SMALL_INPUT_SIZE = 32


class DatasetError(ValueError):
    """The data on disk or the dataset options cannot make a valid dataset."""


class DatasetNotFoundError(FileNotFoundError):
    """A folder or file the dataset needs does not exist."""


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded."""


def load_rgb(path):
    """Open an image file as an RGB PIL image; name the file if it cannot be decoded.

    Replaces torchvision's default loader, whose bare PIL traceback from inside a DataLoader
    worker does not say which of a million files is broken.
    """
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # OSError covers PIL's UnidentifiedImageError and truncated files; SyntaxError and
        # ValueError are what some PIL plugins raise for malformed headers.
        raise CorruptImageError(
            f'cannot read image {path}: {error}. Replace or delete the file.') from error


def build_transform(is_train, args):
    """The training augmentation (timm's RandAugment recipe) or the evaluation resize-and-crop.

    Inputs of at most 32 px follow DeiT's CIFAR handling: training uses a padded random crop
    instead of RandomResizedCrop, and evaluation keeps the whole image (resized to input_size)
    instead of the 0.875 centre crop, so both see objects at the same scale.
    """
    input_size = args.input_size
    if is_train:
        transform = create_transform(
            input_size=input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=args.aa, interpolation=args.train_interpolation,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        if input_size <= SMALL_INPUT_SIZE:
            # Cropping 8-100% of a 32 px image and scaling it back up destroys small objects.
            crop_at = [isinstance(t, RandomResizedCropAndInterpolation) for t in transform.transforms]
            transform.transforms[crop_at.index(True)] = transforms.RandomCrop(input_size, padding=4)
        return transform

    crop_ratio = 1.0 if input_size <= SMALL_INPUT_SIZE else getattr(args, 'eval_crop_ratio', 0.875)
    if not 0 < crop_ratio <= 1:
        raise DatasetError(f'eval_crop_ratio must be in (0, 1], got {crop_ratio}.')
    return transforms.Compose([
        # int() as DeiT: 224 / 0.875 = 256 exactly, 384 / 0.875 = 438.
        transforms.Resize(int(input_size / crop_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def _require_dir(path, what, hint):
    if path is None or not Path(path).is_dir():
        raise DatasetNotFoundError(f'{what} {path} does not exist or is not a folder; {hint}.')
    return Path(path)


def _class_folders(split_dir):
    """Sorted class folder names, the same order torchvision's ImageFolder uses for labels."""
    names = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
    if not names:
        raise DatasetError(
            f'no class folders in {split_dir}; expected {split_dir}/<class name>/<image files>.')
    return names


def _check_same_classes(root, train_classes, val_classes):
    """Both splits must list the same folders, otherwise label i means different classes."""
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    if only_train or only_val:
        raise DatasetError(
            f'the class folders of {root}/train and {root}/val differ: only in train: {only_train}, '
            f'only in val: {only_val}. Give both splits the same class folders.')


def _check_no_empty_classes(dataset, split_dir):
    counts = Counter(dataset.targets)
    empty = [name for index, name in enumerate(dataset.classes) if counts[index] == 0]
    if empty:
        extensions = ', '.join(datasets.folder.IMG_EXTENSIONS)
        raise DatasetError(
            f'no images in {len(empty)} class folder(s) of {split_dir}: {empty[:10]}. '
            f'Add images ({extensions}) or remove the folders.')


def _build_image_folder(is_train, args, transform):
    """ImageNet or any ImageFolder tree with train/ and val/ splits."""
    root = _require_dir(args.data_path, 'data path',
                        'pass --data-path pointing at a folder with train/ and val/')
    hint = 'it must hold one sub-folder of images per class'
    train_classes = _class_folders(_require_dir(root / 'train', 'train folder', hint))
    val_classes = _class_folders(_require_dir(root / 'val', 'val folder', hint))
    _check_same_classes(root, train_classes, val_classes)

    split_dir = root / ('train' if is_train else 'val')
    # allow_empty=True so that the check below can name every empty folder at once.
    dataset = datasets.ImageFolder(split_dir, transform=transform, loader=load_rgb, allow_empty=True)
    _check_no_empty_classes(dataset, split_dir)
    return dataset, len(dataset.classes)


def _build_cifar(dataset_class, num_classes):
    def build(is_train, args, transform):
        download = getattr(args, 'download', False)
        if not download:
            root = _require_dir(args.data_path, 'data path', 'pass --data-path or --download')
            expected = root / dataset_class.base_folder
            _require_dir(expected, f'{dataset_class.__name__} folder',
                         f'extract the python version of {dataset_class.__name__} into {root} '
                         'or pass --download')
        dataset = dataset_class(args.data_path, train=is_train, transform=transform, download=download)
        return dataset, num_classes
    return build


def _build_inat(year):
    def build(is_train, args, transform):
        dataset = INatDataset(args.data_path, train=is_train, year=year,
                              category=args.inat_category, transform=transform)
        return dataset, len(dataset.classes)
    return build


_BUILDERS = {
    'IMNET': _build_image_folder,
    'IMAGEFOLDER': _build_image_folder,
    'CIFAR10': _build_cifar(datasets.CIFAR10, 10),
    'CIFAR100': _build_cifar(datasets.CIFAR100, 100),
    'INAT': _build_inat(2018),
    'INAT19': _build_inat(2019),
}
# Spellings of the official DeiT/Twins commands.
_ALIASES = {'CIFAR': 'CIFAR100', 'INAT18': 'INAT'}


def build_dataset(is_train, args):
    """Build the train (is_train=True) or validation split named by args.data_set.

    Returns:
        (dataset, num_classes); the dataset yields (image tensor (3, H, W), class index).
    """
    name = _ALIASES.get(args.data_set, args.data_set)
    if name not in _BUILDERS:
        valid = ', '.join(sorted([*_BUILDERS, *_ALIASES]))
        raise DatasetError(f'unknown data_set {args.data_set!r}; choose one of: {valid}.')
    return _BUILDERS[name](is_train, args, build_transform(is_train, args))


def _read_json(path):
    if not path.is_file():
        raise DatasetNotFoundError(
            f'iNaturalist annotation file {path} does not exist; put the released JSON files in --data-path.')
    with open(path) as f:
        return json.load(f)


def _inat_samples(annotation_path, categories, level):
    """(file_name, taxonomy label) per image of one iNaturalist annotation file."""
    data = _read_json(annotation_path)
    category_of_image = {a['image_id']: a['category_id'] for a in data['annotations']}
    samples = []
    for image in data['images']:
        if image['id'] not in category_of_image:
            raise DatasetError(f'{annotation_path}: image {image["id"]} has no annotation.')
        category_id = category_of_image[image['id']]
        if category_id not in categories:
            raise DatasetError(
                f'{annotation_path}: category {category_id} of image {image["id"]} is not in categories.json.')
        samples.append((image['file_name'], categories[category_id][level]))
    return samples


class INatDataset(torch.utils.data.Dataset):
    """iNaturalist 2018 or 2019 read from its released JSON annotations.

    The root holds train{year}.json, val{year}.json, categories.json (a list of category
    records with 'id' and one field per taxonomy level) and the image folders the JSON
    'file_name' fields point to, relative to the root. The label of an image is the value of
    one taxonomy level of its category; class indices number the sorted values found in the
    train split, so train and val agree and the order does not depend on file order.

    Args:
        root: folder with the JSON files and images.
        train: the train split if True, else the val split.
        year: 2018 or 2019.
        category: taxonomy level used as the label, one of INAT_CATEGORY_LEVELS.
        transform: applied to the RGB PIL image.

    Items are (transformed image, class index).
    """

    def __init__(self, root, train=True, year=2018, category='name', transform=None):
        if category not in INAT_CATEGORY_LEVELS:
            raise DatasetError(f'unknown iNaturalist category level {category!r}; '
                               f'choose one of: {", ".join(INAT_CATEGORY_LEVELS)}.')
        self.root = _require_dir(root, 'data path', 'pass --data-path pointing at the iNaturalist folder')
        self.transform = transform
        categories = {c['id']: c for c in _read_json(self.root / 'categories.json')}
        # The class list always comes from the train split, also when building val.
        train_samples = _inat_samples(self.root / f'train{year}.json', categories, category)
        self.classes = sorted({label for _, label in train_samples})
        class_index = {label: index for index, label in enumerate(self.classes)}

        if train:
            split_samples = train_samples
        else:
            split_samples = _inat_samples(self.root / f'val{year}.json', categories, category)
        unseen = sorted({label for _, label in split_samples} - class_index.keys())
        if unseen:
            raise DatasetError(
                f'val{year}.json has {category} labels that train{year}.json lacks: {unseen[:10]}.')
        self.samples = [(self.root / name, class_index[label]) for name, label in split_samples]
        self.targets = [target for _, target in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target
