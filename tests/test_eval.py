"""eval.py: streaming metrics against hand-made predictions, and real runs on checkpoints made by
train.py.

    .venv/bin/pytest -q tests/test_eval.py

The module fixture prepares tiny fashion-mnist-lt data, makes class-derived caption features with
numpy (the format encode.py writes, sidecar digest included), and trains three real students with
train.py: a 1-epoch ID-only run (classes 0-5, text head + Li et al.'s cosine head over a 24-d "CLIP"
class text), and two short runs on all classes, one on class-derived captions and one on the same
captions shuffled across images (their sidecar says a tiny random stand-in made them, as encode.py
copies it from captions.meta.json). Attacks on eval.py's inputs (issue 15) run main() in this
process: the import alone is most of a subprocess's time here.
"""
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_helpers import sidecar_digest  # noqa: E402  (encode.py's sidecar["sha256"])

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ID_CLASSES = 6  # classes 0-5 are in-distribution for the ID-only run, 6-9 are OOD
TEXT_DIM, CLIP_DIM = 32, 24

spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


def run(*args, ok=True):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=900)
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def main_fails(monkeypatch, *argv):
    """eval.py's main in this process: the one-line error it exits with."""
    monkeypatch.setattr(sys, "argv", ["eval.py"])
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(a) for a in argv])
    message = str(exit_info.value)
    assert message.startswith("eval.py: error:") and "\n" not in message, message
    return message


# --------------------------------------------------------------------- streaming metrics by hand

def tally_of(scores, labels, num_classes=None, **kwargs):
    scores = torch.as_tensor(scores, dtype=torch.float32)
    tally = ev.Tally(num_classes or scores.shape[1], **kwargs)
    # batches of two: the counts must not depend on the batching
    for start in range(0, len(labels), 2):
        tally.add(scores[start:start + 2], torch.as_tensor(labels[start:start + 2]))
    return tally


def test_groups_at_the_boundaries():
    counts = [0, 1, 19, 20, 21, 100, 101, 500]
    # every image right: a group's accuracy is 1.0 exactly where it has a class
    scores = torch.eye(8)
    groups = tally_of(scores, list(range(8))).groups(counts)
    assert groups == {"top1": 1.0, "many": 1.0, "medium": 1.0, "few": 1.0}
    assert tally_of(scores[:2], [0, 1]).groups(counts) == {"top1": 1.0, "many": None,
                                                           "medium": None, "few": 1.0}
    assert [ev.class_group(c) for c in counts] == ["unseen", "few", "few", "medium", "medium",
                                                   "medium", "many", "many"]


def test_group_and_per_class_accuracy_by_hand():
    counts = [101, 100, 20, 19, 0]  # many, medium, medium, few, unseen
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    preds = [0, 1, 1, 1, 0, 2, 3, 0]  # right: 0 | 1 1 | 2 | 3  -> 5 of 8
    tally = tally_of(torch.eye(5)[preds], labels)
    assert tally.groups(counts) == {"top1": 5 / 8, "many": 1 / 2, "medium": 3 / 4, "few": 1 / 2}
    assert tally.per_class() == [0.5, 1.0, 0.5, 0.5, None]
    assert ev.report_of(tally, counts)["mean_class"] == pytest.approx(0.625)
    # Sample-based groups: a medium class with more test images weighs more (3 of 4 right, not the
    # class mean).
    assert tally_of(torch.eye(5)[[1, 1, 1, 0, 0]], [1, 1, 1, 2, 2]).groups(counts)["medium"] \
        == pytest.approx(3 / 5)


def test_group_average_over_classes_by_hand():
    """--group-average classes (OLTR's shot_acc): a group's accuracy is its classes' mean; by images
    a class with more test images weighs more. Medium: class 1 has 2 of 2 right, class 2 1 of 4."""
    counts = [101, 100, 20, 19]
    labels = [0, 1, 1, 2, 2, 2, 2, 3]
    preds = [0, 1, 1, 2, 0, 0, 0, 0]
    tally = tally_of(torch.eye(4)[preds], labels)
    assert tally.groups(counts)["medium"] == pytest.approx(3 / 6)
    assert tally.groups(counts, "classes") == {"top1": 4 / 8, "many": 1.0,
                                               "medium": pytest.approx(0.625), "few": 0.0}
    assert ev.report_of(tally, counts, "classes")["medium"] == pytest.approx(0.625)


def test_training_log_reports_the_last_epoch_and_the_mean_of_the_last_five(tmp_path):
    """Li et al. report the mean of the last 5 epochs' test accuracy: the report shows it beside the
    last epoch, from the run's metrics.jsonl, and says how many epochs a short run had."""
    long, short = tmp_path / "long", tmp_path / "short"
    for run_dir, epochs in ((long, 7), (short, 3)):
        run_dir.mkdir()
        rows = []
        for e in range(epochs):
            rows += [{"step": e, "epoch": e, "loss": 1.0}, {"epoch": e, "step": e, "rows_seen": 9},
                     {"epoch": e, "step": e, "val_top1": e / 10, "val_ood_mean_class": 1 - e / 10}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [{"name": d.name, "checkpoint": str(d / "final.pt")} for d in (long, short)]
    for run in runs:
        run["training_log"] = ev.training_log(run, 5)
    log = runs[0]["training_log"]
    assert log["last_epoch"] == 6 and log["evaluated_epochs"] == 7
    assert log["metrics"]["val_top1"] == {"last": 0.6, "mean_last": pytest.approx(0.4), "epochs": 5}
    assert log["metrics"]["val_ood_mean_class"]["mean_last"] == pytest.approx(0.6)
    table = ev.training_table(runs, 5)
    assert "| long | 6 | 60.0 / 40.0 | 40.0 / 60.0 |" in table
    assert "| short | 2 | 20.0 / 10.0 (3) | 80.0 / 90.0 (3) |" in table
    assert ev.training_log({"name": "none", "checkpoint": str(tmp_path / "none" / "final.pt")},
                           5) is None


def test_topk_and_calibration_by_hand():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    tally = tally_of(scores.log(), [1, 2, 2], ece_bins=10)
    assert tally.groups([50, 50, 50])["top1"] == pytest.approx(1 / 3)
    assert tally.calibration()["top5"] == 1.0  # k above the class count means all classes
    # Two confidence bins: 0.9 (both right: gap 0.1) and 0.6 (one of two right: gap 0.1) -> ECE 0.1.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert tally_of(probs.log(), [0, 0, 0, 1], ece_bins=10).calibration()["ece"] \
        == pytest.approx(0.1)
    assert tally_of(torch.tensor([[0.75, 0.25]] * 4).log(), [0, 0, 0, 1], ece_bins=15) \
        .calibration()["ece"] == pytest.approx(0.0, abs=1e-6)
    top2 = tally_of(torch.tensor([[3.0, 2, 1, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6]]), [1, 0],
                    ece_bins=4)
    # row 1: label 1 is second; row 2: label 0 is last of 7
    assert top2.calibration()["top5"] == 0.5


def test_id_and_ood_are_scored_within_their_own_classes():
    # two ID classes; class texts 2 and 3 were never trained on
    seen = np.array([True, True, False, False])
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # label 0: right
                           [0.9, 0.2, 0.0, 0.0],   # label 1: wrong all-way, wrong among ID
                           [0.9, 0.0, 0.5, 0.2],   # label 2: wrong all-way, right among OOD
                           [0.0, 0.0, 0.6, 0.5]])  # label 3: wrong either way
    labels = [0, 1, 2, 3]
    assert tally_of(scores, labels).per_class() == [1.0, 0.0, 0.0, 0.0]
    assert tally_of(scores, labels, allowed=seen).within() == {"top1": 0.5, "mean_class": 0.5,
                                                               "classes": 2, "samples": 2}
    assert tally_of(scores, labels, allowed=~seen).within() == {"top1": 0.5, "mean_class": 0.5,
                                                                "classes": 2, "samples": 2}
    assert tally_of(scores[:2], labels[:2], allowed=~seen).within()["samples"] == 0  # no OOD image


def test_first_k_per_class_keeps_split_order():
    items = [("a", 3), ("b", 1), ("c", 3), ("d", 3), ("e", 0), ("f", 1)]
    rows, taken = ev.first_k_per_class(items, {1, 3}, 2)
    assert rows == [0, 1, 2, 5] and taken == {1: 2, 3: 2}


def retained_bytes(obj, seen=None):
    """Bytes an object holds on to: its tensors' and arrays' buffers, containers and attributes,
    each once."""
    import types
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType,
                                           types.MethodType)):
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return sys.getsizeof(obj) + sum(retained_bytes(child, seen) for child in children)


def pass_state_bytes(n, classes=1000, dim=512, batch=500):
    """What a streaming pass over n images (random features and logits) holds once every image was
    added, less the sample mask its caller hands it (one bool an image, by design)."""
    ckpt = {"num_classes": classes, "class_counts": [50] * classes}
    inputs = SimpleNamespace(classes=[str(c) for c in range(classes)], id_count=0)
    keep = np.zeros(n, bool)
    keep[::n // 100] = True  # a t-SNE sample of 100 rows, whatever n
    state = ev.Pass(ckpt, inputs, SimpleNamespace(ece_bins=15, group_average="images"), None, keep)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n, batch):
        rows = torch.arange(start, min(n, start + batch))
        state.add(torch.randn(len(rows), dim, generator=gen),
                  torch.randn(len(rows), classes, generator=gen),
                  torch.randint(0, classes, (len(rows),), generator=gen), rows,
                  torch.ones(len(rows), dtype=torch.bool), [])
    assert len(state.kept()[0]) == 100 and state.results()["classifier"]["samples"] == n
    return retained_bytes(state) - state.keep_rows.untyped_storage().nbytes()


def test_a_pass_keeps_memory_per_class_not_per_image():
    """Issue 16: features + logits + probabilities (+ a float64 copy) of every image were ~14 KB an
    image here (1,000 classes, 512-d). A streaming pass must hold as much after 20,000 images as
    after 2,000: counts per class and the t-SNE sample's features, nothing per image. Measured as
    what the pass holds on to, two sizes in one run: a peak RSS depends on the allocator, BLAS
    threads and the CPU (it moved by 40 MiB between runs of one command here)."""
    small, large = 2_000, 20_000
    held_small, held_large = pass_state_bytes(small), pass_state_bytes(large)
    per_image = (held_large - held_small) / (large - small)
    # the walk sees the kept features, so it would see per-image ones
    assert held_small > 100 * 512 * 4
    assert per_image < 1, f"{held_small:,} B after {small:,} images, {held_large:,} B after " \
                          f"{large:,}"


def test_help_shows_each_flag_once_with_its_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["eval.py"])
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = capsys.readouterr().out
    for f in ev.fields(ev.Config):
        flag = "--" + f.name.replace("_", "-")
        assert f" {flag}" in text and f.metadata["help"].split()[0] in text, flag
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  -")]
    # each flag once, and -h
    assert len(listed) == len(set(listed)) == len(ev.fields(ev.Config)) + 1
    assert "--tta, --no-tta" in text and "--batch_size" not in text
    with pytest.raises(SystemExit):
        ev.main(["x.pt", "--device", "tpu"])
    assert "invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda')" in capsys.readouterr().err


def test_several_checkpoints_are_positionals_anywhere():
    cfg = ev.read_command_line(["a/final.pt", "--workers", "-1", "b/final.pt", "--tta", "--data",
                                "d"])
    assert cfg.checkpoints == ["a/final.pt", "b/final.pt"] and cfg.workers == -1 and cfg.tta \
        and cfg.data == "d"
    assert ev.read_command_line(["--checkpoints", "a.pt,b.pt"]).checkpoints == ["a.pt", "b.pt"]


def test_a_positional_is_a_whole_path_and_checkpoints_may_be_repeated(monkeypatch):
    """Issue 21: `runs/lr=0.1,wd=5e-4/final.pt` given as a positional was split at its comma and
    refused. A positional is one path; --checkpoints is comma-separated and may be repeated (a path
    with a comma goes as a positional). Issue 23: one parser (the shared parse_config) reads both,
    the paths of --checkpoints first."""
    monkeypatch.setattr(sys, "argv", ["eval.py"])
    comma = "runs/lr=0.1,wd=5e-4/final.pt"
    assert ev.read_command_line([comma, "--data", "d"]).checkpoints == [comma]
    cfg = ev.read_command_line(["--checkpoints", "a.pt,b.pt", comma, "--checkpoints=c.pt", "--tta"])
    assert cfg.checkpoints == ["a.pt", "b.pt", "c.pt", comma] and cfg.tta
    for argv in (["--checkpoints", "a.pt,,b.pt"], ["--checkpoints", "a.pt,"]):
        with pytest.raises(SystemExit, match="names an empty path"):
            ev.read_command_line(argv)


# --------------------------------------------------------------------- real runs

def unit_rows(rng, n, dim):
    rows = rng.standard_normal((n, dim))
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def save_artifact(path, array, sidecar):
    """An array and its sidecar as encode.py writes them: the sidecar's sha256 binds both."""
    np.save(path, array.astype(np.float16))
    Path(path).with_suffix(".json").write_text(
        json.dumps(sidecar | {"sha256": sidecar_digest(path, sidecar)}))


def write_text(path, split_file, class_vecs, rng, shuffle=False, vlm="test-vlm", tiny_random=False):
    """text.npy + text.json: 2 'captions' per image = its class vector + noise; `vlm` and
    `tiny_random` are the caption source encode.py copies from captions.meta.json."""
    labels = np.array([int(line.rsplit(maxsplit=1)[1])
                       for line in split_file.read_text().splitlines()])
    text = class_vecs[labels][:, None, :] \
        + 0.1 * rng.standard_normal((len(labels), 2, class_vecs.shape[1]))
    if shuffle:  # the same captions given to other images: no class information left
        text = text[rng.permutation(len(labels))]
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    save_artifact(path, text, {"kind": "text", "encoder": "test-encoder",
                               "prompts": ["general", "t1"], "shape": list(text.shape),
                               "split_sha256": ev.sha256_file(split_file),
                               "captions_sha256": "test", "missing_rows": [], "vlm": vlm,
                               "tiny_random": tiny_random})


def write_classes(path, class_vecs, classes_file, encoder):
    save_artifact(path, class_vecs, {"kind": "classes", "encoder": encoder,
                                     "names": ev.read_classes(classes_file),
                                     "classes_sha256": ev.sha256_file(classes_file),
                                     "descriptions_sha256": None})


def keep_lines(source, target, keep):
    lines = [line for line in source.read_text().splitlines()
             if keep(int(line.rsplit(maxsplit=1)[1]))]
    target.write_text("\n".join(lines) + "\n")
    return lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    # 30 test images a class keep eval fast.
    run(REPO / "prepare.py", "fashion-mnist-lt", "--out", data, "--max-per-class", 100,
        "--imbalance", 10, "--val-per-class", 10, "--test-per-class", 30)
    # An ID/OOD layout as prepare.py writes for Li et al.'s sets: ID classes first in classes.txt.
    classes = (data / "classes.txt").read_text().splitlines()
    (data / "id_classes.txt").write_text("\n".join(classes[:ID_CLASSES]) + "\n")
    keep_lines(data / "train.txt", data / "id_train.txt", lambda y: y < ID_CLASSES)
    keep_lines(data / "val.txt", data / "id_val.txt", lambda y: y < ID_CLASSES)
    keep_lines(data / "train.txt", data / "ood_train.txt", lambda y: y >= ID_CLASSES)
    # Li et al.'s 5-shot files by prepare.py's names: all OOD test images (here: test.txt's).
    keep_lines(data / "test.txt", data / "li_ood_test.txt", lambda y: y >= ID_CLASSES)

    rng = np.random.default_rng(0)
    text_vecs, clip_vecs = unit_rows(rng, 10, TEXT_DIM), unit_rows(rng, 10, CLIP_DIM)
    feats = root / "feats"
    feats.mkdir()
    write_text(feats / "text.npy", data / "train.txt", text_vecs, rng)
    # Captions that carry no class, as a tiny random stand-in's would, marked so in their sidecar.
    write_text(feats / "shuffled.npy", data / "train.txt", text_vecs, rng, shuffle=True, vlm="tiny",
               tiny_random=True)
    write_text(feats / "text_id.npy", data / "id_train.txt", text_vecs, rng)
    write_classes(feats / "classes.npy", text_vecs, data / "classes.txt", "test-encoder")
    write_classes(feats / "clip_classes.npy", clip_vecs, data / "classes.txt", "test-clip")

    small = ["--arch", "resnet20", "--res", 16, "--batch-size", 32, "--log-every", 5]
    run(REPO / "train.py", "--data", data, "--train-split", "id_train.txt", "--val-split",
        "id_val.txt", "--classes", "id_classes.txt", "--epochs", 1, "--text", feats / "text_id.npy",
        "--head", "cosine", "--class-text", feats / "clip_classes.npy", "--out", root / "id_only",
        *small)
    for name, text in (("aligned", "text.npy"), ("shuffled", "shuffled.npy")):
        run(REPO / "train.py", "--data", data, "--epochs", 12, "--warmup-epochs", 1, "--text",
            feats / text, "--out", root / name, *small)
    return SimpleNamespace(root=root, data=data, feats=feats, id_only=root / "id_only" / "final.pt",
                           aligned=root / "aligned" / "final.pt",
                           shuffled=root / "shuffled" / "final.pt")


@pytest.fixture(scope="module")
def report(tiny):
    out = tiny.root / "report"
    result = run(REPO / "eval.py", tiny.id_only, tiny.aligned, tiny.shuffled, "--data", tiny.data,
                 "--split", "test", "--class-text", tiny.feats / "classes.npy", "--few-shot", 5,
                 "--few-shot-split", "ood_train.txt", "--tsne-samples", 150, "--out", out)
    runs = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    return SimpleNamespace(out=out, stdout=result.stdout, stderr=result.stderr, runs=runs)


def reference_outputs(tiny, checkpoint, split="test.txt"):
    """Logits of every image of a split and their labels, image by image, not by eval.py's pass."""
    inputs = SimpleNamespace(classes=ev.read_classes(tiny.data / "classes.txt"),
                             classes_path=tiny.data / "classes.txt")
    ckpt, student = ev.load_checkpoint(checkpoint, inputs)
    items = ev.read_split(tiny.data / split, 10)
    images = ev.SplitImages(tiny.data, items, ckpt["preprocess"])
    with torch.no_grad():
        logits = student(torch.stack([images[i][0] for i in range(len(items))]))[1].double()
    return logits, np.array([y for _, y in items])


def test_table_has_a_row_per_checkpoint(report):
    text = (report.out / "report.md").read_text()
    # the training table follows
    table = text[text.index("| run | top-1 | "):].split("\n\n")[0].splitlines()
    assert table[0].startswith("| run | top-1 | ") and "zero-shot" in table[0] \
        and "k-shot OOD/class" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["id_only", "aligned", "shuffled"]
    assert "(+" in table[3] or "(-" in table[3]  # deltas against the first run
    assert all(row in report.stdout for row in table)  # printed too
    assert list(report.runs) == ["id_only", "aligned", "shuffled"]


def test_streamed_metrics_equal_a_direct_computation(tiny, report):
    """top-1, groups, top-5, ECE and per-class accuracy of the streaming pass equal a float64
    computation over all logits at once (what eval.py did before issue 16)."""
    logits, labels = reference_outputs(tiny, tiny.aligned)
    probs = logits.softmax(1).numpy()
    confidence, right = probs.max(1), probs.argmax(1) == labels
    which = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)
    ece = sum((which == b).mean() * abs(right[which == b].mean() - confidence[which == b].mean())
              for b in range(15) if (which == b).any())
    clf = report.runs["aligned"]["classifier"]
    assert clf["samples"] == 300 and clf["top1"] == pytest.approx(right.mean())
    assert clf["ece"] == pytest.approx(ece, abs=1e-5)
    top5 = (logits.topk(5, dim=1).indices.numpy() == labels[:, None]).any(1).mean()
    assert clf["top5"] == pytest.approx(top5) and clf["top5"] > clf["top1"]
    assert clf["per_class"] == pytest.approx([right[labels == c].mean() for c in range(10)])
    counts = np.array(report.runs["aligned"]["class_counts"])
    few = np.isin(labels, np.flatnonzero(counts < 20))
    assert clf["few"] == pytest.approx(right[few].mean()) and clf["many"] is None


def test_report_says_which_group_average_and_shows_the_training_log(tiny):
    """--group-average classes: groups are class means of results.json's per-class accuracies, the
    header says so; the training-time table holds the mean of the last 5 val_top1 of the run's
    metrics.jsonl."""
    out = tiny.root / "classes-report"
    run(REPO / "eval.py", tiny.aligned, "--data", tiny.data, "--split", "test", "--group-average",
        "classes", "--tsne-samples", 0, "--out", out)
    result = json.loads((out / "results.json").read_text())
    clf, counts = result["runs"][0]["classifier"], result["runs"][0]["class_counts"]
    for group in ("many", "medium", "few"):
        accs = [a for a, c in zip(clf["per_class"], counts) if ev.class_group(c) == group]
        assert clf[group] == (pytest.approx(np.mean(accs)) if accs else None)
    text = (out / "report.md").read_text()
    assert "the mean of its classes' accuracies (--group-average classes)" in text
    val = [r["val_top1"] for r in map(json.loads, (tiny.aligned.parent / "metrics.jsonl")
                                                  .read_text().splitlines()) if "val_top1" in r]
    assert f"| aligned | 11 | {100 * val[-1]:.1f} / {100 * np.mean(val[-5:]):.1f} |" in text


def test_long_tail_metrics_of_a_one_epoch_run(report):
    run_ = report.runs["id_only"]
    assert run_["num_classes"] == ID_CLASSES and run_["class_counts"] == [100, 77, 59, 46, 35, 27]
    clf = run_["classifier"]  # its own 6 classes only: 180 of the 300 test images
    assert clf["samples"] == 180 and len(clf["per_class"]) == ID_CLASSES
    # every class has 20..100 images
    assert clf["many"] is None and clf["few"] is None and clf["medium"] == clf["top1"]
    # a balanced test set: sample and class means agree
    assert clf["mean_class"] == pytest.approx(clf["top1"])
    assert clf["mean_class"] == pytest.approx(np.mean(clf["per_class"]))
    assert "id" not in clf  # it never learnt an OOD class: no ID / OOD halves of its classifier


def test_zero_shot_through_the_text_head_needs_aligned_captions(report):
    """Class-derived captions make the text head a zero-shot classifier; the same captions shuffled
    across images train the classifier just as well but leave the text head at chance (10 classes:
    10 %)."""
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
    # the 32-d class text fits its text head, not its 24-d clip_proj
    assert zs["via"] == "text_head"
    assert zs["id"]["classes"] == ID_CLASSES and zs["id"]["samples"] == 180
    assert zs["ood"]["classes"] == 10 - ID_CLASSES and zs["ood"]["samples"] == 120
    shot = run_["few_shot"]
    assert shot["k"] == 5 and shot["classes"] == 4 and shot["train_images"] == 20 \
        and shot["samples"] == 120
    print(f"5-shot probe over 4 unseen classes: {shot['mean_class']:.3f} (chance 0.25)")
    # five images of a class on frozen features are far above chance
    assert shot["mean_class"] > 0.40
    assert "no unseen class" in report.runs["aligned"]["few_shot"]["skipped"]


def test_li_five_shot_protocol_scores_the_classifier_within_the_ood_classes(tiny):
    """Li et al.'s 5-shot number: a student that learnt every class (here `aligned`), on
    prepare.py's li_ood_test.txt, scored among the OOD classes (after id_classes.txt) only, mean per
    class."""
    out = tiny.root / "li"
    run(REPO / "eval.py", tiny.aligned, "--data", tiny.data, "--split", "li_ood_test",
        "--tsne-samples", 0, "--out", out)
    clf = json.loads((out / "results.json").read_text())["runs"][0]["classifier"]
    logits, labels = reference_outputs(tiny, tiny.aligned, "li_ood_test.txt")
    among_ood = logits[:, ID_CLASSES:].argmax(1).numpy() + ID_CLASSES
    expected = np.mean([(among_ood[labels == c] == c).mean() for c in range(ID_CLASSES, 10)])
    assert clf["ood"] == {"top1": pytest.approx((among_ood == labels).mean()),
                          "mean_class": pytest.approx(expected), "classes": 10 - ID_CLASSES,
                          "samples": 120}
    assert clf["id"]["samples"] == 0 \
        and clf["top1"] == pytest.approx((logits.argmax(1).numpy() == labels).mean())
    assert "OOD/class" in (out / "report.md").read_text()


def test_zero_shot_through_clip_proj_agrees_with_the_cosine_head(tiny):
    """Li et al.'s students classify by their clip_proj against class texts: among the ID classes,
    zero-shot through the 24-d class text is the checkpoint's own classifier."""
    out = tiny.root / "clip"
    run(REPO / "eval.py", tiny.id_only, "--data", tiny.data, "--split", "test,id_val",
        "--class-text", tiny.feats / "clip_classes.npy", "--tsne-samples", 0, "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 300 + 10 * ID_CLASSES \
        and list(results["splits"]) == ["test.txt", "id_val.txt"]
    result = results["runs"][0]
    assert result["zero_shot"]["via"] == "clip_proj"
    assert result["zero_shot"]["id"]["top1"] == pytest.approx(result["classifier"]["top1"])
    assert not (out / "tsne.png").exists()


# --------------------------------------------------------------------- plots a reader can trust

def test_tsne_of_features_that_all_coincide_is_left_out(capsys):
    """A student that maps every sampled image to one point (a collapsed run, or identical images)
    made t-SNE's gradient NaN and ended eval in a traceback after every image was scored; now the
    plot is left out, with a word."""
    inputs = SimpleNamespace(classes=["a", "b"], labels=np.array([0, 1] * 4))
    runs = [{"name": "collapsed", "tsne": (np.arange(8), torch.ones(8, 16)),
             "class_counts": [5, 5]}]
    assert ev.plot_tsne(runs, inputs, 0) is None
    assert "t-SNE left out: collapsed maps every sampled image to the same feature" \
        in capsys.readouterr().err


def test_plots_are_real_pngs(report):
    from PIL import Image
    for name in ("per_class_vs_frequency.png", "tsne.png", "curves.png"):
        path = report.out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000, name
        assert f"{path}" in report.stdout
        with Image.open(path) as image:
            image.load()
            pixels = np.asarray(image.convert("RGB"))
        assert min(pixels.shape[:2]) > 300 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, \
            name


def test_curves_compare_loss_parts_and_show_a_single_point(tmp_path):
    """Classification loss next to classification loss, the text term on its own panel, no weighted
    total; a run that logged one point shows it (a marker); epochs from 0, as train.py logs them."""
    rows = {"with_text": [{"step": 5, "epoch": 0, "loss": 5.0, "loss_cls": 2.0, "loss_text": 3.0},
                          {"step": 10, "epoch": 1, "loss": 4.0, "loss_cls": 1.5, "loss_text": 2.5},
                          {"epoch": 1, "step": 10, "val_top1": 0.5, "val_few": 0.25}],
            "one_point": [{"step": 5, "epoch": 0, "loss": 0.3, "loss_cls": 0.3},
                          {"epoch": 0, "step": 5, "val_top1": 0.4, "val_few": None}]}
    runs = []
    for name, lines in rows.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs.append({"name": name, "checkpoint": str(tmp_path / name / "final.pt")})
    fig = ev.plot_curves(runs)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["Classification loss", "Text loss (VLM-KD)",
                          "Validation top-1 (solid), few (dotted)"]
    cls = {line.get_label(): line for line in axes["Classification loss"].get_lines()}
    assert list(cls) == ["with_text", "one_point"] and list(cls["one_point"].get_ydata()) == [0.3]
    assert cls["one_point"].get_marker() not in (None, "None", "")  # one point still drawn
    assert [line.get_label() for line in axes["Text loss (VLM-KD)"].get_lines()] == ["with_text"]
    # never the total
    assert all(max(line.get_ydata()) < 4 for ax in fig.axes[:2] for line in ax.get_lines())
    val_axes = axes["Validation top-1 (solid), few (dotted)"]
    val = {line.get_label(): list(line.get_xdata()) for line in val_axes.get_lines()}
    assert val == {"with_text top-1": [1], "with_text few": [1], "one_point top-1": [0]}


def test_tsne_legend_lists_only_what_is_drawn_and_per_class_names_classes(report, tiny):
    classes = ev.read_classes(tiny.data / "classes.txt")
    inputs = SimpleNamespace(classes=classes, labels=np.repeat(np.arange(10), 3))
    rng = torch.Generator().manual_seed(0)
    sample = (np.arange(30), torch.randn(30, 8, generator=rng))
    run_ = {"name": "all_seen", "class_counts": [100] * 5 + [10] * 5, "tsne": sample}
    legend = [t.get_text() for t in ev.plot_tsne([run_], inputs, 0).legends[0].get_texts()]
    assert legend == ["medium", "few"] + classes  # no "many", no "unseen": none is drawn
    runs = [report.runs[n] | {"name": n} for n in ("id_only", "aligned")]
    fig = ev.plot_per_class(runs, classes)
    ax = fig.axes[0]
    counts = report.runs["aligned"]["class_counts"]
    assert [t.get_text() for t in ax.get_xticklabels()] \
        == [f"{classes[c]} ({counts[c]})" for c in np.argsort(-np.array(counts), kind="stable")]
    # points, not lines
    assert not ax.get_lines() and [len(c.get_offsets()) for c in ax.collections] == [6, 10]


# --------------------------------------------------------------------- attacks (issue 15)

def test_flip_tta_averages_the_image_and_its_mirror(tiny):
    cfg = ev.Config(batch_size=16, workers=0, tta=True)
    inputs = SimpleNamespace(classes=ev.read_classes(tiny.data / "classes.txt"),
                             classes_path=tiny.data / "classes.txt")
    ckpt, student = ev.load_checkpoint(tiny.aligned, inputs)
    items = ev.read_split(tiny.data / "test.txt", 10)[:40]
    feats, errors = ev.extract(student, tiny.data, items, ckpt["preprocess"], cfg,
                               torch.device("cpu"), "tta")
    images = torch.stack([ev.SplitImages(tiny.data, items, ckpt["preprocess"])[i][0]
                          for i in range(len(items))])
    with torch.no_grad():
        plain, mirrored = student(images), student(images.flip(3))
    assert not errors
    torch.testing.assert_close(feats, (plain[0] + mirrored[0]) / 2, rtol=1e-4, atol=1e-5)


def test_undecodable_images_are_recorded_and_skipped(tiny):
    """A JPEG cut off after its header, a file that is no image and a missing file: listed in
    results.json, left out of every metric, the run finishes with a warning."""
    from PIL import Image
    bad = tiny.root / "bad_images"
    (bad / "img").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                      dtype=np.uint8)).save(bad / "img/cut.jpg")
    whole = (bad / "img/cut.jpg").read_bytes()
    (bad / "img/cut.jpg").write_bytes(whole[:len(whole) // 2])  # header intact, image data cut
    (bad / "img/text.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (bad / "classes.txt").write_text((tiny.data / "classes.txt").read_text())
    # prepare.py's layout: images/<split>/<class>/<n>.png
    os.symlink(tiny.data / "images", bad / "images")
    lines = (tiny.data / "test.txt").read_text().splitlines()[:6] \
        + ["img/cut.jpg 1", "img/text.png 2", "img/no.png 3"]
    (bad / "test.txt").write_text("\n".join(lines) + "\n")
    result = run(REPO / "eval.py", tiny.aligned, "--data", bad, "--tsne-samples", 0, "--out",
                 bad / "out")
    results = json.loads((bad / "out" / "results.json").read_text())["runs"][0]
    skipped = results["skipped_images"]
    assert [(e["index"], e["path"]) for e in skipped] == [(6, "img/cut.jpg"), (7, "img/text.png"),
                                                          (8, "img/no.png")]
    assert "truncated" in skipped[0]["error"] and "FileNotFoundError" in skipped[2]["error"]
    assert results["classifier"]["samples"] == 6 \
        and "3 images of test could not be decoded" in result.stderr


def poisoned(tiny, name, edit):
    ckpt = torch.load(tiny.aligned, weights_only=True)
    edit(ckpt)
    path = tiny.root / "attacks" / name / "final.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def test_checkpoint_with_non_finite_tensors_is_refused(tiny, monkeypatch):
    """Issue 15.1: a diverged final.pt (NaN in a BatchNorm running_var) was evaluated silently."""
    path = poisoned(tiny, "nan",
                    lambda c: c["model"]["backbone.stem.1.running_var"].fill_(float("nan")))
    message = main_fails(monkeypatch, path, "--data", tiny.data, "--out",
                         tiny.root / "attacks" / "nan_out")
    assert "tensor backbone.stem.1.running_var holds NaN or inf" in message and str(path) in message
    inf_head = poisoned(tiny, "inf",
                        lambda c: c["text_head"]["proj"]["weight"].view(-1)[3].fill_(float("inf")))
    assert "text_head.proj.weight" in main_fails(monkeypatch, inf_head, "--data", tiny.data,
                                                 "--out", tiny.root / "x")


@pytest.mark.parametrize("attack", ["truncated", "empty", "no_model_key", "wrong_shapes"])
def test_torn_or_incomplete_checkpoint_is_one_line(tiny, monkeypatch, attack):
    path = tiny.root / "attacks" / attack / "final.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    whole = tiny.aligned.read_bytes()
    if attack == "truncated":  # a kill during a non-atomic save
        path.write_bytes(whole[:len(whole) // 2])
    elif attack == "empty":
        path.write_bytes(b"")
    elif attack == "no_model_key":
        path = poisoned(tiny, attack, lambda c: c.pop("model"))
    else:
        path = poisoned(tiny, attack, lambda c: c.update(arch="resnet32"))
    message = main_fails(monkeypatch, path, "--data", tiny.data, "--out",
                         tiny.root / "attacks" / "out")
    assert str(path) in message
    assert {"truncated": "cannot be read", "empty": "cannot be read", "no_model_key": "no model",
            "wrong_shapes": "do not fit a resnet32"}[attack] in message


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable"])
def test_bad_out_fails_before_any_work(tiny, kind):
    """Issue 15.7: --out that is a file used to fail with a traceback after every image was
    evaluated. `unwritable` is a folder that refuses new files to every user, root included (chmod
    500 does not stop root)."""
    target = tiny.root / "attacks" / f"out_{kind}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "unwritable":
        target = Path("/proc/self")
    else:
        target.write_text("a file")
        target = target / "report" if kind == "under_a_file" else target
    # A second checkpoint that does not exist: --out, named first, is checked before any checkpoint.
    result = run(REPO / "eval.py", tiny.aligned, tiny.root / "missing.pt", "--data", tiny.data,
                 "--out", target, ok=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("eval.py: error:") and str(target) in last
    assert "Traceback" not in result.stderr and "missing.pt" not in result.stderr


@pytest.mark.parametrize("line, message", [
    ("../outside.png 1", "leaves the data root"),
    ("/etc/hostname 1", "leaves the data root"),
    ("images/x.png 10", "label 10, but there are only 10 classes"),
    ("images/x.png -1", "integer label >= 0"),
])
def test_bad_split_lines_are_refused_with_file_and_line(tiny, monkeypatch, line, message):
    """Issue 15.4 / 15.7: paths outside --data used to be read; labels are checked against the
    classes at start."""
    split = tiny.data / "attack.txt"
    split.write_text((tiny.data / "test.txt").read_text() + line + "\n")
    got = main_fails(monkeypatch, tiny.aligned, "--data", tiny.data, "--split", "attack", "--out",
                     tiny.root / "bad")
    assert f"{split}:301:" in got and message in got
    assert not (tiny.root / "bad").exists()


def test_class_text_that_does_not_match_its_sidecar_is_refused(tiny, monkeypatch):
    """Issue 15.5 / 15.8: class text edited after encode.py (rows swapped), without its sidecar, or
    with a NaN row."""
    attacks = tiny.root / "attacks" / "class_text"
    attacks.mkdir(parents=True, exist_ok=True)
    array, sidecar = np.load(tiny.feats / "classes.npy"), \
        json.loads((tiny.feats / "classes.json").read_text())
    np.save(attacks / "swapped.npy", array[[1, 0, *range(2, 10)]])
    (attacks / "swapped.json").write_text(json.dumps(sidecar))
    np.save(attacks / "alone.npy", array)
    nan = array.copy()
    nan[7, 3] = np.nan
    save_artifact(attacks / "nan.npy", nan, {k: v for k, v in sidecar.items() if k != "sha256"})
    args = [tiny.aligned, "--data", tiny.data, "--out", tiny.root / "x", "--class-text"]
    assert "do not match (sha256)" in main_fails(monkeypatch, *args, attacks / "swapped.npy")
    assert "alone.json not found" in main_fails(monkeypatch, *args, attacks / "alone.npy")
    assert "row 7 holds NaN or inf" in main_fails(monkeypatch, *args, attacks / "nan.npy")
    renamed = \
        {k: v for k, v in sidecar.items() if k != "sha256"} | {"names": sidecar["names"][::-1]}
    save_artifact(attacks / "renamed.npy", array, renamed)
    assert "class names are not those of" in main_fails(monkeypatch, *args, attacks / "renamed.npy")


def test_text_head_refuses_class_text_of_another_encoder(tiny):
    inputs = SimpleNamespace(classes=ev.read_classes(tiny.data / "classes.txt"),
                             classes_path=tiny.data / "classes.txt")
    ckpt, student = ev.load_checkpoint(tiny.aligned, inputs)
    class_text, encoder = ev.load_class_text(tiny.feats / "classes.npy", tiny.data / "classes.txt",
                                             10)
    feats = torch.randn(4, ckpt["feat_dim"])
    scorer, route = ev.zero_shot_scorer(class_text, encoder, ckpt, student, "auto", "aligned")
    assert scorer(feats).shape == (4, 10) and route == "text_head" and encoder == "test-encoder"
    with pytest.raises(SystemExit, match="encoded with other-encoder"):
        ev.zero_shot_scorer(class_text, "other-encoder", ckpt, student, "auto", "aligned")
    ckpt.pop("text_head")  # what train.py --drop-text-head leaves
    scorer, why = ev.zero_shot_scorer(class_text, encoder, ckpt, student, "auto", "aligned")
    assert scorer is None and "no text head" in why


def test_checkpoint_of_other_classes_is_refused(tiny):
    renamed = (tiny.data / "classes.txt").read_text().replace("Dress", "Gown")
    (tiny.data / "renamed_classes.txt").write_text(renamed)
    result = run(REPO / "eval.py", tiny.aligned, "--data", tiny.data, "--classes",
                 "renamed_classes.txt", "--out", tiny.root / "refused", ok=False)
    assert result.returncode != 0 and not (tiny.root / "refused" / "results.json").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eval.py: error:") and "other classes" in last and "'Dress'" in last \
        and "'Gown'" in last


@pytest.mark.parametrize("args, message", [
    (["--split", "test_v2"], "split 'test_v2' not found"),
    (["--few-shot", "5", "--few-shot-split", "test.txt"], "is an evaluated split"),
])
def test_bad_splits_are_named(tiny, monkeypatch, args, message):
    assert message in main_fails(monkeypatch, tiny.aligned, "--data", tiny.data, *args, "--out",
                                 tiny.root / "bad")
    assert not (tiny.root / "bad").exists()


# --------------------------------------------------------------------- issue 21: what the user sees

@pytest.fixture(scope="module")
def spied(tiny):
    """eval.py's main in this process on `aligned` (captions of "test-vlm") and `shuffled` (their
    sidecar: a tiny random stand-in's), output captured as a job log sees it (not a terminal), each
    saved plot's titles recorded."""
    import contextlib
    import io

    from matplotlib.figure import Figure
    titles, save = {}, Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        titles[Path(path).name] = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
        return save(fig, path, *args, **kwargs)

    out, stdout, stderr = tiny.root / "spied", io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        patch.setattr(sys, "argv", ["eval.py"])
        patch.setattr(Figure, "savefig", recording_savefig)
        ev.main([str(a) for a in (tiny.aligned, tiny.shuffled, "--data", tiny.data, "--split",
                                  "test", "--class-text", tiny.feats / "classes.npy",
                                  "--tsne-samples", 30, "--workers", 0, "--out", out)])
    return SimpleNamespace(out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
                           titles=titles, results=json.loads((out / "results.json").read_text()),
                           report=(out / "report.md").read_text())


def test_train_copies_the_caption_source_into_final_pt(tiny):
    """train.py copies `vlm` and `tiny_random` of the text sidecar (encode.py's copy of
    captions.meta.json) into final.pt's text head, so eval.py can say where a run's captions came
    from."""
    head = torch.load(tiny.shuffled, weights_only=True)["text_head"]
    assert head["vlm"] == "tiny" and head["tiny_random"] is True
    head = torch.load(tiny.aligned, weights_only=True)["text_head"]
    assert head["vlm"] == "test-vlm" and head["tiny_random"] is False


def test_a_tiny_random_caption_source_is_marked_everywhere(spied):
    """Issue 21: the tiny-VLM warning was appended to report.md by the Makefile alone; results.json
    and the plots did not carry it. Now results.json (a field, and each run's source), the report's
    top, every plot title and the last lines printed say so, and name the dataset and the split."""
    results = spied.results
    assert results["tiny_random"] is True and results["dataset"] == "fashion-mnist-lt"
    sources = {r["name"]: r["caption_source"] for r in results["runs"]}
    assert sources["shuffled"]["vlm"] == "tiny" and sources["shuffled"]["tiny_random"] is True
    assert sources["aligned"] == {"vlm": "test-vlm", "tiny_random": False,
                                  "encoder": "test-encoder", "prompts": ["general", "t1"]}
    assert results["caption_source"] == "aligned: test-vlm; shuffled: tiny: a TINY RANDOM stand-in"
    top = spied.report.splitlines()[:5]
    assert top[0].startswith("# Evaluation on fashion-mnist-lt: ") \
        and top[0].endswith("/ test (300 images)")
    assert top[2].startswith("> **WARNING: captions from a TINY RANDOM stand-in VLM")
    assert top[4] == "Caption source: aligned: test-vlm; shuffled: tiny: a TINY RANDOM stand-in."
    assert set(spied.titles) == {"per_class_vs_frequency.png", "tsne.png", "curves.png"}
    for name, titles in spied.titles.items():
        text = " ".join(titles).replace("\n", " ")
        split = "val.txt of training" if name == "curves.png" else "/ test;"
        assert "fashion-mnist-lt" in text and split in text and "TINY RANDOM" in text, (name, text)
        assert "test-vlm" in text, (name, text)
    assert "!!! captions from a TINY RANDOM stand-in VLM" in spied.stdout.strip().splitlines()[-2]


def test_a_run_without_captions_says_so_and_is_not_marked(tiny):
    out = tiny.root / "no-captions"
    ckpt = torch.load(tiny.aligned, weights_only=True)
    ckpt.pop("text_head")
    ckpt["config"]["text"] = ""  # as a run trained without --text
    path = tiny.root / "no_text" / "final.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(ckpt, path)
    result = run(REPO / "eval.py", path, "--data", tiny.data, "--tsne-samples", 0, "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert results["tiny_random"] is False and results["runs"][0]["caption_source"] is None
    report = (out / "report.md").read_text()
    assert "Caption source: no_text: no captions." in report and "WARNING" not in report
    assert "TINY" not in result.stdout


def test_progress_and_results_reach_a_job_log(spied, report):
    """Issue 21: eval.py printed nothing for minutes where its output is not a terminal. Each long
    step (each checkpoint's pass, the t-SNE) shows a progress line with its rate; what was given is
    printed first and the table and the paths reach stdout."""
    for out in (spied, report):
        assert "aligned test: 100%" in out.stderr and "img/s]" in out.stderr
        assert "t-SNE: 100%" in out.stderr and ("run/s]" in out.stderr or "s/run]" in out.stderr)
    assert "eval.py: 2 checkpoint(s) on 300 images of fashion-mnist-lt / test, device cpu" \
        in spied.stdout
    assert "| aligned |" in spied.stdout \
        and f"results: {spied.out / 'results.json'}" in spied.stdout


def test_report_explains_only_the_columns_it_shows(tiny, spied, report):
    """Issue 21: the report explained ID/OOD, zero-shot and k-shot columns not in its table."""
    out = tiny.root / "plain-report"
    # no ID / OOD halves: without id_classes.txt the classifier is scored over all classes only
    run(REPO / "eval.py", tiny.aligned, "--data", tiny.data, "--id-classes", "none.txt",
        "--tsne-samples", 0, "--out", out)
    text = (out / "report.md").read_text()
    header = [line for line in text.splitlines() if line.startswith("| run |")][0]
    assert "zero-shot" not in header and "ID/class" not in header
    notes = text.split("| run |")[0]
    for absent in ("zero-shot", "zs ", "k-shot", "ID/class", "OOD/class", "deltas"):
        assert absent not in notes, absent
    for present in ("top-1:", "many / medium / few:", "ECE: expected calibration error over 15"):
        assert present in notes, present
    full = (report.out / "report.md").read_text().split("| run |")[0]
    for present in ("zero-shot:", "zs many / medium / few", "zs ID/class:", "zs OOD/class:",
                    "k-shot OOD/class:", "ID/class: the classifier", "OOD/class: the classifier",
                    "deltas in points against id_only"):
        assert present in full, present


def test_numbers_at_or_below_chance_are_marked_per_column():
    """Chance is 1 / the classes scored, per column: the classifier over its classes, zero-shot over
    every class text, an ID-only or OOD-only column within its own classes, top-5 5 / classes. ECE
    has none."""
    clf = {"top1": 0.1, "many": 0.11, "medium": None, "few": 0.05, "mean_class": 0.1, "top5": 0.5,
           "ece": 0.01}
    zs = {"top1": 0.09, "many": None, "medium": None, "few": None, "per_class": [0.0] * 10,
          "id": {"mean_class": 0.17, "classes": 6}, "ood": {"mean_class": 0.26, "classes": 4}}
    runs = [{"name": "a", "num_classes": 10, "classifier": clf, "zero_shot": zs,
             "few_shot": {"mean_class": 0.5, "classes": 2}},
            {"name": "b", "num_classes": 6,
             "classifier": clf | {"top1": 0.17, "top5": 0.84, "ece": 0.0}, "zero_shot": None,
             "few_shot": None}]
    rows = [[cell.strip() for cell in line.split("|")[2:-1]]
            for line in ev.comparison_table(runs).splitlines()]
    second = dict(zip(rows[0], rows[3]))
    assert rows[0] == ["top-1", "many", "few", "mean/class", "top-5", "ECE", "zero-shot",
                       "zs ID/class", "zs OOD/class", "k-shot OOD/class"]
    assert dict(zip(rows[0], rows[2])) == {"top-1": "10.0†", "many": "11.0", "few": "5.0†",
                                           "mean/class": "10.0†", "top-5": "50.0†", "ECE": "1.0",
                                           "zero-shot": "9.0†", "zs ID/class": "17.0",
                                           "zs OOD/class": "26.0", "k-shot OOD/class": "50.0†"}
    assert second["top-1"] == "17.0 (+7.0)" and second["top-5"] == "84.0 (+34.0)" \
        and second["ECE"] == "0.0 (-1.0)"
    assert second["many"] == "11.0† (+0.0)"  # at or below 1/6: b scores 6 classes
    assert ev.chance_of(runs[0], "zero_shot", "id") == pytest.approx(1 / 6)
    assert ev.chance_of(runs[1], "classifier", "top5") == 5 / 6 \
        and ev.chance_of(runs[0], "classifier", "ece") is None


def test_results_json_lists_the_chance_of_each_column(spied):
    runs = {r["name"]: r for r in spied.results["runs"]}
    assert runs["aligned"]["chance"]["top-1"] == pytest.approx(0.1) \
        and runs["aligned"]["chance"]["ECE"] is None
    assert runs["aligned"]["chance"]["top-5"] == pytest.approx(0.5)


# --------------------------------------------------------------------- issue 21: attacks

@pytest.mark.parametrize("split, message", [
    ("test,test", "names test.txt twice"),
    ("test,test.txt", "names test.txt twice"),
    ("test,li_ood_test", "test.txt and li_ood_test.txt share 120 images"),
])
def test_a_split_given_twice_is_refused(tiny, monkeypatch, split, message):
    """Issue 21: `--split test,test` counted every image twice and exited 0."""
    out = tiny.root / "twice"
    assert message in main_fails(monkeypatch, tiny.aligned, "--data", tiny.data, "--split", split,
                                 "--out", out)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", 0, "--batch-size 0: must be >= 1"),
    ("--workers", -2, "--workers -2: must be -1"),
    ("--workers", 100000, "--workers 100000: must be -1"),
    ("--few-shot", -1, "--few-shot -1: must be >= 0"),
    ("--ece-bins", 0, "--ece-bins 0: must be in 1..1000"),
    ("--ece-bins", 10 ** 9, "--ece-bins 1000000000: must be in 1..1000"),
    ("--few-shot-c", "nan", "--few-shot-c nan: must be a finite number > 0"),
    ("--few-shot-c", 0, "--few-shot-c 0.0: must be a finite number > 0"),
    ("--seed", -1, "--seed -1: must be in 0..2^32-1"),
    ("--tsne-samples", -5, "--tsne-samples -5: must be >= 0"),
    ("--last-epochs", 0, "--last-epochs 0: must be >= 1"),
])
def test_odd_numbers_are_one_line_before_any_work(tiny, monkeypatch, flag, value, message):
    """Issue 21: odd values of eval.py's numeric flags were a traceback (--seed -1), ran silently
    (--workers -2, --few-shot-c nan until the probe) or tried to allocate 8 GB (--ece-bins 10^9)."""
    out = tiny.root / "odd"
    assert message in main_fails(monkeypatch, tiny.aligned, "--data", tiny.data, flag, value,
                                 "--out", out)
    assert not out.exists()


def copy_run(tiny, source, folder):
    """A copy of a run folder (final.pt, metrics.jsonl) under another name."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("final.pt", "metrics.jsonl"):
        (folder / name).write_bytes((source.parent / name).read_bytes())
    return folder / "final.pt"


def test_a_checkpoint_path_with_a_comma_is_evaluated(tiny, monkeypatch):
    path = copy_run(tiny, tiny.aligned, tiny.root / "lr=0.1,wd=5e-4")
    out = tiny.root / "comma-report"
    monkeypatch.setattr(sys, "argv", ["eval.py"])
    ev.main([str(path), "--data", str(tiny.data), "--tsne-samples", "0", "--workers", "0", "--out",
             str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoints"] == [str(path)] and results["runs"][0]["name"] == "lr=0.1,wd=5e-4"


def test_garbage_in_metrics_jsonl_is_a_warning_naming_file_and_line(tiny, monkeypatch, capsys):
    """Issue 21: a garbage line in a run's metrics.jsonl ended eval in a traceback at plotting time,
    after every image was evaluated, with no results written. Each bad line is now a warning naming
    file:line, left out of the curves."""
    path = copy_run(tiny, tiny.aligned, tiny.root / "garbage")
    metrics = path.parent / "metrics.jsonl"
    good = metrics.read_bytes().splitlines()
    garbage = [b"[1, 2]", b'{"step": "ten", "epoch": 0, "loss_cls": 1.0}', b"\xff\xfe not text",
               b'{"epoch": 3, "step": 30, "val_top1": "high"}', b'{"step": 40, "loss_cls": true}',
               b'{"step": 5, "lo']
    metrics.write_bytes(b"\n".join(good[:3] + garbage[:-1] + good[3:] + garbage[-1:]) + b"\n")
    out = tiny.root / "garbage-report"
    monkeypatch.setattr(sys, "argv", ["eval.py"])
    ev.main([str(path), "--data", str(tiny.data), "--tsne-samples", "0", "--workers", "0", "--out",
             str(out)])
    err = capsys.readouterr().err
    for n, why in ((4, "not a JSON object"), (5, "step is \"ten\""), (6, "not JSON"),
                   (7, "val_top1 is \"high\""), (8, "loss_cls is true"),
                   (len(good) + 6, "not JSON")):
        assert f"eval.py: warning: {metrics}:{n}: {why}" in err, (n, why, err)
    # each once, though the curves and the training table both read the file
    assert err.count(f"{metrics}:") == 6
    assert (out / "curves.png").stat().st_size > 10_000 \
        and "| garbage |" in (out / "report.md").read_text()


def test_results_are_written_before_any_plot(tiny, monkeypatch):
    """A failing plot loses no numbers: results.json and report.md are written before any plot."""
    out = tiny.root / "plot-fails"

    def broken_plot(*args, **kwargs):
        raise RuntimeError("a plot failed")
    monkeypatch.setattr(sys, "argv", ["eval.py"])
    monkeypatch.setattr(ev, "plot_per_class", broken_plot)
    with pytest.raises(RuntimeError, match="a plot failed"):
        ev.main([str(tiny.aligned), "--data", str(tiny.data), "--tsne-samples", "0", "--workers",
                 "0", "--out", str(out)])
    assert json.loads((out / "results.json").read_text())["runs"][0]["classifier"]["samples"] == 300
    assert "| aligned |" in (out / "report.md").read_text()
