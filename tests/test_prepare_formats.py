"""prepare.py on fake copies of the real benchmarks, written in their EXACT published on-disk
formats (CIFAR's python pickles with their real keys, the ImageNet-LT / Places-LT / iNat 2018 list
and category files, torchvision's OOD layouts, Li et al.'s split files), run as a user runs it: the
published counts and the class names must come out."""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_prepare import lines, per_class, prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]
CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()


def write_cifar(root, which, train_per_class, test_per_class, seed=0):
    """CIFAR's python version as the Toronto archive holds it: Python-2 era pickles of dicts with
    bytes keys, `data` uint8 [N, 3072] (R, G, B planes of 32x32), labels as lists, `filenames`,
    `batch_label`; a meta file of names. Random pixels: a test image differs from a training one."""
    rng = np.random.default_rng(seed)
    names = CIFAR10_NAMES if which == "cifar10" else CIFAR100_NAMES
    folder = Path(root) / ("cifar-10-batches-py" if which == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def batch(per_class, label):
        labels = rng.permutation(np.repeat(np.arange(len(names)), per_class)).tolist()
        return {b"batch_label": label.encode(),
                b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))],
                "labels": labels}

    def dump(name, record):
        with open(folder / name, "wb") as f:
            pickle.dump(record, f, protocol=2)

    if which == "cifar10":
        train = batch(train_per_class, "training batch")
        chunks = np.array_split(np.arange(len(train["labels"])), 5)
        for k, idx in enumerate(chunks, 1):
            dump(f"data_batch_{k}", {b"batch_label": f"training batch {k} of 5".encode(),
                                     b"data": train[b"data"][idx],
                                     b"labels": [train["labels"][i] for i in idx],
                                     b"filenames": [train[b"filenames"][i] for i in idx]})
        test = batch(test_per_class, "testing batch 1 of 1")
        dump("test_batch", {**{k: v for k, v in test.items() if k != "labels"},
                            b"labels": test["labels"]})
        dump("batches.meta", {b"num_cases_per_batch": 10000,
                              b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    else:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            record = batch(n, f"{split}ing batch 1 of 1")
            fine = record.pop("labels")
            dump(split, {**record, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]})
        dump("meta", {b"fine_label_names": [n.encode() for n in names],
                      b"coarse_label_names": [f"super_{k}".encode() for k in range(20)]})
    return folder


def test_cifar100_lt_as_published(tmp_path):
    write_cifar(tmp_path / "cifar", "cifar100", train_per_class=500, test_per_class=100)
    out = tmp_path / "c100"
    proc = prepare("cifar100-lt", "--out", out, "--imbalance", "100", "--source",
                   tmp_path / "cifar")
    assert len(lines(out / "train.txt")) == 10847 and len(lines(out / "test.txt")) == 10000
    train_counts = per_class(lines(out / "train.txt"), 100)
    assert train_counts[:3] == [500, 477, 455] and train_counts[-1] == 5
    assert per_class(lines(out / "test.txt"), 100) == [100] * 100
    # val: 20 unused training images per class; class 0 keeps all 500 for train, so it has none.
    assert per_class(lines(out / "val.txt"), 100) == [0] + [20] * 99
    names = lines(out / "classes.txt")
    assert names[:3] == ["apple", "aquarium fish", "baby"] and len(names) == 100 \
        and names[-1] == "worm"
    assert "  train.txt            10847          10847" in proc.stdout
    assert "  many/medium/few   35/35/30       35/35/30" in proc.stdout
    assert "warning" not in proc.stderr
    test_pixels = {Image.open(out / line.rsplit(maxsplit=1)[0]).tobytes()
                   for line in lines(out / "test.txt")}
    for split in ("train", "val"):
        paths = [line.rsplit(maxsplit=1)[0] for line in lines(out / f"{split}.txt")]
        assert not {Image.open(out / p).tobytes() for p in paths} & test_pixels, \
            f"a test image is in {split}.txt"
    assert not set(lines(out / "train.txt")) & set(lines(out / "val.txt"))


def test_cifar10_lt_as_published(tmp_path):
    write_cifar(tmp_path / "cifar", "cifar10", train_per_class=5000, test_per_class=1000)
    out = tmp_path / "c10"
    proc = prepare("cifar10-lt", "--out", out, "--source", tmp_path / "cifar")
    assert per_class(lines(out / "train.txt"), 10) \
        == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(lines(out / "train.txt")) == 12406 and len(lines(out / "test.txt")) == 10000
    assert per_class(lines(out / "val.txt"), 10) == [0] + [100] * 9
    assert lines(out / "classes.txt") == CIFAR10_NAMES
    assert "  train.txt            12406          12406" in proc.stdout \
        and "warning" not in proc.stderr
    sidecar = json.loads((out / "prepare.json").read_text())
    assert sidecar["groups"] == {"many": 8, "medium": 2, "few": 0} \
        and sidecar["published"]["train.txt"] == 12406


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = write_cifar(tmp_path / "cifar", "cifar100", train_per_class=2, test_per_class=1)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Payload()}, protocol=2))
    proc = prepare("cifar100-lt", "--out", tmp_path / "o", "--source", tmp_path / "cifar",
                   "--max-per-class", "2", "--imbalance", "2", check=False)
    assert proc.returncode != 0 and "pwned" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"prepare.py: error: {folder / 'meta'} is not a CIFAR")


def touch_all(root, rel_paths):
    for rel in rel_paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def write_lists(lists, root, splits):
    """{list file name: ["relative/path label", ...]}, every listed image present under root."""
    lists.mkdir(parents=True, exist_ok=True)
    for fname, split_lines in splits.items():
        (lists / fname).write_text("\n".join(split_lines) + "\n")
        touch_all(root, [line.rsplit(maxsplit=1)[0] for line in split_lines])


def test_imagenet_lt_names_profile_and_published_statistics(tmp_path):
    # many, medium, few, few: the group thresholds at their edges
    counts = {0: 101, 1: 20, 2: 19, 7: 1}
    train = [f"train/n0{c}/n0{c}_{i}.JPEG {c}" for c, n in counts.items() for i in range(n)]
    held = {s: [f"{s}/n0{c}/{s}_{c}.JPEG {c}" for c in counts] for s in ("val", "test")}
    write_lists(tmp_path / "ImageNet_LT", tmp_path / "imagenet", {
        "ImageNet_LT_train.txt": train, "ImageNet_LT_val.txt": held["val"],
        "ImageNet_LT_test.txt": held["test"]})
    out = tmp_path / "inlt"
    proc = prepare("imagenet-lt", "--lists", tmp_path / "ImageNet_LT", "--root",
                   tmp_path / "imagenet", "--out", out)
    names = lines(out / "classes.txt")
    # torchvision's names, up to the largest label the lists use
    assert names == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead",
                     "electric ray", "stingray", "cock"]
    assert "  many/medium/few      1/1/2    385/479/136" in proc.stdout
    assert "  train.txt              141         115846" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 5 \
        and "train.txt is 141, the published benchmark has 115846" in warnings[0]
    assert all(w.startswith("prepare.py: warning: imagenet-lt: ") for w in warnings)


def test_places_lt_names_keep_their_second_level(tmp_path):
    categories = ["/a/airfield 0", "/a/airplane_cabin 1", "/a/airport_terminal 2", "/a/alcove 3",
                  "/a/alley 4", "/a/amphitheater 5", "/a/amusement_arcade 6", "/a/amusement_park 7",
                  "/a/apartment_building/outdoor 8", "/a/aquarium 9"]
    lists, root = tmp_path / "Places_LT", tmp_path / "places365"
    split = {s: [f"{s}/{c.split()[0][3:]}/{s}_{i}.jpg {c.split()[1]}" for c in categories
                 for i in range(2)]
             for s in ("train", "val", "test")}
    write_lists(lists, root, {f"Places_LT_{s}.txt": v for s, v in split.items()})
    (lists / "categories_places365.txt").write_text("\n".join(categories) + "\n")
    out = tmp_path / "plt"
    prepare("places-lt", "--lists", lists, "--root", root, "--out", out)
    names = lines(out / "classes.txt")
    assert names[8] == "apartment_building/outdoor" and names[0] == "airfield" and len(names) == 10
    # the old last-folder rule named 8 `outdoor` and fell back to class_N
    assert len(set(names)) == 10


def test_places_lt_names_come_from_the_list_paths(tmp_path):
    """Issue 20: the Places-LT lists number labels 116 desert_road, 117 desert/sand, 118
    desert/vegetation, 141 field_road, 142 field/wild, while categories_places365.txt (sorted by its
    full path) orders those five otherwise. A label is named by the folder of its training images; a
    label with no training image by the file."""
    file_names = {k: f"class_{k:03d}" for k in range(150)}
    file_names |= {116: "desert/sand", 117: "desert/vegetation", 118: "desert_road",
                   140: "field/cultivated", 141: "field/wild", 142: "field_road"}
    list_names = dict(file_names) | {116: "desert_road", 117: "desert/sand",
                                     118: "desert/vegetation", 141: "field_road", 142: "field/wild"}
    lists, root = tmp_path / "Places_LT", tmp_path / "places365"
    # labels 0, 7, 14, ... have no training image: named by the file
    trained = [c for c in range(150) if c % 7]
    train = [f"train/{list_names[c]}/{i:08d}.jpg {c}" for c in trained
             for i in range(1 + (c == 116))]
    held = {s: [f"{s}_256/Places365_{s}_{c:08d}.jpg {c}" for c in range(150)]
            for s in ("val", "test")}
    write_lists(lists, root, {"Places_LT_train.txt": train, "Places_LT_val.txt": held["val"],
                              "Places_LT_test.txt": held["test"]})
    (lists / "categories_places365.txt").write_text(
        "".join(f"/{n[0]}/{n} {k}\n" for k, n in sorted(file_names.items(), key=lambda kv: kv[1])))
    out = tmp_path / "plt"
    proc = prepare("places-lt", "--lists", lists, "--root", root, "--out", out)
    names = lines(out / "classes.txt")
    # every name right, the five quirks included
    assert names == [list_names[c] for c in range(150)]
    assert [names[c] for c in (116, 117, 118, 141, 142)] \
        == ["desert_road", "desert/sand", "desert/vegetation", "field_road", "field/wild"]
    assert "5 labels named by their training images' folder" in proc.stdout \
        and "116 desert_road" in proc.stdout

    # A label whose images sit in two folders is a broken list: refused, naming the line.
    (lists / "Places_LT_train.txt").write_text(
        "\n".join(train + ["train/desert/sand/x.jpg 116"]) + "\n")
    touch_all(root, ["train/desert/sand/x.jpg"])
    proc = prepare("places-lt", "--lists", lists, "--root", root, "--out", tmp_path / "bad",
                   check=False)
    assert proc.returncode != 0 \
        and f"Places_LT_train.txt:{len(train) + 1}: label 116" in proc.stderr


def test_imagenet_lt_labels_must_follow_the_wnid_order(tmp_path):
    """ImageNet-LT takes torchvision's names by label: right only in sorted-wnid label order."""
    train = ["train/n01440764/a.JPEG 0", "train/n01443537/b.JPEG 2", "train/n01484850/c.JPEG 1"]
    write_lists(tmp_path / "lists", tmp_path / "imagenet", {f"ImageNet_LT_{s}.txt": train
                                                            for s in ("train", "val", "test")})
    proc = prepare("imagenet-lt", "--lists", tmp_path / "lists", "--root", tmp_path / "imagenet",
                   "--out", tmp_path / "out", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "label 1 is n01484850 but label 2 is n01443537" in last


def test_inat_labels_are_their_folders(tmp_path):
    """iNat 2018 keeps each image in a folder named by its category id: a line labelled otherwise is
    refused."""
    lists, root = tmp_path / "iNat18", tmp_path / "inat"
    write_lists(lists, root, {"iNaturalist18_train.txt": ["train_val2018/Plantae/0/a.jpg 0",
                                                          "train_val2018/Plantae/2/b.jpg 1"],
                              "iNaturalist18_val.txt": ["train_val2018/Plantae/0/v.jpg 0"]})
    (lists / "categories.json").write_text(json.dumps([{"id": k, "name": f"n{k}"}
                                                       for k in range(3)]))
    proc = prepare("inat2018", "--lists", lists, "--root", root, "--out", tmp_path / "inat-out",
                   check=False)
    assert proc.returncode != 0 \
        and "iNaturalist18_train.txt:2: the image is in category folder 2" in proc.stderr


def test_cub_names_by_class_id(tmp_path):
    """CUB's classes.txt is read by id, not line order: each image's class name is its folder's."""
    write_cub(tmp_path / "src")
    classes = tmp_path / "src" / "CUB_200_2011" / "classes.txt"
    rows = classes.read_text().splitlines()
    classes.write_text("\n".join(rows[::-1]) + "\n")  # ids in another line order: names still by id
    prepare("cub", "--source", tmp_path / "src", "--out", tmp_path / "cub")
    out = tmp_path / "cub"
    names = lines(out / "classes.txt")
    for split in ("id_train", "ood_train"):
        for line in lines(out / f"{split}.txt"):
            path, label = line.rsplit(maxsplit=1)
            assert names[int(label)].replace(" ", "_") in path


def test_inat2018_names_and_no_test_split(tmp_path):
    lists, root = tmp_path / "iNat18", tmp_path / "inat"
    cats = [{"id": k, "name": n, "supercategory": "Plantae", "kingdom": "Plantae"}
            for k, n in enumerate(["Aa macrantha", "Abies amabilis", "Abies balsamea"])]
    train = [f"train_val2018/Plantae/{c}/{c}_{i}.jpg {c}" for c in range(3) for i in range(3 - c)]
    val = [f"train_val2018/Plantae/{c}/v{c}.jpg {c}" for c in range(3)]
    write_lists(lists, root, {"iNaturalist18_train.txt": train, "iNaturalist18_val.txt": val})
    (lists / "categories.json").write_text(json.dumps(cats))
    out = tmp_path / "inat-out"
    proc = prepare("inat2018", "--lists", lists, "--root", root, "--out", out)
    assert lines(out / "classes.txt") == ["Aa macrantha", "Abies amabilis", "Abies balsamea"]
    # never val and test from one file
    assert len(lines(out / "val.txt")) == 3 and not (out / "test.txt").exists()
    assert "test.txt" not in proc.stdout \
        and "val.txt is 3, the published benchmark has 24426" in proc.stderr
    (lists / "categories.json").unlink()
    proc = prepare("inat2018", "--lists", lists, "--root", root, "--out", out, check=False)
    assert proc.returncode != 0 \
        and "categories.json not found" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("bad", ["/etc/passwd 0", "train/../../secret.JPEG 0"])
def test_published_list_paths_stay_under_root(tmp_path, bad):
    train = ["train/n00/a.JPEG 0", bad]
    write_lists(tmp_path / "lists", tmp_path / "imagenet", {"ImageNet_LT_train.txt": train[:1],
                                                            "ImageNet_LT_val.txt": train[:1],
                                                            "ImageNet_LT_test.txt": train[:1]})
    (tmp_path / "lists" / "ImageNet_LT_train.txt").write_text("\n".join(train) + "\n")
    out = tmp_path / "out"
    proc = prepare("imagenet-lt", "--lists", tmp_path / "lists", "--root", tmp_path / "imagenet",
                   "--out", out, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 \
        and last.startswith(f"prepare.py: error: {tmp_path / 'lists/ImageNet_LT_train.txt'}:2:")
    # refused before any work
    assert not (out / "images").exists() and not (out / "train.txt").exists()


def test_out_that_is_a_file_and_a_wrong_dataset_fail_in_one_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc = prepare("fashion-mnist-lt", "--out", tmp_path / "taken", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"prepare.py: error: {tmp_path / 'taken'} is a file, not a folder"
    proc = prepare("cifar1000-lt", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "invalid choice: 'cifar1000-lt'" in proc.stderr \
        and "cifar100-lt" in proc.stderr


def jpeg(path, shade=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade % 255, 40, 90)).save(path)


def write_food(root, names=("apple_pie", "baklava", "churros", "donuts"), train=6, test=3):
    """food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json, meta/classes.txt}
    (torchvision's layout)."""
    base = Path(root) / "food-101"
    meta = {"train": {n: [f"{n}/{c}{i:03d}" for i in range(train)] for c, n in enumerate(names)},
            "test": {n: [f"{n}/{c}{i:03d}" for i in range(train, train + test)]
                     for c, n in enumerate(names)}}
    for split, images_of in meta.items():
        for rels in images_of.values():
            for rel in rels:
                jpeg(base / "images" / f"{rel}.jpg", len(rel))
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(images_of))
    (base / "meta" / "classes.txt").write_text("\n".join(names) + "\n")
    return base


def write_flowers(root):
    """flowers-102/{jpg/image_00001.jpg.., imagelabels.mat (1-based labels), setid.mat (trnid,
    valid, tstid)}."""
    from scipy.io import savemat
    base = Path(root) / "flowers-102"
    labels = np.repeat(np.arange(1, 5), 4)  # 4 classes x 4 images
    for i in range(1, len(labels) + 1):
        jpeg(base / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(base / "imagelabels.mat", {"labels": labels[None]})
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "setid.mat", {"trnid": ids[0::4][None], "valid": ids[1::4][None],
                                 "tstid": np.sort(np.concatenate([ids[2::4], ids[3::4]]))[None]})


def write_sun397(root):
    base = Path(root) / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop", "/b/beach"]
    (base).mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for c, name in enumerate(classes):
        for i in range(5):
            jpeg(base / name.lstrip("/") / f"sun_{c}{i}abc.jpg", i)


def write_cars(root):
    """stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    cars_test_annos_withlabels.mat, cars_*/}."""
    from scipy.io import savemat
    base = Path(root) / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
             "Acura TL Type-S 2008"]
    savemat(base / "devkit" / "cars_meta.mat" if (base / "devkit").mkdir(parents=True) is None
            else None, {"class_names": np.array(names, dtype=object)[None]})
    for split, mat in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
        annos = np.zeros(8, dtype=[("fname", object), ("class", object)])
        for i in range(8):
            annos[i] = (f"{i + 1:05d}.jpg", i % 4 + 1)
            jpeg(base / f"cars_{split}" / f"{i + 1:05d}.jpg", i)
        savemat(mat, {"annotations": annos[None]})


def write_cub(root):
    base = Path(root) / "CUB_200_2011"
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
               "004.Groove_billed_Ani"]
    paths = [f"{n}/{n.split('.')[1]}_{i:04d}.jpg" for n in folders for i in range(4)]
    for p in paths:
        jpeg(base / "images" / p, len(p))
    (base / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(paths)))
    (base / "image_class_labels.txt").write_text("".join(f"{i + 1} {i // 4 + 1}\n"
                                                         for i in range(len(paths))))
    (base / "train_test_split.txt").write_text("".join(f"{i + 1} {int(i % 4 < 2)}\n"
                                                       for i in range(len(paths))))
    (base / "classes.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(folders)))


OOD = {  # dataset: (writer, every class name as classes.txt must hold it)
    "food101": (write_food, ["apple pie", "baklava", "churros", "donuts"]),
    "flowers102": (write_flowers, ["pink primrose", "hard-leaved pocket orchid", "canterbury bells",
                                   "sweet pea"]),
    "sun397": (write_sun397, ["abbey", "apartment building/outdoor", "bakery/shop", "beach"]),
    "stanford-cars": (write_cars, ["AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                                   "Acura TL Sedan 2012", "Acura TL Type-S 2008"]),
    "cub": (write_cub, ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross",
                        "Groove billed Ani"]),
}


@pytest.mark.parametrize("dataset", OOD)
def test_ood_sets_have_their_real_class_names(tmp_path, dataset):
    writer, names = OOD[dataset]
    writer(tmp_path / "src")
    out = tmp_path / "out"
    prepare(dataset, "--source", tmp_path / "src", "--out", out)
    id_names, ood_names, classes = (lines(out / f"{s}.txt")
                                    for s in ("id_classes", "ood_classes", "classes"))
    assert classes == id_names + ood_names \
        and len(classes) == (102 if dataset == "flowers102" else 4)
    seen = set()
    for split in ("id_train", "id_val", "ood_train", "ood_val"):
        for line in lines(out / f"{split}.txt"):
            path, label = line.rsplit(maxsplit=1)
            assert (out / path).is_file() \
                and (int(label) < len(id_names)) == split.startswith("id_")
            seen.add(classes[int(label)])
    assert seen == set(names)  # every image's class named as the dataset names it


def test_li_protocol_seeded(tmp_path):
    write_food(tmp_path / "src", train=7, test=3)  # 10 images per class
    out = tmp_path / "li"
    proc = prepare("food101", "--source", tmp_path / "src", "--out", out, "--protocol", "li")
    assert "--protocol li without --li-lists" in proc.stderr
    split = {s: lines(out / f"{s}.txt")
             for s in ("id_train", "id_test", "ood_test", "li_train", "li_ood_test")}
    assert per_class(split["id_train"], 4) == [7, 7, 0, 0] \
        and per_class(split["id_test"], 4) == [3, 3, 0, 0]
    # every image of the OOD classes, train and test alike
    assert per_class(split["ood_test"], 4) == [0, 0, 10, 10]
    assert not set(split["id_train"]) & set(split["id_test"])
    shots = [line for line in split["li_train"] if line not in split["id_train"]]
    assert per_class(shots, 4) == [0, 0, 5, 5] and len(split["li_train"]) == 14 + 10
    for c in (2, 3):  # the first 5 in sorted order
        of_c = sorted(line for line in split["ood_test"] if line.endswith(f" {c}"))
        assert sorted(line for line in shots if line.endswith(f" {c}")) == of_c[:5]
    assert sorted(split["li_ood_test"] + shots) == sorted(split["ood_test"])
    ours = tmp_path / "ours"
    prepare("food101", "--source", tmp_path / "src", "--out", ours)
    # one seed, one class half
    assert lines(ours / "ood_classes.txt") == lines(out / "ood_classes.txt")


def test_li_protocol_from_their_files(tmp_path):
    write_food(tmp_path / "src", train=7, test=3)
    li = tmp_path / "large_vlm_distillation_ood" / "data" / "Food101"
    li.mkdir(parents=True)
    # their lines: split/class_folder/file; ID = baklava, donuts; OOD = apple_pie, churros
    (li / "train_data.txt").write_text("".join(f"train/{n}/{c}{i:03d}.jpg\n"
                                               for c, n in ((1, "baklava"), (3, "donuts"))
                                               for i in range(7)))
    (li / "val_on_train_data.txt").write_text("".join(f"val_on_train/{n}/{c}{i:03d}.jpg\n"
                                                      for c, n in ((1, "baklava"), (3, "donuts"))
                                                      for i in range(7, 10)))
    (li / "val_data.txt").write_text("".join(f"val/{n}/{c}{i:03d}.jpg\n"
                                             for c, n in ((0, "apple_pie"), (2, "churros"))
                                             for i in range(10)))
    out = tmp_path / "li"
    proc = prepare("food101", "--source", tmp_path / "src", "--out", out, "--protocol", "li",
                   "--li-lists", li)
    assert "warning" not in proc.stderr
    assert lines(out / "id_classes.txt") == ["baklava", "donuts"] \
        and lines(out / "ood_classes.txt") == ["apple pie", "churros"]
    assert sorted(line.split()[0].rsplit("/", 1)[1] for line in lines(out / "id_test.txt")) == \
        sorted(f"{c}{i:03d}.jpg" for c in (1, 3) for i in range(7, 10))
    assert len(lines(out / "ood_test.txt")) == 20 and len(lines(out / "li_ood_test.txt")) == 10
    with open(li / "val_data.txt", "a") as f:
        f.write("val/churros/missing.jpg\n")
    proc = prepare("food101", "--source", tmp_path / "src", "--out", out, "--protocol", "li",
                   "--li-lists", li, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(
        f"prepare.py: error: {li / 'val_data.txt'}:21: 'val/churros/missing.jpg' matches no image")
