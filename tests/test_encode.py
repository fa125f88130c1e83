"""encode.py (and probe.py on its output) run as a user runs them: the real all-MiniLM-L6-v2
(offline package), a tiny CLIP saved with save_pretrained, captions files written in caption.py's
format, kill-and-resume, shards, probes, refusals."""
import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_helpers import sidecar_digest  # noqa: E402
from tiny import build_tiny_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "encode.py"
PROBE = REPO / "probe.py"
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

CLASSES = ["dog", "cat", "car", "truck", "apple", "banana"]
COUNTS = [40, 25, 18, 10, 5, 2]  # long-tailed; the last two have fewer images than probe folds
ADJECTIVES = ["small", "large", "brown", "white", "old", "new", "shiny", "muddy", "sleepy", "fast"]
NOISE = ["window", "river", "seven", "quiet", "paper", "orbit", "violin", "granite", "tuesday",
         "lantern", "maple", "copper"]


def run(*args, check=True, env=None, script=SCRIPT):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, env=env or ENV, cwd=REPO, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def refused(*args, env=None, script=SCRIPT):
    """The last stderr line of a refused run: one line, prefixed like argparse errors."""
    proc = run(*args, check=False, env=env, script=script)
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script.name}: error:"), proc.stderr[-3000:]
    return last


def probe(*args, check=True):
    return run(*args, check=check, script=PROBE)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_split(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"images/{i:05d}.png {y}\n" for i, y in enumerate(labels)))
    return path


def write_captions(path, split, prompts, records, num_images, **meta):
    """captions.jsonl + captions.meta.json exactly as caption.py writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"index": i, "prompt": p, "text": t}) + "\n"
                            for i, p, t in records))
    meta = {"model": "test/vlm", "prompts": [{"id": pid, "text": text,
                                              "sha256": hashlib.sha256(text.encode()).hexdigest()}
                                             for pid, text in prompts.items()],
            "split": str(split), "split_sha256": sha256(split), "num_images": num_images,
            "tiny_random": False, **meta}
    path.with_name(path.name[: -len(".jsonl")] + ".meta.json").write_text(json.dumps(meta))
    return path


def write_images(data, labels, size=28, seed=0):
    """DATA/train.txt and 28 x 28 grey PNGs like Fashion-MNIST's: a bright bar whose position and
    angle tell the class, on noise, so that pixels alone predict the label."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    split = write_split(data / "train.txt", labels)
    (data / "images").mkdir(parents=True, exist_ok=True)
    for i, y in enumerate(labels):
        pixels = rng.integers(0, 90, (size, size))
        pos = 3 + 4 * y + rng.integers(-1, 2)
        if y % 2:
            pixels[:, pos:pos + 3] = 255
        else:
            pixels[pos:pos + 3, :] = 255
        Image.fromarray(pixels.astype(np.uint8)).save(data / f"images/{i:05d}.png")
    return split


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def load_module():
    spec = importlib.util.spec_from_file_location("encode_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -------------------------------------------------------------------------------------- MiniLM data
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Class-derived and random captions for a long-tailed split, encoded once by the real
    MiniLM."""
    root = tmp_path_factory.mktemp("minilm")
    rng = random.Random(0)
    labels = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    rng.shuffle(labels)
    split = write_split(root / "data" / "train.txt", labels)
    records = []
    for i, y in enumerate(labels):
        records.append((i, "describe",
                        f"a photo of a {CLASSES[y]}, it is {rng.choice(ADJECTIVES)}"))
        records.append((i, "noise", "" if i == 7
                        else " ".join(rng.choice(NOISE) for _ in range(rng.randint(2, 9)))))
    rng.shuffle(records)  # row order must come from `index`, not from the file order
    captions = write_captions(root / "caps" / "captions.jsonl", split,
                              {"describe": "Describe it.", "noise": "Say anything."},
                              records, len(labels))
    # The dtype stated: `auto` is bf16 or fp32 by the CPU; the refusal below needs another one.
    args = ["--captions", captions, "--split", split, "--model", "minilm", "--chunk", 8,
            "--batch-size", 8, "--dtype", "fp32"]
    proc = run(*args, "--out", root / "ref")
    return {"root": root, "labels": np.asarray(labels), "split": split, "captions": captions,
            "args": args, "out": root / "ref", "stdout": proc.stdout}


def test_minilm_text_shape_norm_order_and_sidecar(lm):
    text = np.load(lm["out"] / "text.npy")
    side = json.loads((lm["out"] / "text.json").read_text())
    n = len(lm["labels"])
    assert text.shape == (n, 2, 384) and text.dtype == np.float16
    norms = np.linalg.norm(text.astype(np.float32), axis=-1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    assert side["kind"] == "text" and side["encoder"] == "minilm" \
        and side["prompts"] == ["describe", "noise"]
    assert side["shape"] == [n, 2, 384] and side["dtype"] == "float16" \
        and side["normalized"] is True
    assert side["split_sha256"] == sha256(lm["split"]) \
        and side["captions_sha256"] == sha256(lm["captions"])
    assert side["made_by"] == "encode.py" and side["missing_rows"] == [] \
        and side["empty_captions"] == 1
    assert "torch" in side["versions"] and side["config"]["model"] == "minilm"
    # Similar sentences are closer: same-class captions beat other-class ones on average.
    describe = text[:, 0].astype(np.float32)
    sims = describe @ describe.T
    same = lm["labels"][:, None] == lm["labels"][None, :]
    off_diag = ~np.eye(n, dtype=bool)
    assert sims[same & off_diag].mean() > sims[~same].mean() + 0.2
    # Row order = split order: each row's nearest other row (by caption) shares its split label.
    np.fill_diagonal(sims, -1)
    assert (lm["labels"][sims.argmax(1)] == lm["labels"]).mean() > 0.9


def test_the_same_command_twice_gives_the_same_bytes(lm):
    """Determinism (CPU): a second run of the same command writes a bit-identical array, and a
    sidecar that differs only where it names its own --out."""
    again = lm["root"] / "again"
    run(*lm["args"], "--out", again)
    assert sha256(again / "text.npy") == sha256(lm["out"] / "text.npy")
    first, second = (json.loads((d / "text.json").read_text()) for d in (lm["out"], again))
    assert {k: v for k, v in first.items() if k not in ("config", "sha256")} == \
        {k: v for k, v in second.items() if k not in ("config", "sha256")}
    assert first["compute_dtype"] == "fp32"  # the stated --dtype, on any CPU


def test_minilm_kill_and_resume_equals_one_run(lm):
    out = lm["root"] / "resume"
    cmd = [sys.executable, str(SCRIPT), *map(str, lm["args"]), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    progress, done_at_kill = out / "text.progress.json", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            done_at_kill = json.loads(progress.read_text())["rows_done"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done_at_kill = None
        if done_at_kill and done_at_kill >= 16:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (out / "text.npy").exists() and (out / "text.npy.partial").exists()
    assert 16 <= json.loads(progress.read_text())["rows_done"] < len(lm["labels"])

    # Other settings must not continue this partial.
    line = refused(*lm["args"], "--out", out, "--dtype", "bf16")
    assert "unfinished run" in line and "--overwrite" in line

    resumed = run(*lm["args"], "--out", out)
    assert "resuming" in resumed.stdout
    assert np.array_equal(np.load(out / "text.npy"), np.load(lm["out"] / "text.npy"))
    assert not progress.exists() and not (out / "text.npy.partial").exists()
    assert "up to date" in run(*lm["args"], "--out", out).stdout


def test_minilm_class_texts_with_descriptions(lm):
    root = lm["root"]
    classes = root / "data" / "classes.txt"
    classes.write_text("".join(c + "\n" for c in CLASSES))
    descriptions = root / "class_descriptions.jsonl"
    descriptions.write_text("".join(
        json.dumps({"class": c, "name": CLASSES[c], "text": t}) + "\n" for c, t in [
            (0, "A furry animal with four legs and a wagging tail."),
            (0, "A loyal pet that barks."), (2, "A road vehicle with four wheels."),
            (4, "A round red or green fruit.")]))
    out = root / "classes"
    run("--classes", classes, "--descriptions", descriptions, "--model",
        "sentence-transformers/all-MiniLM-L6-v2", "--out", out)
    feats = np.load(out / "classes.npy").astype(np.float32)
    side = json.loads((out / "classes.json").read_text())
    assert feats.shape == (6, 384) and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=2e-3)
    assert side["kind"] == "classes" and side["classes_sha256"] == sha256(classes)
    assert side["descriptions_sha256"] == sha256(descriptions) \
        and side["texts_per_class"] == [2, 1, 1, 1, 1, 1]
    assert side["sha256"] == sidecar_digest(out / "classes.npy", side) \
        and side["missing_rows"] == []
    sims = feats @ feats.T
    assert sims[CLASSES.index("car"), CLASSES.index("truck")] \
        > sims[CLASSES.index("car"), CLASSES.index("banana")]
    assert sims[CLASSES.index("apple"), CLASSES.index("banana")] \
        > sims[CLASSES.index("apple"), CLASSES.index("truck")]
    # Zero-shot: each image's class-derived caption is nearest to its own class text.
    describe = np.load(lm["out"] / "text.npy")[:, 0].astype(np.float32)
    assert ((describe @ feats.T).argmax(1) == lm["labels"]).mean() > 0.9

    bad = root / "bad_descriptions.jsonl"
    bad.write_text(json.dumps({"class": 1, "name": "kitten", "text": "x"}) + "\n")
    line = refused("--classes", classes, "--descriptions", bad, "--model", "minilm", "--out",
                   root / "bad")
    assert "bad_descriptions.jsonl:1" in line and "kitten" in line


def write_li_files(folder, rows):
    """Li et al.'s data/<Dataset>/ pair: label2text.txt (`folder id name`) and chatgpt.txt, one
    description a line."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "label2text.txt").write_text("".join(f"{f} {k + 1} {n}\n"
                                                   for k, (f, n, _) in enumerate(rows)))
    # blank lines are skipped
    (folder / "chatgpt.txt").write_text("".join(f"{d}\n\n" for _, _, d in rows))
    return folder / "chatgpt.txt"


def test_li_chatgpt_descriptions_and_their_template(tmp_path):
    """Issue 20: Li et al.'s chatgpt.txt is read by the order of its label2text.txt (matched to
    classes.txt by name, not by order) and, by default, makes their class text "a photo of " + name
    + " . " + description: the same vectors as the same texts given as class_descriptions.jsonl with
    their template."""
    classes = tmp_path / "classes.txt"
    classes.write_text("baklava\napple pie\nchurros\n")  # our order: ID classes first
    rows = [("apple_pie", "apple_pie", "A round golden pie."),
            ("baklava", "baklava", "Layered nut pastry."),
            ("churros", "churros", "Long fried dough sticks.")]
    chatgpt = write_li_files(tmp_path / "Food101", rows)
    run("--classes", classes, "--descriptions", chatgpt, "--model", "minilm", "--out",
        tmp_path / "li")
    side = json.loads((tmp_path / "li" / "classes.json").read_text())
    assert side["template"] == "a photo of {name} . {description}" \
        and side["descriptions_format"] == "li-chatgpt"
    assert side["names"] == ["baklava", "apple pie", "churros"] \
        and side["without_description"] == []
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"class": c, "text": t}) + "\n" for c, t in
                            [(0, "Layered nut pastry."), (1, "A round golden pie."),
                             (2, "Long fried dough sticks.")]))
    run("--classes", classes, "--descriptions", same, "--template",
        "a photo of {name} . {description}", "--model", "minilm", "--out", tmp_path / "ours")
    assert np.array_equal(np.load(tmp_path / "li" / "classes.npy"),
                          np.load(tmp_path / "ours" / "classes.npy"))
    encode = load_module()
    texts = encode.class_texts(["apple pie"], {0: ["A round golden pie."]}, encode.LI_TEMPLATE)
    assert texts == [["a photo of apple pie . A round golden pie."]]  # their exact string

    (tmp_path / "Food101" / "chatgpt.txt").write_text("only one\n")
    assert "1 descriptions" in refused("--classes", classes, "--descriptions", chatgpt, "--model",
                                       "minilm", "--out", tmp_path / "bad")
    write_li_files(tmp_path / "Food101", rows[:2] + [("tiramisu", "tiramisu", "Layered cake.")])
    line = refused("--classes", classes, "--descriptions", chatgpt, "--model", "minilm", "--out",
                   tmp_path / "bad")
    assert "label2text.txt:3: class 'tiramisu'" in line
    (tmp_path / "Food101" / "label2text.txt").unlink()
    assert "label2text.txt not found" in refused("--classes", classes, "--descriptions", chatgpt,
                                                 "--model", "minilm", "--out", tmp_path / "bad")


def test_probe_high_for_class_texts_near_chance_for_noise(lm):
    text = lm["out"] / "text.npy"
    proc = probe("--text", text, "--split", lm["split"], "--no-pixel-baseline")  # no images here
    report = json.loads((lm["out"] / "text.probe.json").read_text())
    results = report["results"]
    assert set(results) == {"describe", "noise", "all"} and report["folds"] == 5 \
        and report["rows"] == len(lm["labels"])
    assert report["groups"] == {"many": 0, "medium": 2, "few": 4}  # counts 40, 25 | 18, 10, 5, 2
    assert results["describe"]["overall"] > 0.9 and results["all"]["overall"] > 0.9
    assert results["noise"]["overall"] < report["majority"] + 0.1
    assert results["describe"]["overall"] - results["noise"]["overall"] > 0.4
    assert results["describe"]["many"] is None and results["describe"]["few"] is not None
    assert "describe" in proc.stdout and "noise" in proc.stdout
    # A capped subsample still probes every slot.
    probe("--text", text, "--split", lm["split"], "--max-images", 30, "--folds", 3,
          "--no-pixel-baseline")
    assert json.loads((lm["out"] / "text.probe.json").read_text())["rows"] == 30

    other = write_split(lm["root"] / "other" / "train.txt", lm["labels"][::-1])
    assert "another split" in refused("--text", text, "--split", other, "--no-pixel-baseline",
                                      script=PROBE)


# -------------------------------------------------------------------------------------- tiny CLIP
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random CLIP, byte-level BPE tokenizer and image processor, saved like a real one."""
    return build_tiny_clip(tmp_path_factory.mktemp("tinyclip") / "clip")


def clip_text_features(folder, texts):
    import torch
    from transformers import AutoModel, AutoTokenizer
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), \
        AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        out = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))
    return unit(getattr(out, "pooler_output", out).numpy())


@pytest.fixture(scope="module")
def clip_text(tmp_path_factory, clip):
    """30 images x 2 prompts: one missing caption, one image without captions, one empty caption."""
    root = tmp_path_factory.mktemp("cliptext")
    split = write_split(root / "data" / "train.txt", [i % 3 for i in range(30)])
    texts = {(i, p): f"{p} caption number {i} {'with a long tail ' * (i % 4)}"
             for i in range(30) for p in ("general", "t1")}
    texts[(7, "general")] = ""
    del texts[(3, "t1")], texts[(5, "general")], texts[(5, "t1")]
    records = [(i, p, t) for (i, p), t in sorted(texts.items(), key=lambda kv: -kv[0][0])]
    prompts = {"general": "Describe the image.", "t1": "What colour is it?"}
    captions = write_captions(root / "caps" / "captions.jsonl", split, prompts, records, 30)
    (root / "caps" / "captions.errors.jsonl").write_text(
        json.dumps({"index": 5, "path": "images/00005.png", "error": "bad"}) + "\n")
    return {"root": root, "split": split, "captions": captions, "texts": texts, "prompts": prompts,
            "records": records}


def test_clip_text_missing_filled_empty_counted(clip, clip_text):
    d = clip_text
    line = refused("--captions", d["captions"], "--split", d["split"], "--model", clip, "--out",
                   d["root"] / "no")
    assert "3 of 60" in line and "1 images have none" in line and "errors file" in line
    assert "5/general" in line and "3/t1" in line and "--allow-missing" in line

    out = d["root"] / "out"
    run("--captions", d["captions"], "--split", d["split"], "--model", clip, "--out", out,
        "--allow-missing", "--dtype", "fp32", "--batch-size", 7, "--chunk", 11)
    text = np.load(out / "text.npy").astype(np.float32)
    side = json.loads((out / "text.json").read_text())
    assert text.shape == (30, 2, 16) and side["prompts"] == ["general", "t1"]
    assert side["missing_rows"] == [5] and side["filled"] == [[3, "t1"]] \
        and side["empty_captions"] == 1
    assert side["encoder"] == str(clip) and not text[5].any()
    assert np.array_equal(text[3, 1], text[3, 0])
    rows = [(i, p) for i in range(30) for p in (0, 1) if i != 5 and (i, p) != (3, 1)]
    expected = clip_text_features(clip, [d["texts"][(i, ("general", "t1")[p])] for i, p in rows])
    got = np.stack([text[i, p] for i, p in rows])
    # row i is line i of the split, whatever the file order
    assert np.abs(got - expected).max() < 3e-3


def test_clip_text_in_encode_shards_merged(clip, clip_text):
    d = clip_text
    out = d["root"] / "sharded_out"
    base = ["--captions", d["captions"], "--split", d["split"], "--model", clip, "--out", out,
            "--allow-missing", "--dtype", "fp32"]
    run(*base, "--shard", "0/2")
    run(*base, env=dict(ENV, RANK="1", WORLD_SIZE="2"))  # the launcher's rank picks the shard
    assert np.load(out / "text.shard-1-of-2.npy").shape == (15, 2, 16)
    # split line numbers
    assert json.loads((out / "text.shard-1-of-2.json").read_text())["missing_rows"] == [5]
    run("--merge", "--out", out)
    merged, single = np.load(out / "text.npy"), np.load(d["root"] / "out" / "text.npy")
    side = json.loads((out / "text.json").read_text())
    assert merged.shape == single.shape and np.abs(merged.astype(np.float32) - single).max() < 3e-3
    assert side["missing_rows"] == [5] and side["filled"] == [[3, "t1"]] \
        and side["empty_captions"] == 1
    assert side["captions_sha256"] == sha256(d["captions"]) and side["shape"] == [30, 2, 16]
    # recomputed for the merged array
    assert side["sha256"] == sidecar_digest(out / "text.npy", side)


def test_clip_images_in_shards_bad_image_recorded(clip, tmp_path_factory):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel
    data = tmp_path_factory.mktemp("images") / "data"
    write_images(data, [c for c, n in enumerate(COUNTS) for _ in range(n // 2)])
    lines = (data / "train.txt").read_text().splitlines()
    bad = 4
    (data / lines[bad].rsplit(maxsplit=1)[0]).write_bytes(b"not a png")
    out = data.parent / "clip"
    args = ["--images", "--split", data / "train.txt", "--model", clip, "--out", out, "--dtype",
            "fp32", "--name", "images-train", "--batch-size", 8, "--chunk", 20, "--workers", 2]
    run(*args, "--shard", "0/2")
    run(*args, env=dict(ENV, RANK="1", WORLD_SIZE="2"))
    shard_errors = (out / "images-train.shard-0-of-2.errors.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in shard_errors] == [bad]
    run("--merge", "--out", out)
    feats = np.load(out / "images-train.npy").astype(np.float32)
    side = json.loads((out / "images-train.json").read_text())
    errors = [json.loads(line)
              for line in (out / "images-train.errors.jsonl").read_text().splitlines()]
    assert feats.shape == (len(lines), 16) and side["kind"] == "images"
    assert side["split_sha256"] == sha256(data / "train.txt")
    assert side["sha256"] == sidecar_digest(out / "images-train.npy", side)
    assert side["missing_rows"] == [bad] and [e["index"] for e in errors] == [bad] \
        and not feats[bad].any()
    assert side["encoder"] == str(clip) and side["normalized"] is True \
        and side["shape"] == [len(lines), 16]
    # Every other row is the model's own preprocessing + image tower on line i of the split.
    ok = [i for i in range(len(lines)) if i != bad]
    model, processor = AutoModel.from_pretrained(clip).eval(), \
        AutoImageProcessor.from_pretrained(clip)
    images = [Image.open(data / lines[i].rsplit(maxsplit=1)[0]).convert("RGB") for i in ok]
    with torch.inference_mode():
        out_feats = model.get_image_features(**processor(images=images, return_tensors="pt"))
    expected = unit(getattr(out_feats, "pooler_output", out_feats).numpy())
    assert np.abs(feats[ok] - expected).max() < 3e-3


# -------------------------------------------------------------------------------------- refusals
def test_refusals(tmp_path, clip):
    split = write_split(tmp_path / "train.txt", [0, 1, 0])
    other = write_split(tmp_path / "val.txt", [1, 1, 0])
    prompts = {"general": "Describe."}
    records = [(i, "general", f"text {i}") for i in range(3)]
    caps = write_captions(tmp_path / "a" / "captions.jsonl", split, prompts, records, 3)
    common = ["--model", clip, "--out", tmp_path / "out"]

    line = refused("--captions", caps, "--split", other, *common)
    assert "another split" in line and "captions.jsonl" in line and "val.txt" in line

    caps.write_text(caps.read_text() + "{not json\n")
    assert "captions.jsonl:4:" in refused("--captions", caps, "--split", split, *common)
    caps.write_text("".join(json.dumps({"index": i, "prompt": p, "text": t}) + "\n"
                            for i, p, t in records + [(1, "t9", "x")]))
    line = refused("--captions", caps, "--split", split, *common)
    assert "captions.jsonl:4:" in line and "t9" in line
    caps.write_text(json.dumps({"index": 3, "prompt": "general", "text": "x"}) + "\n")
    assert "captions.jsonl:1:" in refused("--captions", caps, "--split", split, *common)
    assert "not found" in refused("--captions", tmp_path / "none" / "captions.jsonl", "--split",
                                  split, *common)

    good = write_captions(tmp_path / "b" / "captions.jsonl", split, prompts, records, 3)
    line = refused("--captions", good, "--split", split, "--model", "nobody/no-such-model", "--out",
                   tmp_path / "out")
    assert "local folder" in line
    run("--captions", good, "--split", split, *common, "--dtype", "fp32")
    line = refused("--captions", good, "--split", split, *common, "--dtype", "bf16")
    assert "--overwrite" in line and "text.json" in line
    assert "exactly one" in refused("--captions", good, "--images", "--split", split, *common)
    # The probe is its own stage: `encode.py --probe` is told the probe.py command, flags renamed.
    line = refused("--probe", "--text", "t.npy", "--split", split, "--probe-folds=3",
                   "--probe-max", 9)
    assert line.endswith("--probe is its own stage now: python probe.py --text t.npy "
                         f"--split {split} --folds=3 --max-images 9")
    assert "--probe" not in run("--help").stdout and "--folds" in probe("--help").stdout
    assert "CLIP-family" in refused("--images", "--split", split, "--model", "minilm", "--out",
                                    tmp_path / "o2")


def test_class_texts_and_templates():
    encode = load_module()
    texts = encode.class_texts(["dog", "cat"], {0: ["It barks.", "It wags."]},
                               "a photo of a {name}.")
    assert texts == [["a photo of a dog. It barks.", "a photo of a dog. It wags."],
                     ["a photo of a cat."]]
    texts = encode.class_texts(["dog"], {0: ["furry"]}, "{name}, which is {description}")
    assert texts == [["dog, which is furry"]]
    assert encode.class_texts(["dog"], {}, "{name}, which is {description}") == [["dog, which is"]]
