"""Every stage's copy of shared code is byte-identical to its canonical copy (stages import nothing
of ours): the helpers in tests/shared_helpers.py, and the model code train.py and eval.py both carry
in tests/shared_models.py. One mechanism for both: each module-level function, class or constant is
pinned by name, wherever it sits; a stage that carries one also carries the shared code it uses.

    python tests/test_shared.py --sync   # paste canonical copies (and what they use) into stages
"""
import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ["prepare.py", "caption.py", "encode.py", "train.py", "eval.py", "probe.py"]
EVERY_STAGE = {"opt", "parse_config", "die"}  # each stage: a typed command line, one-line errors
# a checkpoint is rebuilt from (arch, num_classes, widths): all model code
MODEL_STAGES = {"train.py", "eval.py"}


def top_level(path):
    """{name: (first line, last line, source)} of each module-level function, class, constant."""
    text = Path(path).read_text()
    found = {}
    for node in ast.parse(text).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in node.targets if isinstance(t, ast.Name)] \
            if isinstance(node, ast.Assign) else []
        for name in names:
            found[name] = (node.lineno, node.end_lineno, ast.get_source_segment(text, node))
    return found


HELPERS = top_level(Path(__file__).with_name("shared_helpers.py"))
MODELS = top_level(Path(__file__).with_name("shared_models.py"))
CANONICAL = HELPERS | MODELS
ORIGIN = {name: "tests/shared_models.py" if name in MODELS else "tests/shared_helpers.py"
          for name in CANONICAL}


@functools.cache
def uses(name):
    """The other shared code the canonical `name` uses: a stage carrying `name` needs it too."""
    used = {n.id for n in ast.walk(ast.parse(CANONICAL[name][2])) if isinstance(n, ast.Name)}
    return used & set(CANONICAL) - {name}


def test_every_copy_is_the_canonical_one():
    carried = {name: [] for name in CANONICAL}
    for stage in STAGES:
        mine = top_level(REPO / stage)
        for name, (_, _, source) in CANONICAL.items():
            if name in mine:
                assert mine[name][2] == source, f"{stage}: {name} differs from {ORIGIN[name]} " \
                                                f"(run `python tests/test_shared.py --sync`)"
                assert not uses(name) - set(mine), \
                    f"{stage}: {name} uses {sorted(uses(name) - set(mine))}, which {stage} lacks " \
                    f"(run `python tests/test_shared.py --sync`)"
                carried[name].append(stage)
        missing = EVERY_STAGE - set(mine) | \
            (set(MODELS) - set(mine) if stage in MODEL_STAGES else set())
        assert not missing, f"{stage} lacks {sorted(missing)}"
    assert all(carried.values()), \
        f"shared code no stage carries: {[n for n, s in carried.items() if not s]}"


def test_auto_dtype_is_decided_both_ways(tmp_path):
    """`--dtype auto` (caption.py, encode.py) and `--precision auto` (train.py): the decision for
    each answer of the hardware check, and the check itself on a CPU flag list with and without
    native bf16, whatever this CPU has."""
    import torch
    from shared_helpers import auto_dtype, has_native_bf16
    assert auto_dtype("cpu", True)[0] == "bf16" and auto_dtype("cpu", False)[0] == "fp32"
    assert auto_dtype("cuda", True)[0] == "bf16" and auto_dtype("cuda", False)[0] == "fp16"
    assert "no native bf16" in auto_dtype("cpu", False)[1] and \
        "natively" in auto_dtype("cpu", True)[1]
    flags = "flags\t\t: fpu vme sse2 avx2 avx512f avx512bw {} xsave\n"
    for extra, native in (("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True),
                          ("avx512_bf16x", False)):
        (tmp_path / "cpuinfo").write_text("processor\t: 0\n" + flags.format(extra))
        assert has_native_bf16(torch.device("cpu"), tmp_path / "cpuinfo") is native, extra
    assert has_native_bf16(torch.device("cpu"), tmp_path / "no-such-file") is False


def test_a_16_bit_grayscale_png_keeps_its_levels(tmp_path):
    """convert("RGB") clips 16-bit grayscale to white; rgb_image (each stage's) scales to 8 bits."""
    import numpy as np
    from PIL import Image
    from shared_helpers import rgb_image
    # 0 .. 65,520
    levels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as image:
        assert image.mode.startswith("I")
        clipped, rgb = np.asarray(image.convert("RGB")), np.asarray(rgb_image(image))
    assert len(np.unique(clipped)) < 20 and len(np.unique(rgb[..., 0])) == 256
    assert rgb.shape == (64, 64, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert np.abs(rgb[..., 1].astype(int) - levels / 257).max() <= 0.5


def test_duplicate_class_names_are_refused_with_the_line(tmp_path):
    from shared_helpers import read_classes
    (tmp_path / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(SystemExit) as exc:
        read_classes(tmp_path / "classes.txt")
    assert "classes.txt:3: 'cat' also names line 1" in str(exc.value)


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from shared_helpers import lock_or_die
lock_or_die(sys.argv[2], "the run")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_is_one_process_at_a_time_and_dies_with_its_holder(tmp_path):
    """A second process is refused in one line naming the holder; a SIGKILLed one leaves no lock."""
    from shared_helpers import lock_or_die
    lock = tmp_path / ".run.lock"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(REPO / "tests"), str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exc:
            lock_or_die(lock, f"run folder {tmp_path}")
        assert f"is in use by pid {holder.pid}" in str(exc.value) and \
            "another --out" in str(exc.value)
    finally:
        holder.kill()
        holder.wait()
    handle = lock_or_die(lock, f"run folder {tmp_path}")  # the kernel dropped the dead one's lock
    handle.close()


PROGRESS = """
import sys
sys.path.insert(0, sys.argv[1])
from shared_helpers import progress_bar
with progress_bar(3, "img", desc="work") as bar:
    for _ in range(3):
        bar.update(1)
"""


def test_progress_is_lines_where_output_is_not_a_terminal():
    """Under make, a pipe or a job log a bar is lines (tqdm's '\\r' redraws pile up on one line)."""
    proc = subprocess.run([sys.executable, "-c", PROGRESS, str(REPO / "tests")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "\r" not in proc.stderr, repr(proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("work:") and "3/3" in lines[-1] and "img/s" in lines[-1]


def sync():
    for stage in STAGES:
        path = REPO / stage
        lines = path.read_text().splitlines(keepends=True)
        mine = top_level(path)
        # From the bottom up, so earlier line numbers stay valid.
        for name, (first, last, _) in sorted(mine.items(), key=lambda kv: -kv[1][0]):
            if name in CANONICAL and mine[name][2] != CANONICAL[name][2]:
                lines[first - 1:last] = [CANONICAL[name][2] + "\n"]
                print(f"{stage}: {name} synced")
        path.write_text("".join(lines))
        while add_used(path):
            pass


def add_used(path):
    """Paste the shared code the first carrier in `path` uses but lacks right after it (in canonical
    order); False when no carried code lacks any."""
    mine = top_level(path)
    for name, (_, last, _) in sorted(mine.items(), key=lambda kv: kv[1][0]):
        lacking = sorted(uses(name) - set(mine), key=lambda n: CANONICAL[n][0]) \
            if name in CANONICAL else []
        if lacking:
            lines = path.read_text().splitlines(keepends=True)
            lines[last:last] = ["\n\n" + CANONICAL[n][2] + "\n" for n in lacking]
            path.write_text("".join(lines))
            print(f"{path.name}: {', '.join(lacking)} added (used by {name})")
            return True
    return False


if __name__ == "__main__" and sys.argv[1:] == ["--sync"]:
    sync()


def test_launch_check_reads_what_the_launcher_asked_for(tmp_path, monkeypatch, capsys):
    """`accelerate launch --num_processes 2` runs ONE process where it does not go multi-GPU: the
    count asked for is read from the launcher's command line, else its config file (which accelerate
    skips under --cpu); the script's flags and other launchers are not read. Rank 0 alone warns."""
    from shared_helpers import launch_check
    monkeypatch.setattr(sys, "argv", ["train.py", "--epochs", "1"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("RANK", raising=False)
    asked_two = ["python", "-m", "accelerate.commands.launch", "--num_processes", "2", "train.py",
                 "--epochs", "1"]
    cases = [(asked_two, 1, 2),
             (["/v/bin/python", "/v/bin/accelerate", "launch", "--cpu", "--num-processes=3",
               "train.py"], 1, 3),
             (["python", "-m", "accelerate.commands.launch", "--num_processes", "2", "train.py"],
              2, 2),
             # the script's flag, not the launcher's
             (["accelerate", "launch", "train.py", "--num_processes", "5"], 1, None),
             (["torchrun", "--nproc_per_node", "2", "train.py"], 1, None),
             (["bash", "-c", "python train.py"], 1, None)]
    for argv, world_size, asked in cases:
        assert launch_check(world_size, argv) == asked, argv
        warned = capsys.readouterr().err
        assert ("asked for" in warned) == (asked is not None and asked > world_size), argv
    launch_check(1, asked_two)
    assert "train.py: warning: accelerate launch asked for 2 processes, but this run has " \
        "world size 1" in capsys.readouterr().err

    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\n")
    (tmp_path / "mine.json").write_text('{\n  "num_processes": 6,\n  "use_cpu": true\n}\n')
    assert launch_check(1, ["accelerate", "launch", "train.py"]) == 4
    # under --cpu the default file is not read
    assert launch_check(1, ["accelerate", "launch", "--cpu", "train.py"]) is None
    assert launch_check(1, ["accelerate", "launch", "--cpu", "--config_file",
                            str(tmp_path / "mine.json"), "train.py"]) == 6
    # the command line wins
    assert launch_check(1, ["accelerate", "launch", "--num_processes", "1", "train.py"]) == 1
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    assert launch_check(1, asked_two) == 2 and capsys.readouterr().err == ""
