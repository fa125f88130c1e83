"""Scale benchmark: start-up time and peak RSS of every stage against the dataset size N, with the
fitted growth.

    .venv/bin/python bench/scale_bench.py            # N = 10k, 50k, 115,846 (ImageNet-LT)
    .venv/bin/python bench/scale_bench.py --inat     # + 437,513 (iNaturalist 2018)
    .venv/bin/python bench/scale_bench.py --quick    # N = 2k, 5k: a smoke run (~4 min)
    .venv/bin/python bench/scale_bench.py --repo /tmp/before \
        --json before.json                           # another checkout's stages

For each N it writes synthetic artifacts in the real on-disk formats (a split of `relative/path
label` lines over a long-tailed label distribution, 16x16 PNGs behind symlinked folders so N
distinct paths cost a few hundred files, caption shards of `{"index", "prompt", "text", "path"}`
records with ~700-character texts), lets the stages themselves write every file whose format is
theirs (caption metas, text.npy and its sidecar, the .beton, final.pt), then runs each stage as a
user would, as a subprocess, on the path whose cost grows with N and not with the model:

    caption --merge      k-way join of 2 caption shards into captions.jsonl
    caption restart      caption.py rerun on the merged file when every (image, prompt) is done
    encode rerun         encode.py on captions text.npy already covers: "up to date", none encoded
    train start          train.py --max-steps 1 (resnet20, 8 px) with --text, .beton cached:
                         start-up + 1 step (and again with --prompts general --teacher-images
                         images.npy [N, 512], synthesised)
    eval                 eval.py on N images of a split with that tiny final.pt (a forward each)

and, for information, the set-up runs that build artifacts (caption shard metas, encode's first run
over 50 distinct texts, train's first run which writes the .beton). Each measurement is a fresh
child process that runs the stage and reads resource.getrusage(RUSAGE_CHILDREN).ru_maxrss: the peak
RSS of the largest process of the stage (a DataLoader or ffcv worker counts on its own). `floor` is
the stage's `--help` (imports only).

The table gives per stage `wall s / cpu s / peak MiB` at each N, then the growth fitted over N: the
log-log slope of the CPU time above the floor's (1 = linear; CPU, not wall, because on a shared
machine wall time is mostly the neighbours' load), and the RSS slope (least squares) extrapolated to
iNat 2018's 437,513 images. A stage is flagged SUPERLINEAR when its slope exceeds
--max-time-exponent (and it spends > 2 CPU s above the floor: below, the slope is noise), and MEMORY
when its RSS would grow by more than --max-mem-growth-mib at iNat size (the goal of issue 16: under
~1 GiB beyond the loaded model) and grew by > 32 MiB over the measured N. Set-up rows are never
flagged. --json keeps every run (written after each one, so a bench stopped early still leaves its
numbers; --show prints their table).
"""
import json
import os
import shutil
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from shared_helpers import (die, opt, parse_config, sha256_file, sidecar_digest,  # noqa: E402
                            write_json)
from tiny import build_tiny_llava  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INAT = 437_513


@dataclass
class Config:
    repo: str = opt(str(REPO), "checkout whose stages run (e.g. a `git worktree` of an older "
                               "commit)", heading="what")
    sizes: str = opt("10000,50000,115846", "comma-separated dataset sizes N")
    quick: bool = opt(False, "smoke run: N = 2000,5000 (overrides --sizes)")
    inat: bool = opt(False,
                     "add N = 437,513 (iNaturalist 2018; ~2.5 GB of captions, minutes per stage)")
    stages: str = opt("caption,encode,train,eval",
                      "comma-separated stages to measure (train needs encode, eval train)")
    classes: int = opt(1000, "number of classes (ImageNet-LT: 1000); every class gets >= 1 image",
                       heading="data")
    imbalance: float = opt(100.0, "largest / smallest class frequency of the long-tailed labels")
    text_chars: int = opt(700,
                          "mean caption length in characters (LLaVA-1.6 answers run ~500-1000)")
    distinct_texts: int = opt(50, "distinct caption texts (encode.py encodes each once per chunk: "
                                  "cheap)")
    work: str = opt("/tmp/vlmkd-scale",
                    "scratch folder; one subfolder per N, deleted after it unless --keep")
    keep: bool = opt(False, "keep each N's artifacts")
    timeout: int = opt(1800, "seconds before one stage run is killed and recorded as a timeout",
                       heading="measure")
    max_time_exponent: float = opt(1.2, "flag a stage whose time above the floor grows faster than "
                                        "N^this")
    max_mem_growth_mib: float = opt(1024.0, "flag a stage whose peak RSS would grow by more than "
                                            "this at 437,513")
    json: str = opt("", "also write every measurement to this JSON file")
    show: str = opt("", "print the table of a --json file written before (with these thresholds) "
                        "and exit")


# A fresh interpreter per measurement: RUSAGE_CHILDREN of this child then covers one stage run.
MEASURE = r"""
import json, os, resource, signal, subprocess, sys, time
cmd, log, timeout, cwd, env = json.loads(sys.argv[1])
start = time.perf_counter()
with open(log, "wb") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_mib": usage.ru_maxrss / 1024}))
"""


def measure(cmd, log, cfg, cwd):
    """{"rc", "seconds" (wall), "cpu_s" (user + system, all its processes), "maxrss_mib", "tail"} of
    one stage run, in its own measuring child."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_MININTERVAL="5")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    arg = json.dumps([[str(c) for c in cmd], str(log), cfg.timeout, str(cwd), env])
    out = subprocess.run([sys.executable, "-c", MEASURE, arg], capture_output=True, text=True)
    if out.returncode != 0:
        die(f"the measuring child failed: {out.stderr.strip()[-300:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    lines = [ln for ln in Path(log).read_text(errors="replace").replace("\r", "\n").splitlines()
             if ln.strip()]
    result["tail"] = lines[-1][:200] if lines else ""
    return result


# ----------------------------------------------------------------------------------- synthetic data
WORDS = ("a photo of the object with long short sleeves round neck strap heel sole black white "
         "grey red blue dark "
         "light pale striped plain soft cotton leather wool smooth rough shape outline parts "
         "colour texture pattern "
         "background setting worn used detail similar kinds material made bird feathers beak wing "
         "tail branch leaf "
         "flower petal stem green yellow brown orange small large tiny huge standing sitting "
         "flying open field").split()


def long_tail_labels(n, classes, imbalance, rng):
    """n labels over `classes`, class c about imbalance^(-c/(C-1)) as frequent as class 0, every
    class at least once."""
    if n < classes:
        die(f"N = {n} is below --classes {classes}: every class needs an image (train.py's --loss "
            "la)")
    weights = imbalance ** (-np.arange(classes) / max(classes - 1, 1))
    counts = 1 + np.floor(weights / weights.sum() * (n - classes)).astype(np.int64)
    counts[: n - counts.sum()] += 1
    return rng.permutation(np.repeat(np.arange(classes), counts))


def write_data(data, n, cfg, rng):
    """DATA/{train,val,test}.txt, classes.txt and the images: 1000 PNGs in pool/, img/dNNNN ->
    ../pool symlinks."""
    from PIL import Image
    pool = data / "pool"
    pool.mkdir(parents=True)
    for k in range(1000):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3),
                                     dtype=np.uint8)).save(pool / f"{k:03d}.png")
    (data / "img").mkdir()
    for d in range((n + 999) // 1000):
        (data / "img" / f"d{d:04d}").symlink_to("../pool", target_is_directory=True)
    labels = long_tail_labels(n, cfg.classes, cfg.imbalance, rng)
    lines = [f"img/d{i // 1000:04d}/{i % 1000:03d}.png {y}\n" for i, y in enumerate(labels)]
    (data / "train.txt").write_text("".join(lines))
    (data / "test.txt").write_text("".join(lines))
    (data / "val.txt").write_text("".join(lines[:200]))
    (data / "classes.txt").write_text("".join(f"class_{c:05d}\n" for c in range(cfg.classes)))
    return [line.rsplit(maxsplit=1)[0] for line in lines]


def caption_texts(cfg, rng):
    """`distinct_texts` JSON-encoded captions of lengths spread over 0.5x..1.5x --text-chars."""
    texts = []
    for target in np.linspace(0.5 * cfg.text_chars, 1.5 * cfg.text_chars, cfg.distinct_texts):
        words = []
        while sum(len(w) + 1 for w in words) < target:
            words.append(WORDS[rng.integers(len(WORDS))])
        texts.append(json.dumps(" ".join(words).capitalize() + ".", ensure_ascii=False))
    return texts


def write_shard(path, paths, prompt_ids, texts, rank, world):
    """The records caption.py --shard rank/world writes, byte for byte: json.dumps(record,
    ensure_ascii=False)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rank, len(paths), world):
            f.writelines(f'{{"index": {i}, "prompt": "{p}", "text": '
                         f'{texts[(i * 7 + j) % len(texts)]}, '
                         f'"path": "{paths[i]}"}}\n' for j, p in enumerate(prompt_ids))


def synth_array(path, shape, sidecar):
    """NAME.npy (random unit rows, fp16) + NAME.json as encode.py writes them, sha256 by
    sidecar_digest: for the teacher image embeddings (a CLIP pass per image is not what is
    measured), and text.npy when encode.py fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=tuple(shape))
    rng = np.random.default_rng(0)
    for start in range(0, shape[0], 8192):
        rows = rng.standard_normal((min(8192, shape[0] - start), *shape[1:])).astype(np.float32)
        array[start:start + len(rows)] = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    array.flush()
    del array
    sidecar = {**sidecar, "encoder": "synthetic", "shape": list(shape), "dtype": "float16",
               "normalized": True, "made_by": "scale_bench.py"}
    sidecar["sha256"] = sidecar_digest(path, sidecar)
    write_json(path.with_suffix(".json"), sidecar)


# ----------------------------------------------------------------------------------- one N
def sizes(cfg):
    ns = [2000, 5000] if cfg.quick else sorted({int(s) for s in cfg.sizes.split(",") if s.strip()})
    return ns + [INAT] if cfg.inat and INAT not in ns else ns


def save(cfg, repo, results, report=""):
    if cfg.json:
        write_json(cfg.json, {"repo": str(repo), "sizes": sizes(cfg), "config": vars(cfg),
                              "results": results, "table": report})


def run_size(n, cfg, repo, stages, results):
    """Build N's artifacts (stages write their own metas), measure each stage: results[stage][n]."""
    root = Path(cfg.work) / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    data, caps, merged, text, run = (root / "data", root / "caps", root / "merged", root / "text",
                                     root / "run")
    for folder in (caps, merged, root / "logs"):
        folder.mkdir(parents=True)
    py, rng = sys.executable, np.random.default_rng(n)
    t0 = time.perf_counter()
    paths = write_data(data, n, cfg, rng)
    texts = caption_texts(cfg, rng)
    print(f"N = {n}: split, classes and images written in {time.perf_counter() - t0:.1f} s "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)

    def step(name, cmd, record=True):
        result = measure(cmd, root / "logs" / (re.sub(r"[^a-z0-9]+", "_", name) + ".log"), cfg,
                         root)
        if record:
            results.setdefault(name, {})[str(n)] = result
            # a bench killed at its deadline still leaves what it measured (--show)
            save(cfg, repo, results)
        ok = result["rc"] == 0
        print(f"  {name:<26} {result['seconds']:7.1f} s wall {result['cpu_s']:7.1f} s cpu "
              f"{result['maxrss_mib']:6.0f} MiB"
              + ("" if ok else f"  FAILED rc={result['rc']}: {result['tail']}"), flush=True)
        return ok

    captioned = "caption" in stages or "encode" in stages  # train / eval alone: synthetic text.npy
    # the tests' random LLaVA
    vlm = build_tiny_llava(Path(cfg.work) / "tiny-llava") if captioned else None
    caption = [py, repo / "caption.py", "--split", data / "train.txt", "--root", data, "--vlm", vlm,
               "--prompts", repo / "prompts", "--max-new-tokens", "4"]
    # Each shard's meta as caption.py writes it (one image captioned), then N images of records.
    prompt_ids = sorted((p.stem for p in (repo / "prompts").glob("*.txt")
                         if p.stem != "class_description"),
                        key=lambda stem: (stem != "general", stem))
    for rank in range(2 if captioned else 0):
        captioned = captioned and step(f"setup: caption shard {rank}/2", caption + [
            "--shard", f"{rank}/2", "--limit", rank + 1, "--out", caps / "captions.jsonl"])
    if captioned:
        for rank in range(2):
            meta_path = caps / f"captions.shard-{rank}-of-2.meta.json"
            prompt_ids = [p["id"] for p in json.loads(meta_path.read_text())["prompts"]]
            write_shard(caps / f"captions.shard-{rank}-of-2.jsonl", paths, prompt_ids, texts, rank,
                        2)
            shutil.copy(meta_path, merged / meta_path.name)
            shutil.copy(caps / f"captions.shard-{rank}-of-2.jsonl",
                        merged / f"captions.shard-{rank}-of-2.jsonl")
        size = sum(p.stat().st_size for p in merged.glob("*.jsonl")) / 2**20
        print(f"  caption shards: {n} x {len(prompt_ids)} records, {size:.0f} MiB", flush=True)
    if not (captioned and step("caption --merge", [py, repo / "caption.py", "--merge", "--out",
                                                   merged / "captions.jsonl"],
                               "caption" in stages)):
        # The later stages still need a captions.jsonl: join the shards by index the plain way.
        write_shard(merged / "captions.jsonl", paths, prompt_ids, texts, 0, 1)
        if captioned:
            meta = json.loads((caps / "captions.shard-0-of-2.meta.json").read_text())
            write_json(merged / "captions.meta.json", {**meta, "shard": None})
    if captioned and "caption" in stages:
        step("caption restart", caption + ["--out", merged / "captions.jsonl"])
    if "encode" in stages or "train" in stages or "eval" in stages:
        encode = [py, repo / "encode.py", "--captions", merged / "captions.jsonl", "--split",
                  data / "train.txt", "--model", "minilm", "--out", text]
        if captioned and step("setup: encode first run", encode) and "encode" in stages:
            step("encode rerun", encode)
        split = {"split": str(data / "train.txt"), "split_sha256": sha256_file(data / "train.txt"),
                 "num_images": n}
        if not (text / "text.npy").is_file():
            print("  no text.npy from encode.py: synthesised (random rows, sidecar with "
                  "sidecar_digest)", flush=True)
            synth_array(text / "text.npy", (n, len(prompt_ids), 384), {
                "kind": "text", "prompts": prompt_ids, **split,
                "captions": str(merged / "captions.jsonl"),
                "captions_sha256": sha256_file(merged / "captions.jsonl")})
        synth_array(text / "images.npy", (n, 512), {"kind": "images", **split})
    if "train" in stages or "eval" in stages:
        train = [py, repo / "train.py", "--data", data, "--arch", "resnet20", "--res", "8",
                 "--max-res", "16", "--batch-size", "64", "--epochs", "2", "--eval-every", "2",
                 "--max-steps", "1", "--workers", "2", "--text", text / "text.npy", "--out", run]
        if step("setup: train writes .beton", train) and "train" in stages:
            # train.py refuses a second run into a run's folder
            shutil.rmtree(run, ignore_errors=True)
            step("train start", train)
            # Issue 16: one slot of text.npy and the teacher image embeddings, not the whole arrays,
            # on the device.
            step("train start: 1 slot + images",
                 train[:-2] + ["--prompts", prompt_ids[0], "--teacher-images",
                               text / "images.npy", "--out", root / "run1"])
    if "eval" in stages and (run / "final.pt").is_file():
        step("eval", [py, repo / "eval.py", run / "final.pt", "--data", data, "--split", "test",
                      "--workers", "2", "--tsne-samples", "200", "--out", root / "report"])
    if not cfg.keep:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------- table
def fit(ns, rows, floor):
    """(exponent of the CPU time above the floor's, that time at the largest N, RSS MiB per image,
    RSS growth in MiB at iNat size, RSS growth measured from the smallest to the largest N) over the
    finished runs. CPU seconds, not wall: on a shared machine wall time is mostly the neighbours'
    load, while the work a stage does is its own."""
    done = [(n, r) for n, r in zip(ns, rows) if r and r["rc"] == 0]
    if len(done) < 2:
        return None
    extra = [max(r["cpu_s"] - floor["cpu_s"], 0.05) for _, r in done]
    exponent = np.polyfit(np.log([n for n, _ in done]), np.log(extra), 1)[0]
    slope = np.polyfit([n for n, _ in done], [r["maxrss_mib"] for _, r in done], 1)[0]
    measured = done[-1][1]["maxrss_mib"] - done[0][1]["maxrss_mib"]
    return float(exponent), extra[-1], float(slope), float(slope * INAT), measured


def table(results, ns, cfg):
    """Markdown: a row per stage, `wall s / cpu s / peak MiB` per N, the fitted growth and flags."""
    head = ("| stage | floor | " + " | ".join(f"N={n:,}" for n in ns)
            + " | cpu exp | RSS per 1k img | RSS +@437k | flag |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, by_n in results.items():
        if name.startswith("floor"):
            continue
        script = next(s for s in ("caption", "encode", "train", "eval") if s in name)
        floor = results[f"floor {script}"]["all"]
        rows = [by_n.get(str(n)) for n in ns]
        cells = \
            [("-" if r is None else f"{r['seconds']:.1f} / {r['cpu_s']:.1f} / {r['maxrss_mib']:.0f}"
              if r["rc"] == 0 else f"FAILED ({r['rc']})") for r in rows]
        growth = fit(ns, rows, floor)
        flags = []
        # Set-up rows build artifacts (linear work by nature): shown, never flagged. Under 2 CPU s
        # above the floor an exponent is noise, as is an RSS slope fitted to < 32 MiB of growth.
        if growth and not name.startswith("setup"):
            if growth[0] > cfg.max_time_exponent and growth[1] > 2:
                flags.append("SUPERLINEAR")
            if growth[3] > cfg.max_mem_growth_mib and growth[4] > 32:
                flags.append("MEMORY")
        fitted = f"{growth[0]:.2f} | {growth[2] * 1000:.1f} MiB | {growth[3] / 1024:.2f} GiB" \
            if growth else "- | - | -"
        lines.append(f"| {name} | {floor['seconds']:.1f} / {floor['cpu_s']:.1f} / "
                     f"{floor['maxrss_mib']:.0f} | "
                     + " | ".join(cells) + f" | {fitted} | {' '.join(flags)} |")
    return "\n".join(lines)


def main():
    cfg = parse_config(Config)
    if cfg.show:
        saved = json.loads(Path(cfg.show).read_text())
        return print(f"{saved['repo']} ({cfg.show})\n\n"
                     f"{table(saved['results'], saved['sizes'], cfg)}")
    repo = Path(cfg.repo).resolve()
    for script in ("caption.py", "encode.py", "train.py", "eval.py"):
        if not (repo / script).is_file():
            die(f"--repo {repo}: no {script} there (a vlmkd checkout holds every stage)")
    ns = sizes(cfg)
    stages = {s.strip() for s in cfg.stages.split(",") if s.strip()}
    unknown = stages - {"caption", "encode", "train", "eval"}
    if unknown:
        die(f"--stages {','.join(sorted(unknown))}: choose among caption, encode, train, eval")
    work = Path(cfg.work)
    (work / "floor").mkdir(parents=True, exist_ok=True)
    results = {}
    print(f"scale_bench: stages of {repo} at N = {', '.join(map(str, ns))}", flush=True)
    for script in ("caption", "encode", "train", "eval"):
        results[f"floor {script}"] = \
            {"all": measure([sys.executable, repo / f"{script}.py", "--help"],
                            work / "floor" / f"{script}.log", cfg, work)}
    for n in ns:
        run_size(n, cfg, repo, stages, results)
    report = table(results, ns, cfg)  # rows in pipeline order, set-up runs where they happen
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    print(f"\n{repo} at {commit.stdout.strip() or '?'}{' + uncommitted changes' if dirty else ''}, "
          f"{cfg.classes} classes, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; cells: "
          "wall s / cpu s / peak RSS MiB of the largest process; cpu exp: log-log slope of cpu s "
          "above the floor against N\n")
    print(report, flush=True)
    save(cfg, repo, results, report)
    failed = [f"{k} at N={n}" for k, by_n in results.items() for n, r in by_n.items()
              if r["rc"] != 0]
    if failed:
        sys.exit(f"scale_bench.py: {len(failed)} runs failed: {', '.join(failed[:6])} (logs under "
                 f"{work})")


if __name__ == "__main__":
    main()
