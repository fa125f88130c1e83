"""Caption every image of a split with a VLM, once per prompt (stage 1 of vlmkd).

    python caption.py --split data/x/train.txt --vlm llava-hf/llava-v1.6-mistral-7b-hf --out runs/x/captions.jsonl
    python caption.py --split data/x/train.txt --vlm /models/Qwen2-VL-2B-Instruct --quant none --batch-size 30 \
        --out runs/x/captions.jsonl
    python caption.py --split data/x/train.txt --vlm tiny --max-new-tokens 16 --out runs/demo/captions.jsonl  # random
    python caption.py --split data/x/train.txt --shard 0/4 --out runs/x/captions.jsonl        # one of 4 machines
    torchrun --nproc_per_node 8 caption.py --split data/x/train.txt --out runs/x/captions.jsonl  # shards by rank
    python caption.py --merge --out runs/x/captions.jsonl                                     # join shards, report gaps
    python caption.py --classes data/x/classes.txt --out runs/x/class_descriptions.jsonl      # one sentence a class

Writes `captions.jsonl` (`{"index", "prompt", "text", "path"}` per image x prompt, appended and flushed as it goes),
`captions.meta.json` (model, revision, quantisation, prompts, image-processor and generation settings, versions) and
`captions.errors.jsonl` (images that could not be read). A killed run restarted with the same command skips what is
done; a run with another model, prompts or settings refuses to append. All prompts of an image share one batch and the
vision tower runs once per distinct image. Batched greedy captions equal one-at-a-time ones (left padding); exactly so
in fp32, while in bf16 a caption may part ways where two tokens tie within bf16 rounding, as on any batch-size change.
Families tested (tiny random builds through their real processors): LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3/SmolVLM,
PaliGemma (no chat template: its processor places the image tokens itself).
The language model prefills an image's shared prefix (template + image tokens) once and copies its KV cache to the
image's prompts where that is exact (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL; not PaliGemma's prefix-LM);
--no-prefix-cache runs the whole prompt per caption, with the same captions.
"""
import argparse
import copy
import hashlib
import heapq
import json
import os
import re
import shutil
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

CLASS_PROMPT = "class_description"  # the file stem of the class-description prompt, never an image prompt
TINY_VERSION = 1  # bump when build_tiny_llava changes, so cached tiny models are rebuilt
MATCH_KEYS = ("model", "quant", "dtype", "prompts", "generation", "processor", "split_sha256", "name_hint",
              "classes_sha256")
VISION_TOWERS = ("model.vision_tower", "model.vision_model", "vision_tower", "vision_model")
# Families (config.model_type) where prefilling an image's prefix once and each prompt after it gives the same logits
# as one pass over the whole prompt: causal attention, and positions that only count the tokens before (Qwen2-VL's
# mrope too: text after the image sits at index + a delta the prefix fixes). Tested in tests/test_caption_families.py.
PREFIX_CACHE_FAMILIES = ("llava", "llava_next", "idefics3", "qwen2_vl")


# The one shared helper the Config needs above it; the others are at the back of the file.
def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


# --- config
@dataclass
class Config:
    split: str = opt("", "split file, `relative/path label` per line (image mode)", heading="what to caption")
    root: str = opt("", "folder the split's paths are relative to (default: the split file's folder)")
    classes: str = opt("", "classes.txt; without --split: describe each class (text only); with --name-hint: names")
    prompts: str = opt("prompts", "comma-separated folders of *.txt prompts or prompt files; id = file stem")
    class_prompt: str = opt("", "class mode prompt file (default: class_description.txt beside the --prompts)")
    name_hint: bool = opt(False, "fill {name} in image prompts with the image's class name")
    limit: int = opt(0, "caption only the first N images (0 = all); a later run without it continues")
    vlm: str = opt("HuggingFaceTB/SmolVLM-256M-Instruct", "hub id or local folder of an image-text-to-text model; "
                   "`tiny` builds a random stand-in", heading="model")
    revision: str = opt("", "hub revision (branch, tag or commit) of --vlm")
    quant: Literal["auto", "4bit", "8bit", "none"] = opt(
        "auto", "4bit (NF4, double quant), 8bit or none; auto: 4bit on CUDA, none on a CPU (bitsandbytes is slow)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "compute dtype; auto: bf16 where the hardware computes it (GPUs since Ampere, CPUs with avx512_bf16 "
        "or AMX), else fp16 on a GPU and fp32 on a CPU (emulated bf16 ran 3.1x slower than fp32 there)")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:0, ...")
    tiny_dir: str = opt("~/.cache/vlmkd/tiny-llava", "where --vlm tiny is built and cached")
    image_size: int = opt(0, "longest edge before tiling (Idefics3/SmolVLM) or sqrt of max pixels (Qwen2-VL); "
                          "0: the tile size without splitting, else the processor's own", heading="image processor")
    image_splitting: bool = opt(False, "Idefics3/SmolVLM: split an image into tiles plus a global view "
                                "(a 28-px image becomes up to 17 vision passes; off: one tile)")
    processor_kwargs: str = opt("", "JSON of further image-processor options, e.g. '{\"max_pixels\": 200704}'")
    batch_size: int = opt(8, "(image, prompt) pairs per generate call, whole images where they fit (a multiple of "
                          "the number of prompts fills it)", heading="generation")
    prefix_cache: bool = opt(True, "prefill an image's shared prefix (template + image tokens) once and copy its KV "
                             "cache to the image's prompts (same captions); --no-prefix-cache: the whole prompt per "
                             "caption, as before")
    max_new_tokens: int = opt(128, "longest caption in tokens")
    min_new_tokens: int = opt(0, "shortest caption in tokens (benchmarks set it to max)")
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(0.7, "softmax temperature with --do-sample")
    top_p: float = opt(0.9, "nucleus mass with --do-sample")
    seed: int = opt(0, "torch seed (for --do-sample)")
    out: str = opt("", "output .jsonl (default runs/captions.jsonl, or runs/class_descriptions.jsonl with --classes)",
                   heading="run")
    shard: str = opt("", "i/n: caption images with index %% n == i (default: RANK/WORLD_SIZE of torchrun)")
    merge: bool = opt(False, "join the shard files of --out into --out and report gaps")
    retry_bad: bool = opt(False, "caption again the images recorded in the errors file (they are skipped otherwise)")
    workers: int = opt(4, "threads decoding images ahead of the model")


VERBOSE = True  # only rank 0 of a torchrun / accelerate launch prints


def say(msg):
    if VERBOSE:
        print(f"caption.py: {msg}", flush=True)


# --- inputs
def prompt_record(path):
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        die(f"prompt file {path} is empty")
    return {"id": Path(path).stem, "text": text, "sha256": hashlib.sha256(text.encode()).hexdigest(), "file": str(path)}


def find_prompts_dir(name):
    """A relative default like `prompts` is looked up in the working directory, then next to this script."""
    path = Path(name)
    if not path.exists() and not path.is_absolute() and (Path(__file__).resolve().parent / path).exists():
        return Path(__file__).resolve().parent / path
    return path


def load_prompts(sources):
    files = []
    for source in sources:
        path = find_prompts_dir(source)
        if path.is_dir():
            files += [p for p in path.glob("*.txt") if p.stem != CLASS_PROMPT]
        elif path.is_file():
            files.append(path)
        else:
            die(f"prompt source {source} not found: pass --prompts FOLDER (of *.txt) or prompt files")
    if not files:
        die(f"no prompt files (*.txt, other than {CLASS_PROMPT}.txt) in {','.join(sources)}: pass --prompts FOLDER")
    prompts = sorted((prompt_record(p) for p in files), key=lambda p: (p["id"] != "general", p["id"]))
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        die(f"two prompt files share an id (file stem): {sorted(ids)}")
    return prompts


# --- outputs
def artifact_paths(out, shard=None):
    """(records, meta, errors) paths; a shard (i, n) gets `captions.shard-i-of-n.*` next to --out."""
    out = Path(out)
    if out.suffix != ".jsonl":
        die(f"--out {out} must end with .jsonl")
    stem = out.name[: -len(".jsonl")] + (f".shard-{shard[0]}-of-{shard[1]}" if shard else "")
    return out.with_name(stem + ".jsonl"), out.with_name(stem + ".meta.json"), out.with_name(stem + ".errors.jsonl")


def scan_jsonl(path, repair=False):
    """(line number, record) of a jsonl file, streamed: memory does not grow with the file. A broken last line (a run
    killed mid-write) is dropped, and with repair cut from the file so appending goes on cleanly; a broken line
    elsewhere is an error."""
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
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError where a kill cut a character in two
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


def check_meta(meta_path, meta, keys, out):
    """Refuse to append to an output made with other settings (it would mix two models' captions)."""
    if not meta_path.exists():
        if out.exists() and out.stat().st_size:
            die(f"{out} exists without its {meta_path.name}: use another --out or delete {out}")
        return
    old = json.loads(meta_path.read_text())
    for key in keys:
        was, now = old.get(key), meta.get(key)
        if was != now:
            if key == "prompts":
                was, now = ({p["id"]: p["sha256"][:8] for p in v or []} for v in (was, now))
            die(f"{out} was made with another `{key}` ({json.dumps(was)[:120]} in {meta_path.name}, now "
                f"{json.dumps(now)[:120]}): use another --out or delete {out} and {meta_path.name}")


def checked_record(path, n, record, key, *strings):
    """A record as caption.py writes it: an object whose `key` is an integer >= 0 and whose `strings` are strings.
    Anything else (`"index": "2"`, a JSON array) is refused with file:line, before it misleads a resume or a merge."""
    if not (isinstance(record, dict) and type(record.get(key)) is int and record[key] >= 0
            and all(isinstance(record.get(k), str) for k in strings)):
        fields = ", ".join([f"`{key}` an integer >= 0"] + [f"`{k}` a string" for k in strings])
        die(f"{path}:{n}: not a record of caption.py (an object with {fields}): {json.dumps(record)[:80]}; fix or "
            "delete that line, then rerun")
    return record


def done_bitmap(path, size, slot, fields):
    """What is already written, as one byte per (item, prompt) slot: resume cost is the keys, never the texts."""
    done = bytearray(size)
    for n, record in scan_jsonl(path, repair=True):
        k = slot(checked_record(path, n, record, *fields))
        if k is not None and 0 <= k < size:
            done[k] = 1
    return done


# --- model
def build_tiny_llava(folder):
    """A tiny random LLaVA (CLIP vision tower + Llama), saved like a hub model so it loads through the
    same from_pretrained code. Linear sizes are multiples of 64 so bitsandbytes 4-bit runs on CPU."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
    folder = Path(folder).expanduser()
    marker = folder / "vlmkd_tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == TINY_VERSION:
        return folder
    words = ("a an the photo image picture of object shirt dress coat bag shoe sneaker boot sandal trouser pullover "
             "top with long short sleeves round neck strap heel sole black white grey red blue dark light pale striped "
             "plain soft cotton leather wool smooth rough shape outline parts colour texture pattern background "
             "setting worn used describe detail what where how is it on in and or from other similar kinds tell "
             "apart material made").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    # Metaspace BPE, not byte-level: every id decodes to readable text, so random captions are words.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                                ".,:;?!-'()/{}\n"))
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                                        initial_alphabet=alphabet))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         pad_token_id=tokenizer.pad_token_id)
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
                "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                "{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    torch.manual_seed(0)  # the same tiny model everywhere, so test runs compare
    model = LlavaForConditionalGeneration(config)
    # Build aside and rename: concurrent runs never see a half-written folder.
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "vlmkd_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "note": "random weights, tests only"}))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not (marker.exists() and json.loads(marker.read_text()).get("version") == TINY_VERSION):
        shutil.rmtree(folder, ignore_errors=True)  # an older or half-deleted build
    try:
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy first: same seed, same model
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_dtype(choice, device):
    """(dtype, why): --dtype, or with auto the hardware's choice (captions differ a little by dtype)."""
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


def launch_text(shard, by_flag):
    """How this process came to do its share: alone, a hand-started shard, or one rank of a launcher."""
    if shard is None:
        return "1 process"
    return f"shard {shard[0]}/{shard[1]} " + ("(--shard)" if by_flag else f"(rank {shard[0]} of {shard[1]} processes)")


def offline_source(vlm, revision, why):
    """A hub id when the hub cannot be reached: load from the cache in offline mode, or stop with what to do."""
    from huggingface_hub import constants, try_to_load_from_cache
    if not isinstance(try_to_load_from_cache(vlm, "config.json", revision=revision or None), str):
        die(f"cannot load VLM {vlm!r} (offline: {why}, and it is not in the cache): on a machine with network run "
            f"`hf download {vlm} --local-dir DIR`, copy DIR here and pass --vlm /local/dir (DIR), or --vlm tiny "
            f"for a random stand-in")
    constants.HF_HUB_OFFLINE = True  # cached: load it without a network call (each would wait for its timeout)


def load_vlm(vlm, quant="none", dtype="bf16", device="cpu", revision="", tiny_dir="~/.cache/vlmkd/tiny-llava"):
    """(model, processor, resolved revision or None, tiny) through AutoProcessor + AutoModelForImageTextToText."""
    tiny = vlm == "tiny"
    local = Path(vlm).expanduser()
    if vlm.startswith(("/", "./", "../", "~")) and not local.is_dir():
        die(f"VLM folder {vlm} not found: pass --vlm with a folder holding config.json, or a hub id")
    source = str(build_tiny_llava(tiny_dir)) if tiny else str(local) if local.is_dir() else vlm
    if not tiny and not local.is_dir() and (why := hub_unreachable(vlm)):
        offline_source(vlm, revision, why)
    compute_dtype = getattr(torch, TORCH_DTYPES[dtype])
    kwargs = {"dtype": compute_dtype, "device_map": {"": str(device)}, **({"revision": revision} if revision else {})}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=compute_dtype)
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    try:
        processor = AutoProcessor.from_pretrained(source, **({"revision": revision} if revision else {}))
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).eval()
    except ValueError as err:  # found, but not something AutoModelForImageTextToText knows
        die(f"cannot load VLM {vlm!r} as an image-text-to-text model: {str(err).splitlines()[0][:200]}")
    except OSError as err:
        if Path(source).is_dir():
            die(f"cannot load VLM from folder {source}: {str(err).splitlines()[0][:200]}")
        die(f"cannot load VLM {vlm!r} from the hub ({str(err).splitlines()[0][:160]}): for an offline machine run "
            f"`hf download {vlm} --local-dir DIR` where there is network and pass --vlm /local/dir (DIR)")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # right padding puts pads between prompt and answer: the classic batched-VLM bug
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    resolved = None
    if not tiny and not Path(source).is_dir():
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(vlm, "config.json", revision=revision or None)
        match = re.search(r"snapshots/([0-9a-f]{40})/", str(cached)) if isinstance(cached, str) else None
        resolved = match.group(1) if match else (revision or None)
    return model, processor, resolved, tiny


def parse_processor_kwargs(text):
    try:
        extra = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        die(f"--processor-kwargs is not JSON ({err})")
    if not isinstance(extra, dict):
        die(f"--processor-kwargs must be a JSON object, got {text!r}")
    return extra


def processor_settings(processor, image_size=0, image_splitting=False, extra=None):
    """Image-processor options passed with every call, from the flags; recorded in the meta. Idefics3 (SmolVLM)
    resizes the longest edge up to 4 x 364 px or more and tiles it: a 28-px image then costs up to 17 vision passes."""
    image_processor = getattr(processor, "image_processor", None)
    settings = {}
    if hasattr(image_processor, "do_image_splitting"):  # Idefics3 / SmolVLM
        settings["do_image_splitting"] = image_splitting
        if image_size or not image_splitting:
            settings["size"] = {"longest_edge": image_size or image_processor.max_image_size["longest_edge"]}
    elif image_size and hasattr(image_processor, "max_pixels"):  # Qwen2-VL
        settings["max_pixels"] = image_size * image_size
    elif image_size:
        die(f"--image-size applies to Idefics3/SmolVLM and Qwen2-VL processors, not {type(image_processor).__name__}: "
            "pass its options with --processor-kwargs JSON")
    return {**settings, **(extra or {})}


def generation_config(model, processor, max_new_tokens, min_new_tokens=0, do_sample=False, temperature=0.7, top_p=0.9):
    gen = copy.deepcopy(model.generation_config)
    gen.max_new_tokens, gen.min_new_tokens, gen.do_sample, gen.num_beams = max_new_tokens, min_new_tokens, do_sample, 1
    gen.temperature, gen.top_p, gen.top_k = (temperature, top_p, None) if do_sample else (None, None, None)
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.pad_token_id
    return gen


# --- prompts in, captions out
def build_inputs(processor, texts, images, settings, compute_dtype):
    """A left-padded batch in the family's own prompt format: its chat template, or for a processor without one
    (PaliGemma) the raw prompt, in front of which the processor puts the image tokens. Floats in compute_dtype."""
    if processor.chat_template:
        convs = [[{"role": "user", "content": ([{"type": "image", "image": image}] if image is not None else [])
                   + [{"type": "text", "text": text}]}] for text, image in zip(texts, images)]
        inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt",
                                               processor_kwargs={"padding": True, "padding_side": "left", **settings})
    else:
        token = getattr(processor, "image_token", None) or ""
        prompts = [(token if image is not None else "") + text for text, image in zip(texts, images)]
        with_images = [image for image in images if image is not None]
        inputs = processor(text=prompts, images=with_images or None, padding=True, padding_side="left",
                           return_tensors="pt", **settings)
    return {k: (v.to(compute_dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items() if k != "labels"}


def non_text_tokens(processor):
    """Tokens a caption must not carry: added tokens shaped `<...>` that decoding keeps (PaliGemma's <loc0042>)."""
    added = [t for t in processor.tokenizer.get_added_vocab() if t.startswith("<") and t.endswith(">")]
    return re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None


@torch.inference_mode()
def generate_texts(model, processor, inputs, gen, strip=None):
    """Captions of a batch: `inputs` from build_inputs, or its prefix_plan (each image's prefix prefilled once)."""
    if "prefix" in inputs:
        ids, mask, cache = prefill_prefixes(model, inputs, gen)
        new_ids = model.generate(input_ids=ids, attention_mask=mask, cache=cache, generation_config=gen)
    else:
        inputs = {k: v.to(model.device, non_blocking=True) for k, v in inputs.items()}
        new_ids = model.generate(**inputs, generation_config=gen)
    new_ids = new_ids[:, inputs["input_ids"].shape[1]:].cpu()
    texts = processor.batch_decode(new_ids, skip_special_tokens=True)
    return [(strip.sub("", t) if strip else t).strip() for t in texts]


def distinct_rows(pixels):
    """(first row of each distinct image, inverse index) of a batch whose rows repeat images (one row a prompt)."""
    flat = pixels.reshape(len(pixels), -1)
    sums, first, inverse = flat.float().sum(1).tolist(), [], []
    for i in range(len(flat)):
        same = [j for j, f in enumerate(first) if sums[f] == sums[i] and torch.equal(flat[f], flat[i])]
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
    """Hooks on the vision tower so it runs once per distinct image of a batch: the P rows of one image (one per
    prompt) carry the same pixels. Families whose tower takes flat patches (Qwen2-VL) run as before."""
    names = dict(model.named_modules())
    tower = next((names[n] for n in VISION_TOWERS if n in names), None)
    if tower is None:
        return []
    state = {}

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
            return v.index_select(0, index) if torch.is_tensor(v) and v.dim() and len(v) == len(pixels) else v
        return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}

    def after(module, args, kwargs, output):
        return expand_rows(output, state["inverse"], state["n"]) if state else None
    return [tower.register_forward_pre_hook(before, with_kwargs=True),
            tower.register_forward_hook(after, with_kwargs=True)]


# --- the image prefix prefilled once per image
def prefix_cache_path(model, enabled):
    """Whether this run prefills each image's prefix once (said once, with why): only where that is exact."""
    family = model.config.model_type
    if not enabled:
        why = "--no-prefix-cache"
    elif family == "paligemma":
        why = "PaliGemma attends both ways over image + prompt (prefix-LM), so an image's KV depends on its prompt"
    elif family not in PREFIX_CACHE_FAMILIES:
        why = f"{family} is not among the families checked exact ({', '.join(PREFIX_CACHE_FAMILIES)})"
    else:
        say("LM prefill: each image's prefix (template + image tokens) once, its KV cache shared by its prompts")
        return True
    say(f"LM prefill: the whole prompt per caption ({why})")
    return False


def placeholder_ids(model):
    """Token ids the model replaces with image (or video) features: they must all sit in the shared prefix."""
    names = ("image_token_id", "image_token_index", "video_token_id")
    return torch.tensor(sorted({v for n in names if isinstance(v := getattr(model.config, n, None), int)}))


def image_groups(images):
    """(first row of each image, image of each row): an image's rows (one per prompt) carry the same image object."""
    first, inverse, seen = [], [], {}
    for row, image in enumerate(images):
        group = seen.setdefault(id(image), len(first))
        first += [row] if group == len(first) else []
        inverse.append(group)
    return first, inverse


def shared_lengths(tokens, first, inverse, placeholders):
    """Per image, how many tokens all its rows start with, each row keeping one or more of its own for generate to
    run (it needs an uncached token). None if a row's own part holds image tokens (text before the image)."""
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
    """The batch re-laid for prefill_prefixes, or None where no image has two rows (nothing to share) or the prefix
    would not hold the image. `prefix`: one left-padded row per image with its pixel inputs. `input_ids` and
    `attention_mask`: each row as [pads, its image's prefix | pads, its own tokens], the prefix part exactly the prefix
    row (the cache lines up). The pads between are masked and position ids count unmasked tokens only, so every row
    sees the same tokens at the same positions as its left-padded row in build_inputs."""
    first, image_of_row = image_groups(images)
    if len(first) == len(images):
        return None
    valid = inputs["attention_mask"].bool()
    unpadded = {key: [v[keep] for v, keep in zip(value, valid)] for key, value in inputs.items()
                if torch.is_tensor(value) and value.shape == valid.shape}  # ids, mask and any token types
    cuts = shared_lengths(unpadded["input_ids"], first, image_of_row, placeholders)
    if cuts is None:
        return None
    width = max(cuts)
    own = max(len(ids) - cuts[g] for ids, g in zip(unpadded["input_ids"], image_of_row))
    fill = {key: pad_id if key == "input_ids" else 0 for key in unpadded}
    prefix = {key: torch.stack([left_pad(rows[r][:cuts[g]], width, fill[key]) for g, r in enumerate(first)])
              for key, rows in unpadded.items()}
    plan = {"prefix": {**prefix_images(inputs, first, skip=unpadded), **prefix},
            "image_of_row": torch.tensor(image_of_row)}
    # A repetition penalty sees every id of a row, masked or not: a row build_inputs did not pad is filled with its
    # own last token, not the pad id (Qwen2-VL's pad is an end-of-text token, so that would move where captions end).
    row_fill = [pad_id if not keep.all() else int(ids[-1]) for ids, keep in zip(unpadded["input_ids"], valid)]
    for key, fills in (("input_ids", row_fill), ("attention_mask", [0] * len(row_fill))):
        plan[key] = torch.stack([torch.cat([left_pad(row[:cuts[g]], width, f), left_pad(row[cuts[g]:], own, f)])
                                 for row, g, f in zip(unpadded[key], image_of_row, fills)])
    return plan


def prefix_images(inputs, first, skip=()):
    """The pixel inputs of rows `first`: tensors with a row per prompt are indexed; Qwen2-VL's flat patches are cut
    per image by image_grid_thw."""
    rows, index, picked = len(inputs["input_ids"]), torch.tensor(first), {}
    if "image_grid_thw" in inputs:
        patches = inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist())
        picked["pixel_values"] = torch.cat([patches[r] for r in first])
    for key, value in inputs.items():
        if key not in picked and key not in skip and torch.is_tensor(value) and value.dim() and len(value) == rows:
            picked[key] = value.index_select(0, index)
    return picked


def prefill_prefixes(model, plan, gen):
    """(input ids, attention mask, KV cache) for generate: each image's prefix is run once, by generate for one token
    (so its position ids are the family's own, mrope included), and its cache rows are copied to the image's rows."""
    device = model.device
    once = copy.deepcopy(gen)
    once.max_new_tokens, once.min_new_tokens, once.do_sample, once.return_dict_in_generate = 1, 0, False, True
    once.temperature = once.top_p = once.top_k = None
    prefix = {k: v.to(device, non_blocking=True) for k, v in plan["prefix"].items()}
    cache = model.generate(**prefix, generation_config=once).cache
    image_of_row = plan["image_of_row"].to(device)
    cache.batch_select_indices(image_of_row)
    inner = getattr(model, "model", None)
    if torch.is_tensor(deltas := getattr(inner, "rope_deltas", None)):  # Qwen2-VL: each prefix's mrope offset, which
        inner.rope_deltas = deltas.index_select(0, image_of_row)  # generate adds to a cached run's text positions
    return plan["input_ids"].to(device), plan["attention_mask"].to(device), cache


def preflight(model, processor, settings, compute_dtype, gen, with_image, vlm, placeholders=None):
    """A two-row test caption before any work, through the run's own path: a template, dtype, device or model failure
    stops the run here, so a failure later can be laid at one image's door."""
    image = Image.new("RGB", (64, 48), (120, 130, 140)) if with_image else None
    try:
        inputs = build_inputs(processor, ["Describe this.", "What is shown here, in detail?"], [image, image],
                              settings, compute_dtype)
        if placeholders is not None:
            inputs = prefix_plan(inputs, [image, image], placeholders, processor.tokenizer.pad_token_id) or inputs
        probe_gen = copy.deepcopy(gen)
        probe_gen.max_new_tokens, probe_gen.min_new_tokens = 1, 0
        generate_texts(model, processor, inputs, probe_gen)
    except Exception as err:
        die(f"a test caption with {vlm} failed before any work, so the model, its prompt format, the settings or "
            f"the device is at fault, not the data (nothing recorded): {type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}")


# --- the loop
def load_image(path):
    try:
        with Image.open(path) as img:
            return rgb_image(img), None  # convert() decodes the whole file: truncation shows here
    except PermissionError as err:  # the folder's or file's permissions, not the image: stop, record nothing
        die(f"cannot read {path} ({err.strerror}): make the data readable and rerun (it resumes)")
    except Exception as err:  # any decoder failure is the image's own: recorded and skipped
        return None, f"{type(err).__name__}: {err}"


def decoded_images(jobs, root, workers):
    """(index, relpath, prompts, image, error) in order, decoded `workers` threads ahead of the caller."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending, jobs = deque(), iter(jobs)
        for job in jobs:
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
    """Rows (key, text, image) of whole images, as many as fit in batch_size: all prompts of an image share a batch,
    so its vision work is done once (an image with more prompts than batch_size is split). Unreadable images go to
    bad(record)."""
    rows = []
    for index, rel, todo, image, error in decoded:
        if error is not None:
            bad({"index": index, "path": rel, "error": error})
            continue
        pairs = [((index, pid, rel), text, image) for pid, text in todo]
        if rows and len(rows) + len(pairs) > batch_size:
            yield rows
            rows = []
        while len(pairs) > batch_size:
            yield pairs[:batch_size]
            pairs = pairs[batch_size:]
        rows += pairs
    if rows:
        yield rows


def prepare_batch(processor, rows, settings, compute_dtype):
    """(rows kept, inputs, bad records). The preflight proved the prompt format, so an image the processor rejects
    alone (Qwen2-VL: aspect ratio over 200) is that image's fault; a batch that fails with no such image stops."""
    try:
        return rows, build_inputs(processor, [r[1] for r in rows], [r[2] for r in rows], settings, compute_dtype), []
    except Exception as batch_error:
        why = f"{type(batch_error).__name__}: {str(batch_error).splitlines()[0][:200]}"
        if rows[0][2] is None:
            die(f"the processor failed on a text batch (nothing recorded): {why}")
        bad, tried = {}, set()
        for key, text, image in rows:
            if key[0] not in tried:
                tried.add(key[0])
                try:
                    build_inputs(processor, [text], [image], settings, compute_dtype)
                except Exception as err:
                    bad[key[0]] = {"index": key[0], "path": key[-1], "error": f"processor: {type(err).__name__}: {err}"}
        if not bad:
            die(f"the processor failed on a batch though each of its images passes alone (nothing recorded): {why}")
        rows = [r for r in rows if r[0][0] not in bad]
        inputs = build_inputs(processor, [r[1] for r in rows], [r[2] for r in rows], settings, compute_dtype) \
            if rows else None
        return rows, inputs, list(bad.values())


def run_batches(model, processor, gen, batches, settings, compute_dtype, write, bad, desc="", total=None,
                placeholders=None):
    """Generate for each batch of rows, the next batch prepared on a thread while the model runs on this one.
    write(rows, texts) per batch; bad(record) per image the processor rejects. A model failure stops the run.
    With placeholders (the image token ids), each image's prefix is prefilled once (prefix_plan)."""
    strip = non_text_tokens(processor)
    batches = iter(batches)

    def next_prepared():
        rows = next(batches, None)
        if rows is None:
            return None
        rows, inputs, rejected = prepare_batch(processor, rows, settings, compute_dtype)
        if rows and placeholders is not None:
            inputs = prefix_plan(inputs, [r[2] for r in rows], placeholders, processor.tokenizer.pad_token_id) or inputs
        return rows, inputs, rejected

    with ThreadPoolExecutor(1) as prep, progress_bar(total, "caption", desc=desc, disable=not desc) as bar:
        future = prep.submit(next_prepared)
        while (prepared := future.result()) is not None:
            future = prep.submit(next_prepared)
            rows, inputs, rejected = prepared
            for record in rejected:
                bad(record)
            if not rows:
                continue
            try:
                texts = generate_texts(model, processor, inputs, gen, strip)
            except torch.OutOfMemoryError:
                die(f"out of memory on a batch of {len(rows)} (nothing recorded as bad): lower --batch-size and rerun "
                    "(it resumes)")
            except Exception as err:
                die(f"the model failed on a batch, not an image's fault (nothing recorded as bad; a rerun resumes): "
                    f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            write(rows, texts)
            bar.update(len(rows))


def generation_meta(cfg):
    gen = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens, "do_sample": cfg.do_sample,
           "num_beams": 1}
    if cfg.do_sample:
        gen.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return gen


def append_lines(file, lines):
    """Write whole lines or none: a write the disk refuses (full, or past a file size limit) is cut back to where it
    began, so the file still ends with a whole record and a rerun resumes from it."""
    data, start = "".join(lines).encode("utf-8"), file.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[file.write(view):]
    except OSError as err:
        file.truncate(start)
        die(f"cannot write {file.name} ({err.strerror}): the disk is full or a file size limit was reached; free "
            "space and rerun the same command (it resumes after the last whole record)")


def open_outputs(out_path, errors_path, bad_indices):
    """Appenders for records and bad-image records, unbuffered: a SIGKILL loses at most the batch in flight."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_file, err_file = open(out_path, "ab", buffering=0), open(errors_path, "ab", buffering=0)
    counts = {"written": 0, "bad": 0, "items": set()}

    def write(records):
        append_lines(out_file, [json.dumps(r, ensure_ascii=False) + "\n" for r in records])
        counts["written"] += len(records)

    def bad(record):
        if record["index"] not in bad_indices:  # one line an image, though each of its prompts fails
            bad_indices.add(record["index"])
            append_lines(err_file, [json.dumps(record) + "\n"])
            counts["bad"] += 1
    return write, bad, counts, (out_file, err_file)


def image_placeholders(processor):
    """The spellings by which a processor marks where an image's tokens go (`<image>`, `<|image_pad|>`, ...)."""
    names = ("image_token", "fake_image_token", "global_image_token", "video_token")
    tokens = {getattr(processor, name, None) for name in names}
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokens |= {t for t in tokenizer.get_added_vocab() if t.startswith("<") and t.endswith(">") and "image" in t}
    return sorted(t for t in tokens if isinstance(t, str) and t.strip())


def check_prompt_placeholders(processor, prompts):
    """A prompt holding the image placeholder gives the model one image too many: a prompt error, refused before
    any image is blamed for it."""
    for prompt in prompts:
        for token in image_placeholders(processor):
            if token in prompt["text"]:
                die(f"prompt file {prompt['file']} holds {token!r}, this model's image placeholder: the processor "
                    "puts the image in itself; remove it from the prompt (nothing was captioned)")


def start_run(cfg, meta, match_keys, out_path, meta_path, prompts, with_image, given):
    """Lock the output, check the meta before any work, load the model, test it, write the meta: (model, processor,
    gen, dtype). `given` says what this process does, in the one line that also names device, dtype and quant."""
    writable_dir(out_path.parent)  # a bad --out fails now, not after the model is loaded
    lock_or_die(out_path.with_name(f".{out_path.name}.lock"), str(out_path))  # two runs would duplicate records
    extra = parse_processor_kwargs(cfg.processor_kwargs)
    device = pick_device(cfg.device)
    dtype, meta["dtype_chosen_by"] = resolve_dtype(cfg.dtype, device)
    quant, quant_why = resolve_quant(cfg.quant, device)
    say(f"{given}; {cfg.vlm} on {device}, dtype {dtype} ({meta['dtype_chosen_by']}), quant {quant} ({quant_why}), "
        f"batch size {cfg.batch_size} -> {out_path}")
    meta.update(quant=quant, dtype=dtype, prompts=[{k: v for k, v in p.items() if k != "file"} for p in prompts],
                generation=generation_meta(cfg), batch_size=cfg.batch_size)
    meta["processor"] = None  # known once the processor is loaded; checked again then
    check_meta(meta_path, meta, [k for k in match_keys if k != "processor"], out_path)
    model, processor, meta["revision"], tiny = load_vlm(cfg.vlm, meta["quant"], dtype, device, cfg.revision,
                                                        cfg.tiny_dir)
    meta["processor"] = processor_settings(processor, cfg.image_size, cfg.image_splitting, extra)
    check_meta(meta_path, meta, ("processor",), out_path)
    check_prompt_placeholders(processor, prompts)
    if meta_path.exists() and json.loads(meta_path.read_text()).get("revision") not in (None, meta["revision"]):
        check_meta(meta_path, meta, ("revision",), out_path)
    if tiny:
        say("WARNING: --vlm tiny is a RANDOM untrained model: its captions are noise and only prove the plumbing")
    gen = generation_config(model, processor, cfg.max_new_tokens, cfg.min_new_tokens, cfg.do_sample, cfg.temperature,
                            cfg.top_p)
    compute_dtype = getattr(torch, TORCH_DTYPES[dtype])
    if with_image:  # recorded, not matched: both paths give the same captions, so a resume may switch
        meta["prefix_cache"] = prefix_cache_path(model, cfg.prefix_cache)
    preflight(model, processor, meta["processor"], compute_dtype, gen, with_image, cfg.vlm,
              placeholder_ids(model) if meta.get("prefix_cache") else None)
    if not meta_path.exists():
        meta.update(model=cfg.vlm, tiny_random=tiny, made=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    versions=versions("torch", "transformers", "bitsandbytes", "accelerate", "tokenizers", "pillow"))
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_json(meta_path, meta)
        except OSError as err:
            die(f"cannot write {meta_path} ({err.strerror}): free space on its disk and rerun")
    torch.manual_seed(cfg.seed)
    return model, processor, gen, compute_dtype


# --- the two modes
def describe_classes(cfg):
    """Class mode: one description per class name, text only; rank 0 does them all (a handful of classes)."""
    if not is_main_process():
        return
    out_path, meta_path, errors_path = artifact_paths(cfg.out or "runs/class_descriptions.jsonl")
    names = read_classes(cfg.classes)
    prompt_file = cfg.class_prompt or str(find_prompts_dir(cfg.prompts.split(",")[0]) / f"{CLASS_PROMPT}.txt")
    if not Path(prompt_file).is_file():
        die(f"class prompt {prompt_file} not found: pass --class-prompt FILE (may use {{name}})")
    prompt = prompt_record(prompt_file)
    meta = {"model": cfg.vlm, "classes": cfg.classes, "classes_sha256": sha256_file(cfg.classes),
            "num_classes": len(names)}
    keys = ("model", "quant", "dtype", "prompts", "generation", "processor", "classes_sha256")
    model, processor, gen, compute_dtype = start_run(cfg, meta, keys, out_path, meta_path, [prompt], False,
                                                     f"describing the {len(names)} classes of {cfg.classes}")
    done = done_bitmap(out_path, len(names), lambda r: r["class"], ("class", "text"))
    todo = [c for c in range(len(names)) if not done[c]]
    rows = [((c, prompt["id"]), prompt["text"].replace("{name}", names[c]), None) for c in todo]
    batches = (rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size))
    write, bad, counts, files = open_outputs(out_path, errors_path, set())
    with files[0], files[1]:
        run_batches(model, processor, gen, batches, meta["processor"], compute_dtype,
                    lambda rows, texts: write([{"class": k[0], "name": names[k[0]], "text": t}
                                               for (k, _, _), t in zip(rows, texts)]),
                    bad, "describing classes", len(todo))
    say(f"{counts['written']} of {len(todo)} descriptions written to {out_path} ({sum(done)} done before)")


def name_hints(cfg, items, prompts, meta):
    """Class names for {name} in prompts with --name-hint, else None (and no prompt may use {name})."""
    if not cfg.name_hint:
        for p in prompts:
            if "{name}" in p["text"]:
                die(f"prompt {p['id']} uses {{name}}: pass --name-hint (class names from --classes) or remove it")
        return None
    classes = cfg.classes or str(Path(cfg.split).parent / "classes.txt")
    names = read_classes(classes)
    meta["classes_sha256"] = sha256_file(classes)
    read_split(cfg.split, len(names))  # labels beyond the classes are refused with file:line
    return names


def image_jobs(items, prompts, done, bad_indices, indices, names):
    """(index, relpath, [(prompt id, text)] still to do) per image of this run, lazily."""
    for i in indices:
        todo = [(p["id"], p["text"].replace("{name}", names[items[i][1]]) if names else p["text"])
                for k, p in enumerate(prompts) if not done[i * len(prompts) + k]]
        if todo and i not in bad_indices:
            yield i, items[i][0], todo


def check_root(root, items, indices, split):
    """The folder the split's paths are relative to, checked before any work: under a wrong root every image would
    be recorded as unreadable. Some images of the split missing is theirs to record; all of a first sample is the
    root's."""
    how = "pass --root, the folder the split's paths are relative to (default: the split file's folder)"
    if not root.is_dir():
        die(f"data root {root} is {'a file, not a folder' if root.exists() else 'not found'}: {how}")
    sample = [items[i][0] for i in indices[:64]]
    for rel in sample:
        try:
            os.stat(root / rel)
            return
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as err:  # a folder on the way cannot be searched: its permissions, not the image
            die(f"cannot look into {root / rel} ({err.strerror}): make the data folder readable and rerun")
    if sample:
        die(f"none of the first {len(sample)} images of {split} is under {root} (e.g. {root / sample[0]} is not "
            f"there): wrong data root? {how}; nothing was recorded")


def caption_images(cfg):
    """Image mode: every (image, prompt) of this shard not yet written, whole images a batch."""
    items = read_split(cfg.split)
    root = Path(cfg.root) if cfg.root else Path(cfg.split).parent
    prompts = load_prompts(cfg.prompts.split(","))
    rank, world = parse_shard(cfg.shard)
    shard = (rank, world) if world > 1 else None
    global VERBOSE
    VERBOSE = shard is None or rank == 0 or bool(cfg.shard)  # hand-started shards are separate jobs: all report
    out_path, meta_path, errors_path = artifact_paths(cfg.out or "runs/captions.jsonl", shard)
    meta = {"model": cfg.vlm, "split": cfg.split, "split_sha256": sha256_file(cfg.split), "root": str(root),
            "num_images": len(items), "name_hint": cfg.name_hint, "shard": list(shard) if shard else None}
    names = name_hints(cfg, items, prompts, meta)
    indices = [i for i in range(min(cfg.limit or len(items), len(items))) if shard is None or i % world == rank]
    check_root(root, items, indices, cfg.split)
    given = f"captioning {len(indices)} images x {len(prompts)} prompts of {cfg.split}, {launch_text(shard, cfg.shard)}"
    model, processor, gen, compute_dtype = start_run(cfg, meta, MATCH_KEYS, out_path, meta_path, prompts, True, given)
    share_vision_work(model)
    placeholders = placeholder_ids(model) if meta["prefix_cache"] else None
    order = {p["id"]: k for k, p in enumerate(prompts)}
    done = done_bitmap(out_path, len(items) * len(prompts),
                       lambda r: r["index"] * len(prompts) + order[r["prompt"]] if r["prompt"] in order else None,
                       ("index", "prompt", "text"))
    bad_indices = {checked_record(errors_path, n, r, "index")["index"]
                   for n, r in scan_jsonl(errors_path, repair=True)}
    if cfg.retry_bad and bad_indices:
        say(f"--retry-bad: trying the {len(bad_indices)} images of {errors_path.name} again")
        tmp = errors_path.with_name(f".{errors_path.name}.{os.getpid()}.tmp")
        tmp.write_text("")
        os.replace(tmp, errors_path)  # emptied at once; whatever fails again is written again
        bad_indices = set()
    skipped = sum(i in bad_indices for i in indices)
    if skipped:
        say(f"skipping the {skipped} images recorded as unreadable in {errors_path} (--retry-bad tries them again)")
    total = sum(len(todo) for _, _, todo in image_jobs(items, prompts, done, bad_indices, indices, names))
    jobs = image_jobs(items, prompts, done, bad_indices, indices, names)
    write, bad, counts, files = open_outputs(out_path, errors_path, bad_indices)
    start = time.time()
    with files[0], files[1]:
        decoded = decoded_images(jobs, root, cfg.workers)
        run_batches(model, processor, gen, image_batches(decoded, cfg.batch_size, bad), meta["processor"],
                    compute_dtype, lambda rows, out: write([{"index": k[0], "prompt": k[1], "text": t, "path": k[2]}
                                                            for (k, _, _), t in zip(rows, out)]),
                    bad, "captioning" if VERBOSE else "", total, placeholders)
    seconds = max(time.time() - start, 1e-9)
    done_here = sum(done[i * len(prompts) + k] for i in indices for k in range(len(prompts)))
    say(f"{counts['written']} of {total} captions written to {out_path} ({counts['written'] / seconds:.2f} captions/s,"
        f" {sum(done)} done before), {counts['bad']} bad images" + (f" (see {errors_path})" if counts["bad"] else "")
        + (f"; {skipped} unreadable images skipped (--retry-bad tries them again)" if skipped else "")
        + ("; nothing was left to do" if indices and not total else ""))
    if indices and not counts["written"] and not done_here:  # an empty output is no success, however it came about
        die(f"none of the {len(indices)} images of this run could be captioned: all are unreadable (listed in "
            f"{errors_path}); fix them and rerun with --retry-bad")


# --- merge
def shard_runs(path, sort_key):
    """(first offset, first line) of each stretch of a shard file already in caption order: one for a run never
    restarted, one more per resume that filled in earlier images; and the number of records. Every record is
    checked here, so the merge that reads them again meets none it cannot sort."""
    runs, previous, offset, count = [], None, 0, 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8 (a kill cut a character in two)
                    die(f"{path}:{n}: not valid JSON; rerun that shard with the same command (it repairs the file)")
                key = sort_key(checked_record(path, n, record, "index", "prompt", "text"))
                if previous is None or key < previous:
                    runs.append((offset, n))
                previous, count = key, count + 1
            offset += len(line)
    return [(start, n, runs[k + 1][0] if k + 1 < len(runs) else offset) for k, (start, n) in enumerate(runs)], count


def read_run(path, start, first_line, end, sort_key):
    """(key, file, line, raw line, record) of one sorted stretch of a shard file, streamed."""
    with open(path, "rb") as f:
        f.seek(start)
        n = first_line
        while f.tell() < end and (line := f.readline()):
            if line.strip():
                record = json.loads(line)
                yield sort_key(record), str(path), n, line if line.endswith(b"\n") else line + b"\n", record
            n += 1


def merge(out):
    """Join captions.shard-i-of-n.jsonl files into --out in (index, prompt order), by a k-way merge of their sorted
    stretches: memory does not grow with the records. Reports gaps, and duplicates that disagree."""
    out_path, meta_path, errors_path = artifact_paths(out)
    pattern = re.compile(re.escape(out_path.name[: -len(".jsonl")]) + r"\.shard-(\d+)-of-(\d+)\.jsonl$")
    shards = sorted((int(m.group(1)), int(m.group(2)), p) for p in out_path.parent.glob("*.jsonl")
                    if (m := pattern.match(p.name)))
    if not shards:
        die(f"no shard files {out_path.stem}.shard-I-of-N.jsonl next to {out_path}: run caption.py --shard i/n first")
    if len({n for _, n, _ in shards}) != 1:
        die(f"shard files of different counts ({sorted({n for _, n, _ in shards})}) next to {out_path}: "
            "delete the stale ones")
    world, metas, bad = shards[0][1], [], {}
    lock_or_die(out_path.with_name(f".{out_path.name}.lock"), str(out_path))  # one merge (or run) into --out at once
    for rank, _, path in shards:
        lock_or_die(path.with_name(f".{path.name}.lock"), str(path))  # a shard still captioning is not merged
        _, shard_meta, shard_errors = artifact_paths(out_path, (rank, world))
        if not shard_meta.exists():
            die(f"{path} has no {shard_meta.name}")
        metas.append((shard_meta, json.loads(shard_meta.read_text())))
        for n, r in scan_jsonl(shard_errors):
            bad.setdefault(checked_record(shard_errors, n, r, "index")["index"], r)  # a few bad images
    (first_path, meta), num_prompts = metas[0], len(metas[0][1]["prompts"])
    for path, other in metas[1:]:
        for key in MATCH_KEYS + ("revision", "num_images"):
            if other.get(key) != meta.get(key):
                die(f"{path.name} and {first_path.name} differ in `{key}`: the shards were made with other settings")
    order = {p["id"]: k for k, p in enumerate(meta["prompts"])}

    def sort_key(record):
        return record["index"], order.get(record["prompt"], num_prompts)
    streams, total = [], 0
    for _, _, path in shards:
        runs, count = shard_runs(path, sort_key)
        streams, total = streams + [read_run(path, *run, sort_key) for run in runs], total + count
    seen, written, clashes, previous = bytearray(meta["num_images"] * num_prompts), 0, [], None
    # Temporary names of this process: two merges never share one, and a failed one leaves nothing half-written.
    tmp, errors_tmp = (p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in (out_path, errors_path))
    try:
        with open(tmp, "wb") as f:
            merged = heapq.merge(*streams, key=lambda item: item[0])
            for key, path, n, line, record in progress_bar(total, "caption", desc="merging", iterable=merged):
                if previous is not None and key == previous[0]:
                    if record["text"] != previous[1]:
                        clashes.append(f"{path}:{n}")
                    continue
                f.write(line)
                previous, written = (key, record["text"]), written + 1
                if key[1] < num_prompts and key[0] < meta["num_images"]:
                    seen[key[0] * num_prompts + key[1]] = 1
        with open(errors_tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(bad[index]) + "\n" for index in sorted(bad))
        os.replace(tmp, out_path)
        os.replace(errors_tmp, errors_path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        errors_tmp.unlink(missing_ok=True)
        die(f"merging into {out_path} failed ({err.strerror}: {err.filename}): free space on its disk and rerun the "
            "merge")
    write_json(meta_path, {**meta, "shard": None, "merged_from": [p.name for _, _, p in shards]})
    if clashes:
        warn(f"{len(clashes)} duplicate (image, prompt) records with another text than the first, e.g. {clashes[0]}: "
             "the first was kept")
    missing = [(k // num_prompts, meta["prompts"][k % num_prompts]["id"]) for k in range(len(seen))
               if not seen[k] and k // num_prompts not in bad]
    absent = sorted(set(range(world)) - {r for r, _, _ in shards})
    summary = (f"merged {len(shards)} of {world} shards into {out_path}: {written} captions, "
               f"{meta['num_images']} images x {num_prompts} prompts, {len(bad)} bad images")
    if missing or absent:
        die(summary + f"; GAPS: {len(missing)} (image, prompt) pairs missing, first {missing[:3]}"
            + (f", shards {absent} absent" if absent else "") + ": rerun the shards with the same command to fill them")
    print(f"caption.py: {summary}; no gaps", flush=True)


def check_config(cfg):
    """Numbers that would fail late (an IndexError after a batch), or silently do nothing, refused before the model
    loads."""
    checks = [(cfg.limit >= 0, "--limit", "0 (all) or a count of images"),
              (cfg.batch_size >= 1, "--batch-size", "at least 1"),
              (cfg.max_new_tokens >= 1, "--max-new-tokens", "at least 1"),
              (0 <= cfg.min_new_tokens <= cfg.max_new_tokens, "--min-new-tokens", "0 to --max-new-tokens"),
              (0 <= cfg.workers <= 256, "--workers", "0 to 256 threads"),
              (cfg.temperature > 0, "--temperature", "above 0"),
              (0 < cfg.top_p <= 1, "--top-p", "in (0, 1]"),
              (cfg.image_size >= 0, "--image-size", "0 (the processor's own) or a size in pixels")]
    for ok, flag, allowed in checks:
        if not ok:
            value = getattr(cfg, flag[2:].replace("-", "_"))
            die(f"{flag} {value}: expected {allowed}")


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
        die("pass --split DATA/train.txt (images to caption) or --classes DATA/classes.txt (class descriptions)")
    finally:  # main() run again in one process (tests, a notebook) must not meet this run's locks
        while len(LOCKS) > held:
            LOCKS.pop().close()


# --- shared helpers: byte-identical copies of tests/shared_helpers.py (tests/test_shared.py, --sync)

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


def warn(msg):
    print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


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


def progress_bar(total, unit, initial=0, desc="", disable=False, iterable=None):
    """A tqdm bar with rate and ETA on a terminal; elsewhere a line every 30 s, so a job log shows progress too.
    Rank 0 alone draws it."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=tty,
                disable=disable or not is_main_process(), mininterval=0.1 if tty else 30,
                maxinterval=10 if tty else 30,  # tqdm's monitor would otherwise force a line every 10 s
                file=sys.stderr if tty else LineProgress(sys.stderr))


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
