"""caption.py run as a user runs it, on a tiny random LLaVA built from configs (no download)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "caption.py"
NUM_GOOD, BAD = 14, (5, 11)  # split lines 5 and 11 are a truncated PNG and a text file
NUM_IMAGES = NUM_GOOD + len(BAD)
PROMPTS = ["general", "t1", "t2", "t3", "t4"]
TOKENS = "10"
# One intra-op thread: on 2 shared cores, OpenMP threads waiting for a busy core make generation ~30x slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "RANK": "0", "WORLD_SIZE": "1"}


def run(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, cwd=REPO, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"caption.py {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def texts(path):
    return {(r["index"], r["prompt"]): r["text"] for r in records(path)}


def error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("caption.py: error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    lines, good = [], 0
    for n in range(NUM_IMAGES):
        name = f"img/{n:02d}.png"
        if n == BAD[0]:
            Image.new("RGB", (40, 30), (200, 10, 10)).save(root / name)
            (root / name).write_bytes((root / name).read_bytes()[:60])
        elif n == BAD[1]:
            (root / name).write_text("not an image")
        else:
            # Different colours and sizes (one grayscale) so captions differ between images.
            size = (24 + 4 * (good % 5), 28 + 3 * (good % 4))
            mode = "L" if good == 3 else "RGB"
            color = (good * 37) % 256 if mode == "L" else ((good * 37) % 256, (good * 91) % 256, (good * 53) % 256)
            Image.new(mode, size, color).save(root / name)
            good += 1
        lines.append(f"{name} {n % 3}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("T-shirt/top\nTrouser\nAnkle boot\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny") / "tiny-llava"


def caption_args(data, tiny, out, *extra):
    # float32: batched and one-at-a-time logits then agree to ~1e-5 (padding, mask and positions are right), while
    # bf16 rounding (1 ulp ~ 0.03 at these logit sizes) flips a random model's near-ties between batch shapes.
    return ["--split", data / "train.txt", "--vlm", "tiny", "--tiny-dir", tiny, "--prompts", REPO / "prompts",
            "--max-new-tokens", TOKENS, "--dtype", "float32", "--out", out, *extra]


@pytest.fixture(scope="module")
def baseline(data, tiny, tmp_path_factory):
    """Batched (4 pairs a call) run over every image: the reference the other runs must match."""
    out = tmp_path_factory.mktemp("base") / "captions.jsonl"
    proc = run(*caption_args(data, tiny, out, "--batch-size", "4"))
    return out, proc


@pytest.fixture(scope="module")
def module():
    """caption.py imported: runs in this process (the same main()) skip a ~6 s interpreter start each."""
    import torch
    torch.set_num_threads(1)  # see ENV
    spec = importlib.util.spec_from_file_location("caption_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_baseline_records_meta_and_bad_images(baseline, data):
    out, proc = baseline
    recs = records(out)
    good = [i for i in range(NUM_IMAGES) if i not in BAD]
    assert sorted((r["index"], r["prompt"]) for r in recs) == sorted((i, p) for i in good for p in PROMPTS)
    assert all(isinstance(r["text"], str) and r["path"].startswith("img/") for r in recs)
    assert len({r["text"] for r in recs}) > len(recs) // 2, "a random model still gives varied captions"
    errors = records(out.with_name("captions.errors.jsonl"))
    assert sorted(e["index"] for e in errors) == list(BAD) and all(e["error"] and e["path"] for e in errors)
    assert "2 bad images" in proc.stdout and "RANDOM" in proc.stdout
    assert "quant none" in proc.stdout  # no CUDA and no --quant: bf16
    meta = json.loads(out.with_name("captions.meta.json").read_text())
    assert meta["model"] == "tiny" and meta["tiny_random"] is True and meta["quant"] == "none" and meta["dtype"] == "float32"
    assert [p["id"] for p in meta["prompts"]] == PROMPTS and all(len(p["sha256"]) == 64 for p in meta["prompts"])
    import hashlib
    assert meta["split_sha256"] == hashlib.sha256((data / "train.txt").read_bytes()).hexdigest()
    assert meta["num_images"] == NUM_IMAGES and meta["generation"]["max_new_tokens"] == int(TOKENS)
    assert set(meta["versions"]) >= {"torch", "transformers", "bitsandbytes"}


def test_batched_equals_one_at_a_time(baseline, data, tiny, tmp_path, module):
    out = tmp_path / "captions.jsonl"
    module.main(list(map(str, caption_args(data, tiny, out, "--batch-size", "1"))))  # in this process: saves a start
    assert texts(out) == texts(baseline[0])


def test_kill_and_resume(baseline, data, tiny, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = [sys.executable, str(SCRIPT), *map(str, caption_args(data, tiny, out, "--batch-size", "2"))]
    proc = subprocess.Popen(args, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_text().count("\n") >= 4):
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 4 <= written < (NUM_GOOD) * len(PROMPTS)
    with open(out, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"index": 13, "prompt": "t')
    resumed = run(*caption_args(data, tiny, out, "--batch-size", "2"))
    assert "truncated last line" in resumed.stdout and f"{written} done before" in resumed.stdout
    recs = records(out)
    assert len(recs) == len({(r["index"], r["prompt"]) for r in recs})  # exactly one record per pair
    assert texts(out) == texts(baseline[0])


def test_two_shards_cover_everything_once_and_merge(baseline, data, tiny, tmp_path, module, capsys):
    out = tmp_path / "captions.jsonl"
    # Shard 0 by flag, shard 1 the way torchrun starts it (RANK / WORLD_SIZE), both at once.
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *map(str, caption_args(data, tiny, out, *extra))],
                              env={**ENV, **env}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra, env in ((["--shard", "0/2"], {}), ([], {"RANK": "1", "WORLD_SIZE": "2"}))]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    shard_texts = [texts(tmp_path / f"captions.shard-{i}-of-2.jsonl") for i in range(2)]
    assert {i % 2 for i, _ in shard_texts[0]} == {0} and {i % 2 for i, _ in shard_texts[1]} == {1}
    assert json.loads((tmp_path / "captions.shard-1-of-2.meta.json").read_text())["shard"] == [1, 2]
    module.main(["--merge", "--out", str(out)])
    merged = capsys.readouterr().out
    assert "no gaps" in merged and "merged 2 of 2 shards" in merged
    recs = records(out)
    assert [(r["index"], r["prompt"]) for r in recs] == sorted(((r["index"], r["prompt"]) for r in recs),
                                                              key=lambda k: (k[0], PROMPTS.index(k[1])))
    assert texts(out) == texts(baseline[0])
    assert sorted(e["index"] for e in records(tmp_path / "captions.errors.jsonl")) == list(BAD)
    assert json.loads((tmp_path / "captions.meta.json").read_text())["shard"] is None

    # A lost caption is reported as a gap, in one line.
    shard = tmp_path / "captions.shard-1-of-2.jsonl"
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(SystemExit) as exc:
        module.main(["--merge", "--out", str(out)])
    assert "GAPS: 1 (image, prompt) pairs missing" in str(exc.value) and "\n" not in str(exc.value)


def test_4bit_with_name_hint(data, tiny, tmp_path, module):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "general.txt").write_text("Describe this image.\n")
    (prompts / "named.txt").write_text("What tells this {name} apart from other clothes?\n")
    out = tmp_path / "captions.jsonl"
    module.main(list(map(str, ["--split", data / "train.txt", "--vlm", "tiny", "--tiny-dir", tiny, "--prompts", prompts,
                               "--max-new-tokens", "4", "--out", out, "--quant", "4bit", "--limit", "3", "--name-hint",
                               "--classes", data / "classes.txt"])))
    meta = json.loads(out.with_name("captions.meta.json").read_text())
    assert meta["quant"] == "4bit" and meta["name_hint"] is True and meta["classes_sha256"]
    assert sorted(texts(out)) == sorted((i, p) for i in range(3) for p in ("general", "named"))


def test_class_descriptions_resume(data, tiny, tmp_path, module, capsys):
    out = tmp_path / "class_descriptions.jsonl"
    args = ["--classes", data / "classes.txt", "--vlm", "tiny", "--tiny-dir", tiny, "--max-new-tokens", "6", "--dtype", "float32",
            "--out", out]
    run(*args)
    first = records(out)
    assert [(r["class"], r["name"]) for r in first] == [(0, "T-shirt/top"), (1, "Trouser"), (2, "Ankle boot")]
    meta = json.loads(out.with_name("class_descriptions.meta.json").read_text())
    assert meta["prompts"][0]["id"] == "class_description" and "{name}" in meta["prompts"][0]["text"]
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:1]))
    module.main(list(map(str, args)))  # the resume, in this process
    assert "1 done before" in capsys.readouterr().out and records(out) == first


def test_changed_settings_are_refused(baseline, data, tiny, module):
    out = baseline[0]
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exc:  # fails on the sidecar, before any model is loaded
        module.main(list(map(str, caption_args(data, tiny, out, "--max-new-tokens", "11"))))
    assert "`generation`" in str(exc.value) and "another --out" in str(exc.value)
    assert out.read_bytes() == before


def test_bad_input_one_line_errors(data, tiny, tmp_path, module):
    def fails(*args):
        with pytest.raises(SystemExit) as exc:
            module.main(list(map(str, args)))
        msg = str(exc.value)
        assert msg.startswith("caption.py: error:") and "\n" not in msg
        return msg

    with pytest.raises(SystemExit) as exc:  # every help text renders (argparse chokes on a stray %)
        module.main(["--help"])
    assert exc.value.code == 0
    out = tmp_path / "c.jsonl"
    assert "--split" in fails("--split", tmp_path / "missing.txt", "--out", out)
    (tmp_path / "empty").mkdir()
    assert "--prompts" in fails("--split", data / "train.txt", "--prompts", tmp_path / "empty", "--out", out)
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "general.txt").write_text("Is this a {name}?")
    assert "--name-hint" in fails("--split", data / "train.txt", "--prompts", tmp_path / "named", "--out", out)
    (tmp_path / "bad.txt").write_text("img/00.png 0\nno-label-here\n")
    assert "bad.txt:2" in fails("--split", tmp_path / "bad.txt", "--out", out)


def test_offline_missing_model_says_what_to_pass(data, tmp_path):
    proc = run("--split", data / "train.txt", "--vlm", "llava-hf/no-such-model-here", "--out", tmp_path / "c.jsonl", check=False)
    line = error_line(proc)
    assert "offline" in line and "--vlm /local/dir" in line and "--vlm tiny" in line


def test_read_jsonl_repairs_only_the_last_line(tmp_path, module):
    path = tmp_path / "c.jsonl"
    for data, kept, after in [(b'{"a": 1}\n{"a": 2}', 2, b'{"a": 1}\n{"a": 2}\n'),  # whole record, newline lost
                              (b'{"a": 1}\n{"a": 2', 1, b'{"a": 1}\n'),             # killed mid-record
                              (b'{"a": 1}\n', 1, b'{"a": 1}\n')]:
        path.write_bytes(data)
        assert len(module.read_jsonl(path, repair=True)) == kept and path.read_bytes() == after
    path.write_bytes(b'{"a": 1}\n{"a"\n{"a": 3}\n')
    with pytest.raises(SystemExit, match="c.jsonl:2"):
        module.read_jsonl(path, repair=True)
