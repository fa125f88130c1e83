"""Train a vision encoder from scratch with long-tail classification + VLM text distillation (VLM-KD),
optionally with the CLIP-teacher losses of Li et al. (imitation, class-text classifier, VL alignment).

    python train.py --data data/fmnist-lt --arch resnet32 --loss la --epochs 100 --out runs/fmnist/ce
    accelerate launch train.py --data data/fmnist-lt --arch resnet32 --loss la --epochs 100 \
        --text runs/fmnist/text/text.npy --text-weight 1.0 --out runs/fmnist/vlmkd
    accelerate launch train.py --data data/imagenet-lt --arch resnet50 --res 176 --epochs 90 --compile \
        --text runs/inlt/text/text.npy --out runs/inlt/vlmkd                    # one machine, all its GPUs
    python train.py ... --teacher runs/fmnist/ce/final.pt --kd-weight 1.0    # + vision-teacher logit KD
    python train.py ... --class-text runs/x/clip/classes.npy --head cosine \
        --teacher-images runs/x/clip/images.npy                             # Li et al. CLIP-teacher losses
    python train.py ... --resume                                             # continue a killed run in --out
    torchrun --nproc_per_node 2 train.py ...                                 # several CPU processes (gloo)

The run directory gets a copy of this script, config.json, versions.json, metrics.jsonl (every loss
part, lr, images/s; val top-1 overall/many/medium/few), ckpt.pt (everything to resume, each epoch)
and final.pt (student + text head + class names + counts + preprocessing: all that eval.py needs).
"""
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata as pkg_metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from tqdm import tqdm
from transformers import HfArgumentParser


@dataclass
class Config:
    data: str = field(default="data/fmnist-lt", metadata={"help": "folder from prepare.py"})
    train_split: str = field(default="train.txt", metadata={"help": "split file inside --data (id_train.txt for OOD sets)"})
    val_split: str = field(default="val.txt", metadata={"help": "split used for model selection; never the test split"})
    classes: str = field(default="classes.txt", metadata={"help": "class names inside --data (id_classes.txt for OOD sets)"})
    out: str = field(default="runs/train", metadata={"help": "run directory"})
    arch: str = field(default="resnet32", metadata={"help": "resnet20/32/44/56 (CIFAR-style) or a torchvision model name"})
    res: int = field(default=32, metadata={"help": "training / eval resolution"})
    max_res: int = field(default=256, metadata={"help": "longest side stored in the .beton cache"})
    min_scale: float = field(default=-1, metadata={"help": "RandomResizedCrop min area; -1: 0.35 for res <= 64, else 0.08"})
    crop_ratio: float = field(default=-1, metadata={"help": "eval centre-crop ratio; -1: 1.0 for res <= 64, else 0.875"})
    epochs: int = 100
    batch_size: int = field(default=128, metadata={"help": "per process"})
    workers: int = field(default=-1, metadata={"help": "ffcv decoding threads; -1: all cores / processes"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd (nesterov) or adamw"})
    lr: float = field(default=0.1, metadata={"help": "peak lr at a global batch of 128; scaled linearly with the global batch"})
    weight_decay: float = field(default=5e-4, metadata={"help": "not applied to biases, norms and the temperature"})
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.0
    grad_clip: float = field(default=0.0, metadata={"help": "max grad norm; 0 = off"})
    ema: float = field(default=0.0, metadata={"help": "EMA decay per step (e.g. 0.999); 0 = off. Eval and final.pt use the EMA"})
    loss: str = field(default="la", metadata={"help": "ce | la (logit-adjusted) | bs (balanced softmax)"})
    tau_la: float = field(default=1.0, metadata={"help": "logit adjustment strength"})
    head: str = field(default="linear", metadata={"help": "linear | cosine (over --class-text embeddings, Li et al.)"})
    class_text: str = field(default="", metadata={"help": "classes.npy from encode.py --classes (CLIP text space); rows of the training classes are used"})
    tau: float = field(default=0.07, metadata={"help": "temperature of the cosine head and the VL alignment"})
    text: str = field(default="", metadata={"help": "text.npy from encode.py: VLM caption features [N, P, D]"})
    text_weight: float = field(default=1.0, metadata={"help": "VLM-KD text distillation weight; 0 = off"})
    prompts: str = field(default="", metadata={"help": "comma-separated prompt ids to train on (default: all slots)"})
    text_temp: float = field(default=0.07, metadata={"help": "InfoNCE temperature (initial value when learnt)"})
    learn_temp: bool = field(default=False, metadata={"help": "learn the temperature (own param group, no decay, --temp-lr)"})
    temp_lr: float = field(default=1e-3, metadata={"help": "lr of the learnt temperature: SGD at 0.1 collapses it"})
    mask_same_class: bool = field(default=False, metadata={"help": "drop same-class negatives from the InfoNCE"})
    embed_dim: int = 256
    adaptor_hidden: int = 512
    drop_text_head: bool = field(default=False, metadata={"help": "leave the text head out of final.pt (deployment)"})
    teacher: str = field(default="", metadata={"help": "final.pt of a frozen vision teacher for logit KD"})
    kd_weight: float = 1.0
    kd_temp: float = 4.0
    teacher_images: str = field(default="", metadata={"help": "images.npy from encode.py --images (CLIP image embeddings)"})
    imitate_weight: float = 1.0
    imitate_loss: str = field(default="mse", metadata={"help": "mse (normalised) | contrastive"})
    align_weight: float = field(default=1.0, metadata={"help": "VL alignment (needs --class-text and --teacher-images)"})
    align_topk: int = field(default=0, metadata={"help": "align over the teacher's top-k class texts; 0 = all"})
    align_correct_only: bool = field(default=False, metadata={"help": "align only where the teacher is right"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32"})
    compile: bool = False
    seed: int = 0
    eval_every: int = 1
    log_every: int = 20
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (benchmarks); 0 = off"})
    resume: bool = field(default=False, metadata={"help": "continue from --out/ckpt.pt"})


def die(msg):
    sys.exit(f"train.py: error: {msg}")


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


# ----------------------------------------------------------------------------- losses (pure functions)

def prior_adjusted_ce(logits, labels, log_prior, tau=1.0, label_smoothing=0.0):
    """Logit-adjusted CE (Menon et al.): CE(logits + tau * log prior). tau=1 is the balanced softmax."""
    return F.cross_entropy(logits.float() + tau * log_prior, labels, label_smoothing=label_smoothing)


def info_nce(img_emb, txt_emb, logit_scale, labels=None, mask_same_class=False):
    """Symmetric InfoNCE between matching rows; optionally same-class off-diagonal pairs are not negatives."""
    img_emb, txt_emb = F.normalize(img_emb.float(), dim=-1), F.normalize(txt_emb.float(), dim=-1)
    logits = logit_scale * img_emb @ txt_emb.T
    if mask_same_class:
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def logit_kd(student_logits, teacher_logits, temp):
    """Hinton KD: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), mean over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temp, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temp, dim=-1)
    return temp ** 2 * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def imitation_loss(student_emb, teacher_emb, kind="mse", logit_scale=1 / 0.07):
    """Li et al. (1): match the teacher's image embedding: squared distance of unit vectors, or InfoNCE."""
    if kind == "contrastive":
        return info_nce(student_emb, teacher_emb, logit_scale)
    diff = F.normalize(student_emb.float(), dim=-1) - F.normalize(teacher_emb.float(), dim=-1)
    return diff.pow(2).sum(-1).mean()


def alignment_loss(student_emb, teacher_emb, class_text, tau, labels=None, topk=0, correct_only=False):
    """Li et al. (3): KL(teacher || student) over image-to-class-text similarity distributions,
    optionally over the teacher's top-k classes and only on images the teacher gets right."""
    class_text = class_text.float()
    s_logits = F.normalize(student_emb.float(), dim=-1) @ class_text.T / tau
    t_logits = F.normalize(teacher_emb.float(), dim=-1) @ class_text.T / tau
    keep = torch.ones(len(s_logits), device=s_logits.device)
    if correct_only:
        keep = (t_logits.argmax(-1) == labels).float()
    if topk:
        top = t_logits.topk(topk, dim=-1).indices
        s_logits, t_logits = s_logits.gather(1, top), t_logits.gather(1, top)
    kl = (F.softmax(t_logits, -1) * (F.log_softmax(t_logits, -1) - F.log_softmax(s_logits, -1))).sum(-1)
    return (kl * keep).sum() / keep.sum().clamp(min=1)


# ----------------------------------------------------------------------------- data

def read_split(path):
    """[(relative path, label)] from `relative/path label` lines; a bad line names file and line."""
    if not Path(path).exists():
        die(f"split file {path} not found (make it with prepare.py)")
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            die(f"{path}:{n}: expected `relative/path label`, got {line[:80]!r}")
        items.append((parts[0], int(parts[1])))
    return items


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class SplitImages:
    """(RGB image, label, row index) per split line, for ffcv's DatasetWriter (beton_for leaves unreadable ones out)."""

    def __init__(self, root, items, max_res):
        self.root, self.items, self.max_res = Path(root), items, max_res

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        image = Image.open(self.root / path).convert("RGB")
        if max(image.size) > self.max_res:  # store at most max_res on the long side
            image.thumbnail((self.max_res, self.max_res))
        return image, label, i


def beton_for(cfg, split, accelerator):
    """Write the split's .beton once, cached under a key of split contents + settings; reuse it after."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import Image
    split_path = Path(cfg.data) / split
    key = hashlib.sha256(split_path.read_bytes() + f"|{cfg.max_res}|smart64".encode()).hexdigest()[:16]
    path = Path(cfg.data) / ".ffcv" / f"{split_path.stem}-{key}.beton"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not path.exists():
            path.parent.mkdir(exist_ok=True)
            items = read_split(split_path)

            def check(i):  # an error string, or None for a readable image
                try:
                    with Image.open(Path(cfg.data) / items[i][0]) as im:
                        im.verify()
                except Exception as e:
                    return f"{type(e).__name__}: {e}"[:200]

            # Threads: at ImageNet scale a serial pass over every file is minutes of start-up.
            with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
                errors = list(pool.map(check, range(len(items)), chunksize=256))
            good = [i for i, e in enumerate(errors) if e is None]
            # Recorded and skipped; the row index keeps text rows aligned.
            bad = [{"index": i, "path": items[i][0], "error": e} for i, e in enumerate(errors) if e is not None]
            if bad:
                (path.with_suffix(".errors.jsonl")).write_text("".join(json.dumps(b) + "\n" for b in bad))
                print(f"train.py: {len(bad)} unreadable images in {split_path} skipped, listed in {path.with_suffix('.errors.jsonl')}")
            dataset = SplitImages(cfg.data, items, cfg.max_res)
            tmp = path.with_suffix(".tmp")
            fields = {"image": RGBImageField(write_mode="smart", max_resolution=cfg.max_res, smart_threshold=64 * 64 * 3),
                      "label": IntField(), "index": IntField()}
            DatasetWriter(str(tmp), fields, num_workers=max(1, os.cpu_count() or 1)).from_indexed_dataset(
                dataset, indices=good, chunksize=64)
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


def make_loader(cfg, beton, train, accelerator):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
    device = accelerator.device
    small = cfg.res <= 64
    if train:
        min_scale = cfg.min_scale if cfg.min_scale > 0 else (0.35 if small else 0.08)
        decoder = make_seeded_rrc()((cfg.res, cfg.res), scale=(min_scale, 1.0))
    else:
        decoder = CenterCropRGBImageDecoder((cfg.res, cfg.res), ratio=crop_ratio(cfg))
    # Flip and normalisation happen on the device (seeded there), so the loader only decodes and copies.
    image_pipe = [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    int_pipe = lambda: [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]
    # ffcv also sets torch's CPU thread count to its worker count: on a CPU-only run, leave half the cores to compute.
    cores = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    workers = cfg.workers if cfg.workers > 0 else (cores if device.type == "cuda" else max(1, cores // 2))
    return Loader(str(beton), batch_size=cfg.batch_size, num_workers=workers,
                  order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, drop_last=train,
                  seed=cfg.seed, distributed=accelerator.num_processes > 1,
                  pipelines={"image": image_pipe, "label": int_pipe(), "index": int_pipe()})


def crop_ratio(cfg):
    return cfg.crop_ratio if cfg.crop_ratio > 0 else (1.0 if cfg.res <= 64 else 0.875)


def load_features(path, kind, split_path, num_rows):
    """A per-image artifact from encode.py, refused unless its sidecar matches this split."""
    sidecar_path = Path(path).with_suffix(".json")
    if not Path(path).exists() or not sidecar_path.exists():
        die(f"{path} or its sidecar {sidecar_path.name} not found (make them with encode.py)")
    sidecar = json.loads(sidecar_path.read_text())
    array = np.load(path, mmap_mode="r")
    if sidecar.get("kind") != kind:
        die(f"{sidecar_path}: kind is {sidecar.get('kind')!r}, expected {kind!r}")
    if array.shape[0] != num_rows or sidecar.get("split_sha256") != sha256_file(split_path):
        die(f"{path} was made from another split than {split_path} (rows {array.shape[0]} vs {num_rows}, "
            f"split_sha256 {'matches' if sidecar.get('split_sha256') == sha256_file(split_path) else 'differs'}): re-run encode.py on this split")
    return array, sidecar


# ----------------------------------------------------------------------------- evaluation

def group_accuracy(preds, labels, class_counts):
    """Top-1 overall and over many (>100 train images), medium (20-100) and few (<20) classes."""
    counts = torch.as_tensor(class_counts)[labels]
    correct = (preds == labels).float()
    result = {"top1": correct.mean().item()}
    for name, mask in (("many", counts > 100), ("medium", (counts >= 20) & (counts <= 100)), ("few", (counts > 0) & (counts < 20))):
        result[name] = correct[mask].mean().item() if mask.any() else None  # no such class in this split
    return result


@torch.no_grad()
def evaluate(model, loader, accelerator, class_counts, mean, std):
    model.eval()
    preds, labels, indices = [], [], []
    for images, y, idx in loader:
        with accelerator.autocast():
            logits = model.student(normalize(images, mean, std))[1]
        preds.append(logits.argmax(-1))
        labels.append(y.clone())  # ffcv reuses its buffers: keep copies
        indices.append(idx.clone())
    preds, labels, indices = (accelerator.gather(torch.cat(t)).cpu() for t in (preds, labels, indices))
    # ffcv's distributed sampler pads with repeats: count each row once.
    indices, first = np.unique(indices.numpy(), return_index=True)
    model.train()
    return group_accuracy(preds[first], labels[first], class_counts)


def normalize(images, mean, std):
    return (images.float() - mean) / std


# ----------------------------------------------------------------------------- training

def versions():
    names = ("torch", "torchvision", "accelerate", "transformers", "ffcv", "numpy")
    return {n: pkg_metadata.version(n) for n in names} | {"python": sys.version.split()[0]}


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pixel_mean_std(device):
    """ImageNet statistics on the 0-255 scale of ffcv's uint8 batches, shaped to broadcast over NCHW."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255, torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def make_optimizer(cfg, model, num_processes, steps_per_epoch):
    """SGD (nesterov) or AdamW, no decay on biases, norms and the temperature; linear warmup then cosine, per step."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad and not n.endswith("log_scale")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    temp = [p for n, p in model.named_parameters() if n.endswith("log_scale") and p.requires_grad]
    if temp:  # its own lr: at the backbone's SGD lr it collapses (DESIGN.md)
        groups.append({"params": temp, "weight_decay": 0.0, "lr": cfg.temp_lr})
    lr = cfg.lr * cfg.batch_size * num_processes / 128
    for g in groups:
        g.setdefault("lr", lr)
    optimizer = (torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True) if cfg.optimizer == "sgd"
                 else torch.optim.AdamW(groups, lr=lr))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def make_train_step(cfg, accelerator, model, optimizer, scheduler, ema, text_feats, teacher, teacher_images, log_prior, loss_names):
    """The hot path: one optimisation step on a loader batch. Returns [loss, *parts] as one device tensor,
    so the caller decides when to sync. `model` is the prepared (DDP / compiled) Model."""
    device = accelerator.device
    core = accelerator.unwrap_model(model)
    core = getattr(core, "_orig_mod", core)
    mean, std = pixel_mean_std(device)
    tau_cls = {"ce": 0.0, "la": cfg.tau_la, "bs": 1.0}[cfg.loss]
    live = list(core.student.state_dict().values())  # aliases of the parameters and buffers, updated in place

    def train_step(images, labels, indices, gen):
        flip = torch.rand(len(images), device=device, generator=gen) < 0.5
        images = normalize(torch.where(flip[:, None, None, None], images.flip(3), images), mean, std)
        images = images.contiguous(memory_format=torch.channels_last)
        texts = None
        if text_feats is not None:  # one of each image's P captions, sampled every step
            slot = torch.randint(text_feats.shape[1], (len(indices),), device=device, generator=gen)
            texts = text_feats[indices, slot].float()
        with accelerator.autocast():
            logits, clip_emb, img_emb, txt_emb = model(images, texts)
            parts = [prior_adjusted_ce(logits, labels, log_prior, tau_cls, cfg.label_smoothing)]
            weights = [1.0]
            if "loss_text" in loss_names:
                parts.append(info_nce(img_emb, txt_emb, core.text_head.log_scale.exp(), labels, cfg.mask_same_class))
                weights.append(cfg.text_weight)
            if "loss_kd" in loss_names:
                with torch.no_grad():
                    teacher_logits = teacher(images)[1]
                parts.append(logit_kd(logits, teacher_logits, cfg.kd_temp))
                weights.append(cfg.kd_weight)
            if "loss_imitate" in loss_names:
                parts.append(imitation_loss(clip_emb, teacher_images[indices], cfg.imitate_loss, 1 / cfg.tau))
                weights.append(cfg.imitate_weight)
            if "loss_align" in loss_names:
                parts.append(alignment_loss(clip_emb, teacher_images[indices], core.student.class_text, cfg.tau,
                                            labels, cfg.align_topk, cfg.align_correct_only))
                weights.append(cfg.align_weight)
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


def main():
    (cfg,) = HfArgumentParser(Config).parse_args_into_dataclasses()
    if cfg.loss not in ("ce", "la", "bs") or cfg.head not in ("linear", "cosine") or cfg.imitate_loss not in ("mse", "contrastive"):
        die(f"--loss must be ce|la|bs, --head linear|cosine, --imitate-loss mse|contrastive (got {cfg.loss}, {cfg.head}, {cfg.imitate_loss})")
    on_gpu = torch.cuda.is_available()
    precision = {"auto": "bf16" if on_gpu else "no", "bf16": "bf16", "fp32": "no"}[cfg.precision]
    accelerator = Accelerator(mixed_precision=precision, cpu=not on_gpu)
    device, is_main = accelerator.device, accelerator.is_main_process
    out = Path(cfg.out)
    train_path, val_path = Path(cfg.data) / cfg.train_split, Path(cfg.data) / cfg.val_split
    classes_path = Path(cfg.data) / cfg.classes
    if not classes_path.exists():
        die(f"{classes_path} not found (make it with prepare.py)")
    class_names = [n for n in classes_path.read_text().splitlines() if n.strip()]
    train_items = read_split(train_path)
    read_split(val_path)
    num_classes = len(class_names)
    labels_all = np.array([y for _, y in train_items])
    if labels_all.max() >= num_classes:
        die(f"{train_path}: label {labels_all.max()} but {classes_path} names {num_classes} classes")
    class_counts = np.bincount(labels_all, minlength=num_classes)
    if (class_counts == 0).any() and cfg.loss != "ce":
        die(f"{train_path}: classes {np.flatnonzero(class_counts == 0)[:5].tolist()} have no images; --loss {cfg.loss} needs every class (use --classes id_classes.txt for OOD sets)")
    log_prior = torch.log(torch.as_tensor(class_counts.clip(min=1) / class_counts.sum(), dtype=torch.float32)).to(device)

    # Per-image supervision from encode.py, checked against this split.
    text_feats, text_meta, slot_ids = None, {}, []
    if cfg.text and cfg.text_weight > 0:
        array, text_meta = load_features(cfg.text, "text", train_path, len(train_items))
        slot_ids = list(text_meta.get("prompts", range(array.shape[1])))
        wanted = [p.strip() for p in cfg.prompts.split(",") if p.strip()] or slot_ids
        unknown = [p for p in wanted if p not in slot_ids]
        if unknown:
            die(f"--prompts {','.join(unknown)} not in {cfg.text} (its prompts: {','.join(map(str, slot_ids))})")
        slots = [slot_ids.index(p) for p in wanted]
        text_feats = torch.from_numpy(np.ascontiguousarray(array[:, slots])).to(device, torch.float16)
        slot_ids = wanted
    class_text = None
    if cfg.class_text:
        class_text = torch.from_numpy(np.load(cfg.class_text).astype(np.float32))
        sidecar = Path(cfg.class_text).with_suffix(".json")
        text_names = json.loads(sidecar.read_text()).get("names") if sidecar.exists() else None
        # ID/OOD sets list the ID (training) classes first: their rows are the first num_classes.
        if text_names is not None and text_names[:num_classes] != class_names:
            die(f"{cfg.class_text}: its classes ({sidecar.name} names) do not start with the {num_classes} classes of {classes_path}")
        if class_text.shape[0] < num_classes or (text_names is None and class_text.shape[0] != num_classes):
            die(f"{cfg.class_text} has {class_text.shape[0]} class rows, {classes_path} names {num_classes}")
        class_text = class_text[:num_classes]
    if cfg.head == "cosine" and class_text is None:
        die("--head cosine needs --class-text classes.npy (encode.py --classes)")
    teacher_images = None
    if cfg.teacher_images:
        array, _ = load_features(cfg.teacher_images, "images", train_path, len(train_items))
        teacher_images = torch.from_numpy(np.ascontiguousarray(array)).to(device, torch.float16)
        if class_text is not None and class_text.shape[1] != teacher_images.shape[1]:
            die(f"--class-text width {class_text.shape[1]} != --teacher-images width {teacher_images.shape[1]}: use one CLIP model for both")
    clip_dim = (class_text.shape[1] if class_text is not None else 0) if cfg.head == "cosine" else 0
    clip_dim = teacher_images.shape[1] if teacher_images is not None else clip_dim

    torch.manual_seed(cfg.seed)
    student = Student(cfg.arch, num_classes, cfg.res, cfg.head, clip_dim, class_text, cfg.tau)
    text_head = None
    if text_feats is not None:
        text_head = TextHead(student.feat_dim, text_feats.shape[-1], cfg.embed_dim, cfg.adaptor_hidden, cfg.text_temp, cfg.learn_temp)
    model = Model(student, text_head).to(device, memory_format=torch.channels_last)
    teacher = None
    if cfg.teacher and cfg.kd_weight > 0:
        ckpt = torch.load(cfg.teacher, map_location="cpu", weights_only=True)
        if ckpt.get("classes") != class_names:
            die(f"--teacher {cfg.teacher} was trained on other classes than {classes_path}")
        teacher = Student(ckpt["arch"], ckpt["num_classes"], ckpt["preprocess"]["res"], ckpt["head"],
                          ckpt["model"].get("clip_proj.weight", torch.empty(0, 0)).shape[0], ckpt.get("class_text"), ckpt.get("tau", 0.07))
        teacher.load_state_dict(ckpt["model"])
        teacher = teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)

    loss_names = ["loss_cls"] + (["loss_text"] if text_head else []) + (["loss_kd"] if teacher else []) + \
        (["loss_imitate"] if teacher_images is not None and cfg.imitate_weight > 0 else []) + \
        (["loss_align"] if teacher_images is not None and class_text is not None and cfg.align_weight > 0 else [])
    train_loader = make_loader(cfg, beton_for(cfg, cfg.train_split, accelerator), True, accelerator)
    val_loader = make_loader(cfg, beton_for(cfg, cfg.val_split, accelerator), False, accelerator)
    accelerator.print(f"train.py: {len(train_items)} train images, {num_classes} classes, world size {accelerator.num_processes}, "
                      f"{device.type}, precision {precision}, losses {', '.join(loss_names)}")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        die(f"{train_path}: fewer images than --batch-size {cfg.batch_size} per process")
    total_steps = cfg.epochs * steps_per_epoch
    optimizer, scheduler = make_optimizer(cfg, model, accelerator.num_processes, steps_per_epoch)
    ema = [p.detach().clone() for p in model.student.state_dict().values()] if cfg.ema > 0 else None

    start_epoch, step = 0, 0
    if cfg.resume and (out / "ckpt.pt").exists():
        state = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        if state["config"] != asdict(cfg) | {"resume": state["config"]["resume"]}:
            changed = [k for k, v in asdict(cfg).items() if k != "resume" and state["config"].get(k) != v]
            die(f"--resume: {out / 'ckpt.pt'} was made with other settings ({', '.join(changed)}); use another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema = [t.to(device) for t in state["ema"]] if state["ema"] is not None else None
        start_epoch, step = state["epoch"] + 1, state["step"]
        accelerator.print(f"resuming {out} at epoch {start_epoch}")
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    core = getattr(core, "_orig_mod", core)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(__file__, out / "train.py")
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        (out / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
        if not cfg.resume:
            (out / "metrics.jsonl").write_text("")
    mean, std = pixel_mean_std(device)
    train_step = make_train_step(cfg, accelerator, model, optimizer, scheduler, ema, text_feats, teacher, teacher_images,
                                 log_prior, loss_names)

    def log(row):
        if is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    running = torch.zeros(len(loss_names) + 1, device=device)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)
    last_log, last_time, images_seen = step, time.perf_counter(), 0
    train_loader.next_epoch = start_epoch  # ffcv's order for epoch e is seeded by seed + e
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator(device).manual_seed(cfg.seed * 100_003 + epoch * 1009 + accelerator.process_index)
        row_seen = torch.zeros(len(train_items), device=device, dtype=torch.int32)
        for images, labels, indices in train_loader:
            row_seen.index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))
            values = train_step(images, labels, indices, gen)
            with torch.no_grad():  # no host sync here: accumulate on the device, read when logging
                running += values
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(values).all(), step, bad_step)
            step += 1
            images_seen += len(images) * accelerator.num_processes
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps or step == cfg.max_steps:
                check_finite(bad_step, running, loss_names, out)
                now = time.perf_counter()
                avg = (running / (step - last_log)).tolist()
                row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "loss": avg[0]} | dict(zip(loss_names, avg[1:]))
                row["img_per_s"] = images_seen / (now - last_time)
                if text_head is not None:
                    row["text_logit_scale"] = core.text_head.log_scale.exp().item()
                log(row)
                bar.set_postfix(loss=f"{avg[0]:.3f}", img_s=f"{row['img_per_s']:.0f}")
                running.zero_()
                last_log, last_time, images_seen = step, now, 0
            if step == cfg.max_steps:
                break
        check_finite(bad_step, running, loss_names, out)
        row_seen = accelerator.reduce(row_seen, "sum")  # a sample seen twice in one epoch means a sharding bug
        log({"epoch": epoch, "step": step, "rows_seen": int((row_seen > 0).sum()), "rows_max_repeat": int(row_seen.max())})
        if is_main:
            state = {"epoch": epoch, "step": step, "config": asdict(cfg), "model": core.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "ema": [t.cpu() for t in ema] if ema is not None else None}
            torch.save(state, out / "ckpt.tmp")
            os.replace(out / "ckpt.tmp", out / "ckpt.pt")  # a kill mid-save leaves the last good one
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            trained = swap_in_ema(core, ema)
            acc = evaluate(core, val_loader, accelerator, class_counts, mean, std)
            swap_in_ema(core, trained)
            log({"epoch": epoch, "step": step} | {f"val_{k}": v for k, v in acc.items()})
            accelerator.print(f"epoch {epoch}: val top-1 {acc['top1']:.4f} (" + " ".join(
                f"{k} {acc[k]:.3f}" for k in ("many", "medium", "few") if acc[k] is not None) + ")")
        accelerator.wait_for_everyone()
        if step == cfg.max_steps:
            break
    bar.close()
    if is_main:
        swap_in_ema(core, ema)
        final = {"format": "vlmkd-final-1", "arch": cfg.arch, "num_classes": num_classes, "feat_dim": core.student.feat_dim,
                 "model": {k: v.cpu() for k, v in core.student.state_dict().items()}, "head": cfg.head, "tau": cfg.tau,
                 "classes": class_names, "class_counts": class_counts.tolist(),
                 "preprocess": {"res": cfg.res, "mean": MEAN, "std": STD, "crop_ratio": crop_ratio(cfg)},
                 "train_split_sha256": sha256_file(train_path), "config": asdict(cfg)}
        if class_text is not None and cfg.head == "cosine":
            final["class_text"] = class_text
        if text_head is not None and not cfg.drop_text_head:
            final["text_head"] = {"proj": {k: v.cpu() for k, v in core.text_head.proj.state_dict().items()},
                                  "adaptor": {k: v.cpu() for k, v in core.text_head.adaptor.state_dict().items()},
                                  "logit_scale": core.text_head.log_scale.exp().item(), "feat_dim": core.student.feat_dim,
                                  "text_dim": text_feats.shape[-1], "embed_dim": cfg.embed_dim, "hidden": cfg.adaptor_hidden,
                                  "encoder": str(text_meta.get("encoder", "")), "prompts": [str(p) for p in slot_ids]}
        torch.save(final, out / "final.pt")
        accelerator.print(f"wrote {out / 'final.pt'}")
    accelerator.end_training()


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


def check_finite(bad_step, running, loss_names, out):
    if bad_step.item() >= 0:
        parts = dict(zip(["loss"] + loss_names, running.tolist()))
        die(f"non-finite loss at step {bad_step.item()} (running sums {parts}); the last good checkpoint is {out / 'ckpt.pt'}")


if __name__ == "__main__":
    main()
