"""Tiny models built from configs and saved like hub models, loaded through from_pretrained like
real ones: by the tests, and by `make demo VLM=tiny` offline.

    python tests/tiny.py llava DIR    # a random LLaVA stand-in VLM: caption.py --vlm DIR
"""
import json
import os
import shutil
import sys
from pathlib import Path

TINY_VERSION = 1  # bump when build_tiny_llava changes, so a folder built before is rebuilt
# Written into the folder of a random stand-in VLM: caption.py reads it, says its captions are noise
# and records `tiny_random: true`, which encode.py, train.py and eval.py carry to the report.
TINY_MARKER = "vlmkd_tiny.json"


def build_tiny_clip(folder):
    """A tiny random CLIP (text + vision towers), byte-level BPE tokenizer and image processor."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    folder = Path(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[ch + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def is_current(folder):
    marker = Path(folder) / TINY_MARKER
    return marker.exists() and json.loads(marker.read_text()).get("version") == TINY_VERSION


def build_tiny_llava(folder):
    """A tiny random LLaVA (CLIP vision tower + Llama), saved like a hub model so that it loads
    through the same from_pretrained code as a real one; a folder already built is reused. Linear
    sizes are multiples of 64 so bitsandbytes 4-bit runs on CPU."""
    folder = Path(folder).expanduser()
    if is_current(folder):
        return folder
    model, processor = tiny_llava()
    # Built aside and renamed: concurrent builds never see a half-written folder.
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / TINY_MARKER).write_text(json.dumps({"version": TINY_VERSION,
                                               "note": "random weights, tests only"}))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not is_current(folder):
        shutil.rmtree(folder, ignore_errors=True)  # an older or half-deleted build
    try:
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy first: same seed, same model
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_llava():
    """(model, processor) of the tiny LLaVA: a word-level tokenizer trained on the spot, seed 0."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)
    words = ("a an the photo image picture of object shirt dress coat bag shoe sneaker boot sandal "
             "trouser pullover top with long short sleeves round neck strap heel sole black white "
             "grey red blue dark light pale striped plain soft cotton leather wool smooth rough "
             "shape outline parts colour texture pattern background setting worn used describe "
             "detail what where how is it on in and or from other similar kinds tell apart "
             "material made").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    # Metaspace BPE, not byte-level: every id decodes to readable text, so random captions are words
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(words))
                      | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                            ".,:;?!-'()/{}\n"))
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                                        initial_alphabet=alphabet))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=1024, initializer_range=0.2,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         pad_token_id=tokenizer.pad_token_id)
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}"
                "ASSISTANT: {% endif %}{% if message['content'] is string %}"
                "{{ message['content'] }}{% else %}{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}"
                "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
                "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    torch.manual_seed(0)  # the same tiny model everywhere, so runs compare
    return LlavaForConditionalGeneration(config), processor


def main(argv):
    builders = {"llava": build_tiny_llava, "clip": build_tiny_clip}
    if len(argv) != 2 or argv[0] not in builders:
        sys.exit(f"usage: python tests/tiny.py {{{','.join(builders)}}} DIR")
    print(f"tiny.py: a tiny random {argv[0]} in {builders[argv[0]](argv[1])}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
