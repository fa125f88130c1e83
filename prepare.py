"""Prepare a dataset as vlmkd split files: `relative/path label` lines (paths relative to --out),
`classes.txt` (line i names label i) and `prepare.json` (what made them); ends with the statistics
found next to the published ones.

    python prepare.py fashion-mnist-lt --out data/fmnist-lt         # embedded default, 500 -> 5
    python prepare.py cifar100-lt --out data/c100-lt --imbalance 100   # downloads, or --source DIR
    python prepare.py imagenet-lt --lists ImageNet_LT/ --root /data/imagenet --out data/imagenet-lt
    python prepare.py places-lt --lists Places_LT/ --root /data/places365 --out data/places-lt
    python prepare.py food101 --source /data/food101 --out data/food101-ood    # ID/OOD class halves
    python prepare.py cub --source /data/cub --protocol li \\
        --li-lists large_vlm_distillation_ood/data/CaltechBirds --out data/cub-li
    python prepare.py folder --root photos/ --out data/photos --imbalance 50

Long-tail sets keep n_i = floor(n_max * IF^(-i/(C-1))) training images of class i (Cao et al.
2019), val from the training images left unused, test = the whole official test set. Published
lists (ImageNet-LT, Places-LT, iNat 2018) are kept as they are, their images linked. OOD sets put
the ID classes first (id_classes.txt): --protocol ours keeps each half's official split, --protocol
li writes Li et al.'s files (ICCV 2023: ID pooled 70/30, all OOD images, 5-shot li_train.txt).
"""
import argparse
import gzip
import hashlib
import json
import os
import pickle
import re
import sys
import typing
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image


# The one shared helper the Config needs above it; the others are at the back of the file.
def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


# --- config

LT_SETS = ("fashion-mnist-lt", "cifar10-lt", "cifar100-lt")
LIST_SETS = ("imagenet-lt", "places-lt", "inat2018")
OOD_SETS = ("flowers102", "food101", "stanford-cars", "sun397", "cub")


@dataclass
class Config:
    dataset: Literal["fashion-mnist-lt", "cifar10-lt", "cifar100-lt", "imagenet-lt", "places-lt",
                     "inat2018", "flowers102", "food101", "stanford-cars", "sun397", "cub",
                     "folder"] = opt("fashion-mnist-lt", "the dataset to prepare",
                                     heading="Dataset")
    out: str = opt("data/fmnist-lt", "output folder (made if missing; must be writable)")
    seed: int = opt(0, "seed of every random choice: long-tail subsets, val images, class halves")
    max_per_class: int = opt(0, "training images of the largest class, n_max (0: the published "
                                "5000 for cifar10-lt, 500 for the others)",
                             heading="Long-tail profile (fashion-mnist-lt, cifar10/100-lt, folder)")
    imbalance: float = opt(100.0, "imbalance factor IF = largest / smallest class; 1: none")
    val_per_class: int = opt(-1, "val images per class, from training images the long tail left "
                                 "unused (-1: 20 for cifar100-lt, 100 otherwise)")
    test_per_class: int = opt(0, "cap on test images per class (0: the whole official test set)")
    val_frac: float = opt(0.1, "folder: fraction of each class for val")
    test_frac: float = opt(0.1, "folder: fraction of each class for test")
    source: str = opt("", "local copy: fashion-mnist's IDX folder; the folder of CIFAR's python "
                          "version (else downloaded to data/cifar-download); an OOD set's root in "
                          "torchvision's layout", heading="Sources")
    lists: str = opt("", "folder with the published split lists (imagenet-lt, places-lt, inat2018)")
    root: str = opt("", "image root the published lists are relative to; folder: one subfolder of "
                        "images per class")
    categories: str = opt("", "class names: places-lt's categories_places365.txt, inat2018's "
                              "categories.json (default: that file in --lists)")
    class_names: str = opt("", "optional file, one class name a line, replacing the names found")
    protocol: Literal["ours", "li"] = opt(
        "ours", "OOD sets: ours = official train/test split of each class half; li = Li et al. "
                "2023 (ID pooled 70/30, all OOD images, 5-shot files)",
        heading="OOD protocol (flowers102, food101, stanford-cars, sun397, cub)")
    li_lists: str = opt("", "--protocol li: Li et al.'s data/<Dataset> folder, their class halves "
                            "and images; without it a seeded half and 70/30 split")
    li_shots: int = opt(5, "--protocol li: images of each OOD class (the first in sorted order) "
                           "moved to li_train.txt")


@dataclass
class Prepared:
    """What preparing a dataset hands to main: class names, split lines, what the report adds."""
    names: list[str]
    lines: dict[str, list[str]]  # split name -> its `relative/path label` lines
    notes: list[str] = field(default_factory=list)  # printed under the statistics
    facts: dict = field(default_factory=dict)  # into prepare.json: missing images, ID / OOD classes


def check_flags(cfg):
    """One line for a bad combination of flags, before any image is read."""
    if cfg.imbalance < 1 or cfg.max_per_class < 0 or cfg.test_per_class < 0 or cfg.li_shots < 0:
        die("--imbalance must be >= 1 and --max-per-class, --test-per-class, --li-shots >= 0")
    if cfg.dataset in LIST_SETS and not (cfg.lists and cfg.root):
        die(f"{cfg.dataset} needs --lists DIR (the published split lists) and --root DIR (the "
            f"images)")
    if cfg.dataset == "folder" and not cfg.root:
        die("folder needs --root DIR with one subfolder of images per class")
    if cfg.dataset in OOD_SETS and not (cfg.source and Path(cfg.source).is_dir()):
        die(f"{cfg.dataset} needs --source DIR: a local copy in torchvision's layout (cub: "
            f"CUB_200_2011 or its parent)")
    li = cfg.protocol == "li"
    if li and cfg.dataset not in OOD_SETS or cfg.li_lists and not li:
        die("--protocol li is for the OOD sets (flowers102, food101, stanford-cars, sun397, cub); "
            "--li-lists needs it")
    for flag in ("class_names", "categories"):
        if getattr(cfg, flag) and not Path(getattr(cfg, flag)).is_file():
            die(f"--{flag.replace('_', '-')} {getattr(cfg, flag)} is not a file")


# --- long-tail sets: fashion-mnist-lt, cifar10-lt, cifar100-lt

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per set: folder of the python version, training files, test file, label key, meta file, names key.
CIFAR = {
    "cifar10-lt": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], "test_batch",
                   "labels", "batches.meta", "label_names"),
    "cifar100-lt": ("cifar-100-python", ["train"], "test", "fine_labels", "meta",
                    "fine_label_names"),
}


def prepare_long_tail(cfg, out):
    """A long-tailed subset of the official training set, as PNGs under --out/images."""
    tr_x, tr_y, te_x, te_y, names = (load_fashion(cfg) if cfg.dataset == "fashion-mnist-lt"
                                     else load_cifar(cfg))
    rng = np.random.default_rng(cfg.seed)
    n_max = cfg.max_per_class or (5000 if cfg.dataset == "cifar10-lt" else 500)
    val_per_class = cfg.val_per_class
    if val_per_class < 0:  # CIFAR-100-LT's head classes train on all 500 images: few are left
        val_per_class = 20 if cfg.dataset == "cifar100-lt" else 100
    counts = lt_counts(len(names), n_max, cfg.imbalance)
    train, val, short = pick_long_tail(tr_y, counts, val_per_class, rng)
    test = pick_test(te_y, cfg.test_per_class, rng)
    notes = [f"val.txt gets {k} of {val_per_class} images of class {c} ({names[c]}): train.txt "
             f"uses the rest" for c, k in short.items()]
    lines = {"train": write_pngs(out, "train", tr_x, tr_y, train),
             "val": write_pngs(out, "train", tr_x, tr_y, val),
             "test": write_pngs(out, "test", te_x, te_y, test)}
    return Prepared(names, lines, notes)


def lt_counts(num_classes, max_per_class, imbalance):
    """n_i = floor(n_max * IF^(-i / (C - 1))) (Cao et al. 2019): IF 100 gives CIFAR-10/100-LT's
    12,406 / 10,847 images."""
    if num_classes == 1 or imbalance <= 1:
        return [max_per_class] * num_classes
    return [int(max_per_class * (1 / imbalance) ** (i / (num_classes - 1)))
            for i in range(num_classes)]


def pick_long_tail(labels, counts, val_per_class, rng):
    """(train, val) indices: counts[c] random training images of class c, then up to val_per_class
    of its unused rest (never an official test image, which test.txt holds); also {class: unused
    images} where fewer than val_per_class were left."""
    train, val, short = [], [], {}
    for c, n in enumerate(counts):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < n:
            die(f"class {c} has {len(idx)} training images, the profile asks for {n}: lower "
                f"--max-per-class")
        train.extend(idx[:n].tolist())
        val.extend(idx[n:n + val_per_class].tolist())
        if len(idx) - n < val_per_class:
            short[c] = len(idx) - n
    return sorted(train), sorted(val), short


def pick_test(labels, per_class, rng):
    """The whole official test set, or per_class random images of each class."""
    if not per_class:
        return list(range(len(labels)))
    return sorted(i for c in np.unique(labels)
                  for i in rng.permutation(np.flatnonzero(labels == c))[:per_class])


def write_pngs(out, name, images, labels, indices):
    """Write images[indices] as PNG files and return the split lines. A file a killed run finished
    is kept (each is written whole through a rename), so a rerun only writes the rest."""
    lines = []
    for i in progress_bar(len(indices), "img", desc=f"{name} images", iterable=indices):
        rel = f"images/{name}/{int(labels[i])}/{i:06d}.png"
        path = out / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(images[i]).save(tmp, format="PNG", optimize=False)
            os.replace(tmp, path)
        lines.append(f"{rel} {int(labels[i])}")
    return lines


def load_fashion(cfg):
    """(train images, labels, test images, labels, names) from the IDX files of Debian's
    dataset-fashion-mnist package (or --source): the embedded data needs no network."""
    src = Path(cfg.source or "/usr/share/datasets/fashion-mnist")
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [f for f in files if not (src / f).exists()]
    if missing:
        die(f"{src / missing[0]} not found: install the Debian package dataset-fashion-mnist "
            f"(`make setup` does) or pass --source DIR")
    tr_x, tr_y, te_x, te_y = (read_idx(src / f) for f in files)
    return tr_x, tr_y, te_x, te_y, FASHION_CLASSES


def read_idx(path):
    """A gzipped IDX array: magic (2 zero bytes, type, ndim), then ndim big-endian sizes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_cifar(cfg):
    """(train images, labels, test images, labels, names) of CIFAR's python version."""
    base = cifar_folder(cfg)
    _, train_files, test_file, label_key, meta_file, names_key = CIFAR[cfg.dataset]
    for name in train_files + [test_file, meta_file]:
        if not (base / name).is_file():
            die(f"{base / name} not found: --source must hold CIFAR's python version "
                f"({', '.join(train_files)}, {test_file}, {meta_file})")
    tr_x, tr_y = cifar_images(base, train_files, label_key)
    te_x, te_y = cifar_images(base, [test_file], label_key)
    names = read_cifar_file(base / meta_file, (names_key,))[names_key]
    names = [(n.decode() if isinstance(n, bytes) else n).replace("_", " ") for n in names]
    return tr_x, tr_y, te_x, te_y, names


def cifar_folder(cfg):
    """The folder of the python version: inside --source, or downloaded (once) by torchvision."""
    folder = CIFAR[cfg.dataset][0]
    if cfg.source:
        src = Path(cfg.source)
        base = src if src.name == folder else src / folder
        if not base.is_dir():
            die(f"{src / folder} not found: --source must hold the {folder} folder of CIFAR's "
                f"python version")
        return base
    root = Path("data/cifar-download")
    if not (root / folder).is_dir():
        from torchvision.datasets import CIFAR10, CIFAR100
        try:
            (CIFAR10 if cfg.dataset == "cifar10-lt" else CIFAR100)(root, train=True, download=True)
        except Exception as e:  # offline, or the mirror is down
            die(f"cannot download {folder} ({type(e).__name__}: {str(e)[:120]}); offline, pass "
                f"--source DIR holding an already-downloaded {folder} folder")
    return root / folder


def cifar_images(base, files, label_key):
    """(images [N, 32, 32, 3] uint8, labels) of CIFAR pickles: rows hold the R, G, B planes."""
    records = [read_cifar_file(base / n, ("data", label_key)) for n in files]
    images = np.concatenate([np.asarray(r["data"], np.uint8) for r in records])
    labels = np.concatenate([r[label_key] for r in records])
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar_file(path, keys):
    """One CIFAR python pickle as a dict with str keys (Python 2 pickles: latin1 strings; rewritten
    ones: bytes)."""
    try:
        with open(path, "rb") as f:
            raw = ArrayUnpickler(f, encoding="latin1").load()
        record = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    except (OSError, EOFError, ValueError, AttributeError, pickle.UnpicklingError) as e:
        die(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {str(e)[:120]})")
    missing = [k for k in keys if k not in record]
    if missing:
        die(f"{path} has no {missing[0]!r} entry: not the python version of CIFAR")
    return record


class ArrayUnpickler(pickle.Unpickler):
    """CIFAR's pickles hold dicts of lists and numpy arrays: any other global is refused, so a file
    cannot run code."""

    def find_class(self, module, name):
        if (module.split(".")[0], name) in (("numpy", "_reconstruct"), ("numpy", "ndarray"),
                                            ("numpy", "dtype"),
                                            ("_codecs", "encode")):  # how protocol 2 spells bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


# --- published lists: imagenet-lt, places-lt, inat2018

# The train, val and test lists inside --lists (Liu et al. 2019's OLTR; Kang et al. 2020 for iNat).
LIST_FILES = {
    "imagenet-lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places-lt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
    "inat2018": ("iNaturalist18_train.txt", "iNaturalist18_val.txt", None),  # no public test labels
}
CATEGORY_FILES = {"places-lt": "categories_places365.txt", "inat2018": "categories.json"}


def prepare_lists(cfg, out):
    """The published split lists as they are, images linked, every line and label checked first."""
    names = list_class_names(cfg, required=cfg.dataset != "places-lt")
    files = {s: Path(cfg.lists) / f
             for s, f in zip(("train", "val", "test"), LIST_FILES[cfg.dataset]) if f}
    for path in files.values():
        if not path.is_file():
            die(f"{path} not found: --lists must hold "
                f"{', '.join(f for f in LIST_FILES[cfg.dataset] if f)}")
    items = {split: read_split(path, len(names) or None) for split, path in files.items()}
    notes = []
    if cfg.dataset == "places-lt":
        names, notes = places_names(cfg, files["train"], items["train"], names)
    elif cfg.dataset == "imagenet-lt":
        check_wnid_order(files["train"], items["train"])
    else:
        for split, path in files.items():
            check_inat_folders(path, items[split])
    used = 1 + max(y for split_items in items.values() for _, y in split_items)  # first classes
    if used > len(names):
        die(f"label {used - 1} in the lists of {cfg.lists}, but only {len(names)} classes are "
            f"named")
    root = link_images(out, cfg.root)
    lines, missing = {}, {}
    for split, split_items in items.items():
        gone = {p for p, _ in progress_bar(len(split_items), "img", desc=f"checking {split}",
                                           iterable=split_items) if not (root / p).is_file()}
        if gone:  # a partial copy still prepares; the counts then differ from the published ones
            warn(f"{len(gone)} of {len(split_items)} {split} images missing under {root}, left "
                 f"out, e.g. {sorted(gone)[:3]}")
        lines[split] = [f"images/{p} {y}" for p, y in split_items if p not in gone]
        missing[split] = len(gone)
    return Prepared(names[:used], lines, notes, {"missing": missing})


def list_class_names(cfg, required=True):
    """Names by label: torchvision's ImageNet categories (the ImageNet-LT lists' label order),
    categories_places365.txt, iNat's categories.json; no file and not `required`: []."""
    if cfg.dataset == "imagenet-lt":
        from torchvision.models import ResNet50_Weights
        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    default = CATEGORY_FILES[cfg.dataset]
    path = Path(cfg.categories or Path(cfg.lists) / default)
    if not path.is_file() and not required:
        return []
    if not path.is_file():
        die(f"{path} not found: {cfg.dataset} takes its class names from the published {default} "
            f"(put it in --lists or pass --categories FILE)")
    names = {}
    if cfg.dataset == "places-lt":  # `/a/apartment_building/outdoor 8` lines
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit() or parts[0].count("/") < 2:
                die(f"{path}:{n}: expected `/a/abbey 0`, got {line[:80]!r}")
            names[int(parts[1])] = parts[0].split("/", 2)[2]  # `apartment_building/outdoor` whole
    else:
        try:
            names = {int(c["id"]): str(c["name"]) for c in json.loads(path.read_text("utf-8"))}
        except (ValueError, KeyError, TypeError) as e:
            die(f"{path}: expected a JSON list of {{\"id\": ..., \"name\": ...}} "
                f"({type(e).__name__}: {e})")
    gaps = [c for c in range(len(names)) if c not in names]
    if gaps or not names:
        die(f"{path}: no name for class {gaps[0] if gaps else 0} (ids must run "
            f"0..{len(names) - 1})")
    return [names[c] for c in range(len(names))]


def link_images(out, root):
    """--out/images -> root: split lines stay relative to --out, and no image is copied."""
    root = Path(root).resolve()
    if not root.is_dir():
        die(f"--root {root} is not a folder")
    link = out / "images"
    if link.is_symlink() and link.resolve() != root:
        link.unlink()
    if not link.exists():
        link.symlink_to(root, target_is_directory=True)
    return root


def places_names(cfg, path, items, by_file):
    """Places-LT: a label's name is the folder of its training images (the LT lists number five
    classes in another order than categories_places365.txt), the file's name (`by_file`) only for
    labels without a training path. Also the notes listing where the two disagree."""
    by_path = folders_of(path, items, skip_index_dir=True)
    used = 1 + max(y for _, y in items)
    unnamed = [c for c in range(max(used, len(by_file))) if c not in by_path and c >= len(by_file)]
    if unnamed:
        die(f"label {unnamed[0]} has no training image in {path} and no line in "
            f"{Path(cfg.categories or Path(cfg.lists) / CATEGORY_FILES['places-lt'])}: it cannot "
            f"be named")
    names = [by_path.get(c, by_file[c] if c < len(by_file) else None)
             for c in range(max(used, len(by_file)))]
    differ = [f"{c} {by_path[c]} (file: {by_file[c]})" for c in sorted(by_path)
              if c < len(by_file) and by_path[c] != by_file[c]]
    if not differ:
        return names, []
    return names, [f"{len(differ)} labels named by their training images' folder, where "
                   f"{CATEGORY_FILES['places-lt']} has another name: {', '.join(differ)}"]


def folders_of(path, items, skip_index_dir=False):
    """{label: the folder of its images} from `split/folder.../file` lines (Places365's one-letter
    index level `a/` ... `z/` dropped when asked); a label whose images sit in two folders is
    refused."""
    found = {}
    for n, (rel, label) in enumerate(items, 1):
        parts = rel.replace("\\", "/").split("/")[1:-1]
        if skip_index_dir and len(parts) > 1 and len(parts[0]) == 1:
            parts = parts[1:]
        if not parts:
            continue
        folder = "/".join(parts)
        if found.setdefault(label, folder) != folder:
            die(f"{path}:{n}: label {label} is in {folder!r} here and in {found[label]!r} on an "
                f"earlier line")
    return found


def check_wnid_order(path, items):
    """ImageNet-LT's names are torchvision's, in the sorted WordNet-id order: the labels' folders
    must follow it."""
    by_label = sorted(folders_of(path, items).items())
    for (a, wnid_a), (b, wnid_b) in zip(by_label, by_label[1:]):
        if wnid_a.rsplit("/", 1)[-1] >= wnid_b.rsplit("/", 1)[-1]:
            die(f"{path}: label {a} is {wnid_a} but label {b} is {wnid_b}: the labels do not "
                f"follow the sorted WordNet-id order of torchvision's ImageNet names")


def check_inat_folders(path, items):
    """iNat 2018's images sit in a folder named by their category id: the line's label."""
    for n, (rel, label) in enumerate(items, 1):
        folder = rel.replace("\\", "/").split("/")[-2] if "/" in rel else ""
        if folder.isdigit() and int(folder) != label:
            die(f"{path}:{n}: the image is in category folder {folder} but labelled {label}")


# --- OOD sets: flowers102, food101, stanford-cars, sun397, cub

def prepare_ood(cfg, out):
    """ID classes first, then OOD: a seeded half of the classes, or Li et al.'s own halves."""
    names, train, test = load_ood(cfg)
    root = Path(os.path.commonpath([p for p, _ in train + test]))
    root = root if root.is_dir() else root.parent
    link_images(out, root)
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(names))  # our class halves (and li's without their files)
    half = len(names) // 2
    id_cls, ood_cls = sorted(perm[:half].tolist()), sorted(perm[half:].tolist())
    if cfg.protocol == "ours":  # each half keeps the dataset's official train / test split
        parts = {"id_train": (train, set(id_cls)), "id_val": (test, set(id_cls)),
                 "ood_train": (train, set(ood_cls)), "ood_val": (test, set(ood_cls))}
    else:
        id_cls, ood_cls, parts = li_parts(cfg, names, train, test, id_cls, ood_cls, rng)
    label = {c: i for i, c in enumerate(id_cls + ood_cls)}  # ID labels first
    lines = {split: [f"images/{Path(p).relative_to(root)} {label[y]}"
                     for p, y in items if y in keep] for split, (items, keep) in parts.items()}
    all_names = [names[c] for c in id_cls + ood_cls]
    write_lines(out / "id_classes.txt", all_names[: len(id_cls)])
    write_lines(out / "ood_classes.txt", all_names[len(id_cls):])
    return Prepared(all_names, lines,
                    facts={"id_classes": len(id_cls), "ood_classes": len(ood_cls)})


def li_parts(cfg, names, train, test, id_cls, ood_cls, rng):
    """Li et al.'s protocol: their class halves and images (--li-lists), else a seeded half and a
    70/30 split of the pooled ID images; their 5-shot files add the first li_shots sorted images
    of each OOD class to the training set. Returns (ID classes, OOD classes, {split: (items,
    classes)})."""
    if cfg.li_lists:
        id_cls, ood_cls, id_train, id_test, ood = li_lists_split(cfg, names, train, test)
    else:
        warn("--protocol li without --li-lists: a seeded half of the classes and a seeded 70/30 "
             "split, not Li et al.'s published ones (pass their data/<Dataset> folder to compare "
             "with their table)")
        id_train, id_test = pooled_70_30(train + test, id_cls, rng)
        ood = sorted(x for x in train + test if x[1] in set(ood_cls))
    shots = {x for c in ood_cls for x in sorted(x for x in ood if x[1] == c)[:cfg.li_shots]}
    every = set(range(len(names)))
    return id_cls, ood_cls, {"id_train": (id_train, every), "id_test": (id_test, every),
                             "ood_test": (ood, every),
                             "li_train": (id_train + sorted(shots), every),
                             "li_ood_test": ([x for x in ood if x not in shots], every)}


def load_ood(cfg):
    """(class names, train [(absolute path, label)], test [...]) from a local copy in torchvision's
    layout."""
    if cfg.dataset in ("cub", "flowers102"):
        return (load_cub if cfg.dataset == "cub" else load_flowers)(Path(cfg.source))
    from torchvision import datasets
    try:
        if cfg.dataset == "sun397":  # torchvision's SUN397 has no split: a seeded 80/20 one
            ds = datasets.SUN397(cfg.source)
            pool = torchvision_items(ds)
            test_mask = np.random.default_rng(cfg.seed).random(len(pool)) < 0.2
            splits = ([x for x, t in zip(pool, test_mask) if not t],
                      [x for x, t in zip(pool, test_mask) if t])
        else:
            make = datasets.Food101 if cfg.dataset == "food101" else datasets.StanfordCars
            ds = make(cfg.source, split="train")
            splits = (torchvision_items(ds), torchvision_items(make(cfg.source, split="test")))
    except Exception as e:  # torchvision raises RuntimeError, FileNotFoundError, KeyError...
        die(f"cannot read {cfg.dataset} from {cfg.source} ({type(e).__name__}: {str(e)[:120]}); "
            f"it must be in torchvision's layout")
    names = [str(n).replace("_", " ") for n in getattr(ds, "classes", [])]
    if len(names) <= max(y for _, y in splits[0] + splits[1]):
        die(f"{cfg.source}: torchvision found no class names for {cfg.dataset} (a partial copy?)")
    return names, *splits


def torchvision_items(ds):
    """[(path, label)] of a torchvision dataset, read from its index, no image opened."""
    pairs = ds._samples if hasattr(ds, "_samples") else zip(ds._image_files, ds._labels)
    return [(str(p), int(y)) for p, y in pairs]


def load_cub(src):
    """CUB_200_2011's own index files; a label must be the class of its image's folder."""
    base = src / "CUB_200_2011" if (src / "CUB_200_2011").is_dir() else src
    for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        if not (base / f).is_file():
            die(f"{base / f} not found: --source must be the CUB_200_2011 folder or its parent")
    paths = dict(read_table(base / "images.txt"))
    labels = {i: int(y) - 1 for i, y in read_table(base / "image_class_labels.txt")}
    is_train = {i: t.strip() == "1" for i, t in read_table(base / "train_test_split.txt")}
    by_id = {int(k) - 1: n for k, n in read_table(base / "classes.txt")}  # `1 001.Black_footed_...`
    if sorted(by_id) != list(range(len(by_id))):
        die(f"{base / 'classes.txt'}: class ids must run 1..{len(by_id)}")
    names = [by_id[c].split(".", 1)[-1].replace("_", " ") for c in range(len(by_id))]
    split = {True: [], False: []}
    for i, p in paths.items():
        folder = p.split("/")[0]
        if "/" in p and class_key(folder) != class_key(by_id.get(labels[i], "")):
            die(f"{base / 'image_class_labels.txt'}: image {i} ({p}) is labelled {labels[i] + 1} "
                f"({by_id.get(labels[i])}), not the class of its folder")
        split[is_train[i]].append((str(base / "images" / p), labels[i]))
    return names, split[True], split[False]


def read_table(path):
    return [line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def load_flowers(src):
    """flowers-102/{jpg, imagelabels.mat, setid.mat}, read here (torchvision insists on the files'
    md5). The files hold no names: those are torchvision's list, in label order."""
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102
    base = src / "flowers-102" if (src / "flowers-102").is_dir() else src
    for f in ("jpg", "imagelabels.mat", "setid.mat"):
        if not (base / f).exists():
            die(f"{base / f} not found: --source must hold flowers-102/ (jpg/, imagelabels.mat, "
                f"setid.mat)")
    labels = np.atleast_1d(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]) - 1
    split_ids = loadmat(base / "setid.mat", squeeze_me=True)
    items = {key: [(str(base / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]))
                   for i in np.atleast_1d(split_ids[key]).tolist()]
             for key in ("trnid", "valid", "tstid")}
    return list(Flowers102.classes), items["trnid"] + items["valid"], items["tstid"]


def class_key(name):
    """`063.Ivory_Gull`, `Ivory Gull`, `apartment_building_outdoor`, `apartment building/outdoor`
    -> one key."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"^\d+\.", "", name.lower())).strip("_")


def li_lists_split(cfg, names, train, test):
    """Li et al.'s own files (`split/class_folder/file` lines): ID train, ID test and OOD images,
    matched to the local copy by class and file name. A line that matches no local image names
    file and line."""
    # Their cars_train holds images the local copy has under train: train wins a clash.
    index = {(class_key(names[y]), Path(p).name): (p, y) for p, y in test + train}
    parts = {}
    for part, fname in (("id_train", "train_data.txt"), ("id_test", "val_on_train_data.txt"),
                        ("ood", "val_data.txt")):
        path = Path(cfg.li_lists) / fname
        if not path.is_file():
            die(f"{path} not found: --li-lists must be Li et al.'s data/<Dataset> folder")
        parts[part] = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            bits = line.strip().split("/")
            if not line.strip():
                continue
            if len(bits) < 2 or (class_key(bits[-2]), bits[-1]) not in index:
                die(f"{path}:{n}: {line.strip()[:80]!r} matches no image of --source {cfg.source}")
            parts[part].append(index[class_key(bits[-2]), bits[-1]])
    id_cls = sorted({y for _, y in parts["id_train"]})
    ood_cls = sorted({y for _, y in parts["ood"]})
    if set(id_cls) & set(ood_cls):
        die(f"{cfg.li_lists}: classes {sorted(set(id_cls) & set(ood_cls))[:3]} are both ID and OOD")
    return id_cls, ood_cls, parts["id_train"], parts["id_test"], parts["ood"]


def pooled_70_30(items, classes, rng):
    """Li et al.'s ID split without their files: each ID class's images pooled, 70% train, 30%
    test, seeded."""
    id_train, id_test = [], []
    for c in classes:
        pool = sorted(x for x in items if x[1] == c)
        pool = [pool[i] for i in rng.permutation(len(pool))]
        id_train += pool[: round(0.7 * len(pool))]
        id_test += pool[round(0.7 * len(pool)):]
    return sorted(id_train), sorted(id_test)


# --- folder: one subfolder of images per class

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def prepare_folder(cfg, out):
    """Per class, seeded val and test fractions, then a long-tail profile over the training rest."""
    root = link_images(out, cfg.root)
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not names:
        die(f"--root {root} has no class subfolders")
    rng = np.random.default_rng(cfg.seed)
    per_class = [sorted(str(p.relative_to(root)) for p in (root / n).rglob("*")
                        if p.suffix.lower() in IMAGE_EXT) for n in names]
    # Largest classes become the head of the profile; ties keep alphabetical order.
    order = sorted(range(len(names)), key=lambda c: -len(per_class[c]))
    counts = lt_counts(len(names), cfg.max_per_class or 500, cfg.imbalance)
    lines = {"train": [], "val": [], "test": []}
    for rank, c in enumerate(order):
        files = [per_class[c][i] for i in rng.permutation(len(per_class[c]))]
        n_val, n_test = round(len(files) * cfg.val_frac), round(len(files) * cfg.test_frac)
        parts = {"val": files[:n_val], "test": files[n_val:n_val + n_test],
                 "train": files[n_val + n_test:]}
        if cfg.imbalance > 1:
            parts["train"] = parts["train"][:counts[rank]]
        for split, fs in parts.items():
            lines[split].extend(f"images/{f} {c}" for f in sorted(fs))
    return Prepared(names, lines)


# --- statistics: what was written, next to the published benchmark

PUBLISHED = {  # images per split, classes with training images, OLTR's many / medium / few classes
    "cifar10-lt": {"train.txt": 12406, "test.txt": 10000, "classes": 10,
                   "many/medium/few": "8/2/0"},
    "cifar100-lt": {"train.txt": 10847, "test.txt": 10000, "classes": 100,
                    "many/medium/few": "35/35/30"},
    "imagenet-lt": {"train.txt": 115846, "val.txt": 20000, "test.txt": 50000, "classes": 1000,
                    "many/medium/few": "385/479/136"},
    "places-lt": {"train.txt": 62500, "val.txt": 7300, "test.txt": 36500, "classes": 365,
                  "many/medium/few": "131/163/71"},
    "inat2018": {"train.txt": 437513, "val.txt": 24426, "classes": 8142,
                 "many/medium/few": "842/4076/3224"},
}


def published_for(cfg):
    """The published statistics this run should reproduce: CIFAR's only with the published IF 100
    and n_max."""
    n_max = {"cifar10-lt": 5000, "cifar100-lt": 500}.get(cfg.dataset)
    if n_max and (cfg.imbalance != 100 or cfg.max_per_class not in (0, n_max)
                  or cfg.test_per_class):
        return {}
    return PUBLISHED.get(cfg.dataset, {})


def statistics(lines, per_class):
    groups = Counter(class_group(n) for n in per_class)
    found = {f"{split}.txt": len(split_lines) for split, split_lines in lines.items()}
    found["classes"] = sum(n > 0 for n in per_class)
    found["many/medium/few"] = "/".join(str(groups[g]) for g in GROUPS)
    return found


def print_report(cfg, out, names, train_key, per_class, found, published, notes):
    """What was written, next to the published benchmark; a difference is a warning line naming
    it."""
    print(f"{cfg.dataset}: {len(names)} classes -> {out}")
    print(f"  {'':16s}{'found':>10s}{'published' if published else '':>15s}")
    for key, value in found.items():
        print(f"  {key:16s}{value:>10}{published.get(key, ''):>15}")
    shown = per_class if len(per_class) <= 20 else str(per_class[:10])[:-1] + ", ...]"
    print(f"  {train_key} per class: {shown} (max {max(per_class)}, min {min(per_class)})")
    for note in notes:
        print(f"  note: {note}")
    for key, value in published.items():
        if found.get(key) != value:
            warn(f"{cfg.dataset}: {key} is {found.get(key, 'absent')}, the published benchmark has "
                 f"{value} (fine for a subset; otherwise check --lists / --source)")


# --- main

def write_lines(path, lines):
    """A text file of lines, through a temporary file and a rename (a kill never leaves half a
    split)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def prepared_dataset(cfg, out):
    """The dataset's class names, split lines, notes and facts, by the family it belongs to."""
    if cfg.dataset in LT_SETS:
        return prepare_long_tail(cfg, out)
    if cfg.dataset in LIST_SETS:
        return prepare_lists(cfg, out)
    if cfg.dataset in OOD_SETS:
        return prepare_ood(cfg, out)
    return prepare_folder(cfg, out)


def given_class_names(cfg, names):
    """--class-names: one name a line replacing the names found, one for every class."""
    given = [n.strip() for n in Path(cfg.class_names).read_text(encoding="utf-8").splitlines()
             if n.strip()]
    if len(given) != len(names):
        die(f"{cfg.class_names} names {len(given)} classes, {cfg.dataset} has {len(names)}")
    return given


def write_prepared(cfg, out, names, prepared):
    """classes.txt, one file a split, and prepare.json; returns what the report prints."""
    lines = prepared.lines
    write_lines(out / "classes.txt", names)
    for split, split_lines in lines.items():
        write_lines(out / f"{split}.txt", split_lines)
    train_key = "train" if "train" in lines else "id_train"
    per_class = np.bincount([int(line.rsplit(maxsplit=1)[1]) for line in lines[train_key]],
                            minlength=len(names)).tolist()
    found, published = statistics(lines, per_class), published_for(cfg)
    write_json(out / "prepare.json", {
        "made_by": "prepare.py", "config": asdict(cfg), "num_classes": len(names),
        "splits": {s: {"file": f"{s}.txt", "lines": len(v), "sha256": sha256_file(out / f"{s}.txt")}
                   for s, v in lines.items()},
        "train_class_counts": per_class,
        "groups": dict(zip(GROUPS, map(int, found["many/medium/few"].split("/")))),
        "published": published, "versions": versions("numpy", "pillow", "torchvision"),
        **prepared.facts})
    return train_key, per_class, found, published


def main():
    cfg = parse_config(Config, positional=("dataset",))
    check_flags(cfg)
    out = writable_dir(cfg.out)
    prepared = prepared_dataset(cfg, out)
    names = given_class_names(cfg, prepared.names) if cfg.class_names else prepared.names
    train_key, per_class, found, published = write_prepared(cfg, out, names, prepared)
    print_report(cfg, out, names, train_key, per_class, found, published, prepared.notes)


# --- shared helpers: byte-identical copies of tests/shared_helpers.py (test_shared.py --sync)

GROUPS = ("many", "medium", "few")


def parse_config(config_cls, argv=None, positional=(), defaults=None):
    """Typed command line from a dataclass: a field is one `--dashed-name` with help and default; a
    Literal takes its listed values only; a bool is `--flag` / `--no-flag`; a list is `--name A,B`,
    repeatable. `positional` fields go anywhere among the flags (a list one: whole words, commas
    kept). `defaults(first pass's namespace) -> {field: value}` replaces dataclass defaults (a
    recipe's): flags given still win, and --help shows the replaced defaults."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     add_help=defaults is None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group, hints = parser, typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        kind, meta = hints[f.name], f.metadata
        if meta.get("heading"):
            group = parser.add_argument_group(meta["heading"])
        flag = "--" + f.name.replace("_", "-")
        names, kwargs = [f.name] if f.name in positional else [flag], {"help": meta.get("help", "")}
        if typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            kwargs |= {"choices": choices, "type": type(choices[0]),
                       "metavar": "{" + ",".join(map(str, choices)) + "}"}
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:  # both extend one list: flag's values, then the words
            if f.name in positional:
                group.add_argument(f.name, nargs="*", action="extend", help=kwargs["help"])
                names, kwargs["help"] = [flag], f"{f.name} as a flag: comma-separated, repeatable"
            kwargs |= {"action": "extend", "type": lambda value: value.split(","), "metavar": "A,B"}
        else:
            kwargs |= {"type": kind, "metavar": kind.__name__.upper()}
        if names == [flag]:
            kwargs["default"] = f.default
        group.add_argument(*names, **kwargs)
    for action in parser._actions:  # defaults once, whatever a Python's BooleanOptionalAction adds
        if action.help and action.default is not None and action.dest != "help" \
                and "%(default)" not in action.help:
            action.help += " (default: %(default)r)"
    if defaults is not None:  # the first pass has no -h, so `--recipe X --help` shows its defaults
        parser.set_defaults(**defaults(parser.parse_known_args(argv)[0]))
        parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    return config_cls(**vars(parser.parse_intermixed_args(argv)))


def die(msg):
    """One line naming the stage, then exit 1: a user's mistake is a sentence, not a traceback."""
    sys.exit(f"{Path(sys.argv[0]).name}: error: {msg}")


def warn(msg):
    print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


def is_main_process():
    """Only rank 0 of a torchrun / accelerate launch run prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


class LineProgress:
    """tqdm's output off a terminal (a log, a pipe, `make`): each refresh a line, not a '\\r'."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.strip("\r\n"):
            self.stream.write(text.strip("\r\n") + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total, unit, initial=0, desc="", disable=False, iterable=None):
    """A tqdm bar with rate and ETA on a terminal; elsewhere a line every 30 s, so a job log shows
    progress too. Rank 0 alone draws it."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=tty,
                disable=disable or not is_main_process(), mininterval=0.1 if tty else 30,
                maxinterval=10 if tty else 30,  # else tqdm's monitor forces a line every 10 s
                file=sys.stderr if tty else LineProgress(sys.stderr))


def sha256_file(path):
    """sha256 of a file's bytes, read in blocks (arrays run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_split(path, num_classes=None):
    """[(relative path, label)] from a split file's `relative/path label` lines. A bad line is
    refused with `file:line`: no label, a label not an integer in [0, num_classes), or a path that
    is absolute or leaves the data root with `..` (a split only names files under its root)."""
    path = Path(path)
    if not path.is_file():
        die(f"split file {path} not found (prepare.py writes it)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            die(f"{path}:{n}: expected `relative/path label` with an integer label >= 0, "
                f"got {line[:80]!r}")
        rel, label = parts[0], int(parts[1])
        if rel.startswith(("/", "\\")) or ".." in rel.replace("\\", "/").split("/"):
            die(f"{path}:{n}: {rel!r} leaves the data root: split paths are relative, without `..`")
        if num_classes is not None and label >= num_classes:
            die(f"{path}:{n}: label {label}, but there are only {num_classes} classes")
        items.append((rel, label))
    if not items:
        die(f"split file {path} has no images")
    return items


def class_group(count):
    """OLTR's groups by training images: many > 100, medium 20-100, few 1-19; none: unseen (OOD)."""
    return "many" if count > 100 else "medium" if count >= 20 else "few" if count > 0 else "unseen"


def versions(*names):
    """Versions of the packages that made an artifact, for its sidecar or run folder."""
    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_json(path, obj):
    """Write JSON through a temporary file and a rename: a kill never leaves half a file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def writable_dir(path):
    """Make --out now and prove it writable, so a bad --out fails before any work is spent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        die(f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        die(f"{path} is not writable ({e.strerror})")
    return path


if __name__ == "__main__":
    main()
