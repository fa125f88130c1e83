"""Throughput of caption.py's generation path, measured against a baseline in the same process.

    # 5 prompts an image: prefix cache off vs on; LLaVA-NeXT's tokens
    python bench/caption_bench.py --config smolvlm-256m --dtype fp32 --threads 1
    python bench/caption_bench.py --config llava-next --dtype fp32 --threads 1
    # the tower per pair (older) vs per image
    python bench/caption_bench.py --config smolvlm-256m --compare per-pair
    python bench/caption_bench.py       # tiny random LLaVA, CPU: batched vs batch-1
    python bench/caption_bench.py --config llava-1.5-7b --quant 4bit none --batch-size 16 \
        --images 64                     # a GPU
    python bench/caption_bench.py --config qwen2-vl-2b --quant none 4bit --batch-size 32 \
        --images 128
    python bench/caption_bench.py --config llava-1.5-7b --num-layers 1 --images 4 \
        --new-tokens 4                  # smoke test on CPU

Every side runs caption.py's own path (build_inputs on the chat template with left padding, the
background batch preparation, generate, decode) through `caption.run_batches`. With one prompt an
image (`--prompts 1`, the default but for smolvlm-256m and llava-next) the batched side is compared
with a batch-1 loop. With P prompts an image, `--compare prefix-cache` (the default) puts all
prompts of an image in one batch with the vision tower once per image (caption.image_batches +
caption.share_vision_work) and compares caption.py --no-prefix-cache (every row prefills its whole
prompt) with --prefix-cache (each image's prefix prefilled once, its KV cache copied to its
prompts), the sides taking turns batch by batch (on a CPU shared with other work, `--threads 1`
keeps a side from waiting on a busy core); `--compare per-pair` compares batches of `--batch-size`
(image, prompt) pairs in order, the tower run for every pair, with whole images a batch and the
tower once per image. Both sides use the same processor settings (caption.processor_settings: for
SmolVLM one 512-px tile, no splitting). Every caption is exactly --new-tokens long (min_new_tokens =
max_new_tokens). Prefill tokens are the tokens the language model runs before each generate call's
first new token, padding included (the first decoder forward of every generate call: the prefix
prefill is one of its own). `smolvlm-256m`, `llava-1.5-7b` and `qwen2-vl-2b` build that architecture
at its published sizes with random weights (no download; a small trained-on-the-spot tokenizer, so
prompts are a little longer in tokens than with the real one); `llava-next` is
llava-v1.6-mistral-7b's vocabulary (32,064), anyres grid and CLIP-L/14-336 tower at its real width,
with Mistral-7B at a quarter of its width and 2 layers each (`--num-layers` to change), captioning
500x375 images (ImageNet's commonest size: 2,340 image tokens). 4-bit quantises in memory like
BitsAndBytesConfig.
"""

import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import caption  # noqa: E402  (the bench measures the stage's own functions)
from caption import opt  # noqa: E402
from tiny import build_tiny_llava  # noqa: E402  (the tiny random LLaVA of the tests and the demo)

PROMPT = (
    "Describe the shape of the main object in this image and its parts: its outline, proportions "
    "and the pieces it is made of."
)


@dataclass
class BenchConfig:
    config: Literal["tiny", "smolvlm-256m", "llava-1.5-7b", "qwen2-vl-2b", "llava-next"] = opt(
        "tiny", "tiny (tests/tiny.py llava, as --vlm DIR) or a published architecture with random "
        "weights"
    )
    compare: Literal["prefix-cache", "per-pair"] = opt(
        "prefix-cache", "with several prompts an image: prefix cache off vs on, or the tower per "
        "pair vs per image"
    )
    quant: str = opt("none", "comma-separated: none, 4bit, 8bit (8bit: tiny only)")
    prompts: int = opt(
        0, "prompts an image (the repo's prompts/ files first); 0: 5 for smolvlm-256m and "
        "llava-next, else 1"
    )
    batch_size: int = opt(
        0, "(image, prompt) pairs per generate call (0: 20 for llava-next, 4 images x 5 prompts; "
        "else 8)"
    )
    images: int = opt(0, "images per side (0: 8 for smolvlm-256m, 4 for llava-next, else 64)")
    image_px: int = opt(
        0,
        "side of the random test images (0: 28 for smolvlm-256m, Fashion-MNIST's size; 500x375 "
        "for llava-next; else the model's input size)",
    )
    new_tokens: int = opt(
        0, "generated tokens per caption, forced (0: 24 for smolvlm-256m, as the demo; 32 for "
        "llava-next; else 16)"
    )
    repeats: int = opt(
        0, "timed passes per side, the sides taking turns with --compare prefix-cache; the fastest "
        "counts (0: 2 for smolvlm-256m and llava-next, else 3)"
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "compute dtype; auto: caption.py's own choice (bf16 where the hardware computes "
        "it, else fp16 on a GPU and fp32 on a CPU)")
    device: str = opt("auto", "auto, cpu, cuda:0")
    threads: int = opt(
        0, "torch CPU threads (0: 1 for tiny on a CPU, where more only add OpenMP waiting; else "
        "torch's default)"
    )
    num_layers: int = opt(0, "override text and vision depth (a quick smoke test of the big "
                             "configs)")
    tiny_dir: str = opt("~/.cache/vlmkd/tiny-llava", "where the tiny model is built")
    json_out: str = opt("bench/results/caption_bench.jsonl", "results appended here ('' = none)")


def quantize_in_memory(model, quant, compute_dtype, device):
    """Each nn.Linear but lm_head made a bitsandbytes 4-bit one, as BitsAndBytesConfig does."""
    import bitsandbytes as bnb

    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or f"{name}.{child_name}".endswith("lm_head"):
                continue
            if quant != "4bit":
                raise SystemExit(
                    f"caption_bench.py: error: --quant {quant} is not supported for random big "
                    "configs (4bit or none)"
                )
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                module=q
            )
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q.to(device))  # .to() quantises
            del child
    gc.collect()
    return model


def clip_l14_336(layers):
    """CLIP ViT-L/14 at 336 px, the vision tower of LLaVA-1.5 and LLaVA-NeXT (their config.json)."""
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                            num_attention_heads=16, image_size=336, patch_size=14,
                            projection_dim=768)


def build_random(name, tiny_dir, num_layers, dtype, device):
    """(model, processor, image side or (width, height)): a published architecture, random init."""
    from transformers import (
        AutoProcessor,
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
        MistralConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tiny = AutoProcessor.from_pretrained(build_tiny_llava(tiny_dir))
    tokenizer = tiny.tokenizer
    # CLIP ViT-L/14-336 + Vicuna-7B (llava-hf/llava-1.5-7b-hf config.json)
    if name == "llava-1.5-7b":
        vision = clip_l14_336(num_layers or 24)
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=num_layers or 32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2 if (num_layers or 24) > 1 else -1,
            vision_feature_select_strategy="default",
            pad_token_id=tokenizer.pad_token_id,
        )
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                               crop_size={"height": 336, "width": 336}),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tiny.chat_template,
        )
        model_class, image_size = LlavaForConditionalGeneration, 336
    elif name == "qwen2-vl-2b":  # Qwen/Qwen2-VL-2B-Instruct config.json
        # <|image_pad|> is the tiny tokenizer's `image_token` (<image>): the processor asks it.
        specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|video_pad|>"]
        tokenizer.add_tokens(specials, special_tokens=True)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        text = dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=num_layers or 28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [16, 24, 24]},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        vision = dict(
            depth=num_layers or 32,
            embed_dim=1280,
            hidden_size=1536,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True,
        )
        template = (
            "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|><image><|vision_end|>{% elif c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=template,
        )
        model_class, image_size = Qwen2VLForConditionalGeneration, 448  # 448 px -> 256 image tokens
    # HuggingFaceTB/SmolVLM-256M-Instruct: SigLIP-B/16-512 + SmolLM2-135M, Idefics3
    elif name == "smolvlm-256m":
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3ImageProcessor,
            Idefics3Processor,
        )

        tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tokenizer.add_tokens(
            ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>",
             *tiles],
            special_tokens=True,
        )
        vision = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=num_layers or 12,
            num_attention_heads=12,
            image_size=512,
            patch_size=16,
        )
        text = LlamaConfig(
            vocab_size=49280,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=num_layers or 30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
            pad_token_id=tokenizer.pad_token_id,
        )
        config = Idefics3Config(
            vision_config=vision,
            text_config=text,
            scale_factor=4,
            tie_word_embeddings=False,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=tokenizer.pad_token_id,
        )
        template = (
            "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
            "{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}"
        )
        # Published preprocessor_config.json: longest edge 2048, 512-px tiles, splitting, Lanczos
        image_processor = Idefics3ImageProcessor(
            size={"longest_edge": 2048},
            max_image_size={"longest_edge": 512},
            do_image_splitting=True,
            resample=Image.Resampling.LANCZOS,
        )
        processor = Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64,
            chat_template=template
        )
        model_class, image_size = Idefics3ForConditionalGeneration, 28
    # llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14-336 + Mistral-7B, anyres tiles
    elif name == "llava-next":
        layers = num_layers or 2  # few layers, so the 2,400-token prefills run on a CPU in minutes
        vision = clip_l14_336(layers)
        # Mistral-7B at a quarter of its width: 8 heads of 128 (2 KV heads), 3.5x MLP
        text = MistralConfig(
            vocab_size=32064,
            hidden_size=1024,
            intermediate_size=3584,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            sliding_window=None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_grid_pinpoints=pinpoints,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2 if layers > 1 else -1,
            vision_feature_select_strategy="default",
            pad_token_id=tokenizer.pad_token_id,
        )
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=pinpoints
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tiny.chat_template,
        )
        model_class, image_size = LlavaNextForConditionalGeneration, (500, 375)
    else:
        raise SystemExit(f"caption_bench.py: error: --config {name}: expected tiny, llava-1.5-7b "
                         "or qwen2-vl-2b")
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    # built straight on the accelerator: a 7B model in seconds, no 14 GB on the host
    with torch.device(device):
        model = model_class(config).eval()
    torch.set_default_dtype(previous)
    return model, processor, image_size


def count_prefill(model):
    """A counter of the tokens the language model runs before each generate call's first new token,
    padding included: the first decoder forward of every generate call (caption.py's prefix prefill
    is a generate of its own). Returns (counter, undo)."""
    counter, generate = {"tokens": 0, "first": False}, model.generate

    def first_forward(module, args, kwargs):
        if counter["first"]:
            x = kwargs.get("inputs_embeds")
            x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
            counter["tokens"] += x.shape[0] * x.shape[1]
            counter["first"] = False

    def counted(*args, **kwargs):
        counter["first"] = True
        return generate(*args, **kwargs)

    hook = model.get_decoder().register_forward_pre_hook(first_forward, with_kwargs=True)
    model.generate = counted

    def undo():
        hook.remove()
        del model.generate

    return counter, undo


def run_side(
    model, processor, rows, batch_size, per_image, new_tokens, compute_dtype, device, repeats,
    prefix=False, warm=True
):
    """Fastest of `repeats` timed passes over rows [caption.Row], after one warm-up batch (if warm).
    per_image: whole images a batch and the vision tower once per image; else batch_size pairs in
    order, the tower per pair. prefix: each image's prefix prefilled once (caption.py
    --prefix-cache), else every row's whole prompt."""
    gen = caption.generation_config(model, processor, new_tokens, new_tokens)
    settings = caption.processor_settings(processor)
    hooks = caption.share_vision_work(model) if per_image else []
    placeholders = caption.placeholder_ids(model) if prefix else None
    captioner = caption.Captioner(model, processor, gen, settings, compute_dtype, placeholders)
    counter, undo = count_prefill(model)
    texts = []

    def batches():
        if per_image:
            by_image = {}
            for row in rows:
                by_image.setdefault(row.index, (row.index, "x", [], row.image, None))[2] \
                    .append((row.prompt, row.text))
            return caption.image_batches(by_image.values(), batch_size, None)
        return (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))

    def write(batch_rows, batch_texts):
        texts.extend(batch_texts)

    if warm:
        caption.run_batches(captioner, [rows[:batch_size]], write, None)
    passes = []
    for _ in range(repeats):
        texts.clear()
        counter["tokens"] = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        caption.run_batches(captioner, batches(), write, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - start)
        assert len(texts) == len(rows)
    for hook in hooks:
        hook.remove()
    undo()
    seconds = min(passes)
    return {
        "batch_size": batch_size,
        "per_image": per_image,
        "prefix_cache": prefix,
        "prefill_tokens_per_caption": counter["tokens"] / len(rows),
        "seconds": seconds,
        "captions_per_s": len(rows) / seconds,
        "images_per_s": len(rows) / seconds,
        "tokens_per_s": len(rows) * new_tokens / seconds,
        "passes_s": passes,
        "texts": list(texts),
    }


def take_turns(rows, per_turn, repeats, *sides):
    """Each side's fastest of `repeats` passes over rows, the sides taking turns every `per_turn`
    rows (a batch of whole images): on a shared machine, load that comes and goes then hits both
    alike. side(rows, warm) is run_side on those rows, with a warm-up batch first if warm."""
    turns = [rows[i : i + per_turn] for i in range(0, len(rows), per_turn)]
    passes = [[] for _ in sides]
    for r in range(repeats):
        parts = [[side(turn, r == 0 and t == 0) for side in sides] for t, turn in enumerate(turns)]
        for k, results in enumerate(zip(*parts)):
            seconds = sum(p["seconds"] for p in results)
            prefill = sum(p["prefill_tokens_per_caption"] * len(turn)
                          for p, turn in zip(results, turns))
            passes[k].append(
                results[0]
                | {
                    "seconds": seconds,
                    "captions_per_s": len(rows) / seconds,
                    "images_per_s": len(rows) / seconds,
                    "tokens_per_s": sum(p["tokens_per_s"] * p["seconds"]
                                        for p in results) / seconds,
                    "prefill_tokens_per_caption": prefill / len(rows),
                    "texts": [text for p in results for text in p["texts"]],
                }
            )
    return [min(mine, key=lambda p: p["seconds"]) | {"passes_s": [p["seconds"] for p in mine]}
            for mine in passes]


def prompt_texts(count):
    files = sorted(
        Path(caption.__file__).with_name("prompts").glob("*.txt"),
        key=lambda p: (p.stem != "general", p.stem)
    )
    texts = [p.read_text().strip() for p in files if p.stem != caption.CLASS_PROMPT] or [PROMPT]
    return [texts[k % len(texts)] for k in range(count)] if count > 1 else [PROMPT]


def main():
    cfg = caption.parse_config(BenchConfig)
    smol, next_ = cfg.config == "smolvlm-256m", cfg.config == "llava-next"
    num_prompts = cfg.prompts or (5 if smol or next_ else 1)
    num_images = cfg.images or (8 if smol else 4 if next_ else 64)
    new_tokens = cfg.new_tokens or (24 if smol else 32 if next_ else 16)
    repeats = cfg.repeats or (2 if smol or next_ else 3)
    batch_size = cfg.batch_size or (20 if next_ else 8)
    device = caption.pick_device(cfg.device)
    if cfg.threads or (cfg.config == "tiny" and device.type == "cpu"):
        torch.set_num_threads(cfg.threads or 1)
    # the stage's own decision, printed by it
    cfg.dtype, why = caption.resolve_dtype(cfg.dtype, device)
    print(f"caption_bench: dtype {cfg.dtype} ({why})", flush=True)
    compute_dtype = getattr(torch, caption.TORCH_DTYPES[cfg.dtype])
    rng = np.random.default_rng(0)
    size = cfg.image_px \
        or {"llava-1.5-7b": 336, "qwen2-vl-2b": 448, "smolvlm-256m": 28}.get(cfg.config, 64)
    width, height = (size, size) if cfg.image_px or not next_ else (500, 375)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for _ in range(num_images)]
    rows = [
        caption.Row(i, f"p{k}", text, image)
        for i, image in enumerate(images)
        for k, text in enumerate(prompt_texts(num_prompts))
    ]
    results = []
    for quant in cfg.quant.split(","):
        if cfg.config == "tiny":
            model, processor, _, _ = caption.load_vlm(str(build_tiny_llava(cfg.tiny_dir)), quant,
                                                      cfg.dtype, device)
        else:
            model, processor, _ = build_random(cfg.config, cfg.tiny_dir, cfg.num_layers,
                                               compute_dtype, device)
            if quant != "none":
                model = quantize_in_memory(model, quant, compute_dtype, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        side = (model, processor, rows, batch_size)
        # whole images a batch; before: every row its prompt
        if num_prompts > 1 and cfg.compare == "prefix-cache":
            per_turn = max(1, batch_size // num_prompts) * num_prompts
            base, new = take_turns(
                rows,
                per_turn,
                repeats,
                *(
                    lambda turn, warm, prefix=prefix: run_side(
                        *side[:2], turn, batch_size, True, new_tokens, compute_dtype, device, 1,
                        prefix, warm
                    )
                    for prefix in (False, True)
                ),
            )
            names = ("prefix cache", "no prefix cache")
        # before: a batch of pairs, the tower per pair; after: whole images, the tower once
        elif num_prompts > 1:
            base = run_side(*side, False, new_tokens, compute_dtype, device, repeats)
            new = run_side(*side, True, new_tokens, compute_dtype, device, repeats)
            names = ("per image", "per pair")
        else:
            new = run_side(model, processor, rows, batch_size, False, new_tokens, compute_dtype,
                           device, repeats)
            base = run_side(model, processor, rows, 1, False, new_tokens, compute_dtype, device,
                            repeats)
            names = (f"batched (bs {batch_size})", "batch-1")
        ratio = new["captions_per_s"] / base["captions_per_s"]
        where = (
            torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu x{torch.get_num_threads()} threads"
        )
        memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" \
            if device.type == "cuda" else ""
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"caption_bench: {cfg.config} ({params:.1f}M params) quant={quant} {cfg.dtype} on "
            f"{where}{memory}, {num_images} images x {num_prompts} prompts x {new_tokens} new "
            f"tokens, {width}x{height}-px images, processor "
            f"{caption.processor_settings(processor)}: {names[0]} {new['captions_per_s']:.2f} "
            f"captions/s {new['tokens_per_s']:.1f} tok/s | {names[1]} {base['captions_per_s']:.2f} "
            f"captions/s {base['tokens_per_s']:.1f} tok/s | ratio {ratio:.2f}x",
            flush=True,
        )
        before, after = base["prefill_tokens_per_caption"], new["prefill_tokens_per_caption"]
        print(f"prefill tokens per caption: {before:,.0f} -> {after:,.0f} ({before / after:.1f}x)",
              flush=True)
        print(
            f"captions/s: {base['captions_per_s']:.2f} -> {new['captions_per_s']:.2f} "
            f"({ratio:.2f}x)", flush=True
        )
        same = base.pop("texts") == new.pop("texts")
        print(f"same captions both ways: {'yes' if same else 'NO'} ({cfg.dtype}, greedy)",
              flush=True)
        results.append(
            {
                "config": cfg.config,
                "quant": quant,
                "dtype": cfg.dtype,
                "device": where,
                "images": num_images,
                "prompts": num_prompts,
                "new_tokens": new_tokens,
                "num_layers": cfg.num_layers or None,
                "batched": new,
                "batch1": base,
                "sides": names,
                "ratio": ratio,
                "prefill_ratio": before / after,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.json_out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
