"""eval.py benchmarks, each against a baseline measured in this process.

    .venv/bin/python bench/eval_bench.py           # extraction: resnet32 at 32 px, 1024 images
    .venv/bin/python bench/eval_bench.py --arch resnet56 --images 2048
    .venv/bin/python bench/eval_bench.py --memory  # metrics: streaming pass vs keeping every output

Extraction: images/s of eval.extract (PIL loader + channels_last student) against the same loader
feeding the student in the default NCHW layout, on 28x28 PNGs. Memory: peak RSS growth (fresh
subprocess each) of eval.Pass over N synthetic images (C classes, D-d features) against what eval.py
did before issue 16: keep every feature and logit, then softmax them and take a float64 copy.
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)

MEMORY = """
import importlib.util, sys, time, types
import numpy as np, torch
spec = importlib.util.spec_from_file_location("ev", sys.argv[1])
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)
def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
way, n, classes, dim, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), 500
gen = torch.Generator().manual_seed(0)
# peak RSS := current RSS, so the import's peak does not hide ours
open("/proc/self/clear_refs", "w").write("5")
before, start = kib("VmRSS:"), time.perf_counter()
if way == "stream":
    ckpt = {"num_classes": classes, "class_counts": [50] * classes}
    keep = np.zeros(n, bool)
    keep[::max(1, n // 1000)] = True  # the default t-SNE sample: 1,000 rows
    state = ev.Pass(ckpt, types.SimpleNamespace(classes=list(range(classes)), id_count=0),
                    types.SimpleNamespace(ece_bins=15), None, keep)
feats, logits, labels = [], [], []
for first in range(0, n, batch):
    rows = torch.arange(first, min(n, first + batch))
    f, z = (torch.randn(len(rows), dim, generator=gen),
            torch.randn(len(rows), classes, generator=gen))
    y = torch.randint(0, classes, (len(rows),), generator=gen)
    if way == "stream":
        state.add(f, z, y, rows, torch.ones(len(rows), dtype=torch.bool), [])
    else:
        feats.append(f); logits.append(z); labels.append(y)
if way == "stream":
    state.results()
else:  # eval.py before issue 16: every output kept; probabilities and a float64 copy at the end
    feats, logits, labels = torch.cat(feats), torch.cat(logits), torch.cat(labels).numpy()
    probs = logits.softmax(1).numpy()
    probs64 = np.asarray(probs, dtype=np.float64)
    confidence, preds = probs64.max(1), probs64.argmax(1)
print((kib("VmHWM:") - before) / 1024, n / (time.perf_counter() - start))
"""


def memory(args):
    for n in (10_000, 50_000):
        grown = {}
        for way in ("keep-all", "stream"):
            out = subprocess.run([sys.executable, "-c", MEMORY, str(REPO / "eval.py"), way, str(n),
                                  str(args.classes), str(args.dim)],
                                 capture_output=True, text=True, check=True).stdout.split()
            grown[way] = (float(out[0]), float(out[1]))
        print(f"eval metrics, {n} images x {args.classes} classes, {args.dim}-d: peak RSS "
              f"+{grown['stream'][0]:.0f} MiB "
              f"streaming vs +{grown['keep-all'][0]:.0f} MiB keeping every output "
              f"({grown['keep-all'][0] * 1024 / n:.1f} vs {grown['stream'][0] * 1024 / n:.2f} "
              "KiB/image); "
              f"{grown['stream'][1]:.0f} vs {grown['keep-all'][1]:.0f} images/s")


def extraction(args):
    preprocess = {"res": args.res, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "crop_ratio": 1.0}
    cfg = ev.Config(batch_size=256)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        items = []
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (28, 28),
                                         dtype=np.uint8)).save(Path(root) / f"{i}.png")
            items.append((f"{i}.png", i % 10))
        student = ev.Student(args.arch, 10, args.res).eval()

        def rate(memory_format):
            model = student.to(device, memory_format=memory_format)
            # extract() makes channels_last inputs: undo it
            if memory_format == torch.contiguous_format:
                forward = model.forward

                def contiguous_forward(x):
                    return forward(x.contiguous())
                model.forward = contiguous_forward
            best = 0.0
            for _ in range(args.repeats):
                start = time.perf_counter()
                ev.extract(model, root, items, preprocess, cfg, device, str(memory_format))
                best = max(best, args.images / (time.perf_counter() - start))
            if memory_format == torch.contiguous_format:
                del model.forward
            return best

        baseline = rate(torch.contiguous_format)
        ours = rate(torch.channels_last)
    print(f"eval.extract {args.arch} @ {args.res}px on {device}: {ours:.0f} img/s channels_last vs "
          f"{baseline:.0f} img/s NCHW (ratio {ours / baseline:.2f}x)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true",
                        help="streaming metrics vs keeping every output")
    parser.add_argument("--classes", type=int, default=1000,
                        help="--memory: classes (ImageNet-LT: 1000)")
    parser.add_argument("--dim", type=int, default=2048,
                        help="--memory: feature width (ResNet-50: 2048)")
    args = parser.parse_args()
    memory(args) if args.memory else extraction(args)


if __name__ == "__main__":
    main()
