"""Throughput of caption.py's batched generation against a batch-1 loop over the same model and images.

    python bench/caption_bench.py                                                  # tiny random LLaVA, CPU
    python bench/caption_bench.py --config llava-1.5-7b --quant 4bit none --batch-size 16 --images 64   # a GPU
    python bench/caption_bench.py --config qwen2-vl-2b --quant none 4bit --batch-size 32 --images 128
    python bench/caption_bench.py --config llava-1.5-7b --num-layers 1 --images 4 --new-tokens 4  # smoke test on CPU

Both sides run caption.py's own path (prepare_inputs on the chat template with left padding, the
background batch preparation, generate, decode) through `caption.run_batches`; only the batch size
differs. Every caption is exactly --new-tokens long (min_new_tokens = max_new_tokens), so tokens/s is
images/s x new tokens. `llava-1.5-7b` and `qwen2-vl-2b` build that architecture at its published sizes
with random weights (no download; a small trained-on-the-spot tokenizer, so prompts are a little longer
in tokens than with the real one) and quantise in memory like BitsAndBytesConfig(nf4, double quant).
Goal on a GPU: batched >= 5x batch-1 images/s.
"""
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import caption  # noqa: E402  (the bench measures the stage's own functions)

PROMPT = "Describe the shape of the main object in this image and its parts: its outline, proportions and the pieces it is made of."


@dataclass
class BenchConfig:
    config: str = field(default="tiny", metadata={"help": "tiny (caption.py --vlm tiny), llava-1.5-7b or qwen2-vl-2b (random weights)"})
    quant: list[str] = field(default_factory=lambda: ["none"], metadata={"help": "one or more of none, 4bit, 8bit (8bit: tiny only)"})
    batch_size: int = field(default=8, metadata={"help": "batched side's batch size"})
    images: int = field(default=64, metadata={"help": "images per side (one prompt each)"})
    new_tokens: int = field(default=16, metadata={"help": "generated tokens per caption, forced"})
    repeats: int = field(default=3, metadata={"help": "timed passes per side; the fastest counts (a shared machine only ever slows a pass)"})
    dtype: str = field(default="bfloat16", metadata={"help": "compute dtype"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda:0"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: 1 for tiny on a CPU, where more only add OpenMP waiting; else torch's default)"})
    num_layers: int = field(default=0, metadata={"help": "override text and vision depth (a quick smoke test of the big configs)"})
    tiny_dir: str = field(default="~/.cache/vlmkd/tiny-llava", metadata={"help": "where the tiny model is built"})
    json_out: str = field(default="bench/results/caption_bench.jsonl", metadata={"help": "results appended here ('' = none)"})


def quantize_in_memory(model, quant, compute_dtype, device):
    """Swap every nn.Linear but lm_head for a bitsandbytes 4-bit one, as from_pretrained with BitsAndBytesConfig does."""
    import bitsandbytes as bnb
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or f"{name}.{child_name}".endswith("lm_head"):
                continue
            if quant != "4bit":
                raise SystemExit(f"caption_bench.py: error: --quant {quant} is not supported for random big configs (use 4bit or none)")
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q.to(device))  # .to() quantises
            del child
    gc.collect()
    return model


def build_random(name, tiny_dir, num_layers, dtype, device):
    """(model, processor, image size) of a published architecture with random weights."""
    from transformers import (AutoProcessor, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)
    tiny = AutoProcessor.from_pretrained(caption.build_tiny_llava(tiny_dir))
    tokenizer = tiny.tokenizer
    if name == "llava-1.5-7b":  # CLIP ViT-L/14-336 + Vicuna-7B (llava-hf/llava-1.5-7b-hf config.json)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=num_layers or 24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers or 32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2 if (num_layers or 24) > 1 else -1, vision_feature_select_strategy="default",
                             pad_token_id=tokenizer.pad_token_id)
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=tiny.chat_template)
        model_class, image_size = LlavaForConditionalGeneration, 336
    elif name == "qwen2-vl-2b":  # Qwen/Qwen2-VL-2B-Instruct config.json
        # The tiny tokenizer's `image_token` (<image>) stands in for <|image_pad|>: the processor asks the tokenizer first.
        specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
        tokenizer.add_tokens(specials, special_tokens=True)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=num_layers or 28,
                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=ids["<|im_end|>"], pad_token_id=tokenizer.pad_token_id,
                    tie_word_embeddings=True)
        vision = dict(depth=num_layers or 32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
        template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
                    "{% if c['type'] == 'image' %}<|vision_start|><image><|vision_end|>{% elif c['type'] == 'text' %}"
                    "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                     video_processor=Qwen2VLVideoProcessor(), chat_template=template)
        model_class, image_size = Qwen2VLForConditionalGeneration, 448  # 448 px -> 256 image tokens
    else:
        raise SystemExit(f"caption_bench.py: error: --config {name}: expected tiny, llava-1.5-7b or qwen2-vl-2b")
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # built straight on the accelerator: a 7B model in seconds, no 14 GB on the host
        model = model_class(config).eval()
    torch.set_default_dtype(previous)
    return model, processor, image_size


def measure(model, processor, images, batch_size, new_tokens, compute_dtype, device, repeats):
    gen = caption.generation_config(model, processor, new_tokens, new_tokens)
    convs = [caption.conversation(PROMPT, image) for image in images]
    texts = []

    def write(keys, batch_texts):
        texts.extend(batch_texts)

    # Warm up on one batch: kernel selection, allocator and lazy init would otherwise count against side one.
    caption.run_batches(model, processor, gen, iter([(k, c) for k, c in enumerate(convs[:batch_size])]), batch_size, write,
                        compute_dtype, desc="")
    passes = []
    for _ in range(repeats):
        texts.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        caption.run_batches(model, processor, gen, iter(list(enumerate(convs))), batch_size, write, compute_dtype, desc="")
        if device.type == "cuda":
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - start)
        assert len(texts) == len(images)
    seconds = min(passes)
    return {"batch_size": batch_size, "seconds": seconds, "images_per_s": len(images) / seconds,
            "tokens_per_s": len(images) * new_tokens / seconds, "passes_s": passes}


def main():
    (cfg,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses()
    device = torch.device(cfg.device) if cfg.device != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads or (cfg.config == "tiny" and device.type == "cpu"):
        torch.set_num_threads(cfg.threads or 1)
    compute_dtype = getattr(torch, cfg.dtype)
    rng = np.random.default_rng(0)
    size = 336 if cfg.config == "llava-1.5-7b" else 448 if cfg.config == "qwen2-vl-2b" else 64
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(cfg.images)]
    results = []
    for quant in cfg.quant:
        if cfg.config == "tiny":
            model, processor, _, _ = caption.load_vlm("tiny", quant, cfg.dtype, device, tiny_dir=cfg.tiny_dir)
        else:
            model, processor, _ = build_random(cfg.config, cfg.tiny_dir, cfg.num_layers, compute_dtype, device)
            if quant != "none":
                model = quantize_in_memory(model, quant, compute_dtype, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batched = measure(model, processor, images, cfg.batch_size, cfg.new_tokens, compute_dtype, device, cfg.repeats)
        single = measure(model, processor, images, 1, cfg.new_tokens, compute_dtype, device, cfg.repeats)
        ratio = batched["images_per_s"] / single["images_per_s"]
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
        memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"caption_bench: {cfg.config} quant={quant} {cfg.dtype} on {where}{memory}, {cfg.images} images x {cfg.new_tokens} "
              f"new tokens: batched (bs {cfg.batch_size}) {batched['images_per_s']:.2f} images/s {batched['tokens_per_s']:.1f} tok/s | "
              f"batch-1 {single['images_per_s']:.2f} images/s {single['tokens_per_s']:.1f} tok/s | ratio {ratio:.2f}x")
        results.append({"config": cfg.config, "quant": quant, "dtype": cfg.dtype, "device": where, "images": cfg.images,
                        "new_tokens": cfg.new_tokens, "num_layers": cfg.num_layers or None, "batched": batched,
                        "batch1": single, "ratio": ratio, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
