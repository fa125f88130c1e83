"""Throughput of train.py's training step against a plain PyTorch baseline, and the cost of the text
loss.

    python bench/train_bench.py                    # fmnist-lt, resnet32 @ 32 px (CPU: ~2 min)
    python bench/train_bench.py --script-check     # + train.py --max-steps as a subprocess (~5 min)
    python bench/train_bench.py --gather-check     # the text InfoNCE's 2-process gather (~1 min)
    python bench/train_bench.py --data data/imagenet-lt --arch resnet50 --res 176 \
        --batch-size 256                           # a GPU

Three variants in one process: the same images (the --split file's), the same initial weights, batch
size, SGD (nesterov) optimizer, LR schedule and classification loss (train.py's logit-adjusted CE).
  baseline         a torch Dataset over the split file (PIL decode, torchvision RandomResizedCrop +
                   flip + ToTensor + Normalize) + torch DataLoader (same worker count) + eager fp32,
                   contiguous.
  train.py         train.py's own pieces, imported: its cached FFCV .beton (`beton_for`) and loader
                   (`make_loader`: seeded RandomResizedCrop decoder, ToDevice), flip + normalisation
                   on the device, channels_last, Accelerator autocast (train.py's --precision auto),
                   torch.compile with --compile (default: on for CUDA), `Student`,
                   `prior_adjusted_ce`.
  train.py + text  the same plus VLM-KD: `TextHead`, `info_nce`, text features [N, P, D] fp16 on the
                   device (random unit vectors), one of P picked by the batch's row index each step.
`train_py_variant` drives train.py's own `make_optimizer`, `make_trainer` and `train_step` (what its
main() loop calls, no host sync per step). --script-check cross-checks against the whole script: it
runs `train.py --max-steps` (with and without a random text.npy) as a user would and reads the
img_per_s rows of its metrics.jsonl (its epoch-end checkpoints included).

Timing: variants run in interleaved rounds, cycling through every order (A B C, A C B, B A C, ...),
so load from other work on a shared machine hits all alike. On a CPU each round is one step (the
loaders are far faster than the model there, see "loaders alone"); on a GPU, where the baseline can
be loader-bound, a round is several steps after --round-warmup untimed ones that drain what its
loader prefetched while the others ran. Rate = timed images / timed seconds (clocks read after
torch.cuda.synchronize); the noise-robust figures are the medians of the paired per-round ratios,
their quartiles a measure of the noise. Goals: text loss costs <= 5 % throughput; on a GPU,
ResNet-50 at 176 px >= 2x the baseline.
"""
import copy
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the bench measures the stage's own functions)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


opt = train.opt


@dataclass
class BenchConfig:
    data: str = opt("data/fmnist-lt", "folder from prepare.py", heading="data and model")
    prepare: str = opt("fashion-mnist-lt",
                       "if --data has no split file, make it with `prepare.py THIS --out DATA`; "
                                           "'' = fail")
    split: str = opt("train.txt", "split file inside --data whose images are trained on")
    arch: str = opt("resnet32", "train.py --arch")
    res: int = opt(32, "training resolution")
    batch_size: int = opt(128, "per process")
    steps: int = opt(30, "timed steps per variant, split evenly over the rounds", heading="timing")
    warmup: int = opt(3, "untimed steps per variant before its first round (compile, cudnn, loader "
                         "start)")
    rounds: int = opt(-1, "interleaved rounds, each in the next order of the variants; -1: one per "
                          "step on a CPU, "
                          "6 on a GPU")
    round_warmup: int = opt(-1, "untimed steps before each later round; -1: 0 on a CPU, 3 on a GPU")
    workers: int = opt(-1, "workers of both loaders; -1: train.py's default")
    threads: int = opt(0,
                       "torch CPU threads for every variant; 0: what ffcv sets (its worker count)")
    compile: Literal["auto", "on", "off"] = \
        opt("auto", "torch.compile train.py's model; auto: on for CUDA, off on CPU")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt("auto", "train.py --precision")
    text_prompts: int = opt(5, "P: captions per image in the random text features")
    text_dim: int = opt(384, "D: text feature width (all-MiniLM-L6-v2)")
    loader_batches: int = opt(10, "batches timed for each loader alone (no model); 0 = skip")
    script_check: bool = opt(False, "also run `train.py --max-steps` with and without text as a "
                                    "subprocess and read "
                                    "its img_per_s (about doubles the run time; two more "
                                    "compilations on a GPU)")
    gather_check: bool = opt(False, "only time the text InfoNCE with negatives gathered from 2 "
                                    "processes (torchrun, "
                                    "gloo on CPU / nccl on GPU) against local negatives, and exit")
    gather_worker: str = opt("", "internal: the JSON path a --gather-check worker process writes")
    seed: int = opt(0, "seed of the students, text features and loaders")
    out: str = opt("bench/results/train_bench.json", "JSON with every figure ('' = none)")


def die(msg):
    sys.exit(f"train_bench.py: error: {msg}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SplitDataset(torch.utils.data.Dataset):
    """The plain way: ImageFolder-style (PIL open, RGB, torchvision transforms) over the split."""

    def __init__(self, root, items, transform):
        self.root, self.items, self.transform = Path(root), items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        with Image.open(self.root / path) as image:
            return self.transform(image.convert("RGB")), label


def plain_loader(tcfg, items, device, workers, min_scale):
    from torchvision import transforms
    transform = transforms.Compose([
        transforms.RandomResizedCrop(tcfg.res, scale=(min_scale, 1.0)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    # Persistent workers: the baseline pays no worker start per epoch (small splits: short epochs).
    return torch.utils.data.DataLoader(
        SplitDataset(tcfg.data, items, transform), batch_size=tcfg.batch_size, shuffle=True,
        drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(tcfg.seed))


def forever(loader):
    """Batches across epoch ends, as a training loop sees them."""
    while True:
        yield from loader


def baseline_variant(tcfg, student, loader, log_prior, device):
    """Generator: one plain training step per next(), yielding (loss,) as a device tensor."""
    model = student.to(device).train()
    # the same optimizer and schedule
    optimizer, scheduler = train.make_optimizer(tcfg, model, 1, len(loader))
    for images, labels in forever(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)[1]
        loss = train.prior_adjusted_ce(logits, labels, log_prior, tcfg.tau_la, tcfg.label_smoothing)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        yield (loss.detach(),)


def train_py_variant(tcfg, student, text_head, text_feats, log_prior, num_rows, loader,
                     accelerator):
    """Generator: a step of train.py's loop per next(), through its own `train_step`, yielding
    (loss, loss_cls[, loss_text]) device tensors (EMA, grad clip, KD, CLIP-teacher losses off)."""
    model = train.Model(student, text_head).to(accelerator.device,
                                               memory_format=torch.channels_last)
    optimizer, scheduler = train.make_optimizer(tcfg, model, accelerator.num_processes, len(loader))
    sup = train.Supervision(text_feats=text_feats)
    trainer = train.make_trainer(tcfg, accelerator, model, optimizer, scheduler, None, sup,
                                 log_prior)
    epoch = 0
    loader.next_epoch = 0
    while True:
        seed = tcfg.seed * 100_003 + epoch * 1009 + accelerator.process_index
        gen = torch.Generator(accelerator.device).manual_seed(seed)
        for images, labels, indices in loader:
            yield tuple(train.train_step(trainer, images, labels, indices, gen).unbind())
        epoch += 1


def loader_alone(batches, count, warm, batch_size, device):
    """img/s of a loader with no model behind it (to device): which side can be the bottleneck."""
    for _ in range(warm):
        next(batches)
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        images = next(batches)[0].to(device, non_blocking=True)
    sync(device)
    del images
    return count * batch_size / (time.perf_counter() - start)


def run_rounds(variants, cfg, device, threads, rounds, round_warmup):
    """Interleaved timing: per variant, per-round rates and the losses of the timed steps."""
    from tqdm import tqdm
    per_round = [cfg.steps // rounds + (1 if r < cfg.steps % rounds else 0) for r in range(rounds)]
    results = {name: {"seconds": [], "images": [], "losses": [], "threads_seen": set()}
               for name in variants}
    bar = tqdm(total=len(variants) * (cfg.steps + cfg.warmup + (rounds - 1) * round_warmup),
               unit="step", dynamic_ncols=True, desc="train_bench")
    # Every order of the variants in turn: each is preceded by each other about equally often, so
    # the work a loader does in the background after its own step (refilling its prefetch queue) is
    # not charged to one variant.
    orders = list(itertools.permutations(variants))
    for r, n in enumerate(per_round):
        for name in orders[r % len(orders)]:
            steps, res = variants[name], results[name]
            # ffcv sets it again at each epoch start: every variant gets the same
            torch.set_num_threads(threads)
            for _ in range(cfg.warmup if r == 0 else round_warmup):
                next(steps)
                bar.update(1)
            sync(device)
            start = time.perf_counter()
            losses = []
            for _ in range(n):
                losses.append(next(steps))
                bar.update(1)
            sync(device)
            res["seconds"].append(time.perf_counter() - start)
            res["images"].append(n * cfg.batch_size)
            res["losses"] += [torch.stack(step_losses) for step_losses in losses]
            res["threads_seen"].add(torch.get_num_threads())
            bar.set_postfix(variant=name, img_s=f"{res['images'][-1] / res['seconds'][-1]:.0f}")
    bar.close()
    for res in results.values():
        res["img_per_s"] = sum(res["images"]) / sum(res["seconds"])
        res["round_img_per_s"] = [i / s for i, s in zip(res["images"], res["seconds"])]
        # [timed steps, parts]; read once, after timing
        res["losses"] = torch.stack(res["losses"]).cpu().tolist()
        res["threads_seen"] = sorted(res["threads_seen"])
    return results


def loss_summary(losses, part=0):
    """Mean of the first and of the last few timed steps (single batches are noisy)."""
    k = max(1, min(5, len(losses) // 4))
    values = [row[part] for row in losses]
    first, last = float(np.mean(values[:k])), float(np.mean(values[-k:]))
    return {"first": first, "last": last, "k": k, "decreasing": last < first,
            "finite": bool(np.isfinite(values).all())}


def write_text_features(path, split_path, num_rows, prompts, dim, seed):
    """A text.npy + text.json that train.py's load_features accepts: random unit vectors, fp16."""
    feats = np.random.default_rng(seed).standard_normal((num_rows, prompts, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    np.save(path, feats.astype(np.float16))
    sidecar = {"kind": "text", "encoder": "random (train_bench.py)",
               "prompts": [f"r{i}" for i in range(prompts)], "shape": list(feats.shape),
               "split_sha256": train.sha256_file(split_path)}
    # load_artifact refuses an unbound sidecar
    sidecar["sha256"] = train.sidecar_digest(path, sidecar)
    Path(path).with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")


def script_check(cfg, tcfg, workers, num_rows, tmp):
    """train.py --max-steps as a user runs it; img_per_s over its log windows but the first."""
    split_path = Path(tcfg.data) / tcfg.train_split
    text_path = Path(tmp) / "text.npy"
    write_text_features(text_path, split_path, num_rows, cfg.text_prompts, cfg.text_dim, cfg.seed)
    # The first metrics row covers start-up and compilation and is left out; each row costs train.py
    # a host sync, so rows are not made much more often than its default --log-every 20 would.
    window = max(cfg.warmup, 10)
    max_steps = window * (1 + math.ceil(cfg.steps / window))
    out = {}
    for name, extra in (("train.py", []),
                        ("train.py + text", ["--text", str(text_path), "--text-weight", "1.0"])):
        run_dir = Path(tmp) / ("text" if extra else "plain")
        cmd = [sys.executable, str(ROOT / "train.py"), "--data", tcfg.data, "--train-split",
               tcfg.train_split, "--arch", tcfg.arch, "--res", str(tcfg.res), "--batch-size",
               str(tcfg.batch_size), "--workers", str(workers), "--precision", tcfg.precision,
               "--compile" if tcfg.compile else "--no-compile", "--seed", str(tcfg.seed),
               "--export", "", "--epochs", "1000", "--eval-every", "1000000", "--log-every",
               str(window), "--max-steps", str(max_steps), "--out", str(run_dir)] + extra
        print(f"train_bench: running train.py {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(f"train_bench: warning: train.py --max-steps failed (rc {proc.returncode}): "
                  f"{' | '.join(tail)}")
            out[name] = {"error": tail}
            continue
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        rows = [r for r in rows if "img_per_s" in r]
        seconds = [window * tcfg.batch_size / r["img_per_s"] for r in rows[1:]]
        out[name] = {"img_per_s": len(seconds) * window * tcfg.batch_size / sum(seconds),
                     "window_img_per_s": [r["img_per_s"] for r in rows[1:]], "window": window,
                     "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                     "steps": max_steps}
    return out


def gather_worker(cfg):
    """One process of --gather-check: ms per forward + backward of the text InfoNCE, gathered vs
    local negatives."""
    import torch.distributed as dist
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.seed + rank)
    proj = torch.nn.Linear(512, 256).to(device)
    feats, texts = torch.randn(cfg.batch_size, 512, device=device), \
        torch.randn(cfg.batch_size, 256, device=device)
    labels = torch.randint(0, 100, (cfg.batch_size,), device=device)
    scale = torch.tensor(1 / 0.07, device=device)
    timings = {}
    # the second pass of each is the one timed
    for mode in ("local", "gathered", "local", "gathered"):
        times = []
        for _ in range(cfg.warmup + cfg.steps):
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            train.text_loss(proj(feats), texts, scale, labels, None, False,
                            mode == "local").backward()
            sync(device)
            times.append(time.perf_counter() - start)
        timings[mode] = 1000 * float(np.median(times[cfg.warmup:]))
    if rank == 0:
        Path(cfg.gather_worker).write_text(json.dumps(timings))
    dist.destroy_process_group()


def gather_check(cfg):
    """--gather-check: 2 processes on this machine, batch --batch-size each, embed 256."""
    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
        path = Path(tmp) / "gather.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29541", str(Path(__file__).resolve()), "--gather-worker",
               str(path), "--batch-size", str(cfg.batch_size), "--steps", str(cfg.steps),
               "--warmup", str(cfg.warmup), "--out", ""]
        subprocess.run(cmd, check=True)
        timings = json.loads(path.read_text())
    extra = timings["gathered"] - timings["local"]
    print(f"text InfoNCE forward + backward, 2 processes x batch {cfg.batch_size}, embed 256: "
          f"local negatives {timings['local']:.2f} ms, gathered {timings['gathered']:.2f} ms "
          f"(gather costs {extra:+.2f} ms per step)")


def main():
    cfg = train.parse_config(BenchConfig)
    if cfg.gather_worker:
        return gather_worker(cfg)
    if cfg.gather_check:
        return gather_check(cfg)
    split_path = Path(cfg.data) / cfg.split
    if not split_path.exists():
        if not cfg.prepare:
            die(f"{split_path} not found (make it with prepare.py, or pass --prepare DATASET)")
        print(f"train_bench: {split_path} not found, running prepare.py {cfg.prepare} --out "
              f"{cfg.data}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "prepare.py"), cfg.prepare, "--out", cfg.data],
                       cwd=ROOT, check=True)
        if not split_path.exists():
            die(f"prepare.py {cfg.prepare} did not write {split_path}")

    from accelerate import Accelerator
    on_gpu = torch.cuda.is_available()
    use_compile = on_gpu if cfg.compile == "auto" else cfg.compile == "on"
    # train.py's own decision for auto: bf16 where the hardware computes it
    precision = cfg.precision
    if precision == "auto":
        precision = train.auto_dtype("cuda" if on_gpu else "cpu",
                                     train.has_native_bf16(train.pick_device()))[0]
    rounds = cfg.rounds if cfg.rounds > 0 else (min(6, cfg.steps) if on_gpu else cfg.steps)
    round_warmup = cfg.round_warmup if cfg.round_warmup >= 0 else (3 if on_gpu else 0)
    if not 1 <= rounds <= cfg.steps:
        die(f"--rounds {rounds} must be between 1 and --steps {cfg.steps}")
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                              cpu=not on_gpu)
    device = accelerator.device
    # train.py's own config and defaults (lr, weight decay, schedule, min_scale, loss, text head
    # sizes ...); only what a bench varies is set here.
    tcfg = train.Config(data=cfg.data, train_split=cfg.split, arch=cfg.arch, res=cfg.res,
                        batch_size=cfg.batch_size, workers=cfg.workers, compile=use_compile,
                        precision=cfg.precision, seed=cfg.seed, text_weight=1.0)

    classes_path = Path(cfg.data) / tcfg.classes
    if not classes_path.exists():
        die(f"{classes_path} not found (make it with prepare.py)")
    num_classes = len([n for n in classes_path.read_text().splitlines() if n.strip()])
    items = train.read_split(split_path)
    if len(items) < cfg.batch_size:
        die(f"{split_path}: {len(items)} images, fewer than --batch-size {cfg.batch_size}")
    labels = np.array([y for _, y in items])
    if labels.max() >= num_classes:
        die(f"{split_path}: label {labels.max()} but {classes_path} names {num_classes} classes")
    counts = np.bincount(labels, minlength=num_classes)
    log_prior = torch.log(torch.as_tensor(counts.clip(min=1) / counts.sum(),
                                          dtype=torch.float32)).to(device)

    # One initial student for all variants; the text head draws from its own seed: they start equal.
    torch.manual_seed(cfg.seed)
    student = train.Student(cfg.arch, num_classes, cfg.res)
    torch.manual_seed(cfg.seed + 1)
    text_head = train.TextHead(student.feat_dim, cfg.text_dim, tcfg.embed_dim, tcfg.adaptor_hidden,
                               tcfg.text_temp, tcfg.learn_temp)
    text_feats = torch.randn(len(items), cfg.text_prompts, cfg.text_dim,
                             generator=torch.Generator().manual_seed(cfg.seed))
    text_feats = F.normalize(text_feats, dim=-1).to(device, torch.float16)

    # written once, then cached under DATA/.ffcv
    beton = train.beton_for(tcfg, cfg.split, accelerator)
    ffcv_loaders = [train.make_loader(tcfg, beton, True, accelerator) for _ in range(2)]
    # make_loader resolved --workers -1 and ffcv set torch's threads to it: both are read back here.
    workers = ffcv_loaders[0].num_workers
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    min_scale = tcfg.min_scale if tcfg.min_scale > 0 else (0.35 if cfg.res <= 64 else 0.08)
    # Images train.py found unreadable are not in its .beton: the baseline leaves them out too.
    errors_path = Path(beton).with_suffix(".errors.jsonl")
    error_lines = errors_path.read_text().splitlines() if errors_path.exists() else []
    skipped = {json.loads(line)["index"] for line in error_lines}
    base_items = [item for i, item in enumerate(items) if i not in skipped]
    base_loader = plain_loader(tcfg, base_items, device, workers, min_scale)

    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({os.cpu_count()} cores)"
    prec_name = precision
    print(f"train_bench: {split_path} ({len(items)} images, {num_classes} classes), {cfg.arch} @ "
          f"{cfg.res}px, batch {cfg.batch_size}, {device_name}, torch {torch.__version__}; loader "
          f"workers {workers} (both), torch threads {threads} (all variants); train.py: "
          f"{prec_name}, compile {'on' if use_compile else 'off'}, channels_last; "
          + (f"baseline convs in TF32: {torch.backends.cudnn.allow_tf32} (torch's default); "
             if on_gpu else "")
          + f"{cfg.steps} timed steps per variant in {rounds} interleaved rounds (+{cfg.warmup} "
            f"warm-up steps, +{round_warmup} before later rounds)",
          flush=True)

    loader_rates = {}
    if cfg.loader_batches > 0:
        alone = train.make_loader(tcfg, beton, True, accelerator)
        loader_rates["ffcv (train.py)"] = loader_alone(forever(alone), cfg.loader_batches, 2,
                                                       cfg.batch_size, device)
        alone = plain_loader(tcfg, base_items, device, workers, min_scale)
        loader_rates["PIL + DataLoader"] = loader_alone(forever(alone), cfg.loader_batches, 2,
                                                        cfg.batch_size, device)
        del alone
        torch.set_num_threads(threads)
        print("loaders alone (no model): " + ", ".join(f"{n} {r:.0f} img/s"
                                                       for n, r in loader_rates.items()),
              flush=True)

    variants = {
        "baseline": baseline_variant(tcfg, copy.deepcopy(student), base_loader, log_prior, device),
        "train.py": train_py_variant(tcfg, copy.deepcopy(student), None, None, log_prior,
                                     len(items), ffcv_loaders[0], accelerator),
        "train.py + text": train_py_variant(tcfg, copy.deepcopy(student), text_head, text_feats,
                                            log_prior, len(items), ffcv_loaders[1], accelerator)}
    results = run_rounds(variants, cfg, device, threads, rounds, round_warmup)

    titles = {"baseline": "baseline: PIL + DataLoader, eager fp32",
              "train.py": "train.py: ffcv, channels_last, "
                          f"{prec_name}{', compile' if use_compile else ''}",
              "train.py + text": f"train.py + text loss (P={cfg.text_prompts}, D={cfg.text_dim})"}
    k = loss_summary(results["baseline"]["losses"])["k"]
    print(f"\n{'variant':<44} {'img/s':>7}   rounds min/median/max   loss: mean of first {k} -> "
          f"last {k} timed steps")
    for name, res in results.items():
        for key, part in (("loss", 0), ("loss_cls", 1), ("loss_text", 2)):
            if len(res["losses"][0]) > part:
                res[key] = loss_summary(res["losses"], part)
        loss = res["loss"]
        flag = "" if loss["decreasing"] and loss["finite"] else \
            "  NON-FINITE" if not loss["finite"] else "  NOT DECREASING"
        parts = "".join(f"  {key[5:]} {res[key]['first']:.3f} -> {res[key]['last']:.3f}"
                        for key in ("loss_cls", "loss_text") if "loss_text" in res)
        spread = "/".join(f"{v:.0f}" for v in np.percentile(res["round_img_per_s"], [0, 50, 100]))
        print(f"{titles[name]:<44} {res['img_per_s']:7.1f}   {spread:<21}   "
              f"{loss['first']:.3f} -> {loss['last']:.3f}{flag}{parts}")

    # Paired per round: a round's variants ran back to back, so a slow spell on a shared machine
    # cancels. The quartiles of the per-round ratios say how far to trust the figures here today.
    def paired(a, b):
        ratios = [x / y for x, y in zip(results[a]["round_img_per_s"],
                                        results[b]["round_img_per_s"])]
        return np.percentile(ratios, [25, 50, 75])
    ratio = results["train.py"]["img_per_s"] / results["baseline"]["img_per_s"]
    text_cost = \
        100 * (1 - results["train.py + text"]["img_per_s"] / results["train.py"]["img_per_s"])
    ratio_q = paired("train.py", "baseline")
    text_cost_q = 100 * (1 - paired("train.py + text", "train.py"))[::-1]
    goal = "; goal on a GPU, resnet50 @ 176 px: >= 2x" if on_gpu else ""
    print(f"\nratio train.py / baseline: {ratio:.2f}x   (per-round ratios: median "
          f"{ratio_q[1]:.2f}x, quartiles {ratio_q[0]:.2f}x .. {ratio_q[2]:.2f}x{goal})")
    print(f"text loss cost: {text_cost:+.1f} % of train.py's img/s   (per-round: median "
          f"{text_cost_q[1]:+.1f} %, quartiles {text_cost_q[0]:+.1f} % .. {text_cost_q[2]:+.1f} %; "
          "goal <= 5 %)")
    if any(r["threads_seen"] != [threads] for r in results.values()):
        print("train_bench: warning: torch's thread count changed during timing: " +
              ", ".join(f"{n} {r['threads_seen']}" for n, r in results.items()))

    checked = {}
    if cfg.script_check:
        with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
            checked = script_check(cfg, tcfg, workers, len(items), tmp)
        if all("img_per_s" in v for v in checked.values()):
            plain, text = checked["train.py"]["img_per_s"], checked["train.py + text"]["img_per_s"]
            # Run after the interleaved rounds, not among them: a shared machine's load may differ.
            first, last = checked["train.py"]["loss_first"], checked["train.py"]["loss_last"]
            print("train.py --max-steps (subprocess, metrics.jsonl img_per_s, run after the rounds "
                  f"above): {plain:.1f} img/s, + text {text:.1f} img/s (text cost "
                  f"{100 * (1 - text / plain):+.1f} %), vs in-process "
                  f"{results['train.py']['img_per_s']:.1f} and "
                  f"{results['train.py + text']['img_per_s']:.1f}; loss {first:.3f} -> {last:.3f}")

    if cfg.out:
        report = {"made_by": "bench/train_bench.py", "config": asdict(cfg), "device": device_name,
                  "torch": torch.__version__,
                  "precision": prec_name, "compile": use_compile, "workers": workers,
                  "torch_threads": threads, "rounds": rounds, "round_warmup": round_warmup,
                  "num_images": len(items), "split_sha256": train.sha256_file(split_path),
                  "loaders_alone_img_per_s": loader_rates, "variants": results,
                  "ratio_train_py_over_baseline": ratio,
                  "ratio_per_round_quartiles": ratio_q.tolist(), "text_loss_cost_pct": text_cost,
                  "text_loss_cost_pct_per_round_quartiles": text_cost_q.tolist(),
                  "script_check": checked}
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
