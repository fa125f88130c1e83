"""Caption every image of a split with a VLM, once per prompt (stage 1 of vlmkd).

    python caption.py --split data/x/train.txt --vlm llava-hf/llava-v1.6-mistral-7b-hf \
        --out runs/x/captions.jsonl
    python caption.py --split data/x/train.txt --shard 0/4 --out runs/x/captions.jsonl  # 1 of 4
    torchrun --nproc_per_node 8 caption.py --split data/x/train.txt --out runs/x/captions.jsonl
    python caption.py --merge --out runs/x/captions.jsonl        # join the shards, report gaps
    python caption.py --classes data/x/classes.txt --out runs/x/class_descriptions.jsonl
    python tests/tiny.py llava runs/tiny-vlm     # a random stand-in VLM: --vlm runs/tiny-vlm

Writes captions.jsonl (`{"index", "prompt", "text", "path"}` per image x prompt, appended as it
goes), captions.meta.json (what made them) and captions.errors.jsonl (unreadable images). The
same command resumes a killed run; other settings are refused. The prompts of an image share a
batch: its vision tower runs once, its prefix (template + image tokens) is prefilled once where
exact. Batched greedy captions equal one-at-a-time ones, exactly in fp32 (bf16: near-ties may flip).
"""
import argparse
import copy
import hashlib
import heapq
import json
import os
import re
import sys
import time
import typing
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

CLASS_PROMPT = "class_description"  # the class-description prompt's file stem: no image prompt
TINY_MARKER = "vlmkd_tiny.json"  # tests/tiny.py writes it into a random stand-in's folder
# What a resumed run or a shard must share with the output's meta, or two kinds of captions mix.
MATCH_KEYS = ("model", "quant", "dtype", "prompts", "generation", "processor", "split_sha256",
              "name_hint", "classes_sha256")


# The one shared helper the Config needs above it; the others are at the back of the file.
def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


# --- config
@dataclass
class Config:
    split: str = opt("", "split file, `relative/path label` lines (image mode)",
                     heading="what to caption")
    root: str = opt("", "folder the split's paths are relative to (default: the split's folder)")
    classes: str = opt("", "classes.txt: alone, describe each class; with --name-hint, the names")
    prompts: str = opt("prompts", "comma-separated prompt folders (*.txt) or files; id = file stem")
    class_prompt: str = opt("", "class mode prompt (default: class_description.txt of --prompts)")
    name_hint: bool = opt(False, "fill {name} in image prompts with the image's class name")
    limit: int = opt(0, "caption only the first N images (0 = all); a later run without it goes on")
    vlm: str = opt("HuggingFaceTB/SmolVLM-256M-Instruct", "hub id or folder of an image-text-to-"
                   "text model (`python tests/tiny.py llava DIR` builds a random one)",
                   heading="model")
    revision: str = opt("", "hub revision (branch, tag or commit) of --vlm")
    quant: Literal["auto", "4bit", "8bit", "none"] = opt(
        "auto", "4bit (NF4, double quant), 8bit or none; auto: 4bit on CUDA, none on a CPU (slow)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "compute dtype; auto: bf16 where the hardware computes it (GPUs since Ampere, CPUs "
        "with avx512_bf16 or AMX), else fp16 on a GPU and fp32 on a CPU (emulated bf16 ran 3.1x "
        "slower than fp32 there)")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:0, ...")
    image_size: int = opt(0, "longest edge before tiling (Idefics3/SmolVLM) or sqrt of max pixels "
                          "(Qwen2-VL); 0: one tile unsplit, else the processor's own",
                          heading="image processor")
    image_splitting: bool = opt(False, "Idefics3/SmolVLM: tiles plus a global view (a 28-px image "
                                "then costs up to 17 vision passes; off: one tile)")
    processor_kwargs: str = opt("", "JSON of further image-processor options, e.g. "
                                "'{\"max_pixels\": 200704}'")
    batch_size: int = opt(8, "(image, prompt) pairs a generate call, whole images where they fit "
                          "(a multiple of the prompts fills it)", heading="generation")
    prefix_cache: bool = opt(True, "prefill an image's prefix (template + image tokens) once, its "
                             "KV cache copied to its prompts (same captions); off: whole prompts")
    max_new_tokens: int = opt(128, "longest caption in tokens")
    min_new_tokens: int = opt(0, "shortest caption in tokens (benchmarks set it to max)")
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(0.7, "softmax temperature with --do-sample")
    top_p: float = opt(0.9, "nucleus mass with --do-sample")
    seed: int = opt(0, "torch seed (for --do-sample)")
    out: str = opt("", "output .jsonl (default runs/captions.jsonl, or with --classes "
                   "runs/class_descriptions.jsonl)", heading="run")
    shard: str = opt("", "i/n: caption images with index %% n == i (default: RANK/WORLD_SIZE)")
    merge: bool = opt(False, "join the shard files of --out into --out and report gaps")
    retry_bad: bool = opt(False, "caption again the images of the errors file (else skipped)")
    workers: int = opt(4, "threads decoding images ahead of the model")


VERBOSE = True  # only rank 0 of a torchrun / accelerate launch prints


def say(msg):
    if VERBOSE:
        print(f"caption.py: {msg}", flush=True)


# --- inputs: the split, the prompts
def find_prompts_dir(name):
    """A relative `prompts` is looked up in the working directory, then beside this script."""
    path, beside = Path(name), Path(__file__).resolve().parent / name
    return beside if not path.exists() and not path.is_absolute() and beside.exists() else path


def prompt_record(path):
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        die(f"prompt file {path} is empty")
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    return {"id": Path(path).stem, "text": text, "sha256": sha256, "file": str(path)}


def load_prompts(sources):
    """The image prompts, `general` first (train.py's prompt when it takes one)."""
    files = []
    for source in sources:
        path = find_prompts_dir(source)
        if path.is_dir():
            files += [p for p in path.glob("*.txt") if p.stem != CLASS_PROMPT]
        elif path.is_file():
            files.append(path)
        else:
            die(f"prompt source {source} not found: pass --prompts FOLDER (of *.txt) or prompt "
                "files")
    if not files:
        die(f"no prompt files (*.txt, other than {CLASS_PROMPT}.txt) in {','.join(sources)}: pass "
            "--prompts FOLDER")
    prompts = sorted(map(prompt_record, files), key=lambda p: (p["id"] != "general", p["id"]))
    if len({p["id"] for p in prompts}) != len(prompts):
        die(f"two prompt files share an id (file stem): {sorted(p['id'] for p in prompts)}")
    return prompts


def class_prompt(cfg):
    folder = find_prompts_dir(cfg.prompts.split(",")[0])
    path = cfg.class_prompt or str(folder / f"{CLASS_PROMPT}.txt")
    if not Path(path).is_file():
        die(f"class prompt {path} not found: pass --class-prompt FILE (may use {{name}})")
    return prompt_record(path)


def name_hints(cfg, prompts, meta):
    """Class names for {name} in prompts with --name-hint, else None (and no prompt may use it)."""
    if not cfg.name_hint:
        for p in prompts:
            if "{name}" in p["text"]:
                die(f"prompt {p['id']} uses {{name}}: pass --name-hint (class names from "
                    "--classes) or remove it")
        return None
    classes = cfg.classes or str(Path(cfg.split).parent / "classes.txt")
    names = read_classes(classes)
    meta["classes_sha256"] = sha256_file(classes)
    read_split(cfg.split, len(names))  # labels beyond the classes are refused with file:line
    return names


def check_root(root, items, indices, split):
    """Under a wrong root every image would be recorded unreadable: some images missing are theirs
    to record, all of a first sample is the root's fault, refused before any work."""
    how = "pass --root, the folder the split's paths are relative to (default: the split file's " \
          "folder)"
    if not root.is_dir():
        die(f"data root {root} is {'a file, not a folder' if root.exists() else 'not found'}: "
            f"{how}")
    sample = [items[i][0] for i in indices[:64]]
    for rel in sample:
        try:
            os.stat(root / rel)
            return
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as err:  # a folder on the way cannot be searched: permissions, not images
            die(f"cannot look into {root / rel} ({err.strerror}): make the data folder readable "
                "and rerun")
    if sample:
        die(f"none of the first {len(sample)} images of {split} is under {root} (e.g. "
            f"{root / sample[0]} is not there): wrong data root? {how}; nothing was recorded")


# --- outputs: their paths, what is already done, the meta a run must match
@dataclass
class Artifacts:
    records: Path  # captions.jsonl (or class_descriptions.jsonl)
    meta: Path  # captions.meta.json: what made the records
    errors: Path  # captions.errors.jsonl: a line per unreadable image


def artifact_paths(out, shard=None):
    """The files of --out; a shard (i, n) gets `captions.shard-i-of-n.*` beside it."""
    out = Path(out)
    if out.suffix != ".jsonl":
        die(f"--out {out} must end with .jsonl")
    stem = out.name[: -len(".jsonl")] + (f".shard-{shard[0]}-of-{shard[1]}" if shard else "")
    ends = (".jsonl", ".meta.json", ".errors.jsonl")
    return Artifacts(*(out.with_name(stem + end) for end in ends))


def scan_jsonl(path, repair=False):
    """(line number, record) of a jsonl file, streamed. A broken last line is what a run killed
    mid-write leaves: it is dropped (the rerun redoes it) and, with repair, cut from the file, so
    appending goes on after the last whole record. A broken line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return
    good_end, broken, last = 0, None, b"\n"
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            last = line
            if not line.strip():
                good_end += len(line) if broken is None else 0
                continue
            if broken is not None:
                die(f"{path}:{broken}: not valid JSON; fix or delete that line, then rerun")
            try:
                record = json.loads(line)
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError: a kill cut a character
                broken = n
                continue
            good_end += len(line)
            yield n, record
    if broken is not None:
        say(f"dropping a truncated last line of {path} (a killed run); it will be redone")
    if repair and (broken is not None or not last.endswith(b"\n")):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            if broken is None:  # a whole last record that lost its newline
                f.seek(0, 2)
                f.write(b"\n")


def checked_record(path, n, record, key, *strings):
    """A record as caption.py writes it (`key` an integer >= 0, `strings` strings), else refused
    with file:line before it misleads a resume or a merge (`"index": "2"`, a JSON array)."""
    if not (isinstance(record, dict) and type(record.get(key)) is int and record[key] >= 0
            and all(isinstance(record.get(k), str) for k in strings)):
        wanted = ", ".join([f"`{key}` an integer >= 0"] + [f"`{k}` a string" for k in strings])
        die(f"{path}:{n}: not a record of caption.py (an object with {wanted}): "
            f"{json.dumps(record)[:80]}; fix or delete that line, then rerun")
    return record


def done_bitmap(path, size, slot, keys):
    """A byte per (item, prompt) slot already written: a resume holds no texts, only this."""
    done = bytearray(size)
    for n, record in scan_jsonl(path, repair=True):
        k = slot(checked_record(path, n, record, *keys))
        if k is not None and 0 <= k < size:
            done[k] = 1
    return done


def check_meta(meta_path, meta, keys, out):
    """Refuse to append to an output made with other settings: two models' captions would mix."""
    if not meta_path.exists():
        if out.exists() and out.stat().st_size:
            die(f"{out} exists without its {meta_path.name}: use another --out or delete {out}")
        return
    old = json.loads(meta_path.read_text())
    for key in keys:
        was, now = old.get(key), meta.get(key)
        if was != now:
            if key == "prompts":  # a hash prefix per prompt id shows which prompt changed
                was, now = ({p["id"]: p["sha256"][:8] for p in v or []} for v in (was, now))
            die(f"{out} was made with another `{key}` ({json.dumps(was)[:120]} in "
                f"{meta_path.name}, now {json.dumps(now)[:120]}): use another --out or delete "
                f"{out} and {meta_path.name}")


# --- the model: load it, then its processor and generation settings
def resolve_dtype(choice, device):
    """(dtype, why): --dtype, or with auto the hardware's choice (captions differ a little)."""
    if choice != "auto":
        return choice, "--dtype"
    dtype, why = auto_dtype(device.type, has_native_bf16(device))
    return dtype, f"auto: {why}"


def resolve_quant(quant, device):
    """(quant, why): --quant, or with auto 4bit on CUDA and none on a CPU."""
    if quant != "auto":
        return quant, "--quant"
    if device.type == "cuda":
        return "4bit", "auto: a CUDA device"
    return "none", "auto: no CUDA device, and bitsandbytes 4-bit is ~10x slower than bf16 on a CPU"


def load_vlm(vlm, quant="none", dtype="bf16", device="cpu", revision=""):
    """(model, processor, resolved hub revision or None, tiny: a stand-in from tests/tiny.py)."""
    source, at = vlm_source(vlm, revision), {"revision": revision} if revision else {}
    compute_dtype = getattr(torch, TORCH_DTYPES[dtype])
    kwargs = {"dtype": compute_dtype, "device_map": {"": str(device)}, **at}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    try:
        processor = AutoProcessor.from_pretrained(source, **at)
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).eval()
    except ValueError as err:  # found, but not something AutoModelForImageTextToText knows
        die(f"cannot load VLM {vlm!r} as an image-text-to-text model: {first_line(err)}")
    except OSError as err:
        if Path(source).is_dir():
            die(f"cannot load VLM from folder {source}: {first_line(err)}")
        die(f"cannot load VLM {vlm!r} from the hub ({first_line(err)[:160]}): for an offline "
            f"machine run `hf download {vlm} --local-dir DIR` where there is network and pass "
            "--vlm /local/dir (DIR)")
    # Left padding, so that every row's prompt ends where generation starts: right padding puts
    # pads between prompt and answer, the classic batched-VLM bug.
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    tiny = Path(source, TINY_MARKER).is_file()
    return model, processor, hub_revision(vlm, revision, source), tiny


def vlm_source(vlm, revision):
    """A local folder, or a hub id: one the hub cannot serve now is loaded from the cache offline
    (from_pretrained's client would retry a dead connection for minutes)."""
    local = Path(vlm).expanduser()
    if local.is_dir():
        return str(local)
    if vlm.startswith(("/", "./", "../", "~")):
        die(f"VLM folder {vlm} not found: pass --vlm with a folder holding config.json, or a hub "
            "id")
    if why := hub_unreachable(vlm):
        from huggingface_hub import constants, try_to_load_from_cache
        cached = try_to_load_from_cache(vlm, "config.json", revision=revision or None)
        if not isinstance(cached, str):
            die(f"cannot load VLM {vlm!r} (offline: {why}, and it is not in the cache): on a "
                f"machine with network run `hf download {vlm} --local-dir DIR`, copy DIR here and "
                "pass --vlm /local/dir (DIR), or build a random stand-in: `python tests/tiny.py "
                "llava DIR`")
        constants.HF_HUB_OFFLINE = True  # cached: load it without network calls that time out
    return vlm


def hub_revision(vlm, revision, source):
    """The commit a hub id resolved to (its cache snapshot), for the meta; None for a folder."""
    if Path(source).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(vlm, "config.json", revision=revision or None)
    match = re.search(r"snapshots/([0-9a-f]{40})/", cached) if isinstance(cached, str) else None
    return match.group(1) if match else (revision or None)


def parse_processor_kwargs(text):
    try:
        extra = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        die(f"--processor-kwargs is not JSON ({err})")
    if not isinstance(extra, dict):
        die(f"--processor-kwargs must be a JSON object, got {text!r}")
    return extra


def processor_settings(processor, image_size=0, image_splitting=False, extra=None):
    """Image-processor options passed with every call, from the flags; recorded in the meta."""
    image_processor, settings = getattr(processor, "image_processor", None), {}
    # Idefics3 (SmolVLM) resizes the longest edge up to 4 x 364 px or more and tiles it: a 28-px
    # image would cost up to 17 vision passes. One tile at the tile size unless asked.
    if hasattr(image_processor, "do_image_splitting"):
        settings["do_image_splitting"] = image_splitting
        if image_size or not image_splitting:
            longest = image_size or image_processor.max_image_size["longest_edge"]
            settings["size"] = {"longest_edge": longest}
    elif image_size and hasattr(image_processor, "max_pixels"):  # Qwen2-VL: dynamic resolution
        settings["max_pixels"] = image_size * image_size
    elif image_size:
        die(f"--image-size applies to Idefics3/SmolVLM and Qwen2-VL processors, not "
            f"{type(image_processor).__name__}: pass its options with --processor-kwargs JSON")
    return {**settings, **(extra or {})}


def generation_config(model, processor, max_new_tokens, min_new_tokens=0, do_sample=False,
                      temperature=0.7, top_p=0.9):
    gen = copy.deepcopy(model.generation_config)
    gen.max_new_tokens, gen.min_new_tokens = max_new_tokens, min_new_tokens
    gen.do_sample, gen.num_beams = do_sample, 1
    # Sampling is the flags' alone (no top_k of the model's); greedy decoding carries none of them.
    gen.temperature, gen.top_p, gen.top_k = (temperature, top_p, None) if do_sample else (None,) * 3
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.pad_token_id
    return gen


def generation_meta(cfg):
    gen = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
           "do_sample": cfg.do_sample, "num_beams": 1}
    if cfg.do_sample:
        gen.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return gen


def check_prompt_placeholders(processor, prompts):
    """A prompt holding the image placeholder (`<image>`, `<|image_pad|>`, ...) gives the model an
    image too many: a prompt error, refused before any image is blamed for it."""
    names = ("image_token", "fake_image_token", "global_image_token", "video_token")
    tokens = {getattr(processor, name, None) for name in names}
    tokens |= {t for t in processor.tokenizer.get_added_vocab()
               if t.startswith("<") and t.endswith(">") and "image" in t}
    tokens = sorted(t for t in tokens if isinstance(t, str) and t.strip())
    for prompt in prompts:
        for token in tokens:
            if token in prompt["text"]:
                die(f"prompt file {prompt['file']} holds {token!r}, this model's image "
                    "placeholder: the processor puts the image in itself; remove it from the "
                    "prompt (nothing was captioned)")


# --- prompts in, captions out
@dataclass
class Captioner:
    """A loaded VLM and what each of the run's generate calls passes it."""
    model: torch.nn.Module
    processor: typing.Any
    gen: typing.Any  # the GenerationConfig of the flags
    settings: dict  # image-processor options (processor_settings)
    dtype: torch.dtype  # of the float inputs
    placeholders: torch.Tensor | None = None  # image token ids, where the prefix cache is on


def build_inputs(processor, texts, images, settings, compute_dtype):
    """A left-padded batch in the family's own prompt format, floats in compute_dtype."""
    if processor.chat_template:
        contents = [([] if image is None else [{"type": "image", "image": image}])
                    + [{"type": "text", "text": text}] for text, image in zip(texts, images)]
        convs = [[{"role": "user", "content": content}] for content in contents]
        inputs = processor.apply_chat_template(
            convs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left", **settings})
    else:  # PaliGemma has no chat template: its processor puts the image tokens before the text
        token = getattr(processor, "image_token", None) or ""
        prompts = [("" if image is None else token) + text for text, image in zip(texts, images)]
        inputs = processor(text=prompts, images=[i for i in images if i is not None] or None,
                           padding=True, padding_side="left", return_tensors="pt", **settings)
    return {k: (v.to(compute_dtype) if torch.is_floating_point(v) else v)
            for k, v in inputs.items() if k != "labels"}


def non_text_tokens(processor):
    """Added tokens shaped `<...>` that decoding keeps (PaliGemma's <loc0042>): no caption words."""
    added = [t for t in processor.tokenizer.get_added_vocab()
             if t.startswith("<") and t.endswith(">")]
    longest_first = sorted(added, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first))) if added else None


@torch.inference_mode()
def generate_texts(model, processor, inputs, gen, strip=None):
    """Captions of a batch: `inputs` from build_inputs, or its prefix_plan."""
    if "prefix" in inputs:
        ids, mask, cache = prefill_prefixes(model, inputs, gen)
        new_ids = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                                 generation_config=gen)
    else:
        inputs = {k: v.to(model.device, non_blocking=True) for k, v in inputs.items()}
        new_ids = model.generate(**inputs, generation_config=gen)
    new_ids = new_ids[:, inputs["input_ids"].shape[1]:].cpu()
    texts = processor.batch_decode(new_ids, skip_special_tokens=True)
    return [(strip.sub("", t) if strip else t).strip() for t in texts]


# The vision tower once per image: the P rows of an image (one a prompt) carry the same pixels, so
# without sharing a batch of whole images runs the tower P times on each image.
VISION_TOWERS = ("model.vision_tower", "model.vision_model", "vision_tower", "vision_model")


def distinct_rows(pixels):
    """(first row of each distinct image, inverse index) of a batch whose rows repeat images."""
    flat = pixels.reshape(len(pixels), -1)
    sums, first, inverse = flat.float().sum(1).tolist(), [], []
    for i in range(len(flat)):  # torch.equal only where the sums agree
        same = [j for j, f in enumerate(first)
                if sums[f] == sums[i] and torch.equal(flat[f], flat[i])]
        inverse.append(same[0] if same else len(first))
        first += [] if same else [i]
    return first, torch.tensor(inverse, device=pixels.device)


def expand_rows(value, inverse, n):
    """A vision tower's output for the distinct images, repeated back to one row per prompt."""
    if torch.is_tensor(value):
        return value.index_select(0, inverse) if value.dim() and len(value) == n else value
    if isinstance(value, dict):  # a ModelOutput: update in place, keeping its class
        for key in list(value.keys()):
            value[key] = expand_rows(value[key], inverse, n)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(expand_rows(v, inverse, n) for v in value)
    return value


def share_vision_work(model):
    """Hooks that run the vision tower on a batch's distinct images and repeat its output to their
    rows, so the model around it sees what it saw before. Qwen2-VL (flat patches) runs as before."""
    names = dict(model.named_modules())
    tower = next((names[n] for n in VISION_TOWERS if n in names), None)
    if tower is None:
        return []
    state = {}  # from the pre-hook to the hook of the same call

    def before(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        state.clear()
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or len(pixels) < 2:
            return None
        first, inverse = distinct_rows(pixels)
        if len(first) == len(pixels):
            return None
        state.update(inverse=inverse, n=len(first))
        index = torch.tensor(first, device=pixels.device)

        def pick(v):
            rows = torch.is_tensor(v) and v.dim() and len(v) == len(pixels)
            return v.index_select(0, index) if rows else v
        return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}

    def after(module, args, kwargs, output):
        return expand_rows(output, state["inverse"], state["n"]) if state else None
    return [tower.register_forward_pre_hook(before, with_kwargs=True),
            tower.register_forward_hook(after, with_kwargs=True)]


# The prefix cache. Families (config.model_type) where prefilling an image's prefix once and each
# prompt after it gives the logits of one pass over the whole prompt: causal attention, positions
# that only count the tokens before (Qwen2-VL's mrope too: text after the image sits at index + a
# delta the prefix fixes). Checked in tests/test_caption_families.py.
PREFIX_CACHE_FAMILIES = ("llava", "llava_next", "idefics3", "qwen2_vl")


def use_prefix_cache(model, enabled):
    """Whether this run prefills each image's prefix once (said once, with why): where exact."""
    family = model.config.model_type
    if not enabled:
        why = "--no-prefix-cache"
    elif family == "paligemma":  # the fallback: the whole prompt per caption, exact but slower
        why = ("PaliGemma attends both ways over image + prompt (prefix-LM), so an image's KV "
               "depends on its prompt")
    elif family not in PREFIX_CACHE_FAMILIES:
        checked = ", ".join(PREFIX_CACHE_FAMILIES)
        why = f"{family} is not among the families checked exact ({checked})"
    else:
        say("LM prefill: each image's prefix (template + image tokens) once, its KV cache shared "
            "by its prompts")
        return True
    say(f"LM prefill: the whole prompt per caption ({why})")
    return False


def placeholder_ids(model):
    """Token ids the model replaces with image (or video) features: all must sit in the prefix."""
    ids = (getattr(model.config, n, None) for n in ("image_token_id", "image_token_index",
                                                    "video_token_id"))
    return torch.tensor(sorted({v for v in ids if isinstance(v, int)}))


def image_groups(images):
    """(first row of each image, image of each row): an image's rows carry the same image object."""
    first, inverse, seen = [], [], {}
    for row, image in enumerate(images):
        group = seen.setdefault(id(image), len(first))
        first += [row] if group == len(first) else []
        inverse.append(group)
    return first, inverse


def shared_lengths(tokens, first, inverse, placeholders):
    """Per image, how many tokens all its rows start with, each row keeping one or more of its own
    (generate needs an uncached token); None where a row's own part holds image tokens."""
    lengths = []
    for group in range(len(first)):
        members = [tokens[r] for r, g in enumerate(inverse) if g == group]
        n = min(len(t) for t in members) - 1
        for other in members[1:]:
            differ = (members[0][:n] != other[:n]).nonzero()
            n = int(differ[0]) if len(differ) else n
        if any(torch.isin(t[n:], placeholders).any() for t in members):
            return None
        lengths.append(n)
    return lengths


def left_pad(values, width, fill):
    return torch.cat([values.new_full((width - len(values),), fill), values])


def prefix_plan(inputs, images, placeholders, pad_id):
    """The batch re-laid for prefill_prefixes; None where no image has two rows (nothing to share)
    or a prefix would not hold its image. `prefix`: a left-padded row per image, with its pixels.
    `input_ids`, `attention_mask`: each row as [pads, its image's prefix | pads, its own tokens],
    the prefix part exactly the prefix row, so the copied cache lines up. The pads between are
    masked and position ids count unmasked tokens: each row keeps its tokens and positions."""
    first, image_of_row = image_groups(images)
    if len(first) == len(images):
        return None
    valid = inputs["attention_mask"].bool()
    unpadded = {key: [v[keep] for v, keep in zip(value, valid)] for key, value in inputs.items()
                if torch.is_tensor(value) and value.shape == valid.shape}  # ids, mask, token types
    cuts = shared_lengths(unpadded["input_ids"], first, image_of_row, placeholders)
    if cuts is None:
        return None
    width = max(cuts)
    own = max(len(ids) - cuts[g] for ids, g in zip(unpadded["input_ids"], image_of_row))
    fill = {key: pad_id if key == "input_ids" else 0 for key in unpadded}
    prefix = {key: torch.stack([left_pad(rows[r][:cuts[g]], width, fill[key])
                                for g, r in enumerate(first)]) for key, rows in unpadded.items()}
    plan = {"prefix": {**prefix_images(inputs, first, skip=unpadded), **prefix},
            "image_of_row": torch.tensor(image_of_row)}
    # A repetition penalty sees every id of a row, masked or not: a row build_inputs did not pad is
    # filled with its own last token, not the pad id (Qwen2-VL's pad is an end-of-text token).
    row_fill = [pad_id if not keep.all() else int(ids[-1])
                for ids, keep in zip(unpadded["input_ids"], valid)]
    for key, fills in (("input_ids", row_fill), ("attention_mask", [0] * len(row_fill))):
        plan[key] = torch.stack([torch.cat([left_pad(row[:cuts[g]], width, f),
                                            left_pad(row[cuts[g]:], own, f)])
                                 for row, g, f in zip(unpadded[key], image_of_row, fills)])
    return plan


def prefix_images(inputs, first, skip=()):
    """The pixel inputs of rows `first`; Qwen2-VL's flat patches cut per image by image_grid_thw."""
    rows, index, picked = len(inputs["input_ids"]), torch.tensor(first), {}
    if "image_grid_thw" in inputs:
        patches = inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist())
        picked["pixel_values"] = torch.cat([patches[r] for r in first])
    for key, value in inputs.items():
        per_row = torch.is_tensor(value) and value.dim() and len(value) == rows
        if key not in picked and key not in skip and per_row:
            picked[key] = value.index_select(0, index)
    return picked


def prefill_prefixes(model, plan, gen):
    """(ids, mask, KV cache) for generate: each prefix run once, its cache copied to its rows."""
    device, once = model.device, copy.deepcopy(gen)
    # generate for one greedy token (thrown away: the cache is what is kept), not a bare forward:
    # the position ids, mrope included, are then the family's own.
    once.max_new_tokens, once.min_new_tokens, once.do_sample = 1, 0, False
    once.return_dict_in_generate, once.temperature, once.top_p, once.top_k = True, None, None, None
    prefix = {k: v.to(device, non_blocking=True) for k, v in plan["prefix"].items()}
    cache = model.generate(**prefix, generation_config=once).cache
    image_of_row = plan["image_of_row"].to(device)
    cache.batch_select_indices(image_of_row)
    # Qwen2-VL keeps each prefix's mrope offset on the model and adds it to a cached run's text
    # positions: copied per row like the cache, or a row would take another image's offset.
    inner = getattr(model, "model", None)
    if torch.is_tensor(deltas := getattr(inner, "rope_deltas", None)):
        inner.rope_deltas = deltas.index_select(0, image_of_row)
    return plan["input_ids"].to(device), plan["attention_mask"].to(device), cache


def planned(c, inputs, images):
    """The inputs laid out for the prefix cache (prefix_plan) where it is on and applies: the
    preflight and the batches take the same path."""
    if c.placeholders is None:
        return inputs
    pad = c.processor.tokenizer.pad_token_id
    return prefix_plan(inputs, images, c.placeholders, pad) or inputs


def preflight(c, with_image, vlm):
    """A two-row test caption of Captioner c before any work, through the run's own path: a
    template, dtype, device or model failure stops here, so a later failure is one image's."""
    image = Image.new("RGB", (64, 48), (120, 130, 140)) if with_image else None
    try:
        inputs = build_inputs(c.processor, ["Describe this.", "What is shown here, in detail?"],
                              [image, image], c.settings, c.dtype)
        inputs = planned(c, inputs, [image, image])
        probe_gen = copy.deepcopy(c.gen)
        probe_gen.max_new_tokens, probe_gen.min_new_tokens = 1, 0
        generate_texts(c.model, c.processor, inputs, probe_gen)
    except Exception as err:
        die(f"a test caption with {vlm} failed before any work, so the model, its prompt format, "
            f"the settings or the device is at fault, not the data (nothing recorded): "
            f"{type(err).__name__}: {first_line(err)}")


# --- the loop: decode ahead, batch whole images, prepare ahead, generate, append
@dataclass
class Row:
    """A caption to make: an image (in class mode a class) and a prompt."""
    index: int  # the image's line in the split, or the class label
    prompt: str  # the prompt's id
    text: str  # the prompt, {name} filled in
    image: Image.Image | None  # None in class mode
    path: str = ""  # the image's path in the split


def load_image(path):
    try:
        with Image.open(path) as img:
            return rgb_image(img), None  # convert() decodes the whole file: truncation shows here
    except PermissionError as err:  # the folder's or file's permissions, not the image: stop
        die(f"cannot read {path} ({err.strerror}): make the data readable and rerun (it resumes)")
    except Exception as err:  # any decoder failure is the image's own: recorded and skipped
        return None, f"{type(err).__name__}: {err}"


def decoded_images(jobs, root, workers):
    """(index, relpath, prompts, image, error) in order, decoded `workers` threads ahead."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending, jobs = deque(), iter(jobs)
        for job in jobs:  # a bounded window ahead: memory does not grow with the split
            pending.append((job, pool.submit(load_image, root / job[1])))
            if len(pending) >= 4 * max(1, workers):
                break
        while pending:
            (index, rel, todo), fut = pending.popleft()
            job = next(jobs, None)
            if job is not None:
                pending.append((job, pool.submit(load_image, root / job[1])))
            yield index, rel, todo, *fut.result()


def image_batches(decoded, batch_size, bad):
    """Rows of whole images, as many as fit in batch_size, so an image's vision work is done once
    (one with more prompts than batch_size is split). Unreadable images go to bad(record)."""
    rows = []
    for index, rel, todo, image, error in decoded:
        if error is not None:
            bad({"index": index, "path": rel, "error": error})
            continue
        pairs = [Row(index, pid, text, image, rel) for pid, text in todo]
        if rows and len(rows) + len(pairs) > batch_size:
            yield rows
            rows = []
        while len(pairs) > batch_size:
            yield pairs[:batch_size]
            pairs = pairs[batch_size:]
        rows += pairs
    if rows:
        yield rows


def batch_inputs(c, rows):
    texts, images = [r.text for r in rows], [r.image for r in rows]
    return build_inputs(c.processor, texts, images, c.settings, c.dtype)


def prepare_batch(c, rows):
    """(rows kept, inputs, bad-image records). The preflight proved the prompt format, so an image
    the processor rejects alone (Qwen2-VL: aspect ratio over 200) is that image's fault; a batch
    that fails with no such image stops the run."""
    try:
        return rows, batch_inputs(c, rows), []
    except Exception as batch_error:
        why = f"{type(batch_error).__name__}: {first_line(batch_error)}"
    if rows[0].image is None:
        die(f"the processor failed on a text batch (nothing recorded): {why}")
    bad, tried = {}, set()
    for row in rows:
        if row.index not in tried:
            tried.add(row.index)
            try:
                batch_inputs(c, [row])
            except Exception as err:
                bad[row.index] = {"index": row.index, "path": row.path,
                                  "error": f"processor: {type(err).__name__}: {err}"}
    if not bad:
        die(f"the processor failed on a batch though each of its images passes alone (nothing "
            f"recorded): {why}")
    rows = [r for r in rows if r.index not in bad]
    return rows, batch_inputs(c, rows) if rows else None, list(bad.values())


def prepare_next(c, batches):
    """The next batch prepared (prepare_batch, then prefix_plan where the cache is on), or None."""
    rows = next(batches, None)
    if rows is None:
        return None
    rows, inputs, rejected = prepare_batch(c, rows)
    if rows:
        inputs = planned(c, inputs, [r.image for r in rows])
    return rows, inputs, rejected


def run_batches(c, batches, write, bad, desc="", total=None):
    """Generate for each batch of rows, the next one prepared on a thread while the model runs on
    this one: write(rows, texts) per batch, bad(record) per image the processor rejects."""
    strip, batches = non_text_tokens(c.processor), iter(batches)
    with ThreadPoolExecutor(1) as prep, \
            progress_bar(total, "caption", desc=desc, disable=not desc) as bar:
        future = prep.submit(prepare_next, c, batches)
        while (prepared := future.result()) is not None:
            future = prep.submit(prepare_next, c, batches)
            rows, inputs, rejected = prepared
            for record in rejected:
                bad(record)
            if rows:
                write(rows, captions_of(c, rows, inputs, strip))
                bar.update(len(rows))


def captions_of(c, rows, inputs, strip):
    """A batch's captions. Its inputs passed the processor, so a failure here is the model's or the
    device's: the run stops and no image is recorded bad."""
    try:
        return generate_texts(c.model, c.processor, inputs, c.gen, strip)
    except torch.OutOfMemoryError:
        die(f"out of memory on a batch of {len(rows)} (nothing recorded as bad): lower "
            "--batch-size and rerun (it resumes)")
    except Exception as err:
        die(f"the model failed on a batch, not an image's fault (nothing recorded as bad; a rerun "
            f"resumes): {type(err).__name__}: {first_line(err)}")


@dataclass
class Outputs:
    """A run's records and bad-image files, appended unbuffered (a SIGKILL loses at most the batch
    in flight), and what this run wrote to them."""
    records: typing.BinaryIO
    errors: typing.BinaryIO
    bad_indices: set  # images in the errors file: a line an image, though each of its prompts fails
    written: int = 0
    bad: int = 0

    def write(self, records):
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        append_lines(self.records, lines)
        self.written += len(lines)

    def record_bad(self, record):
        if record["index"] not in self.bad_indices:
            self.bad_indices.add(record["index"])
            append_lines(self.errors, [json.dumps(record) + "\n"])
            self.bad += 1


def open_outputs(paths, bad_indices):
    # start_run made the folder (claim_output's writable_dir)
    files = (open(p, "ab", buffering=0) for p in (paths.records, paths.errors))
    return Outputs(*files, bad_indices)


def append_lines(file, lines):
    """Whole lines or none: a write the disk refuses (full, a file size limit) is cut back to where
    it began, so the file still ends with a whole record and a rerun resumes after it."""
    data, start = "".join(lines).encode("utf-8"), file.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:  # an unbuffered write may take part of the bytes
            view = view[file.write(view):]
    except OSError as err:
        file.truncate(start)
        die(f"cannot write {file.name} ({err.strerror}): the disk is full or a file size limit "
            "was reached; free space and rerun the same command (it resumes after the last whole "
            "record)")


# --- a run's start: claim the output, load and test the model, record the meta
def start_run(cfg, meta, match_keys, paths, prompts, with_image, given):
    """The run's Captioner, its meta matched to the output's before any work, then written.
    `given` says what this process does, in the line that also names device, dtype and quant."""
    device, extra = claim_output(cfg, meta, match_keys, paths, prompts, given)
    model, processor, meta["revision"], tiny = load_vlm(cfg.vlm, meta["quant"], meta["dtype"],
                                                        device, cfg.revision)
    meta["processor"] = processor_settings(processor, cfg.image_size, cfg.image_splitting, extra)
    check_meta(paths.meta, meta, ("processor",), paths.records)
    check_prompt_placeholders(processor, prompts)
    old = json.loads(paths.meta.read_text()) if paths.meta.exists() else {}
    if old.get("revision") not in (None, meta["revision"]):
        check_meta(paths.meta, meta, ("revision",), paths.records)
    if tiny:  # the meta's tiny_random carries it to encode.py, train.py and eval.py's report
        say(f"WARNING: --vlm {cfg.vlm} is a RANDOM untrained model (tests/tiny.py): its captions "
            "are noise and only prove the plumbing")
    gen = generation_config(model, processor, cfg.max_new_tokens, cfg.min_new_tokens,
                            cfg.do_sample, cfg.temperature, cfg.top_p)
    dtype = getattr(torch, TORCH_DTYPES[meta["dtype"]])
    c = Captioner(model, processor, gen, meta["processor"], dtype)
    if with_image:  # recorded, not matched: both paths give the same captions, a resume may switch
        meta["prefix_cache"] = use_prefix_cache(model, cfg.prefix_cache)
        c.placeholders = placeholder_ids(model) if meta["prefix_cache"] else None
    preflight(c, with_image, cfg.vlm)
    if not paths.meta.exists():
        meta.update(model=cfg.vlm, tiny_random=tiny, made=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    versions=versions("torch", "transformers", "bitsandbytes", "accelerate",
                                      "tokenizers", "pillow"))
        try:
            write_json(paths.meta, meta)
        except OSError as err:
            die(f"cannot write {paths.meta} ({err.strerror}): free space on its disk and rerun")
    torch.manual_seed(cfg.seed)
    return c


def claim_output(cfg, meta, match_keys, paths, prompts, given):
    """Before the model loads: --out writable and locked, device, dtype and quant chosen and said,
    the meta matched but for the processor's part. (device, more processor options)."""
    writable_dir(paths.records.parent)  # a bad --out fails now, not after the model is loaded
    # Held for the life of the process: two runs appending to one output would duplicate records.
    lock_or_die(paths.records.with_name(f".{paths.records.name}.lock"), str(paths.records))
    extra, device = parse_processor_kwargs(cfg.processor_kwargs), pick_device(cfg.device)
    dtype, meta["dtype_chosen_by"] = resolve_dtype(cfg.dtype, device)
    quant, quant_why = resolve_quant(cfg.quant, device)
    say(f"{given}; {cfg.vlm} on {device}, dtype {dtype} ({meta['dtype_chosen_by']}), quant "
        f"{quant} ({quant_why}), batch size {cfg.batch_size} -> {paths.records}")
    prompts = [{k: v for k, v in p.items() if k != "file"} for p in prompts]
    meta.update(quant=quant, dtype=dtype, prompts=prompts, generation=generation_meta(cfg),
                batch_size=cfg.batch_size)
    meta["processor"] = None  # known once the processor is loaded; checked then
    check_meta(paths.meta, meta, [k for k in match_keys if k != "processor"], paths.records)
    return device, extra


# --- image mode: every (image, prompt) of this process's share
@dataclass
class ImageRun:
    items: list  # (relative path, label) per split line
    root: Path
    prompts: list  # prompt records, `general` first
    shard: tuple | None  # (rank, world) where this process captions a share of the split
    paths: Artifacts
    meta: dict
    names: list | None  # class names for {name}, with --name-hint
    indices: list  # the images of this share, of the split's first --limit


def plan_images(cfg):
    """What image mode checks before the model loads."""
    items = read_split(cfg.split)
    root = Path(cfg.root) if cfg.root else Path(cfg.split).parent
    prompts = load_prompts(cfg.prompts.split(","))
    rank, world = parse_shard(cfg.shard)
    shard = (rank, world) if world > 1 else None
    global VERBOSE
    VERBOSE = shard is None or rank == 0 or bool(cfg.shard)  # hand-started shards: separate jobs
    paths = artifact_paths(cfg.out or "runs/captions.jsonl", shard)
    meta = {"model": cfg.vlm, "split": cfg.split, "split_sha256": sha256_file(cfg.split),
            "root": str(root), "num_images": len(items), "name_hint": cfg.name_hint,
            "shard": list(shard) if shard else None}
    names = name_hints(cfg, prompts, meta)
    indices = [i for i in range(min(cfg.limit or len(items), len(items)))
               if shard is None or i % world == rank]
    check_root(root, items, indices, cfg.split)
    return ImageRun(items, root, prompts, shard, paths, meta, names, indices)


def launch_text(shard, by_flag):
    """How this process came to do its share: alone, a hand-started shard, or a launcher's rank."""
    if shard is None:
        return "1 process"
    how = "(--shard)" if by_flag else f"(rank {shard[0]} of {shard[1]} processes)"
    return f"shard {shard[0]}/{shard[1]} {how}"


def caption_images(cfg):
    """Image mode: every (image, prompt) of this share not yet written, whole images a batch."""
    run = plan_images(cfg)
    given = (f"captioning {len(run.indices)} images x {len(run.prompts)} prompts of {cfg.split}, "
             f"{launch_text(run.shard, cfg.shard)}")
    c = start_run(cfg, run.meta, MATCH_KEYS, run.paths, run.prompts, True, given)
    share_vision_work(c.model)
    order = {p["id"]: k for k, p in enumerate(run.prompts)}
    done = done_bitmap(run.paths.records, len(run.items) * len(order),
                       lambda r: r["index"] * len(order) + order[r["prompt"]]
                       if r["prompt"] in order else None, ("index", "prompt", "text"))
    bad_indices = known_bad_images(run.paths.errors, cfg.retry_bad)
    skipped = sum(i in bad_indices for i in run.indices)
    if skipped:
        say(f"skipping the {skipped} images recorded as unreadable in {run.paths.errors} "
            "(--retry-bad tries them again)")
    total = sum(len(todo) for _, _, todo in image_jobs(run, done, bad_indices))
    outputs, start = open_outputs(run.paths, bad_indices), time.time()
    with outputs.records, outputs.errors:
        decoded = decoded_images(image_jobs(run, done, bad_indices), run.root, cfg.workers)
        run_batches(c, image_batches(decoded, cfg.batch_size, outputs.record_bad),
                    lambda rows, texts: outputs.write(
                        {"index": r.index, "prompt": r.prompt, "text": t, "path": r.path}
                        for r, t in zip(rows, texts)),
                    outputs.record_bad, "captioning" if VERBOSE else "", total)
    report_images(run, done, outputs, total, skipped, max(time.time() - start, 1e-9))


def known_bad_images(errors_path, retry_bad):
    """The images recorded unreadable: skipped, or with --retry-bad tried again."""
    bad = {checked_record(errors_path, n, r, "index")["index"]
           for n, r in scan_jsonl(errors_path, repair=True)}
    if not (retry_bad and bad):
        return bad
    say(f"--retry-bad: trying the {len(bad)} images of {errors_path.name} again")
    tmp = errors_path.with_name(f".{errors_path.name}.{os.getpid()}.tmp")
    tmp.write_text("")
    os.replace(tmp, errors_path)  # emptied at once; whatever fails again is written again
    return set()


def image_jobs(run, done, bad_indices):
    """(index, relpath, [(prompt id, text)] still to do) per image of this run, lazily."""
    for i in run.indices:
        name = run.names[run.items[i][1]] if run.names else None
        todo = [(p["id"], p["text"].replace("{name}", name) if name is not None else p["text"])
                for k, p in enumerate(run.prompts) if not done[i * len(run.prompts) + k]]
        if todo and i not in bad_indices:
            yield i, run.items[i][0], todo


def report_images(run, done, outputs, total, skipped, seconds):
    """The run's last line; a run that captioned none of its images stops instead."""
    errors, per_image = run.paths.errors, len(run.prompts)
    say(f"{outputs.written} of {total} captions written to {run.paths.records} "
        f"({outputs.written / seconds:.2f} captions/s, {sum(done)} done before), {outputs.bad} "
        "bad images" + (f" (see {errors})" if outputs.bad else "")
        + (f"; {skipped} unreadable images skipped (--retry-bad tries them again)" if skipped
           else "") + ("; nothing was left to do" if run.indices and not total else ""))
    done_here = sum(done[i * per_image + k] for i in run.indices for k in range(per_image))
    if run.indices and not outputs.written and not done_here:  # an empty output is no success
        die(f"none of the {len(run.indices)} images of this run could be captioned: all are "
            f"unreadable (listed in {errors}); fix them and rerun with --retry-bad")


# --- class mode: one description per class name, text only
def describe_classes(cfg):
    if not is_main_process():  # rank 0 does them all: a handful of classes
        return
    paths = artifact_paths(cfg.out or "runs/class_descriptions.jsonl")
    names, prompt = read_classes(cfg.classes), class_prompt(cfg)
    meta = {"model": cfg.vlm, "classes": cfg.classes, "classes_sha256": sha256_file(cfg.classes),
            "num_classes": len(names)}
    keys = ("model", "quant", "dtype", "prompts", "generation", "processor", "classes_sha256")
    c = start_run(cfg, meta, keys, paths, [prompt], False,
                  f"describing the {len(names)} classes of {cfg.classes}")
    done = done_bitmap(paths.records, len(names), lambda r: r["class"], ("class", "text"))
    todo = [k for k in range(len(names)) if not done[k]]
    rows = [Row(k, prompt["id"], prompt["text"].replace("{name}", names[k]), None) for k in todo]
    outputs = open_outputs(paths, set())
    with outputs.records, outputs.errors:
        run_batches(c, (rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)),
                    lambda rows, texts: outputs.write(
                        {"class": r.index, "name": names[r.index], "text": t}
                        for r, t in zip(rows, texts)),
                    outputs.record_bad, "describing classes", len(todo))
    say(f"{outputs.written} of {len(todo)} descriptions written to {paths.records} ({sum(done)} "
        "done before)")


# --- merge: the shard files into one, in caption order
@dataclass
class Merged:
    seen: bytearray  # a byte per (image, prompt) slot of the meta's images x prompts
    written: int = 0
    clashes: list = field(default_factory=list)  # file:line of duplicates with another text


def merge(out):
    """Join the shard files of --out into --out in (index, prompt order) by a k-way merge of their
    sorted stretches (memory does not grow with the records); report gaps and clashes."""
    paths = artifact_paths(out)
    shards, meta, bad = claim_shards(paths.records)
    sort_key = caption_order(meta["prompts"])
    streams, total = [], 0
    for _, _, path in shards:
        stretches, count = shard_runs(path, sort_key)
        streams, total = streams + [read_run(path, *s, sort_key) for s in stretches], total + count
    merged = write_merged(paths, heapq.merge(*streams, key=lambda item: item[0]), total, meta, bad)
    write_json(paths.meta, {**meta, "shard": None, "merged_from": [p.name for _, _, p in shards]})
    report_merge(paths.records, shards, meta, merged, bad)


def claim_shards(out_path):
    """(rank, world, path) of each shard file of --out, their common meta, {index: bad-image
    record}. --out is locked (one merge or run into it at once), then each shard: one still
    captioning is not merged."""
    stem = re.escape(out_path.name[: -len(".jsonl")])
    pattern = re.compile(stem + r"\.shard-(\d+)-of-(\d+)\.jsonl$")
    shards = sorted((int(m.group(1)), int(m.group(2)), p) for p in out_path.parent.glob("*.jsonl")
                    if (m := pattern.match(p.name)))
    if not shards:
        die(f"no shard files {out_path.stem}.shard-I-of-N.jsonl next to {out_path}: run "
            "caption.py --shard i/n first")
    if len({n for _, n, _ in shards}) != 1:
        die(f"shard files of different counts ({sorted({n for _, n, _ in shards})}) next to "
            f"{out_path}: delete the stale ones")
    lock_or_die(out_path.with_name(f".{out_path.name}.lock"), str(out_path))
    metas, bad = [], {}
    for rank, world, path in shards:
        lock_or_die(path.with_name(f".{path.name}.lock"), str(path))
        sidecars = artifact_paths(out_path, (rank, world))
        if not sidecars.meta.exists():
            die(f"{path} has no {sidecars.meta.name}")
        metas.append((sidecars.meta, json.loads(sidecars.meta.read_text())))
        for n, r in scan_jsonl(sidecars.errors):
            bad.setdefault(checked_record(sidecars.errors, n, r, "index")["index"], r)
    for path, other in metas[1:]:
        for key in MATCH_KEYS + ("revision", "num_images"):
            if other.get(key) != metas[0][1].get(key):
                die(f"{path.name} and {metas[0][0].name} differ in `{key}`: the shards were made "
                    "with other settings")
    return shards, metas[0][1], bad


def caption_order(prompts):
    """A record's sort key: (image, its prompt's place in the meta, a prompt not there last)."""
    order = {p["id"]: k for k, p in enumerate(prompts)}
    return lambda record: (record["index"], order.get(record["prompt"], len(prompts)))


def shard_runs(path, sort_key):
    """(first offset, first line, end offset) of each stretch of a shard file already in caption
    order (one, plus one per resume that filled in earlier images), and the number of records.
    Each record is checked here, so the merge meets none it cannot sort."""
    runs, previous, offset, count = [], None, 0, 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8 (a kill cut a character in two)
                    die(f"{path}:{n}: not valid JSON; rerun that shard with the same command (it "
                        "repairs the file)")
                key = sort_key(checked_record(path, n, record, "index", "prompt", "text"))
                if previous is None or key < previous:
                    runs.append((offset, n))
                previous, count = key, count + 1
            offset += len(line)
    ends = [start for start, _ in runs[1:]] + [offset]
    return [(start, n, end) for (start, n), end in zip(runs, ends)], count


def read_run(path, start, first_line, end, sort_key):
    """(key, file, line, raw line, record) of one sorted stretch of a shard file, streamed."""
    with open(path, "rb") as f:
        f.seek(start)
        n = first_line
        while f.tell() < end and (line := f.readline()):
            if line.strip():
                whole = line if line.endswith(b"\n") else line + b"\n"
                record = json.loads(line)
                yield sort_key(record), str(path), n, whole, record
            n += 1


def write_merged(paths, stream, total, meta, bad):
    """The first record of each (image, prompt) of the sorted stream (a later one with another text
    is a clash) and the bad images, under temporary names of this process (two merges never share
    one, and a failed one leaves nothing half-written), then renamed into place."""
    num_prompts, previous = len(meta["prompts"]), None
    merged = Merged(bytearray(meta["num_images"] * num_prompts))
    tmp, errors_tmp = (p.with_name(f".{p.name}.{os.getpid()}.tmp")
                       for p in (paths.records, paths.errors))
    try:
        with open(tmp, "wb") as f:
            for key, path, n, line, record in progress_bar(total, "caption", desc="merging",
                                                           iterable=stream):
                if previous is not None and key == previous[0]:
                    if record["text"] != previous[1]:
                        merged.clashes.append(f"{path}:{n}")
                    continue
                f.write(line)
                previous, merged.written = (key, record["text"]), merged.written + 1
                if key[1] < num_prompts and key[0] < meta["num_images"]:
                    merged.seen[key[0] * num_prompts + key[1]] = 1
        with open(errors_tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(bad[index]) + "\n" for index in sorted(bad))
        os.replace(tmp, paths.records)
        os.replace(errors_tmp, paths.errors)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        errors_tmp.unlink(missing_ok=True)
        die(f"merging into {paths.records} failed ({err.strerror}: {err.filename}): free space on "
            "its disk and rerun the merge")
    return merged


def report_merge(out_path, shards, meta, merged, bad):
    """The merge's line; gaps (a pair neither captioned nor bad, a shard absent) stop it instead."""
    if merged.clashes:
        warn(f"{len(merged.clashes)} duplicate (image, prompt) records with another text than the "
             f"first, e.g. {merged.clashes[0]}: the first was kept")
    num_prompts, world = len(meta["prompts"]), shards[0][1]
    missing = [(k // num_prompts, meta["prompts"][k % num_prompts]["id"])
               for k, seen in enumerate(merged.seen) if not seen and k // num_prompts not in bad]
    absent = sorted(set(range(world)) - {rank for rank, _, _ in shards})
    summary = (f"merged {len(shards)} of {world} shards into {out_path}: {merged.written} "
               f"captions, {meta['num_images']} images x {num_prompts} prompts, {len(bad)} bad "
               "images")
    if missing or absent:
        die(summary + f"; GAPS: {len(missing)} (image, prompt) pairs missing, first {missing[:3]}"
            + (f", shards {absent} absent" if absent else "")
            + ": rerun the shards with the same command to fill them")
    print(f"caption.py: {summary}; no gaps", flush=True)


# --- main
def check_config(cfg):
    """Numbers that would fail late (an IndexError after a batch), or silently do nothing."""
    checks = [(cfg.limit >= 0, "--limit", "0 (all) or a count of images"),
              (cfg.batch_size >= 1, "--batch-size", "at least 1"),
              (cfg.max_new_tokens >= 1, "--max-new-tokens", "at least 1"),
              (0 <= cfg.min_new_tokens <= cfg.max_new_tokens, "--min-new-tokens",
               "0 to --max-new-tokens"),
              (0 <= cfg.workers <= 256, "--workers", "0 to 256 threads"),
              (cfg.temperature > 0, "--temperature", "above 0"),
              (0 < cfg.top_p <= 1, "--top-p", "in (0, 1]"),
              (cfg.image_size >= 0, "--image-size", "0 (the processor's own) or a size in pixels")]
    for ok, flag, allowed in checks:
        if not ok:
            die(f"{flag} {getattr(cfg, flag[2:].replace('-', '_'))}: expected {allowed}")


def main(argv=None):
    cfg = parse_config(Config, argv)
    check_config(cfg)
    launch_check()  # accelerate launch --num_processes N may start fewer
    held = len(LOCKS)
    try:
        if cfg.merge:
            return merge(cfg.out or "runs/captions.jsonl")
        if cfg.split:
            return caption_images(cfg)
        if cfg.classes:
            return describe_classes(cfg)
        die("pass --split DATA/train.txt (images to caption) or --classes DATA/classes.txt (class "
            "descriptions)")
    finally:  # main() run again in one process (tests, a notebook) must not meet this run's locks
        while len(LOCKS) > held:
            LOCKS.pop().close()


# --- shared helpers: byte-identical copies of tests/shared_helpers.py (test_shared.py --sync)

# one spelling of a dtype in every stage
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


def first_line(error):
    """An exception's message as one line for an error line of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def warn(msg):
    print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


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


if __name__ == "__main__":
    main()
