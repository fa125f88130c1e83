"""Evaluate vlmkd students: long-tail accuracy (many / medium / few), calibration, zero-shot and
k-shot accuracy of open-vocabulary students (ID / OOD classes), a table and plots for several runs.

    python eval.py runs/ce/final.pt runs/vlmkd/final.pt --data data/fmnist-lt --out runs/report
    python eval.py runs/vlmkd/final.pt --data data/fmnist-lt --class-text runs/text/classes.npy \\
        --out runs/zs                                      # zero-shot through the text head
    python eval.py runs/food/li/final.pt --data data/food-ood --split id_val,ood_val --few-shot 5 \\
        --class-text runs/food/clip/classes.npy --out runs/food/report   # ID / OOD, 5-shot probe
    python eval.py runs/food/li5/final.pt --data data/food-ood --split li_ood_test --out runs/li5
        # Li et al.'s 5-shot: a student finetuned on li_train.txt, scored within the OOD classes

Writes results.json (every metric, per checkpoint) and report.md (a row per checkpoint, deltas
against the first, † at or below chance) into --out, then per_class_vs_frequency.png, tsne.png and
curves.png (from each run's metrics.jsonl). Each names the dataset, the split and the source of
each run's captions. One streaming pass over the images per checkpoint counts every metric.
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import textwrap
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# The one shared helper the Config needs above it; the others are at the back of the file.
def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


# --- config

@dataclass
class Config:
    checkpoints: list[str] = opt(None, "train.py's final.pt files, each a whole path (commas "
                                 "kept); the first is the baseline of the deltas",
                                 heading="what to evaluate")
    data: str = opt("data/fmnist-lt", "folder from prepare.py")
    split: str = opt("test", "split(s) in --data, comma-separated: test | id_val,ood_val | "
                     "li_ood_test")
    classes: str = opt("classes.txt", "class names in --data; a checkpoint's are these or the "
                       "first")
    id_classes: str = opt("id_classes.txt", "ID classes in --data (the first of --classes): where "
                          "it is, the classifier is also scored within the ID and the OOD classes")
    out: str = opt("runs/report", "folder for results.json, report.md and plots (checked first)")
    batch_size: int = opt(256, "images per forward pass", heading="feature extraction")
    workers: int = opt(-1, "image decoding processes; -1: min(8, cores)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: cuda when available, else cpu")
    tta: bool = opt(False, "average the logits and features of the image and its horizontal flip")
    ece_bins: int = opt(15, "equal-width confidence bins of the calibration error",
                        heading="metrics")
    group_average: Literal["images", "classes"] = opt(
        "images", "many / medium / few accuracy: over the images of the group's classes, or the "
                  "mean of its classes' accuracies (OLTR's shot_acc); equal on a balanced test")
    last_epochs: int = opt(5, "report each run's last evaluated epoch of metrics.jsonl and the "
                              "mean of its last N (Li et al. report the mean of the last 5)")
    class_text: str = opt("", "classes.npy of encode.py --classes (and its .json): zero-shot "
                          "through the text head (VLM-KD) or clip_proj (Li et al.)")
    zero_shot_head: Literal["auto", "text", "clip"] = opt(
        "auto", "text: VLM-KD's proj + adaptor; clip: Li et al.'s clip_proj; auto: the one of the "
                "class text's width")
    few_shot: int = opt(0, "k: a logistic-regression probe on the first k images of each unseen "
                        "class of --few-shot-split; 0: off")
    few_shot_split: str = opt("ood_train.txt", "the k-shot probe's training split (not evaluated)")
    few_shot_c: float = opt(1.0, "inverse L2 strength of the k-shot probe (fixed: none is tuned)")
    tsne_samples: int = opt(1000, "evaluated images drawn for tsne.png (only their features are "
                            "kept); 0: none", heading="plots")
    seed: int = opt(0, "seed of the t-SNE sample, the t-SNE and the probe")


def read_command_line(argv):
    """The typed Config: one checkpoint or more, every number in range, before any file is read."""
    cfg = parse_config(Config, argv, positional=("checkpoints",))
    if not cfg.checkpoints:
        die("no checkpoint given: python eval.py RUN/final.pt [RUN2/final.pt ...] --data DATA "
            "--out REPORT")
    if "" in cfg.checkpoints:  # `--checkpoints a.pt,,b.pt` or a trailing comma
        die("--checkpoints names an empty path (a path holding a comma is given as a positional)")
    cores = os.cpu_count() or 1
    rules = [("batch_size", cfg.batch_size >= 1, ">= 1"),
             ("ece_bins", 1 <= cfg.ece_bins <= 1000, "in 1..1000"),  # arrays: 10^9 bins is 8 GB
             ("last_epochs", cfg.last_epochs >= 1, ">= 1"),
             ("few_shot", cfg.few_shot >= 0, ">= 0 (0: off)"),
             ("tsne_samples", cfg.tsne_samples >= 0, ">= 0 (0: no t-SNE)"),
             ("few_shot_c", math.isfinite(cfg.few_shot_c) and cfg.few_shot_c > 0,
              "a finite number > 0"),
             ("workers", -1 <= cfg.workers <= 4 * cores,
              f"-1 (min(8, cores)), 0 (none) or up to 4 x the {cores} cores"),
             ("seed", 0 <= cfg.seed < 2 ** 32, "in 0..2^32-1")]  # numpy's seeds
    for name, ok, wanted in rules:
        if not ok:
            die(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {wanted}")
    return cfg


# --- inputs: the evaluated splits, the classes, the k-shot split and the class text

@dataclass
class Inputs:
    """Everything read from --data and --class-text, checked before any checkpoint or image."""
    classes: list[str]
    classes_path: Path
    id_count: int  # ID classes (the first lines of classes.txt); 0: no id_classes.txt
    split_paths: list[Path]
    items: list[tuple[str, int]]  # (relative path, label) of the evaluated images, split by split
    labels: np.ndarray
    few_items: list[tuple[str, int]]  # the k-shot probe's training split
    class_text: torch.Tensor | None
    text_encoder: str | None
    tsne_rows: np.ndarray  # the sample whose features the t-SNE draws, the same rows for every run
    dataset: str


def read_inputs(cfg):
    """Every input but the checkpoints: a bad line or file is one line here."""
    classes_path = Path(cfg.data) / cfg.classes
    classes = read_classes(classes_path)
    split_paths, items = read_evaluated_splits(cfg, len(classes))
    id_count = read_id_classes(cfg, classes)
    few_items = []
    if cfg.few_shot > 0:
        few_items = read_few_shot_items(cfg, split_paths, items, len(classes))
    class_text, encoder = None, None
    if cfg.class_text:
        class_text, encoder = load_class_text(cfg.class_text, classes_path, len(classes))
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(len(items), min(cfg.tsne_samples, len(items)), replace=False))
    labels = np.array([y for _, y in items])
    return Inputs(classes, classes_path, id_count, split_paths, items, labels, few_items,
                  class_text, encoder, sample, dataset_name(cfg.data))


def split_path(data, name):
    """DATA/name(.txt); a missing split is named with the splits that exist."""
    path = Path(data) / (name if name.endswith(".txt") else f"{name}.txt")
    if not path.is_file():
        have = sorted(p.name for p in Path(data).glob("*.txt")) if Path(data).is_dir() else []
        die(f"split {name!r} not found: {path} does not exist (splits in {data}: "
            f"{', '.join(have) or 'none'}; prepare.py writes them)")
    return path


def read_evaluated_splits(cfg, num_classes):
    """(paths, items) of --split; a split given twice, or two that share an image, is refused."""
    paths = [split_path(cfg.data, s.strip()) for s in cfg.split.split(",") if s.strip()]
    if not paths:
        die("--split names no split")
    resolved = [p.resolve() for p in paths]
    twice = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        die(f"--split {cfg.split} names {twice.name} twice: give each split once")
    per_split = [read_split(p, num_classes) for p in paths]
    for (a, items_a), (b, items_b) in itertools.combinations(zip(paths, per_split), 2):
        shared = {rel for rel, _ in items_a} & {rel for rel, _ in items_b}
        if shared:
            die(f"--split {cfg.split}: {a.name} and {b.name} share {len(shared)} images (e.g. "
                f"{sorted(shared)[0]}), which would be counted twice: give splits that do not "
                f"overlap")
    return paths, [item for split in per_split for item in split]


def read_id_classes(cfg, classes):
    """How many of the first classes are ID (prepare.py's OOD sets); 0 without the file."""
    path = Path(cfg.data) / cfg.id_classes
    if not path.is_file():
        return 0
    names = read_classes(path)
    if names != classes[:len(names)]:
        warn(f"{path} is not the first lines of {Path(cfg.data) / cfg.classes}: no ID / OOD "
             f"scores of the classifier")
        return 0
    return len(names)


def read_few_shot_items(cfg, split_paths, items, num_classes):
    """The k-shot probe's training split: never an evaluated split, and sharing no image with
    one, so the probe is never scored on an image it trained on."""
    path = split_path(cfg.data, cfg.few_shot_split)
    if path.resolve() in [p.resolve() for p in split_paths]:
        die(f"--few-shot-split {path} is an evaluated split: k-shot images must come from a "
            f"training split")
    few_items = read_split(path, num_classes)
    shared = {p for p, _ in few_items} & {p for p, _ in items}
    if shared:
        die(f"{path} and {cfg.split} share {len(shared)} images (e.g. {sorted(shared)[0]}): "
            f"k-shot images must not be evaluated")
    return few_items


def load_class_text(path, classes_path, num_classes):
    """classes.npy [C, D] float32 and its encoder; refused (load_artifact) without a matching
    sidecar, with a NaN row, or unless its rows are the classes of classes_path, in order."""
    array, sidecar = load_artifact(path, "classes")
    if array.ndim != 2 or array.shape[0] != num_classes:
        die(f"{path} has shape {list(array.shape)}, expected [{num_classes}, D]: one row per "
            f"line of {classes_path}")
    names, sidecar_path = sidecar.get("names"), Path(path).with_suffix(".json")
    if names is not None and list(names) != read_classes(classes_path):
        die(f"{sidecar_path}: its class names are not those of {classes_path} (re-run encode.py "
            f"--classes {classes_path})")
    if names is None and sidecar.get("classes_sha256") != sha256_file(classes_path):
        die(f"{sidecar_path}: classes_sha256 is not sha256({classes_path}): its rows follow "
            f"another class list (re-run encode.py --classes {classes_path})")
    # As train.py's cosine head uses them: rows are unit vectors by contract, not renormalised here.
    return torch.from_numpy(np.asarray(array, dtype=np.float32)), sidecar.get("encoder")


def dataset_name(data):
    """The dataset prepare.py made in --data (its prepare.json), else the folder's name."""
    try:
        prepared = json.loads((Path(data) / "prepare.json").read_text(encoding="utf-8"))
        name = prepared["config"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    return name if isinstance(name, str) and name else Path(data).resolve().name


# --- checkpoints: train.py's final.pt, each one checked before any image is read

FINAL_KEYS = ("arch", "num_classes", "classes", "class_counts", "model", "head", "tau",
              "preprocess")


def load_checkpoint(path, inputs):
    """(final.pt's dict, student in eval mode on the CPU). Its classes must be the data's or their
    first ones (an ID-only run), in order: a label means the same class in both."""
    ckpt = read_final(path)
    names, data_classes = list(ckpt["classes"]), inputs.classes
    if names != data_classes[:len(names)]:
        first = next((i for i, (a, b) in enumerate(zip(names, data_classes)) if a != b),
                     min(len(names), len(data_classes)))
        got = names[first] if first < len(names) else "<end>"
        want = data_classes[first] if first < len(data_classes) else "<end>"
        die(f"{path} was trained on other classes than {inputs.classes_path}: class {first} is "
            f"{got!r} there, {want!r} here ({len(names)} vs {len(data_classes)} classes)")
    if not len(ckpt["class_counts"]) == len(names) == ckpt["num_classes"]:
        die(f"{path}: {len(ckpt['class_counts'])} class counts, {len(names)} names, "
            f"{ckpt['num_classes']} classes")
    clip_weight = ckpt["model"].get("clip_proj.weight")
    clip_dim = clip_weight.shape[0] if clip_weight is not None else 0
    student = Student(ckpt["arch"], ckpt["num_classes"], ckpt["preprocess"]["res"], ckpt["head"],
                      clip_dim, ckpt.get("class_text"), ckpt["tau"])
    try:
        student.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        die(f"{path}: its weights do not fit a {ckpt['arch']} ({str(e).splitlines()[0][:160]})")
    return ckpt, student.to(memory_format=torch.channels_last).eval()  # 1.4x on a CPU too


def read_final(path):
    """final.pt's dict; refused: a file torch cannot read (torn by a kill), anything but
    train.py's final.pt, a missing key, a NaN / inf tensor (a diverged run)."""
    if not Path(path).is_file():
        die(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn zip, a pickle torch refuses: the file is at fault, say which
        die(f"{path}: cannot be read, torn or not a checkpoint ({type(e).__name__}: "
            f"{str(e)[:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "vlmkd-final-1":
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        die(f"{path}: format {found!r}, expected 'vlmkd-final-1' (train.py's final.pt; ckpt.pt "
            f"only resumes)")
    missing = [k for k in FINAL_KEYS if k not in ckpt]
    if missing:
        die(f"{path}: no {', '.join(missing)}: not a complete final.pt")
    tensors = list(ckpt["model"].items()) + [("class_text", ckpt.get("class_text"))]
    for part in ("proj", "adaptor"):
        weights = (ckpt.get("text_head") or {}).get(part, {})
        tensors += [(f"text_head.{part}.{k}", v) for k, v in weights.items()]
    bad = next((name for name, t in tensors if torch.is_tensor(t) and t.is_floating_point()
                and not torch.isfinite(t).all()), None)
    if bad:
        die(f"{path}: tensor {bad} holds NaN or inf (the run diverged): no numbers are reported "
            f"from it")
    return ckpt


def run_names(paths):
    """Each checkpoint's run folder name, with more of its path where two would read the same."""
    for depth in range(1, 64):
        names = ["/".join(Path(p).resolve().parent.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    # One file given twice:
    return [f"{Path(p).resolve().parent.name}#{i + 1}" for i, p in enumerate(paths)]


def caption_source(ckpt):
    """Where a run's caption features came from, as train.py copied it from the text sidecar into
    the text head: {vlm, tiny_random, encoder, prompts}; None for a run trained without captions."""
    head, text = ckpt.get("text_head"), (ckpt.get("config") or {}).get("text")
    if head is None and text:
        return {"vlm": None, "tiny_random": None, "encoder": None, "prompts": None,
                "note": "trained on captions, but final.pt has no text head (--drop-text-head)"}
    if head is None:
        return None
    return {"vlm": head.get("vlm"), "tiny_random": bool(head.get("tiny_random")),
            "encoder": head.get("encoder"), "prompts": head.get("prompts")}


# --- model code shared with train.py: byte-identical copies of tests/shared_models.py (--sync)

class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, 16/32/64 channels), the usual CIFAR-LT student."""

    def __init__(self, depth):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        layers, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(n):
                layers.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


CIFAR_ARCHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


def build_timm(name, res):
    """A timm model from scratch without its classifier: its output is the pooled pre-logits."""
    import timm
    if not timm.is_model(name):
        die(f"unknown --arch timm:{name}; "
            "`python -c 'import timm; print(timm.list_models())'` lists them")
    try:  # ViT-like models are built for the training resolution; others take no img_size
        net, kwargs = (timm.create_model(name, pretrained=False, num_classes=0, img_size=res),
                       {"img_size": res})
    except TypeError:
        net, kwargs = timm.create_model(name, pretrained=False, num_classes=0), {}
    net.classifier_name, net.constructor_kwargs = (net.pretrained_cfg.get("classifier", "head"),
                                                   kwargs)
    return net, getattr(net, "head_hidden_size", None) or net.num_features


def build_backbone(arch, res):
    """(module mapping images to features, feature width). torchvision models lose their last
    Linear; the export puts it back from `classifier_name` and `constructor_kwargs`."""
    if arch in CIFAR_ARCHS:
        return CifarResNet(CIFAR_ARCHS[arch]), 64
    if arch.startswith("timm:"):
        return build_timm(arch.removeprefix("timm:"), res)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        known = sorted(CIFAR_ARCHS) + \
            sorted(torchvision.models.list_models(module=torchvision.models))
        die(f"unknown --arch {arch!r}; known: {', '.join(known)}, or timm:<name>")
    kwargs = {"image_size": res} if arch.startswith("vit_") else {}
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    parent, name, last = None, None, None
    for module_name, module in net.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, name, last = module, f"{module_name}.{child_name}".lstrip("."), child
    setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    net.classifier_name, net.constructor_kwargs = name, kwargs
    return net, last.in_features


class Student(nn.Module):
    """Backbone + classifier. head='linear': a Linear; head='cosine': cosine similarity of
    clip_proj(feature) to fixed class-text embeddings over tau (Li et al.). clip_proj also serves
    imitation and alignment."""

    def __init__(self, arch, num_classes, res, head="linear", clip_dim=0, class_text=None,
                 tau=0.07):
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
    """VLM-KD's image projection and text adaptor into a shared space; dropped for deployment."""

    def __init__(self, feat_dim, text_dim, embed_dim, hidden, temp, learn_temp):
        super().__init__()
        self.proj = nn.Linear(feat_dim, embed_dim)
        self.adaptor = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, embed_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temp)), requires_grad=learn_temp)


# --- streaming metrics: counts per class, never per image

def ratio(num, den):
    return float(num / den) if den else None


def mean_of(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class Tally:
    """Per-class right / total of one scorer, counted batch by batch: a pass costs memory per
    class, never per image (ImageNet-LT's 50,000 test images x 1,000 logits kept as float64
    probabilities would be 400 MB a run). `allowed` (bool per class): only images of those
    classes count, and the prediction is the best of those classes (Li et al. score ID images
    among ID classes, OOD among OOD). `ece_bins` > 0 also counts top-5 and the calibration bins
    (bin b holds confidences in (b/bins, (b+1)/bins])."""

    def __init__(self, num_classes, allowed=None, ece_bins=0):
        self.allowed = None if allowed is None else torch.as_tensor(allowed, dtype=torch.bool)
        self.right, self.total = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
        self.bins, self.top5 = ece_bins, 0
        self.bin_conf, self.bin_right = np.zeros(ece_bins), np.zeros(ece_bins)

    def add(self, scores, labels):
        """scores [B, num_classes] and labels [B] on one device."""
        if self.allowed is not None:  # an image competes only with its own half's classes
            allowed = self.allowed.to(scores.device)
            keep = allowed[labels]
            scores, labels = scores[keep].masked_fill(~allowed, float("-inf")), labels[keep]
        right = scores.argmax(1) == labels
        label_np, right_np = labels.cpu().numpy(), right.cpu().numpy()
        self.total += np.bincount(label_np, minlength=len(self.total))
        self.right += np.bincount(label_np, weights=right_np,
                                  minlength=len(self.total)).astype(np.int64)
        if self.bins and len(labels):
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices
            self.top5 += int((top == labels[:, None]).any(1).sum())
            confidence = scores.float().softmax(1).amax(1)
            which = ((confidence * self.bins).ceil().long().clamp(1, self.bins) - 1).cpu().numpy()
            self.bin_conf += np.bincount(which, weights=confidence.cpu().numpy(),
                                         minlength=self.bins)
            self.bin_right += np.bincount(which, weights=right_np, minlength=self.bins)

    def groups(self, class_counts, average="images"):
        """Top-1 over all images and over many / medium / few classes (None: no such image): over
        their images, or (average="classes") the mean of those classes' accuracies."""
        group = np.array([class_group(int(c)) for c in class_counts])
        if average == "classes":
            per_class = self.per_class()
            by_group = {g: mean_of([per_class[c] for c in np.flatnonzero(group == g)])
                        for g in GROUPS}
        else:
            by_group = {g: ratio(self.right[group == g].sum(), self.total[group == g].sum())
                        for g in GROUPS}
        return {"top1": ratio(self.right.sum(), self.total.sum())} | by_group

    def per_class(self):
        return [ratio(r, t) for r, t in zip(self.right, self.total)]

    def calibration(self):
        """top-5 and the expected calibration error, sum over bins of |right - confidence| / n."""
        n = self.total.sum()
        return {"top5": ratio(self.top5, n),
                "ece": ratio(np.abs(self.bin_right - self.bin_conf).sum(), n)}

    def within(self):
        """Li et al.'s numbers: top-1 and mean per-class accuracy within the allowed classes."""
        per_class = self.per_class()
        classes = np.flatnonzero(self.allowed.numpy())
        return {"top1": ratio(self.right.sum(), self.total.sum()), "classes": int(len(classes)),
                "mean_class": mean_of([per_class[c] for c in classes]),
                "samples": int(self.total.sum())}


def report_of(tally, class_counts, average="images"):
    per_class = tally.per_class()
    return tally.groups(class_counts, average) | {"mean_class": mean_of(per_class),
                                                  "per_class": per_class,
                                                  "samples": int(tally.total.sum())}


# --- one streaming pass per checkpoint

class SplitImages(torch.utils.data.Dataset):
    """(normalised image, label, row, error) per split line. A plain DataLoader, not train.py's
    ffcv loader: eval reads each image once, and an .ffcv file would be written for that one read.
    An image that cannot be decoded (missing, not an image, truncated) is a zero image with its
    error: recorded and left out of every metric, never a traceback."""

    def __init__(self, root, items, preprocess):
        from torchvision import transforms
        self.root, self.items, self.res = Path(root), items, preprocess["res"]
        # What ffcv's centre-crop decoder does in train.py's val loader:
        self.transform = transforms.Compose([
            transforms.Resize(int(round(self.res / preprocess["crop_ratio"]))),
            transforms.CenterCrop(self.res), transforms.ToTensor(),
            transforms.Normalize(preprocess["mean"], preprocess["std"])])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        try:
            with Image.open(self.root / path) as image:
                return self.transform(rgb_image(image)), label, i, ""
        except Exception as e:  # decoding only: a model failure is never blamed on an image
            return torch.zeros(3, self.res, self.res), label, i, f"{type(e).__name__}: {e}"[:200]


@torch.no_grad()
def batches(student, root, items, preprocess, cfg, device, desc):
    """Yields (features, logits, labels, rows, decoded, errors) per batch on `device`, averaged
    with the flipped image's under --tta; errors: {index, path, error} of undecodable images."""
    workers = cfg.workers if cfg.workers >= 0 else min(8, os.cpu_count() or 1)
    # One batch (the k-shot images) is decoded sooner in this process than by starting workers.
    loader = torch.utils.data.DataLoader(SplitImages(root, items, preprocess),
                                         batch_size=cfg.batch_size,
                                         num_workers=workers if len(items) > cfg.batch_size else 0,
                                         pin_memory=device.type == "cuda")
    with progress_bar(len(items), "img", desc=desc) as bar:
        for images, labels, rows, errors in loader:
            images = images.to(device, non_blocking=True)
            images = images.contiguous(memory_format=torch.channels_last)
            feats, logits, _ = student(images)
            if cfg.tta:
                feats_flip, logits_flip, _ = student(images.flip(3))
                feats, logits = (feats + feats_flip) / 2, (logits + logits_flip) / 2
            decoded = torch.tensor([not e for e in errors], device=device)
            bad = [{"index": int(r), "path": items[int(r)][0], "error": e}
                   for r, e in zip(rows, errors) if e]
            yield feats.float(), logits.float(), labels.to(device), rows, decoded, bad
            bar.update(len(images))


class Pass:
    """One checkpoint's pass: the tallies of its classifier (and its ID / OOD halves) and of
    zero-shot, and the features of the rows the t-SNE and the k-shot probe need, nothing else."""

    def __init__(self, ckpt, inputs, cfg, scorer, keep_rows):
        own, every = ckpt["num_classes"], len(inputs.classes)
        self.counts = np.zeros(every, np.int64)
        self.counts[:own] = ckpt["class_counts"]
        self.tallies = {"classifier": Tally(own, ece_bins=cfg.ece_bins)}
        if 0 < inputs.id_count < own:  # a student that also learnt OOD classes (Li's 5-shot)
            self.tallies |= {"classifier.id": Tally(own, np.arange(own) < inputs.id_count),
                             "classifier.ood": Tally(own, np.arange(own) >= inputs.id_count)}
        if scorer is not None:  # halves: the classes this checkpoint trained on, and the rest
            self.tallies |= {"zero_shot": Tally(every),
                             "zero_shot.id": Tally(every, self.counts > 0),
                             "zero_shot.ood": Tally(every, self.counts == 0)}
        self.own, self.scorer = own, scorer
        self.keep_rows = torch.as_tensor(keep_rows, dtype=torch.bool)
        self.average = cfg.group_average
        self.kept_rows, self.kept_feats, self.errors = [], [], []

    def add(self, feats, logits, labels, rows, decoded, errors):
        self.errors += errors
        own = decoded & (labels < self.own)  # the classifier can only name its own classes
        for key, tally in self.tallies.items():
            if key.startswith("classifier"):
                tally.add(logits[own], labels[own])
        if self.scorer is not None:
            scores = self.scorer(feats[decoded])
            for key, tally in self.tallies.items():
                if key.startswith("zero_shot"):
                    tally.add(scores, labels[decoded])
        keep = self.keep_rows[rows] & decoded.cpu()
        if keep.any():
            self.kept_rows.append(rows[keep].numpy())
            self.kept_feats.append(feats[keep.to(feats.device)].cpu())

    def kept(self):
        """(rows, float32 features [len(rows), D]) of the kept rows, in row order."""
        if not self.kept_rows:
            return np.zeros(0, np.int64), torch.zeros(0, 0)
        return np.concatenate(self.kept_rows), torch.cat(self.kept_feats)

    def results(self):
        t, counts = self.tallies, self.counts
        classifier = zero_shot = None
        if t["classifier"].total.sum():
            classifier = report_of(t["classifier"], counts[:self.own], self.average)
            classifier |= t["classifier"].calibration()
            if "classifier.id" in t:
                classifier |= {"id": t["classifier.id"].within(),
                               "ood": t["classifier.ood"].within()}
        if "zero_shot" in t:
            zero_shot = report_of(t["zero_shot"], counts, self.average)
            for half in ("id", "ood"):
                tally = t[f"zero_shot.{half}"]
                zero_shot[half] = tally.within() if tally.total.sum() else None
        return {"classifier": classifier, "zero_shot": zero_shot}


def evaluate(path, name, ckpt, student, cfg, inputs, device):
    """Every metric of one checkpoint from one pass over the evaluated images: the run's record."""
    train_split = Path(cfg.data) / ckpt.get("config", {}).get("train_split", "train.txt")
    trained_on = ckpt.get("train_split_sha256")
    if train_split.is_file() and trained_on not in (None, sha256_file(train_split)):
        warn(f"{path} was trained on another {train_split.name} than {train_split}: its test "
             f"images may overlap its training images")
    student.to(device)  # one checkpoint on the device at a time; back to the CPU at the end
    scorer, route = None, None
    if inputs.class_text is not None:
        scorer, route = zero_shot_scorer(inputs.class_text, inputs.text_encoder, ckpt, student,
                                         cfg.zero_shot_head, name)
        if scorer is None:
            warn(f"no zero-shot for {name}: {route}")
    state = Pass(ckpt, inputs, cfg, scorer, rows_to_keep(ckpt, cfg, inputs))
    for batch in batches(student, cfg.data, inputs.items, ckpt["preprocess"], cfg, device,
                         f"{name} {cfg.split}"):
        state.add(*batch)
    if state.errors:  # skipped with a warning; none decoded is no evaluation
        first = f"first: {state.errors[0]['path']}: {state.errors[0]['error']}"
        if len(state.errors) == len(inputs.items):
            die(f"none of the {len(inputs.items)} images of {cfg.split} could be decoded ({first})")
        warn(f"{len(state.errors)} images of {cfg.split} could not be decoded: skipped, listed in "
             f"results.json ({first})")
    run = run_record(path, name, ckpt, student) | state.results()
    if run["zero_shot"] is not None:
        run["zero_shot"]["via"] = route
    elif route is not None:
        run["zero_shot"] = {"skipped": route}
    rows, feats = state.kept()
    run["few_shot"] = None
    if cfg.few_shot:
        run["few_shot"] = few_shot(student, ckpt, (rows, feats), cfg, inputs, device, name)
    tsne = np.isin(rows, inputs.tsne_rows)
    run |= {"skipped_images": state.errors, "tsne": (rows[tsne], feats[torch.from_numpy(tsne)])}
    student.cpu()
    return run


def rows_to_keep(ckpt, cfg, inputs):
    """Rows whose features the pass keeps: the t-SNE sample and, for the k-shot probe, the
    evaluated images of the classes the checkpoint never saw (the probe is scored on them)."""
    keep = np.zeros(len(inputs.items), bool)
    keep[inputs.tsne_rows] = True
    if cfg.few_shot > 0:
        keep |= inputs.labels >= ckpt["num_classes"]
        keep |= np.isin(inputs.labels, np.flatnonzero(np.asarray(ckpt["class_counts"]) == 0))
    return keep


def run_record(path, name, ckpt, student):
    """What results.json says of a run besides its scores: the checkpoint, classes, heads."""
    counts = np.asarray(ckpt["class_counts"])
    return {"checkpoint": str(path), "name": name, "arch": ckpt["arch"], "head": ckpt["head"],
            "num_classes": ckpt["num_classes"], "class_counts": counts.tolist(),
            "groups": {g: sum(class_group(int(c)) == g for c in counts) for g in GROUPS},
            "has_text_head": "text_head" in ckpt, "has_clip_proj": student.clip_proj is not None,
            "caption_source": caption_source(ckpt),
            "val_split": ckpt.get("config", {}).get("val_split")}


# --- zero-shot and k-shot: classes named by their text, unseen classes learnt from k images

def zero_shot_scorer(class_text, encoder, ckpt, student, choice, what):
    """(function features -> scores [B, C] or None, route or why not). A VLM-KD student scores
    normalize(proj(f)) . normalize(adaptor(t)) through its text head; Li et al.'s students
    normalize(clip_proj(f)) . t. `auto` takes the head of the class text's width, and clip_proj
    where the text head learnt another encoder's features."""
    width, head = class_text.shape[1], ckpt.get("text_head")
    text_ok = head is not None and head["text_dim"] == width
    clip_ok = student.clip_proj is not None and student.clip_proj.out_features == width
    other_encoder = bool(encoder and head and head.get("encoder")
                         and str(encoder) != head["encoder"])
    if choice == "text":
        route = "text_head" if text_ok else None
    elif choice == "clip":
        route = "clip_proj" if clip_ok else None
    elif clip_ok and (other_encoder or not text_ok):  # auto: the text head cannot read this text
        route = "clip_proj"
    else:
        route = "text_head" if text_ok else None
    if route is None:
        have = [f"a {head['text_dim']}-d text head" if head else
                "no text head (trained without --text, or with --drop-text-head)",
                f"a {student.clip_proj.out_features}-d clip_proj" if student.clip_proj is not None
                else "no clip_proj"]
        return None, f"class text is {width}-d, {what} has {' and '.join(have)}"
    device = next(student.parameters()).device
    if route == "clip_proj":
        trained = ckpt.get("class_text")
        if trained is not None and not torch.allclose(trained.float(), class_text[:len(trained)],
                                                      atol=1e-2):
            warn(f"{what}: --class-text rows of its own classes differ from the class text it was "
                 f"trained with (other prompts or descriptions?)")
        text = class_text.to(device)
        return (lambda feats: F.normalize(student.clip_proj(feats), dim=-1) @ text.T), route
    if other_encoder:  # two text encoders' spaces: the numbers would mean nothing
        die(f"--class-text was encoded with {encoder}, the text head of {what} learnt "
            f"{head['encoder']} features")
    return text_head_scorer(class_text.to(device), head), route


def text_head_scorer(class_text, head):
    """VLM-KD's zero-shot: the run's image projection and text adaptor meet in the space where the
    text loss aligned them."""
    text_head = TextHead(head["feat_dim"], head["text_dim"], head["embed_dim"], head["hidden"],
                         1 / head["logit_scale"], False)
    text_head.proj.load_state_dict(head["proj"])
    text_head.adaptor.load_state_dict(head["adaptor"])
    text_head.to(class_text.device)
    with torch.no_grad():  # the class texts once; a batch then costs one matrix product
        text = F.normalize(text_head.adaptor(class_text), dim=-1)
    return lambda feats: F.normalize(text_head.proj(feats), dim=-1) @ text.T


def few_shot(student, ckpt, kept, cfg, inputs, device, name):
    """k-shot accuracy over the unseen classes with a probe on frozen features; `kept`: (rows,
    features) of the evaluated images of those classes, from the streaming pass."""
    counts = np.zeros(len(inputs.classes), dtype=np.int64)
    counts[:ckpt["num_classes"]] = ckpt["class_counts"]
    unseen = np.flatnonzero(counts == 0)
    if not len(unseen):
        return {"skipped": f"{name} trained on every class of {cfg.classes}: no unseen class"}
    rows, taken = first_k_per_class(inputs.few_items, set(unseen.tolist()), cfg.few_shot)
    short = [inputs.classes[c] for c, n in taken.items() if n < cfg.few_shot]
    if short:
        warn(f"{cfg.few_shot_split} has fewer than {cfg.few_shot} images of {len(short)} unseen "
             f"classes (e.g. {short[0]!r})")
    items = [inputs.few_items[r] for r in rows]
    train_feats, errors = extract(student, cfg.data, items, ckpt["preprocess"], cfg, device,
                                  f"{name} k-shot")
    keep = sorted(set(range(len(items))) - {e["index"] for e in errors})
    train_labels = np.array([items[i][1] for i in keep])
    classes = sorted(set(train_labels.tolist()))
    eval_rows, eval_feats = kept
    target = np.isin(inputs.labels[eval_rows], classes)
    if len(classes) < 2 or not target.any():  # a probe needs two classes, a score an image
        return {"skipped": f"{len(classes)} unseen classes with images in {cfg.few_shot_split}, "
                           f"{int(target.sum())} of their images in {cfg.split}"}
    scores = few_shot_probe(train_feats[keep], train_labels, eval_feats[torch.from_numpy(target)],
                            inputs.labels[eval_rows][target], classes, cfg.few_shot_c, cfg.seed)
    return scores | {"k": cfg.few_shot, "split": cfg.few_shot_split,
                     "probe": f"logistic regression, C={cfg.few_shot_c}, L2-normalised features"}


def first_k_per_class(items, classes, k):
    """Rows of the first k images of each class in `classes`, in split order (Li et al.'s k-shot
    protocol: the first ones, so every run and every seed sees the same k images)."""
    taken, rows = {c: 0 for c in classes}, []
    for row, (_, label) in enumerate(items):
        if label in taken and taken[label] < k:
            taken[label] += 1
            rows.append(row)
    return rows, taken


def extract(student, root, items, preprocess, cfg, device, desc):
    """(features [N, D] float32 on the CPU, errors) of the k-shot probe's training images."""
    feats, errors = [], []
    for f, _, _, _, _, bad in batches(student, root, items, preprocess, cfg, device, desc):
        feats.append(f.cpu())
        errors += bad
    return torch.cat(feats), errors


def few_shot_probe(train_feats, train_labels, eval_feats, eval_labels, classes, c_reg, seed):
    """A fresh logistic-regression classifier over `classes` on frozen, L2-normalised features. C
    is fixed, not searched: with k images a class there is nothing to tune it on but the test."""
    from sklearn.linear_model import LogisticRegression
    probe = LogisticRegression(C=c_reg, max_iter=2000, random_state=seed)
    probe.fit(F.normalize(train_feats, dim=-1).numpy(), train_labels)
    preds = probe.predict(F.normalize(eval_feats, dim=-1).numpy())
    per_class = [ratio(((preds == c) & (eval_labels == c)).sum(), (eval_labels == c).sum())
                 for c in classes]
    return {"top1": float((preds == eval_labels).mean()), "mean_class": mean_of(per_class),
            "classes": len(classes), "samples": int(len(eval_labels)),
            "train_images": int(len(train_labels))}


# --- report: results.json, report.md and the table printed, all before any plot

@dataclass
class Provenance:
    """What every output names: the dataset, the evaluated split(s), each run's caption source."""
    dataset: str
    split: str
    captions: str  # "run: source; run: source"
    tiny_random: bool  # a run learnt from a tiny random stand-in's captions: numbers mean nothing


TINY_WARNING = ("captions from a TINY RANDOM stand-in VLM (caption.py --vlm tiny): random text "
                "that proves the plumbing only; the text-distillation and zero-shot numbers mean "
                "nothing")


def provenance_of(runs, cfg, inputs):
    sources = "; ".join(f"{r['name']}: {describe_source(r['caption_source'])}" for r in runs)
    return Provenance(inputs.dataset, cfg.split, sources,
                      any((r["caption_source"] or {}).get("tiny_random") for r in runs))


def describe_source(source):
    if source is None:
        return "no captions"
    if source["tiny_random"]:
        return f"{source['vlm']}: a TINY RANDOM stand-in"
    return source["vlm"] or "captions of an unrecorded VLM"


def read_metrics(path):
    """The rows of a run's metrics.jsonl. A line that is not a JSON object of finite step, epoch,
    loss* and val_* (a torn last line, a hand edit) is left out with a warning naming file:line."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        warn(f"{path} cannot be read ({e.strerror}): no curves or training table from it")
        return []
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):  # a killed run leaves a torn last line
            warn(f"{path}:{n}: not JSON, left out")
            continue
        bad = "not a JSON object" if not isinstance(row, dict) else next(
            (f"{k} is {json.dumps(v)[:40]}, not a finite number" for k, v in row.items()
             if (k in ("step", "epoch") or k.startswith(("loss", "val_")))
             and v is not None and not is_number(v)), None)
        if bad:
            warn(f"{path}:{n}: {bad}, left out")
            continue
        rows.append(row)
    return rows


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_rows(run):
    """The rows of the metrics.jsonl beside a run's checkpoint, read once for the table and the
    curves, so its warnings show once; None: no file."""
    if "metric_rows" not in run:
        path = Path(run["checkpoint"]).parent / "metrics.jsonl"
        run["metric_rows"] = read_metrics(path) if path.is_file() else None
    return run["metric_rows"]


LOGGED = [("val_top1", "val top-1"), ("val_mean_class", "val mean/class"), ("val_few", "val few"),
          ("val_ood_top1", "val OOD top-1"), ("val_ood_mean_class", "val OOD mean/class")]


def training_log(run, last):
    """From the metrics.jsonl beside the checkpoint: each logged validation metric at the last
    evaluated epoch and its mean over the last `last` evaluated epochs (Li et al. report that mean,
    which one lucky epoch moves less); None without the file."""
    path = Path(run["checkpoint"]).parent / "metrics.jsonl"
    rows = [r for r in metric_rows(run) or [] if "val_top1" in r]
    if not rows:
        return None
    found = {}
    for key, _ in LOGGED:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            found[key] = {"last": values[-1], "mean_last": float(np.mean(values[-last:])),
                          "epochs": min(last, len(values))}
    return {"file": str(path), "last_epoch": rows[-1].get("epoch"), "evaluated_epochs": len(rows),
            "metrics": found}


def training_table(runs, last):
    """Markdown: per run, each logged metric's last value and mean of the last `last` epochs."""
    keys = [(k, name) for k, name in LOGGED
            if any(k in (r.get("training_log") or {}).get("metrics", {}) for r in runs)]
    if not keys:
        return ""
    header = " | ".join(f"{name} (last / mean of last {last})" for _, name in keys)
    lines = [f"| run | last epoch | {header} |", "|---" * (len(keys) + 2) + "|"]
    for run in runs:
        log = run.get("training_log") or {"metrics": {}}
        cells = ["—" if (m := log["metrics"].get(k)) is None else
                 f"{100 * m['last']:.1f} / {100 * m['mean_last']:.1f}"
                 + (f" ({m['epochs']})" if m["epochs"] < last else "") for k, _ in keys]
        lines.append(f"| {run['name']} | {log.get('last_epoch', '—')} | " + " | ".join(cells)
                     + " |")
    return (f"\n\nValidation during training (each run's metrics.jsonl, --val-split / --ood-split "
            f"of train.py): the last evaluated epoch and the mean of the last {last} (fewer where "
            f"fewer were logged: in brackets).\n\n" + "\n".join(lines))


COLUMNS = [("classifier", "top1", "top-1"), ("classifier", "many", "many"),
           ("classifier", "medium", "medium"), ("classifier", "few", "few"),
           ("classifier", "mean_class", "mean/class"), ("classifier", "top5", "top-5"),
           ("classifier", "ece", "ECE"), ("classifier", "id", "ID/class"),
           ("classifier", "ood", "OOD/class"), ("zero_shot", "top1", "zero-shot"),
           ("zero_shot", "many", "zs many"), ("zero_shot", "medium", "zs medium"),
           ("zero_shot", "few", "zs few"), ("zero_shot", "id", "zs ID/class"),
           ("zero_shot", "ood", "zs OOD/class"), ("few_shot", "mean_class", "k-shot OOD/class")]


def column_value(run, section, key):
    value = (run.get(section) or {}).get(key)
    return value.get("mean_class") if isinstance(value, dict) else value


def chance_of(run, section, key):
    """A column's chance level for one run: 1 / the classes scored, 5 / classes for top-5. Per
    column, as columns score different classes: the classifier its checkpoint's, zero-shot every
    class text, an ID or OOD column and the k-shot probe their own. None: no chance level (ECE)
    or nothing scored."""
    part = run.get(section) or {}
    value = part.get(key)
    if isinstance(value, dict) or section == "few_shot":
        scored = (value if isinstance(value, dict) else part).get("classes")
    elif key == "ece":
        return None
    else:
        scored = run["num_classes"] if section == "classifier" else len(part.get("per_class") or [])
    if not scored:
        return None
    return min(5, scored) / scored if key == "top5" else 1 / scored


def at_chance(run, section, key):
    value, chance = column_value(run, section, key), chance_of(run, section, key)
    return value is not None and chance is not None and value <= chance + 1e-9


def shown_columns(runs):
    return [c for c in COLUMNS if any(column_value(r, c[0], c[1]) is not None for r in runs)]


def comparison_table(runs):
    """Markdown: a row per run, a column per metric (in %), deltas in points against the first
    run; † marks a number at or below its chance level."""
    columns = shown_columns(runs)
    lines = ["| run | " + " | ".join(c[2] for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for i, run in enumerate(runs):
        cells = []
        for section, key, _ in columns:
            value, base = column_value(run, section, key), column_value(runs[0], section, key)
            cell = "—" if value is None else f"{100 * value:.1f}"
            cell += "†" if at_chance(run, section, key) else ""
            if i and value is not None and base is not None:
                cell += f" ({100 * (value - base):+.1f})"
            cells.append(cell)
        lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def column_notes(runs, cfg, inputs):
    """What each column of the table means: the columns shown, nothing else."""
    shown = {label for _, _, label in shown_columns(runs)}
    averaged = ("the mean of its classes' accuracies" if cfg.group_average == "classes"
                else "over its images")
    notes = [  # (the columns a note explains, the note)
        ({"top-1"}, "top-1: the classifier over the checkpoint's own classes"),
        ({"many", "medium", "few", "zs many", "zs medium", "zs few"},
         f"many / medium / few: the images of classes with > 100, 20-100, < 20 training images, a "
         f"group's accuracy {averaged} (--group-average {cfg.group_average})"),
        ({"mean/class"}, "mean/class: the mean of the per-class accuracies"),
        ({"top-5"}, "top-5: the label among the 5 highest scores"),
        ({"ECE"}, f"ECE: expected calibration error over {cfg.ece_bins} equal-width confidence "
                  f"bins"),
        ({"ID/class"}, f"ID/class: the classifier within the ID classes ({cfg.id_classes}), mean "
                       f"per class"),
        ({"OOD/class"}, "OOD/class: the classifier within the classes after the ID ones, mean per "
                        "class (Li et al.'s 5-shot number for a student finetuned on "
                        "li_train.txt)"),
        ({"zero-shot"}, f"zero-shot: top-1 through the class texts of --class-text, over all "
                        f"{len(inputs.classes)} classes"),
        ({"zs many", "zs medium", "zs few"},
         "zs many / medium / few: zero-shot on each group's images"),
        ({"zs ID/class"}, "zs ID/class: zero-shot within the classes the checkpoint trained on, "
                          "mean per class"),
        ({"zs OOD/class"}, "zs OOD/class: zero-shot within the classes the checkpoint never saw, "
                           "mean per class"),
        ({"k-shot OOD/class"}, f"k-shot OOD/class: a logistic-regression probe on frozen features "
                               f"of the first {cfg.few_shot} images of each unseen class of "
                               f"{cfg.few_shot_split}, mean per class")]
    text = [note for labels, note in notes if labels & shown]
    if len(runs) > 1:
        text.append(f"deltas in points against {runs[0]['name']}")
    if any(at_chance(r, c[0], c[1]) for r in runs for c in shown_columns(runs)):
        text.append("† at or below chance: 1 / the classes scored (5 / classes for top-5; an ID or "
                    "OOD column and the k-shot probe within their own classes)")
    return "Accuracies and ECE in %:\n\n" + "".join(f"* {note}\n" for note in text)


def report_top(inputs, cfg, provenance):
    """The report's first lines: what was evaluated, and where the captions came from."""
    top = (f"# Evaluation on {provenance.dataset}: {cfg.data} / {cfg.split} "
           f"({len(inputs.items)} images{', flip TTA' if cfg.tta else ''})\n\n")
    if provenance.tiny_random:
        top += f"> **WARNING: {TINY_WARNING}.**\n\n"
    return top + f"Caption source: {provenance.captions}.\n\n"


def write_results(runs, plots, inputs, cfg, out, provenance):
    """results.json and report.md, each written whole through a rename."""
    tmp = out / f".report.md.{os.getpid()}.tmp"
    tmp.write_text(report_top(inputs, cfg, provenance) + column_notes(runs, cfg, inputs) + "\n"
                   + comparison_table(runs) + training_table(runs, cfg.last_epochs) + "\n\n"
                   + "".join(f"![{k}]({v.name})\n" for k, v in plots.items()), encoding="utf-8")
    os.replace(tmp, out / "report.md")
    chance = [{label: chance_of(r, s, k) for s, k, label in shown_columns(runs)} for r in runs]
    write_json(out / "results.json", {
        "made_by": "eval.py", "dataset": provenance.dataset, "tiny_random": provenance.tiny_random,
        "caption_source": provenance.captions, "checkpoints": [r["checkpoint"] for r in runs],
        "config": asdict(cfg), "versions": versions("torch", "torchvision", "numpy"),
        "classes": inputs.classes, "id_classes": inputs.id_count or None,
        "num_images": len(inputs.items),
        "splits": {p.name: sha256_file(p) for p in inputs.split_paths},
        "plots": {k: str(v) for k, v in plots.items()},
        "runs": [{k: v for k, v in r.items() if k not in ("tsne", "metric_rows")} | {"chance": c}
                 for r, c in zip(runs, chance)]})


# --- plots: per-class accuracy by frequency, t-SNE of features, training curves

GROUP_COLOURS = {"few": "#f4cccc", "medium": "#fff2cc", "many": "#d9ead3"}
RUN_MARKERS = "osD^vP*X"
TSNE_MARKERS = {"many": "o", "medium": "s", "few": "^", "unseen": "x"}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: a server or a job has no display
    import matplotlib.pyplot as plt
    return plt


def plot_title(what, provenance, split=None):
    """`what` the plot shows, then the dataset, the split and the caption source; a random
    stand-in's captions, loudly. Returns (title, its number of lines)."""
    lines = [what]
    if provenance is not None:
        lines += textwrap.wrap(f"{provenance.dataset} / {split or provenance.split}; captions: "
                               f"{provenance.captions}", 110)
        if provenance.tiny_random:
            lines += textwrap.wrap(f"!!! {TINY_WARNING} !!!", 110)
    return "\n".join(lines), len(lines)  # a figure grows by 0.2 in a line of its suptitle


def draw_plots(runs, inputs, cfg, out, provenance):
    """{name: path} of the plots drawn."""
    figures = {"per_class_vs_frequency": plot_per_class(runs, inputs.classes, provenance)
               if any(r["classifier"] for r in runs) else None,
               "tsne": plot_tsne(runs, inputs, cfg.seed, provenance)
               if min(len(r["tsne"][0]) for r in runs) >= 5 else None,  # t-SNE needs a few points
               "curves": plot_curves(runs, provenance)}
    plots = {}
    for name, fig in figures.items():
        if fig is not None:
            plots[name] = out / f"{name}.png"
            fig.savefig(plots[name], dpi=120, bbox_inches="tight")
            pyplot().close(fig)
    return plots


def plot_per_class(runs, classes, provenance=None):
    """Per-class accuracy, a marker per run, over the classes sorted by training images, with the
    group bands of the run with the most classes."""
    plt = pyplot()
    scored = [r for r in runs if r["classifier"]]
    ref = max(scored, key=lambda r: r["num_classes"])
    counts = np.asarray(ref["class_counts"])
    order = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    groups = [class_group(int(counts[c])) for c in order]
    named = len(order) <= 60  # more names would overlap: no ticks then
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(order) + 3) if named else 14, 5))
    for group in GROUPS:
        at = [i for i, g in enumerate(groups) if g == group]  # contiguous: sorted by count
        if at:
            ax.axvspan(at[0] - 0.5, at[-1] + 0.5, color=GROUP_COLOURS[group], alpha=0.6, zorder=0)
            ax.text((at[0] + at[-1]) / 2, 103, group, ha="center", va="bottom", fontsize=9)
    for i, run in enumerate(scored):  # runs side by side within a class: equal points stay seen
        acc = run["classifier"]["per_class"]
        shift = (i - (len(scored) - 1) / 2) * 0.5 / max(1, len(scored) - 1)
        points = [(j + shift, 100 * acc[c]) for j, c in enumerate(order)
                  if c < len(acc) and acc[c] is not None]
        ax.scatter(*zip(*points), marker=RUN_MARKERS[i % len(RUN_MARKERS)], label=run["name"],
                   zorder=3, s=28 if named else 6)
    if named:
        ax.set_xticks(range(len(order)), [f"{classes[c]} ({counts[c]})" for c in order],
                      rotation=60, ha="right", fontsize=8)
    else:
        ax.set_xticks([])
    title = "Per-class accuracy by training frequency (bands: many > 100, medium 20-100, few < 20)"
    ax.set(xlim=(-0.7, len(order) - 0.3), ylim=(-3, 112), ylabel="per-class top-1 (%)",
           xlabel=f"class (training images in {ref['name']}), most to fewest",
           title=plot_title(title, provenance)[0])
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def plot_tsne(runs, inputs, seed, provenance=None):
    """t-SNE of penultimate features on the same sample for every run: colour = class, marker =
    group. The legend lists the groups and classes drawn, nothing else."""
    from matplotlib.lines import Line2D
    collapsed = [run["name"] for run in runs if not np.ptp(run["tsne"][1].numpy(), axis=0).any()]
    if collapsed:  # one point for every image: t-SNE's gradient is NaN, and nothing to show
        warn(f"t-SNE left out: {', '.join(collapsed)} maps every sampled image to the same feature")
        return None
    plt = pyplot()
    named = len(inputs.classes) <= 20  # a legend of more classes would hide the plot
    cmap = plt.get_cmap("tab20" if len(inputs.classes) > 10 else "tab10")
    what = "t-SNE of penultimate features: colour = class" + (" (legend)" if named else "")
    title, lines = plot_title(what + ", marker = the class's group in that run", provenance)
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 5 + 0.2 * lines),
                             squeeze=False)
    drawn_groups, drawn_classes = set(), set()
    for ax, run in progress_bar(len(runs), "run", desc="t-SNE", iterable=zip(axes[0], runs)):
        groups, classes = draw_tsne(ax, run, inputs, cmap, seed)
        drawn_groups, drawn_classes = drawn_groups | groups, drawn_classes | classes
    handles = [Line2D([], [], ls="", marker=m, color="grey", label=g)
               for g, m in TSNE_MARKERS.items() if g in drawn_groups]
    if named:
        handles += [Line2D([], [], ls="", marker="o", color=cmap(c % cmap.N),
                           label=inputs.classes[c]) for c in sorted(drawn_classes)]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.85 if named else 0.93, 1))  # room for the legend
    return fig


def draw_tsne(ax, run, inputs, cmap, seed):
    """One run's t-SNE on `ax`; returns the groups and the classes it drew."""
    from sklearn.manifold import TSNE
    rows, feats = run["tsne"]
    labels = inputs.labels[rows]
    # Perplexity must stay well below the number of points (30, sklearn's default, where there are
    # enough); exact t-SNE is affordable for a few hundred points and more faithful than Barnes-Hut.
    points = TSNE(2, perplexity=max(2.0, min(30.0, (len(feats) - 1) / 3)), init="pca",
                  random_state=seed, method="exact" if len(feats) <= 500 else "barnes_hut"
                  ).fit_transform(feats.numpy())
    counts = np.zeros(len(inputs.classes), np.int64)
    counts[:len(run["class_counts"])] = run["class_counts"]
    groups = np.array([class_group(int(counts[y])) for y in labels])
    for name, marker in TSNE_MARKERS.items():
        mask = groups == name
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], color=cmap(labels[mask] % cmap.N),
                       marker=marker, s=14, linewidths=0.8)
    ax.set(title=f"{run['name']} ({len(rows)} images)", xticks=[], yticks=[])
    return set(groups.tolist()), set(labels.tolist())


CLASSIFICATION_LOSS = ("loss_cls", "loss_ce")  # train.py's name, and the one older runs logged
LOSS_PANELS = ("classification loss", "text loss (VLM-KD)", "other distillation losses")
OTHER_LOSSES = ("loss_kd", "loss_imitate", "loss_imitate_cst", "loss_align")


def plot_curves(runs, provenance=None):
    """Loss parts per logged step, each compared with the same part of the other runs
    (classification; VLM-KD's text term; the other distillation terms), and val top-1 / few per
    epoch. The weighted total is not drawn: with the text term it is not comparable to a run
    without it. None: no run has metrics."""
    series = {}  # {panel: [(run name, label, [(x, y)])]}
    for run in runs:
        rows = metric_rows(run)
        if rows is None:
            warn(f"{Path(run['checkpoint']).parent / 'metrics.jsonl'} not found: no curves for "
                 f"{run['name']}")
            continue
        cls_key = next((k for k in CLASSIFICATION_LOSS if any(k in r for r in rows)), None)
        keys_of = {LOSS_PANELS[0]: (cls_key,) if cls_key else (), LOSS_PANELS[1]: ("loss_text",),
                   LOSS_PANELS[2]: OTHER_LOSSES, "val top-1": ("val_top1",),
                   "val few": ("val_few",)}
        for panel, keys in keys_of.items():
            for key in keys:
                x_key = "epoch" if key.startswith("val_") else "step"
                points = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and x_key in r]
                if points:
                    label = run["name"] if len(keys) == 1 else f"{run['name']} {key[5:]}"
                    series.setdefault(panel, []).append((run["name"], label, points))
    if not series:
        return None
    plt = pyplot()
    panels = [p for p in LOSS_PANELS if p in series] + ["val"]
    val_splits = sorted({str(r.get("val_split") or "val.txt") for r in runs})
    title, lines = plot_title("Training curves of each run (from its metrics.jsonl)", provenance,
                              f"{', '.join(val_splits)} of training (validation curves)")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4 + 0.2 * lines),
                             squeeze=False)
    colour = {r["name"]: f"C{i}" for i, r in enumerate(runs)}  # one colour a run in every panel
    for ax, panel in zip(axes[0], panels):
        draw_curves(ax, panel, series, colour)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_curves(ax, panel, series, colour):
    """One panel: a loss part of every run, or (panel "val") val top-1 solid and val few dotted,
    per epoch from 0 as train.py logs it. A series of few points gets markers, so a single
    logged point still shows."""
    from matplotlib.ticker import MaxNLocator
    is_val = panel == "val"
    drawn = [(s, "-") for s in series.get(panel, [])]
    if is_val:
        drawn = ([(s, "-") for s in series.get("val top-1", [])]
                 + [(s, ":") for s in series.get("val few", [])])
    for (run_name, label, points), style in drawn:
        x, y = zip(*points)
        ax.plot(x, [100 * v for v in y] if is_val else y, ls=style, color=colour[run_name],
                marker="o" if len(x) <= 30 else None, ms=4,
                label=label + (" few" if style == ":" else " top-1" if is_val else ""))
    ax.set(xlabel="epoch (from 0, as train.py prints it)" if is_val else "step",
           ylabel="val accuracy (%)" if is_val else "mean loss since the previous log (unweighted)",
           title="Validation top-1 (solid), few (dotted)" if is_val
           else panel[0].upper() + panel[1:])
    ax.grid(alpha=0.3)
    xs = sorted({x for (_, _, points), _ in drawn for x, _ in points})
    if len(xs) <= 8:  # steps and epochs are whole numbers: tick the logged ones
        ax.set_xticks(xs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        ax.legend(fontsize=8)


# --- main

def main(argv=None):
    cfg = read_command_line(sys.argv[1:] if argv is None else argv)
    launch_check()  # accelerate launch --num_processes N may start fewer processes than asked
    device = pick_device(cfg.device)
    # Eval needs no full-fp32 matmuls: TF32 where the GPU has it.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    inputs = read_inputs(cfg)  # classes, splits, labels, k-shot split, class text
    out = writable_dir(cfg.out)  # a bad --out fails now, not after the work
    # Every checkpoint is checked before any image is read.
    checkpoints = [load_checkpoint(p, inputs) for p in cfg.checkpoints]
    print(f"eval.py: {len(checkpoints)} checkpoint(s) on {len(inputs.items)} images of "
          f"{inputs.dataset} / {cfg.split}, device {device}, fp32", flush=True)
    runs = [evaluate(path, name, ckpt, student, cfg, inputs, device) for path, name, (ckpt, student)
            in zip(cfg.checkpoints, run_names(cfg.checkpoints), checkpoints)]
    for run in runs:
        run["training_log"] = training_log(run, cfg.last_epochs)
    provenance = provenance_of(runs, cfg, inputs)
    # The numbers before any plot: a plot that fails (matplotlib, t-SNE) loses none of them.
    write_results(runs, {}, inputs, cfg, out, provenance)
    print(f"Caption source: {provenance.captions}\n\n" + comparison_table(runs)
          + training_table(runs, cfg.last_epochs), flush=True)
    plots = draw_plots(runs, inputs, cfg, out, provenance)
    write_results(runs, plots, inputs, cfg, out, provenance)
    for name, path in plots.items():
        print(f"{name}: {path}")
    print(f"results: {out / 'results.json'}, table: {out / 'report.md'}", flush=True)
    if provenance.tiny_random:
        print(f"!!! {TINY_WARNING}.\n!!! Caption with a real VLM (caption.py --vlm <hub id or "
              f"folder>) for numbers that mean something.", flush=True)


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


def pick_device(choice="auto"):
    """auto: this process's GPU (cuda:LOCAL_RANK under torchrun or accelerate launch), else CPU."""
    import torch
    if choice != "auto":
        if choice.startswith("cuda") and not torch.cuda.is_available():
            die(f"--device {choice}, but torch sees no CUDA device (use --device cpu)")
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda",
                            int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


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


def rgb_image(image):
    """An opened PIL image as 8-bit RGB. 16-bit grayscale (mode I;16 / I) is scaled to 8 bits first:
    convert("RGB") clips it, turning a 16-bit PNG almost white. convert() also decodes the whole
    file, so a truncated image fails here, where the caller records it."""
    if image.mode.startswith("I"):
        import numpy
        from PIL import Image
        scaled = numpy.asarray(image, dtype=numpy.float64) / 257.0
        image = Image.fromarray(numpy.clip(numpy.rint(scaled), 0, 255).astype(numpy.uint8), "L")
    return image.convert("RGB")


def launch_check(world_size=None, launcher_argv=None):
    """Warn (rank 0) when the launcher asked for more processes than this run has; return the count
    it asked for, or None where that cannot be seen. `accelerate launch --num_processes 2` starts
    ONE process unless it goes multi-GPU (never without GPUs, or with --cpu), and no variable in the
    environment it passes names the count asked for (torchrun sets WORLD_SIZE to it): it is read
    from the launcher's own command line (accelerate_launch_words, asked_num_processes)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    head = accelerate_launch_words(launcher_argv)
    asked = None if head is None else asked_num_processes(head)
    if not (asked or "").isdigit():
        return None
    if int(asked) > world_size and is_main_process():
        script = Path(sys.argv[0]).name
        warn(f"accelerate launch asked for {asked} processes, but this run has world size "
             f"{world_size}: accelerate starts a single process unless it goes multi-GPU (it does "
             f"not without GPUs or with --cpu); for {asked} CPU processes run "
             f"`torchrun --nproc_per_node {asked} {script} ...`")
    return int(asked)


def accelerate_launch_words(launcher_argv=None):
    """The words of the `accelerate launch` command line that started this script, up to the script
    (default: /proc/<parent>/cmdline, Linux), else None. Not seen: a script started through a shell
    or with `-m`, systems without /proc, launchers other than accelerate."""
    if launcher_argv is None:
        try:
            launcher_argv = (Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
                             .decode(errors="replace").split("\0"))
        except OSError:
            return None
    if sys.argv[0] not in launcher_argv:  # not started by this command line (a shell, make, ...)
        return None
    head = launcher_argv[:launcher_argv.index(sys.argv[0])]  # the launcher's own words
    if not any(Path(w).name in ("accelerate", "accelerate-launch") or w.startswith("accelerate.")
               for w in head):
        return None
    return head


def asked_num_processes(head):
    """The process count (a string) the `accelerate launch` words `head` ask for: `--num_processes
    N`, else `num_processes` of the accelerate config file it reads; None where neither says."""
    options = {}
    for i, word in enumerate(head):
        name, eq, value = word.partition("=")
        if name.startswith("--"):
            options[name[2:].replace("-", "_")] = value if eq else \
                (head[i + 1] if i + 1 < len(head) else "")
    asked = options.get("num_processes")
    config = options.get("config_file")
    # accelerate skips its default file under --cpu
    if asked is None and config is None and "cpu" not in options:
        home = os.environ.get("HF_HOME") or \
            Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
        config = Path(home).expanduser() / "accelerate" / "default_config.yaml"
    if asked is None and config:
        try:
            lines = Path(config).read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:  # `num_processes: 2` (YAML) or `"num_processes": 2,` (JSON)
            key, _, value = line.partition(":")
            if key.strip().strip('"') == "num_processes":
                asked = value.strip().rstrip(",")
    return asked


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


def read_classes(path):
    """Class names, line i naming label i; each name once."""
    path = Path(path)
    if not path.is_file():
        die(f"classes file {path} not found (prepare.py writes it)")
    names = path.read_text(encoding="utf-8").splitlines()
    first = {}
    for n, name in enumerate(names, 1):
        if not name.strip():
            die(f"{path}:{n}: empty class name")
        if first.setdefault(name, n) != n:  # two labels, one text: zero-shot cannot tell them apart
            die(f"{path}:{n}: {name!r} also names line {first[name]}: "
                "each class needs its own name")
    if not names:
        die(f"classes file {path} is empty")
    return names


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


def sidecar_digest(array_path, sidecar):
    """sha256 of an array's bytes and its sidecar's other fields: an edit to either is caught."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in sidecar.items() if k != "sha256"},
                                       sort_keys=True).encode())
    digest.update(sha256_file(array_path).encode())
    return digest.hexdigest()


def load_artifact(path, kind):
    """(array opened as a memmap, sidecar) of an encode.py artifact. Refused in one line unless the
    sidecar is there, names this kind and matches the array (sidecar_digest), every row finite."""
    path, sidecar_path = Path(path), Path(path).with_suffix(".json")
    for p in (path, sidecar_path):
        if not p.is_file():
            die(f"{p} not found: an array is used only with the sidecar encode.py wrote next to it")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        die(f"{path} or {sidecar_path.name} cannot be read ({e}); re-run encode.py")
    if sidecar.get("kind") != kind:
        die(f"{sidecar_path}: kind is {sidecar.get('kind')!r}, expected {kind!r}")
    if sidecar.get("sha256") != sidecar_digest(path, sidecar):
        die(f"{path} and {sidecar_path.name} do not match (sha256): "
            "one was changed after encode.py wrote them")
    for start in range(0, len(array), 8192):
        chunk = np.asarray(array[start:start + 8192])
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if not finite.all():
            die(f"{path}: row {start + int(np.flatnonzero(~finite)[0])} holds NaN or inf")
    return array, sidecar


if __name__ == "__main__":
    main()
