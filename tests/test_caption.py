"""caption.py run as a user runs it, on a tiny random LLaVA built from configs (no download) by
`python tests/tiny.py llava DIR`, as `make demo VLM=tiny` builds it."""
import importlib.util
import json
import os
import resource
import shutil
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
# One intra-op thread: on 2 shared cores OpenMP threads waiting on a busy core slow generation ~30x.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "RANK": "0", "WORLD_SIZE": "1"}


def run(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=env or ENV, cwd=REPO, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"caption.py {' '.join(map(str, args))} "
                             f"failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def texts(path):
    return {(r["index"], r["prompt"]): r["text"] for r in records(path)}


def error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("caption.py: error:")]
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
            color = (good * 37) % 256 if mode == "L" \
                else ((good * 37) % 256, (good * 91) % 256, (good * 53) % 256)
            Image.new(mode, size, color).save(root / name)
            good += 1
        lines.append(f"{name} {n % 3}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("T-shirt/top\nTrouser\nAnkle boot\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llava"
    subprocess.run([sys.executable, str(REPO / "tests" / "tiny.py"), "llava", str(folder)], env=ENV,
                   check=True, capture_output=True, timeout=300)
    return folder


def caption_args(data, tiny, out, *extra):
    # float32: batched and one-at-a-time logits then agree to ~1e-5 (padding, mask and positions are
    # right), while bf16 rounding (1 ulp ~ 0.03 at these logit sizes) flips a random model's
    # near-ties between batch shapes. The device stated too: with a GPU, --quant auto would be 4bit.
    return ["--split", data / "train.txt", "--vlm", tiny, "--prompts", REPO / "prompts",
            "--max-new-tokens", TOKENS, "--dtype", "fp32", "--device", "cpu", "--out", out, *extra]


@pytest.fixture(scope="module")
def baseline(data, tiny, tmp_path_factory):
    """Batched (4 pairs a call) run over every image: the reference the other runs must match."""
    out = tmp_path_factory.mktemp("base") / "captions.jsonl"
    proc = run(*caption_args(data, tiny, out, "--batch-size", "4"))
    return out, proc


@pytest.fixture(scope="module")
def module():
    """caption.py imported: runs in this process (the same main()) skip a ~6 s interpreter start."""
    import torch
    torch.set_num_threads(1)  # see ENV
    spec = importlib.util.spec_from_file_location("caption_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # die() names the script from argv[0], as when run as a user runs it
    argv0, sys.argv[0] = sys.argv[0], str(SCRIPT)
    yield mod
    sys.argv[0] = argv0


def test_baseline_records_meta_and_bad_images(baseline, data, tiny):
    out, proc = baseline
    recs = records(out)
    good = [i for i in range(NUM_IMAGES) if i not in BAD]
    assert sorted((r["index"], r["prompt"]) for r in recs) \
        == sorted((i, p) for i in good for p in PROMPTS)
    assert all(isinstance(r["text"], str) and r["path"].startswith("img/") for r in recs)
    assert len({r["text"] for r in recs}) > len(recs) // 2, \
        "a random model still gives varied captions"
    errors = records(out.with_name("captions.errors.jsonl"))
    assert sorted(e["index"] for e in errors) == list(BAD) \
        and all(e["error"] and e["path"] for e in errors)
    assert "2 bad images" in proc.stdout and "RANDOM" in proc.stdout
    assert "quant none" in proc.stdout  # --device cpu and no --quant: no bitsandbytes
    meta = json.loads(out.with_name("captions.meta.json").read_text())
    assert meta["model"] == str(tiny) and meta["tiny_random"] is True and meta["quant"] == "none"
    assert meta["dtype"] == "fp32" and meta["dtype_chosen_by"] == "--dtype" \
        and meta["processor"] == {}
    assert [p["id"] for p in meta["prompts"]] == PROMPTS \
        and all(len(p["sha256"]) == 64 for p in meta["prompts"])
    import hashlib
    assert meta["split_sha256"] == hashlib.sha256((data / "train.txt").read_bytes()).hexdigest()
    assert meta["num_images"] == NUM_IMAGES and meta["generation"]["max_new_tokens"] == int(TOKENS)
    assert set(meta["versions"]) >= {"torch", "transformers", "bitsandbytes"}


def test_batched_equals_one_at_a_time(baseline, data, tiny, tmp_path, module):
    out = tmp_path / "captions.jsonl"
    # in this process: saves a start
    module.main(list(map(str, caption_args(data, tiny, out, "--batch-size", "1"))))
    assert texts(out) == texts(baseline[0])


def test_the_same_command_twice_gives_the_same_bytes(baseline, data, tiny, tmp_path, module):
    """Determinism (CPU, greedy): the same command again writes a byte-identical captions.jsonl."""
    out = tmp_path / "captions.jsonl"
    module.main(list(map(str, caption_args(data, tiny, out, "--batch-size", "4"))))
    assert out.read_bytes() == baseline[0].read_bytes()


def test_dtype_auto_is_decided_by_the_hardware_both_ways(module, monkeypatch):
    """--dtype auto: bf16 on a CPU that computes it natively, fp32 on one that would emulate it, and
    an explicit --dtype wins (a run says the choice and its reason in its one launch line:
    test_launch_line_...). Both answers of the hardware check are given, whatever this CPU has."""
    import torch
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(module, "has_native_bf16", lambda device, *a: native)
        dtype, why = module.resolve_dtype("auto", cpu)
        assert dtype == expected and why.startswith("auto: this CPU")
        assert module.resolve_dtype("fp16", cpu) == ("fp16", "--dtype")


def test_kill_and_resume(baseline, data, tiny, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = [sys.executable, str(SCRIPT),
            *map(str, caption_args(data, tiny, out, "--batch-size", "2"))]
    proc = subprocess.Popen(args, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None \
            and not (out.exists() and out.read_text().count("\n") >= 4):
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
    # exactly one record per pair
    assert len(recs) == len({(r["index"], r["prompt"]) for r in recs})
    assert texts(out) == texts(baseline[0])


def test_two_shards_cover_everything_once_and_merge(baseline, data, tiny, tmp_path, module, capsys):
    out = tmp_path / "captions.jsonl"
    # Shard 0 by flag, shard 1 the way torchrun starts it (RANK / WORLD_SIZE), both at once.
    procs = [subprocess.Popen([sys.executable, str(SCRIPT),
                               *map(str, caption_args(data, tiny, out, *extra))],
                              env={**ENV, **env}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
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
    assert [(r["index"], r["prompt"]) for r in recs] \
        == sorted(((r["index"], r["prompt"]) for r in recs),
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
    module.main(list(map(str, ["--split", data / "train.txt", "--vlm", tiny, "--prompts", prompts,
                               "--max-new-tokens", "4", "--out", out, "--quant", "4bit", "--limit",
                               "3", "--name-hint", "--classes", data / "classes.txt"])))
    meta = json.loads(out.with_name("captions.meta.json").read_text())
    assert meta["quant"] == "4bit" and meta["name_hint"] is True and meta["classes_sha256"]
    assert sorted(texts(out)) == sorted((i, p) for i in range(3) for p in ("general", "named"))


def test_class_descriptions_resume(data, tiny, tmp_path, module, capsys):
    out = tmp_path / "class_descriptions.jsonl"
    args = ["--classes", data / "classes.txt", "--vlm", tiny, "--max-new-tokens", "6",
            "--dtype", "fp32", "--out", out]
    run(*args)
    first = records(out)
    assert [(r["class"], r["name"]) for r in first] == [(0, "T-shirt/top"), (1, "Trouser"),
                                                        (2, "Ankle boot")]
    meta = json.loads(out.with_name("class_descriptions.meta.json").read_text())
    assert meta["prompts"][0]["id"] == "class_description" \
        and "{name}" in meta["prompts"][0]["text"]
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
    assert "missing.txt not found" in fails("--split", tmp_path / "missing.txt", "--out", out)
    (tmp_path / "empty").mkdir()
    assert "--prompts" in fails("--split", data / "train.txt", "--prompts", tmp_path / "empty",
                                "--out", out)
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "general.txt").write_text("Is this a {name}?")
    assert "--name-hint" in fails("--split", data / "train.txt", "--prompts", tmp_path / "named",
                                  "--out", out)
    (tmp_path / "bad.txt").write_text("img/00.png 0\nno-label-here\n")
    assert "bad.txt:2" in fails("--split", tmp_path / "bad.txt", "--out", out)


    (tmp_path / "escape.txt").write_text("img/00.png 0\n../outside.png 1\n")
    # paths stay under the root
    assert "escape.txt:2" in fails("--split", tmp_path / "escape.txt", "--out", out)
    (tmp_path / "afile").write_text("")  # an --out under a file fails before the model is loaded
    assert "afile is a file" in fails("--split", data / "train.txt", "--out",
                                      tmp_path / "afile" / "c.jsonl")
    assert "--processor-kwargs is not JSON" in fails("--split", data / "train.txt",
                                                     "--processor-kwargs", "{size: 1", "--out", out)


def test_typed_flags_list_their_choices(data, tmp_path, module, capsys):
    for flag, value in (("--dtype", "float32"), ("--quant", "3bit")):
        with pytest.raises(SystemExit) as exc:
            module.main(["--split", str(data / "train.txt"), flag, value, "--out",
                         str(tmp_path / "c.jsonl")])
        allowed = ("bf16", "fp16", "fp32") if flag == "--dtype" \
            else ("auto", "4bit", "8bit", "none")
        err = capsys.readouterr().err.splitlines()[-1]
        assert exc.value.code == 2 and "invalid choice" in err and value in err, err
        assert all(choice in err.split("choose from")[1] for choice in allowed), err
    with pytest.raises(SystemExit):
        module.main(["--help"])
    usage = capsys.readouterr().out
    flags = [line.split()[0] for line in usage.splitlines() if line.startswith("  --")]
    assert len(flags) == len(set(flags)) \
        and {"--batch-size", "--image-splitting,", "--retry-bad,"} <= set(flags)
    assert "--no-image-splitting" in usage and "--batch_size" not in usage


def test_offline_fails_fast_with_download_hint(data, tmp_path, module, monkeypatch):
    """HF_HUB_OFFLINE set, or unset and no network (the hub's name does not resolve): one line,
    where from_pretrained used to retry for ~2.5 min. Fast: from_pretrained, whose client retries,
    is never called (its calls are counted, not timed; the seconds are printed)."""
    from huggingface_hub import constants
    calls = []

    def no_load(*args, **kwargs):
        calls.append(args)
        raise OSError("from_pretrained was called")
    monkeypatch.setattr(module.AutoProcessor, "from_pretrained", no_load)
    monkeypatch.setattr(module.AutoModelForImageTextToText, "from_pretrained", no_load)
    for offline, endpoint in ((True, constants.ENDPOINT), (False, "https://hub.invalid")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        start = time.time()
        with pytest.raises(SystemExit) as exc:
            module.main(["--split", str(data / "train.txt"), "--vlm", "llava-hf/no-such-model-here",
                         "--out", str(tmp_path / "c.jsonl")])
        seconds, line = time.time() - start, str(exc.value)
        assert "offline" in line \
            and "hf download llava-hf/no-such-model-here --local-dir DIR" in line
        assert "--vlm /local/dir" in line and "tests/tiny.py llava DIR" in line and "\n" not in line
        assert calls == [], "from_pretrained was asked to reach an unreachable hub"
        print(f"offline failure after {seconds:.2f} s "
              f"({'HF_HUB_OFFLINE' if offline else 'hub unreachable'})")
    assert not out_exists(tmp_path)


def out_exists(folder):
    return any(folder.glob("c.*"))


def test_scan_jsonl_repairs_only_the_last_line(tmp_path, module):
    path = tmp_path / "c.jsonl"
    for data, kept, after in [(b'{"a": 1}\n{"a": 2}', 2, b'{"a": 1}\n{"a": 2}\n'),  # newline lost
                              (b'{"a": 1}\n{"a": 2', 1, b'{"a": 1}\n'),  # killed mid-record
                              (b'{"a": 1}\n', 1, b'{"a": 1}\n')]:
        path.write_bytes(data)
        assert len(list(module.scan_jsonl(path, repair=True))) == kept \
            and path.read_bytes() == after
    path.write_bytes(b'{"a": 1}\n{"a"\n{"a": 3}\n')
    with pytest.raises(SystemExit, match="c.jsonl:2"):
        list(module.scan_jsonl(path, repair=True))


def test_vision_tower_runs_once_per_image(data, tiny, tmp_path, module):
    """5 prompts of an image share a batch; the tower sees each image once, and captions are
    unchanged."""
    model, processor, _, tiny_random = module.load_vlm(str(tiny), "none", "fp32", "cpu")
    assert tiny_random  # tests/tiny.py's marker file
    seen = []  # rows the tower's patch embedding sees (inside the tower, so after the sharing hook)
    model.model.vision_tower.embeddings.register_forward_pre_hook(
        lambda m, a: seen.append(len(a[0])))
    images = [Image.open(data / f"img/{n:02d}.png").convert("RGB") for n in (0, 1)]
    texts, rows = ["Describe it.", "What colour?", "Shape?"], []
    rows = [module.Row(i, t, t, image, "x") for i, image in enumerate(images) for t in texts]
    gen = module.generation_config(model, processor, 6)

    def captions(share):
        hooks = module.share_vision_work(model) if share else []
        out = []
        captioner = module.Captioner(model, processor, gen, {}, torch.float32)
        module.run_batches(captioner, [rows], lambda r, t: out.extend(t), None)
        for h in hooks:
            h.remove()
        return out
    import torch
    plain = captions(False)
    assert seen == [6]
    shared = captions(True)
    assert seen == [6, 2] and shared == plain


def test_model_failure_marks_nothing_bad_and_resumes(baseline, data, tiny, tmp_path, module,
                                                     monkeypatch):
    """A failure that is not an image's (device, out of memory, model) stops with one line; nothing
    is recorded bad."""
    out = tmp_path / "captions.jsonl"
    real, calls = module.generate_texts, []

    def failing(*args, **kwargs):  # the preflight and two batches run, then the device goes away
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "generate_texts", failing)
    with pytest.raises(SystemExit) as exc:
        module.main(list(map(str, caption_args(data, tiny, out, "--batch-size", "5"))))
    msg = str(exc.value)
    assert "not an image's fault" in msg and "illegal memory access" in msg and "\n" not in msg
    assert len(records(out)) == 10 and out.with_name("captions.errors.jsonl").read_text() == ""
    monkeypatch.setattr(module, "generate_texts", real)
    module.main(list(map(str, caption_args(data, tiny, out, "--batch-size", "5"))))
    assert texts(out) == texts(baseline[0])


def test_broken_template_stops_before_work(baseline, data, tiny, tmp_path, module):
    """At --batch-size 1 a broken chat template used to mark every image bad and exit 0."""
    import shutil
    broken = tmp_path / "broken-vlm"
    shutil.copytree(tiny, broken)
    for path in broken.glob("*chat_template*"):
        path.write_text("{{ raise_exception('this template is broken') }}"
                        if path.suffix == ".jinja" else
                        json.dumps({"chat_template":
                                    "{{ raise_exception('this template is broken') }}"}))
    out = tmp_path / "captions.jsonl"
    with pytest.raises(SystemExit) as exc:
        module.main(list(map(str, ["--split", data / "train.txt", "--vlm", broken, "--batch-size",
                                   "1", "--out", out])))
    line = str(exc.value)
    assert line.startswith("caption.py: error:") and "\n" not in line and "not the data" in line \
        and "broken" in line
    errors = out.with_name("captions.errors.jsonl")
    assert not out.exists() and not errors.exists()  # refused before the outputs were opened


def test_retry_bad(data, tiny, tmp_path, module, capsys):
    """A recorded bad image is skipped on a rerun, captioned once fixed and --retry-bad passed."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(data, root)
    out = tmp_path / "captions.jsonl"
    args = list(map(str, caption_args(root, tiny, out, "--batch-size", "5", "--limit", "7")))
    module.main(args)
    errors = out.with_name("captions.errors.jsonl")
    assert [r["index"] for r in records(errors)] == [5]
    Image.new("RGB", (30, 30), (1, 2, 3)).save(root / "img/05.png")
    # a finished run with a recorded bad image: nothing left to do, and it says what would help
    module.main(args)
    rerun = capsys.readouterr().out
    assert "0 of 0 captions" in rerun and "nothing was left to do" in rerun
    assert "skipping the 1 images recorded as unreadable" in rerun \
        and "--retry-bad tries them again" in rerun
    module.main(args + ["--retry-bad"])
    assert "5 of 5 captions" in capsys.readouterr().out and errors.read_text() == ""
    assert sorted({i for i, _ in texts(out)}) == list(range(7))


def test_merge_streams_unsorted_shards_and_reports_clashes(tmp_path, module, capsys):
    """Shards resumed out of order merge in (index, prompt) order; a clashing duplicate is named."""
    prompts = [{"id": p, "text": p, "sha256": p} for p in ("general", "t1")]
    meta = {"model": "m", "prompts": prompts, "num_images": 4, "split_sha256": "s", "shard": None}
    # a resume filled image 2's general last
    lines = {0: [(2, "t1"), (0, "general"), (0, "t1"), (2, "general")],
             1: [(1, "general"), (1, "t1"), (3, "general"), (3, "t1"), (1, "t1")]}  # (1, t1) twice
    for rank, keys in lines.items():
        (tmp_path / f"c.shard-{rank}-of-2.meta.json").write_text(
            json.dumps({**meta, "shard": [rank, 2]}))
        (tmp_path / f"c.shard-{rank}-of-2.jsonl").write_text("".join(
            json.dumps({"index": i, "prompt": p, "text": f"{i}{p}" + ("!" if n == 4 else "")})
            + "\n" for n, (i, p) in enumerate(keys)))
    module.main(["--merge", "--out", str(tmp_path / "c.jsonl")])
    captured = capsys.readouterr()
    assert [(r["index"], r["prompt"]) for r in records(tmp_path / "c.jsonl")] == \
        [(i, p) for i in range(4) for p in ("general", "t1")]
    assert "no gaps" in captured.out and "8 captions" in captured.out
    clash = [line for line in captured.err.splitlines() if "duplicate" in line]
    assert len(clash) == 1 and "c.shard-1-of-2.jsonl:5" in clash[0]


# -------------------------------------------------------------------------------- no silent failure
def refused(module, *args):
    """The one line of a run that stops: `caption.py: error: ...` and a non-zero exit."""
    with pytest.raises(SystemExit) as exc:
        module.main(list(map(str, args)))
    line = str(exc.value)
    assert exc.value.code not in (0, None) and line.startswith("caption.py: error:") \
        and "\n" not in line, line
    return line


def test_wrong_root_is_refused_before_anything_is_recorded(data, tiny, tmp_path, module):
    """A wrong --root used to record every image as bad and exit 0 (`0 of 80 captions written ... 2
    bad images` here); the rerun with the right root then skipped them all."""
    out = tmp_path / "captions.jsonl"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "a-file").write_text("")
    for root, why in ((tmp_path / "nowhere", "not found"),
                      (tmp_path / "a-file", "a file, not a folder"),
                      (tmp_path / "elsewhere", f"none of the first {NUM_IMAGES} images")):
        line = refused(module, *caption_args(data, tiny, out, "--root", root))
        assert why in line and str(root) in line and "--root" in line, line
    # nothing recorded as bad
    assert not out.exists() and not out.with_name("captions.errors.jsonl").exists()


def test_a_run_whose_images_are_all_recorded_bad_does_not_look_like_success(data, tiny, tmp_path,
                                                                            module, capsys):
    """What a wrong-root run used to leave: every image in the errors file. The rerun skipped them
    all and exited 0 with an empty captions.jsonl and no word of --retry-bad; now it says so and
    stops, and --retry-bad redoes them."""
    out = tmp_path / "captions.jsonl"
    out.write_text("")
    out.with_name("captions.errors.jsonl").write_text("".join(
        json.dumps({"index": i, "path": f"img/{i:02d}.png", "error": "FileNotFoundError"}) + "\n"
        for i in range(3)))
    args = caption_args(data, tiny, out, "--limit", "3")
    line = refused(module, *args)
    assert "none of the 3 images" in line and "--retry-bad" in line
    assert "skipping the 3 images recorded as unreadable" in capsys.readouterr().out
    module.main(list(map(str, args + ["--retry-bad"])))
    assert sorted(texts(out)) == sorted((i, p) for i in range(3) for p in PROMPTS)


def test_odd_numbers_are_refused_before_the_model_loads(data, tiny, tmp_path, module, monkeypatch):
    """--limit -1 captioned nothing and exited 0; --batch-size 0 / -1 ended in an IndexError (-1
    after a batch)."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(module, "load_vlm", no_load)
    out = tmp_path / "out" / "captions.jsonl"
    for flag, value in (("--limit", "-1"), ("--batch-size", "0"), ("--batch-size", "-1"),
                        ("--max-new-tokens", "0"), ("--min-new-tokens", "11"), ("--workers", "-1"),
                        ("--workers", "2000"), ("--temperature", "0.0"), ("--top-p", "1.5"),
                        ("--image-size", "-1")):
        line = refused(module, *caption_args(data, tiny, out, flag, value))
        assert line.startswith(f"caption.py: error: {flag} {value}: expected"), line
    assert not out.parent.exists()


def test_full_disk_while_captioning_is_one_line_and_resumes(baseline, data, tiny, tmp_path, module):
    """A full disk ended in an OSError traceback. A file size limit stands in for it: a write past
    it fails (EFBIG) as on a full disk (ENOSPC). The file keeps whole records; the rerun resumes."""
    out = tmp_path / "captions.jsonl"
    limit = 4000  # the meta (~2 KB) fits, the captions (~7 KB) do not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    args = caption_args(data, tiny, out, "--batch-size", "4")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=300, preexec_fn=small_files)
    line = error_line(proc)
    assert "cannot write" in line and "captions.jsonl" in line and "rerun the same command" in line
    written = out.read_bytes()
    assert 0 < len(written) <= limit and written.endswith(b"\n")  # nothing torn
    kept = records(out)
    module.main(list(map(str, args)))
    assert texts(out) == texts(baseline[0]) and records(out)[:len(kept)] == kept


def test_two_runs_on_one_out_the_second_is_refused(data, tiny, tmp_path, module):
    """Two caption.py on one --out both exited 0, captions.jsonl holding duplicates. The first is
    stopped (SIGSTOP) once it holds the output's lock, so the test does not race it; a shard locks
    its own file; a killed holder leaves no stale lock."""
    out, lock = tmp_path / "captions.jsonl", tmp_path / ".captions.jsonl.lock"
    first = subprocess.Popen([sys.executable, str(SCRIPT),
                              *map(str, caption_args(data, tiny, out))], env=ENV,
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and \
                "caption.py" not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before the second started"
        line = refused(module, *caption_args(data, tiny, out, "--limit", "2"))
        assert f"{out} is in use by pid {first.pid} (caption.py)" in line \
            and "another --out" in line
        module.main(list(map(str, caption_args(data, tiny, out, "--shard", "1/2", "--limit", "2"))))
    finally:
        first.kill()
        first.wait()
    module.main(list(map(str, caption_args(data, tiny, out, "--limit", "2"))))
    recs = records(out)
    assert len(recs) == len({(r["index"], r["prompt"]) for r in recs}) \
        and {r["index"] for r in recs} >= {0, 1}


def write_merge_shards(folder, bad_record=None):
    """Two caption shards in caption.py's format, by hand (test_merge_streams_... merges them)."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [{"id": p, "text": p, "sha256": p} for p in ("general", "t1")]
    for rank in range(2):
        (folder / f"c.shard-{rank}-of-2.meta.json").write_text(json.dumps(
            {"model": "m", "prompts": prompts, "num_images": 4, "split_sha256": "s",
             "shard": [rank, 2]}))
        lines = [json.dumps({"index": i, "prompt": p, "text": f"{i}{p}"}) for i in range(rank, 4, 2)
                 for p in ("general", "t1")]
        if bad_record is not None and rank == 1:
            lines[1] = bad_record
        (folder / f"c.shard-{rank}-of-2.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "c.jsonl"


def test_merge_is_locked_and_its_temporary_files_are_its_own(tmp_path, module, capsys):
    """Two merges at once shared one `c.jsonl.tmp` (one died: FileNotFoundError): a merge elsewhere
    holds the output's lock (here the test does), and another's temporary files are left alone."""
    out = write_merge_shards(tmp_path)
    holder = module.lock_or_die(tmp_path / ".c.jsonl.lock", "c.jsonl")
    try:
        assert "c.jsonl is in use by pid" in refused(module, "--merge", "--out", out)
    finally:
        module.LOCKS.remove(holder)
        holder.close()
    # the old fixed name, another pid's
    others = [tmp_path / "c.jsonl.tmp", tmp_path / ".c.jsonl.99999999.tmp"]
    for other in others:
        other.write_text("another merge, half-way\n")
    module.main(["--merge", "--out", str(out)])
    assert "no gaps" in capsys.readouterr().out and len(records(out)) == 8
    assert all(other.read_text() == "another merge, half-way\n" for other in others)
    assert sorted(p.name for p in tmp_path.glob("*tmp")) == sorted(p.name for p in others)


def test_records_that_look_valid_but_are_not_name_their_line(baseline, data, tiny, tmp_path,
                                                             module):
    """`{"index": "2", ...}` and a JSON array ended resume and --merge in a TypeError."""
    base = baseline[0]
    good = base.read_text().splitlines(keepends=True)[:2]
    for n, bad in enumerate(('{"index": "2", "prompt": "general", "text": "a", '
                             '"path": "img/02.png"}',
                             '[2, "general", "a", "img/02.png"]')):
        out = tmp_path / f"run{n}" / "captions.jsonl"
        out.parent.mkdir()
        shutil.copy(base.with_name("captions.meta.json"), out.with_name("captions.meta.json"))
        out.write_text(good[0] + bad + "\n" + good[1])
        line = refused(module, *caption_args(data, tiny, out, "--batch-size", "4"))
        assert f"{out}:2: not a record of caption.py" in line and "`index` an integer" in line
        out.write_text("".join(good))
        out.with_name("captions.errors.jsonl").write_text(bad + "\n")
        assert "captions.errors.jsonl:1: not a record" \
            in refused(module, *caption_args(data, tiny, out))
        merged = write_merge_shards(tmp_path / f"merge{n}", bad)
        assert "c.shard-1-of-2.jsonl:2: not a record" in refused(module, "--merge", "--out", merged)


def test_a_last_line_cut_inside_a_utf8_character_is_repaired(baseline, data, tiny, tmp_path, module,
                                                             capsys):
    out = tmp_path / "captions.jsonl"
    shutil.copy(baseline[0].with_name("captions.meta.json"), out.with_name("captions.meta.json"))
    # ends with the first byte of "é"
    torn = '{"index": 13, "prompt": "t4", "text": "un café"'.encode()[:-2]
    out.write_bytes(b"".join(baseline[0].read_bytes().splitlines(keepends=True)[:10]) + torn)
    module.main(list(map(str, caption_args(data, tiny, out, "--batch-size", "4"))))
    assert "truncated last line" in capsys.readouterr().out and texts(out) == texts(baseline[0])


def test_a_prompt_holding_the_image_placeholder_is_a_prompt_error(data, tiny, tmp_path, module):
    """The model's `<image>` in a prompt file got the images marked bad: the prompt's error."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "general.txt").write_text("Describe this image.\n")
    (prompts / "look.txt").write_text("<image>\nWhat is in this picture?\n")
    out = tmp_path / "captions.jsonl"
    line = refused(module, *caption_args(data, tiny, out, "--limit", "2"), "--prompts", prompts)
    assert f"prompt file {prompts / 'look.txt'} holds '<image>'" in line
    assert not out.exists() and not out.with_name("captions.errors.jsonl").exists()


def test_16_bit_grayscale_reaches_the_vlm_unclipped(tiny, tmp_path, module):
    """convert("RGB") clipped a 16-bit PNG to white: two mid-grey levels were the same pixels."""
    import numpy as np
    import torch
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny)
    images = []
    for level in (16000, 48000, 65535):
        path = tmp_path / f"grey-{level}.png"
        Image.fromarray(np.full((30, 30), level, np.uint16)).save(path)
        image, error = module.load_image(path)
        assert error is None
        images.append(image)
    pixels = module.build_inputs(processor, ["Describe."] * 3, images, {},
                                 torch.float32)["pixel_values"]
    # 2 is white
    assert not torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[1], pixels[2])


def test_a_job_log_shows_what_a_run_was_given_its_progress_and_its_summary(baseline, data, tiny,
                                                                           tmp_path, module,
                                                                           monkeypatch, capsys):
    """Output that is not a terminal (the baseline's pipes): one line says what the run was given,
    the bar prints lines with a rate, the summary is the last line. --dtype auto's choice is in that
    one line with its reason."""
    _, proc = baseline
    given = [line for line in proc.stdout.splitlines() if " on cpu, dtype " in line]
    assert len(given) == 1 and \
        given[0].startswith(f"caption.py: captioning {NUM_IMAGES} images x 5 prompts")
    assert "1 process;" in given[0] \
        and "dtype fp32 (--dtype), quant none (auto: no CUDA device" in given[0]
    bars = [line for line in proc.stderr.splitlines() if line.startswith("captioning:")]
    assert bars and bars[-1].endswith("caption/s]"), proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].startswith(f"caption.py: {NUM_GOOD * 5} of "
                                                   f"{NUM_IMAGES * 5} captions written")

    monkeypatch.setattr(module, "has_native_bf16", lambda device, *a: False)
    module.main(list(map(str, caption_args(data, tiny, tmp_path / "c.jsonl", "--dtype", "auto",
                                           "--shard", "0/2", "--limit", "4", "--quant", "none"))))
    given = [line for line in capsys.readouterr().out.splitlines() if " on cpu, dtype " in line]
    assert len(given) == 1 and "captioning 2 images x 5 prompts" in given[0] \
        and "shard 0/2 (--shard)" in given[0]
    assert "dtype fp32 (auto: this CPU has no native bf16" in given[0] \
        and "quant none (--quant)" in given[0]
