"""caption.py on tiny random builds of every VLM family the README names, through their real
processor and image-processor classes, saved like hub models and loaded by caption.py's own
from_pretrained path: LLaVA-NeXT (anyres), Qwen2-VL (mrope), Idefics3 / SmolVLM (the demo's family)
and PaliGemma (no chat template). LLaVA itself is tests/test_caption.py's model. Per family: batched
== one pair at a time (fp32), a bad image is recorded, a killed run resumes to the same captions,
and 4-bit loads (every quantised Linear has in_features % 64 == 0 and out_features % 32 == 0, as
bitsandbytes needs on a CPU). Every family, LLaVA too: --prefix-cache writes the captions
--no-prefix-cache does."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import build_tiny_llava  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "caption.py"
FAMILIES = ["llava_next", "qwen2_vl", "idefics3", "paligemma"]
NUM_IMAGES, BAD = 5, 2
WORDS = ("a the photo image of shirt dress coat bag shoe boot trouser top with long short sleeves "
         "round neck black white grey red blue dark light striped plain soft cotton leather shape "
         "outline colour texture describe what is it on in and or").split()


def tokenizer_with(specials, extra_special=None):
    """A word-level BPE tokenizer trained on the spot (Metaspace: ids decode to readable words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                          ".,:;?!-'()/\n"))
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>", *specials],
        initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=extra_special or {})


USER_TEMPLATE = ("{% for message in messages %}{{ '<|user|>' if message['role'] == 'user' else "
                 "'<|assistant|>' }}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
                 "{IMAGE}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def llama(tokenizer, **extra):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, initializer_range=0.2,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **extra)


def build(family, folder):
    """(model, processor) of one family, tiny and random."""
    import transformers as tf
    if family == "llava_next":
        tokenizer = tokenizer_with(["<image>", "<|user|>", "<|assistant|>"],
                                   {"image_token": "<image>"})
        vision = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8,
                                     projection_dim=64)
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        config = tf.LlavaNextConfig(vision_config=vision, text_config=llama(tokenizer),
                                    image_grid_pinpoints=pinpoints,
                                    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                    vision_feature_layer=-2, pad_token_id=tokenizer.pad_token_id)
        image_processor = tf.LlavaNextImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32},
                                                     image_grid_pinpoints=pinpoints)
        processor = tf.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=USER_TEMPLATE.replace("{IMAGE}", "<image>\n"))
        model = tf.LlavaNextForConditionalGeneration(config)
    elif family == "qwen2_vl":
        specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                    "<|user|>", "<|assistant|>"]
        tokenizer = tokenizer_with(specials, {"image_token": "<|image_pad|>",
                                              "video_token": "<|video_pad|>"})
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                    max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [4, 6, 6]},
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision,
                                  image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"],
                                  vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
        template = USER_TEMPLATE.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>")
        processor = tf.Qwen2VLProcessor(
            image_processor=tf.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
            tokenizer=tokenizer, video_processor=tf.Qwen2VLVideoProcessor(),
            chat_template=template)
        model = tf.Qwen2VLForConditionalGeneration(config)
    elif family == "idefics3":
        rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tokenizer = tokenizer_with(["<image>", "<fake_token_around_image>", "<global-img>",
                                    "<end_of_utterance>", "<|user|>", "<|assistant|>", *rows])
        config = tf.Idefics3Config(vision_config=dict(hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      image_size=32, patch_size=8),
                                   text_config=llama(tokenizer), scale_factor=2,
                                   image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                   pad_token_id=tokenizer.pad_token_id)
        # SmolVLM's published settings scaled down: longest edge 4 tiles, 32-px tiles, splitting on.
        image_processor = tf.Idefics3ImageProcessor(size={"longest_edge": 128},
                                                    max_image_size={"longest_edge": 32},
                                                    do_image_splitting=True)
        processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                         image_seq_len=4,
                                         chat_template=USER_TEMPLATE.replace("{IMAGE}", "<image>"))
        model = tf.Idefics3ForConditionalGeneration(config)
    else:  # paligemma: no chat template; the processor puts image tokens + bos before the prompt
        tokenizer = tokenizer_with(["<image>"], {"image_token": "<image>"})
        image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
        image_processor.image_seq_length = 16
        processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        # now with <loc0000>..<seg127>, which a caption must not carry
        tokenizer = processor.tokenizer
        vision = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8)
        text = tf.GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, max_position_embeddings=512, initializer_range=0.2,
                              bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        config = tf.PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=64,
                                    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                    pad_token_id=tokenizer.pad_token_id)
        model = tf.PaliGemmaForConditionalGeneration(config)
        # words about as likely as the 300 loc tokens left in play (1,152 would crowd them out)
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            extra = [i for t, i in tokenizer.get_added_vocab().items()
                     if t.startswith(("<loc", "<seg"))]
            embeddings[sorted(extra)[300:]] = 0
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def module():
    # 2 shared cores: OpenMP threads waiting for a busy one make generation far slower
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("caption_families_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv0, sys.argv[0] = sys.argv[0], str(SCRIPT)
    yield mod
    sys.argv[0] = argv0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    lines = []
    for n in range(NUM_IMAGES):
        path = root / f"img/{n}.png"
        if n == BAD:
            path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:  # sizes and aspect ratios differ, so anyres and dynamic resolution see other grids
            Image.new("RGB", (28 + 20 * n, 28 + 9 * (n % 2)), (40 * n, 200 - 30 * n, 90)).save(path)
        lines.append(f"img/{n}.png 0")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "general.txt").write_text("Describe the image.\n")
    (prompts / "t1.txt").write_text("What colour is the object, and what shape?\n")
    return root


@pytest.fixture(scope="module")
def built(module, tmp_path_factory):
    """family -> its tiny model's folder, built once (LLaVA by tests/tiny.py, as the demo's)."""
    folders = {}

    def get(family):
        if family not in folders:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(family) / "model"
            folders[family] = build_tiny_llava(folder) if family == "llava" \
                else build(family, folder)
        return folders[family]
    return get


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, built):
    return request.param, built(request.param)


def run(module, data, model, out, *extra):
    module.main(list(map(str, ["--split", data / "train.txt", "--vlm", model, "--prompts",
                               data / "prompts", "--max-new-tokens", "6", "--dtype", "fp32",
                               "--workers", "1", "--out", out, *extra])))
    return {(r["index"], r["prompt"]): r["text"]
            for r in map(json.loads, out.read_text().splitlines())}


def test_family_batched_bad_image_resume_4bit(vlm, data, module, tmp_path):
    family, model = vlm
    batched = run(module, data, model, tmp_path / "b/captions.jsonl", "--batch-size", "4")
    good = [n for n in range(NUM_IMAGES) if n != BAD]
    assert sorted(batched) == [(n, p) for n in good for p in ("general", "t1")]
    assert len(set(batched.values())) > 2, "a random model still gives varied captions"
    errors = [json.loads(line)
              for line in (tmp_path / "b/captions.errors.jsonl").read_text().splitlines()]
    assert [e["index"] for e in errors] == [BAD]
    meta = json.loads((tmp_path / "b/captions.meta.json").read_text())
    # a stand-in only by tests/tiny.py's marker, not by being small
    assert meta["tiny_random"] is False
    if family == "idefics3":  # one tile, not 4 x 4 tiles + a global image, unless asked
        assert meta["processor"] == {"do_image_splitting": False, "size": {"longest_edge": 32}}
    if family == "paligemma":  # the raw answers carry <locNNNN> tokens; the captions do not
        vlm_model, processor, _, _ = module.load_vlm(str(model), "none", "fp32", "cpu")
        images = [Image.open(data / f"img/{n}.png").convert("RGB") for n in good]
        inputs = module.build_inputs(processor, ["Describe the image."] * len(good), images, {},
                                     torch.float32)
        raw = module.generate_texts(vlm_model, processor, inputs,
                                    module.generation_config(vlm_model, processor, 6))
        assert any("<loc" in t for t in raw) and not any("<" in t for t in batched.values())

    assert run(module, data, model, tmp_path / "one/captions.jsonl", "--batch-size", "1") == batched

    out = tmp_path / "r/captions.jsonl"  # a kill after three records, in the middle of the fourth
    out.parent.mkdir()
    (tmp_path / "b/captions.meta.json").replace(out.with_name("captions.meta.json"))
    out.write_text("".join(
        (tmp_path / "b/captions.jsonl").read_text().splitlines(keepends=True)[:3]) + '{"ind')
    assert run(module, data, model, out, "--batch-size", "4") == batched

    quantised = run(module, data, model, tmp_path / "q/captions.jsonl", "--quant", "4bit",
                    "--limit", "2")
    assert sorted(quantised) == [(0, "general"), (0, "t1"), (1, "general"), (1, "t1")]
    assert json.loads((tmp_path / "q/captions.meta.json").read_text())["quant"] == "4bit"


def test_idefics3_splitting_and_size_flags_are_recorded_and_matched(data, module, tmp_path):
    model = build("idefics3", tmp_path / "idefics3")
    out = tmp_path / "captions.jsonl"
    run(module, data, model, out, "--image-splitting", "--image-size", "64", "--limit", "1")
    meta = json.loads(out.with_name("captions.meta.json").read_text())
    assert meta["processor"] == {"do_image_splitting": True, "size": {"longest_edge": 64}}
    # another tiling would mix two kinds of captions in one file
    with pytest.raises(SystemExit) as exc:
        run(module, data, model, out, "--limit", "1")
    assert "`processor`" in str(exc.value)


def test_qwen2_vl_processor_rejects_one_image_not_the_batch(module, tmp_path):
    """An image Qwen2-VL's processor refuses (aspect ratio > 200) is recorded bad, not its batch."""
    model = build("qwen2_vl", tmp_path / "qwen")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "img/ok.png")
    Image.new("RGB", (1, 300), (10, 20, 30)).save(tmp_path / "img/thin.png")
    (tmp_path / "train.txt").write_text("img/ok.png 0\nimg/thin.png 0\nimg/ok.png 0\n")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/general.txt").write_text("Describe the image.\n")
    got = run(module, tmp_path, model, tmp_path / "out/captions.jsonl", "--batch-size", "4")
    errors = [json.loads(line)
              for line in (tmp_path / "out/captions.errors.jsonl").read_text().splitlines()]
    assert sorted(got) == [(0, "general"), (2, "general")] \
        and got[(0, "general")] == got[(2, "general")]
    assert [e["index"] for e in errors] == [1] and errors[0]["error"].startswith("processor:")


PREFIX_PROMPTS = {"general": "Describe the image.", "t1": "What colour is it?",
                  "t2": "What shape is the object, and what is it made of, in detail?",
                  "t3": "Striped or plain?",
                  "t4": "Describe the texture, the colour and the outline of the object in the "
                        "image, and where it is."}


@pytest.mark.parametrize("family", ["llava", *FAMILIES])
def test_prefix_cache_writes_the_same_captions(family, built, data, module, tmp_path, capsys):
    """--prefix-cache (each image's template + image tokens prefilled once, its KV cache copied to
    its prompts) writes the captions of --no-prefix-cache (fp32, greedy): 4 image sizes
    (LLaVA-NeXT's anyres, Qwen2-VL's and Idefics3's tiling give each its own token count), 5 prompts
    of different lengths, an image split over two batches (batch 3), one image a batch (5), three
    images a batch (15), a bad image, 4-bit, and a resume that switches path. PaliGemma keeps the
    whole-prompt path (its prefix-LM attention lets image tokens see the prompt) and says so."""
    model, prompts = built(family), tmp_path / "prompts"
    prompts.mkdir()
    for name, text in PREFIX_PROMPTS.items():
        (prompts / f"{name}.txt").write_text(text + "\n")
    # tiles vary with size
    flags = ["--prompts", prompts, *(["--image-splitting"] if family == "idefics3" else [])]

    def captions(name, *extra):
        return run(module, data, model, tmp_path / name / "captions.jsonl", *flags, *extra)
    before = captions("before", "--no-prefix-cache", "--batch-size", "15")
    assert "LM prefill: the whole prompt per caption (--no-prefix-cache)" in capsys.readouterr().out
    good = [n for n in range(NUM_IMAGES) if n != BAD]
    assert sorted(before) == sorted((n, p) for n in good for p in PREFIX_PROMPTS) \
        and len(set(before.values())) > 5
    for batch in ("3", "5", "15"):
        assert captions(f"b{batch}", "--batch-size", batch) == before, f"--batch-size {batch}"
    said, shared = capsys.readouterr().out, family != "paligemma"
    assert ("each image's prefix (template + image tokens) once" in said) == shared
    assert ("prefix-LM" in said) != shared
    assert json.loads((tmp_path / "b3/captions.meta.json").read_text())["prefix_cache"] is shared
    assert [json.loads(line)["index"] for line in (tmp_path / "b3/captions.errors.jsonl").open()] \
        == [BAD]

    quantised = [captions(f"q{path}", "--quant", "4bit", "--limit", "2", "--batch-size", "15", path)
                 for path in ("--no-prefix-cache", "--prefix-cache")]
    assert quantised[0] == quantised[1] and len(quantised[0]) == 2 * len(PREFIX_PROMPTS)

    # the path is recorded, not matched: a resume may switch
    captions("resume", "--limit", "2", "--batch-size", "15")
    assert captions("resume", "--no-prefix-cache", "--batch-size", "15") == before


def test_prefix_plan_keeps_each_rows_tokens_and_positions(built, data, module):
    """The re-laid batch: each row's unmasked tokens are its build_inputs tokens in order (so
    position ids, which count unmasked tokens, are too), its prefix part is its image's prefix row,
    and a row build_inputs did not pad holds no pad id (a repetition penalty sees masked ids)."""
    model, processor, _, _ = module.load_vlm(str(built("llava_next")), "none", "fp32", "cpu")
    # two sizes: two prefix lengths
    images = [Image.open(data / f"img/{n}.png").convert("RGB") for n in (1, 3)]
    texts = list(PREFIX_PROMPTS.values())[:3]
    rows = [(text, image) for image in images for text in texts]
    inputs = module.build_inputs(processor, *map(list, zip(*rows)), {}, torch.float32)
    pad = processor.tokenizer.pad_token_id
    plan = module.prefix_plan(inputs, [image for _, image in rows], module.placeholder_ids(model),
                              pad)
    prefix, width = plan["prefix"], plan["prefix"]["input_ids"].shape[1]
    assert prefix["input_ids"].shape[0] == 2 and len(prefix["pixel_values"]) == 2
    for r in range(len(rows)):
        mask, before = plan["attention_mask"][r].bool(), \
            inputs["input_ids"][r][inputs["attention_mask"][r].bool()]
        assert torch.equal(plan["input_ids"][r][mask], before)
        assert torch.equal(plan["input_ids"][r][:width][mask[:width]],
                           prefix["input_ids"][r // 3][prefix["attention_mask"][r // 3].bool()])
        assert (pad in plan["input_ids"][r].tolist()) == (not inputs["attention_mask"][r].all())
    assert module.prefix_plan(inputs, [object() for _ in rows], module.placeholder_ids(model),
                              pad) is None
