"""The canonical copy of the helpers several stages carry.

Each stage imports nothing of ours (a stage is copied alone into other projects), so a helper that
several stages need is repeated in each of them. tests/test_shared.py pins every copy byte-identical
to the function of the same name here: change a helper here, then paste it into every stage that
carries it (`python tests/test_shared.py --sync` does the pasting). Imports used below: argparse,
dataclasses (field, fields), hashlib, json, os, shutil, re, sys, typing, urllib.error,
urllib.request, pathlib.Path, importlib.metadata as pkg_metadata, numpy as np, collections.deque,
concurrent.futures.ThreadPoolExecutor.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import typing
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path

import numpy as np

GROUPS = ("many", "medium", "few")
# one spelling of a dtype in every stage
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


def parse_config(config_cls, argv=None, positional=(), defaults=None):
    """Typed command line from a dataclass: a field is one `--dashed-name` with help and default; a
    Literal takes its listed values only; a bool is `--flag` / `--no-flag`; a list is `--name A,B`,
    repeatable. `positional` fields go anywhere among the flags (a list one: whole words, commas
    kept). `defaults(first pass's namespace) -> {field: value}` replaces dataclass defaults (a
    recipe's): flags given still win, and --help shows the replaced defaults."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     add_help=defaults is None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group, hints = parser, typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        kind, meta = hints[f.name], f.metadata
        if meta.get("heading"):
            group = parser.add_argument_group(meta["heading"])
        flag = "--" + f.name.replace("_", "-")
        names, kwargs = [f.name] if f.name in positional else [flag], {"help": meta.get("help", "")}
        if typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            kwargs |= {"choices": choices, "type": type(choices[0]),
                       "metavar": "{" + ",".join(map(str, choices)) + "}"}
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:  # both extend one list: flag's values, then the words
            if f.name in positional:
                group.add_argument(f.name, nargs="*", action="extend", help=kwargs["help"])
                names, kwargs["help"] = [flag], f"{f.name} as a flag: comma-separated, repeatable"
            kwargs |= {"action": "extend", "type": lambda value: value.split(","), "metavar": "A,B"}
        else:
            kwargs |= {"type": kind, "metavar": kind.__name__.upper()}
        if names == [flag]:
            kwargs["default"] = f.default
        group.add_argument(*names, **kwargs)
    for action in parser._actions:  # defaults once, whatever a Python's BooleanOptionalAction adds
        if action.help and action.default is not None and action.dest != "help" \
                and "%(default)" not in action.help:
            action.help += " (default: %(default)r)"
    if defaults is not None:  # the first pass has no -h, so `--recipe X --help` shows its defaults
        parser.set_defaults(**defaults(parser.parse_known_args(argv)[0]))
        parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    return config_cls(**vars(parser.parse_intermixed_args(argv)))


def die(msg):
    """One line naming the stage, then exit 1: a user's mistake is a sentence, not a traceback."""
    sys.exit(f"{Path(sys.argv[0]).name}: error: {msg}")


def first_line(error):
    """An exception's message as one line for an error line of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def warn(msg):
    print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


def is_main_process():
    """Only rank 0 of a torchrun / accelerate launch run prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_check(world_size=None, launcher_argv=None):
    """Warn (rank 0) when the launcher asked for more processes than this run has; return the count
    it asked for, or None where that cannot be seen. `accelerate launch --num_processes 2` starts
    ONE process unless it goes multi-GPU (never without GPUs, or with --cpu), and no variable in the
    environment it passes names the count asked for (torchrun sets WORLD_SIZE to it): it is read
    from the launcher's own command line (accelerate_launch_words, asked_num_processes)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    head = accelerate_launch_words(launcher_argv)
    asked = None if head is None else asked_num_processes(head)
    if not (asked or "").isdigit():
        return None
    if int(asked) > world_size and is_main_process():
        script = Path(sys.argv[0]).name
        warn(f"accelerate launch asked for {asked} processes, but this run has world size "
             f"{world_size}: accelerate starts a single process unless it goes multi-GPU (it does "
             f"not without GPUs or with --cpu); for {asked} CPU processes run "
             f"`torchrun --nproc_per_node {asked} {script} ...`")
    return int(asked)


def accelerate_launch_words(launcher_argv=None):
    """The words of the `accelerate launch` command line that started this script, up to the script
    (default: /proc/<parent>/cmdline, Linux), else None. Not seen: a script started through a shell
    or with `-m`, systems without /proc, launchers other than accelerate."""
    if launcher_argv is None:
        try:
            launcher_argv = (Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
                             .decode(errors="replace").split("\0"))
        except OSError:
            return None
    if sys.argv[0] not in launcher_argv:  # not started by this command line (a shell, make, ...)
        return None
    head = launcher_argv[:launcher_argv.index(sys.argv[0])]  # the launcher's own words
    if not any(Path(w).name in ("accelerate", "accelerate-launch") or w.startswith("accelerate.")
               for w in head):
        return None
    return head


def asked_num_processes(head):
    """The process count (a string) the `accelerate launch` words `head` ask for: `--num_processes
    N`, else `num_processes` of the accelerate config file it reads; None where neither says."""
    options = {}
    for i, word in enumerate(head):
        name, eq, value = word.partition("=")
        if name.startswith("--"):
            options[name[2:].replace("-", "_")] = value if eq else \
                (head[i + 1] if i + 1 < len(head) else "")
    asked = options.get("num_processes")
    config = options.get("config_file")
    # accelerate skips its default file under --cpu
    if asked is None and config is None and "cpu" not in options:
        home = os.environ.get("HF_HOME") or \
            Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
        config = Path(home).expanduser() / "accelerate" / "default_config.yaml"
    if asked is None and config:
        try:
            lines = Path(config).read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:  # `num_processes: 2` (YAML) or `"num_processes": 2,` (JSON)
            key, _, value = line.partition(":")
            if key.strip().strip('"') == "num_processes":
                asked = value.strip().rstrip(",")
    return asked


def pick_device(choice="auto"):
    """auto: this process's GPU (cuda:LOCAL_RANK under torchrun or accelerate launch), else CPU."""
    import torch
    if choice != "auto":
        if choice.startswith("cuda") and not torch.cuda.is_available():
            die(f"--device {choice}, but torch sees no CUDA device (use --device cpu)")
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda",
                            int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def has_native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """Whether the device computes bf16 in hardware: a GPU since Ampere, a CPU with avx512_bf16 or
    AMX. Elsewhere torch emulates bf16, and a bf16 VLM ran 3.1x slower than fp32 on such a CPU."""
    if device.type == "cuda":
        import torch
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def auto_dtype(device_type, native_bf16):
    """`--dtype auto`: (dtype, why). bf16 where the hardware computes it; else fp16 on a GPU (same
    speed, needs no bf16 units) and fp32 on a CPU (fp16 is emulated there too)."""
    where = "GPU" if device_type == "cuda" else "CPU"
    if native_bf16:
        return "bf16", f"this {where} computes bf16 natively"
    return ("fp16" if device_type == "cuda" else "fp32"), \
        f"this {where} has no native bf16 (it would be emulated)"


def hub_unreachable(repo_id, timeout=8.0):
    """Why the hub cannot serve `repo_id` now (HF_HUB_OFFLINE, or no answer to one request in
    `timeout` s), else None. Asked before from_pretrained, whose client retries a dead connection
    for minutes before a useful line."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT.rstrip("/")
    try:
        urllib.request.urlopen(f"{endpoint}/api/models/{repo_id}", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the hub answered: an unknown or gated id is from_pretrained's to report
    except (OSError, ValueError) as e:
        return f"the hub {endpoint} cannot be reached ({getattr(e, 'reason', e)})"
    return None


class LineProgress:
    """tqdm's output off a terminal (a log, a pipe, `make`): each refresh a line, not a '\\r'."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.strip("\r\n"):
            self.stream.write(text.strip("\r\n") + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total, unit, initial=0, desc="", disable=False, iterable=None):
    """A tqdm bar with rate and ETA on a terminal; elsewhere a line every 30 s, so a job log shows
    progress too. Rank 0 alone draws it."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=tty,
                disable=disable or not is_main_process(), mininterval=0.1 if tty else 30,
                maxinterval=10 if tty else 30,  # else tqdm's monitor forces a line every 10 s
                file=sys.stderr if tty else LineProgress(sys.stderr))


LOCKS = []  # open lock files: the kernel drops a lock when its process ends, however it ends


def lock_or_die(path, what):
    """Hold an exclusive lock on `path` (a hidden lock file) while this process lives, or stop with
    one line: two processes appending to one output interleave or duplicate it. A killed process
    leaves no stale lock."""
    import fcntl
    path = Path(path)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        die(f"{what} is in use by {holder}: wait for it to end, or use another --out")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({Path(sys.argv[0]).name})\n")
    handle.flush()
    LOCKS.append(handle)
    return handle


def rgb_image(image):
    """An opened PIL image as 8-bit RGB. 16-bit grayscale (mode I;16 / I) is scaled to 8 bits first:
    convert("RGB") clips it, turning a 16-bit PNG almost white. convert() also decodes the whole
    file, so a truncated image fails here, where the caller records it."""
    if image.mode.startswith("I"):
        import numpy
        from PIL import Image
        scaled = numpy.asarray(image, dtype=numpy.float64) / 257.0
        image = Image.fromarray(numpy.clip(numpy.rint(scaled), 0, 255).astype(numpy.uint8), "L")
    return image.convert("RGB")


def prefetched(load, items, workers, ahead):
    """load(item) for each item in order, decoded by a thread pool at most `ahead` items ahead."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def image_loader(root, items, transform):
    """load(row) -> (row, transform(RGB image) or None, error or None), for line `row` of a split's
    (path, label) `items` under `root`: a bad image is the caller's to record or refuse."""
    from PIL import Image

    def load(row):
        try:
            with Image.open(root / items[row][0]) as image:
                return row, transform(rgb_image(image)), None
        except Exception as e:  # whatever PIL raises for a bad file: never a crash mid-run
            message = str(e).splitlines()[0][:200] if str(e) else ""
            return row, None, f"{type(e).__name__}: {message}"
    return load


def sha256_file(path):
    """sha256 of a file's bytes, read in blocks (arrays run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_split(path, num_classes=None):
    """[(relative path, label)] from a split file's `relative/path label` lines. A bad line is
    refused with `file:line`: no label, a label not an integer in [0, num_classes), or a path that
    is absolute or leaves the data root with `..` (a split only names files under its root)."""
    path = Path(path)
    if not path.is_file():
        die(f"split file {path} not found (prepare.py writes it)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            die(f"{path}:{n}: expected `relative/path label` with an integer label >= 0, "
                f"got {line[:80]!r}")
        rel, label = parts[0], int(parts[1])
        if rel.startswith(("/", "\\")) or ".." in rel.replace("\\", "/").split("/"):
            die(f"{path}:{n}: {rel!r} leaves the data root: split paths are relative, without `..`")
        if num_classes is not None and label >= num_classes:
            die(f"{path}:{n}: label {label}, but there are only {num_classes} classes")
        items.append((rel, label))
    if not items:
        die(f"split file {path} has no images")
    return items


def read_classes(path):
    """Class names, line i naming label i; each name once."""
    path = Path(path)
    if not path.is_file():
        die(f"classes file {path} not found (prepare.py writes it)")
    names = path.read_text(encoding="utf-8").splitlines()
    first = {}
    for n, name in enumerate(names, 1):
        if not name.strip():
            die(f"{path}:{n}: empty class name")
        if first.setdefault(name, n) != n:  # two labels, one text: zero-shot cannot tell them apart
            die(f"{path}:{n}: {name!r} also names line {first[name]}: "
                "each class needs its own name")
    if not names:
        die(f"classes file {path} is empty")
    return names


def class_group(count):
    """OLTR's groups by training images: many > 100, medium 20-100, few 1-19; none: unseen (OOD)."""
    return "many" if count > 100 else "medium" if count >= 20 else "few" if count > 0 else "unseen"


def parse_shard(text):
    """`i/n` -> (i, n); empty -> the launcher's (RANK, WORLD_SIZE), (0, 1) when run alone."""
    if not text:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        die(f"--shard {text}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(i), int(n)


def versions(*names):
    """Versions of the packages that made an artifact, for its sidecar or run folder."""
    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_json(path, obj):
    """Write JSON through a temporary file and a rename: a kill never leaves half a file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def writable_dir(path):
    """Make --out now and prove it writable, so a bad --out fails before any work is spent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        die(f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        die(f"{path} is not writable ({e.strerror})")
    return path


def require_free_space(folder, nbytes, what):
    """Refuse to start what would fill the disk halfway (a memmap on a full disk dies of SIGBUS)."""
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        die(f"{what} needs {nbytes / 2**30:.2f} GiB in {folder}, "
            f"only {free / 2**30:.2f} GiB is free")


def sidecar_digest(array_path, sidecar):
    """sha256 of an array's bytes and its sidecar's other fields: an edit to either is caught."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in sidecar.items() if k != "sha256"},
                                       sort_keys=True).encode())
    digest.update(sha256_file(array_path).encode())
    return digest.hexdigest()


def load_artifact(path, kind):
    """(array opened as a memmap, sidecar) of an encode.py artifact. Refused in one line unless the
    sidecar is there, names this kind and matches the array (sidecar_digest), every row finite."""
    path, sidecar_path = Path(path), Path(path).with_suffix(".json")
    for p in (path, sidecar_path):
        if not p.is_file():
            die(f"{p} not found: an array is used only with the sidecar encode.py wrote next to it")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        die(f"{path} or {sidecar_path.name} cannot be read ({e}); re-run encode.py")
    if sidecar.get("kind") != kind:
        die(f"{sidecar_path}: kind is {sidecar.get('kind')!r}, expected {kind!r}")
    if sidecar.get("sha256") != sidecar_digest(path, sidecar):
        die(f"{path} and {sidecar_path.name} do not match (sha256): "
            "one was changed after encode.py wrote them")
    for start in range(0, len(array), 8192):
        chunk = np.asarray(array[start:start + 8192])
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if not finite.all():
            die(f"{path}: row {start + int(np.flatnonzero(~finite)[0])} holds NaN or inf")
    return array, sidecar
