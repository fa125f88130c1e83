"""eval.py feature extraction: images/s of eval.extract (PIL loader + channels_last student) against the same
loader feeding the student in the default NCHW layout, measured in this process on 28x28 PNGs.

    .venv/bin/python bench/eval_bench.py                     # resnet32 at 32 px, 1024 images
    .venv/bin/python bench/eval_bench.py --arch resnet56 --images 2048
"""
import argparse
import importlib.util
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    preprocess = {"res": args.res, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_ratio": 1.0}
    cfg = ev.Config(batch_size=256)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        items = []
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(Path(root) / f"{i}.png")
            items.append((f"{i}.png", i % 10))
        student = ev.Student(args.arch, 10, args.res).eval()

        def rate(memory_format):
            model = student.to(device, memory_format=memory_format)
            if memory_format == torch.contiguous_format:  # extract() makes channels_last inputs: undo it for the baseline
                forward = model.forward
                model.forward = lambda x: forward(x.contiguous())
            best = 0.0
            for _ in range(args.repeats):
                start = time.perf_counter()
                ev.extract(model, root, items, preprocess, cfg, device, memory_format.__str__())
                best = max(best, args.images / (time.perf_counter() - start))
            if memory_format == torch.contiguous_format:
                del model.forward
            return best

        baseline = rate(torch.contiguous_format)
        ours = rate(torch.channels_last)
    print(f"eval.extract {args.arch} @ {args.res}px on {device}: {ours:.0f} img/s channels_last vs {baseline:.0f} img/s NCHW "
          f"(ratio {ours / baseline:.2f}x)")


if __name__ == "__main__":
    main()
