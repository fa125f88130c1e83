"""Caption every image of a split with a VLM, once per prompt (stage 1 of vlmkd).

    python caption.py --split data/x/train.txt --vlm llava-hf/llava-v1.6-mistral-7b-hf --prompts prompts/ --out runs/x/captions.jsonl
    python caption.py --split data/x/train.txt --vlm /models/Qwen2-VL-2B-Instruct --quant none --batch-size 32 --out runs/x/captions.jsonl
    python caption.py --split data/x/train.txt --vlm tiny --max-new-tokens 16 --out runs/demo/captions.jsonl   # random stand-in
    python caption.py --split data/x/train.txt --shard 0/4 --out runs/x/captions.jsonl        # one of 4 machines
    torchrun --nproc_per_node 8 caption.py --split data/x/train.txt --out runs/x/captions.jsonl  # shards by rank
    python caption.py --merge --out runs/x/captions.jsonl                                     # join shards, report gaps
    python caption.py --classes data/x/classes.txt --out runs/x/class_descriptions.jsonl      # one sentence a class

Writes `captions.jsonl` (`{"index", "prompt", "text", "path"}` per image x prompt, appended and flushed
as it goes), `captions.meta.json` (model, revision, quantisation, prompts, generation settings,
versions) and `captions.errors.jsonl` (images that could not be read). A killed run restarted with
the same command skips what is done; a run with another model, prompts or settings refuses to append.
Batched greedy captions equal one-at-a-time ones (left padding); exactly so in float32, while in bf16 a
caption may part ways where two tokens tie within bf16 rounding, as on any batch-size change.
"""
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, HfArgumentParser

CLASS_PROMPT = "class_description"  # the file stem of the class-description prompt, never an image prompt
TINY_VERSION = 1  # bump when build_tiny_llava changes, so cached tiny models are rebuilt
MATCH_KEYS = ("model", "quant", "dtype", "prompts", "generation", "split_sha256", "name_hint", "classes_sha256")


@dataclass
class Config:
    split: str = field(default="", metadata={"help": "split file, `relative/path label` per line"})
    root: str = field(default="", metadata={"help": "folder the split's paths are relative to (default: the split file's folder)"})
    vlm: str = field(default="llava-hf/llava-v1.6-mistral-7b-hf",
                     metadata={"help": "hub id or local folder of an image-text-to-text model; `tiny` builds a random stand-in"})
    revision: str = field(default="", metadata={"help": "hub revision (branch, tag or commit) of --vlm"})
    prompts: list[str] = field(default_factory=lambda: ["prompts"],
                               metadata={"help": "a folder of *.txt prompts or a list of prompt files; id = file stem"})
    out: str = field(default="", metadata={"help": "output .jsonl (default runs/captions.jsonl, or runs/class_descriptions.jsonl with --classes)"})
    quant: str = field(default="4bit", metadata={"help": "4bit (NF4, double quant), 8bit or none; without CUDA an unset --quant means none"})
    dtype: str = field(default="bfloat16", metadata={"help": "compute dtype: bfloat16, float16 or float32"})
    batch_size: int = field(default=8, metadata={"help": "(image, prompt) pairs per generate call"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest caption in tokens"})
    min_new_tokens: int = field(default=0, metadata={"help": "shortest caption in tokens (benchmarks set it to max)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=0.7, metadata={"help": "with --do-sample"})
    top_p: float = field(default=0.9, metadata={"help": "with --do-sample"})
    seed: int = 0
    workers: int = field(default=4, metadata={"help": "threads decoding images ahead of the model"})
    limit: int = field(default=0, metadata={"help": "caption only the first N images (0 = all); a later run without it continues"})
    shard: str = field(default="", metadata={"help": "i/n: caption images with index %% n == i (default: RANK/WORLD_SIZE of torchrun)"})
    merge: bool = field(default=False, metadata={"help": "join the shard files of --out into --out and report gaps"})
    classes: str = field(default="", metadata={"help": "classes.txt; without --split: describe each class (text only)"})
    class_prompt: str = field(default="", metadata={"help": "class mode prompt file (default: class_description.txt among --prompts)"})
    name_hint: bool = field(default=False, metadata={"help": "fill {name} in image prompts with the image's class name"})
    device: str = field(default="auto", metadata={"help": "auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:0, ..."})
    tiny_dir: str = field(default="~/.cache/vlmkd/tiny-llava", metadata={"help": "where --vlm tiny is built and cached"})


VERBOSE = True  # only rank 0 of a torchrun / accelerate launch prints


def die(msg):
    sys.exit(f"caption.py: error: {msg}")


def say(msg):
    if VERBOSE:
        print(f"caption.py: {msg}", flush=True)


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- inputs
def read_split(split, root):
    path = Path(split)
    if not path.is_file():
        die(f"split file {split} not found: pass --split DATA/train.txt (made by prepare.py)")
    data = path.read_bytes()
    items = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            die(f"{split}:{n}: expected `relative/path label`, got {line!r}")
        items.append((parts[0], int(parts[1])))
    if not items:
        die(f"split file {split} is empty")
    return items, sha256_bytes(data), Path(root) if root else path.parent


def read_classes(path):
    if not Path(path).is_file():
        die(f"classes file {path} not found: pass --classes DATA/classes.txt (one class name a line)")
    data = Path(path).read_bytes()
    names = [line.strip() for line in data.decode("utf-8").splitlines()]
    for n, name in enumerate(names, 1):
        if not name:
            die(f"{path}:{n}: empty class name")
    return names, sha256_bytes(data)


def prompt_record(path):
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        die(f"prompt file {path} is empty")
    return {"id": Path(path).stem, "text": text, "sha256": sha256_bytes(text.encode())}


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
        die(f"no prompt files (*.txt, other than {CLASS_PROMPT}.txt) in {' '.join(sources)}: pass --prompts FOLDER or files")
    prompts = sorted((prompt_record(p) for p in files), key=lambda p: (p["id"] != "general", p["id"]))
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        die(f"two prompt files share an id (file stem): {sorted(ids)}")
    return prompts


# ----------------------------------------------------------------------------------------------- outputs
def artifact_paths(out, shard=None):
    """(records, meta, errors) paths; a shard (i, n) gets `captions.shard-i-of-n.*` next to --out."""
    out = Path(out)
    if out.suffix != ".jsonl":
        die(f"--out {out} must end with .jsonl")
    stem = out.name[: -len(".jsonl")] + (f".shard-{shard[0]}-of-{shard[1]}" if shard else "")
    return out.with_name(stem + ".jsonl"), out.with_name(stem + ".meta.json"), out.with_name(stem + ".errors.jsonl")


def read_jsonl(path, repair=False):
    """Records of a jsonl file. A broken last line (a run killed mid-write) is dropped, and with repair
    cut from the file so that appending goes on cleanly; a broken line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, start, lines = [], 0, data.split(b"\n")
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if any(rest.strip() for rest in lines[n:]):
                    die(f"{path}:{n}: not valid JSON; fix or delete that line, then rerun")
                say(f"dropping a truncated last line of {path} (a killed run); it will be redone")
                break
        start += len(line) + 1
    if repair and (start < len(data) or not data.endswith(b"\n")) and data:
        with open(path, "r+b") as f:
            f.truncate(min(start, len(data)))
            if start > len(data) and not data.endswith(b"\n"):  # a whole last record without its newline
                f.seek(0, 2)
                f.write(b"\n")
    return records


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


def write_json(path, obj):
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def versions():
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {**{name: installed(name) for name in ("torch", "transformers", "bitsandbytes", "accelerate", "tokenizers", "pillow")},
            "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------------------------- model
def build_tiny_llava(folder):
    """A tiny random LLaVA (CLIP vision tower + Llama), saved like a hub model so it loads through the
    same from_pretrained code. Linear sizes are multiples of 64 so bitsandbytes 4-bit runs on CPU."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)
    folder = Path(folder).expanduser()
    marker = folder / "vlmkd_tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == TINY_VERSION:
        return folder
    words = ("a an the photo image picture of object shirt dress coat bag shoe sneaker boot sandal trouser pullover top with "
             "long short sleeves round neck strap heel sole black white grey red blue dark light pale striped plain soft "
             "cotton leather wool smooth rough shape outline parts colour texture pattern background setting worn used "
             "describe detail what where how is it on in and or from other similar kinds tell apart material made").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    # Metaspace BPE, not byte-level: every id decodes to readable text, so random captions are words.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!-'()/{}\n"))
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=special, initial_alphabet=alphabet))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=tokenizer.pad_token_id)
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
                "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                "{% endif %}{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    torch.manual_seed(0)  # the same tiny model everywhere, so test runs compare
    model = LlavaForConditionalGeneration(config)
    # Build aside and rename: concurrent runs never see a half-written folder.
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "vlmkd_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "note": "random weights, for tests only"}))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not (marker.exists() and json.loads(marker.read_text()).get("version") == TINY_VERSION):
        shutil.rmtree(folder, ignore_errors=True)  # an older or half-deleted build
    try:
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy first: same seed, same model
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_quant(cfg, argv, device):
    explicit = any(a == "--quant" or a.startswith("--quant=") for a in argv)
    if cfg.quant not in ("4bit", "8bit", "none"):
        die(f"--quant {cfg.quant}: expected 4bit, 8bit or none")
    if not explicit and not str(device).startswith("cuda") and cfg.quant != "none":
        say("no CUDA device, so --quant none (bf16 is ~10x faster than bitsandbytes 4-bit on a CPU); pass --quant 4bit to force it")
        return "none"
    return cfg.quant


def resolve_device(cfg):
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def load_vlm(vlm, quant="4bit", dtype="bfloat16", device="cpu", revision="", tiny_dir="~/.cache/vlmkd/tiny-llava"):
    """(model, processor, resolved revision or None, tiny) through AutoProcessor + AutoModelForImageTextToText."""
    tiny = vlm == "tiny"
    if vlm.startswith(("/", "./", "../", "~")) and not Path(vlm).expanduser().is_dir():
        die(f"VLM folder {vlm} not found: pass --vlm with a folder holding config.json, or a hub id")
    source = str(build_tiny_llava(tiny_dir)) if tiny else vlm
    compute_dtype = getattr(torch, dtype)
    kwargs = {"dtype": compute_dtype, "device_map": {"": str(device)}}
    if revision:
        kwargs["revision"] = revision
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    try:
        processor = AutoProcessor.from_pretrained(source, **({"revision": revision} if revision else {}))
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).eval()
    except ValueError as err:  # found, but not something AutoModelForImageTextToText knows
        die(f"cannot load VLM {vlm!r} as an image-text-to-text model: {str(err).splitlines()[0][:200]}")
    except OSError as err:
        from huggingface_hub.constants import is_offline_mode
        if Path(source).is_dir():
            die(f"cannot load VLM from folder {source}: {str(err).splitlines()[0][:200]}")
        why = "offline and not in the cache" if is_offline_mode() else f"hub: {str(err).splitlines()[0][:160]}"
        die(f"cannot load VLM {vlm!r} ({why}): pass --vlm /local/dir with a downloaded copy, or --vlm tiny for a random stand-in")
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


def generation_config(model, processor, max_new_tokens, min_new_tokens=0, do_sample=False, temperature=0.7, top_p=0.9):
    gen = copy.deepcopy(model.generation_config)
    gen.max_new_tokens, gen.min_new_tokens, gen.do_sample, gen.num_beams = max_new_tokens, min_new_tokens, do_sample, 1
    gen.temperature, gen.top_p, gen.top_k = (temperature, top_p, None) if do_sample else (None, None, None)
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.pad_token_id
    return gen


def conversation(text, image=None):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def prepare_inputs(processor, conversations, compute_dtype):
    """Tokenise a batch through the model's own chat template, left-padded; float tensors in compute_dtype."""
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"})
    return {k: (v.to(compute_dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}


@torch.inference_mode()
def generate_ids(model, inputs, gen):
    """New token ids per row, [B, T] (pads after an early end)."""
    inputs = {k: v.to(model.device, non_blocking=True) for k, v in inputs.items()}
    out = model.generate(**inputs, generation_config=gen)
    return out[:, inputs["input_ids"].shape[1]:].cpu()


def decode(processor, new_ids):
    return [t.strip() for t in processor.batch_decode(new_ids, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------- loop
def load_image(path):
    try:
        with Image.open(path) as img:
            return img.convert("RGB"), None  # convert() decodes the whole file: truncation shows here
    except Exception as err:  # any decoder failure is a bad image, recorded and skipped
        return None, f"{type(err).__name__}: {err}"


def decoded_images(jobs, root, workers):
    """(index, relpath, image, error) in order, decoded `workers` threads ahead of the caller."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending, jobs = deque(), iter(jobs)
        for _ in range(4 * max(1, workers)):
            job = next(jobs, None)
            if job is not None:
                pending.append((job, pool.submit(load_image, root / job[1])))
        while pending:
            (index, rel, todo), fut = pending.popleft()
            job = next(jobs, None)
            if job is not None:
                pending.append((job, pool.submit(load_image, root / job[1])))
            yield index, rel, todo, *fut.result()


def run_batches(model, processor, gen, work, batch_size, write, compute_dtype, desc, total=None):
    """Generate for `work` (an iterator of (key, conversation) or ("error", record)), the next batch prepared
    on a thread while the model runs on this one. write(keys, texts) or write(None, error_record)."""
    errors = []

    def next_batch():
        keys, convs = [], []
        for key, item in work:
            if key == "error":
                errors.append(item)
                continue
            keys.append(key)
            convs.append(item)
            if len(keys) == batch_size:
                break
        if not keys:
            return None
        try:
            return keys, prepare_inputs(processor, convs, compute_dtype)
        except Exception:  # an image the processor rejects (Qwen2-VL: aspect ratio > 200): find it, record it, go on
            good, bad = [], []
            for key, conv in zip(keys, convs):
                try:
                    prepare_inputs(processor, [conv], compute_dtype)
                    good.append((key, conv))
                except Exception as err:
                    bad.append({"index": key[0], "path": key[-1], "error": f"processor: {type(err).__name__}: {err}"})
            if len(keys[0]) < 3 or (not good and len(keys) > 1):  # text only, or all of them: not an image's fault
                raise
            errors.extend(bad)
            return ([k for k, _ in good], prepare_inputs(processor, [c for _, c in good], compute_dtype)) if good else next_batch()

    with ThreadPoolExecutor(1) as prep, tqdm(total=total, desc=desc, unit="caption", dynamic_ncols=True, disable=not desc) as bar:
        future = prep.submit(next_batch)
        while (batch := future.result()) is not None:
            future = prep.submit(next_batch)
            keys, inputs = batch
            texts = decode(processor, generate_ids(model, inputs, gen))
            while errors:
                write(None, errors.pop(0))
            write(keys, texts)
            bar.update(len(keys))
        while errors:
            write(None, errors.pop(0))


def parse_shard(cfg):
    if cfg.shard:
        m = re.fullmatch(r"(\d+)/(\d+)", cfg.shard)
        if not m or int(m.group(1)) >= int(m.group(2)):
            die(f"--shard {cfg.shard}: expected i/n with 0 <= i < n, e.g. 0/4")
        rank, world = int(m.group(1)), int(m.group(2))
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (rank, world) if world > 1 else None


def generation_meta(cfg):
    gen = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens, "do_sample": cfg.do_sample, "num_beams": 1}
    if cfg.do_sample:
        gen.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return gen


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    (cfg,) = HfArgumentParser(Config).parse_args_into_dataclasses(args=argv)
    if cfg.merge:
        return merge(cfg.out or "runs/captions.jsonl")
    class_mode = bool(cfg.classes) and not cfg.split
    if not cfg.split and not class_mode:
        die("pass --split DATA/train.txt (images to caption) or --classes DATA/classes.txt (class descriptions)")
    shard = None if class_mode else parse_shard(cfg)
    if class_mode and int(os.environ.get("RANK", 0)) > 0:
        return  # a handful of classes: rank 0 does them all
    global VERBOSE
    # Shards started by hand (--shard) are separate jobs and all report; launcher ranks > 0 stay quiet.
    rank0 = VERBOSE = shard is None or shard[0] == 0 or bool(cfg.shard)
    out_default = "runs/class_descriptions.jsonl" if class_mode else "runs/captions.jsonl"
    out_path, meta_path, errors_path = artifact_paths(cfg.out or out_default, shard)
    device = resolve_device(cfg)
    if cfg.dtype not in ("bfloat16", "float16", "float32"):
        die(f"--dtype {cfg.dtype}: expected bfloat16, float16 or float32")
    compute_dtype = getattr(torch, cfg.dtype)

    meta = {"model": cfg.vlm, "revision": None, "quant": None, "dtype": cfg.dtype, "prompts": None,
            "generation": generation_meta(cfg), "batch_size": cfg.batch_size}
    if class_mode:
        names, meta["classes_sha256"] = read_classes(cfg.classes)
        prompt_file = cfg.class_prompt or str(find_prompts_dir(cfg.prompts[0]) / f"{CLASS_PROMPT}.txt")
        if not Path(prompt_file).is_file():
            die(f"class prompt {prompt_file} not found: pass --class-prompt FILE (may use {{name}})")
        prompts = [prompt_record(prompt_file)]
        meta.update(classes=cfg.classes, num_classes=len(names))
        keys = ("model", "quant", "dtype", "prompts", "generation", "classes_sha256")
    else:
        items, meta["split_sha256"], root = read_split(cfg.split, cfg.root)
        prompts = load_prompts(cfg.prompts)
        names = None
        if cfg.name_hint:
            classes = cfg.classes or str(Path(cfg.split).parent / "classes.txt")
            names, meta["classes_sha256"] = read_classes(classes)
            for n, (_, label) in enumerate(items, 1):
                if not 0 <= label < len(names):
                    die(f"{cfg.split}:{n}: label {label} is not a line of {classes} ({len(names)} classes)")
        else:
            for p in prompts:
                if "{name}" in p["text"]:
                    die(f"prompt {p['id']} uses {{name}}: pass --name-hint (class names from --classes) or remove it")
        meta.update(split=cfg.split, root=str(root), num_images=len(items), name_hint=cfg.name_hint, shard=list(shard) if shard else None)
        keys = MATCH_KEYS
    meta["prompts"] = prompts
    meta["quant"] = resolve_quant(cfg, argv, device)
    check_meta(meta_path, meta, keys, out_path)

    done = {(r["class"], prompts[0]["id"]) if class_mode else (r["index"], r["prompt"]) for r in read_jsonl(out_path, repair=True)}
    bad = {r["index"] for r in read_jsonl(errors_path, repair=True)}
    model, processor, meta["revision"], tiny = load_vlm(cfg.vlm, meta["quant"], cfg.dtype, device, cfg.revision, cfg.tiny_dir)
    if meta_path.exists() and json.loads(meta_path.read_text()).get("revision") not in (None, meta["revision"]):
        check_meta(meta_path, meta, ("revision",), out_path)
    if tiny:
        say("WARNING: --vlm tiny is a RANDOM untrained model: its captions are noise and only prove the plumbing")
    if not meta_path.exists():
        meta.update(tiny_random=tiny, versions=versions(), made=time.strftime("%Y-%m-%dT%H:%M:%S"))
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(meta_path, meta)
    gen = generation_config(model, processor, cfg.max_new_tokens, cfg.min_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p)
    torch.manual_seed(cfg.seed)

    counts = {"written": 0, "bad": set(), "images": set()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as out_file, open(errors_path, "a", encoding="utf-8") as err_file:
        def write(keys, texts):
            if keys is None:
                if texts["index"] not in counts["bad"]:  # one line an image, though each of its prompts fails
                    err_file.write(json.dumps(texts) + "\n")
                    err_file.flush()
                    counts["bad"].add(texts["index"])
                return
            for key, text in zip(keys, texts):
                record = ({"class": key[0], "name": names[key[0]], "text": text} if class_mode else
                          {"index": key[0], "prompt": key[1], "text": text, "path": key[2]})
                out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["images"].add(key[0])
            out_file.flush()  # a SIGKILL loses at most the batch in flight
            counts["written"] += len(keys)

        if class_mode:
            todo = [c for c in range(len(names)) if (c, prompts[0]["id"]) not in done]
            work = (((c, prompts[0]["id"]), conversation(prompts[0]["text"].replace("{name}", names[c]))) for c in todo)
            total = len(todo)
        else:
            indices = range(len(items) if cfg.limit <= 0 else min(cfg.limit, len(items)))
            jobs = [(i, items[i][0], [p for p in prompts if (i, p["id"]) not in done]) for i in indices
                    if (shard is None or i % shard[1] == shard[0]) and i not in bad]
            jobs = [job for job in jobs if job[2]]
            total = sum(len(job[2]) for job in jobs)

            def image_work():
                for index, rel, todo_prompts, image, error in decoded_images(jobs, root, cfg.workers):
                    if error is not None:
                        yield "error", {"index": index, "path": rel, "error": error}
                        continue
                    for p in todo_prompts:
                        text = p["text"].replace("{name}", names[items[index][1]]) if cfg.name_hint else p["text"]
                        yield (index, p["id"], rel), conversation(text, image)
            work = image_work()
        start = time.time()
        desc = ("describing classes" if class_mode else "captioning") if rank0 else ""
        run_batches(model, processor, gen, work, cfg.batch_size, write, compute_dtype, desc, total)
    seconds = max(time.time() - start, 1e-9)
    what = "classes" if class_mode else "images"
    say(f"{counts['written']} of {total} {'descriptions' if class_mode else 'captions'} written to {out_path} "
        f"({len(counts['images'])} {what}, {len(counts['images']) / seconds:.2f} {what}/s, {len(done)} done before), "
        f"{len(counts['bad'])} bad images" + (f" (see {errors_path})" if counts["bad"] else ""))


def merge(out):
    """Join captions.shard-i-of-n.jsonl files into --out, sorted by (index, prompt order), and report gaps."""
    out_path, meta_path, errors_path = artifact_paths(out)
    pattern = re.compile(re.escape(out_path.name[: -len(".jsonl")]) + r"\.shard-(\d+)-of-(\d+)\.jsonl$")
    shards = sorted((int(m.group(1)), int(m.group(2)), p) for p in out_path.parent.glob("*.jsonl") if (m := pattern.match(p.name)))
    if not shards:
        die(f"no shard files {out_path.stem}.shard-I-of-N.jsonl next to {out_path}: run caption.py --shard i/n first")
    world = {n for _, n, _ in shards}
    if len(world) != 1:
        die(f"shard files of different counts ({sorted(world)}) next to {out_path}: delete the stale ones")
    world = world.pop()
    metas, records, bad = [], {}, {}
    for rank, _, path in shards:
        _, shard_meta, shard_errors = artifact_paths(out_path, (rank, world))
        if not shard_meta.exists():
            die(f"{path} has no {shard_meta.name}")
        metas.append((shard_meta, json.loads(shard_meta.read_text())))
        for r in read_jsonl(path):
            records.setdefault((r["index"], r["prompt"]), r)
        for r in read_jsonl(shard_errors):
            bad.setdefault(r["index"], r)
    first_path, meta = metas[0]
    for path, other in metas[1:]:
        for key in MATCH_KEYS + ("revision", "num_images"):
            if other.get(key) != meta.get(key):
                die(f"{path.name} and {first_path.name} differ in `{key}`: the shards were made with other settings")
    order = {p["id"]: k for k, p in enumerate(meta["prompts"])}
    with open(f"{out_path}.tmp", "w", encoding="utf-8") as f:
        for key in sorted(records, key=lambda k: (k[0], order.get(k[1], len(order)))):
            f.write(json.dumps(records[key], ensure_ascii=False) + "\n")
    os.replace(f"{out_path}.tmp", out_path)
    with open(f"{errors_path}.tmp", "w", encoding="utf-8") as f:
        for index in sorted(bad):
            f.write(json.dumps(bad[index]) + "\n")
    os.replace(f"{errors_path}.tmp", errors_path)
    write_json(meta_path, {**meta, "shard": None, "merged_from": [p.name for _, _, p in shards]})
    missing = [(i, p["id"]) for i in range(meta["num_images"]) if i not in bad for p in meta["prompts"] if (i, p["id"]) not in records]
    absent = sorted(set(range(world)) - {r for r, _, _ in shards})
    summary = (f"caption.py: merged {len(shards)} of {world} shards into {out_path}: {len(records)} captions, "
               f"{meta['num_images']} images x {len(order)} prompts, {len(bad)} bad images")
    if missing or absent:
        die(summary[len("caption.py: "):] + f"; GAPS: {len(missing)} (image, prompt) pairs missing, first {missing[:3]}"
            + (f", shards {absent} absent" if absent else "") + ": rerun the shards with the same command to fill them")
    print(summary + "; no gaps", flush=True)


if __name__ == "__main__":
    main()
