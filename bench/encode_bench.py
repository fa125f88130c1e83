"""encode.py's text path against a plain SentenceTransformer.encode loop, on the same sentences, in
one process.

    .venv/bin/python bench/encode_bench.py    # all-MiniLM-L6-v2 (offline package)
    .venv/bin/python bench/encode_bench.py --sentences 4000 --rounds 5 --batch-size 128

Sentences imitate VLM captions (per image one long general answer and four short targeted ones) and
are all distinct, so encode.py's de-duplication of repeated captions gains nothing here. The
baseline encodes the sentences chunk by chunk with `model.encode(chunk)` at its defaults (fp32,
batch 32, its own length sort); encode.py's path is `Encoder.texts` (length-sorted batches, weights
in bf16 where the CPU has native bf16). Rounds alternate the two so that a busy machine slows both
alike; the medians are printed.
"""
import os

# before huggingface_hub reads it: the offline MiniLM package
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import importlib.util
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("encode", REPO / "encode.py")
encode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(encode)  # the stage's own Encoder and its typed command line
opt = encode.opt
WORDS = ("the a an of with and on in its small large long short dark light grey white black "
         "striped plain soft shirt dress coat bag boot sandal sneaker trouser pullover sleeve "
         "collar button strap heel sole zipper pocket hood lace fabric cotton leather wool pattern "
         "print logo shape edge front back side left right shows image photo item worn casual "
         "formal summer winter simple classic modern loose tight fitted").split()


@dataclass
class Config:
    model: str = opt("minilm", "what encode.py --model takes (a sentence-transformers model)")
    sentences: int = opt(1000, "sentences per round (a fifth long, the rest short)")
    rounds: int = opt(3, "timed rounds of each path, alternating")
    chunk: int = opt(500, "sentences handed over per call, in both paths")
    batch_size: int = opt(128, "encode.py --batch-size")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt("auto", "encode.py --dtype")
    seed: int = opt(0, "seed of the generated sentences")


def captions(count, seed):
    """Distinct caption-like sentences in file order: per image 1 general (25-70 words) + 4 targeted
    (4-20)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < count:
        low, high = (25, 70) if len(out) % 5 == 0 else (4, 20)
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "."
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


def main():
    cfg = encode.parse_config(Config)
    import torch

    path, model_config = encode.resolve_model(cfg.model)
    device, dtype = encode.pick_device_dtype(encode.Config(device="auto", dtype=cfg.dtype))
    ours = encode.Encoder(cfg.model, path, model_config, device, dtype)
    if ours.dual:
        sys.exit("encode_bench.py: error: the baseline is SentenceTransformer.encode: "
                 "pass a sentence-transformers --model")
    from sentence_transformers import SentenceTransformer
    # its own fp32 copy: encode.py casts its weights
    plain = SentenceTransformer(path, device=device)
    sentences = captions(cfg.sentences, cfg.seed)
    chunks = [sentences[i:i + cfg.chunk] for i in range(0, len(sentences), cfg.chunk)]

    def baseline():
        return np.concatenate([plain.encode(chunk) for chunk in chunks])

    def encode_py():
        return np.concatenate([ours.texts(chunk, cfg.batch_size) for chunk in chunks])

    print(f"{len(sentences)} distinct sentences, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; "
          f"encode.py: {dtype}, batch {cfg.batch_size}; baseline: SentenceTransformer.encode "
          "defaults", flush=True)
    plain.encode(sentences[:64]), ours.texts(sentences[:64], cfg.batch_size)  # warm-up
    # Wall-clock rates are what a user waits for; CPU-time rates (process_time, all threads) are
    # steadier when other jobs share the cores. Both are printed.
    wall, cpu = {"baseline": [], "encode.py": []}, {"baseline": [], "encode.py": []}
    feats = {}
    for r in range(cfg.rounds):
        for name, fn in (("baseline", baseline),
                         ("encode.py", encode_py))[:: 1 if r % 2 == 0 else -1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            feats[name] = fn()
            wall[name].append(len(sentences) / (time.perf_counter() - start))
            cpu[name].append(len(sentences) / (time.process_time() - start_cpu))
        print(f"round {r + 1}: baseline {wall['baseline'][-1]:7.1f} sent/s   "
              f"encode.py {wall['encode.py'][-1]:7.1f} sent/s"
              f"   (per CPU-second: {cpu['baseline'][-1]:.1f} vs {cpu['encode.py'][-1]:.1f})",
              flush=True)
    reference = feats["baseline"] / np.linalg.norm(feats["baseline"], axis=1, keepdims=True)
    cosine = (reference * feats["encode.py"]).sum(1)
    median = statistics.median
    print(f"agreement with the fp32 baseline: cosine min {cosine.min():.4f}, mean "
          f"{cosine.mean():.5f}")
    print(f"baseline (SentenceTransformer.encode loop, defaults): {median(wall['baseline']):8.1f} "
          "sentences/s")
    print(f"encode.py path:                                       {median(wall['encode.py']):8.1f} "
          "sentences/s")
    print("ratio encode.py / baseline: "
          f"{median(wall['encode.py']) / median(wall['baseline']):.2f}x wall-clock, "
          f"{median(cpu['encode.py']) / median(cpu['baseline']):.2f}x per CPU-second (medians of "
          f"{cfg.rounds} rounds)")


if __name__ == "__main__":
    main()
