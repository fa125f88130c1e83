r"""Train a vision encoder from scratch with long-tail classification + VLM text distillation
(VLM-KD), optionally with the CLIP-teacher losses of Li et al. (imitation, class-text classifier, VL
alignment).

    python train.py --data data/fmnist-lt --arch resnet32 --loss la --epochs 100 \
        --out runs/fmnist/ce
    accelerate launch train.py --data data/fmnist-lt --arch resnet32 --loss la --epochs 100 \
        --text runs/fmnist/text/text.npy --text-weight 1.0 --out runs/fmnist/vlmkd
    accelerate launch train.py --data data/imagenet-lt --arch resnet50 --res 176 --epochs 90 \
        --compile --text runs/inlt/text/text.npy --out runs/inlt/vlmkd   # one machine, all its GPUs
    python train.py ... --arch timm:vit_tiny_patch16_224 --res 64   # any timm model, from scratch
    python train.py ... --teacher runs/fmnist/ce/final.pt --kd-weight 1.0   # + vision-teacher KD
    python train.py ... --class-text runs/x/clip/classes.npy --head cosine \
        --teacher-images runs/x/clip/images.npy                 # Li et al.'s CLIP-teacher losses
    python train.py ... --init runs/x/li/final.pt               # finetune from every fitting weight
    accelerate launch train.py --recipe li-main --data data/food-li \
        --class-text runs/food-li/clip/classes.npy --teacher-images runs/food-li/clip/id_train.npy \
        --out runs/food-li/student                              # a published protocol
    python train.py --recipe li-5shot --help                    # its settings as the defaults
    python train.py ... --resume                                # continue a killed run in --out
    torchrun --nproc_per_node 2 train.py ...                    # several CPU processes (gloo)

The run directory gets a copy of this script, config.json, versions.json, metrics.jsonl (every loss
part, lr, images/s; val top-1 overall/many/medium/few), ckpt.pt (everything to resume, each epoch),
final.pt (student + text head + class names + counts + preprocessing: all that eval.py needs) and
the student for use without this code: student.safetensors + student.json (torchvision / timm
keys) and student.pt2 (torch.export), see --export.
"""
import argparse
import hashlib
import json
import math
import multiprocessing
import multiprocessing.queues
import os
import queue
import re
import shutil
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Literal

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

REPORT_TO = Literal["none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml",
                    "dvclive"]
RECIPE_NAMES = Literal["none", "li-main", "li-main-x5", "li-5shot", "li-5shot-x5",
                       "vlmkd-imagenet-lt"]


@dataclass
class Config:
    recipe: RECIPE_NAMES = opt(
        "none", "a published protocol's settings as the defaults of every flag below (README "
                "'Recipes'); flags given still win, config.json lists them", heading="recipe")
    data: str = opt("data/fmnist-lt", "folder from prepare.py", heading="data")
    train_split: str = opt("train.txt", "split file inside --data (id_train.txt for OOD sets)")
    val_split: str = opt("val.txt", "split scored every --eval-every epochs (nothing is selected "
                                    "on it: final.pt is the last epoch)")
    classes: str = opt("classes.txt", "class names inside --data (id_classes.txt for OOD sets)")
    ood_split: str = opt(
        "", "split inside --data of images of the classes after id_classes.txt, scored every "
            "eval epoch within those classes through clip_proj and --class-text (Li et al.'s OOD "
            "number: val_ood_top1, val_ood_mean_class); '' = off")
    out: str = opt("runs/train", "run directory")
    res: int = opt(32, "training / eval resolution")
    max_res: int = opt(256, "longest side stored in the .beton cache")
    min_scale: float = opt(-1.0, "RandomResizedCrop min area; -1: 0.35 for res <= 64, else 0.08")
    crop_ratio: float = opt(-1.0, "eval centre-crop ratio; -1: 1.0 for res <= 64, else 0.875")
    workers: int = opt(-1, "ffcv decoding threads; -1: all cores / processes")

    arch: str = opt("resnet32", "resnet20/32/44/56 (CIFAR-style), a torchvision model name, or "
                                "timm:<name> (random init; features are the pooled pre-logits)",
                    heading="model")
    init: str = opt("", "final.pt whose backbone starts this run (the classes may differ: the "
                        "head is new)")
    ema: float = opt(0.0, "EMA decay per step (e.g. 0.999); 0 = off. Eval and final.pt use the EMA")

    epochs: int = opt(100, "epochs (the lr schedule counts these)", heading="optimisation")
    repeat_epochs: int = opt(1, "passes over the training split per epoch (Li et al.'s "
                                "--repeat-epochs; rows_max_repeat then counts the passes)")
    batch_size: int = opt(128, "per process")
    ood_half_batch: bool = opt(
        False, "half of every batch from the images of the classes after --data/id_classes.txt "
               "(drawn afresh each batch), half from the others (one pass an epoch): Li et al.'s "
               "5-shot finetune")
    optimizer: Literal["sgd", "adamw"] = opt("sgd", "sgd (momentum 0.9) or adamw")
    nesterov: bool = opt(True, "nesterov momentum for sgd")
    lr: float = opt(0.1, "peak lr at a global batch of 128; scaled linearly with the global batch")
    weight_decay: float = opt(5e-4, "not applied to biases, norms and the temperature unless "
                                    "--decay-all")
    decay_all: bool = opt(False, "weight decay on biases and norms too (Li et al.'s and Kang et "
                                 "al.'s code)")
    schedule: Literal["cosine", "step", "onecycle"] = opt(
        "cosine", "cosine: decay to 0 per step; step: x --gamma at each of --milestones (epochs); "
                  "onecycle: torch's OneCycleLR stepped once an epoch, peak --lr (Li et al.'s "
                  "finetune)")
    milestones: str = opt("30,60", "--schedule step: comma-separated epochs (from 0) where the lr "
                                   "drops")
    gamma: float = opt(0.1, "--schedule step: lr factor at each milestone")
    warmup_epochs: float = opt(5.0, "linear warmup before the cosine or step schedule, per step")
    grad_clip: float = opt(0.0, "max grad norm; 0 = off")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "autocast dtype; auto: bf16 where the hardware computes it (GPUs since Ampere, "
                "CPUs with avx512_bf16 or AMX: ~2x fp32 there), fp16 on older GPUs, fp32 on other "
                "CPUs")
    compile: bool = opt(False, "torch.compile the model (~40 s first step on a CPU)")
    seed: int = opt(0, "seed of init, crops, flips, caption sampling and data order")
    deterministic: bool = opt(
        False, "deterministic GPU kernels (cuDNN without autotuning, cuBLAS, scatter/index adds): "
               "bit-identical reruns on one GPU, somewhat slower; CPU runs need no flag")
    max_steps: int = opt(0, "stop after this many steps (benchmarks); 0 = off")

    loss: Literal["ce", "la", "bs"] = opt(
        "la", "ce | la (logit-adjusted, Menon et al.) | bs (balanced softmax)",
        heading="classification loss")
    tau_la: float = opt(1.0, "logit adjustment strength of --loss la")
    label_smoothing: float = opt(0.0, "label smoothing of the classification loss")
    head: Literal["linear", "cosine"] = opt(
        "linear", "linear | cosine (over --class-text embeddings, Li et al.)")
    tau: float = opt(0.07, "temperature of the cosine head and the VL alignment")

    text: str = opt("", "text.npy from encode.py: VLM caption features [N, P, D]",
                    heading="VLM text distillation (VLM-KD)")
    text_weight: float = opt(1.0, "weight of the text InfoNCE; 0 = off")
    prompts: str = opt("", "comma-separated prompt ids to train on (default: all slots)")
    text_temp: float = opt(0.07, "InfoNCE temperature (initial value when learnt)")
    learn_temp: bool = opt(False, "learn the temperature (own param group, no decay, --temp-lr)")
    temp_lr: float = opt(1e-3, "lr of the learnt temperature: SGD at the backbone's lr collapses "
                               "it")
    mask_same_class: bool = opt(False, "drop same-class negatives from the InfoNCE")
    local_negatives: bool = opt(
        False, "under N processes, contrast only within each process's batch (default: gather all "
               "processes' rows, as one process with batch N x B)")
    embed_dim: int = opt(256, "width of the shared image-text space")
    adaptor_hidden: int = opt(512, "hidden width of the text adaptor MLP")
    drop_text_head: bool = opt(False, "leave the text head out of final.pt (deployment)")

    teacher: str = opt("", "final.pt of a frozen vision teacher for logit KD",
                       heading="vision teacher")
    kd_weight: float = opt(1.0, "weight of the logit KD; 0 = off")
    kd_temp: float = opt(4.0, "KD softmax temperature T (the loss is scaled by T^2)")

    class_text: str = opt(
        "", "classes.npy from encode.py --classes (CLIP text space); the rows of the training "
            "classes are used, checked by name", heading="CLIP teacher (Li et al.)")
    teacher_images: str = opt("", "images.npy from encode.py --images (CLIP image embeddings)")
    imitate_weight: float = opt(1.0, "weight of the image-embedding imitation; 0 = off")
    imitate_loss: str = opt(
        "mse", "mse (of unit vectors), contrastive (InfoNCE at --tau), or both: mse,contrastive "
               "(Li et al.'s L-mse + L-cst, each at --imitate-weight)")
    align_weight: float = opt(1.0, "weight of the VL alignment (needs --class-text and "
                                   "--teacher-images); 0 = off")
    align_topk: int = opt(0, "align over the teacher's top-k class texts (k > classes: all); 0 = "
                             "all")
    align_correct_only: bool = opt(False, "align only where the teacher is right")

    resume: bool = opt(False, "continue from --out/ckpt.pt (refused if an input or a setting "
                              "changed)", heading="run")
    overwrite: bool = opt(
        False, "start a new run in an --out that holds another run: its files (those train.py "
               "writes, nothing else) are removed first")
    eval_every: int = opt(1, "evaluate on --val-split every this many epochs (and after the last)")
    log_every: int = opt(20, "steps between metrics.jsonl rows")
    report_to: REPORT_TO = opt("none", "also log metrics.jsonl's rows to this accelerate tracker")
    export: str = opt("safetensors,pt2", "student files written next to final.pt: comma-separated "
                                         "from safetensors, pt2, onnx; '' = none")


# Flags that change only speed or logging: a resume may change them. Input paths are compared by
# content (the sha256 of each input, checkpointed), not by name.
RESUMABLE_CHANGES = {"workers", "log_every", "resume", "overwrite", "report_to", "export", "out"}
INPUT_FIELDS = {"data", "train_split", "val_split", "classes", "ood_split", "text", "class_text",
                "teacher", "teacher_images", "init"}
EXPORTS = ("safetensors", "pt2", "onnx")
# Every file a run writes in --out: another run's are refused, --overwrite removes these and nothing
# else (a user's notes in the folder stay).
RUN_FILES = ("train.py", "config.json", "versions.json", "metrics.jsonl", "ckpt.pt", "final.pt",
             *(f"student.{ext}" for ext in ("json", "safetensors", "pt2", "onnx")))
WORKERS_PER_CORE = 4  # ffcv decoding threads beyond a few per core only compete for it


@dataclass(frozen=True)
class Limit:
    """The values a numeric flag takes: [low, high], an end left out with `open_low` / `open_high`;
    `auto` is a value outside the range that means "choose for me" (-1)."""
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
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            text = f"in {left}{low}, {high}{right}"
        return (f"{self.auto:g} or " if self.auto is not None else "") + text


# One limit per numeric Config field (tests/test_train.py checks that none is left out).
LIMITS = {
    "res": Limit(8, why="below 8 px the ResNets' downsampling leaves nothing to learn from"),
    "max_res": Limit(8), "min_scale": Limit(0, 1, open_low=True, auto=-1),
    "crop_ratio": Limit(0, 1, open_low=True, auto=-1),
    "workers": Limit(1, WORKERS_PER_CORE * (os.cpu_count() or 1), auto=-1,
                     why=f"{WORKERS_PER_CORE} per core: more decoding threads only compete for "
                         f"the cores"),
    "ema": Limit(0, 1, open_high=True, why="a decay of 1 keeps the average at the random init"),
    "epochs": Limit(1), "repeat_epochs": Limit(1), "batch_size": Limit(1),
    "lr": Limit(0, why="0 keeps the weights fixed"), "weight_decay": Limit(0),
    "warmup_epochs": Limit(0), "grad_clip": Limit(0, why="0 = off"),
    "gamma": Limit(0, open_low=True, why="the lr factor at each milestone"),
    "seed": Limit(0, 2 ** 31 - 1), "max_steps": Limit(0, why="0 = off"),
    "tau_la": Limit(0), "label_smoothing": Limit(0, 1, open_high=True),
    "tau": Limit(0, open_low=True),
    "text_weight": Limit(0), "text_temp": Limit(0, open_low=True), "temp_lr": Limit(0),
    "embed_dim": Limit(1), "adaptor_hidden": Limit(1),
    "kd_weight": Limit(0), "kd_temp": Limit(0, open_low=True),
    "imitate_weight": Limit(0), "align_weight": Limit(0),
    "align_topk": Limit(0, why="0 = all classes"),
    "eval_every": Limit(1), "log_every": Limit(1),
}


def check_config(cfg):
    """Every flag before anything is read (a recipe's missing input, a value out of range, flags
    that do not go together): one line naming it, not a traceback or a silent no-op run later."""
    needs = RECIPE_NEEDS.get(cfg.recipe.removesuffix("-x5"), ())
    missing = [flag(k) for k in needs if not getattr(cfg, k)]
    if missing:
        die(f"--recipe {cfg.recipe} needs {', '.join(missing)} (README 'Recipes')")
    kinds = comma_list(cfg.imitate_loss)
    if not kinds or set(kinds) - {"mse", "contrastive"}:
        die(f"--imitate-loss {cfg.imitate_loss}: expected mse, contrastive or mse,contrastive")
    if not all(m.isdigit() for m in comma_list(cfg.milestones)):
        die(f"--milestones {cfg.milestones}: expected comma-separated epochs, e.g. 30,60")
    if cfg.ood_split and not (cfg.class_text and (cfg.head == "cosine" or cfg.teacher_images)):
        die("--ood-split scores through clip_proj and the class texts: it needs --class-text and "
            "--head cosine or --teacher-images")
    if cfg.ood_half_batch and not (Path(cfg.data) / "id_classes.txt").is_file():
        die(f"--ood-half-batch: {Path(cfg.data) / 'id_classes.txt'} not found (it tells the OOD "
            f"classes: those after its lines; prepare.py writes it for the OOD sets)")
    hints = typing.get_type_hints(Config)
    for f in fields(cfg):
        if hints[f.name] in (int, float):
            value, limit = getattr(cfg, f.name), LIMITS[f.name]
            if not limit.allows(value):
                die(f"{flag(f.name)} {value}: must be {limit.describe()}"
                    + (f" ({limit.why})" if limit.why else ""))
    if cfg.max_res < cfg.res:
        die(f"--max-res {cfg.max_res} < --res {cfg.res}: the cache would store every image smaller "
            f"than it trains")
    if cfg.resume and cfg.overwrite:
        die("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    for kind in comma_list(cfg.export):
        if kind not in EXPORTS:
            die(f"--export {kind}: expected a comma-separated subset of {', '.join(EXPORTS)}")


# --- recipes
# Each published protocol as the defaults it sets (README "Recipes" has the commands and a table
# of sources). Li et al.'s values are read from their code at commit 4c04530,
# github.com/xuanlinli17/large_vlm_distillation_ood: "main:N" is main_experiments.py line N, "ex:N"
# example_scripts.sh line N, "their README" its "Running main experiments" section. Where a value
# has no line, the comment names the function that fixes it.
LI_COMMON = {
    "arch": "resnet18",             # ex:1 `-a resnet18` (their README: ResNet students)
    "res": 224,                     # main: RandomResizedCrop(224) to train; CenterCrop(224) to test
    "max_res": 256,                 # main: every image is first resized to 256 x 256
    "min_scale": 0.08,              # main: RandomResizedCrop's default scale (0.08, 1)
    "crop_ratio": 0.875,            # main: CenterCrop(224) of the 256-px image
    "batch_size": 128,              # ex:3 `--train-batch 128`
    "optimizer": "sgd",             # main: optim.SGD unless --use-adam (ViT students only)
    "nesterov": False,              # main:71 momentum 0.9; optim.SGD(...) without nesterov
    "decay_all": True,              # main: optim.SGD(model.parameters(), ...) decays all of them
    "weight_decay": 1e-4,           # main:73 `--weight-decay` default 1e-4 (the examples keep it)
    "warmup_epochs": 0.0,           # main: adjust_learning_rate has no warmup
    "repeat_epochs": 1,             # main:54 default 1; their README: 1 for Food and SUN (ResNet)
    "head": "cosine",               # main, train(): logits = norm(student) . norm(class text) / T
    "tau": 0.07,                    # main:102 `--temperature` 0.07 (L-cls, L-vlalign and L-cst)
    "loss": "ce",                   # main: criterion = nn.CrossEntropyLoss() (L-cls)
    "label_smoothing": 0.0,         # main: nn.CrossEntropyLoss() without smoothing
    "imitate_loss": "mse,contrastive",  # ex:4 --clip-align-image-mse --clip-align-image-contrastive
    "imitate_weight": 1.0,          # main, train(): L-mse and L-cst are added with weight 1
    "align_weight": 1.0,            # main, train(): L-vlalign is added with weight 1.0
    "align_topk": 256,              # ex:5 `--clip-align-proximal-text-num 256`; min(k, classes)
    "align_correct_only": True,     # ex:5 `--clip-filter-out-wrong-alignment`: L-vlalign only
    "ema": 0.0, "grad_clip": 0.0,   # main: neither exists there
    "eval_every": 1,                # main: tests each epoch; the last 5 averaged (log_avg.txt)
}
RECIPES = {
    "none": {},
    # Their main run: ID classes, teacher CLIP ViT-L/14 (main:89 `--clip-model` default ViT-L/14).
    "li-main": LI_COMMON | {
        "train_split": "id_train.txt", "val_split": "id_test.txt", "classes": "id_classes.txt",
        "ood_split": "ood_test.txt",  # prepare.py --protocol li: their train / val_on_train / val
        "epochs": 90,               # ex:1 `--epochs 90`
        "lr": 0.05,                 # ex:2 `--lr 0.05` at batch 128
        "schedule": "step", "milestones": "30,60", "gamma": 0.1,  # ex:2 --schedule 30 60, --gamma
    },
    # Their 5-shot finetune of a li-main student (ex:8-14): ID + OOD class texts, the shots in half
    # of every batch (custom_data_loader.py FewShotSampler), the same losses.
    "li-5shot": LI_COMMON | {
        "train_split": "li_train.txt", "val_split": "id_test.txt", "classes": "classes.txt",
        "ood_split": "li_ood_test.txt", "ood_half_batch": True,
        "epochs": 20,               # ex:8 `--epochs 20`
        "lr": 1e-3,                 # ex:9 `--lr 0.001`
        "schedule": "onecycle",     # ex:9 `--onecyclelr`: OneCycleLR(max_lr=lr, steps_per_epoch=1)
    },
    # VLM-KD on ImageNet-LT (Zhang et al. 2024) publishes few settings: these are the ResNet-50
    # ImageNet-LT settings of Kang et al. 2020 (github.com/facebookresearch/classifier-balancing,
    # config/ImageNet_LT/feat_uniform.yaml), the text term at this project's defaults.
    "vlmkd-imagenet-lt": {
        "train_split": "train.txt", "val_split": "val.txt", "classes": "classes.txt",
        "arch": "resnet50",         # VLM-KD's ImageNet-LT student
        "res": 224, "max_res": 256, "min_scale": 0.08, "crop_ratio": 0.875,  # the 224-px crops
        "batch_size": 128,          # x 4 processes = feat_uniform.yaml batch_size 512
        "optimizer": "sgd", "nesterov": False,  # feat_uniform.yaml: momentum 0.9, plain SGD
        "lr": 0.05,                 # feat_uniform.yaml lr 0.2 at batch 512 = 0.05 at 128 (linear)
        "weight_decay": 5e-4,       # feat_uniform.yaml weight_decay 0.0005
        "decay_all": True,          # feat_uniform.yaml: optim_params cover every parameter
        "schedule": "cosine", "warmup_epochs": 0.0,  # feat_uniform.yaml coslr, endlr 0.0, no warmup
        "epochs": 90,               # feat_uniform.yaml num_epochs 90
        "repeat_epochs": 1, "ema": 0.0, "grad_clip": 0.0, "label_smoothing": 0.0, "head": "linear",
        "loss": "la", "tau_la": 1.0,  # logit adjustment (Menon et al. 2021): our long-tail loss
        "text_weight": 1.0, "text_temp": 0.07, "learn_temp": False, "mask_same_class": False,
        "embed_dim": 256, "adaptor_hidden": 512,  # our defaults (VLM-KD publishes no adaptor)
        "eval_every": 1,
    },
}
# Their README: 5 passes an epoch for Flowers, Cars and Birds.
RECIPES["li-main-x5"] = RECIPES["li-main"] | {"repeat_epochs": 5}
RECIPES["li-5shot-x5"] = RECIPES["li-5shot"] | {"repeat_epochs": 5}
# What a recipe cannot run without (checked before any work), and the teacher it was published with.
RECIPE_NEEDS = {"li-main": ("class_text", "teacher_images"), "vlmkd-imagenet-lt": ("text",),
                "li-5shot": ("class_text", "teacher_images", "init")}
LI_TEACHER = "clip-vit-large-patch14"  # main:89 ViT-L/14, at 224 px (main: clip_preprocess)
LI_TEMPLATE = "a photo of {name} . {description}"  # main: "a photo of " + name + " . " + its text


def recipe_defaults(namespace):
    return RECIPES[namespace.recipe]


def recipe_record(cfg):
    """The recipe's values that a flag overrode: {field: {"recipe": value, "used": value}}."""
    return {k: {"recipe": v, "used": getattr(cfg, k)} for k, v in RECIPES[cfg.recipe].items()
            if getattr(cfg, k) != v}


# --- model code shared with eval.py: byte-identical copies of tests/shared_models.py (--sync)

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


def build_model(cfg, data, sup, device):
    """(the Model on the device, the --init line or '')."""
    torch.manual_seed(cfg.seed)
    clip_dim = sup.class_text.shape[1] if cfg.head == "cosine" else 0
    clip_dim = sup.teacher_images.shape[1] if sup.teacher_images is not None else clip_dim
    student = Student(cfg.arch, data.num_classes, cfg.res, cfg.head, clip_dim, sup.class_text,
                      cfg.tau)
    text_head = None
    if sup.text_feats is not None:
        text_head = TextHead(student.feat_dim, sup.text_feats.shape[-1], cfg.embed_dim,
                             cfg.adaptor_hidden, cfg.text_temp, cfg.learn_temp)
    model = Model(student, text_head)
    note = init_from(model, cfg, sup) if cfg.init else ""
    # channels_last: the layout ffcv's batches come in, and the one tensor cores convolve fastest.
    return model.to(device, memory_format=torch.channels_last), note


def student_from_final(ckpt):
    """The Student a final.pt describes, with its weights."""
    clip_dim = ckpt["model"].get("clip_proj.weight", torch.empty(0, 0)).shape[0]
    student = Student(ckpt["arch"], ckpt["num_classes"], ckpt["preprocess"]["res"], ckpt["head"],
                      clip_dim, ckpt.get("class_text"), ckpt.get("tau", 0.07))
    student.load_state_dict(ckpt["model"])
    return student


def fits(module, weights):
    """Whether `weights` holds every tensor of `module`, each with its shape."""
    own = module.state_dict()
    return set(own) == set(weights) and all(own[k].shape == weights[k].shape for k in own)


def load_fitting(module, weights):
    """Load `weights` into `module` when they fit; True if it did."""
    if not fits(module, weights):
        return False
    module.load_state_dict(weights)
    return True


def init_from(model, cfg, sup):
    """--init: an earlier final.pt's model (same --arch) where shapes fit: backbone (it must),
    clip_proj, linear head, text head; the rest starts fresh. Returns the line that says which."""
    ckpt = read_final(cfg.init, "--init")
    if ckpt["arch"] != cfg.arch:
        die(f"--init {cfg.init} is a {ckpt['arch']}, not --arch {cfg.arch}")
    student, source = model.student, ckpt["model"]
    weights = {k.removeprefix("backbone."): v for k, v in source.items()
               if k.startswith("backbone.")}
    try:
        student.backbone.load_state_dict(weights)
    except RuntimeError as e:
        die(f"--init {cfg.init}: its backbone does not fit --arch {cfg.arch} ({first_line(e)})")
    loaded, fresh = ["backbone"], []
    for name in ("clip_proj", "head"):
        part = getattr(student, name)
        if part is not None:
            given = {k.removeprefix(f"{name}."): v for k, v in source.items()
                     if k.startswith(f"{name}.")}
            (loaded if given and load_fitting(part, given) else fresh).append(name)
    head, text_head = ckpt.get("text_head"), model.text_head
    if text_head is not None:
        # Both parts or neither: a proj loaded beside a fresh adaptor is no earlier text head.
        both = head is not None and fits(text_head.proj, head["proj"]) \
            and fits(text_head.adaptor, head["adaptor"])
        if both:
            text_head.proj.load_state_dict(head["proj"])
            text_head.adaptor.load_state_dict(head["adaptor"])
            text_head.log_scale.data.fill_(math.log(head["logit_scale"]))
        (loaded if both else fresh).append("text head")
    here = len(sup.class_text) if cfg.head == "cosine" else student.head.out_features
    return (f"--init {cfg.init}: loaded {', '.join(loaded)}; started fresh: "
            f"{', '.join(fresh) or 'nothing'}; {ckpt['num_classes']} classes there, {here} here"
            + kept_class_texts(cfg, ckpt, sup, here))


def kept_class_texts(cfg, ckpt, sup, here):
    """--init of a cosine head: the final.pt's class texts must be the first rows of --class-text,
    so that its classifier still means the same classes here."""
    old = ckpt.get("class_text")
    if cfg.head != "cosine" or old is None:
        return ""
    new = sup.class_text
    if old.shape[1] != new.shape[1] or len(old) > len(new) or not torch.allclose(
            old.float(), new[:len(old)].float(), atol=1e-2):
        die(f"--init {cfg.init} classified over other class texts than the first rows of "
            f"--class-text {cfg.class_text}: use the classes.npy it was trained with (its classes "
            f"first)")
    added = f", {here - len(old)} added" if here > len(old) else ""
    return f" (text classifier: its {len(old)} class texts kept{added})"


# --- losses (pure functions, then loss_terms: the one place where they are put together)

def masked_mean(values, valid=None):
    """Mean over the rows where `valid` (all rows when None); 0 when no row is valid."""
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp(min=1)


def prior_adjusted_ce(logits, labels, log_prior, tau=1.0, label_smoothing=0.0):
    """Logit-adjusted CE (Menon et al.): CE(logits + tau * log prior); tau=1: balanced softmax."""
    return F.cross_entropy(logits.float() + tau * log_prior, labels,
                           label_smoothing=label_smoothing)


def info_nce(img_emb, txt_emb, logit_scale, labels=None, mask_same_class=False, valid=None):
    """Symmetric InfoNCE between matching rows. Optionally same-class pairs are not negatives; rows
    not `valid` (no caption) are neither anchors nor negatives: loss 0 and no gradient."""
    img_emb, txt_emb = F.normalize(img_emb.float(), dim=-1), F.normalize(txt_emb.float(), dim=-1)
    logits = logit_scale * img_emb @ txt_emb.T
    keep = torch.ones_like(logits, dtype=torch.bool)
    if mask_same_class:
        keep = labels[:, None] != labels[None, :]
    if valid is not None:
        keep = keep & valid[:, None] & valid[None, :]
    if mask_same_class or valid is not None:  # the diagonal stays: a row with only it costs 0
        diagonal = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(~(keep | diagonal), -math.inf)
    target = torch.arange(len(logits), device=logits.device)
    per_row = F.cross_entropy(logits, target, reduction="none") \
        + F.cross_entropy(logits.T, target, reduction="none")
    return 0.5 * masked_mean(per_row, valid)


def logit_kd(student_logits, teacher_logits, temp):
    """Hinton KD: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), mean over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temp, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temp, dim=-1)
    return temp ** 2 * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def imitation_loss(student_emb, teacher_emb, kind="mse", logit_scale=1 / 0.07, valid=None):
    """Li et al. (1): match the teacher's image embedding: squared distance of unit vectors, or
    InfoNCE (`kind`)."""
    if kind == "contrastive":
        return info_nce(student_emb, teacher_emb, logit_scale, valid=valid)
    diff = F.normalize(student_emb.float(), dim=-1) - F.normalize(teacher_emb.float(), dim=-1)
    return masked_mean(diff.pow(2).sum(-1), valid)


def alignment_loss(student_emb, teacher_emb, class_text, tau, labels=None, topk=0,
                   correct_only=False, valid=None):
    """Li et al. (3): KL(teacher || student) over image-to-class-text similarity distributions,
    optionally over the teacher's top-k classes (k capped at the number of classes, as in their
    code) and only on images the teacher gets right."""
    class_text = class_text.float()
    s_logits = F.normalize(student_emb.float(), dim=-1) @ class_text.T / tau
    t_logits = F.normalize(teacher_emb.float(), dim=-1) @ class_text.T / tau
    keep = torch.ones(len(s_logits), device=s_logits.device) if valid is None else valid.float()
    if correct_only:
        keep = keep * (t_logits.argmax(-1) == labels).float()
    if topk:
        top = t_logits.topk(min(topk, class_text.shape[0]), dim=-1).indices
        s_logits, t_logits = s_logits.gather(1, top), t_logits.gather(1, top)
    p_t, log_p_t = F.softmax(t_logits, -1), F.log_softmax(t_logits, -1)
    kl = (p_t * (log_p_t - F.log_softmax(s_logits, -1))).sum(-1)
    return (kl * keep).sum() / keep.sum().clamp(min=1)


def gather_rows(x):
    """All processes' rows in rank order; only this process's carry gradient (others: copies)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def global_info_nce(img_emb, txt_emb, logit_scale, labels, valid, mask_same_class):
    """The text InfoNCE over every process's rows: the step of one process on the N x B batch."""
    n = dist.get_world_size()
    img, txt, labels, valid = (None if t is None else gather_rows(t)
                               for t in (img_emb, txt_emb, labels, valid))
    # Each process computes the whole loss, but its gradient reaches only its own rows (the gathered
    # ones are copies); DDP then averages over the N processes. Scaled by N, each process's own rows
    # get their full gradient. The temperature is one shared parameter that every process's loss
    # reaches: through scale / N its gradient is 1/N of the full one, N x 1/N = 1 after the scaling,
    # the full gradient after DDP's average. Both tricks keep the values: only gradients change.
    scale = logit_scale / n + logit_scale.detach() * (1 - 1 / n)
    loss = info_nce(img, txt, scale, labels, mask_same_class, valid)
    return loss * n - loss.detach() * (n - 1)


def text_loss(img_emb, txt_emb, logit_scale, labels, valid, mask_same_class, local_negatives):
    """VLM-KD's image-caption InfoNCE, over all processes' rows unless --local-negatives."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
            and not local_negatives:
        return global_info_nce(img_emb, txt_emb, logit_scale, labels, valid, mask_same_class)
    return info_nce(img_emb, txt_emb, logit_scale, labels, mask_same_class, valid)


@dataclass
class LossInputs:
    """A step's batch and the model's outputs on it: what the loss terms read (None: not in this
    run). The per-image inputs (text_valid, teacher_emb, teacher_valid) are the batch's rows."""
    labels: torch.Tensor
    logits: torch.Tensor                # the student's class scores
    log_prior: torch.Tensor             # log frequency of each training class
    clip_emb: torch.Tensor | None       # clip_proj(features), in the CLIP teacher's space
    img_emb: torch.Tensor | None        # the image and its caption in the text head's space
    txt_emb: torch.Tensor | None
    logit_scale: torch.Tensor | None    # 1 / the text InfoNCE's temperature (learnt: --learn-temp)
    text_valid: torch.Tensor | None     # the rows with a caption (None: all)
    teacher_logits: torch.Tensor | None  # the frozen vision teacher's (--teacher)
    teacher_emb: torch.Tensor | None    # the CLIP teacher's image embeddings (--teacher-images)
    teacher_valid: torch.Tensor | None  # the rows with a teacher embedding (None: all)
    class_text: torch.Tensor | None     # CLIP text embedding of each class (--class-text)


def loss_terms(cfg, sup, x=None):
    """The loss, term by term: {name: (weight, value)}; the step minimises the sum of weight x
    value. A term is on where its inputs are given and its weight is not 0. The names are
    metrics.jsonl's columns and final.pt["losses"]'s keys. Without the step's inputs `x`, the values
    are None: the run's terms and weights alone (logging, final.pt)."""
    def on(weight, *inputs):
        return weight > 0 and all(given is not None for given in inputs)
    tau_cls = {"ce": 0.0, "la": cfg.tau_la, "bs": 1.0}[cfg.loss]  # the prior's share in the logits
    kinds, scale = comma_list(cfg.imitate_loss), 1 / cfg.tau  # L-cst at Li et al.'s one temperature
    terms = {"loss_cls": (1.0, x and prior_adjusted_ce(x.logits, x.labels, x.log_prior, tau_cls,
                                                       cfg.label_smoothing))}
    if on(cfg.text_weight, sup.text_feats):
        terms["loss_text"] = cfg.text_weight, x and text_loss(
            x.img_emb, x.txt_emb, x.logit_scale, x.labels, x.text_valid, cfg.mask_same_class,
            cfg.local_negatives)
    if on(cfg.kd_weight, sup.teacher):
        terms["loss_kd"] = cfg.kd_weight, x and logit_kd(x.logits, x.teacher_logits, cfg.kd_temp)
    if on(cfg.imitate_weight, sup.teacher_images) and "mse" in kinds:
        terms["loss_imitate"] = cfg.imitate_weight, x and imitation_loss(
            x.clip_emb, x.teacher_emb, "mse", scale, x.teacher_valid)
    if on(cfg.imitate_weight, sup.teacher_images) and "contrastive" in kinds:
        terms["loss_imitate_cst"] = cfg.imitate_weight, x and imitation_loss(
            x.clip_emb, x.teacher_emb, "contrastive", scale, x.teacher_valid)
    if on(cfg.align_weight, sup.teacher_images, sup.class_text):
        terms["loss_align"] = cfg.align_weight, x and alignment_loss(
            x.clip_emb, x.teacher_emb, x.class_text, cfg.tau, x.labels, cfg.align_topk,
            cfg.align_correct_only, x.teacher_valid)
    return terms


# --- data: the .beton cache of a split, its loader, and the splits' classes

class SplitImages:
    """(RGB image, label, row index) per split line, for ffcv's DatasetWriter."""

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
    """None if the image decodes completely, else why not. verify() reads headers only: a JPEG cut
    off after its header passes it and then kills ffcv's writer, so every pixel is decoded here."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]
    return None


# ffcv 1.0.2's DatasetWriter (requirements.txt pins that version) never looks at its worker
# processes: its parent polls a done counter with sleep(0.1) until every sample is counted, then
# blocks in Queue.get() for each worker's allocations. A worker that dies (a full disk, an image
# changed since it was checked) leaves it waiting forever. ffcv.writer looks up Process, sleep and
# Queue by module name when it writes, so write_beton swaps in these watched ones for one write.

class WatchedProcess(multiprocessing.Process):
    """ffcv.writer.Process, each worker started recorded (with the process that started them)."""
    parent, started = 0, []

    def start(self):
        WatchedProcess.started.append(self)
        super().start()


def fail_if_a_writer_died():
    """Kill the other workers and raise if one has exited with an error. The workers (forked with
    a copy of the list) pass through WatchedQueue too: only the parent may ask."""
    if os.getpid() != WatchedProcess.parent:
        return
    dead = [p.exitcode for p in WatchedProcess.started if p.exitcode not in (None, 0)]
    if dead:
        for p in WatchedProcess.started:
            p.kill()
        raise RuntimeError(f"an ffcv writer worker died (exit code {dead[0]}; its error is printed "
                           f"above)")


class WatchedQueue(multiprocessing.queues.Queue):
    """ffcv.writer.Queue: get() looks at the workers every second instead of blocking for good."""

    def __init__(self):
        super().__init__(0, ctx=multiprocessing.get_context())

    def get(self, block=True, timeout=None):
        while True:
            try:
                return super().get(timeout=1.0)
            except queue.Empty:
                fail_if_a_writer_died()


def sleep_or_fail(seconds):
    """ffcv.writer.sleep, between its polls of the done counter."""
    fail_if_a_writer_died()
    time.sleep(seconds)


def write_beton(tmp, dataset, indices, max_res):
    """ffcv's DatasetWriter, watched: a worker that dies stops the write with an error."""
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    # Images of up to 64 x 64 pixels are stored raw (no JPEG loss, nothing to decode), larger ones
    # as JPEG, which keeps the cache of a large set small.
    columns = {"image": RGBImageField(write_mode="smart", max_resolution=max_res,
                                      smart_threshold=64 * 64 * 3),
               "label": IntField(), "index": IntField()}
    writer = ffcv.writer.DatasetWriter(str(tmp), columns, num_workers=max(1, os.cpu_count() or 1))
    WatchedProcess.parent, WatchedProcess.started = os.getpid(), []
    # ffcv's own tqdm redraws with '\r': a job log would get one endless line.
    desc = f"caching {tmp.name.split('.')[0]}.beton"
    watched = {"Process": WatchedProcess, "sleep": sleep_or_fail, "Queue": WatchedQueue,
               "tqdm": lambda total: progress_bar(total, "img", desc=desc)}
    saved = {name: getattr(ffcv.writer, name) for name in watched}
    for name, value in watched.items():
        setattr(ffcv.writer, name, value)
    try:
        writer.from_indexed_dataset(dataset, indices=indices, chunksize=64)
    except BaseException:
        if getattr(writer, "metadata_sm", None) is not None:  # else the resource tracker warns
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        raise
    finally:
        for name, value in saved.items():
            setattr(ffcv.writer, name, value)


def remove_stale_tmp(folder):
    """Leftovers of a killed write: `<name>.<pid>.tmp` whose process is gone."""
    for tmp in folder.glob("*.tmp"):
        pid = tmp.suffixes[-2].lstrip(".") if len(tmp.suffixes) >= 2 else ""
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            tmp.unlink(missing_ok=True)


def image_stats(root, items):
    """sha256 of every image's (size, mtime, ctime, inode): one stat per file, no pixel read, yet a
    repaired, replaced or renamed-over image changes it (renamed over: a new inode, same mtime)."""
    digest = hashlib.sha256()
    for rel, _ in items:
        try:
            st = os.stat(root / rel)
            digest.update(f"{st.st_size},{st.st_mtime_ns},{st.st_ctime_ns},{st.st_ino}\n".encode())
        except OSError:
            digest.update(b"missing\n")
    return digest.hexdigest()


def beton_for(cfg, split, accelerator):
    """The split's .beton: written once (rank 0; the others wait), reused while its key holds."""
    split_path = Path(cfg.data) / split
    # The key covers the split's text, the write settings and a stat of every image: an image
    # replaced under the same split line must not be trained on from the old cache.
    items = read_split(split_path)
    images = image_stats(Path(cfg.data), items)
    key = hashlib.sha256(split_path.read_bytes() + f"|{images}|{cfg.max_res}|smart64".encode())
    path = Path(cfg.data) / ".ffcv" / f"{split_path.stem}-{key.hexdigest()[:16]}.beton"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not path.exists():
            path.parent.mkdir(exist_ok=True)
            remove_stale_tmp(path.parent)
            good = readable_rows(cfg, split_path, items, path.with_suffix(".errors.jsonl"))
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
            failure = None
            try:
                write_beton(tmp, SplitImages(cfg.data, items, cfg.max_res), good, cfg.max_res)
            except (RuntimeError, OSError) as e:
                failure = first_line(e)
            if failure:  # outside the except: ffcv's progress bar is gone before the error line
                tmp.unlink(missing_ok=True)
                die(f"writing the training cache {path} failed: {failure}")
            os.replace(tmp, path)  # a half-written cache is never picked up
    return path


def readable_rows(cfg, split_path, items, errors_path):
    """The rows whose image decodes in full. The others are listed in `errors_path` and skipped; the
    row index each sample carries keeps the per-image text rows aligned."""
    # Threads: at ImageNet scale a serial pass over every file is minutes of start-up.
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        paths = [Path(cfg.data) / rel for rel, _ in items]
        errors = list(progress_bar(len(items), "img", desc=f"checking {split_path.name}",
                                   iterable=pool.map(decode_error, paths, chunksize=256)))
    good = [i for i, e in enumerate(errors) if e is None]
    if not good:  # a wrong or emptied --data, not N bad images: nothing is recorded or cached
        die(f"none of the {len(items)} images of {split_path} can be read (first: {items[0][0]}: "
            f"{errors[0]}); is --data {cfg.data} the folder prepare.py wrote?")
    bad = [{"index": i, "path": items[i][0], "error": e} for i, e in enumerate(errors)
           if e is not None]
    if bad:
        errors_path.write_text("".join(json.dumps(b) + "\n" for b in bad))
        print(f"train.py: {len(bad)} unreadable images in {split_path} skipped, listed in "
              f"{errors_path}")
    return good


# ffcv draws crops from numba's np.random, one unseeded state per decoding thread: which thread
# decodes which image decides its crop, so neither a rerun nor a resumed run would see the same
# crops. decode() below is ffcv 1.0.2's ResizedCropRGBImageDecoder.generate_code copied (its loop is
# one compiled function: there is no hook to seed from outside) with one line added, np.random.seed.
def make_seeded_rrc():
    """ffcv's RandomResizedCrop decoder with each crop drawn from a seed of (batch, sample)."""
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
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0,
                                   1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width]
                        temp_buffer = temp_buffer.reshape(height, width, 3)
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
    """An ffcv traversal order for Li et al.'s few-shot finetune: each batch of B is B // 2 images
    of the OOD classes (labels from the first after id_classes.txt), drawn afresh each batch
    (without repeats while there are enough), and B - B // 2 of the others, each of those once an
    epoch (this process's share of a seeded permutation)."""
    from ffcv.traversal_order.base import TraversalOrder
    first_ood = len(read_classes(Path(cfg.data) / "id_classes.txt"))
    rank, world, half = accelerator.process_index, accelerator.num_processes, cfg.batch_size // 2
    rest = cfg.batch_size - half

    class HalfOOD(TraversalOrder):
        def __init__(self):  # bound by __call__: ffcv calls the order it is given with the loader
            pass

        def __call__(self, loader):
            super().__init__(loader)
            labels = loader.reader.metadata[f"f{loader.reader.field_names.index('label')}"]
            labels = labels[self.indices]
            self.ood = self.indices[labels >= first_ood]
            self.others = self.indices[labels < first_ood]
            if not len(self.ood) or len(self.others) < world * rest:
                die(f"--ood-half-batch: {cfg.train_split} has {len(self.ood)} images of the "
                    f"classes after id_classes.txt and {len(self.others)} others; it needs some of "
                    f"each (a batch's worth of others)")
            return self

        def sample_order(self, epoch):
            shared = np.random.default_rng([cfg.seed, epoch])  # one permutation, split by process
            own = np.random.default_rng([cfg.seed, epoch, rank])
            others = shared.permutation(self.others)[rank::world]
            order = []
            for b in range(len(others) // rest):
                shots = own.choice(self.ood, half, replace=len(self.ood) < half)
                batch = np.concatenate([shots, others[b * rest:(b + 1) * rest]])
                order.append(own.permutation(batch))
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
    # The loader only decodes and copies uint8 (a quarter of float32's bytes) to the device; flip
    # and normalisation happen there (augment), the flip drawn from the step's seeded generator:
    # ffcv's own flip draws from the decoding threads' unseeded random state.
    image_pipe = [decoder, ToTensor(), ToDevice(device, non_blocking=True),
                  ToTorchImage(channels_last=True)]
    int_pipes = [[IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
                 for _ in range(2)]
    # ffcv also sets torch's CPU thread count to its worker count: on a CPU-only run, leave half the
    # cores to compute.
    cores = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    workers = cfg.workers if cfg.workers > 0 else \
        (cores if device.type == "cuda" else max(1, cores // 2))
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    if train and cfg.ood_half_batch:
        order = ood_half_order(cfg, accelerator)
    return Loader(str(beton), batch_size=cfg.batch_size, num_workers=workers, order=order,
                  drop_last=train, seed=cfg.seed, distributed=accelerator.num_processes > 1,
                  pipelines={"image": image_pipe, "label": int_pipes[0], "index": int_pipes[1]})


def make_loaders(cfg, data, sup, accelerator):
    """(train, val, OOD or None) loaders, each split's .beton written first if not cached."""
    train = make_loader(cfg, beton_for(cfg, cfg.train_split, accelerator), True, accelerator)
    val = make_loader(cfg, beton_for(cfg, cfg.val_split, accelerator), False, accelerator)
    ood = None
    if sup.ood:
        ood = make_loader(cfg, beton_for(cfg, cfg.ood_split, accelerator), False, accelerator)
    if len(train) == 0:
        die(f"{data.train_path}: fewer readable images than --batch-size {cfg.batch_size} per "
            f"process")
    return train, val, ood


@dataclass
class Data:
    """The class names, both splits (every line checked before any work), the training prior."""
    class_names: list
    train_items: list                # (relative path, label) per line of --train-split
    val_items: list
    class_counts: np.ndarray         # training images per class
    log_prior: torch.Tensor          # log of each class's share of the training images
    train_path: Path
    classes_path: Path
    train_sha256: str

    @property
    def num_classes(self):
        return len(self.class_names)


def load_data(cfg):
    root = Path(cfg.data)
    class_names = read_classes(root / cfg.classes)
    train_items = read_split(root / cfg.train_split, len(class_names))
    val_items = read_split(root / cfg.val_split, len(class_names))
    class_counts = np.bincount([y for _, y in train_items], minlength=len(class_names))
    if (class_counts == 0).any() and cfg.loss != "ce":
        empty = np.flatnonzero(class_counts == 0)[:5].tolist()
        die(f"{root / cfg.train_split}: classes {empty} have no images; --loss {cfg.loss} needs "
            f"every class (use --classes id_classes.txt for OOD sets)")
    prior = class_counts.clip(min=1) / class_counts.sum()
    return Data(class_names, train_items, val_items, class_counts,
                torch.log(torch.as_tensor(prior, dtype=torch.float32)), root / cfg.train_split,
                root / cfg.classes, sha256_file(root / cfg.train_split))


# --- supervision: the optional inputs, each checked against the training split and its classes

@dataclass
class OodSplit:
    """--ood-split: scored within its classes, through clip_proj against their class texts."""
    text: torch.Tensor       # CLIP text embedding of each OOD class
    first: int               # the label of the first OOD class
    sha256: str


@dataclass
class Supervision:
    """Every optional input (None or empty: not given). `identity` holds a sha256 per input, the
    training and val splits included: a resume must see the same ones."""
    text_feats: torch.Tensor | None = None     # [N, P, D] caption features on the device, fp16
    text_valid: torch.Tensor | None = None     # the rows with captions (None: every row)
    text_meta: dict = field(default_factory=dict)  # text.npy's sidecar
    prompts: list = field(default_factory=list)    # the prompt ids of the slots trained on
    class_text: torch.Tensor | None = None     # [C, D] CLIP text embedding of each training class
    teacher: nn.Module | None = None           # the frozen vision teacher (--teacher)
    teacher_images: torch.Tensor | None = None  # [N, D] CLIP image embeddings on the device, fp16
    teacher_valid: torch.Tensor | None = None
    ood: OodSplit | None = None
    made_with: dict = field(default_factory=dict)  # teacher and template of the CLIP inputs
    identity: dict = field(default_factory=dict)


def load_supervision(cfg, data, device):
    """Every optional input, verified against this split and its classes before any work."""
    sup = Supervision(identity={"train_split": data.train_sha256,
                                "val_split": sha256_file(Path(cfg.data) / cfg.val_split),
                                "classes": sha256_file(data.classes_path)})
    if cfg.text and cfg.text_weight > 0:
        sup.text_feats, sup.text_valid, sup.text_meta, sup.prompts = load_text(cfg, data, device)
        sup.identity["text"] = sup.text_meta["sha256"]
    if cfg.class_text:
        class_texts, meta = load_artifact(cfg.class_text, "classes")
        sup.class_text = training_class_texts(cfg, data, class_texts, meta)
        sup.identity["class_text"] = meta["sha256"]
        sup.made_with["template"] = meta.get("template")
    if cfg.head == "cosine" and sup.class_text is None:
        die("--head cosine needs --class-text classes.npy (encode.py --classes)")
    if cfg.teacher_images:
        load_teacher_images(cfg, data, sup, device)
    if cfg.teacher and cfg.kd_weight > 0:
        sup.teacher = load_teacher(cfg, data, device)
        sup.identity["teacher"] = sha256_file(cfg.teacher)
    if cfg.init:
        if not Path(cfg.init).is_file():
            die(f"--init {cfg.init} not found")
        sup.identity["init"] = sha256_file(cfg.init)
    if cfg.ood_split:  # check_config saw --class-text with it
        sup.ood = load_ood(cfg, data, class_texts, meta)
        sup.identity["ood_split"] = sup.ood.sha256
    check_recipe_inputs(cfg, sup)
    return sup


def per_image_artifact(path, kind, data):
    """An encode.py array of this training split (sidecar verified, rows finite), rows to skip."""
    array, sidecar = load_artifact(path, kind)
    split_sha = data.train_sha256
    if array.shape[0] != len(data.train_items) or sidecar.get("split_sha256") != split_sha:
        same = "matches" if sidecar.get("split_sha256") == split_sha else "differs"
        die(f"{path} was made from another split than {data.train_path} (rows {array.shape[0]} vs "
            f"{len(data.train_items)}, split_sha256 {same}): re-run encode.py on this split")
    missing = sidecar.get("missing_rows") or []
    if not all(isinstance(r, int) and 0 <= r < array.shape[0] for r in missing):
        die(f"{Path(path).with_suffix('.json')}: missing_rows must be row numbers below "
            f"{array.shape[0]}")
    return array, sidecar, missing


def valid_rows(num_rows, missing, device):
    """True for rows with supervision; None when every row has it (the loss then needs no mask)."""
    if not missing:
        return None
    valid = torch.ones(num_rows, dtype=torch.bool)
    valid[missing] = False
    return valid.to(device)


def rows_to_device(array, slots, device, chunk=65536):
    """array[:, slots] ([N, P, D] memmap) or the whole [N, D] array as an fp16 device tensor, read
    one slot and one block of rows at a time: the host never holds a full copy, and slots not
    trained on are never read."""
    if slots is None:
        result = torch.empty(array.shape, dtype=torch.float16, device=device)
        for start in range(0, array.shape[0], chunk):
            block = np.asarray(array[start:start + chunk], dtype=np.float16)
            result[start:start + chunk] = torch.from_numpy(block)
        return result
    result = torch.empty((array.shape[0], len(slots), array.shape[2]), dtype=torch.float16,
                         device=device)
    for k, slot in enumerate(slots):
        for start in range(0, array.shape[0], chunk):
            block = np.ascontiguousarray(array[start:start + chunk, slot], dtype=np.float16)
            result[start:start + chunk, k] = torch.from_numpy(block)
    return result


def load_text(cfg, data, device):
    """VLM caption features of the chosen prompt slots, by the ids the (bound) sidecar lists."""
    array, sidecar, missing = per_image_artifact(cfg.text, "text", data)
    slot_ids = [str(p) for p in sidecar.get("prompts") or []]
    if len(slot_ids) != array.shape[1]:
        die(f"{Path(cfg.text).with_suffix('.json')}: prompts lists {len(slot_ids)} ids for "
            f"{array.shape[1]} slots")
    wanted = comma_list(cfg.prompts) or slot_ids
    unknown = [p for p in wanted if p not in slot_ids]
    if unknown:
        die(f"--prompts {','.join(unknown)} not in {cfg.text} (its prompts: {','.join(slot_ids)})")
    feats = rows_to_device(array, [slot_ids.index(p) for p in wanted], device)
    return feats, valid_rows(len(feats), missing, device), sidecar, wanted


def training_class_texts(cfg, data, array, sidecar):
    """The training classes' rows of classes.npy, checked by name (ID classes come first)."""
    names = sidecar.get("names")
    if not isinstance(names, list) or names[:data.num_classes] != data.class_names:
        sidecar_name = Path(cfg.class_text).with_suffix('.json').name
        die(f"{cfg.class_text}: its classes ({sidecar_name} names) do not start with the "
            f"{data.num_classes} classes of {data.classes_path}")
    return torch.from_numpy(np.asarray(array[:data.num_classes], dtype=np.float32))


def load_teacher_images(cfg, data, sup, device):
    """--teacher-images on the device, as wide as --class-text."""
    array, meta, missing = per_image_artifact(cfg.teacher_images, "images", data)
    if sup.class_text is not None and sup.class_text.shape[1] != array.shape[1]:
        die(f"--class-text width {sup.class_text.shape[1]} != --teacher-images width "
            f"{array.shape[1]}: use one CLIP model for both")
    sup.teacher_images = rows_to_device(array, None, device)
    sup.teacher_valid = valid_rows(len(array), missing, device)
    sup.identity["teacher_images"] = meta["sha256"]
    sup.made_with["teacher"] = f"{meta.get('encoder')} {meta.get('encoder_path')}"


def read_final(path, option):
    """An earlier run's final.pt (plain tensors only); a torn or foreign one: a line naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != "vlmkd-final-1":
            raise ValueError(f"format {ckpt.get('format')!r}, not vlmkd-final-1")
    except Exception as e:
        die(f"{option} {path} cannot be loaded as a final.pt ({first_line(e)})")
    return ckpt


def load_teacher(cfg, data, device):
    """A frozen earlier student for logit KD."""
    ckpt = read_final(cfg.teacher, "--teacher")
    if ckpt.get("classes") != data.class_names:
        die(f"--teacher {cfg.teacher} was trained on other classes than {data.classes_path}")
    teacher = student_from_final(ckpt)
    return teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


def load_ood(cfg, data, array, sidecar):
    """--ood-split and the class texts of its classes: the rows of --class-text after
    id_classes.txt (after the training classes without that file)."""
    names, id_path = sidecar.get("names") or [], Path(cfg.data) / "id_classes.txt"
    first = data.num_classes
    if id_path.is_file():
        id_names = read_classes(id_path)
        if names[:len(id_names)] != id_names:
            die(f"{cfg.class_text}: its classes do not start with the {len(id_names)} classes of "
                f"{id_path}")
        first = len(id_names)
    if len(names) <= first:
        die(f"{cfg.class_text} has no class after the {first} ID classes: --ood-split has nothing "
            f"to be scored on")
    path = Path(cfg.data) / cfg.ood_split
    items = read_split(path, len(names))
    n, label = next(((n, y) for n, (_, y) in enumerate(items, 1) if y < first), (0, 0))
    if n:
        die(f"{path}:{n}: label {label} is an ID class: --ood-split holds images of the "
            f"{len(names) - first} classes after the first {first}")
    return OodSplit(torch.from_numpy(np.asarray(array[first:], dtype=np.float32)), first,
                    sha256_file(path))


def check_recipe_inputs(cfg, sup):
    """Warnings (rank 0) where a Li et al. recipe's inputs differ from the published ones."""
    if cfg.recipe.startswith("li-") and is_main_process():
        teacher, template = sup.made_with.get("teacher", ""), sup.made_with.get("template")
        if LI_TEACHER not in teacher.lower():
            warn(f"--recipe {cfg.recipe}: Li et al.'s teacher is CLIP ViT-L/14 at 224 px "
                 f"(openai/{LI_TEACHER}); --teacher-images was made with {teacher.split()[0]}")
        if template is not None and template != LI_TEMPLATE:
            warn(f"--recipe {cfg.recipe}: Li et al.'s class text is {LI_TEMPLATE!r}; --class-text "
                 f"was made with {template!r} (encode.py --template)")


# --- step: the optimiser and its schedule, then one optimisation step

def make_optimizer(cfg, model, num_processes, steps_per_epoch):
    """SGD or AdamW, no decay on biases, norms (unless --decay-all) and the temperature; --schedule
    per step (cosine, step, after a linear warmup) or per epoch (onecycle)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    temp = [p for n, p in named if n.endswith("log_scale")]
    decays = {n: (p.ndim > 1 or cfg.decay_all) and not n.endswith("log_scale") for n, p in named}
    groups = [{"params": [p for n, p in named if decays[n]], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if not decays[n] and not n.endswith("log_scale")],
               "weight_decay": 0.0}]
    # The learnt temperature gets its own lr: at the backbone's SGD lr (0.1) it collapsed, the logit
    # scale falling from 14.3 to 5.4 in two epochs. No decay either: that would pull it to T = 1.
    if temp:
        groups.append({"params": temp, "weight_decay": 0.0, "lr": cfg.temp_lr})
    groups = [g for g in groups if g["params"]]
    lr = cfg.lr * cfg.batch_size * num_processes / 128  # linear scaling: --lr is at a batch of 128
    for g in groups:
        g.setdefault("lr", lr)
    optimizer = (torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=cfg.nesterov)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(groups, lr=lr))
    if cfg.schedule == "onecycle":  # torch's OneCycleLR needs 2 steps at least
        one_cycle = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(2, cfg.epochs))
        return optimizer, EveryEpoch(one_cycle, steps_per_epoch, cfg.epochs)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    milestones = [int(m) for m in comma_list(cfg.milestones)]
    factor = warmup_cosine(warmup, total) if cfg.schedule == "cosine" else \
        warmup_step(warmup, steps_per_epoch, milestones, cfg.gamma)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_cosine(warmup, total):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def warmup_step(warmup, steps_per_epoch, milestones, gamma):
    """x gamma from each milestone epoch's first step on (Li et al. lower it as an epoch starts)."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return gamma ** sum(step // steps_per_epoch >= m for m in milestones)
    return factor


class EveryEpoch:
    """Steps a scheduler as each epoch but the last ends: Li et al. step OneCycleLR once an epoch,
    so epoch e trains at its step e."""

    def __init__(self, scheduler, steps_per_epoch, epochs):
        self.scheduler, self.steps_per_epoch, self.epochs, self.steps = \
            scheduler, steps_per_epoch, epochs, 0

    def step(self):
        self.steps += 1
        epoch_ends = self.steps % self.steps_per_epoch == 0
        if epoch_ends and self.steps < self.epochs * self.steps_per_epoch:
            self.scheduler.step()

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self):
        return {"steps": self.steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.steps = state["steps"]
        self.scheduler.load_state_dict(state["scheduler"])


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pixel_mean_std(device):
    """ImageNet statistics on the 0-255 scale of ffcv's uint8 batches, to broadcast over NCHW."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(images, mean, std):
    return (images.float() - mean) / std


@dataclass
class Trainer:
    """What an optimisation step reads and updates (make_trainer builds it, train_step steps it)."""
    cfg: Config
    accelerator: Accelerator
    model: nn.Module                 # the Model as prepared: compiled (--compile), DDP-wrapped
    core: Model                      # the same Model unwrapped: its weights, text head, class texts
    optimizer: torch.optim.Optimizer
    scheduler: object                # stepped every step (EveryEpoch makes that once an epoch)
    sup: Supervision
    ema: list | None                 # the student's state dict averaged (--ema), in its order
    live: list                       # the student's own parameters and buffers (make_trainer)
    log_prior: torch.Tensor          # on the device, like the pixel statistics
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor


def make_trainer(cfg, accelerator, model, optimizer, scheduler, ema, sup, log_prior):
    """`model` (a Model) compiled with --compile and prepared for the processes, and the rest of
    what the step needs on the device."""
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    core = getattr(core, "_orig_mod", core)  # torch.compile's wrapper holds the Model there
    # state_dict() hands out the student's tensors themselves (detached, same storage), which the
    # optimiser and BatchNorm update in place: this one list lets the EMA read the live weights
    # every step without building a state dict each time.
    live = list(core.student.state_dict().values())
    mean, std = pixel_mean_std(accelerator.device)
    return Trainer(cfg, accelerator, model, core, optimizer, scheduler, sup, ema, live,
                   log_prior.to(accelerator.device), mean, std)


def augment(t, images, indices, gen):
    """A random flip and the normalisation, on the device (see make_loader), and one of each
    image's P captions, drawn afresh every step; both from the step's seeded generator `gen`."""
    device = t.accelerator.device
    flip = torch.rand(len(images), device=device, generator=gen) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    images = normalize(images, t.pixel_mean, t.pixel_std)
    images = images.contiguous(memory_format=torch.channels_last)
    texts = None
    if t.sup.text_feats is not None:
        slot = torch.randint(t.sup.text_feats.shape[1], (len(indices),), device=device,
                             generator=gen)
        texts = t.sup.text_feats[indices, slot].float()
    return images, texts


def rows_of(tensor, indices):
    return None if tensor is None else tensor[indices]


def loss_inputs(t, images, texts, labels, indices):
    """The model (and the frozen vision teacher) on the batch, and the batch's supervision rows."""
    logits, clip_emb, img_emb, txt_emb = t.model(images, texts)
    head, sup = t.core.text_head, t.sup
    logit_scale = None if head is None else head.log_scale.exp()
    teacher_logits = None
    if sup.teacher is not None:
        with torch.no_grad():
            teacher_logits = sup.teacher(images)[1]
    return LossInputs(labels, logits, t.log_prior, clip_emb, img_emb, txt_emb, logit_scale,
                      rows_of(sup.text_valid, indices), teacher_logits,
                      rows_of(sup.teacher_images, indices), rows_of(sup.teacher_valid, indices),
                      t.core.student.class_text)


def train_step(t, images, labels, indices, gen):
    """One optimisation step on a loader batch. Returns [loss, *terms] as one device tensor (to
    read it is a host sync: the caller decides when)."""
    images, texts = augment(t, images, indices, gen)
    with t.accelerator.autocast():
        terms = loss_terms(t.cfg, t.sup, loss_inputs(t, images, texts, labels, indices))
        loss = sum(weight * value for weight, value in terms.values())
    t.accelerator.backward(loss)
    if t.cfg.grad_clip > 0:
        t.accelerator.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        update_ema(t.ema, t.live, t.cfg.ema)
    return torch.stack([loss.detach().float()]
                       + [value.detach().float() for _, value in terms.values()])


def update_ema(ema, current, decay):
    """ema <- decay * ema + (1 - decay) * current for float tensors; counters (BN's) are copied."""
    floats = [i for i, t in enumerate(current) if t.is_floating_point()]
    torch._foreach_lerp_([ema[i] for i in floats], [current[i].detach() for i in floats], 1 - decay)
    for i in set(range(len(current))) - set(floats):
        ema[i].copy_(current[i])


def swap_in_ema(core, weights):
    """Load `weights` (a list in state-dict order) into the student; returns the ones it had."""
    if weights is None:
        return None
    current = [t.detach().clone() for t in core.student.state_dict().values()]
    for t, w in zip(core.student.state_dict().values(), weights):
        t.copy_(w)
    return current


# --- loop: epochs of steps, a metrics row every --log-every steps, evaluation and ckpt.pt per epoch

@dataclass
class Progress:
    """Where training stands (ckpt.pt holds it): a resume starts from here."""
    epoch: int = 0                        # the next epoch to train
    step: int = 0                         # steps taken
    running: torch.Tensor | None = None   # [loss, *terms] summed since the last metrics row
    last_log: int = 0                     # the step of the last metrics row
    val: tuple | None = None              # (epoch, val top-1) of the last evaluation


@dataclass
class Run:
    """Everything a run works with once its inputs are loaded and its model is built."""
    cfg: Config
    accelerator: Accelerator
    out: Path
    data: Data
    sup: Supervision
    trainer: Trainer
    weights: dict                    # {loss term: weight}: loss_terms without a step
    train_loader: object
    val_loader: object
    ood_loader: object | None


@dataclass
class Loop:
    """The loop's state. The sums and the finite check stay on the device: the host reads them (a
    sync that stalls a GPU's queue of work) only when a metrics row is written, not every step."""
    step: int
    total_steps: int
    running: torch.Tensor       # [loss, *terms] summed since the last row
    bad_step: torch.Tensor      # the first step whose loss or a term was not finite; -1: none
    last_log: int               # the step of the last row
    last_time: float
    bar: object
    images_seen: int = 0        # since the last row, over all processes


def train(run, progress):
    """The epochs from progress.epoch on; returns the steps taken in all (a resume's included)."""
    cfg, device = run.cfg, run.accelerator.device
    total_steps = cfg.epochs * cfg.repeat_epochs * len(run.train_loader)
    running = torch.zeros(len(run.weights) + 1, device=device) if progress.running is None \
        else progress.running.to(device)
    bar = progress_bar(total_steps, "step", initial=progress.step,
                       disable=not run.accelerator.is_main_process)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)
    loop = Loop(progress.step, total_steps, running, bad_step, progress.last_log,
                time.perf_counter(), bar)
    run.train_loader.next_epoch = progress.epoch * cfg.repeat_epochs  # pass p: ffcv's seed + p
    try:  # the bar is closed before an error line, which stays the last line
        for epoch in range(progress.epoch, cfg.epochs):
            if cfg.max_steps and loop.step >= cfg.max_steps:  # resumed after --max-steps stopped it
                break
            seen = train_epoch(run, loop, epoch)
            end_epoch(run, loop, progress, epoch, seen)
            if loop.step == cfg.max_steps:
                break
    finally:
        bar.close()
    return loop.step


def passes(loader, repeat):
    """The loader's batches, `repeat` times over (one epoch of --repeat-epochs)."""
    for _ in range(repeat):
        yield from loader


def train_epoch(run, loop, epoch):
    """One epoch's steps. Returns how often each training row was seen (on this process)."""
    cfg, device = run.cfg, run.accelerator.device
    # A generator per epoch and process, seeded from both: a resumed run draws what an uninterrupted
    # one drew, and the processes draw different flips and captions.
    gen = torch.Generator(device).manual_seed(cfg.seed * 100_003 + epoch * 1009
                                              + run.accelerator.process_index)
    seen = torch.zeros(len(run.data.train_items), device=device, dtype=torch.int32)
    for images, labels, indices in passes(run.train_loader, cfg.repeat_epochs):
        seen.index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))
        values = train_step(run.trainer, images, labels, indices, gen)
        with torch.no_grad():  # no host sync here: accumulate on the device, read when logging
            loop.running += values
            failed = (loop.bad_step < 0) & ~torch.isfinite(values).all()
            loop.bad_step = torch.where(failed, loop.step, loop.bad_step)
        loop.step += 1
        loop.images_seen += len(images) * run.accelerator.num_processes
        loop.bar.update(1)
        if loop.step % cfg.log_every == 0 or loop.step in (loop.total_steps, cfg.max_steps):
            log_steps(run, loop, epoch)
        if loop.step == cfg.max_steps:
            break
    return seen


def log_steps(run, loop, epoch):
    """A metrics row of the steps since the last one: mean loss and terms, lr, images/s."""
    require_finite_loss(run, loop)
    now = time.perf_counter()
    avg = (loop.running / (loop.step - loop.last_log)).tolist()
    lr = run.trainer.scheduler.get_last_lr()[0]  # stepped already: the next step's lr
    row = {"step": loop.step, "epoch": epoch, "lr": lr, "loss": avg[0]}
    row |= dict(zip(run.weights, avg[1:]))
    row["img_per_s"] = loop.images_seen / (now - loop.last_time)
    head = run.trainer.core.text_head
    if head is not None:
        row["text_logit_scale"] = head.log_scale.exp().item()
    log(run, row)
    # No refresh: off a terminal the bar's lines stay one per 30 s, not one per metrics row.
    loop.bar.set_postfix_str(f"{loss_summary(avg, run.weights)}, {row['img_per_s']:.0f} img/s",
                             refresh=False)
    loop.running.zero_()
    loop.last_log, loop.last_time, loop.images_seen = loop.step, now, 0


def log(run, row):
    if run.accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    run.accelerator.log(numbers, step=row["step"])


def loss_summary(avg, weights):
    """The bar's loss: the weighted total and its terms, named as in metrics.jsonl (`total 4.81 =
    cls 0.36 + text 4.45`): a bare total of several terms would read like a classification loss."""
    parts = [f"{'' if w == 1 else f'{w:g} x '}{name.removeprefix('loss_')} {v:.3f}"
             for (name, w), v in zip(weights.items(), avg[1:])]
    if len(parts) == 1:  # loss_cls alone, at weight 1
        return parts[0]
    return f"total {avg[0]:.3f} = " + " + ".join(parts)


def end_epoch(run, loop, progress, epoch, seen):
    """The finite check, the rows seen, validation (every --eval-every epochs and after the last)
    and ckpt.pt, after the epoch's rows: a resume from it re-logs none."""
    require_finite_loss(run, loop)
    seen = run.accelerator.reduce(seen, "sum")  # a row seen twice in one epoch means a sharding bug
    log(run, {"epoch": epoch, "step": loop.step, "rows_seen": int((seen > 0).sum()),
              "rows_max_repeat": int(seen.max())})
    if (epoch + 1) % run.cfg.eval_every == 0 or epoch + 1 == run.cfg.epochs:
        progress.val = validate(run, epoch, loop.step)
    save_checkpoint(run, epoch, loop)
    run.accelerator.wait_for_everyone()


def require_finite_loss(run, loop):
    if loop.bad_step.item() >= 0:
        parts = dict(zip(["loss", *run.weights], loop.running.tolist()))
        die(f"non-finite loss at step {loop.bad_step.item()} (running sums {parts}); "
            f"{last_good(run.out)}")


def validate(run, epoch, step):
    """--val-split (and --ood-split) scored with the EMA weights if --ema; (epoch, val top-1)."""
    core, accelerator = run.trainer.core, run.accelerator
    trained = swap_in_ema(core, run.trainer.ema)
    acc = evaluate(core, run.val_loader, accelerator, run.data.class_counts)
    ood = evaluate_ood(core, run.ood_loader, accelerator, run.sup.ood) if run.ood_loader else {}
    swap_in_ema(core, trained)
    log(run, {"epoch": epoch, "step": step} | {f"val_{k}": v for k, v in acc.items()}
        | {f"val_ood_{k}": v for k, v in ood.items()})
    groups = " ".join(f"{k} {acc[k]:.3f}" for k in GROUPS if acc[k] is not None)
    ood_line = f", OOD mean per class {ood['mean_class']:.4f}" if ood else ""
    accelerator.print(f"epoch {epoch}: val top-1 {acc['top1']:.4f} ({groups}){ood_line}",
                      flush=True)
    return epoch, acc["top1"]


def group_accuracy(preds, labels, class_counts):
    """Top-1 overall and over OLTR's many / medium / few classes (None: no image of the group)."""
    groups = np.array([class_group(int(c)) for c in class_counts])[labels.numpy()]
    correct = (preds == labels).float()
    result = {"top1": correct.mean().item()}
    for name in GROUPS:
        mask = torch.from_numpy(groups == name)
        result[name] = correct[mask].mean().item() if mask.any() else None
    return result


def mean_class_accuracy(preds, labels):
    """Mean over the classes with images of each class's top-1 (Li et al.'s metric)."""
    right = (preds == labels).float()
    return float(np.mean([right[labels == c].mean().item() for c in torch.unique(labels)]))


@torch.no_grad()
def predictions(model, loader, accelerator, score):
    """(predictions, labels) of each row of the loader once; `score`: student outputs -> scores."""
    model.eval()
    mean, std = pixel_mean_std(accelerator.device)
    preds, labels, indices = [], [], []
    for images, y, idx in loader:
        with accelerator.autocast():
            preds.append(score(model.student(normalize(images, mean, std))).argmax(-1))
        labels.append(y.clone())  # ffcv reuses its buffers: keep copies
        indices.append(idx.clone())
    preds, labels, indices = (accelerator.gather(torch.cat(t)).cpu()
                              for t in (preds, labels, indices))
    # ffcv's distributed sampler pads with repeats: count each row once.
    indices, first = np.unique(indices.numpy(), return_index=True)
    model.train()
    return preds[first], labels[first]


def evaluate(model, loader, accelerator, class_counts):
    preds, labels = predictions(model, loader, accelerator, lambda out: out[1])
    return group_accuracy(preds, labels, class_counts) \
        | {"mean_class": mean_class_accuracy(preds, labels)}


def evaluate_ood(model, loader, accelerator, ood):
    """--ood-split within the OOD classes: clip_proj against their class texts (Li et al.'s)."""
    text = ood.text.to(accelerator.device)
    preds, labels = predictions(model, loader, accelerator,
                                lambda out: F.normalize(out[2].float(), dim=-1) @ text.T)
    preds = preds + ood.first
    return {"top1": (preds == labels).float().mean().item(),
            "mean_class": mean_class_accuracy(preds, labels)}


# --- checkpoints: ckpt.pt each epoch; a resume is refused unless settings and inputs are the same

def last_good(out):
    ckpt = Path(out) / "ckpt.pt"
    return f"the last good checkpoint is {ckpt} (--resume continues from it)" if ckpt.exists() \
        else "no checkpoint was written"


def require_finite_weights(core, ema, step, out):
    """No diverged model is ever written: every parameter and buffer (and EMA) must be finite."""
    named = list(core.state_dict().items()) + [(f"ema[{i}]", t) for i, t in enumerate(ema or [])]
    bad = [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        die(f"training diverged by step {step}: {len(bad)} weight tensors hold NaN or inf (first: "
            f"{bad[0]}); nothing written; {last_good(out)}")


def save_atomic(obj, path, out):
    """torch.save through a temporary file and a rename: a full disk is one line, the old file
    stays."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:
        tmp.unlink(missing_ok=True)
        die(f"cannot write {path} ({str(e).strip().splitlines()[-1][:200]}); {last_good(out)}")


def save_checkpoint(run, epoch, loop):
    t = run.trainer
    require_finite_weights(t.core, t.ema, loop.step, run.out)
    if run.accelerator.is_main_process:
        state = {"epoch": epoch, "step": loop.step, "config": asdict(run.cfg),
                 "inputs": run.sup.identity, "model": t.core.state_dict(),
                 "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                 "running": loop.running.cpu(), "last_log": loop.last_log,
                 "ema": [w.cpu() for w in t.ema] if t.ema is not None else None}
        save_atomic(state, run.out / "ckpt.pt", run.out)  # a kill mid-save leaves the last good one


def read_checkpoint(cfg, out, identity):
    """--resume: ckpt.pt, refused unless made with the same settings and inputs (by content)."""
    path = out / "ckpt.pt"
    if not cfg.resume or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        old, inputs = state["config"], state["inputs"]
    except Exception as e:
        die(f"--resume: {path} cannot be read ({first_line(e)}); delete it to start over")
    changed = [k for k, v in asdict(cfg).items()
               if k not in RESUMABLE_CHANGES | INPUT_FIELDS and old.get(k) != v]
    changed += [f"{k} (content)" for k in sorted(set(identity) | set(inputs))
                if identity.get(k) != inputs.get(k)]
    if changed:
        die(f"--resume: {path} was made with other {', '.join(changed)}; use the same inputs or "
            f"another --out")
    return state


def restore(state, model, optimizer, scheduler, cfg, device):
    """(ema, progress) from the checkpoint, or fresh ones."""
    ema = [p.detach().clone() for p in model.student.state_dict().values()] if cfg.ema > 0 else None
    if state is None:
        return ema, Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ema = [t.to(device) for t in state["ema"]] if state["ema"] is not None else None
    return ema, Progress(state["epoch"] + 1, state["step"], state["running"], state["last_log"])


# --- final.pt and the exported student

def cpu_state(module):
    return {k: v.cpu() for k, v in module.state_dict().items()}


def final_record(run, step):
    """final.pt: the (EMA) student and everything eval.py needs, checked finite first."""
    cfg, core, data, sup = run.cfg, run.trainer.core, run.data, run.sup
    swap_in_ema(core, run.trainer.ema)
    require_finite_weights(core, None, step, run.out)
    final = {"format": "vlmkd-final-1", "arch": cfg.arch, "num_classes": data.num_classes,
             "feat_dim": core.student.feat_dim, "model": cpu_state(core.student), "head": cfg.head,
             "tau": cfg.tau, "classes": data.class_names,
             "class_counts": data.class_counts.tolist(),
             "preprocess": {"res": cfg.res, "mean": MEAN, "std": STD,
                            "crop_ratio": crop_ratio(cfg)},
             "train_split_sha256": sup.identity["train_split"], "inputs": sup.identity,
             "config": run_config(cfg), "losses": run.weights}
    if sup.class_text is not None and cfg.head == "cosine":
        final["class_text"] = sup.class_text
    head = core.text_head
    if head is not None and not cfg.drop_text_head:
        final["text_head"] = {
            "proj": cpu_state(head.proj), "adaptor": cpu_state(head.adaptor),
            "logit_scale": head.log_scale.exp().item(), "feat_dim": core.student.feat_dim,
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
    """(constructor, state dict) that load into torchvision's / timm's own model, strict=True (our
    head under the classifier's name); None where no public constructor exists."""
    if cfg.arch in CIFAR_ARCHS or cfg.head != "linear":
        return None
    backbone = student.backbone
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    head = student.head.state_dict().items()
    state |= {f"{backbone.classifier_name}.{k}": v.detach().cpu().contiguous() for k, v in head}
    library = "timm" if cfg.arch.startswith("timm:") else "torchvision"
    return {"library": library, "model": cfg.arch.removeprefix("timm:"),
            "kwargs": backbone.constructor_kwargs}, state


def export_student(run, final):
    """student.safetensors + .json, student.pt2 (torch.export), student.onnx, as --export asks."""
    cfg, out, kinds = run.cfg, run.out, comma_list(run.cfg.export)
    for name in RUN_FILES:  # an earlier export of this run (resumed with another --export) must go
        if name.startswith("student."):
            (out / name).unlink(missing_ok=True)
    if not kinds:
        return
    student = student_from_final(final)
    net, example = Logits(student).eval(), torch.randn(2, 3, cfg.res, cfg.res)
    meta = {"arch": cfg.arch, "num_classes": final["num_classes"], "classes": final["classes"],
            "preprocess": final["preprocess"], "input": "RGB, Resize(round(res / crop_ratio)), "
            "CenterCrop(res), ToTensor, Normalize(mean, std); NCHW float32"}
    weights = library_weights(cfg, student) if "safetensors" in kinds else None
    if weights is not None:
        from safetensors.torch import save_file
        save_file(weights[1], out / "student.safetensors")
        meta |= weights[0]
    elif "safetensors" in kinds:  # CIFAR ResNets and the cosine head exist only in this code
        meta |= {"library": None, "note": f"--arch {cfg.arch} --head {cfg.head}: no "
                                          f"torchvision/timm constructor, load student.pt2"}
    if "pt2" in kinds:
        batch = torch.export.Dim("batch")
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, out / "student.pt2")
    if "onnx" in kinds:
        try:
            torch.onnx.export(net, (example,), out / "student.onnx", input_names=["images"],
                              output_names=["logits"], dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        except Exception as e:  # an architecture ONNX cannot express is a warning, not a failed run
            warn(f"ONNX export of {cfg.arch} failed ({first_line(e)}); student.pt2 still works")
    write_json(out / "student.json", meta)


def write_final(run, step):
    if run.accelerator.is_main_process:
        final = final_record(run, step)
        save_atomic(final, run.out / "final.pt", run.out)
        export_student(run, final)


# --- main: the run folder, the accelerator, then load, build, train, write

def start(cfg):
    """The accelerator (tracker included) and a writable --out, checked before anything is read."""
    on_gpu = torch.cuda.is_available()
    precision, why = cfg.precision, ""
    if precision == "auto":
        precision, why = auto_dtype("cuda" if on_gpu else "cpu",
                                    has_native_bf16(pick_device("auto")))
    if precision == "fp16" and not on_gpu:
        die("--precision fp16 needs a GPU; on a CPU use bf16 (with native bf16) or fp32")
    if cfg.deterministic:  # cuDNN autotuning and atomic adds make GPU reruns drift; before CUDA
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one: a warning
        torch.backends.cudnn.benchmark = False
    if is_main_process():  # the other processes of this run write nothing here
        check_run_folder(cfg, Path(cfg.out))  # before --out is made: a refused run leaves no folder
    out = writable_dir(cfg.out)
    if is_main_process():
        lock_or_die(out / ".lock", f"run folder {out}")
        check_run_folder(cfg, out)  # again under the lock: a run that ended meanwhile is seen
    remove_stale_tmp(out)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                              cpu=not on_gpu, project_dir=out,
                              log_with=None if cfg.report_to == "none" else cfg.report_to)
    launch_check(accelerator.num_processes)
    if cfg.precision == "auto":
        accelerator.print(f"train.py: --precision auto: {precision}, since {why}", flush=True)
    return accelerator, out


def check_run_folder(cfg, out):
    """--out holds one run: --resume needs its ckpt.pt, a new run needs a folder without another
    run's files (or --overwrite, which removes them later, once the inputs are checked)."""
    if (out / "train.py").exists() and (out / "train.py").samefile(__file__):
        die(f"--out {out} is the folder of train.py itself: give the run a folder of its own")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume and not (out / "ckpt.pt").exists():
        die(f"--resume: {out} holds no ckpt.pt, so there is nothing to continue"
            + (f" (it holds {', '.join(found)})" if found else "") + "; start a new run without "
            "--resume")
    if found and not cfg.resume and not cfg.overwrite:
        die(f"{out} holds another run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): "
            f"pass --resume to continue it, --overwrite to replace it, or use another --out")


def tracker_folders(out):
    """Folders accelerate's trackers made in --out: tensorboard's (named after the run, event files
    only), aim's."""
    board = out / out.name
    events = [p for p in board.rglob("*") if p.is_file()] if board.is_dir() else []
    ours = [board] if events and all(p.name.startswith("events.out.tfevents.") for p in events) \
        else []
    return ours + [out / ".aim"] * (out / ".aim").is_dir()


def clear_run_folder(out):
    """--overwrite: remove the earlier run's files, those train.py writes and nothing else."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for folder in tracker_folders(out):
        shutil.rmtree(folder)


def start_run_folder(cfg, out, accelerator, state):
    """Script copy, config, versions; metrics.jsonl cut back to the checkpoint's step (a resumed run
    logs exactly the rows of an uninterrupted one), or emptied for a fresh run."""
    if not accelerator.is_main_process:
        return
    if cfg.overwrite:
        clear_run_folder(out)
    shutil.copy(__file__, out / "train.py")
    write_json(out / "config.json", run_config(cfg))
    write_json(out / "versions.json", versions("torch", "torchvision", "accelerate", "timm", "ffcv",
                                               "numpy"))
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


def build_run(cfg, accelerator, out, data, sup, state):
    """(the Run, its Progress, the --init line): the model, the loaders (caches written first), the
    optimiser, all restored from `state` on a resume."""
    model, init_note = build_model(cfg, data, sup, accelerator.device)
    train_loader, val_loader, ood_loader = make_loaders(cfg, data, sup, accelerator)
    optimizer, scheduler = make_optimizer(cfg, model, accelerator.num_processes,
                                          cfg.repeat_epochs * len(train_loader))
    # Restored into the bare Model: ckpt.pt's keys carry no DDP or torch.compile prefix.
    ema, progress = restore(state, model, optimizer, scheduler, cfg, accelerator.device)
    trainer = make_trainer(cfg, accelerator, model, optimizer, scheduler, ema, sup, data.log_prior)
    weights = {name: weight for name, (weight, _) in loss_terms(cfg, sup).items()}
    return Run(cfg, accelerator, out, data, sup, trainer, weights, train_loader, val_loader,
               ood_loader), progress, init_note


def announce(run, progress, resumed, init_note):
    """The run's first lines: what it trains on, where, with which losses (and recipe, --init)."""
    cfg, accelerator, data = run.cfg, run.accelerator, run.data
    here = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    accelerator.print(f"train.py: {len(data.train_items)} train images, {data.num_classes} "
                      f"classes; {here} process{'es' * (here > 1)} on this machine, world size "
                      f"{accelerator.num_processes}, device {accelerator.device}, precision "
                      f"{precision}; losses {', '.join(run.weights)}"
                      + (f"; resuming at epoch {progress.epoch}" * resumed), flush=True)
    if cfg.recipe != "none":
        changed = ", ".join(f"{flag(k)} {v['recipe']} -> {v['used']}"
                            for k, v in recipe_record(cfg).items())
        accelerator.print(f"train.py: --recipe {cfg.recipe}"
                          + (f"; overridden: {changed}" if changed else ""))
    if init_note:
        accelerator.print(f"train.py: {init_note}")


def finish(run, progress, resumed, step, started):
    """final.pt and the exported student, and the run's last line."""
    if step == 0:  # nothing trained: final.pt would be the random init
        die(f"no training step was taken ({len(run.train_loader)} batches per epoch, --epochs "
            f"{run.cfg.epochs}); no final.pt")
    write_final(run, step)
    run.accelerator.end_training()
    val = f"; val top-1 {progress.val[1]:.4f} after epoch {progress.val[0]}" if progress.val else ""
    total = f" ({step} in all, resumed at epoch {progress.epoch})" if resumed else ""
    minutes = (time.perf_counter() - started) / 60
    run.accelerator.print(f"train.py: done: {step - progress.step} steps in {minutes:.1f} min"
                          f"{total}{val}; wrote {run.out / 'final.pt'}", flush=True)


def main():
    cfg = parse_config(Config, defaults=recipe_defaults)
    check_config(cfg)
    accelerator, out = start(cfg)
    data = load_data(cfg)
    sup = load_supervision(cfg, data, accelerator.device)
    state = read_checkpoint(cfg, out, sup.identity)
    run, progress, init_note = build_run(cfg, accelerator, out, data, sup, state)
    start_run_folder(cfg, out, accelerator, state)
    announce(run, progress, state is not None, init_note)
    started = time.perf_counter()
    step = train(run, progress)
    finish(run, progress, state is not None, step, started)


# --- helpers of this stage
def flag(name):
    """The command-line flag of a Config field: max_res -> --max-res."""
    return "--" + name.replace("_", "-")


def comma_list(text):
    """'a, b,,c' -> ['a', 'b', 'c'] (--export, --prompts, --milestones, --imitate-loss)."""
    return [part.strip() for part in text.split(",") if part.strip()]


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


def first_line(error):
    """An exception's message as one line for an error line of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


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


def has_native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """Whether the device computes bf16 in hardware: a GPU since Ampere, a CPU with avx512_bf16 or
    AMX. Elsewhere torch emulates bf16, and a bf16 VLM ran 3.1x slower than fp32 on such a CPU."""
    if device.type == "cuda":
        import torch
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def auto_dtype(device_type, native_bf16):
    """`--dtype auto`: (dtype, why). bf16 where the hardware computes it; else fp16 on a GPU (same
    speed, needs no bf16 units) and fp32 on a CPU (fp16 is emulated there too)."""
    where = "GPU" if device_type == "cuda" else "CPU"
    if native_bf16:
        return "bf16", f"this {where} computes bf16 natively"
    return ("fp16" if device_type == "cuda" else "fp32"), \
        f"this {where} has no native bf16 (it would be emulated)"


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


LOCKS = []


def lock_or_die(path, what):
    """Hold an exclusive lock on `path` (a hidden lock file) while this process lives, or stop with
    one line: two processes appending to one output interleave or duplicate it. A killed process
    leaves no stale lock."""
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
