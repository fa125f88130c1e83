"""Prepare a dataset as vlmkd split files.

    python prepare.py fashion-mnist-lt --out data/fmnist-lt                  # embedded default, 500 -> 5
    python prepare.py cifar100-lt --out data/c100-lt --imbalance 100        # downloads when online
    python prepare.py cifar100-lt --out data/c100-lt --source ~/cifar       # an already-downloaded copy
    python prepare.py imagenet-lt --lists ImageNet_LT/ --root /data/imagenet --out data/imagenet-lt
    python prepare.py places-lt   --lists Places_LT/   --root /data/places365 --out data/places-lt
    python prepare.py inat2018    --lists iNat18/      --root /data/inat2018  --out data/inat
    python prepare.py folder --root photos/ --out data/photos --imbalance 50
    python prepare.py food101 --source /data/food101 --out data/food101-ood  # ID/OOD class halves

Writes into --out: `train.txt`, `val.txt`, `test.txt` (`relative/path label`, one image a line,
paths relative to --out), `classes.txt` (line i names label i) and `prepare.json` (what made them).
Where the source has no image files (IDX, pickles) the images are written as PNG under --out;
where it has files, `--out/images` is a symlink to the image root. OOD datasets (Li et al.) write
`id_train.txt`, `id_val.txt`, `ood_train.txt`, `ood_val.txt`, `id_classes.txt`, `ood_classes.txt`
instead, with ID classes first in `classes.txt` (ID labels are 0..C_id-1).
"""
import gzip
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import HfArgumentParser

LT_SETS = ("fashion-mnist-lt", "cifar10-lt", "cifar100-lt")
LIST_SETS = {  # published split lists: (train, val, test) file names inside --lists
    "imagenet-lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places-lt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
    "inat2018": ("iNaturalist18_train.txt", "iNaturalist18_val.txt", "iNaturalist18_val.txt"),
}
OOD_SETS = ("flowers102", "food101", "stanford-cars", "sun397", "cub")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Config:
    dataset: str = field(metadata={"help": f"one of {', '.join(LT_SETS + tuple(LIST_SETS) + ('folder',) + OOD_SETS)}"})
    out: str = field(default="data/fmnist-lt", metadata={"help": "output folder"})
    max_per_class: int = field(default=500, metadata={"help": "images of the largest class (LT sets, folder)"})
    imbalance: float = field(default=100.0, metadata={"help": "largest / smallest class size; 1 = no subsampling"})
    val_per_class: int = field(default=100, metadata={"help": "balanced val images per class taken from the official test set; the rest is test"})
    test_per_class: int = field(default=0, metadata={"help": "cap on test images per class (0 = all the rest of the official test set)"})
    seed: int = 0
    source: str = field(default="", metadata={"help": "local copy of the source dataset (fashion-mnist IDX folder, CIFAR root, OOD set root)"})
    lists: str = field(default="", metadata={"help": "folder with the published split lists (imagenet-lt, places-lt, inat2018)"})
    root: str = field(default="", metadata={"help": "image root the lists / folder refer to"})
    class_names: str = field(default="", metadata={"help": "optional file, one class name a line, overriding the derived names"})
    val_frac: float = field(default=0.1, metadata={"help": "folder: fraction of each class for val"})
    test_frac: float = field(default=0.1, metadata={"help": "folder: fraction of each class for test"})


def die(msg):
    sys.exit(f"prepare.py: error: {msg}")


def lt_counts(num_classes, max_per_class, imbalance):
    """The usual exponential long-tail profile: n_c = max * imbalance^(-c / (C - 1))."""
    if num_classes == 1 or imbalance <= 1:
        return [max_per_class] * num_classes
    return [int(max_per_class * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)]


def subsample_lt(labels, counts, rng):
    """Indices keeping counts[c] images of class c, chosen at random but deterministic for rng."""
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            die(f"class {c} has {len(idx)} images, the profile asks for {n}: lower --max-per-class")
        keep.extend(np.sort(rng.permutation(idx)[:n]).tolist())
    return keep


def split_balanced(labels, per_class, rng, test_per_class=0):
    """Split indices into (val, test): per_class of every class to val, the rest (or test_per_class) to test."""
    val, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.extend(idx[:per_class].tolist())
        test.extend(idx[per_class:per_class + test_per_class if test_per_class else None].tolist())
    return sorted(val), sorted(test)


def write_pngs(out, name, images, labels, indices):
    """Write images[indices] as PNG files and return the split lines."""
    lines = []
    for i in indices:
        rel = f"images/{name}/{int(labels[i])}/{i:06d}.png"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            Image.fromarray(images[i]).save(path, optimize=False)
        lines.append(f"{rel} {int(labels[i])}")
    return lines


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion(cfg):
    src = Path(cfg.source or "/usr/share/datasets/fashion-mnist")
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [f for f in files if not (src / f).exists()]
    if missing:
        die(f"{src / missing[0]} not found: install the Debian package dataset-fashion-mnist (`make setup` does) or pass --source DIR")
    tr_x, tr_y, te_x, te_y = (read_idx(src / f) for f in files)
    return tr_x, tr_y, te_x, te_y, FASHION_CLASSES


def load_cifar(cfg):
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if cfg.dataset == "cifar10-lt" else CIFAR100
    root = cfg.source or "data/cifar-download"
    try:
        train = cls(root, train=True, download=not cfg.source)
        test = cls(root, train=False, download=not cfg.source)
    except Exception as e:  # offline, or a --source that is not a CIFAR copy
        die(f"cannot load {cls.__name__} from {root} ({type(e).__name__}: {str(e)[:120]}); "
            f"offline, pass --source DIR holding an already-downloaded copy (the folder with cifar-*-python)")
    return train.data, np.array(train.targets), test.data, np.array(test.targets), train.classes


def prepare_lt(cfg, out):
    tr_x, tr_y, te_x, te_y, names = load_fashion(cfg) if cfg.dataset == "fashion-mnist-lt" else load_cifar(cfg)
    rng = np.random.default_rng(cfg.seed)
    counts = lt_counts(len(names), cfg.max_per_class, cfg.imbalance)
    keep = subsample_lt(tr_y, counts, rng)
    val_idx, test_idx = split_balanced(te_y, cfg.val_per_class, rng, cfg.test_per_class)
    return names, {
        "train": write_pngs(out, "train", tr_x, tr_y, keep),
        "val": write_pngs(out, "test", te_x, te_y, val_idx),
        "test": write_pngs(out, "test", te_x, te_y, test_idx),
    }


def link_images(out, root):
    root = Path(root).resolve()
    if not root.is_dir():
        die(f"--root {root} is not a folder")
    link = out / "images"
    if link.is_symlink() and link.resolve() != root:
        link.unlink()
    if not link.exists():
        link.symlink_to(root, target_is_directory=True)
    return root


def read_list(path):
    """Published LT lists: `relative/path label` per line; a bad line names file and line."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            die(f"{path}:{n}: expected `relative/path label`, got {line[:80]!r}")
        items.append((parts[0], int(parts[1])))
    return items


def check_exist(root, items, what):
    missing = [p for p, _ in items if not (root / p).is_file()]
    if missing:
        print(f"prepare.py: {len(missing)} of {len(items)} {what} images missing under {root}, e.g. {missing[:3]}", file=sys.stderr)
    return missing


def derive_names(items, num_classes):
    """A class's name is the folder its images share (places365 `a/abbey`, imagenet wnids), else class_i."""
    folders = [Counter() for _ in range(num_classes)]
    for path, label in items:
        folders[label][Path(path).parent.name] += 1
    names = [f.most_common(1)[0][0] if f else f"class_{c}" for c, f in enumerate(folders)]
    return names if len(set(names)) == num_classes else [f"class_{c}" for c in range(num_classes)]


def prepare_lists(cfg, out):
    if not cfg.lists or not cfg.root:
        die(f"{cfg.dataset} needs --lists DIR (the published split lists) and --root DIR (the images)")
    root = link_images(out, cfg.root)
    splits, missing = {}, {}
    for split, fname in zip(("train", "val", "test"), LIST_SETS[cfg.dataset]):
        path = Path(cfg.lists) / fname
        if not path.exists():
            die(f"{path} not found: --lists must hold {', '.join(LIST_SETS[cfg.dataset])}")
        items = read_list(path)
        missing[split] = check_exist(root, items, split)
        skip = set(missing[split])
        splits[split] = [(p, y) for p, y in items if p not in skip]
    num_classes = 1 + max(y for items in splits.values() for _, y in items)
    names = derive_names(splits["train"], num_classes)
    lines = {s: [f"images/{p} {y}" for p, y in items] for s, items in splits.items()}
    return names, lines, {s: len(m) for s, m in missing.items()}


IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def prepare_folder(cfg, out):
    if not cfg.root:
        die("folder needs --root DIR with one subfolder of images per class")
    root = link_images(out, cfg.root)
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not names:
        die(f"--root {root} has no class subfolders")
    rng = np.random.default_rng(cfg.seed)
    per_class = [sorted(str(p.relative_to(root)) for p in (root / n).rglob("*") if p.suffix.lower() in IMAGE_EXT) for n in names]
    # Largest classes become the head of the profile; ties keep alphabetical order.
    order = sorted(range(len(names)), key=lambda c: -len(per_class[c]))
    counts = lt_counts(len(names), cfg.max_per_class, cfg.imbalance)
    lines = {"train": [], "val": [], "test": []}
    for rank, c in enumerate(order):
        files = [per_class[c][i] for i in rng.permutation(len(per_class[c]))]
        n_val, n_test = round(len(files) * cfg.val_frac), round(len(files) * cfg.test_frac)
        parts = {"val": files[:n_val], "test": files[n_val:n_val + n_test], "train": files[n_val + n_test:]}
        if cfg.imbalance > 1:
            parts["train"] = parts["train"][:counts[rank]]
        for split, fs in parts.items():
            lines[split].extend(f"images/{f} {c}" for f in sorted(fs))
    return names, lines


def load_ood_source(cfg):
    """(names, [(abs_path, label)] train, [(abs_path, label)] test) from a local copy."""
    src = Path(cfg.source)
    if not cfg.source or not src.is_dir():
        die(f"{cfg.dataset} needs --source DIR with a local copy (torchvision's layout; for cub the CUB_200_2011 folder)")
    if cfg.dataset == "cub":
        base = src / "CUB_200_2011" if (src / "CUB_200_2011").is_dir() else src
        for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
            if not (base / f).exists():
                die(f"{base / f} not found: --source must be the CUB_200_2011 folder")
        read = lambda f: [line.split() for line in (base / f).read_text().splitlines() if line.strip()]
        paths = {i: p for i, p in read("images.txt")}
        labels = {i: int(y) - 1 for i, y in read("image_class_labels.txt")}
        is_train = {i: t == "1" for i, t in read("train_test_split.txt")}
        names = [n.split(".", 1)[-1].replace("_", " ") for _, n in read("classes.txt")]
        items = lambda train: [(str(base / "images" / paths[i]), labels[i]) for i in paths if is_train[i] == train]
        return names, items(True), items(False)
    from torchvision import datasets
    make = {"flowers102": lambda s: datasets.Flowers102(cfg.source, split=s),
            "food101": lambda s: datasets.Food101(cfg.source, split=s),
            "stanford-cars": lambda s: datasets.StanfordCars(cfg.source, split=s),
            "sun397": lambda s: datasets.SUN397(cfg.source)}[cfg.dataset]
    try:
        if cfg.dataset == "sun397":  # one pool: a seeded 80/20 split per class
            ds = make(None)
            rng = np.random.default_rng(cfg.seed)
            test_mask = rng.random(len(ds._labels)) < 0.2
            all_items = [(str(p), int(y)) for p, y in zip(ds._image_files, ds._labels)]
            return ds.classes, [x for x, t in zip(all_items, test_mask) if not t], [x for x, t in zip(all_items, test_mask) if t]
        train, test = make("train"), make("test")
    except Exception as e:
        die(f"cannot read {cfg.dataset} from {cfg.source} ({type(e).__name__}: {str(e)[:120]}); it must be in torchvision's layout")
    items = lambda ds: [(str(p), int(y)) for p, y in zip(ds._image_files, ds._labels)]
    names = getattr(train, "classes", None) or [f"class_{c}" for c in range(1 + max(train._labels))]
    return names, items(train), items(test)


def prepare_ood(cfg, out):
    names, train, test = load_ood_source(cfg)
    root = Path(os.path.commonpath([p for p, _ in train + test]))
    root = root if root.is_dir() else root.parent
    link_images(out, root)
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(names))
    id_cls, ood_cls = sorted(perm[: len(names) // 2].tolist()), sorted(perm[len(names) // 2:].tolist())
    new_label = {c: i for i, c in enumerate(id_cls + ood_cls)}
    rel = lambda p: "images/" + str(Path(p).relative_to(root))
    pick = lambda items, keep: [f"{rel(p)} {new_label[y]}" for p, y in items if y in keep]
    lines = {"id_train": pick(train, set(id_cls)), "id_val": pick(test, set(id_cls)),
             "ood_train": pick(train, set(ood_cls)), "ood_val": pick(test, set(ood_cls))}
    all_names = [names[c] for c in id_cls + ood_cls]
    (out / "id_classes.txt").write_text("".join(n + "\n" for n in all_names[: len(id_cls)]))
    (out / "ood_classes.txt").write_text("".join(n + "\n" for n in all_names[len(id_cls):]))
    return all_names, lines


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def profile(lines, num_classes):
    counts = Counter(int(line.rsplit(maxsplit=1)[1]) for line in lines)
    per_class = [counts.get(c, 0) for c in range(num_classes)]
    groups = {"many": sum(n > 100 for n in per_class), "medium": sum(20 <= n <= 100 for n in per_class),
              "few": sum(0 < n < 20 for n in per_class)}
    return per_class, groups


def main():
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):  # the dataset may be given positionally
        argv = ["--dataset"] + argv
    (cfg,) = HfArgumentParser(Config).parse_args_into_dataclasses(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = {}
    if cfg.dataset in LT_SETS:
        names, lines = prepare_lt(cfg, out)
    elif cfg.dataset in LIST_SETS:
        names, lines, missing = prepare_lists(cfg, out)
    elif cfg.dataset == "folder":
        names, lines = prepare_folder(cfg, out)
    elif cfg.dataset in OOD_SETS:
        names, lines = prepare_ood(cfg, out)
    else:
        die(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(LT_SETS + tuple(LIST_SETS) + ('folder',) + OOD_SETS)}")
    if cfg.class_names:
        names = [n.strip() for n in Path(cfg.class_names).read_text().splitlines() if n.strip()]
    (out / "classes.txt").write_text("".join(n + "\n" for n in names))
    for split, split_lines in lines.items():
        (out / f"{split}.txt").write_text("".join(line + "\n" for line in split_lines))
    train_key = "train" if "train" in lines else "id_train"
    per_class, groups = profile(lines[train_key], len(names))
    sidecar = {"made_by": "prepare.py", "config": asdict(cfg), "num_classes": len(names),
               "splits": {s: {"file": f"{s}.txt", "lines": len(v), "sha256": sha256(out / f"{s}.txt")} for s, v in lines.items()},
               "train_class_counts": per_class, "groups": groups, "missing": missing}
    (out / "prepare.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    print(f"{cfg.dataset}: {len(names)} classes -> {out}")
    for s, v in lines.items():
        print(f"  {s + '.txt':14s} {len(v):7d} images")
    print(f"  {train_key} per class: {per_class if len(per_class) <= 20 else str(per_class[:10])[:-1] + ', ...]'}"
          f" (max {max(per_class)}, min {min(per_class)})")
    print(f"  many (>100): {groups['many']}  medium (20-100): {groups['medium']}  few (<20): {groups['few']}")


if __name__ == "__main__":
    main()
