r"""Train a vision encoder from scratch with long-tail classification + VLM text distillation (VLM-KD),
optionally with the CLIP-teacher losses of Li et al. (imitation, class-text classifier, VL alignment).

    python train.py --data data/fmnist-lt --arch resnet32 --loss la --epochs 100 --out runs/fmnist/ce
    accelerate launch train.py --data data/fmnist-lt --arch resnet32 --loss la --epochs 100 \
        --text runs/fmnist/text/text.npy --text-weight 1.0 --out runs/fmnist/vlmkd
    accelerate launch train.py --data data/imagenet-lt --arch resnet50 --res 176 --epochs 90 --compile \
        --text runs/inlt/text/text.npy --out runs/inlt/vlmkd                    # one machine, all its GPUs
    python train.py ... --arch timm:vit_tiny_patch16_224 --res 64            # any timm model, from scratch
    python train.py ... --teacher runs/fmnist/ce/final.pt --kd-weight 1.0    # + vision-teacher logit KD
    python train.py ... --class-text runs/x/clip/classes.npy --head cosine \
        --teacher-images runs/x/clip/images.npy                             # Li et al. CLIP-teacher losses
    python train.py ... --init runs/x/li/final.pt                            # finetune from every fitting weight
    accelerate launch train.py --recipe li-main --data data/food-li --class-text runs/food-li/clip/classes.npy \
        --teacher-images runs/food-li/clip/id_train.npy --out runs/food-li/student   # a published protocol
    python train.py --recipe li-5shot --help                                 # its settings, shown as the defaults
    python train.py ... --resume                                             # continue a killed run in --out
    torchrun --nproc_per_node 2 train.py ...                                 # several CPU processes (gloo)

The run directory gets a copy of this script, config.json, versions.json, metrics.jsonl (every loss
part, lr, images/s; val top-1 overall/many/medium/few), ckpt.pt (everything to resume, each epoch),
final.pt (student + text head + class names + counts + preprocessing: all that eval.py needs) and the
student for use without this code: student.safetensors + student.json (torchvision / timm keys) and
student.pt2 (torch.export), see --export.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator


# The one shared helper the Config needs above it; the others are at the back of the file.
def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


# --- config

REPORT_TO = Literal["none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]
RECIPE_NAMES = Literal["none", "li-main", "li-main-x5", "li-5shot", "li-5shot-x5", "vlmkd-imagenet-lt"]


@dataclass
class Config:
    recipe: RECIPE_NAMES = opt("none", "a published protocol's settings as the defaults of every flag below (README "
                                       "'Recipes'); flags given still win, config.json lists them", heading="recipe")
    data: str = opt("data/fmnist-lt", "folder from prepare.py", heading="data")
    train_split: str = opt("train.txt", "split file inside --data (id_train.txt for OOD sets)")
    val_split: str = opt("val.txt", "split scored every --eval-every epochs (nothing is selected on it: final.pt is "
                                    "the last epoch)")
    classes: str = opt("classes.txt", "class names inside --data (id_classes.txt for OOD sets)")
    ood_split: str = opt("", "split inside --data of images of the classes after id_classes.txt, scored every eval "
                             "epoch within those classes through clip_proj and --class-text (Li et al.'s OOD number: "
                             "val_ood_top1, val_ood_mean_class); '' = off")
    out: str = opt("runs/train", "run directory")
    res: int = opt(32, "training / eval resolution")
    max_res: int = opt(256, "longest side stored in the .beton cache")
    min_scale: float = opt(-1.0, "RandomResizedCrop min area; -1: 0.35 for res <= 64, else 0.08")
    crop_ratio: float = opt(-1.0, "eval centre-crop ratio; -1: 1.0 for res <= 64, else 0.875")
    workers: int = opt(-1, "ffcv decoding threads; -1: all cores / processes")

    arch: str = opt("resnet32", "resnet20/32/44/56 (CIFAR-style), a torchvision model name, or timm:<name> "
                                "(random init; features are the pooled pre-logits)", heading="model")
    init: str = opt("", "final.pt whose backbone starts this run (the classes may differ: the head is new)")
    ema: float = opt(0.0, "EMA decay per step (e.g. 0.999); 0 = off. Eval and final.pt use the EMA")

    epochs: int = opt(100, "epochs (the lr schedule counts these)", heading="optimisation")
    repeat_epochs: int = opt(1, "passes over the training split per epoch (Li et al.'s --repeat-epochs; "
                                "rows_max_repeat then counts the passes)")
    batch_size: int = opt(128, "per process")
    ood_half_batch: bool = opt(False, "half of every batch from the images of the classes after --data/id_classes.txt "
                                      "(drawn afresh each batch), half from the others (one pass an epoch): Li et "
                                      "al.'s 5-shot finetune")
    optimizer: Literal["sgd", "adamw"] = opt("sgd", "sgd (momentum 0.9) or adamw")
    nesterov: bool = opt(True, "nesterov momentum for sgd")
    lr: float = opt(0.1, "peak lr at a global batch of 128; scaled linearly with the global batch")
    weight_decay: float = opt(5e-4, "not applied to biases, norms and the temperature unless --decay-all")
    decay_all: bool = opt(False, "weight decay on biases and norms too (Li et al.'s and Kang et al.'s code)")
    schedule: Literal["cosine", "step", "onecycle"] = opt(
        "cosine", "cosine: decay to 0 per step; step: x --gamma at each of --milestones (epochs); onecycle: torch's "
                  "OneCycleLR stepped once an epoch, peak --lr (Li et al.'s finetune)")
    milestones: str = opt("30,60", "--schedule step: comma-separated epochs (from 0) where the lr drops")
    gamma: float = opt(0.1, "--schedule step: lr factor at each milestone")
    warmup_epochs: float = opt(5.0, "linear warmup before the cosine or step schedule, per step")
    grad_clip: float = opt(0.0, "max grad norm; 0 = off")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "autocast dtype; auto: bf16 where the hardware computes it (GPUs since Ampere, CPUs with avx512_bf16 "
        "or AMX: ~2x fp32 there), fp16 on older GPUs, fp32 on other CPUs")
    compile: bool = opt(False, "torch.compile the model (~40 s first step on a CPU)")
    seed: int = opt(0, "seed of init, crops, flips, caption sampling and data order")
    deterministic: bool = opt(False, "deterministic GPU kernels (cuDNN without autotuning, cuBLAS, scatter/index "
                                     "adds): bit-identical reruns on one GPU, somewhat slower; CPU runs need no flag")
    max_steps: int = opt(0, "stop after this many steps (benchmarks); 0 = off")

    loss: Literal["ce", "la", "bs"] = opt("la", "ce | la (logit-adjusted, Menon et al.) | bs (balanced softmax)",
                                          heading="classification loss")
    tau_la: float = opt(1.0, "logit adjustment strength of --loss la")
    label_smoothing: float = opt(0.0, "label smoothing of the classification loss")
    head: Literal["linear", "cosine"] = opt("linear", "linear | cosine (over --class-text embeddings, Li et al.)")
    tau: float = opt(0.07, "temperature of the cosine head and the VL alignment")

    text: str = opt("", "text.npy from encode.py: VLM caption features [N, P, D]",
                    heading="VLM text distillation (VLM-KD)")
    text_weight: float = opt(1.0, "weight of the text InfoNCE; 0 = off")
    prompts: str = opt("", "comma-separated prompt ids to train on (default: all slots)")
    text_temp: float = opt(0.07, "InfoNCE temperature (initial value when learnt)")
    learn_temp: bool = opt(False, "learn the temperature (own param group, no decay, --temp-lr)")
    temp_lr: float = opt(1e-3, "lr of the learnt temperature: SGD at the backbone's lr collapses it")
    mask_same_class: bool = opt(False, "drop same-class negatives from the InfoNCE")
    local_negatives: bool = opt(False, "under N processes, contrast only within each process's batch (default: "
                                       "gather all processes' rows, as one process with batch N x B)")
    embed_dim: int = opt(256, "width of the shared image-text space")
    adaptor_hidden: int = opt(512, "hidden width of the text adaptor MLP")
    drop_text_head: bool = opt(False, "leave the text head out of final.pt (deployment)")

    teacher: str = opt("", "final.pt of a frozen vision teacher for logit KD", heading="vision teacher")
    kd_weight: float = opt(1.0, "weight of the logit KD; 0 = off")
    kd_temp: float = opt(4.0, "KD softmax temperature T (the loss is scaled by T^2)")

    class_text: str = opt("", "classes.npy from encode.py --classes (CLIP text space); the rows of the training "
                              "classes are used, checked by name", heading="CLIP teacher (Li et al.)")
    teacher_images: str = opt("", "images.npy from encode.py --images (CLIP image embeddings)")
    imitate_weight: float = opt(1.0, "weight of the image-embedding imitation; 0 = off")
    imitate_loss: str = opt("mse", "mse (of unit vectors), contrastive (InfoNCE at --tau), or both: mse,contrastive "
                                   "(Li et al.'s L-mse + L-cst, each at --imitate-weight)")
    align_weight: float = opt(1.0, "weight of the VL alignment (needs --class-text and --teacher-images); 0 = off")
    align_topk: int = opt(0, "align over the teacher's top-k class texts (k > classes: all); 0 = all")
    align_correct_only: bool = opt(False, "align only where the teacher is right")

    resume: bool = opt(False, "continue from --out/ckpt.pt (refused if an input or a setting changed)", heading="run")
    overwrite: bool = opt(False, "start a new run in an --out that holds another run: its files (those train.py "
                                 "writes, nothing else) are removed first")
    eval_every: int = opt(1, "evaluate on --val-split every this many epochs (and after the last)")
    log_every: int = opt(20, "steps between metrics.jsonl rows")
    report_to: REPORT_TO = opt("none", "also log metrics.jsonl's rows to this accelerate tracker")
    export: str = opt("safetensors,pt2", "student files written next to final.pt: comma-separated from "
                                         "safetensors, pt2, onnx; '' = none")


# Flags that change only speed or logging: a resume may change them. Input paths are compared by content.
RESUMABLE_CHANGES = {"workers", "log_every", "resume", "overwrite", "report_to", "export", "out"}
INPUT_FIELDS = {"data", "train_split", "val_split", "classes", "ood_split", "text", "class_text", "teacher",
                "teacher_images", "init"}
EXPORTS = ("safetensors", "pt2", "onnx")
# Every file a run writes in --out: another run's are refused, --overwrite removes these and nothing else.
RUN_FILES = ("train.py", "config.json", "versions.json", "metrics.jsonl", "ckpt.pt", "final.pt",
             *(f"student.{ext}" for ext in ("json", "safetensors", "pt2", "onnx")))
WORKERS_PER_CORE = 4  # ffcv decoding threads beyond a few per core only compete for it (and set torch's threads)


@dataclass(frozen=True)
class Limit:
    """The values a numeric flag takes: [low, high], an end left out with `open_low` / `open_high`; `auto` is a
    value outside the range that means "choose for me" (-1)."""
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    auto: float | None = None
    why: str = ""

    def allows(self, value):
        if value == self.auto:
            return True
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return math.isfinite(value) and above and below

    def describe(self):
        low, high = f"{self.low:g}", f"{self.high:g}"
        if self.high == math.inf:
            text = f"{'>' if self.open_low else '>='} {low}"
        else:
            text = f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        return (f"{self.auto:g} or " if self.auto is not None else "") + text


# One limit per numeric Config field (tests/test_train.py checks that none is left out).
LIMITS = {
    "res": Limit(8, why="below 8 px the ResNets' downsampling leaves nothing to learn from"),
    "max_res": Limit(8),
    "min_scale": Limit(0, 1, open_low=True, auto=-1),
    "crop_ratio": Limit(0, 1, open_low=True, auto=-1),
    "workers": Limit(1, WORKERS_PER_CORE * (os.cpu_count() or 1), auto=-1,
                     why=f"{WORKERS_PER_CORE} per core: more decoding threads only compete for the cores"),
    "ema": Limit(0, 1, open_high=True, why="a decay of 1 keeps the average at the random init"),
    "epochs": Limit(1),
    "repeat_epochs": Limit(1),
    "batch_size": Limit(1),
    "lr": Limit(0, why="0 keeps the weights fixed"),
    "weight_decay": Limit(0),
    "warmup_epochs": Limit(0),
    "gamma": Limit(0, open_low=True, why="the lr factor at each milestone"),
    "grad_clip": Limit(0, why="0 = off"),
    "seed": Limit(0, 2 ** 31 - 1),
    "max_steps": Limit(0, why="0 = off"),
    "tau_la": Limit(0),
    "label_smoothing": Limit(0, 1, open_high=True),
    "tau": Limit(0, open_low=True),
    "text_weight": Limit(0),
    "text_temp": Limit(0, open_low=True),
    "temp_lr": Limit(0),
    "embed_dim": Limit(1),
    "adaptor_hidden": Limit(1),
    "kd_weight": Limit(0),
    "kd_temp": Limit(0, open_low=True),
    "imitate_weight": Limit(0),
    "align_weight": Limit(0),
    "align_topk": Limit(0, why="0 = all classes"),
    "eval_every": Limit(1),
    "log_every": Limit(1),
}


def check_config(cfg):
    """Every numeric flag in its range and the flags that go together, before any work: an odd value is one line
    naming the flag, not a traceback (or a silent no-op run) later."""
    hints = typing.get_type_hints(Config)
    for f in fields(cfg):
        if hints[f.name] in (int, float):
            value, limit = getattr(cfg, f.name), LIMITS[f.name]
            if not limit.allows(value):
                die(f"--{f.name.replace('_', '-')} {value}: must be {limit.describe()}"
                    + (f" ({limit.why})" if limit.why else ""))
    if cfg.max_res < cfg.res:
        die(f"--max-res {cfg.max_res} < --res {cfg.res}: the cache would store every image smaller than it trains")
    if cfg.resume and cfg.overwrite:
        die("--resume continues the run in --out, --overwrite replaces it: pass one of them")


# --- recipes
# Each published protocol as the defaults it sets (README "Recipes" has the commands and a table of sources). Li et
# al.'s values are read from their code, github.com/xuanlinli17/large_vlm_distillation_ood at commit 4c04530:
# "main:N" is main_experiments.py line N, "ex:N" example_scripts.sh line N, "their README" its "Running main
# experiments" section. Where a value has no line, the comment names the function that fixes it.
LI_COMMON = {
    "arch": "resnet18",             # ex:1 `-a resnet18` (their README: ResNet students)
    "res": 224,                     # main, train transform: RandomResizedCrop(224); test: CenterCrop(224)
    "max_res": 256,                 # main: every image is first resized to 256 x 256
    "min_scale": 0.08,              # main: RandomResizedCrop's default scale (0.08, 1)
    "crop_ratio": 0.875,            # main: CenterCrop(224) of the 256-px image
    "batch_size": 128,              # ex:3 `--train-batch 128`
    "optimizer": "sgd",             # main: optim.SGD unless --use-adam (ViT students only)
    "nesterov": False,              # main: optim.SGD(momentum=args.momentum), no nesterov; momentum 0.9 main:71
    "decay_all": True,              # main: optim.SGD(model.parameters(), ...) decays every parameter
    "weight_decay": 1e-4,           # main:73 `--weight-decay` default 1e-4 (the examples keep it)
    "warmup_epochs": 0.0,           # main: adjust_learning_rate has no warmup
    "repeat_epochs": 1,             # main:54 `--repeat-epochs` default 1; their README: 1 for Food, SUN (ResNet)
    "head": "cosine",               # main, train(): logits = normalize(student) . normalize(class text) / T
    "tau": 0.07,                    # main:102 `--temperature` 0.07 (L-cls, L-vlalign and L-cst)
    "loss": "ce",                   # main: criterion = nn.CrossEntropyLoss() (L-cls)
    "label_smoothing": 0.0,         # main: nn.CrossEntropyLoss() without smoothing
    "imitate_loss": "mse,contrastive",  # ex:4 `--clip-align-image-mse --clip-align-image-contrastive`
    "imitate_weight": 1.0,          # main, train(): L-mse and L-cst are added with weight 1
    "align_weight": 1.0,            # main, train(): L-vlalign is added with weight 1.0
    "align_topk": 256,              # ex:5 `--clip-align-proximal-text-num 256` (min(k, classes) in train())
    "align_correct_only": True,     # ex:5 `--clip-filter-out-wrong-alignment` (L-vlalign only, not L-mse/L-cst)
    "ema": 0.0, "grad_clip": 0.0,   # main: neither exists there
    "eval_every": 1,                # main: tests every epoch; the mean of the last 5 is reported (log_avg.txt)
}
RECIPES = {
    "none": {},
    # Their main run: ID classes, teacher CLIP ViT-L/14 (main:89 `--clip-model` default ViT-L/14).
    "li-main": LI_COMMON | {
        "train_split": "id_train.txt", "val_split": "id_test.txt", "classes": "id_classes.txt",  # prepare.py
        "ood_split": "ood_test.txt",  # --protocol li: their train / val_on_train / val folders
        "epochs": 90,               # ex:1 `--epochs 90`
        "lr": 0.05,                 # ex:2 `--lr 0.05` at batch 128
        "schedule": "step", "milestones": "30,60", "gamma": 0.1,  # ex:2 `--schedule 30 60 --gamma 0.1`
    },
    # Their 5-shot finetune of a li-main student (ex:8-14): ID + OOD class texts, the shots in half of every batch
    # (custom_data_loader.py FewShotSampler), the same losses.
    "li-5shot": LI_COMMON | {
        "train_split": "li_train.txt", "val_split": "id_test.txt", "classes": "classes.txt",
        "ood_split": "li_ood_test.txt", "ood_half_batch": True,
        "epochs": 20,               # ex:8 `--epochs 20`
        "lr": 1e-3,                 # ex:9 `--lr 0.001`
        "schedule": "onecycle",     # ex:9 `--onecyclelr`: OneCycleLR(max_lr=lr, steps_per_epoch=1, epochs=20)
    },
    # VLM-KD on ImageNet-LT (Zhang et al. 2024) publishes few settings: these are the ResNet-50 ImageNet-LT settings
    # of Kang et al. 2020 (github.com/facebookresearch/classifier-balancing, config/ImageNet_LT/feat_uniform.yaml),
    # the text term at this project's defaults.
    "vlmkd-imagenet-lt": {
        "train_split": "train.txt", "val_split": "val.txt", "classes": "classes.txt",  # prepare.py imagenet-lt
        "arch": "resnet50",         # VLM-KD's ImageNet-LT student
        "res": 224, "max_res": 256, "min_scale": 0.08, "crop_ratio": 0.875,  # the standard ImageNet 224-px crops
        "batch_size": 128,          # x 4 processes = feat_uniform.yaml batch_size 512
        "optimizer": "sgd", "nesterov": False,  # feat_uniform.yaml optim_params: momentum 0.9, plain SGD
        "lr": 0.05,                 # feat_uniform.yaml lr 0.2 at batch 512 = 0.05 at 128 (scaled linearly)
        "weight_decay": 5e-4,       # feat_uniform.yaml weight_decay 0.0005
        "decay_all": True,          # feat_uniform.yaml: optim_params cover every parameter
        "schedule": "cosine", "warmup_epochs": 0.0,  # feat_uniform.yaml coslr true, endlr 0.0, no warmup
        "epochs": 90,               # feat_uniform.yaml num_epochs 90
        "repeat_epochs": 1, "ema": 0.0, "grad_clip": 0.0, "label_smoothing": 0.0, "head": "linear",
        "loss": "la", "tau_la": 1.0,  # logit adjustment (Menon et al. 2021): our choice of long-tail loss
        "text_weight": 1.0, "text_temp": 0.07, "learn_temp": False, "mask_same_class": False,  # our defaults
        "embed_dim": 256, "adaptor_hidden": 512,  # our defaults (VLM-KD does not publish its adaptor)
        "eval_every": 1,
    },
}
RECIPES["li-main-x5"] = RECIPES["li-main"] | {"repeat_epochs": 5}    # their README: 5 for Flowers, Cars, Birds
RECIPES["li-5shot-x5"] = RECIPES["li-5shot"] | {"repeat_epochs": 5}
# What a recipe cannot run without (checked before any work), and the teacher it was published with.
RECIPE_NEEDS = {"li-main": ("class_text", "teacher_images"), "li-5shot": ("class_text", "teacher_images", "init"),
                "vlmkd-imagenet-lt": ("text",)}
LI_TEACHER = "clip-vit-large-patch14"  # main:89 ViT-L/14, at 224 px (main: clip_preprocess Resize / CenterCrop 224)
LI_TEMPLATE = "a photo of {name} . {description}"  # main: "a photo of " + name + " . " + chatgpt description


def recipe_defaults(namespace):
    return RECIPES[namespace.recipe]


def recipe_record(cfg):
    """The recipe's values that a flag overrode: {field: {"recipe": value, "used": value}}."""
    return {k: {"recipe": v, "used": getattr(cfg, k)} for k, v in RECIPES[cfg.recipe].items() if getattr(cfg, k) != v}


# --- model code shared with eval.py: byte-identical copies of tests/shared_models.py (tests/test_shared.py)

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


def build_timm(name, res):
    """A timm model from scratch without its classifier: its output is the pooled pre-logits."""
    import timm
    if not timm.is_model(name):
        die(f"unknown --arch timm:{name}; `python -c 'import timm; print(timm.list_models())'` lists them")
    try:  # ViT-like models are built for the training resolution; others take no img_size
        net, kwargs = timm.create_model(name, pretrained=False, num_classes=0, img_size=res), {"img_size": res}
    except TypeError:
        net, kwargs = timm.create_model(name, pretrained=False, num_classes=0), {}
    net.classifier_name, net.constructor_kwargs = net.pretrained_cfg.get("classifier", "head"), kwargs
    return net, getattr(net, "head_hidden_size", None) or net.num_features


def build_backbone(arch, res):
    """(module mapping images to features, feature width). torchvision models lose their last Linear, whose name
    (`classifier_name`) and constructor arguments (`constructor_kwargs`) the export needs to put it back."""
    if arch in CIFAR_ARCHS:
        return CifarResNet(CIFAR_ARCHS[arch]), 64
    if arch.startswith("timm:"):
        return build_timm(arch.removeprefix("timm:"), res)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        known = sorted(CIFAR_ARCHS) + sorted(torchvision.models.list_models(module=torchvision.models))
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


class Model(nn.Module):
    """Everything trained, in one module so DDP sees every parameter in one forward."""

    def __init__(self, student, text_head):
        super().__init__()
        self.student, self.text_head = student, text_head

    def forward(self, images, text_feats=None):
        feats, logits, clip_emb = self.student(images)
        img_emb = txt_emb = None
        if self.text_head is not None:
            img_emb = self.text_head.proj(feats)
            txt_emb = self.text_head.adaptor(text_feats)
        return logits, clip_emb, img_emb, txt_emb


# --- losses (pure functions)

def masked_mean(values, valid=None):
    """Mean over the rows where `valid` (all rows when None); 0 when no row is valid."""
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp(min=1)


def prior_adjusted_ce(logits, labels, log_prior, tau=1.0, label_smoothing=0.0):
    """Logit-adjusted CE (Menon et al.): CE(logits + tau * log prior). tau=1 is the balanced softmax."""
    return F.cross_entropy(logits.float() + tau * log_prior, labels, label_smoothing=label_smoothing)


def info_nce(img_emb, txt_emb, logit_scale, labels=None, mask_same_class=False, valid=None):
    """Symmetric InfoNCE between matching rows. Optionally same-class off-diagonal pairs are not negatives, and
    rows that are not `valid` (no caption) are neither anchors nor negatives: loss 0 and no gradient."""
    img_emb, txt_emb = F.normalize(img_emb.float(), dim=-1), F.normalize(txt_emb.float(), dim=-1)
    logits = logit_scale * img_emb @ txt_emb.T
    keep = torch.ones_like(logits, dtype=torch.bool)
    if mask_same_class:
        keep = labels[:, None] != labels[None, :]
    if valid is not None:
        keep = keep & valid[:, None] & valid[None, :]
    if mask_same_class or valid is not None:  # the diagonal stays: a row alone with its positive costs 0
        logits = logits.masked_fill(~(keep | torch.eye(len(logits), dtype=torch.bool, device=logits.device)), -math.inf)
    target = torch.arange(len(logits), device=logits.device)
    per_row = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    return 0.5 * masked_mean(per_row, valid)


def logit_kd(student_logits, teacher_logits, temp):
    """Hinton KD: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), mean over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temp, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temp, dim=-1)
    return temp ** 2 * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def imitation_loss(student_emb, teacher_emb, kind="mse", logit_scale=1 / 0.07, valid=None):
    """Li et al. (1): match the teacher's image embedding: squared distance of unit vectors, or InfoNCE."""
    if kind == "contrastive":
        return info_nce(student_emb, teacher_emb, logit_scale, valid=valid)
    diff = F.normalize(student_emb.float(), dim=-1) - F.normalize(teacher_emb.float(), dim=-1)
    return masked_mean(diff.pow(2).sum(-1), valid)


def alignment_loss(student_emb, teacher_emb, class_text, tau, labels=None, topk=0, correct_only=False, valid=None):
    """Li et al. (3): KL(teacher || student) over image-to-class-text similarity distributions, optionally over
    the teacher's top-k classes (k capped at the number of classes, as in their code) and only on images the
    teacher gets right."""
    class_text = class_text.float()
    s_logits = F.normalize(student_emb.float(), dim=-1) @ class_text.T / tau
    t_logits = F.normalize(teacher_emb.float(), dim=-1) @ class_text.T / tau
    keep = torch.ones(len(s_logits), device=s_logits.device) if valid is None else valid.float()
    if correct_only:
        keep = keep * (t_logits.argmax(-1) == labels).float()
    if topk:
        top = t_logits.topk(min(topk, class_text.shape[0]), dim=-1).indices
        s_logits, t_logits = s_logits.gather(1, top), t_logits.gather(1, top)
    kl = (F.softmax(t_logits, -1) * (F.log_softmax(t_logits, -1) - F.log_softmax(s_logits, -1))).sum(-1)
    return (kl * keep).sum() / keep.sum().clamp(min=1)


def gather_rows(x):
    """All processes' rows in rank order; only this process's rows carry gradient (the others are copies)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def global_info_nce(b, cfg):
    """The text InfoNCE over every process's batch. Each process holds only its rows' share of the gradient and
    DDP averages over N processes, so the loss is scaled by N for the backward (its value is kept) and the shared
    temperature by 1/N: the step equals one process on the concatenated batch."""
    n = dist.get_world_size()
    img, txt, labels, valid = (None if t is None else gather_rows(t)
                               for t in (b["img_emb"], b["txt_emb"], b["labels"], b["text_valid"]))
    scale = b["logit_scale"] / n + b["logit_scale"].detach() * (1 - 1 / n)
    loss = info_nce(img, txt, scale, labels, cfg.mask_same_class, valid)
    return loss * n - loss.detach() * (n - 1)


def text_term(b, cfg):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not cfg.local_negatives:
        return global_info_nce(b, cfg)
    return info_nce(b["img_emb"], b["txt_emb"], b["logit_scale"], b["labels"], cfg.mask_same_class, b["text_valid"])


@dataclass(frozen=True)
class LossTerm:
    name: str                      # its key in metrics.jsonl and final.pt["losses"]
    weight: str                    # the Config field holding its weight ("" = always 1)
    needs: tuple                   # supervision it needs (attributes of load_supervision's result)
    fn: Callable                   # (batch dict, cfg) -> scalar tensor
    asked: Callable = None         # cfg -> whether the flags ask for it besides its weight (None: always)


# The one list of losses: the forward, the logging and final.pt all read it. A new loss is one line here.
LOSSES = (
    LossTerm("loss_cls", "", (), lambda b, cfg: prior_adjusted_ce(b["logits"], b["labels"], b["log_prior"],
                                                                   b["tau_cls"], cfg.label_smoothing)),
    LossTerm("loss_text", "text_weight", ("text_feats",), text_term),
    LossTerm("loss_kd", "kd_weight", ("teacher",),
             lambda b, cfg: logit_kd(b["logits"], b["teacher_logits"], cfg.kd_temp)),
    LossTerm("loss_imitate", "imitate_weight", ("teacher_images",),
             lambda b, cfg: imitation_loss(b["clip_emb"], b["teacher_emb"], "mse", 1 / cfg.tau, b["teacher_valid"]),
             lambda cfg: "mse" in imitate_kinds(cfg)),
    LossTerm("loss_imitate_cst", "imitate_weight", ("teacher_images",),
             lambda b, cfg: imitation_loss(b["clip_emb"], b["teacher_emb"], "contrastive", 1 / cfg.tau,
                                           b["teacher_valid"]),
             lambda cfg: "contrastive" in imitate_kinds(cfg)),
    LossTerm("loss_align", "align_weight", ("teacher_images", "class_text"),
             lambda b, cfg: alignment_loss(b["clip_emb"], b["teacher_emb"], b["class_text"], cfg.tau, b["labels"],
                                           cfg.align_topk, cfg.align_correct_only, b["teacher_valid"])),
)


def weight_of(term, cfg):
    return getattr(cfg, term.weight) if term.weight else 1.0


def imitate_kinds(cfg):
    return [k.strip() for k in cfg.imitate_loss.split(",") if k.strip()]


def active_losses(cfg, sup):
    """The terms whose supervision is given, that the flags ask for and whose weight is not 0."""
    return [t for t in LOSSES if weight_of(t, cfg) > 0 and all(getattr(sup, n) is not None for n in t.needs)
            and (t.asked is None or t.asked(cfg))]


# --- data

class SplitImages:
    """(RGB image, label, row index) per split line, for ffcv's DatasetWriter (beton_for leaves unreadable ones out)."""

    def __init__(self, root, items, max_res):
        self.root, self.items, self.max_res = Path(root), items, max_res

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        image = rgb_image(Image.open(self.root / path))
        if max(image.size) > self.max_res:  # store at most max_res on the long side
            image.thumbnail((self.max_res, self.max_res))
        return image, label, i


def decode_error(path):
    """None if the image decodes completely, else why not. verify() reads headers only: a JPEG cut off after its
    header passes it and then kills ffcv's writer, so every pixel is decoded here."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]
    return None


def write_beton(tmp, dataset, indices, max_res):
    """ffcv's DatasetWriter, except that a worker that dies (disk full, an image changed since the check) stops
    the write with an error: ffcv's parent process would wait for its samples, or its allocations, forever."""
    import multiprocessing
    import multiprocessing.queues
    import queue

    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    parent, workers = os.getpid(), []

    def fail_if_a_worker_died():
        dead = [p.exitcode for p in workers if p.exitcode not in (None, 0)] if os.getpid() == parent else []
        if dead:
            for p in workers:
                p.kill()
            raise RuntimeError(f"an ffcv writer worker died (exit code {dead[0]}; its error is printed above)")

    class WatchedProcess(ffcv.writer.Process):
        def start(self):
            workers.append(self)
            super().start()

    class WatchedQueue(multiprocessing.queues.Queue):
        def __init__(self):
            super().__init__(0, ctx=multiprocessing.get_context())

        def get(self, block=True, timeout=None):
            while True:
                try:
                    return super().get(timeout=1.0)
                except queue.Empty:
                    fail_if_a_worker_died()

    def sleep_or_fail(seconds):
        fail_if_a_worker_died()
        time.sleep(seconds)

    def bar(total):  # ffcv's own tqdm redraws with '\r': a job log would get one endless line
        return progress_bar(total, "img", desc=f"caching {tmp.name.split('.')[0]}.beton")

    fields = {"image": RGBImageField(write_mode="smart", max_resolution=max_res, smart_threshold=64 * 64 * 3),
              "label": IntField(), "index": IntField()}
    writer = ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=max(1, os.cpu_count() or 1))
    saved = ffcv.writer.Process, ffcv.writer.sleep, ffcv.writer.Queue, ffcv.writer.tqdm
    ffcv.writer.Process, ffcv.writer.sleep, ffcv.writer.Queue, ffcv.writer.tqdm = (WatchedProcess, sleep_or_fail,
                                                                                   WatchedQueue, bar)
    try:
        writer.from_indexed_dataset(dataset, indices=indices, chunksize=64)
    except BaseException:
        if getattr(writer, "metadata_sm", None) is not None:  # else the resource tracker warns after our error
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        raise
    finally:
        ffcv.writer.Process, ffcv.writer.sleep, ffcv.writer.Queue, ffcv.writer.tqdm = saved


def remove_stale_tmp(folder):
    """Leftovers of a killed write: `<name>.<pid>.tmp` whose process is gone."""
    for tmp in folder.glob("*.tmp"):
        pid = tmp.suffixes[-2].lstrip(".") if len(tmp.suffixes) >= 2 else ""
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            tmp.unlink(missing_ok=True)


def image_stats(root, items):
    """sha256 of every image's (size, mtime, ctime, inode): one stat per file and no pixel read, yet a repaired,
    replaced or renamed-over image changes it (a replacement through a rename is a new inode, even within one mtime
    tick)."""
    digest = hashlib.sha256()
    for rel, _ in items:
        try:
            st = os.stat(root / rel)
            digest.update(f"{st.st_size},{st.st_mtime_ns},{st.st_ctime_ns},{st.st_ino}\n".encode())
        except OSError:
            digest.update(b"missing\n")
    return digest.hexdigest()


def beton_for(cfg, split, accelerator):
    """Write the split's .beton once, cached under a key of split contents, its images' stats and settings; reuse
    it after."""
    split_path = Path(cfg.data) / split
    images = image_stats(Path(cfg.data), read_split(split_path))
    key = hashlib.sha256(split_path.read_bytes() + f"|{images}|{cfg.max_res}|smart64".encode()).hexdigest()[:16]
    path = Path(cfg.data) / ".ffcv" / f"{split_path.stem}-{key}.beton"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not path.exists():
            path.parent.mkdir(exist_ok=True)
            remove_stale_tmp(path.parent)
            items = read_split(split_path)
            # Threads: at ImageNet scale a serial pass over every file is minutes of start-up.
            with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
                errors = list(progress_bar(len(items), "img", desc=f"checking {split_path.name}", iterable=pool.map(
                    decode_error, [Path(cfg.data) / rel for rel, _ in items], chunksize=256)))
            good = [i for i, e in enumerate(errors) if e is None]
            if not good:  # a wrong or emptied --data, not N bad images: nothing is recorded or cached
                die(f"none of the {len(items)} images of {split_path} can be read (first: {items[0][0]}: "
                    f"{errors[0]}); is --data {cfg.data} the folder prepare.py wrote?")
            # Recorded and skipped; the row index keeps text rows aligned.
            bad = [{"index": i, "path": items[i][0], "error": e} for i, e in enumerate(errors) if e is not None]
            if bad:
                (path.with_suffix(".errors.jsonl")).write_text("".join(json.dumps(b) + "\n" for b in bad))
                print(f"train.py: {len(bad)} unreadable images in {split_path} skipped, "
                      f"listed in {path.with_suffix('.errors.jsonl')}")
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
            failure = None
            try:
                write_beton(tmp, SplitImages(cfg.data, items, cfg.max_res), good, cfg.max_res)
            except (RuntimeError, OSError) as e:
                failure = str(e).splitlines()[0]
            if failure:  # outside the except: ffcv's progress bar is gone before the error line
                tmp.unlink(missing_ok=True)
                die(f"writing the training cache {path} failed: {failure}")
            os.replace(tmp, path)  # a half-written cache is never picked up
    return path


def make_seeded_rrc():
    """ffcv's RandomResizedCrop decoder with each crop drawn from a seed of (batch order, sample), so
    a resumed run sees exactly the crops of an uninterrupted one, whatever the thread count."""
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
        def generate_code(self):
            jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            scale, ratio = np.array(self.scale), np.array(self.ratio)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                first = batch_indices[0]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    np.random.seed((first * 1000003 + source_ix) % 2147483647)
                    field_ = metadata[source_ix]
                    image_data = mem_read(field_["data_ptr"], storage_state)
                    height, width = np.uint32(field_["height"]), np.uint32(field_["width"])
                    if field_["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCrop


def crop_ratio(cfg):
    return cfg.crop_ratio if cfg.crop_ratio > 0 else (1.0 if cfg.res <= 64 else 0.875)


def ood_half_order(cfg, accelerator):
    """An ffcv traversal order for Li et al.'s few-shot finetune: each batch of B is B // 2 images of the OOD classes
    (labels from the first after id_classes.txt), drawn afresh each batch (without repeats while there are enough),
    and B - B // 2 of the others, each of those once an epoch (this process's share of a seeded permutation)."""
    from ffcv.traversal_order.base import TraversalOrder
    first_ood = len(read_classes(Path(cfg.data) / "id_classes.txt"))
    rank, world, half = accelerator.process_index, accelerator.num_processes, cfg.batch_size // 2

    class HalfOOD(TraversalOrder):
        def __init__(self):  # bound to its loader by __call__: ffcv calls the order it is given with the loader
            pass

        def __call__(self, loader):
            super().__init__(loader)
            labels = loader.reader.metadata[f"f{loader.reader.field_names.index('label')}"][self.indices]
            self.ood, self.others = self.indices[labels >= first_ood], self.indices[labels < first_ood]
            if not len(self.ood) or len(self.others) < world * (cfg.batch_size - half):
                die(f"--ood-half-batch: {cfg.train_split} has {len(self.ood)} images of the classes after "
                    f"id_classes.txt and {len(self.others)} others; it needs some of each (a batch's worth of others)")
            return self

        def sample_order(self, epoch):
            shared = np.random.default_rng([cfg.seed, epoch])  # one permutation, split between the processes
            own = np.random.default_rng([cfg.seed, epoch, rank])
            others = shared.permutation(self.others)[rank::world]
            order = []
            for b in range(len(others) // (cfg.batch_size - half)):
                shots = own.choice(self.ood, half, replace=len(self.ood) < half)
                order.append(own.permutation(np.concatenate(
                    [shots, others[b * (cfg.batch_size - half):(b + 1) * (cfg.batch_size - half)]])))
            return np.concatenate(order) if order else np.zeros(0, self.indices.dtype)

    return HalfOOD()


def make_loader(cfg, beton, train, accelerator):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
    device = accelerator.device
    if train:
        min_scale = cfg.min_scale if cfg.min_scale > 0 else (0.35 if cfg.res <= 64 else 0.08)
        decoder = make_seeded_rrc()((cfg.res, cfg.res), scale=(min_scale, 1.0))
    else:
        decoder = CenterCropRGBImageDecoder((cfg.res, cfg.res), ratio=crop_ratio(cfg))
    # Flip and normalisation happen on the device (seeded there), so the loader only decodes and copies.
    image_pipe = [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    int_pipes = [[IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)] for _ in range(2)]
    # ffcv also sets torch's CPU thread count to its worker count: on a CPU-only run, leave half the cores to compute.
    cores = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    workers = cfg.workers if cfg.workers > 0 else (cores if device.type == "cuda" else max(1, cores // 2))
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    if train and cfg.ood_half_batch:
        order = ood_half_order(cfg, accelerator)
    return Loader(str(beton), batch_size=cfg.batch_size, num_workers=workers, order=order, drop_last=train,
                  seed=cfg.seed, distributed=accelerator.num_processes > 1,
                  pipelines={"image": image_pipe, "label": int_pipes[0], "index": int_pipes[1]})


def load_data(cfg):
    """Class names, both splits (every line checked before any work) and the training prior."""
    root = Path(cfg.data)
    class_names = read_classes(root / cfg.classes)
    num_classes = len(class_names)
    train_items = read_split(root / cfg.train_split, num_classes)
    val_items = read_split(root / cfg.val_split, num_classes)
    class_counts = np.bincount([y for _, y in train_items], minlength=num_classes)
    if (class_counts == 0).any() and cfg.loss != "ce":
        die(f"{root / cfg.train_split}: classes {np.flatnonzero(class_counts == 0)[:5].tolist()} have no images; "
            f"--loss {cfg.loss} needs every class (use --classes id_classes.txt for OOD sets)")
    log_prior = torch.log(torch.as_tensor(class_counts.clip(min=1) / class_counts.sum(), dtype=torch.float32))
    return SimpleNamespace(class_names=class_names, num_classes=num_classes, train_items=train_items,
                           val_items=val_items, class_counts=class_counts, log_prior=log_prior,
                           train_path=root / cfg.train_split, classes_path=root / cfg.classes,
                           train_sha256=sha256_file(root / cfg.train_split))


# --- supervision

def per_image_artifact(path, kind, data):
    """An encode.py array of this training split (sidecar verified, rows finite) and its rows to leave out."""
    array, sidecar = load_artifact(path, kind)
    split_sha = data.train_sha256
    if array.shape[0] != len(data.train_items) or sidecar.get("split_sha256") != split_sha:
        same = "matches" if sidecar.get("split_sha256") == split_sha else "differs"
        die(f"{path} was made from another split than {data.train_path} (rows {array.shape[0]} vs "
            f"{len(data.train_items)}, split_sha256 {same}): re-run encode.py on this split")
    missing = sidecar.get("missing_rows") or []
    if not all(isinstance(r, int) and 0 <= r < array.shape[0] for r in missing):
        die(f"{Path(path).with_suffix('.json')}: missing_rows must be row numbers below {array.shape[0]}")
    return array, sidecar, missing


def valid_rows(num_rows, missing, device):
    """True for rows with supervision; None when every row has it (the loss then needs no mask)."""
    if not missing:
        return None
    valid = torch.ones(num_rows, dtype=torch.bool)
    valid[missing] = False
    return valid.to(device)


def rows_to_device(array, slots, device, chunk=65536):
    """array[:, slots] ([N, P, D] memmap) or the whole [N, D] array as an fp16 device tensor, read one slot and one
    block of rows at a time: the host never holds a full copy, and slots not trained on are never read."""
    if slots is None:
        result = torch.empty(array.shape, dtype=torch.float16, device=device)
        for start in range(0, array.shape[0], chunk):
            result[start:start + chunk] = torch.from_numpy(np.asarray(array[start:start + chunk], dtype=np.float16))
        return result
    result = torch.empty((array.shape[0], len(slots), array.shape[2]), dtype=torch.float16, device=device)
    for k, slot in enumerate(slots):
        for start in range(0, array.shape[0], chunk):
            block = np.ascontiguousarray(array[start:start + chunk, slot], dtype=np.float16)
            result[start:start + chunk, k] = torch.from_numpy(block)
    return result


def load_text(cfg, data, device):
    """VLM caption features of the chosen prompt slots, by the ids the (sha256-bound) sidecar lists."""
    array, sidecar, missing = per_image_artifact(cfg.text, "text", data)
    slot_ids = [str(p) for p in sidecar.get("prompts") or []]
    if len(slot_ids) != array.shape[1]:
        die(f"{Path(cfg.text).with_suffix('.json')}: prompts lists {len(slot_ids)} ids for {array.shape[1]} slots")
    wanted = [p.strip() for p in cfg.prompts.split(",") if p.strip()] or slot_ids
    unknown = [p for p in wanted if p not in slot_ids]
    if unknown:
        die(f"--prompts {','.join(unknown)} not in {cfg.text} (its prompts: {','.join(slot_ids)})")
    feats = rows_to_device(array, [slot_ids.index(p) for p in wanted], device)
    return feats, valid_rows(len(feats), missing, device), sidecar, wanted


def load_class_text(cfg, data):
    """The training classes' rows of classes.npy, checked by name (ID/OOD sets list the ID classes first)."""
    array, sidecar = load_artifact(cfg.class_text, "classes")
    names = sidecar.get("names")
    if not isinstance(names, list) or names[:data.num_classes] != data.class_names:
        die(f"{cfg.class_text}: its classes ({Path(cfg.class_text).with_suffix('.json').name} names) do not start "
            f"with the {data.num_classes} classes of {data.classes_path}")
    return torch.from_numpy(np.asarray(array[:data.num_classes], dtype=np.float32)), sidecar


def read_final(path, flag):
    """An earlier run's final.pt (plain tensors only); a torn or foreign file is one line naming the flag."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != "vlmkd-final-1":
            raise ValueError(f"format {ckpt.get('format')!r}, not vlmkd-final-1")
    except Exception as e:
        die(f"{flag} {path} cannot be loaded as a final.pt ({str(e).splitlines()[0][:200]})")
    return ckpt


def load_teacher(cfg, data, device):
    """A frozen earlier student for logit KD."""
    ckpt = read_final(cfg.teacher, "--teacher")
    if ckpt.get("classes") != data.class_names:
        die(f"--teacher {cfg.teacher} was trained on other classes than {data.classes_path}")
    teacher = Student(ckpt["arch"], ckpt["num_classes"], ckpt["preprocess"]["res"], ckpt["head"],
                      ckpt["model"].get("clip_proj.weight", torch.empty(0, 0)).shape[0], ckpt.get("class_text"),
                      ckpt.get("tau", 0.07))
    teacher.load_state_dict(ckpt["model"])
    return teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


def load_supervision(cfg, data, device):
    """Every optional input, verified against this split and its classes before any work is spent.
    `identity` holds a sha256 per input: a resume must see the same ones."""
    sup = SimpleNamespace(text_feats=None, text_valid=None, text_meta={}, prompts=[], class_text=None, teacher=None,
                          teacher_images=None, teacher_valid=None, ood=None, made_with={})
    sup.identity = {"train_split": data.train_sha256,
                    "val_split": sha256_file(Path(cfg.data) / cfg.val_split),
                    "classes": sha256_file(data.classes_path)}
    if cfg.text and cfg.text_weight > 0:
        sup.text_feats, sup.text_valid, sup.text_meta, sup.prompts = load_text(cfg, data, device)
        sup.identity["text"] = sup.text_meta["sha256"]
    if cfg.class_text:
        sup.class_text, meta = load_class_text(cfg, data)
        sup.identity["class_text"] = meta["sha256"]
        sup.made_with["template"] = meta.get("template")
    if cfg.head == "cosine" and sup.class_text is None:
        die("--head cosine needs --class-text classes.npy (encode.py --classes)")
    if cfg.teacher_images:
        array, meta, missing = per_image_artifact(cfg.teacher_images, "images", data)
        if sup.class_text is not None and sup.class_text.shape[1] != array.shape[1]:
            die(f"--class-text width {sup.class_text.shape[1]} != --teacher-images width {array.shape[1]}: "
                f"use one CLIP model for both")
        sup.teacher_images = rows_to_device(array, None, device)
        sup.teacher_valid = valid_rows(len(array), missing, device)
        sup.identity["teacher_images"] = meta["sha256"]
        sup.made_with["teacher"] = f"{meta.get('encoder')} {meta.get('encoder_path')}"
    if cfg.teacher and cfg.kd_weight > 0:
        sup.teacher = load_teacher(cfg, data, device)
        sup.identity["teacher"] = sha256_file(cfg.teacher)
    if cfg.init:
        if not Path(cfg.init).is_file():
            die(f"--init {cfg.init} not found")
        sup.identity["init"] = sha256_file(cfg.init)
    if cfg.ood_split:
        sup.ood = load_ood(cfg, data)
        sup.identity["ood_split"] = sup.ood.sha256
    check_recipe_inputs(cfg, sup)
    return sup


def load_ood(cfg, data):
    """--ood-split and the class texts of its classes: the rows of --class-text after id_classes.txt (after the
    training classes without that file)."""
    if not cfg.class_text or (cfg.head != "cosine" and not cfg.teacher_images):
        die("--ood-split scores through clip_proj and the class texts: it needs --class-text and --head cosine or "
            "--teacher-images")
    array, sidecar = load_artifact(cfg.class_text, "classes")
    names, id_path = sidecar.get("names") or [], Path(cfg.data) / "id_classes.txt"
    first = data.num_classes
    if id_path.is_file():
        id_names = read_classes(id_path)
        if names[:len(id_names)] != id_names:
            die(f"{cfg.class_text}: its classes do not start with the {len(id_names)} classes of {id_path}")
        first = len(id_names)
    if len(names) <= first:
        die(f"{cfg.class_text} has no class after the {first} ID classes: --ood-split has nothing to be scored on")
    path = Path(cfg.data) / cfg.ood_split
    items = read_split(path, len(names))
    n, label = next(((n, y) for n, (_, y) in enumerate(items, 1) if y < first), (0, 0))
    if n:
        die(f"{path}:{n}: label {label} is an ID class: --ood-split holds images of the {len(names) - first} classes "
            f"after the first {first}")
    return SimpleNamespace(text=torch.from_numpy(np.asarray(array[first:], dtype=np.float32)), first=first,
                           sha256=sha256_file(path))


def check_recipe_inputs(cfg, sup):
    """Warnings (rank 0) where a Li et al. recipe's inputs differ from the published ones."""
    if cfg.recipe.startswith("li-") and os.environ.get("RANK", "0") == "0":
        teacher, template = sup.made_with.get("teacher", ""), sup.made_with.get("template")
        if LI_TEACHER not in teacher.lower():
            warn(f"--recipe {cfg.recipe}: Li et al.'s teacher is CLIP ViT-L/14 at 224 px (openai/{LI_TEACHER}); "
                 f"--teacher-images was made with {teacher.split()[0]}")
        if template is not None and template != LI_TEMPLATE:
            warn(f"--recipe {cfg.recipe}: Li et al.'s class text is {LI_TEMPLATE!r}; --class-text was made with "
                 f"{template!r} (encode.py --template)")


# --- evaluation

def group_accuracy(preds, labels, class_counts):
    """Top-1 overall and over OLTR's many / medium / few classes (None for a group with no image here)."""
    groups = np.array([class_group(int(c)) for c in class_counts])[labels.numpy()]
    correct = (preds == labels).float()
    result = {"top1": correct.mean().item()}
    for name in GROUPS:
        mask = torch.from_numpy(groups == name)
        result[name] = correct[mask].mean().item() if mask.any() else None
    return result


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pixel_mean_std(device):
    """ImageNet statistics on the 0-255 scale of ffcv's uint8 batches, shaped to broadcast over NCHW."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(images, mean, std):
    return (images.float() - mean) / std


def mean_class_accuracy(preds, labels):
    """Mean over the classes with images of each class's top-1 (Li et al.'s metric)."""
    right = (preds == labels).float()
    return float(np.mean([right[labels == c].mean().item() for c in torch.unique(labels)]))


@torch.no_grad()
def predictions(model, loader, accelerator, score):
    """(predictions, labels) of every row of the loader once; `score` maps the student's outputs to class scores."""
    model.eval()
    mean, std = pixel_mean_std(accelerator.device)
    preds, labels, indices = [], [], []
    for images, y, idx in loader:
        with accelerator.autocast():
            preds.append(score(model.student(normalize(images, mean, std))).argmax(-1))
        labels.append(y.clone())  # ffcv reuses its buffers: keep copies
        indices.append(idx.clone())
    preds, labels, indices = (accelerator.gather(torch.cat(t)).cpu() for t in (preds, labels, indices))
    # ffcv's distributed sampler pads with repeats: count each row once.
    indices, first = np.unique(indices.numpy(), return_index=True)
    model.train()
    return preds[first], labels[first]


def evaluate(model, loader, accelerator, class_counts):
    preds, labels = predictions(model, loader, accelerator, lambda out: out[1])
    return group_accuracy(preds, labels, class_counts) | {"mean_class": mean_class_accuracy(preds, labels)}


def evaluate_ood(model, loader, accelerator, ood):
    """--ood-split scored within the OOD classes: clip_proj against their class texts (Li et al.'s OOD number)."""
    text = ood.text.to(accelerator.device)
    preds, labels = predictions(model, loader, accelerator,
                                lambda out: F.normalize(out[2].float(), dim=-1) @ text.T)
    preds = preds + ood.first
    return {"top1": (preds == labels).float().mean().item(), "mean_class": mean_class_accuracy(preds, labels)}


# --- training

def load_fitting(module, weights):
    """Load `weights` into `module` when every tensor is there with its shape; True if it did."""
    own = module.state_dict()
    if set(own) != set(weights) or any(own[k].shape != weights[k].shape for k in own):
        return False
    module.load_state_dict(weights)
    return True


def init_from(model, cfg, sup):
    """--init: the whole model of an earlier final.pt (same --arch) where shapes fit: backbone (it must), clip_proj,
    the linear head and the text head; the rest starts fresh. A cosine head keeps its class texts: the final.pt's
    classes must come first in this run's. Returns the one line that says what was loaded and what started fresh."""
    ckpt = read_final(cfg.init, "--init")
    if ckpt["arch"] != cfg.arch:
        die(f"--init {cfg.init} is a {ckpt['arch']}, not --arch {cfg.arch}")
    student, source = model.student, ckpt["model"]
    weights = {k.removeprefix("backbone."): v for k, v in source.items() if k.startswith("backbone.")}
    try:
        student.backbone.load_state_dict(weights)
    except RuntimeError as e:
        die(f"--init {cfg.init}: its backbone does not fit --arch {cfg.arch} ({str(e).splitlines()[0][:200]})")
    loaded, fresh = ["backbone"], []
    for name in ("clip_proj", "head"):
        part = getattr(student, name)
        if part is None:
            continue
        given = {k.removeprefix(f"{name}."): v for k, v in source.items() if k.startswith(f"{name}.")}
        (loaded if given and load_fitting(part, given) else fresh).append(name)
    head = ckpt.get("text_head")
    if model.text_head is not None:
        fits = head is not None and load_fitting(model.text_head.proj, head["proj"]) and \
            load_fitting(model.text_head.adaptor, head["adaptor"])
        if fits:
            model.text_head.log_scale.data.fill_(math.log(head["logit_scale"]))
        (loaded if fits else fresh).append("text head")
    here = len(sup.class_text) if cfg.head == "cosine" else student.head.out_features
    line = (f"--init {cfg.init}: loaded {', '.join(loaded)}; started fresh: {', '.join(fresh) or 'nothing'}; "
            f"{ckpt['num_classes']} classes there, {here} here")
    old = ckpt.get("class_text")
    if cfg.head == "cosine" and old is not None:
        new = sup.class_text
        if old.shape[1] != new.shape[1] or len(old) > len(new) or not torch.allclose(
                old.float(), new[:len(old)].float(), atol=1e-2):
            die(f"--init {cfg.init} classified over other class texts than the first rows of --class-text "
                f"{cfg.class_text}: use the classes.npy it was trained with (its classes first)")
        line += f" (text classifier: its {len(old)} class texts kept" + (
            f", {here - len(old)} added)" if here > len(old) else ")")
    return line


def build_model(cfg, data, sup, device):
    """(the Model on the device, the --init line or '')."""
    torch.manual_seed(cfg.seed)
    clip_dim = sup.class_text.shape[1] if cfg.head == "cosine" else 0
    clip_dim = sup.teacher_images.shape[1] if sup.teacher_images is not None else clip_dim
    student = Student(cfg.arch, data.num_classes, cfg.res, cfg.head, clip_dim, sup.class_text, cfg.tau)
    text_head = None
    if sup.text_feats is not None:
        text_head = TextHead(student.feat_dim, sup.text_feats.shape[-1], cfg.embed_dim, cfg.adaptor_hidden,
                             cfg.text_temp, cfg.learn_temp)
    model = Model(student, text_head)
    note = init_from(model, cfg, sup) if cfg.init else ""
    return model.to(device, memory_format=torch.channels_last), note


def warmup_cosine(warmup, total):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def warmup_step(warmup, steps_per_epoch, milestones, gamma):
    """x gamma from the first step of each milestone epoch on (Li et al. lower it as an epoch starts)."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return gamma ** sum(step // steps_per_epoch >= m for m in milestones)
    return factor


class EveryEpoch:
    """Steps a scheduler as each epoch but the last ends: Li et al. step OneCycleLR once an epoch, so epoch e trains
    at its step e."""

    def __init__(self, scheduler, steps_per_epoch, epochs):
        self.scheduler, self.steps_per_epoch, self.epochs, self.steps = scheduler, steps_per_epoch, epochs, 0

    def step(self):
        self.steps += 1
        if self.steps % self.steps_per_epoch == 0 and self.steps < self.epochs * self.steps_per_epoch:
            self.scheduler.step()

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self):
        return {"steps": self.steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.steps = state["steps"]
        self.scheduler.load_state_dict(state["scheduler"])


def milestones_of(cfg):
    return [int(m) for m in cfg.milestones.split(",") if m.strip()]


def make_optimizer(cfg, model, num_processes, steps_per_epoch):
    """SGD or AdamW, no decay on biases, norms (unless --decay-all) and the temperature; --schedule per step (cosine,
    step, after a linear warmup) or per epoch (onecycle)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    temp = [p for n, p in named if n.endswith("log_scale")]
    decayed = [p for n, p in named if (p.ndim > 1 or cfg.decay_all) and not n.endswith("log_scale")]
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if not (p.ndim > 1 or cfg.decay_all) and not n.endswith("log_scale")],
               "weight_decay": 0.0}]
    if temp:  # its own lr: at the backbone's SGD lr the temperature collapses
        groups.append({"params": temp, "weight_decay": 0.0, "lr": cfg.temp_lr})
    groups = [g for g in groups if g["params"]]
    lr = cfg.lr * cfg.batch_size * num_processes / 128
    for g in groups:
        g.setdefault("lr", lr)
    optimizer = (torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=cfg.nesterov) if cfg.optimizer == "sgd"
                 else torch.optim.AdamW(groups, lr=lr))
    if cfg.schedule == "onecycle":
        one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                        total_steps=max(2, cfg.epochs))
        return optimizer, EveryEpoch(one_cycle, steps_per_epoch, cfg.epochs)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    factor = warmup_cosine(warmup, total) if cfg.schedule == "cosine" else \
        warmup_step(warmup, steps_per_epoch, milestones_of(cfg), cfg.gamma)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unwrap(accelerator, model):
    core = accelerator.unwrap_model(model)
    return getattr(core, "_orig_mod", core)


def make_train_step(cfg, accelerator, model, optimizer, scheduler, ema, sup, log_prior, losses):
    """The hot path: one optimisation step on a loader batch. Returns [loss, *parts] as one device tensor,
    so the caller decides when to sync. `model` is the prepared (DDP / compiled) Model."""
    device = accelerator.device
    core = unwrap(accelerator, model)
    mean, std = pixel_mean_std(device)
    log_prior = log_prior.to(device)
    tau_cls = {"ce": 0.0, "la": cfg.tau_la, "bs": 1.0}[cfg.loss]
    weights = [weight_of(t, cfg) for t in losses]
    live = list(core.student.state_dict().values())  # aliases of the parameters and buffers, updated in place

    def rows(mask, indices):
        return None if mask is None else mask[indices]

    def train_step(images, labels, indices, gen):
        flip = torch.rand(len(images), device=device, generator=gen) < 0.5
        images = normalize(torch.where(flip[:, None, None, None], images.flip(3), images), mean, std)
        images = images.contiguous(memory_format=torch.channels_last)
        texts = None
        if sup.text_feats is not None:  # one of each image's P captions, sampled every step
            slot = torch.randint(sup.text_feats.shape[1], (len(indices),), device=device, generator=gen)
            texts = sup.text_feats[indices, slot].float()
        with accelerator.autocast():
            logits, clip_emb, img_emb, txt_emb = model(images, texts)
            batch = {"logits": logits, "labels": labels, "log_prior": log_prior, "tau_cls": tau_cls,
                     "clip_emb": clip_emb, "img_emb": img_emb, "txt_emb": txt_emb,
                     "class_text": core.student.class_text,
                     "text_valid": rows(sup.text_valid, indices), "teacher_valid": rows(sup.teacher_valid, indices)}
            if core.text_head is not None:
                batch["logit_scale"] = core.text_head.log_scale.exp()
            if sup.teacher is not None:
                with torch.no_grad():
                    batch["teacher_logits"] = sup.teacher(images)[1]
            if sup.teacher_images is not None:
                batch["teacher_emb"] = sup.teacher_images[indices]
            parts = [term.fn(batch, cfg) for term in losses]
            loss = sum(w * p for w, p in zip(weights, parts))
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, live, cfg.ema)
        return torch.stack([loss.detach().float()] + [p.detach().float() for p in parts])

    return train_step


def update_ema(ema, current, decay):
    """ema <- decay * ema + (1 - decay) * current for float tensors; counters (BN's) are copied."""
    floats = [i for i, t in enumerate(current) if t.is_floating_point()]
    torch._foreach_lerp_([ema[i] for i in floats], [current[i].detach() for i in floats], 1 - decay)
    for i in set(range(len(current))) - set(floats):
        ema[i].copy_(current[i])


def swap_in_ema(core, weights):
    """Load `weights` (a list in state-dict order) into the student and return the weights it had."""
    if weights is None:
        return None
    current = [t.detach().clone() for t in core.student.state_dict().values()]
    for t, w in zip(core.student.state_dict().values(), weights):
        t.copy_(w)
    return current


# --- run folder and checkpoints

def last_good(out):
    ckpt = Path(out) / "ckpt.pt"
    return f"the last good checkpoint is {ckpt} (--resume continues from it)" if ckpt.exists() else \
        "no checkpoint was written"


def require_finite_loss(bad_step, running, losses, out):
    if bad_step.item() >= 0:
        parts = dict(zip(["loss"] + [t.name for t in losses], running.tolist()))
        die(f"non-finite loss at step {bad_step.item()} (running sums {parts}); {last_good(out)}")


def require_finite_weights(core, ema, step, out):
    """No diverged model is ever written: every parameter and buffer (and the EMA) must be finite."""
    named = list(core.state_dict().items()) + [(f"ema[{i}]", t) for i, t in enumerate(ema or [])]
    bad = [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        die(f"training diverged by step {step}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); "
            f"nothing written; {last_good(out)}")


def save_atomic(obj, path, out):
    """torch.save through a temporary file and a rename; a full disk is one line and leaves the old file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:
        tmp.unlink(missing_ok=True)
        die(f"cannot write {path} ({str(e).strip().splitlines()[-1][:200]}); {last_good(out)}")


def read_checkpoint(cfg, out, identity):
    """--resume: ckpt.pt, refused unless made with the same settings and the same inputs (by content)."""
    path = out / "ckpt.pt"
    if not cfg.resume or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        old, inputs = state["config"], state["inputs"]
    except Exception as e:
        die(f"--resume: {path} cannot be read ({str(e).strip().splitlines()[0][:200]}); delete it to start over")
    changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES | INPUT_FIELDS and old.get(k) != v]
    changed += [f"{k} (content)" for k in sorted(set(identity) | set(inputs)) if identity.get(k) != inputs.get(k)]
    if changed:
        die(f"--resume: {path} was made with other {', '.join(changed)}; use the same inputs or another --out")
    return state


def restore(state, model, optimizer, scheduler, cfg, device):
    """(ema, progress) from the checkpoint, or fresh ones."""
    ema = [p.detach().clone() for p in model.student.state_dict().values()] if cfg.ema > 0 else None
    progress = SimpleNamespace(epoch=0, step=0, running=None, last_log=0, val=None)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema = [t.to(device) for t in state["ema"]] if state["ema"] is not None else None
        progress = SimpleNamespace(epoch=state["epoch"] + 1, step=state["step"], running=state["running"],
                                   last_log=state["last_log"], val=None)
    return ema, progress


def start_run_folder(cfg, out, accelerator, state):
    """Script copy, config, versions; metrics.jsonl cut back to the checkpoint's step (a resumed run logs
    exactly the rows of an uninterrupted one), or emptied for a fresh run."""
    if not accelerator.is_main_process:
        return
    if cfg.overwrite:
        clear_run_folder(out)
    shutil.copy(__file__, out / "train.py")
    write_json(out / "config.json", run_config(cfg))
    write_json(out / "versions.json", versions("torch", "torchvision", "accelerate", "timm", "ffcv", "numpy"))
    kept = []
    if state is not None and (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                if json.loads(line)["step"] <= state["step"]:
                    kept.append(line + "\n")
            except (ValueError, KeyError):  # a row torn by the kill
                pass
    tmp = out / f".metrics.jsonl.{os.getpid()}.tmp"
    tmp.write_text("".join(kept))
    os.replace(tmp, out / "metrics.jsonl")
    if cfg.report_to != "none":
        accelerator.init_trackers(Path(out).name, config=asdict(cfg))


def run_config(cfg):
    """Every setting, and the recipe's values that a flag overrode (`recipe_overridden`)."""
    return asdict(cfg) | {"recipe_overridden": recipe_record(cfg)}


def make_logger(out, accelerator):
    def log(row):
        if accelerator.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
    return log


def save_checkpoint(run, epoch, step, running, last_log):
    require_finite_weights(run.core, run.ema, step, run.out)
    if run.accelerator.is_main_process:
        state = {"epoch": epoch, "step": step, "config": asdict(run.cfg), "inputs": run.sup.identity,
                 "model": run.core.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "running": running.cpu(), "last_log": last_log,
                 "ema": [t.cpu() for t in run.ema] if run.ema is not None else None}
        save_atomic(state, run.out / "ckpt.pt", run.out)  # a kill mid-save leaves the last good one


def passes(loader, repeat):
    """The loader's batches, `repeat` times over (one epoch of --repeat-epochs)."""
    for _ in range(repeat):
        yield from loader


def train(run, progress):
    """The epochs: steps (metrics every --log-every), then coverage, validation and ckpt.pt per epoch."""
    cfg, accelerator, core, losses = run.cfg, run.accelerator, run.core, run.losses
    device, log, step = accelerator.device, make_logger(run.out, accelerator), progress.step
    total_steps = cfg.epochs * cfg.repeat_epochs * len(run.train_loader)
    running = torch.zeros(len(losses) + 1, device=device) if progress.running is None else progress.running.to(device)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)
    last_log, last_time, images_seen = progress.last_log, time.perf_counter(), 0
    run.train_loader.next_epoch = progress.epoch * cfg.repeat_epochs  # ffcv seeds pass p's order with seed + p
    bar = progress_bar(total_steps, "step", initial=step, disable=not accelerator.is_main_process)
    try:  # the bar is closed before an error line, which stays the last line
        for epoch in range(progress.epoch, cfg.epochs):
            if cfg.max_steps and step >= cfg.max_steps:  # resumed after --max-steps stopped it: nothing left to do
                break
            gen = torch.Generator(device).manual_seed(cfg.seed * 100_003 + epoch * 1009 + accelerator.process_index)
            row_seen = torch.zeros(len(run.data.train_items), device=device, dtype=torch.int32)
            for images, labels, indices in passes(run.train_loader, cfg.repeat_epochs):
                row_seen.index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))
                values = run.train_step(images, labels, indices, gen)
                with torch.no_grad():  # no host sync here: accumulate on the device, read when logging
                    running += values
                    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(values).all(), step, bad_step)
                step, images_seen = step + 1, images_seen + len(images) * accelerator.num_processes
                bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps or step == cfg.max_steps:
                    require_finite_loss(bad_step, running, losses, run.out)
                    now = time.perf_counter()
                    avg = (running / (step - last_log)).tolist()
                    row = {"step": step, "epoch": epoch, "lr": run.scheduler.get_last_lr()[0], "loss": avg[0]}
                    row |= {t.name: v for t, v in zip(losses, avg[1:])} | {"img_per_s": images_seen / (now - last_time)}
                    if core.text_head is not None:
                        row["text_logit_scale"] = core.text_head.log_scale.exp().item()
                    log(row)
                    # No refresh: off a terminal the bar's lines stay one per 30 s, not one per log row.
                    bar.set_postfix_str(f"{loss_summary(avg, losses, cfg)}, {row['img_per_s']:.0f} img/s",
                                        refresh=False)
                    running.zero_()
                    last_log, last_time, images_seen = step, now, 0
                if step == cfg.max_steps:
                    break
            require_finite_loss(bad_step, running, losses, run.out)
            row_seen = accelerator.reduce(row_seen, "sum")  # a sample seen twice in one epoch means a sharding bug
            log({"epoch": epoch, "step": step, "rows_seen": int((row_seen > 0).sum()),
                 "rows_max_repeat": int(row_seen.max())})
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                trained = swap_in_ema(core, run.ema)
                acc = evaluate(core, run.val_loader, accelerator, run.data.class_counts)
                ood = evaluate_ood(core, run.ood_loader, accelerator, run.sup.ood) if run.ood_loader else {}
                swap_in_ema(core, trained)
                log({"epoch": epoch, "step": step} | {f"val_{k}": v for k, v in acc.items()}
                    | {f"val_ood_{k}": v for k, v in ood.items()})
                progress.val = (epoch, acc["top1"])
                accelerator.print(f"epoch {epoch}: val top-1 {acc['top1']:.4f} (" + " ".join(
                    f"{k} {acc[k]:.3f}" for k in GROUPS if acc[k] is not None) + ")"
                    + (f", OOD mean per class {ood['mean_class']:.4f}" if ood else ""), flush=True)
            save_checkpoint(run, epoch, step, running, last_log)  # after the epoch's rows: a resume re-logs none
            accelerator.wait_for_everyone()
            if step == cfg.max_steps:
                break
    finally:
        bar.close()
    return step


def loss_summary(avg, losses, cfg):
    """The bar's loss: the weighted total and its parts, named as in metrics.jsonl (`total 4.81 = cls 0.36 +
    text 4.45`): a bare total of several terms would read like a classification loss."""
    parts = [f"{'' if weight_of(t, cfg) == 1 else f'{weight_of(t, cfg):g} x '}{t.name.removeprefix('loss_')} {v:.3f}"
             for t, v in zip(losses, avg[1:])]
    if len(parts) == 1 and weight_of(losses[0], cfg) == 1:
        return parts[0]
    return f"total {avg[0]:.3f} = " + " + ".join(parts)


# --- final.pt and the exported student

def final_record(run, step):
    """final.pt: the (EMA) student and everything eval.py needs, checked finite first."""
    cfg, core, data, sup = run.cfg, run.core, run.data, run.sup
    swap_in_ema(core, run.ema)
    require_finite_weights(core, None, step, run.out)
    final = {"format": "vlmkd-final-1", "arch": cfg.arch, "num_classes": data.num_classes,
             "feat_dim": core.student.feat_dim, "model": {k: v.cpu() for k, v in core.student.state_dict().items()},
             "head": cfg.head, "tau": cfg.tau, "classes": data.class_names, "class_counts": data.class_counts.tolist(),
             "preprocess": {"res": cfg.res, "mean": MEAN, "std": STD, "crop_ratio": crop_ratio(cfg)},
             "train_split_sha256": sup.identity["train_split"], "inputs": sup.identity, "config": run_config(cfg),
             "losses": {t.name: weight_of(t, cfg) for t in run.losses}}
    if sup.class_text is not None and cfg.head == "cosine":
        final["class_text"] = sup.class_text
    if core.text_head is not None and not cfg.drop_text_head:
        final["text_head"] = {"proj": {k: v.cpu() for k, v in core.text_head.proj.state_dict().items()},
                              "adaptor": {k: v.cpu() for k, v in core.text_head.adaptor.state_dict().items()},
                              "logit_scale": core.text_head.log_scale.exp().item(), "feat_dim": core.student.feat_dim,
                              "text_dim": sup.text_feats.shape[-1], "embed_dim": cfg.embed_dim,
                              "hidden": cfg.adaptor_hidden, "encoder": str(sup.text_meta.get("encoder", "")),
                              "prompts": sup.prompts, "vlm": sup.text_meta.get("vlm"),
                              "tiny_random": bool(sup.text_meta.get("tiny_random"))}
    return final


class Logits(nn.Module):
    """The student as deployed: normalised images in, class logits out."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, images):
        return self.student(images)[1]


def library_weights(cfg, student):
    """(constructor description, state dict) whose keys load into torchvision's / timm's own model with strict=True:
    our head goes back under the classifier's name. None where no public constructor exists."""
    if cfg.arch in CIFAR_ARCHS or cfg.head != "linear":
        return None
    backbone = student.backbone
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    head = student.head.state_dict().items()
    state |= {f"{backbone.classifier_name}.{k}": v.detach().cpu().contiguous() for k, v in head}
    library = "timm" if cfg.arch.startswith("timm:") else "torchvision"
    return {"library": library, "model": cfg.arch.removeprefix("timm:"), "kwargs": backbone.constructor_kwargs}, state


def export_student(run, final):
    """student.safetensors + student.json, student.pt2 (torch.export) and student.onnx, as --export asks."""
    cfg, out = run.cfg, run.out
    kinds = [k.strip() for k in cfg.export.split(",") if k.strip()]
    for name in RUN_FILES:  # an earlier export of this run (resumed with another --export) must not outlive it
        if name.startswith("student."):
            (out / name).unlink(missing_ok=True)
    if not kinds:
        return
    student = Student(cfg.arch, final["num_classes"], cfg.res, cfg.head, final["model"].get(
        "clip_proj.weight", torch.empty(0, 0)).shape[0], final.get("class_text"), cfg.tau)
    student.load_state_dict(final["model"])
    net, example = Logits(student).eval(), torch.randn(2, 3, cfg.res, cfg.res)
    meta = {"arch": cfg.arch, "num_classes": final["num_classes"], "classes": final["classes"],
            "preprocess": final["preprocess"], "input": "RGB, Resize(round(res / crop_ratio)), CenterCrop(res), "
                                                        "ToTensor, Normalize(mean, std); NCHW float32"}
    weights = library_weights(cfg, student) if "safetensors" in kinds else None
    if weights is not None:
        from safetensors.torch import save_file
        save_file(weights[1], out / "student.safetensors")
        meta |= weights[0]
    elif "safetensors" in kinds:  # CIFAR ResNets and the cosine head exist only in this code
        meta |= {"library": None, "note": f"--arch {cfg.arch} --head {cfg.head}: no torchvision/timm constructor, "
                                          f"load student.pt2"}
    if "pt2" in kinds:
        program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, out / "student.pt2")
    if "onnx" in kinds:
        try:
            torch.onnx.export(net, (example,), out / "student.onnx", input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        except Exception as e:  # an architecture ONNX cannot express is a warning, not a failed run
            warn(f"ONNX export of {cfg.arch} failed ({str(e).splitlines()[0][:200]}); student.pt2 still works")
    write_json(out / "student.json", meta)


def write_final(run, step):
    if run.accelerator.is_main_process:
        final = final_record(run, step)
        save_atomic(final, run.out / "final.pt", run.out)
        export_student(run, final)


# --- main

def check_flags(cfg):
    """One line for a bad flag or a recipe's missing input, before anything is read."""
    missing = [f"--{k.replace('_', '-')}" for k in RECIPE_NEEDS.get(cfg.recipe.removesuffix("-x5"), ())
               if not getattr(cfg, k)]
    if missing:
        die(f"--recipe {cfg.recipe} needs {', '.join(missing)} (README 'Recipes')")
    kinds = imitate_kinds(cfg)
    if not kinds or set(kinds) - {"mse", "contrastive"}:
        die(f"--imitate-loss {cfg.imitate_loss}: expected mse, contrastive or mse,contrastive")
    if not all(m.strip().isdigit() for m in cfg.milestones.split(",") if m.strip()):
        die(f"--milestones {cfg.milestones}: expected comma-separated epochs, e.g. 30,60")
    if cfg.ood_half_batch and not (Path(cfg.data) / "id_classes.txt").is_file():
        die(f"--ood-half-batch: {Path(cfg.data) / 'id_classes.txt'} not found (it tells the OOD classes: those after "
            f"its lines; prepare.py writes it for the OOD sets)")


def start(cfg):
    """The accelerator (tracker included) and a writable --out, checked before anything is read."""
    for kind in (k.strip() for k in cfg.export.split(",") if k.strip()):
        if kind not in EXPORTS:
            die(f"--export {kind}: expected a comma-separated subset of {', '.join(EXPORTS)}")
    on_gpu = torch.cuda.is_available()
    precision, why = cfg.precision, ""
    if precision == "auto":
        precision, why = auto_dtype("cuda" if on_gpu else "cpu", has_native_bf16(pick_device("auto")))
    if precision == "fp16" and not on_gpu:
        die("--precision fp16 needs a GPU; on a CPU use bf16 (with native bf16) or fp32")
    if cfg.deterministic:  # cuDNN autotuning and atomic adds make GPU reruns drift; before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without such a kernel warns, not stops
        torch.backends.cudnn.benchmark = False
    if is_main_process():  # the other processes of this run write nothing here
        check_run_folder(cfg, Path(cfg.out))  # before --out is made: a refused run leaves no folder behind
    out = writable_dir(cfg.out)
    if is_main_process():
        lock_or_die(out / ".lock", f"run folder {out}")
        check_run_folder(cfg, out)  # again under the lock: a run that ended meanwhile is seen
    remove_stale_tmp(out)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=not on_gpu,
                              project_dir=out,
                              log_with=None if cfg.report_to == "none" else cfg.report_to)
    launch_check(accelerator.num_processes)
    if cfg.precision == "auto":
        accelerator.print(f"train.py: --precision auto: {precision}, since {why}", flush=True)
    return accelerator, out


def check_run_folder(cfg, out):
    """--out holds one run: --resume needs its ckpt.pt, a new run needs a folder without another run's files (or
    --overwrite, which removes them later, once the inputs are checked)."""
    if (out / "train.py").exists() and (out / "train.py").samefile(__file__):
        die(f"--out {out} is the folder of train.py itself: give the run a folder of its own")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume and not (out / "ckpt.pt").exists():
        die(f"--resume: {out} holds no ckpt.pt, so there is nothing to continue"
            + (f" (it holds {', '.join(found)})" if found else "") + "; start a new run without --resume")
    if found and not cfg.resume and not cfg.overwrite:
        die(f"{out} holds another run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): pass "
            f"--resume to continue it, --overwrite to replace it, or use another --out")


def tracker_folders(out):
    """Folders accelerate's trackers made in --out: tensorboard's (named after the run, event files only), aim's."""
    board = out / out.name
    events = [p for p in board.rglob("*") if p.is_file()] if board.is_dir() else []
    ours = [board] if events and all(p.name.startswith("events.out.tfevents.") for p in events) else []
    return ours + [out / ".aim"] * (out / ".aim").is_dir()


def clear_run_folder(out):
    """--overwrite: remove the earlier run's files, those train.py writes and nothing else."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for folder in tracker_folders(out):
        shutil.rmtree(folder)


def prepare_model(cfg, accelerator, model, optimizer):
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, unwrap(accelerator, model)


def main():
    cfg = parse_config(Config, defaults=recipe_defaults)
    check_flags(cfg)
    check_config(cfg)
    accelerator, out = start(cfg)
    device = accelerator.device
    data = load_data(cfg)
    sup = load_supervision(cfg, data, device)
    losses = active_losses(cfg, sup)
    state = read_checkpoint(cfg, out, sup.identity)
    model, init_note = build_model(cfg, data, sup, device)
    train_loader = make_loader(cfg, beton_for(cfg, cfg.train_split, accelerator), True, accelerator)
    val_loader = make_loader(cfg, beton_for(cfg, cfg.val_split, accelerator), False, accelerator)
    ood_loader = make_loader(cfg, beton_for(cfg, cfg.ood_split, accelerator), False, accelerator) if sup.ood else None
    if len(train_loader) == 0:
        die(f"{data.train_path}: fewer readable images than --batch-size {cfg.batch_size} per process")
    optimizer, scheduler = make_optimizer(cfg, model, accelerator.num_processes,
                                          cfg.repeat_epochs * len(train_loader))
    ema, progress = restore(state, model, optimizer, scheduler, cfg, device)
    model, optimizer, core = prepare_model(cfg, accelerator, model, optimizer)
    start_run_folder(cfg, out, accelerator, state)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    accelerator.print(f"train.py: {len(data.train_items)} train images, {data.num_classes} classes; {here} "
                      f"process{'es' * (here > 1)} on this machine, world size {accelerator.num_processes}, "
                      f"device {device}, precision {precision}; losses {', '.join(t.name for t in losses)}"
                      + (f"; resuming at epoch {progress.epoch}" * bool(state)), flush=True)
    if cfg.recipe != "none":
        changed = ", ".join(f"--{k.replace('_', '-')} {v['recipe']} -> {v['used']}"
                            for k, v in recipe_record(cfg).items())
        accelerator.print(f"train.py: --recipe {cfg.recipe}" + (f"; overridden: {changed}" if changed else ""))
    if init_note:
        accelerator.print(f"train.py: {init_note}")
    train_step = make_train_step(cfg, accelerator, model, optimizer, scheduler, ema, sup, data.log_prior, losses)
    run = SimpleNamespace(cfg=cfg, accelerator=accelerator, out=out, data=data, sup=sup, losses=losses, core=core,
                          optimizer=optimizer, scheduler=scheduler, ema=ema, train_step=train_step,
                          train_loader=train_loader, val_loader=val_loader, ood_loader=ood_loader)
    started = time.perf_counter()
    step = train(run, progress)
    if step == 0:  # nothing trained: final.pt would be the random init
        die(f"no training step was taken ({len(train_loader)} batches per epoch, --epochs {cfg.epochs}); no final.pt")
    write_final(run, step)
    accelerator.end_training()
    val = f"; val top-1 {progress.val[1]:.4f} after epoch {progress.val[0]}" if progress.val else ""
    resumed = f" ({step} in all, resumed at epoch {progress.epoch})" if state else ""
    accelerator.print(f"train.py: done: {step - progress.step} steps in {(time.perf_counter() - started) / 60:.1f} min"
                      f"{resumed}{val}; wrote {out / 'final.pt'}", flush=True)


# --- shared helpers: byte-identical copies of tests/shared_helpers.py (tests/test_shared.py, --sync)

GROUPS = ("many", "medium", "few")


def parse_config(config_cls, argv=None, positional=(), defaults=None):
    """Typed command line from a dataclass: each field is one `--dashed-name` with its help and default;
    a Literal field only takes its listed values; a bool is `--flag` / `--no-flag`; a list is `--name
    A,B`, repeatable. Fields in `positional` are positional, anywhere among the flags; a list one takes
    any number of whole words (commas kept) after its flag's values. `defaults(namespace of a first
    pass) -> {field: value}` replaces dataclass defaults (a named recipe's values): flags given on the
    command line still win, and --help shows the replaced defaults."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__, add_help=defaults is None,
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
        elif typing.get_origin(kind) is list:  # both extend one list: the flag's values, then the words
            if f.name in positional:
                group.add_argument(f.name, nargs="*", action="extend", help=kwargs["help"])
                names, kwargs["help"] = [flag], f"{f.name} as a flag: comma-separated, repeatable"
            kwargs |= {"action": "extend", "type": lambda value: value.split(","), "metavar": "A,B"}
        else:
            kwargs |= {"type": kind, "metavar": kind.__name__.upper()}
        if names == [flag]:
            kwargs["default"] = f.default
        group.add_argument(*names, **kwargs)
    for action in parser._actions:  # defaults once, whatever the Python version's BooleanOptionalAction adds
        if action.help and action.default is not None and action.dest != "help" and "%(default)" not in action.help:
            action.help += " (default: %(default)r)"
    if defaults is not None:  # the first pass runs without -h, so `--recipe X --help` shows the recipe's defaults
        parser.set_defaults(**defaults(parser.parse_known_args(argv)[0]))
        parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    return config_cls(**vars(parser.parse_intermixed_args(argv)))


def die(msg):
    """One line naming the stage, then a non-zero exit: a user's mistake is a sentence, not a traceback."""
    sys.exit(f"{Path(sys.argv[0]).name}: error: {msg}")


def warn(msg):
    print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


def pick_device(choice="auto"):
    """auto: this process's GPU (cuda:LOCAL_RANK under torchrun or accelerate launch), else the CPU."""
    import torch
    if choice != "auto":
        if choice.startswith("cuda") and not torch.cuda.is_available():
            die(f"--device {choice}, but torch sees no CUDA device (use --device cpu)")
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def has_native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """Whether the device computes bf16 in hardware: a GPU since Ampere, a CPU with avx512_bf16 or AMX. Elsewhere
    torch emulates bf16, and a bf16 VLM ran 3.1x slower than fp32 on such a CPU."""
    if device.type == "cuda":
        import torch
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def auto_dtype(device_type, native_bf16):
    """`--dtype auto`: (dtype, why). bf16 where the hardware computes it; else fp16 on a GPU (same speed, needs
    no bf16 units) and fp32 on a CPU (fp16 is emulated there too)."""
    where = "GPU" if device_type == "cuda" else "CPU"
    if native_bf16:
        return "bf16", f"this {where} computes bf16 natively"
    return ("fp16" if device_type == "cuda" else "fp32"), f"this {where} has no native bf16 (it would be emulated)"


def is_main_process():
    """torchrun and accelerate launch start one copy per process: only rank 0 prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


class LineProgress:
    """tqdm's output where it is not a terminal (a log, a pipe, `make`): each refresh its own line, not a '\\r'."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.strip("\r\n"):
            self.stream.write(text.strip("\r\n") + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total, unit, initial=0, desc="", disable=False, iterable=None):
    """A tqdm bar with rate and ETA on a terminal; elsewhere a line every 30 s, so a job log shows progress too.
    Rank 0 alone draws it."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=tty,
                disable=disable or not is_main_process(), mininterval=0.1 if tty else 30,
                maxinterval=10 if tty else 30,  # tqdm's monitor would otherwise force a line every 10 s
                file=sys.stderr if tty else LineProgress(sys.stderr))


LOCKS = []


def lock_or_die(path, what):
    """Hold an exclusive lock on `path` (a hidden lock file) for the life of this process, or stop with one line:
    two processes appending to one output interleave or duplicate it. A killed process leaves no stale lock."""
    import fcntl
    path = Path(path)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        die(f"{what} is in use by {holder}: wait for it to end, or use another --out")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({Path(sys.argv[0]).name})\n")
    handle.flush()
    LOCKS.append(handle)
    return handle


def rgb_image(image):
    """An opened PIL image as 8-bit RGB. 16-bit grayscale (mode I;16 / I) is scaled down to 8 bits first:
    convert("RGB") clips it, turning a 16-bit PNG almost white. convert() also decodes the whole file, so a
    truncated image fails here, where the caller records it."""
    if image.mode.startswith("I"):
        import numpy
        from PIL import Image
        scaled = numpy.asarray(image, dtype=numpy.float64) / 257.0
        image = Image.fromarray(numpy.clip(numpy.rint(scaled), 0, 255).astype(numpy.uint8), "L")
    return image.convert("RGB")


def launch_check(world_size=None, launcher_argv=None):
    """Warn (rank 0) when the launcher asked for more processes than this run has; return the count it asked for, or
    None where that cannot be seen. `accelerate launch --num_processes 2` starts ONE process unless it goes multi-GPU
    (never on a machine without GPUs, or with --cpu), and no variable in the environment it passes names the count
    asked for: it is read from the launcher's own command line (/proc/<parent>/cmdline, Linux), `--num_processes N`,
    else `num_processes` of the accelerate config file it read. Not seen: a script started through a shell or with
    `-m`, systems without /proc, launchers other than accelerate (torchrun sets WORLD_SIZE to the count asked for)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if launcher_argv is None:
        try:
            launcher_argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return None
    if sys.argv[0] not in launcher_argv:  # not started by this command line itself (a shell, make, ...)
        return None
    head = launcher_argv[:launcher_argv.index(sys.argv[0])]  # the launcher's own words, before the script
    if not any(Path(w).name in ("accelerate", "accelerate-launch") or w.startswith("accelerate.") for w in head):
        return None
    options = {}
    for i, word in enumerate(head):
        name, eq, value = word.partition("=")
        if name.startswith("--"):
            options[name[2:].replace("-", "_")] = value if eq else (head[i + 1] if i + 1 < len(head) else "")
    asked = options.get("num_processes")
    config = options.get("config_file")
    if asked is None and config is None and "cpu" not in options:  # accelerate skips its default file under --cpu
        home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
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
    if not (asked or "").isdigit():
        return None
    if int(asked) > world_size and is_main_process():
        script = Path(sys.argv[0]).name
        warn(f"accelerate launch asked for {asked} processes, but this run has world size {world_size}: accelerate "
             f"starts a single process unless it goes multi-GPU (it does not without GPUs or with --cpu); for "
             f"{asked} CPU processes run `torchrun --nproc_per_node {asked} {script} ...`")
    return int(asked)


def sha256_file(path):
    """sha256 of a file's bytes, read in blocks (arrays run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_split(path, num_classes=None):
    """[(relative path, label)] from a split file's `relative/path label` lines. A bad line is refused with
    `file:line`: no label, a label that is not an integer in [0, num_classes), or a path that is absolute or climbs
    out of the data root with `..` (a split only ever names files under its root)."""
    path = Path(path)
    if not path.is_file():
        die(f"split file {path} not found (prepare.py writes it)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            die(f"{path}:{n}: expected `relative/path label` with an integer label >= 0, got {line[:80]!r}")
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
        if first.setdefault(name, n) != n:  # two labels, one class text: zero-shot could not tell them apart
            die(f"{path}:{n}: {name!r} also names line {first[name]}: each class needs its own name")
    if not names:
        die(f"classes file {path} is empty")
    return names


def class_group(count):
    """OLTR's class groups by training images: many > 100, medium 20-100, few 1-19; 0 images: unseen (OOD)."""
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
    """sha256 of an array's bytes and of every other field of its sidecar: editing either by hand is caught."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in sidecar.items() if k != "sha256"}, sort_keys=True).encode())
    digest.update(sha256_file(array_path).encode())
    return digest.hexdigest()


def load_artifact(path, kind):
    """(array opened as a memmap, sidecar) of an encode.py artifact. Refused with one line unless the sidecar is
    there, names this kind and matches the array (sidecar_digest), and every row is finite."""
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
        die(f"{path} and {sidecar_path.name} do not match (sha256): one was changed after encode.py wrote them")
    for start in range(0, len(array), 8192):
        chunk = np.asarray(array[start:start + 8192])
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if not finite.all():
            die(f"{path}: row {start + int(np.flatnonzero(~finite)[0])} holds NaN or inf")
    return array, sidecar


if __name__ == "__main__":
    main()
