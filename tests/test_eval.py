"""eval.py: metric functions against hand-made predictions, and real runs on checkpoints made by train.py.

    .venv/bin/pytest -q tests/test_eval.py

The module fixture prepares tiny fashion-mnist-lt data, makes class-derived caption features with numpy (the
format encode.py writes), and trains three real students with train.py: a 1-epoch ID-only run (classes 0-5,
text head + Li et al.'s cosine head over a 24-d "CLIP" class text), and two short runs on all classes, one on
class-derived captions and one on the same captions shuffled across images.
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ID_CLASSES = 6  # classes 0-5 are in-distribution for the ID-only run, 6-9 are OOD
TEXT_DIM, CLIP_DIM = 32, 24

spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


def run(*args, ok=True):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


# ----------------------------------------------------------------------------- metric functions

def test_groups_at_the_boundaries():
    counts = [0, 1, 19, 20, 21, 100, 101, 500]
    assert ev.class_groups(counts).tolist() == ["ood", "few", "few", "medium", "medium", "medium", "many", "many"]


def test_group_and_per_class_accuracy_by_hand():
    counts = [101, 100, 20, 19]  # many, medium, medium, few
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    preds = [0, 1, 1, 1, 0, 2, 3, 0]  # right: 0 | 1 1 | 2 | 3  -> 5 of 8
    acc = ev.group_accuracy(preds, labels, counts)
    assert acc == {"top1": 5 / 8, "many": 1 / 2, "medium": 3 / 4, "few": 1 / 2}
    assert ev.per_class_accuracy(preds, labels, 5) == [0.5, 1.0, 0.5, 0.5, None]
    assert ev.mean_of(ev.per_class_accuracy(preds, labels, 5)) == pytest.approx(0.625)
    # Sample-based groups: a medium class with more test images weighs more (3 of 4 right, not the class mean).
    assert ev.group_accuracy([1, 1, 1, 0, 0], [1, 1, 1, 2, 2], counts)["medium"] == pytest.approx(3 / 5)
    assert ev.group_accuracy([0, 0], [0, 1], [500, 500]) == {"top1": 0.5, "many": 0.5, "medium": None, "few": None}


def test_topk_and_calibration_by_hand():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([1, 2, 2])
    assert ev.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert ev.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert ev.topk_accuracy(scores, labels, 5) == 1.0  # k above the class count means all classes
    # Two confidence bins: 0.9 (both right: gap 0.1) and 0.6 (one of two right: gap 0.1) -> ECE 0.1.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert ev.expected_calibration_error(probs, np.array([0, 0, 0, 1]), bins=10) == pytest.approx(0.1)
    assert ev.expected_calibration_error(np.array([[0.75, 0.25]] * 4), np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    metrics = ev.classification_metrics(torch.log(torch.tensor(probs)), np.array([0, 0, 0, 1]), [150, 10], 10)
    assert metrics["top1"] == 0.75 and metrics["many"] == 1.0 and metrics["few"] == 0.0 and metrics["ece"] == pytest.approx(0.1)


def test_zero_shot_id_and_ood_are_scored_within_their_own_classes():
    counts = [30, 5]  # two ID classes; class texts 2 and 3 were never trained on
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # label 0: right
                           [0.9, 0.2, 0.0, 0.0],   # label 1: wrong all-way, wrong among ID
                           [0.9, 0.0, 0.5, 0.2],   # label 2: wrong all-way, right among OOD
                           [0.0, 0.0, 0.6, 0.5]])  # label 3: wrong either way
    result = ev.zero_shot_metrics(scores, np.array([0, 1, 2, 3]), counts)
    assert result["top1"] == 0.25 and result["medium"] == 1.0 and result["few"] == 0.0
    assert result["per_class"] == [1.0, 0.0, 0.0, 0.0]
    assert result["id"] == {"top1": 0.5, "mean_class": 0.5, "classes": 2, "samples": 2}
    assert result["ood"] == {"top1": 0.5, "mean_class": 0.5, "classes": 2, "samples": 2}
    assert ev.zero_shot_metrics(scores[:2], np.array([0, 1]), [30, 5, 0, 0])["ood"] is None  # no OOD image


def test_first_k_per_class_keeps_split_order():
    items = [("a", 3), ("b", 1), ("c", 3), ("d", 3), ("e", 0), ("f", 1)]
    rows, taken = ev.first_k_per_class(items, {1, 3}, 2)
    assert rows == [0, 1, 2, 5] and taken == {1: 2, 3: 2}


def test_models_section_is_trains():
    """eval.py rebuilds checkpoints with its own copy of train.py's model code: the copies must not drift."""
    def section(path):
        text = (REPO / path).read_text()
        start, end = text.index("# " + "-" * 77 + " models\n"), text.index("# " + "-" * 77 + " end of models")
        return text[start:end]
    assert section("eval.py") == section("train.py")


# ----------------------------------------------------------------------------- real runs

def unit_rows(rng, n, dim):
    rows = rng.standard_normal((n, dim))
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def write_text(path, split_file, class_vecs, rng, shuffle=False):
    """text.npy + text.json as encode.py writes them: 2 'captions' per image = its class vector + noise."""
    labels = np.array([int(line.rsplit(maxsplit=1)[1]) for line in split_file.read_text().splitlines()])
    text = class_vecs[labels][:, None, :] + 0.1 * rng.standard_normal((len(labels), 2, class_vecs.shape[1]))
    if shuffle:  # the same captions given to other images: no class information left
        text = text[rng.permutation(len(labels))]
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    np.save(path, text.astype(np.float16))
    Path(path).with_suffix(".json").write_text(json.dumps({
        "kind": "text", "encoder": "test-encoder", "prompts": ["general", "t1"], "shape": list(text.shape),
        "split_sha256": hashlib.sha256(split_file.read_bytes()).hexdigest(), "captions_sha256": "test"}))


def write_classes(path, class_vecs, classes_file, encoder):
    np.save(path, class_vecs.astype(np.float16))
    Path(path).with_suffix(".json").write_text(json.dumps({
        "kind": "classes", "encoder": encoder, "classes_sha256": hashlib.sha256(classes_file.read_bytes()).hexdigest(),
        "descriptions_sha256": None}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    # 30 test images a class keep eval fast.
    run(REPO / "prepare.py", "fashion-mnist-lt", "--out", data, "--max-per-class", 100, "--imbalance", 10, "--val-per-class", 10,
        "--test-per-class", 30)
    # An ID/OOD layout as prepare.py writes for Li et al.'s sets: ID classes first in classes.txt.
    classes = (data / "classes.txt").read_text().splitlines()
    (data / "id_classes.txt").write_text("\n".join(classes[:ID_CLASSES]) + "\n")
    for split, source, keep in (("id_train", "train", lambda y: y < ID_CLASSES), ("id_val", "val", lambda y: y < ID_CLASSES),
                                ("ood_train", "train", lambda y: y >= ID_CLASSES)):
        lines = [l for l in (data / f"{source}.txt").read_text().splitlines() if keep(int(l.rsplit(maxsplit=1)[1]))]
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n")

    rng = np.random.default_rng(0)
    text_vecs, clip_vecs = unit_rows(rng, 10, TEXT_DIM), unit_rows(rng, 10, CLIP_DIM)
    feats = root / "feats"
    feats.mkdir()
    write_text(feats / "text.npy", data / "train.txt", text_vecs, rng)
    write_text(feats / "shuffled.npy", data / "train.txt", text_vecs, rng, shuffle=True)
    write_text(feats / "text_id.npy", data / "id_train.txt", text_vecs, rng)
    write_classes(feats / "classes.npy", text_vecs, data / "classes.txt", "test-encoder")
    write_classes(feats / "clip_classes.npy", clip_vecs, data / "classes.txt", "test-clip")
    np.save(feats / "clip_id_classes.npy", clip_vecs[:ID_CLASSES].astype(np.float16))

    small = ["--arch", "resnet20", "--res", 16, "--batch-size", 32, "--log-every", 5]
    run(REPO / "train.py", "--data", data, "--train-split", "id_train.txt", "--val-split", "id_val.txt", "--classes", "id_classes.txt",
        "--epochs", 1, "--text", feats / "text_id.npy", "--head", "cosine", "--class-text", feats / "clip_id_classes.npy",
        "--out", root / "id_only", *small)
    for name, text in (("aligned", "text.npy"), ("shuffled", "shuffled.npy")):
        run(REPO / "train.py", "--data", data, "--epochs", 12, "--warmup-epochs", 1, "--text", feats / text, "--out", root / name, *small)
    return SimpleNamespace(root=root, data=data, feats=feats, id_only=root / "id_only" / "final.pt",
                           aligned=root / "aligned" / "final.pt", shuffled=root / "shuffled" / "final.pt")


@pytest.fixture(scope="module")
def report(tiny):
    out = tiny.root / "report"
    result = run(REPO / "eval.py", tiny.id_only, tiny.aligned, tiny.shuffled, "--data", tiny.data, "--split", "test",
                 "--class-text", tiny.feats / "classes.npy", "--few-shot", 5, "--few-shot-split", "ood_train.txt",
                 "--tsne-samples", 150, "--out", out)
    runs = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    return SimpleNamespace(out=out, stdout=result.stdout, runs=runs)


def test_table_has_a_row_per_checkpoint(report):
    table = [l for l in (report.out / "report.md").read_text().splitlines() if l.startswith("| ")]
    assert table[0].startswith("| run | top-1 | ") and "zero-shot" in table[0] and "k-shot OOD/class" in table[0]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["id_only", "aligned", "shuffled"]
    assert "(+" in table[2] or "(-" in table[2]  # deltas against the first run
    assert all(row in report.stdout for row in table)  # printed too
    assert list(report.runs) == ["id_only", "aligned", "shuffled"]


def test_long_tail_metrics_of_a_one_epoch_run(report):
    run_ = report.runs["id_only"]
    assert run_["num_classes"] == ID_CLASSES and run_["class_counts"] == [100, 77, 59, 46, 35, 27]
    clf = run_["classifier"]  # its own 6 classes only: 180 of the 300 test images
    assert clf["samples"] == 180 and len(clf["per_class"]) == ID_CLASSES
    assert clf["many"] is None and clf["few"] is None and clf["medium"] == clf["top1"]  # every class has 20..100 images
    assert clf["mean_class"] == pytest.approx(clf["top1"])  # a balanced test set: sample and class means agree
    for key in ("top1", "top5", "ece", "mean_class"):
        assert 0.0 <= clf[key] <= 1.0
    assert clf["top5"] >= clf["top1"]
    full = report.runs["aligned"]["classifier"]
    assert full["samples"] == 300 and full["few"] is not None and full["medium"] is not None


def test_zero_shot_through_the_text_head_needs_aligned_captions(report):
    """Class-derived captions make the text head a zero-shot classifier; the same captions shuffled across images
    train the classifier just as well but leave the text head at chance (10 classes: 10 %)."""
    aligned, shuffled = report.runs["aligned"]["zero_shot"], report.runs["shuffled"]["zero_shot"]
    assert aligned["via"] == shuffled["via"] == "text_head"
    print(f"zero-shot top-1: aligned {aligned['top1']:.3f}, shuffled {shuffled['top1']:.3f}")
    assert aligned["top1"] > 0.35
    assert shuffled["top1"] < 0.30
    assert aligned["top1"] - shuffled["top1"] > 0.15
    assert aligned["ood"] is None and len(aligned["per_class"]) == 10


def test_id_ood_zero_shot_and_few_shot(report):
    run_ = report.runs["id_only"]
    zs = run_["zero_shot"]
    assert zs["via"] == "text_head"  # the 32-d class text fits its text head, not its 24-d clip_proj
    assert zs["id"]["classes"] == ID_CLASSES and zs["id"]["samples"] == 180
    assert zs["ood"]["classes"] == 10 - ID_CLASSES and zs["ood"]["samples"] == 120
    shot = run_["few_shot"]
    assert shot["k"] == 5 and shot["classes"] == 4 and shot["train_images"] == 20 and shot["samples"] == 120
    assert 0.0 <= shot["mean_class"] <= 1.0
    assert "no OOD class" in report.runs["aligned"]["few_shot"]["skipped"]


def test_plots_are_real_pngs(report):
    from PIL import Image
    for name in ("per_class_vs_frequency.png", "tsne.png", "curves.png"):
        path = report.out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000, name
        assert f"{path}" in report.stdout
        with Image.open(path) as image:
            image.load()
            pixels = np.asarray(image.convert("RGB"))
        assert min(pixels.shape[:2]) > 300 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, name


def test_zero_shot_through_clip_proj_agrees_with_the_cosine_head(tiny):
    """Li et al.'s students classify by their clip_proj against class texts: among the ID classes, zero-shot
    through the 24-d class text is the checkpoint's own classifier."""
    out = tiny.root / "clip"
    run(REPO / "eval.py", tiny.id_only, "--data", tiny.data, "--split", "test,id_val", "--class-text", tiny.feats / "clip_classes.npy",
        "--tsne-samples", 0, "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 300 + 10 * ID_CLASSES and list(results["splits"]) == ["test.txt", "id_val.txt"]
    result = results["runs"][0]
    assert result["zero_shot"]["via"] == "clip_proj"
    assert result["zero_shot"]["id"]["top1"] == pytest.approx(result["classifier"]["top1"])
    assert not (out / "tsne.png").exists()


def test_flip_tta_averages_the_image_and_its_mirror(tiny):
    cfg = ev.Config(batch_size=64, workers=0, tta=True)
    classes = (tiny.data / "classes.txt").read_text().splitlines()
    ckpt, student = ev.load_checkpoint(tiny.aligned, classes, tiny.data / "classes.txt", torch.device("cpu"))
    items = ev.read_split(tiny.data / "test.txt", 10)[:40]
    feats, logits, errors = ev.extract(student, tiny.data, items, ckpt["preprocess"], cfg, torch.device("cpu"), "tta")
    images = torch.stack([ev.SplitImages(tiny.data, items, ckpt["preprocess"])[i][0] for i in range(len(items))])
    with torch.no_grad():
        plain, mirrored = student(images), student(images.flip(3))
    assert not errors
    torch.testing.assert_close(feats, (plain[0] + mirrored[0]) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, (plain[1] + mirrored[1]) / 2, rtol=1e-4, atol=1e-5)


def test_unreadable_image_is_recorded_and_skipped(tiny):
    (tiny.data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    classes = (tiny.data / "classes.txt").read_text().splitlines()
    ckpt, student = ev.load_checkpoint(tiny.aligned, classes, tiny.data / "classes.txt", torch.device("cpu"))
    items = ev.read_split(tiny.data / "test.txt", 10)[:3] + [("broken.png", 4), ("missing.png", 5)]
    feats, logits, errors = ev.extract(student, tiny.data, items, ckpt["preprocess"], ev.Config(workers=0), torch.device("cpu"), "bad")
    assert feats.shape == (5, 64) and logits.shape == (5, 10)
    assert [(e["index"], e["path"]) for e in errors] == [(3, "broken.png"), (4, "missing.png")]
    assert "UnidentifiedImageError" in errors[0]["error"] and "FileNotFoundError" in errors[1]["error"]


def test_text_head_refuses_class_text_of_another_encoder(tiny):
    classes = (tiny.data / "classes.txt").read_text().splitlines()
    ckpt, student = ev.load_checkpoint(tiny.aligned, classes, tiny.data / "classes.txt", torch.device("cpu"))
    class_text, _ = ev.load_class_text(tiny.feats / "classes.npy", 10, tiny.data / "classes.txt")
    feats = torch.randn(4, ckpt["feat_dim"])
    scores, route = ev.zero_shot_scores(feats, class_text, ckpt, student, "auto", "test-encoder", "aligned")
    assert scores.shape == (4, 10) and route == "text_head"
    with pytest.raises(SystemExit, match="encoded with other-encoder"):
        ev.zero_shot_scores(feats, class_text, ckpt, student, "auto", "other-encoder", "aligned")
    sidecar = json.loads((tiny.feats / "classes.json").read_text())
    np.save(tiny.root / "renamed.npy", np.load(tiny.feats / "classes.npy"))
    (tiny.root / "renamed.json").write_text(json.dumps(sidecar | {"names": classes[::-1]}))
    with pytest.raises(SystemExit, match="class names are not those of"):
        ev.load_class_text(tiny.root / "renamed.npy", 10, tiny.data / "classes.txt")
    ckpt.pop("text_head")  # what train.py --drop-text-head leaves
    scores, why = ev.zero_shot_scores(feats, class_text, ckpt, student, "auto", "test-encoder", "aligned")
    assert scores is None and "no text head" in why


def test_checkpoint_of_other_classes_is_refused(tiny):
    renamed = (tiny.data / "classes.txt").read_text().replace("Dress", "Gown")
    (tiny.data / "renamed_classes.txt").write_text(renamed)
    result = run(REPO / "eval.py", tiny.aligned, "--data", tiny.data, "--classes", "renamed_classes.txt",
                 "--out", tiny.root / "refused", ok=False)
    assert result.returncode != 0 and not (tiny.root / "refused" / "results.json").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eval.py: error:") and "other classes" in last and "'Dress'" in last and "'Gown'" in last


@pytest.mark.parametrize("args, message", [
    (["--split", "test_v2"], "split 'test_v2' not found"),
    (["--few-shot", "5", "--few-shot-split", "test.txt"], "is the evaluated split"),
])
def test_bad_splits_are_named(tiny, monkeypatch, args, message):
    """eval.py's main in this process (the import alone is most of a subprocess's time here)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", str(tiny.aligned), "--data", str(tiny.data), *args, "--out", str(tiny.root / "bad")])
    with pytest.raises(SystemExit) as exit_info:
        ev.main()
    assert str(exit_info.value).startswith("eval.py: error:") and message in str(exit_info.value)
    assert not (tiny.root / "bad").exists()
