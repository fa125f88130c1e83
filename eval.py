"""Evaluate vlmkd students: long-tail accuracy (many / medium / few-shot), calibration, open-vocabulary
zero-shot and k-shot accuracy (ID / OOD classes), one comparison table and plots for several runs.

    python eval.py runs/fmnist/ce/final.pt runs/fmnist/vlmkd/final.pt --data data/fmnist-lt --split test --out runs/fmnist/report
    python eval.py runs/fmnist/vlmkd/final.pt --data data/fmnist-lt --class-text runs/fmnist/text/classes.npy --out runs/fmnist/zs
    python eval.py runs/food/li/final.pt --data data/food101-ood --split id_val,ood_val --class-text runs/food/clip/classes.npy \
        --few-shot 5 --few-shot-split ood_train.txt --out runs/food/report          # Li et al.: ID / OOD, zero- and 5-shot
    python eval.py runs/x/final.pt --data data/x --tta --tsne-samples 2000 --out runs/x/report   # flip TTA, bigger t-SNE

Writes into --out: results.json (every metric, per-class accuracies, per checkpoint), report.md (one row per
checkpoint, deltas against the first), per_class_vs_frequency.png, tsne.png and curves.png (from each run's
metrics.jsonl beside its final.pt). Features are extracted once per checkpoint and reused for every metric and plot.
Groups follow the OLTR convention over the checkpoint's training counts: many > 100, medium 20..100, few 1..19;
classes with no training image (or past the checkpoint's classes) are OOD. Nothing is selected on the evaluated
split: the k-shot probe has fixed settings and trains only on --few-shot-split.
"""
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm
from transformers import HfArgumentParser

GROUPS = ("many", "medium", "few")


@dataclass
class Config:
    checkpoints: list[str] = field(default_factory=list, metadata={"help": "final.pt files from train.py (also positional); the first is the baseline"})
    data: str = field(default="data/fmnist-lt", metadata={"help": "folder from prepare.py"})
    split: str = field(default="test", metadata={"help": "split(s) inside --data to evaluate, comma-separated (`test`, `id_val,ood_val`)"})
    classes: str = field(default="classes.txt", metadata={"help": "class names inside --data; a checkpoint's classes must be these or a prefix (ID first)"})
    out: str = field(default="runs/report", metadata={"help": "output folder"})
    batch_size: int = 256
    workers: int = field(default=-1, metadata={"help": "image decoding processes; -1: min(8, cores)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu) | cpu | cuda"})
    tta: bool = field(default=False, metadata={"help": "average over the image and its horizontal flip"})
    ece_bins: int = field(default=15, metadata={"help": "equal-width confidence bins of the expected calibration error"})
    class_text: str = field(default="", metadata={"help": "classes.npy from encode.py --classes: zero-shot through the text head or clip_proj"})
    zero_shot_head: str = field(default="auto", metadata={"help": "auto | text (VLM-KD proj/adaptor) | clip (Li et al. clip_proj); auto picks by width"})
    few_shot: int = field(default=0, metadata={"help": "k: fit a probe on the first k images per OOD class of --few-shot-split; 0 = off"})
    few_shot_split: str = field(default="ood_train.txt", metadata={"help": "training split for the k-shot probe (never the evaluated split)"})
    few_shot_c: float = field(default=1.0, metadata={"help": "inverse L2 strength of the k-shot logistic regression (fixed, never tuned here)"})
    tsne_samples: int = field(default=1000, metadata={"help": "eval images in the t-SNE plot; 0 = no t-SNE"})
    seed: int = 0


def die(msg):
    sys.exit(f"eval.py: error: {msg}")


def warn(msg):
    print(f"eval.py: warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- models
# eval.py keeps its own copy of this section: a checkpoint is rebuilt from (arch, num_classes, dims).

class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, 16/32/64 channels), the usual CIFAR-LT student."""

    def __init__(self, depth):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(n):
                layers.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


CIFAR_ARCHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


def build_backbone(arch, res):
    """(module mapping images to features, feature width). torchvision models lose their last Linear."""
    if arch in CIFAR_ARCHS:
        return CifarResNet(CIFAR_ARCHS[arch]), 64
    if arch not in torchvision.models.list_models(module=torchvision.models):
        known = sorted(CIFAR_ARCHS) + sorted(torchvision.models.list_models(module=torchvision.models))
        die(f"unknown --arch {arch!r}; known: {', '.join(known)}")
    kwargs = {"image_size": res} if arch.startswith("vit_") else {}
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    parent, name, last = None, None, None
    for module_name, module in net.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, name, last = module, child_name, child
    setattr(parent, name, nn.Identity())
    return net, last.in_features


class Student(nn.Module):
    """Backbone + classifier. head='linear': a Linear; head='cosine': cosine similarity of clip_proj(feature)
    to fixed class-text embeddings over tau (Li et al.). clip_proj also serves imitation and alignment."""

    def __init__(self, arch, num_classes, res, head="linear", clip_dim=0, class_text=None, tau=0.07):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, res)
        self.head = nn.Linear(self.feat_dim, num_classes) if head == "linear" else None
        self.clip_proj = nn.Linear(self.feat_dim, clip_dim) if clip_dim else None
        self.register_buffer("class_text", class_text, persistent=False)
        self.tau = tau

    def forward(self, images):
        feats = self.backbone(images)
        clip_emb = self.clip_proj(feats) if self.clip_proj is not None else None
        if self.head is not None:
            logits = self.head(feats)
        else:
            logits = F.normalize(clip_emb, dim=-1) @ self.class_text.to(clip_emb.dtype).T / self.tau
        return feats, logits, clip_emb


class TextHead(nn.Module):
    """VLM-KD's image projection and text adaptor into a shared space; thrown away for deployment."""

    def __init__(self, feat_dim, text_dim, embed_dim, hidden, temp, learn_temp):
        super().__init__()
        self.proj = nn.Linear(feat_dim, embed_dim)
        self.adaptor = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temp)), requires_grad=learn_temp)

# ----------------------------------------------------------------------------- end of models


# ----------------------------------------------------------------------------- metrics (pure functions)

def class_groups(class_counts):
    """'many' (> 100 training images), 'medium' (20..100), 'few' (1..19) or 'ood' (never trained on), per class."""
    counts = np.asarray(class_counts)
    return np.where(counts > 100, "many", np.where(counts >= 20, "medium", np.where(counts > 0, "few", "ood")))


def group_accuracy(preds, labels, class_counts):
    """Top-1 over all samples and over the samples of many / medium / few classes (None: no such sample)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    correct = preds == labels
    groups = class_groups(class_counts)[labels]
    result = {"top1": float(correct.mean()) if len(correct) else None}
    for name in GROUPS:
        mask = groups == name
        result[name] = float(correct[mask].mean()) if mask.any() else None
    return result


def per_class_accuracy(preds, labels, num_classes):
    """Accuracy of each class over its samples; None for a class with no sample."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    correct = np.bincount(labels, weights=preds == labels, minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    return [float(c / t) if t else None for c, t in zip(correct, total)]


def mean_of(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def topk_accuracy(scores, labels, k):
    k = min(k, scores.shape[1])
    top = torch.as_tensor(scores).topk(k, dim=1).indices.numpy()
    return float((top == np.asarray(labels)[:, None]).any(1).mean())


def expected_calibration_error(probs, labels, bins=15):
    """Sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share of samples."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, preds = probs.max(1), probs.argmax(1)
    correct = preds == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bin b holds (b/bins, (b+1)/bins]
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def classification_metrics(logits, labels, class_counts, bins):
    """Everything about the checkpoint's own classifier, on the samples of its classes."""
    logits = torch.as_tensor(logits).float()
    probs = logits.softmax(1).numpy()
    preds = probs.argmax(1)
    per_class = per_class_accuracy(preds, labels, len(class_counts))
    return group_accuracy(preds, labels, class_counts) | {
        "mean_class": mean_of(per_class), "top5": topk_accuracy(logits, labels, 5),
        "ece": expected_calibration_error(probs, labels, bins), "per_class": per_class, "samples": int(len(labels))}


def zero_shot_metrics(scores, labels, class_counts):
    """Zero-shot accuracy over all class texts (overall, many/medium/few, per class), and Li et al.'s protocol:
    ID samples among ID classes only and OOD samples among OOD classes only, mean per-class accuracy."""
    scores, labels = torch.as_tensor(scores).float(), np.asarray(labels)
    num_text = scores.shape[1]
    counts = np.zeros(num_text, dtype=np.int64)
    counts[:min(num_text, len(class_counts))] = np.asarray(class_counts)[:num_text]
    preds = scores.argmax(1).numpy()
    per_class = per_class_accuracy(preds, labels, num_text)
    result = group_accuracy(preds, labels, counts) | {"mean_class": mean_of(per_class), "per_class": per_class}
    is_id = counts > 0
    for name, classes in (("id", np.flatnonzero(is_id)), ("ood", np.flatnonzero(~is_id))):
        mask = np.isin(labels, classes)
        if not mask.any():
            result[name] = None
            continue
        local = classes[scores[torch.from_numpy(mask)][:, torch.from_numpy(classes)].argmax(1).numpy()]
        sub = per_class_accuracy(local, labels[mask], num_text)
        result[name] = {"top1": float((local == labels[mask]).mean()), "mean_class": mean_of([sub[c] for c in classes]),
                        "classes": int(len(classes)), "samples": int(mask.sum())}
    return result


# ----------------------------------------------------------------------------- data

def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_path(data, name):
    """DATA/name, with `.txt` added when name has no suffix; a missing split names itself and what exists."""
    path = Path(data) / (name if name.endswith(".txt") else f"{name}.txt")
    if not path.exists():
        have = sorted(p.name for p in Path(data).glob("*.txt")) if Path(data).is_dir() else []
        die(f"split {name!r} not found: {path} does not exist (splits in {data}: {', '.join(have) or 'none'}; make them with prepare.py)")
    return path


def read_split(path, num_classes):
    """[(relative path, label)] from `relative/path label` lines; a bad line names file and line."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            die(f"{path}:{n}: expected `relative/path label`, got {line[:80]!r}")
        if int(parts[1]) >= num_classes:
            die(f"{path}:{n}: label {parts[1]} but the class list names {num_classes} classes")
        items.append((parts[0], int(parts[1])))
    return items


class SplitImages(torch.utils.data.Dataset):
    """(normalised image, label, row, error) per split line; an unreadable image is a zero image with its error."""

    def __init__(self, root, items, preprocess):
        from torchvision import transforms
        self.root, self.items, self.res = Path(root), items, preprocess["res"]
        self.transform = transforms.Compose([  # what ffcv's centre-crop decoder does in train.py's val loader
            transforms.Resize(int(round(self.res / preprocess["crop_ratio"]))), transforms.CenterCrop(self.res),
            transforms.ToTensor(), transforms.Normalize(preprocess["mean"], preprocess["std"])])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        try:
            with Image.open(self.root / path) as image:
                return self.transform(image.convert("RGB")), label, i, ""
        except Exception as e:
            return torch.zeros(3, self.res, self.res), label, i, f"{type(e).__name__}: {e}"[:200]


@torch.no_grad()
def extract(student, root, items, preprocess, cfg, device, desc):
    """Penultimate features and classifier logits of every image (flip-averaged with --tta), and the bad images."""
    workers = cfg.workers if cfg.workers >= 0 else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(SplitImages(root, items, preprocess), batch_size=cfg.batch_size,
                                         num_workers=workers if len(items) > cfg.batch_size else 0, pin_memory=device.type == "cuda")
    feats, logits, errors = [], [], []
    with tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True, disable=None) as bar:
        for images, _, rows, errs in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            f, z, _ = student(images)
            if cfg.tta:
                f_flip, z_flip, _ = student(images.flip(3))
                f, z = (f + f_flip) / 2, (z + z_flip) / 2
            feats.append(f.float().cpu())
            logits.append(z.float().cpu())
            errors += [{"index": int(r), "path": items[int(r)][0], "error": e} for r, e in zip(rows, errs) if e]
            bar.update(len(images))
    return torch.cat(feats), torch.cat(logits), errors


# ----------------------------------------------------------------------------- checkpoints

def load_checkpoint(path, data_classes, classes_path, device):
    """(checkpoint dict, student in eval mode); refused unless its classes are the data's (or their ID prefix)."""
    if not Path(path).exists():
        die(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path}: cannot load ({type(e).__name__}: {str(e)[:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "vlmkd-final-1":
        die(f"{path}: format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, expected 'vlmkd-final-1' (train.py's final.pt; ckpt.pt only resumes)")
    names = list(ckpt["classes"])
    if names != data_classes[:len(names)]:
        first = next((i for i, (a, b) in enumerate(zip(names, data_classes)) if a != b), min(len(names), len(data_classes)))
        got = names[first] if first < len(names) else "<end>"
        want = data_classes[first] if first < len(data_classes) else "<end>"
        die(f"{path} was trained on other classes than {classes_path}: class {first} is {got!r} there, {want!r} here "
            f"({len(names)} vs {len(data_classes)} classes)")
    if len(ckpt["class_counts"]) != ckpt["num_classes"]:
        die(f"{path}: class_counts has {len(ckpt['class_counts'])} entries for {ckpt['num_classes']} classes")
    clip_dim = ckpt["model"]["clip_proj.weight"].shape[0] if "clip_proj.weight" in ckpt["model"] else 0
    student = Student(ckpt["arch"], ckpt["num_classes"], ckpt["preprocess"]["res"], ckpt["head"], clip_dim, ckpt.get("class_text"), ckpt["tau"])
    student.load_state_dict(ckpt["model"])
    return ckpt, student.to(device, memory_format=torch.channels_last).eval()  # 1.4x on this CPU too


def load_class_text(path, num_classes, classes_path):
    """classes.npy [C, D] and its sidecar from encode.py --classes, refused unless it has a row per data class."""
    sidecar_path = Path(path).with_suffix(".json")
    if not Path(path).exists() or not sidecar_path.exists():
        die(f"{path} or its sidecar {sidecar_path.name} not found (make them with encode.py --classes)")
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar.get("kind") != "classes":
        die(f"{sidecar_path}: kind is {sidecar.get('kind')!r}, expected 'classes'")
    array = np.load(path)
    if array.ndim != 2 or array.shape[0] != num_classes:
        die(f"{path} has shape {list(array.shape)}, expected [{num_classes}, D]: one row per line of {classes_path}")
    names = sidecar.get("names")
    if names is not None and [n for n in names if n.strip()] != [n for n in Path(classes_path).read_text().splitlines() if n.strip()]:
        die(f"{sidecar_path}: its class names are not those of {classes_path} (re-run encode.py --classes {classes_path})")
    if names is None and sidecar.get("classes_sha256") not in (None, sha256_file(classes_path)):
        warn(f"{sidecar_path}: classes_sha256 differs from sha256({classes_path}); rows are taken to follow its order")
    # As train.py's cosine head uses them: rows are unit vectors by contract, not renormalised here.
    return torch.from_numpy(array.astype(np.float32)), sidecar


def zero_shot_scores(feats, class_text, ckpt, student, choice, encoder, what):
    """(scores [N, C] or None, route or why not): normalize(proj(f)) . normalize(adaptor(t)) through the VLM-KD
    text head, or normalize(clip_proj(f)) . t for Li et al.'s students; `auto` picks the one of the class-text width."""
    width, head = class_text.shape[1], ckpt.get("text_head")
    text_ok = head is not None and head["text_dim"] == width
    clip_ok = student.clip_proj is not None and student.clip_proj.out_features == width
    other_encoder = bool(encoder and head and head.get("encoder") and str(encoder) != head["encoder"])
    route = {"text": "text_head" if text_ok else None, "clip": "clip_proj" if clip_ok else None,
             "auto": "clip_proj" if clip_ok and (other_encoder or not text_ok) else "text_head" if text_ok else None}[choice]
    if route is None:
        have = [f"a {head['text_dim']}-d text head" if head else "no text head (trained without --text, or with --drop-text-head)",
                f"a {student.clip_proj.out_features}-d clip_proj" if student.clip_proj is not None else "no clip_proj"]
        return None, f"class text is {width}-d, {what} has {' and '.join(have)}"
    if route == "text_head":
        if other_encoder:  # two text encoders' spaces: the numbers would mean nothing
            die(f"--class-text was encoded with {encoder}, the text head of {what} was trained on {head['encoder']} features")
        text_head = TextHead(head["feat_dim"], head["text_dim"], head["embed_dim"], head["hidden"], 1 / head["logit_scale"], False)
        text_head.proj.load_state_dict(head["proj"])
        text_head.adaptor.load_state_dict(head["adaptor"])
        with torch.no_grad():
            image_emb = F.normalize(text_head.proj(feats), dim=-1)
            return image_emb @ F.normalize(text_head.adaptor(class_text), dim=-1).T, route
    trained_text = ckpt.get("class_text")
    if trained_text is not None and not torch.allclose(trained_text.float(), class_text[:len(trained_text)], atol=1e-2):
        warn(f"{what}: --class-text rows of its own classes differ from the class text it was trained with (other prompts or descriptions?)")
    device = student.clip_proj.weight.device
    with torch.no_grad():
        return F.normalize(student.clip_proj(feats.to(device)).float().cpu(), dim=-1) @ class_text.T, route


def few_shot_probe(train_feats, train_labels, eval_feats, eval_labels, classes, c_reg, seed):
    """A fresh logistic-regression classifier over `classes` on frozen, L2-normalised features (fixed C)."""
    from sklearn.linear_model import LogisticRegression
    probe = LogisticRegression(C=c_reg, max_iter=2000, random_state=seed)
    probe.fit(F.normalize(train_feats, dim=-1).numpy(), train_labels)
    preds = probe.predict(F.normalize(eval_feats, dim=-1).numpy())
    per_class = per_class_accuracy(preds, eval_labels, int(max(classes)) + 1)
    return {"top1": float((preds == eval_labels).mean()), "mean_class": mean_of([per_class[c] for c in classes]),
            "classes": len(classes), "samples": int(len(eval_labels)), "train_images": int(len(train_labels))}


# ----------------------------------------------------------------------------- plots and report

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_per_class(runs, path):
    """Per-class accuracy against training images of the class (log x), a line per run, group bands shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = []
    for run in runs:
        counts, acc = np.asarray(run["class_counts"]), run["classifier"]["per_class"] if run["classifier"] else []
        order = sorted((c for c in range(len(acc)) if counts[c] > 0 and acc[c] is not None), key=lambda c: counts[c])
        ax.plot(counts[order], [100 * acc[c] for c in order], marker="o", ms=3, lw=1.2, label=run["name"])
        seen += counts[order].tolist()
    lo, hi = (min(seen) / 1.3, max(seen) * 1.3) if seen else (1, 1000)
    for name, start, stop, colour in (("few", lo, 19.5, "#f4cccc"), ("medium", 19.5, 100.5, "#fff2cc"), ("many", 100.5, hi, "#d9ead3")):
        if max(start, lo) < min(stop, hi):
            ax.axvspan(max(start, lo), min(stop, hi), color=colour, alpha=0.6, zorder=0)
            ax.text(math.sqrt(max(start, lo) * min(stop, hi)), 102, name, ha="center", va="bottom", fontsize=9)
    ax.set(xscale="log", xlim=(lo, hi), ylim=(-2, 110), xlabel="training images of the class (log)",
           ylabel="per-class top-1 (%)", title="Per-class accuracy vs training frequency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_tsne(runs, labels, num_classes, path, seed):
    """t-SNE of penultimate features on the same sample for every run: colour = class, marker = group."""
    from sklearn.manifold import TSNE
    plt = pyplot()
    from matplotlib.lines import Line2D
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 5), squeeze=False)
    colours = plt.get_cmap("tab20" if num_classes > 10 else "tab10")(labels % (20 if num_classes > 10 else 10))
    markers = {"many": "o", "medium": "s", "few": "^", "ood": "x"}
    for ax, run in zip(axes[0], runs):
        feats = run["tsne_feats"].numpy()
        method = "exact" if len(feats) <= 500 else "barnes_hut"  # exact is faster below a few hundred points
        points = TSNE(2, perplexity=max(2.0, min(30.0, (len(feats) - 1) / 3)), init="pca", method=method,
                      random_state=seed).fit_transform(feats)
        counts = np.zeros(num_classes, dtype=np.int64)
        counts[:len(run["class_counts"])] = run["class_counts"]
        groups = class_groups(counts)[labels]
        for name, marker in markers.items():
            mask = groups == name
            ax.scatter(points[mask, 0], points[mask, 1], color=colours[mask], marker=marker, s=14, linewidths=0.8)
        ax.set(title=run["name"], xticks=[], yticks=[])
    handles = [Line2D([], [], ls="", marker=m, color="grey", label=g) for g, m in markers.items()]
    if num_classes <= 20:
        cmap = plt.get_cmap("tab20" if num_classes > 10 else "tab10")
        handles += [Line2D([], [], ls="", marker="o", color=cmap(c), label=n) for c, n in enumerate(runs[0]["data_classes"])]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"t-SNE of penultimate features ({len(labels)} images): colour = class, marker = group")
    fig.tight_layout(rect=(0, 0, 0.85 if num_classes <= 20 else 0.93, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(path):
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            warn(f"{path}:{n}: not JSON, skipped")
    return rows


def plot_curves(runs, path):
    """Training loss per logged step and val top-1 / few per epoch, from each run's metrics.jsonl. False: no data."""
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for run in runs:
        metrics_path = Path(run["checkpoint"]).parent / "metrics.jsonl"
        if not metrics_path.exists():
            warn(f"{metrics_path} not found: no curves for {run['name']}")
            continue
        rows = read_metrics(metrics_path)
        train = [r for r in rows if "loss" in r and "step" in r]
        val = [r for r in rows if r.get("val_top1") is not None]
        line = ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label=run["name"])[0]
        ax_val.plot([r["epoch"] + 1 for r in val], [100 * r["val_top1"] for r in val], marker="o", ms=3, color=line.get_color(), label=f"{run['name']} top-1")
        few = [r for r in val if r.get("val_few") is not None]
        ax_val.plot([r["epoch"] + 1 for r in few], [100 * r["val_few"] for r in few], ls=":", color=line.get_color(), label=f"{run['name']} few")
        drawn |= bool(train or val)
    ax_loss.set(xlabel="step", ylabel="training loss (all parts, weighted)", title="Training loss")
    ax_val.set(xlabel="epoch", ylabel="val accuracy (%)", title="Validation top-1 (solid) and few-shot (dotted)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


COLUMNS = [("classifier", "top1", "top-1"), ("classifier", "many", "many"), ("classifier", "medium", "medium"),
           ("classifier", "few", "few"), ("classifier", "mean_class", "mean/class"), ("classifier", "top5", "top-5"),
           ("classifier", "ece", "ECE"), ("zero_shot", "top1", "zero-shot"), ("zero_shot", "many", "zs many"),
           ("zero_shot", "medium", "zs medium"), ("zero_shot", "few", "zs few"), ("zero_shot", "id", "zs ID/class"),
           ("zero_shot", "ood", "zs OOD/class"), ("few_shot", "mean_class", "k-shot OOD/class")]


def column_value(run, section, key):
    part = run.get(section) or {}
    value = part.get(key)
    return value.get("mean_class") if isinstance(value, dict) else value


def comparison_table(runs):
    """Markdown: a row per run, a column per metric (in %), deltas in points against the first run."""
    columns = [c for c in COLUMNS if any(column_value(r, c[0], c[1]) is not None for r in runs)]
    lines = ["| run | " + " | ".join(c[2] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for i, run in enumerate(runs):
        cells = []
        for section, key, _ in columns:
            value, base = column_value(run, section, key), column_value(runs[0], section, key)
            cell = "—" if value is None else f"{100 * value:.1f}"
            if i and value is not None and base is not None:
                cell += f" ({100 * (value - base):+.1f})"
            cells.append(cell)
        lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_names(paths):
    """Each checkpoint's run folder name, with more of its path where two would read the same."""
    for depth in range(1, 64):
        names = ["/".join(Path(p).resolve().parent.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{Path(p).resolve().parent.name}#{i + 1}" for i, p in enumerate(paths)]  # one file given twice


# ----------------------------------------------------------------------------- main

def first_k_per_class(items, classes, k):
    """Rows of the first k images of each class in `classes`, in split order (Li et al.'s k-shot protocol)."""
    taken, rows = {c: 0 for c in classes}, []
    for row, (_, label) in enumerate(items):
        if label in taken and taken[label] < k:
            taken[label] += 1
            rows.append(row)
    return rows, taken


def evaluate_checkpoint(path, name, cfg, ctx, device):
    ckpt, student = load_checkpoint(path, ctx["classes"], ctx["classes_path"], device)
    train_split = Path(cfg.data) / ckpt.get("config", {}).get("train_split", "train.txt")
    if train_split.exists() and ckpt.get("train_split_sha256") not in (None, sha256_file(train_split)):
        warn(f"{path} was trained on another {train_split.name} than {train_split}: its test images may overlap its training images")
    items, labels, num_classes, counts = ctx["items"], ctx["labels"], ckpt["num_classes"], np.asarray(ckpt["class_counts"])
    feats, logits, errors = extract(student, cfg.data, items, ckpt["preprocess"], cfg, device, f"{name} {cfg.split}")
    good = np.ones(len(items), dtype=bool)
    good[[e["index"] for e in errors]] = False
    if errors:
        warn(f"{len(errors)} unreadable images in {cfg.split} skipped, listed in results.json (first: {errors[0]['path']}: {errors[0]['error']})")
    own = good & (labels < num_classes)  # the classifier can only name the checkpoint's classes
    run = {"checkpoint": str(path), "name": name, "arch": ckpt["arch"], "head": ckpt["head"], "num_classes": num_classes,
           "class_counts": counts.tolist(), "groups": {g: int((class_groups(counts) == g).sum()) for g in GROUPS},
           "has_text_head": "text_head" in ckpt, "has_clip_proj": student.clip_proj is not None, "data_classes": ctx["classes"],
           "classifier": classification_metrics(logits[own], labels[own], counts, cfg.ece_bins) if own.any() else None,
           "zero_shot": None, "few_shot": None, "skipped_images": errors, "tsne_feats": feats[ctx["tsne_rows"]]}
    if ctx["class_text"] is not None:
        scores, route = zero_shot_scores(feats[good], ctx["class_text"], ckpt, student, cfg.zero_shot_head, ctx["encoder"], path)
        if scores is None:
            warn(f"no zero-shot for {name}: {route}")
            run["zero_shot"] = {"skipped": route}
        else:
            run["zero_shot"] = zero_shot_metrics(scores, labels[good], counts) | {"via": route}
    if cfg.few_shot > 0:
        run["few_shot"] = few_shot(student, ckpt, feats, labels, good, cfg, ctx, device, name)
    return run


def few_shot(student, ckpt, feats, labels, good, cfg, ctx, device, name):
    """k-shot accuracy over the OOD classes (those the checkpoint never trained on) with a probe on frozen features."""
    counts = np.zeros(len(ctx["classes"]), dtype=np.int64)
    counts[:ckpt["num_classes"]] = ckpt["class_counts"]
    ood = np.flatnonzero(counts == 0)
    if not len(ood):
        return {"skipped": f"{name} trained on every class of {cfg.classes}: no OOD class"}
    rows, taken = first_k_per_class(ctx["few_items"], set(ood.tolist()), cfg.few_shot)
    short = [ctx["classes"][c] for c, n in taken.items() if n < cfg.few_shot]
    if short:
        warn(f"{cfg.few_shot_split} has fewer than {cfg.few_shot} images of {len(short)} OOD classes (e.g. {short[0]!r})")
    items = [ctx["few_items"][r] for r in rows]
    train_feats, _, errors = extract(student, cfg.data, items, ckpt["preprocess"], cfg, device, f"{name} {cfg.few_shot}-shot")
    bad = {e["index"] for e in errors}
    keep = [i for i in range(len(items)) if i not in bad]
    train_labels = np.array([items[i][1] for i in keep])
    classes = sorted(set(train_labels.tolist()))
    target = good & np.isin(labels, classes)
    if len(classes) < 2 or not target.any():
        return {"skipped": f"{len(classes)} OOD classes with images in {cfg.few_shot_split}, {int(target.sum())} of their images in {cfg.split}"}
    return few_shot_probe(train_feats[keep], train_labels, feats[target], labels[target], classes, cfg.few_shot_c, cfg.seed) | {
        "k": cfg.few_shot, "split": cfg.few_shot_split, "probe": f"logistic regression, C={cfg.few_shot_c}, L2-normalised features"}


def main():
    cfg, rest = HfArgumentParser(Config).parse_args_into_dataclasses(return_remaining_strings=True)
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        die(f"unknown argument {flags[0]} (see python eval.py --help)")
    cfg.checkpoints = list(cfg.checkpoints) + rest
    if not cfg.checkpoints:
        die("no checkpoint given: python eval.py RUN/final.pt [RUN2/final.pt ...] --data DATA --out REPORT")
    if cfg.zero_shot_head not in ("auto", "text", "clip") or cfg.device not in ("auto", "cpu", "cuda"):
        die(f"--zero-shot-head must be auto|text|clip and --device auto|cpu|cuda (got {cfg.zero_shot_head}, {cfg.device})")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but torch sees no CUDA device (use --device cpu)")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    classes_path = Path(cfg.data) / cfg.classes
    if not classes_path.exists():
        die(f"{classes_path} not found (make it with prepare.py)")
    classes = [n for n in classes_path.read_text().splitlines() if n.strip()]
    split_paths = [split_path(cfg.data, s.strip()) for s in cfg.split.split(",") if s.strip()]
    items = [item for p in split_paths for item in read_split(p, len(classes))]
    if not items:
        die(f"{cfg.split}: no images in {', '.join(map(str, split_paths))}")
    few_items = []
    if cfg.few_shot > 0:
        few_path = split_path(cfg.data, cfg.few_shot_split)
        if few_path.resolve() in [p.resolve() for p in split_paths]:
            die(f"--few-shot-split {few_path} is the evaluated split: k-shot images must come from a training split")
        few_items = read_split(few_path, len(classes))
        shared = {p for p, _ in few_items} & {p for p, _ in items}
        if shared:
            die(f"{few_path} and {cfg.split} share {len(shared)} images (e.g. {sorted(shared)[0]}): k-shot images must not be evaluated")
    class_text, encoder = None, None
    if cfg.class_text:
        class_text, sidecar = load_class_text(cfg.class_text, len(classes), classes_path)
        encoder = sidecar.get("encoder")
    labels = np.array([y for _, y in items])
    rng = np.random.default_rng(cfg.seed)
    tsne_rows = np.sort(rng.choice(len(items), min(cfg.tsne_samples, len(items)), replace=False)) if cfg.tsne_samples > 0 else np.array([], dtype=np.int64)
    ctx = {"classes": classes, "classes_path": classes_path, "items": items, "labels": labels, "few_items": few_items,
           "class_text": class_text, "encoder": encoder, "tsne_rows": torch.from_numpy(tsne_rows)}
    runs = [evaluate_checkpoint(p, n, cfg, ctx, device) for p, n in zip(cfg.checkpoints, run_names(cfg.checkpoints))]

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    if any(r["classifier"] for r in runs):
        plots["per_class_vs_frequency"] = out / "per_class_vs_frequency.png"
        plot_per_class(runs, plots["per_class_vs_frequency"])
    if len(tsne_rows) >= 5:
        plots["tsne"] = out / "tsne.png"
        plot_tsne(runs, labels[tsne_rows], len(classes), plots["tsne"], cfg.seed)
    if plot_curves(runs, out / "curves.png"):
        plots["curves"] = out / "curves.png"
    table = comparison_table(runs)
    header = (f"# Evaluation on {cfg.data} / {cfg.split} ({len(items)} images{', flip TTA' if cfg.tta else ''})\n\n"
              f"Accuracies and ECE in %; many > 100, medium 20-100, few < 20 training images; zs: zero-shot through class texts; "
              f"ID/OOD and k-shot: mean per-class within those classes; deltas in points against {runs[0]['name']}.\n\n")
    (out / "report.md").write_text(header + table + "\n\n" + "".join(f"![{k}]({v.name})\n" for k, v in plots.items()))
    results = {"made_by": "eval.py", "config": asdict(cfg), "classes": classes, "num_images": len(items),
               "splits": {p.name: sha256_file(p) for p in split_paths}, "plots": {k: str(v) for k, v in plots.items()},
               "runs": [{k: v for k, v in r.items() if k not in ("tsne_feats", "data_classes")} for r in runs]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    for name, path in plots.items():
        print(f"{name}: {path}")
    print(f"results: {out / 'results.json'}, table: {out / 'report.md'}")


if __name__ == "__main__":
    main()
