"""prepare.py run as a user runs it: profiles, disjoint splits, determinism, bad lists, missing
images."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def prepare(*args, check=True, cwd=None):
    proc = subprocess.run([sys.executable, REPO / "prepare.py", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def lines(path):
    return Path(path).read_text().splitlines()


def per_class(split_lines, num_classes):
    return np.bincount([int(line.rsplit(maxsplit=1)[1]) for line in split_lines],
                       minlength=num_classes).tolist()


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "fmnist-lt"
    proc = prepare("fashion-mnist-lt", "--out", out)
    return out, proc.stdout


def test_fashion_profile_is_exact(fmnist):
    out, stdout = fmnist
    assert per_class(lines(out / "train.txt"), 10) == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert per_class(lines(out / "val.txt"), 10) == [100] * 10  # unused training images
    assert per_class(lines(out / "test.txt"), 10) == [1000] * 10  # the whole official test set
    assert all(line.startswith("images/train/") for line in lines(out / "val.txt"))
    assert lines(out / "classes.txt")[0] == "T-shirt/top" and len(lines(out / "classes.txt")) == 10
    assert "  many/medium/few      4/3/3" in stdout
    sidecar = json.loads((out / "prepare.json").read_text())
    assert sidecar["splits"]["train"]["lines"] == 1236 \
        and sidecar["groups"] == {"many": 4, "medium": 3, "few": 3}
    first = lines(out / "train.txt")[0].rsplit(maxsplit=1)[0]
    image = Image.open(out / first)
    assert image.size == (28, 28)


def test_splits_are_disjoint(fmnist):
    out, _ = fmnist
    splits = {s: {line.rsplit(maxsplit=1)[0] for line in lines(out / f"{s}.txt")}
              for s in ("train", "val", "test")}
    # no duplicate inside a split either
    assert sum(map(len, splits.values())) == 1236 + 1000 + 10000
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"]
    assert not splits["val"] & splits["test"]


def test_rerun_is_byte_identical(fmnist, tmp_path):
    out, _ = fmnist
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    prepare("fashion-mnist-lt", "--out", out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    other = tmp_path / "again"
    small = ("--max-per-class", "50", "--imbalance", "10", "--test-per-class", "50")
    prepare("fashion-mnist-lt", "--out", other, *small)
    prepare("fashion-mnist-lt", "--out", tmp_path / "again2", *small)
    for name in ("train.txt", "val.txt", "test.txt", "classes.txt"):
        assert (other / name).read_bytes() == (tmp_path / "again2" / name).read_bytes()
    assert per_class(lines(other / "train.txt"), 10) == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    seeded = tmp_path / "seed1"
    prepare("fashion-mnist-lt", "--out", seeded, *small, "--seed", "1")
    assert per_class(lines(seeded / "test.txt"), 10) == [50] * 10
    assert (seeded / "train.txt").read_bytes() != (other / "train.txt").read_bytes()


def make_images(root, rel_paths):
    for rel in rel_paths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(rel) % 255, 10, 20)).save(path)


def test_list_dataset_missing_and_malformed(tmp_path):
    root, lists = tmp_path / "imagenet", tmp_path / "lists"
    lists.mkdir()
    train = [f"train/n0{c}/img{i}.JPEG {c}" for c in range(3) for i in range(4 - c)]
    val = [f"val/n0{c}/v{c}.JPEG {c}" for c in range(3)]
    make_images(root, [line.split()[0] for line in train + val])
    (lists / "ImageNet_LT_train.txt").write_text("\n".join(train) + "\n")
    (lists / "ImageNet_LT_val.txt").write_text("\n".join(val) + "\n")
    (lists / "ImageNet_LT_test.txt").write_text("\n".join(val + ["val/n00/gone.JPEG 0"]) + "\n")
    out = tmp_path / "inlt"
    proc = prepare("imagenet-lt", "--lists", lists, "--root", root, "--out", out)
    assert "1 of 4 test images missing" in proc.stderr and "gone.JPEG" in proc.stderr
    assert per_class(lines(out / "train.txt"), 3) == [4, 3, 2]
    assert len(lines(out / "test.txt")) == 3
    # torchvision's names
    assert lines(out / "classes.txt") == ["tench", "goldfish", "great white shark"]
    assert (out / lines(out / "train.txt")[0].rsplit(maxsplit=1)[0]).is_file()
    (lists / "ImageNet_LT_val.txt").write_text("val/n00/v0.JPEG 0\nval/n01/v1.JPEG one\n")
    proc = prepare("imagenet-lt", "--lists", lists, "--root", root, "--out", out, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"prepare.py: error: {lists / 'ImageNet_LT_val.txt'}:2:")


def test_folder_long_tail(tmp_path):
    root = tmp_path / "photos"
    make_images(root, [f"{name}/{i}.png" for name, n in (("cat", 30), ("dog", 20), ("emu", 10))
                       for i in range(n)])
    out = tmp_path / "folder"
    prepare("folder", "--root", root, "--out", out, "--max-per-class", "20", "--imbalance", "4")
    assert lines(out / "classes.txt") == ["cat", "dog", "emu"]
    assert per_class(lines(out / "train.txt"), 3) == [20, 10, 5]
    assert per_class(lines(out / "val.txt"), 3) == [3, 2, 1]


def test_cifar_offline_names_source(tmp_path):
    proc = prepare("cifar100-lt", "--out", tmp_path / "c", "--source", tmp_path / "nothing-here",
                   check=False)
    assert proc.returncode != 0 and "--source" in proc.stderr.strip().splitlines()[-1]


def test_ood_halves_from_cub(tmp_path):
    base = tmp_path / "CUB_200_2011"
    names = [f"{k:03d}.Bird_{k}" for k in range(1, 7)]
    paths = [f"{n}/img_{i}.jpg" for n in names for i in range(3)]
    make_images(base / "images", paths)
    (base / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(paths)))
    (base / "image_class_labels.txt").write_text("".join(f"{i + 1} {i // 3 + 1}\n"
                                                         for i in range(len(paths))))
    (base / "train_test_split.txt").write_text("".join(f"{i + 1} {int(i % 3 != 0)}\n"
                                                       for i in range(len(paths))))
    (base / "classes.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(names)))
    out = tmp_path / "cub"
    prepare("cub", "--source", tmp_path, "--out", out)
    id_names, ood_names = lines(out / "id_classes.txt"), lines(out / "ood_classes.txt")
    assert len(id_names) == len(ood_names) == 3 and not set(id_names) & set(ood_names)
    assert lines(out / "classes.txt") == id_names + ood_names
    assert {int(line.split()[1]) for line in lines(out / "id_train.txt")} == {0, 1, 2}
    assert {int(line.split()[1]) for line in lines(out / "ood_val.txt")} == {3, 4, 5}
    assert len(lines(out / "id_train.txt")) == 6 and len(lines(out / "id_val.txt")) == 3
    before = (out / "id_train.txt").read_bytes()
    prepare("cub", "--source", tmp_path, "--out", out)
    assert (out / "id_train.txt").read_bytes() == before
