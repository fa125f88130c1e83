"""encode.py and probe.py attacked as a user's bad day would: edited sidecars and arrays, a full
disk, bad --out, bad probe inputs, mixed caption runs, split paths leaving the root, an offline
machine; plus missing_rows, the up-to-date check and the probe's pixel baseline. Each test runs the
script as a user would (subprocess, tiny data, real file formats)."""
import cProfile  # noqa: F401  (the up-to-date test runs `python -m cProfile`)
import json
import os
import pstats
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_helpers import sidecar_digest  # noqa: E402
from test_encode import (COUNTS, ENV, PROBE, REPO, SCRIPT, probe, refused, run,  # noqa: E402
                         sha256, write_captions, write_images, write_split)
from tiny import build_tiny_clip  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tinyclip") / "clip")


def small_captions(root, n=6, prompts=("general",)):
    split = write_split(root / "data" / "train.txt", [i % 2 for i in range(n)])
    records = [(i, p, f"{p} caption {i}") for i in range(n) for p in prompts]
    return split, write_captions(root / "caps" / "captions.jsonl", split, {p: p for p in prompts},
                                 records, n)


def write_text_artifact(folder, array, split, prompts):
    """text.npy + text.json as encode.py writes them, sha256 too: only the content is attacked."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "text.npy", array.astype(np.float16))
    sidecar = {"kind": "text", "encoder": "test", "prompts": prompts, "shape": list(array.shape),
               "split_sha256": sha256(split), "missing_rows": []}
    sidecar["sha256"] = sidecar_digest(folder / "text.npy", sidecar)
    (folder / "text.json").write_text(json.dumps(sidecar))
    return folder / "text.npy"


# ------------------------------------------------------------------------ sidecars tied to arrays
def test_sidecar_sha256_catches_an_edited_sidecar_or_array(tmp_path, clip):
    split, caps = small_captions(tmp_path, prompts=("general", "t4"))
    out = tmp_path / "out"
    args = ["--captions", caps, "--split", split, "--model", clip, "--out", out, "--dtype", "fp32"]
    run(*args)
    side = json.loads((out / "text.json").read_text())
    assert side["sha256"] == sidecar_digest(out / "text.npy", side)
    probe_args = ["--text", out / "text.npy", "--split", split, "--no-pixel-baseline", "--folds", 2]
    probe(*probe_args)  # the untouched artifact is accepted

    # Slots reordered by hand: a consumer would train on t4 while recording `general`.
    (out / "text.json").write_text(json.dumps(dict(side, prompts=["t4", "general"])))
    assert "do not match (sha256)" in refused(*probe_args, script=PROBE)
    # a rerun does not call it up to date either
    assert "does not match its sidecar" in refused(*args)
    (out / "text.json").write_text(json.dumps(side))
    array = np.load(out / "text.npy")
    array[0, 0, 0] += 0.5
    np.save(out / "text.npy", array)
    assert "do not match (sha256)" in refused(*probe_args, script=PROBE)


# ------------------------------------------------------------------------ full disk, bad --out
def build_wide_clip(folder, width):
    """A tiny CLIP with `width`-wide features: a few hundred thousand rows fill any disk."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({ch: k + 2 for k, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1),
                        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8),
                        projection_dim=width)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32).save_pretrained(folder)
    return folder


def test_full_disk_is_one_line_before_the_memmap(tmp_path):
    # 4 MiB per row in float16: a split of 3M lines outgrows 12 TiB free, more than CI machines have
    width = 1 << 21
    free = shutil.disk_usage(tmp_path).free
    # the array needs a quarter more than the whole free space
    rows = int(free * 1.25) // (2 * width) + 1000
    if rows > 3_000_000:
        pytest.skip(f"{free / 2**40:.1f} TiB free: the split to fill it would be too long for a "
                    "unit test")
    model = build_wide_clip(tmp_path / "wide", width)
    split = tmp_path / "data" / "train.txt"
    split.parent.mkdir()
    split.write_text("".join(f"images/{i}.png 0\n" for i in range(rows)))
    caps = write_captions(tmp_path / "captions.jsonl", split, {"general": "Describe."},
                          [(0, "general", "a cat")], rows)
    out = tmp_path / "out"

    def at_most_64_mib_of_file():  # were the check missing, the run could not fill the real disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 26, 1 << 26))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--captions", str(caps), "--split",
                           str(split), "--model", str(model), "--out", str(out), "--allow-missing",
                           "--dtype", "fp32"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600,
                          preexec_fn=at_most_64_mib_of_file)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("encode.py: error: text.npy") and "GiB is free" in last, \
        proc.stderr[-2000:]
    # only the lock: nothing to resume from or trust
    assert sorted(p.name for p in out.iterdir()) == [".text.lock"]


def test_out_that_is_a_file_or_unwritable_fails_before_work(tmp_path, clip):
    split, caps = small_captions(tmp_path)
    target = tmp_path / "taken"
    target.write_text("not a folder")
    proc = run("--captions", caps, "--split", split, "--model", clip, "--out", target, check=False)
    assert proc.returncode == 1 \
        and proc.stderr.strip() == f"encode.py: error: {target} is a file, not a folder"
    assert proc.stdout == ""  # refused before the model was loaded or anything encoded
    proc = run("--captions", caps, "--split", split, "--model", clip, "--out", "/proc/vlmkd-out",
               check=False)
    assert proc.returncode == 1 \
        and proc.stderr.strip().startswith("encode.py: error: /proc/vlmkd-out is not writable")


# ------------------------------------------------------------------------ bad inputs
def test_probe_negative_label_and_nan_rows_are_one_line(tmp_path):
    split = tmp_path / "train.txt"
    split.write_text("images/0.png 0\nimages/1.png 1\nimages/2.png -1\nimages/3.png 1\n")
    text = write_text_artifact(tmp_path / "neg", np.eye(4, 8)[:, None], split, ["general"])
    line = refused("--text", text, "--split", split, "--no-pixel-baseline", script=PROBE)
    assert "train.txt:3:" in line and "integer label >= 0" in line

    split = write_split(tmp_path / "ok" / "train.txt", [0, 1] * 6)
    array = np.tile(np.eye(2, 8)[[0, 1] * 6][:, None], (1, 2, 1))
    array[7, 1, 3] = np.nan
    text = write_text_artifact(tmp_path / "nan", array, split, ["general", "t1"])
    line = refused("--text", text, "--split", split, "--no-pixel-baseline", script=PROBE)
    assert line.endswith("text.npy: row 7 holds NaN or inf")


def test_duplicate_caption_records_with_different_texts_are_named(tmp_path, clip):
    split = write_split(tmp_path / "train.txt", [0, 1, 0])
    records = [(0, "general", "a dog"), (1, "general", "a cat"), (2, "general", "a dog again"),
               (1, "general", "a cat")]
    caps = write_captions(tmp_path / "a" / "captions.jsonl", split, {"general": "Describe."},
                          records, 3)
    # same text twice: fine
    run("--captions", caps, "--split", split, "--model", clip, "--out", tmp_path / "same")
    records.append((2, "general", "a horse"))
    caps = write_captions(tmp_path / "b" / "captions.jsonl", split, {"general": "Describe."},
                          records, 3)
    line = refused("--captions", caps, "--split", split, "--model", clip, "--out",
                   tmp_path / "other")
    assert "captions.jsonl:5:" in line and "line 3" in line and "'general'" in line
    assert not (tmp_path / "other" / "text.npy").exists()


def test_split_paths_outside_the_root_are_refused(tmp_path, clip):
    from PIL import Image
    data = tmp_path / "data"
    write_images(data, [0, 1, 0, 1])
    # a real image the split must not reach
    Image.new("RGB", (28, 28), "white").save(tmp_path / "outside.png")
    for bad_line in ("../outside.png 1", f"{tmp_path / 'outside.png'} 1"):
        lines = (data / "train.txt").read_text().splitlines()
        (data / "bad.txt").write_text("\n".join(lines[:2] + [bad_line] + lines[3:]) + "\n")
        line = refused("--images", "--split", data / "bad.txt", "--model", clip, "--out",
                       tmp_path / "out")
        assert "bad.txt:3:" in line and "leaves the data root" in line
    assert not (tmp_path / "out" / "images.npy").exists()


# ------------------------------------------------------------------------ offline hub
class SilentHub:
    """A TCP server on localhost that counts connections and never answers: a listed, dead hub."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def env(self, tmp_path):
        env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        return dict(env, HF_ENDPOINT=f"http://127.0.0.1:{self.sock.getsockname()[1]}",
                    HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1,localhost",
                    no_proxy="127.0.0.1,localhost")


@pytest.fixture
def hub():
    server = SilentHub()
    yield server
    server.sock.close()


def test_minilm_never_contacts_the_hub(tmp_path, hub):
    split, caps = small_captions(tmp_path)
    start = time.time()
    proc = run("--captions", caps, "--split", split, "--model", "minilm", "--out", tmp_path / "out",
               env=hub.env(tmp_path))
    took = time.time() - start
    assert hub.connections == [], "encode.py --model minilm contacted the hub"
    assert "Retry" not in proc.stderr and "thrown while requesting" not in proc.stderr, \
        proc.stderr[-2000:]
    assert np.load(tmp_path / "out" / "text.npy").shape == (6, 1, 384)
    # no connection is what keeps it fast, not a clock
    print(f"encoded in {took:.1f} s without a word to the hub")


def test_unreachable_hub_id_fails_fast_with_one_line(tmp_path, hub):
    split, caps = small_captions(tmp_path)
    start = time.time()
    proc = run("--captions", caps, "--split", split, "--model", "someone/some-encoder", "--out",
               tmp_path / "out", env=hub.env(tmp_path), check=False)
    took = time.time() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert "cannot be reached" in lines[0] and "local folder" in lines[0] \
        and "hf download" in lines[0]
    # Fast means one request, never answered, then the error (huggingface_hub's client retried 5x).
    assert len(hub.connections) == 1, f"{len(hub.connections)} connections"
    print(f"failed after {took:.1f} s and one connection")


# ------------------------------------------------------------------------ up to date, probe
def test_up_to_date_rerun_does_not_parse_the_captions(tmp_path, clip):
    split, caps = small_captions(tmp_path, n=60, prompts=("general", "t1"))  # 120 caption records
    args = ["--captions", caps, "--split", split, "--model", clip, "--out", tmp_path / "out",
            "--dtype", "fp32"]

    def json_loads_calls(name):
        proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / name),
                               str(SCRIPT), *map(str, args)],
                              capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stats = pstats.Stats(str(tmp_path / name)).stats
        return proc.stdout, sum(v[1] for (file, _, func), v in stats.items()
                                if func == "loads"
                                and file.endswith(os.path.join("json", "__init__.py")))

    stdout, calls = json_loads_calls("fresh.prof")
    # a run with work parses every record: the count can fail
    assert "wrote" in stdout and calls >= 120, calls
    stdout, calls = json_loads_calls("rerun.prof")
    assert "up to date" in stdout and calls < 20, calls  # the meta and the sidecar, not 120 records


def test_probe_reports_the_pixel_baseline_next_to_image_derived_text(tmp_path):
    from PIL import Image
    data = tmp_path / "data"
    labels = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    split = write_images(data, labels)
    words = ["dark", "dim", "grey", "pale", "bright"]
    records = []
    # text that is a function of the pixels only, as a random VLM's captions are
    for i in range(len(labels)):
        pixels = np.asarray(Image.open(data / f"images/{i:05d}.png"), np.float32)
        blocks = pixels.reshape(4, 7, 4, 7).mean(axis=(1, 3)).ravel()
        records.append((i, "general", " ".join(f"{words[min(4, int(b // 40))]}{k}"
                                               for k, b in enumerate(blocks))))
    caps = write_captions(tmp_path / "captions.jsonl", split, {"general": "Describe."}, records,
                          len(labels))
    run("--captions", caps, "--split", split, "--model", "minilm", "--out", tmp_path / "text")
    proc = probe("--text", tmp_path / "text" / "text.npy", "--split", split)
    report = json.loads((tmp_path / "text" / "text.probe.json").read_text())
    pixels, text = report["results"]["pixels"], report["results"]["general"]
    assert set(report["results"]) == {"general", "pixels"} \
        and report["pixels"].startswith("random projection")
    assert pixels["overall"] > report["chance"] + 0.4 and pixels["few"] is not None \
        and pixels["medium"] is not None
    # image-derived text is no better than its pixels
    assert text["overall"] <= pixels["overall"] + 0.1
    table = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()}
    assert f"{100 * pixels['overall']:5.1f}" in table["pixels"] \
        and f"{100 * text['overall']:5.1f}" in table["general"]
    assert "restate the image" in proc.stdout


# ------------------------------------------------------------------------ one writer, merged shards
def test_two_encodes_on_one_stem_the_second_is_refused(tmp_path, clip):
    """Two encode.py on one --out and stem: one died on the other's `.partial`. The first is stopped
    (SIGSTOP) once it holds the stem's lock, so the test does not race it. Its own output as a job
    log (pipes): one line of what it was given, progress lines with a rate, the summary last."""
    split, caps = small_captions(tmp_path)
    out = tmp_path / "out"
    args = ["--captions", caps, "--split", split, "--model", clip, "--out", out, "--dtype", "fp32"]
    first = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=ENV, cwd=REPO,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock = out / ".text.lock"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and \
                "encode.py" not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before the second started"
        line = refused(*args)
        assert f"{out / 'text.npy'} is in use by pid {first.pid} (encode.py)" in line, line
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    given = [line for line in stdout.splitlines() if "device cpu, dtype " in line]
    assert len(given) == 1 and given[0].startswith(
        f"encoding the captions of 6 images x 1 prompts with {clip}, 1 process -> ")
    assert given[0].endswith("dtype fp32 (--dtype)") \
        and stdout.splitlines()[-1].startswith(f"wrote {out}")
    assert [line for line in stderr.splitlines() if line.endswith("sent/s]")], stderr[-2000:]


def write_shard(folder, stem, array, **fields):
    """One finished encode shard as encode.py writes it: array, sidecar, sha256 tying the two."""
    np.save(folder / f"{stem}.npy", array.astype(np.float16))
    sidecar = {"encoder": "test", "prompts": ["general"], "split_sha256": "s",
               "captions_sha256": "c", "num_images": 6, "normalized": True,
               "shape": list(array.shape), "config_hash": stem, **fields}
    sidecar["sha256"] = sidecar_digest(folder / f"{stem}.npy", sidecar)
    (folder / f"{stem}.json").write_text(json.dumps(sidecar))


def test_merge_refuses_a_shard_sidecar_that_states_a_wrong_shape(tmp_path):
    """A sidecar edited to another shape, sha256 recomputed, ended --merge in a numpy traceback."""
    rows = np.random.default_rng(0).standard_normal((6, 1, 8))
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)

    def shards(folder, shape_of=None, wrong=None):
        folder.mkdir()
        for i in range(2):
            write_shard(folder, f"text.shard-{i}-of-2", rows[i::2], kind="text", missing_rows=[],
                        filled=[], empty_captions=0, **({"shape": wrong} if i == shape_of else {}))
        return folder
    run("--merge", "--out", shards(tmp_path / "ok"))  # the honest shards merge, row i = line i
    assert np.array_equal(np.load(tmp_path / "ok" / "text.npy"), rows.astype(np.float16))
    for shard in (0, 1):
        line = refused("--merge", "--out", shards(tmp_path / f"wrong{shard}", shard, [3, 1, 4]))
        assert f"text.shard-{shard}-of-2.json: shape [3, 1, 4] does not match its array [3, 1, 8]" \
            in line, line
        assert not (tmp_path / f"wrong{shard}" / "text.npy").exists()


def test_merge_reads_only_errors_files_inside_the_shards_folder(tmp_path):
    """Image shards name their errors file. An absolute path from another machine ended --merge in a
    FileNotFoundError; one naming a file outside the folder (sha256 recomputed) got its content
    copied into images.errors.jsonl, exit 0. Paths are written relative to the artifact and must
    resolve inside its folder."""
    secret = tmp_path / "secret.txt"
    secret.write_text('{"index": 0, "path": "not yours", "error": "x"}\n')
    rows = np.eye(6, 8)

    def shards(folder, errors_of_0=None):
        folder.mkdir()
        for i in range(2):
            errors = folder / f"images.shard-{i}-of-2.errors.jsonl"
            errors.write_text(json.dumps({"index": i + 2, "path": f"images/{i + 2:05d}.png",
                                          "error": "bad"}) + "\n")
            write_shard(folder, f"images.shard-{i}-of-2", rows[i::2], kind="images",
                        missing_rows=[i + 2],
                        errors=errors_of_0 if i == 0 and errors_of_0 else errors.name)
        return folder
    ok = shards(tmp_path / "ok")
    # names resolve against the folder, not the cwd
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", "--out", str(ok)],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    side = json.loads((ok / "images.json").read_text())
    assert side["errors"] == "images.errors.jsonl" and side["missing_rows"] == [2, 3]
    assert [json.loads(line)["index"]
            for line in (ok / "images.errors.jsonl").read_text().splitlines()] == [2, 3]
    for k, name in enumerate(("/home/someone/runs/x/clip/images.shard-0-of-2.errors.jsonl",
                              "../secret.txt", str(secret))):
        folder = shards(tmp_path / f"attack{k}", name)
        line = refused("--merge", "--out", folder)
        assert "images.shard-0-of-2.json (`errors`)" in line \
            and f"names {name!r}, which is not a file inside" in line
        assert not (folder / "images.errors.jsonl").exists()
