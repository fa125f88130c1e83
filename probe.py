"""Caption probe of vlmkd: do encode.py's caption features know the class of their image?

    python probe.py --text runs/x/text/text.npy --split data/x/train.txt
    python probe.py --text runs/x/text/text.npy --split data/x/train.txt --no-pixel-baseline

A k-fold logistic regression predicts the class from each prompt's features, from all prompts
concatenated, and from a random projection of the images' pixels: captions that score no higher
than the pixels may only restate the image. Accuracy overall, per class group (many / medium / few)
and per class is printed and written to `text.probe.json` beside --text.
"""
import argparse
import hashlib
import json
import os
import sys
import typing
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as pkg_metadata
from pathlib import Path

import numpy as np


# The one shared helper the Config needs above it; the others are at the back of the file.
def opt(default, help, heading=""):
    """A config field with its --help line; `heading` starts a new group of flags in --help."""
    return field(default=default, metadata={"help": help, "heading": heading})


# --- configuration
@dataclass
class Config:
    text: str = opt("", "text.npy from encode.py --captions (with its text.json)", heading="inputs")
    split: str = opt("", "the split file --text was encoded from: its labels are the targets")
    root: str = opt("", "folder the split's image paths are relative to (default: the split file's "
                        "folder)")

    folds: int = opt(5, "k of the k-fold probe", heading="probe")
    max_images: int = opt(20000, "probe at most this many images (random subsample)")
    max_iter: int = opt(100, "max iterations of each logistic regression")
    c: float = opt(0.1, "inverse L2 strength (sklearn's C; features standardised first)")
    pixel_baseline: bool = opt(True, "also probe a random projection of the images' pixels to the "
                                     "text width: text that only restates the image scores no "
                                     "higher (needs the split's images)")
    workers: int = opt(4, "threads decoding images for the pixel baseline")
    seed: int = opt(0, "subsample, fold and projection seed")


# --- inputs
@dataclass
class Sample:
    """The images the probe fits on, and what the report says about them."""
    feats: np.ndarray  # text.npy [N, P, D], a memmap
    sidecar: dict  # text.json
    items: list  # the split's (path, label) lines
    split_sha: str
    counts: np.ndarray  # images per class in the whole split
    group_of: np.ndarray  # per class: many, medium or few
    rows: np.ndarray  # lines of the split probed
    y: np.ndarray  # their labels


def load_sample(cfg):
    """text.npy, checked against --split, and the rows to probe: those with captions, at most
    --max-images of them."""
    feats, sidecar = load_artifact(cfg.text, "text")  # refuses an edited array or sidecar, NaN rows
    items, split_sha = read_split(cfg.split), sha256_file(cfg.split)
    if sidecar.get("split_sha256") != split_sha:
        die(f"{cfg.text} was made from another split: its split_sha256 "
            f"{str(sidecar.get('split_sha256'))[:12]}... != sha256 of {cfg.split} "
            f"{split_sha[:12]}...")
    labels = np.array([label for _, label in items])
    if feats.ndim != 3 or feats.shape[0] != len(labels):
        die(f"{cfg.text}: shape {list(feats.shape)}, expected [{len(labels)}, P, D] for "
            f"{cfg.split}")
    counts = np.bincount(labels)
    # Rows without any caption hold zeros: the probe would learn which images had none.
    missing = np.asarray(sidecar.get("missing_rows", []), dtype=np.int64)
    rows = np.setdiff1d(np.arange(len(labels)), missing)
    if len(rows) > cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        rows = np.sort(rng.choice(rows, cfg.max_images, replace=False))
    if len(np.unique(labels[rows])) < 2:
        die(f"{cfg.split} has fewer than 2 classes among the rows with text features")
    return Sample(feats, sidecar, items, split_sha, counts,
                  np.array([class_group(n) for n in counts]), rows, labels[rows])


def pixel_features(items, root, rows, width, seed, workers):
    """A random projection of each image's pixels (32 x 32 RGB) to `width`: features that know what
    the image looks like and nothing else, the score text must beat to carry more than a
    restatement of the pixels."""
    load = image_loader(root, items,
                        lambda image: np.asarray(image.resize((32, 32)), np.float32).ravel() / 255)
    pixels = np.zeros((len(rows), 32 * 32 * 3), np.float32)
    decoded = progress_bar(len(rows), "img", desc="pixel baseline",
                           iterable=prefetched(load, rows, workers, 64))
    for k, (row, values, error) in enumerate(decoded):
        if error is not None:  # a baseline with holes would not be the images' score
            die(f"image {root / items[row][0]} (line {row + 1} of the split) cannot be read "
                f"({error}): pass --root, or --no-pixel-baseline")
        pixels[k] = values
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((pixels.shape[1], width)).astype(np.float32)
    return pixels @ projection / np.sqrt(pixels.shape[1])  # on the scale of the pixels themselves


def feature_sets(cfg, sample):
    """{name: features [rows, width]}: each prompt's, all prompts concatenated, the pixels'."""
    x = np.asarray(sample.feats[sample.rows], dtype=np.float32)
    prompts = sample.sidecar.get("prompts") or [f"slot{p}" for p in range(x.shape[1])]
    subsets = {pid: x[:, p] for p, pid in enumerate(prompts)}
    if len(prompts) > 1:
        subsets["all"] = x.reshape(len(sample.rows), -1)  # [P * D]: what all prompts know together
    if cfg.pixel_baseline:
        root = Path(cfg.root or Path(cfg.split).parent)
        subsets["pixels"] = pixel_features(sample.items, root, sample.rows, x.shape[2], cfg.seed,
                                           cfg.workers)
    return subsets


# --- the probe
def folds_of(cfg, y):
    from sklearn.model_selection import KFold, StratifiedKFold
    folds = max(2, min(cfg.folds, len(y)))
    # Stratified when any class can fill the folds; rarer classes then land in some folds only,
    # which sklearn allows.
    splitter = StratifiedKFold if np.bincount(y).max() >= folds else KFold
    return splitter(n_splits=folds, shuffle=True, random_state=cfg.seed)


def probe_accuracy(x, y, group_of, cv, cfg):
    """Cross-validated accuracy of a standardised logistic regression: overall, per group, mean per
    class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    # C=0.1, tol 1e-3, 100 iterations: on noise-like features an unregularised lbfgs runs 10-30x
    # longer for the same (chance) accuracy; class-informative features still reach 100 % on
    # fashion-mnist-lt.
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.c, max_iter=cfg.max_iter,
                                                               tol=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and "least populated class" notes, expected
        correct = cross_val_predict(probe, x, y, cv=cv) == y
    row = {g: float(correct[group_of[y] == g].mean()) if (group_of[y] == g).any() else None
           for g in GROUPS}
    return {"overall": float(correct.mean()), **row,
            "mean_per_class": float(np.mean([correct[y == c].mean() for c in np.unique(y)]))}


def report_of(cfg, sample, cv, results):
    from sklearn.model_selection import StratifiedKFold
    return {"made_by": "probe.py", "kind": "probe", "text": cfg.text,
            "text_sha256": sample.sidecar["sha256"], "encoder": sample.sidecar.get("encoder"),
            "split": cfg.split, "split_sha256": sample.split_sha, "rows": len(sample.rows),
            "folds": cv.n_splits, "stratified": isinstance(cv, StratifiedKFold),
            "all": "concatenated prompt features",
            "pixels": "random projection of 32x32 RGB pixels to the text width"
                      if cfg.pixel_baseline else None,
            "chance": 1.0 / len(sample.counts),
            "majority": float(np.bincount(sample.y).max() / len(sample.y)),
            "groups": {g: int((sample.group_of[sample.counts > 0] == g).sum()) for g in GROUPS},
            "results": results, "config": asdict(cfg),
            "versions": versions("numpy", "scikit-learn")}


def print_table(report):
    def pct(v):
        return "    -" if v is None else f"{100 * v:5.1f}"
    say(f"{'features':<16}overall  many medium   few  per-class   (chance {pct(report['chance'])}, "
        f"majority {pct(report['majority'])})")
    for name, row in report["results"].items():
        say(f"{name[:15]:<16}  {pct(row['overall'])} {pct(row['many'])}  {pct(row['medium'])} "
            f"{pct(row['few'])}      {pct(row['mean_per_class'])}")
    if "pixels" in report["results"]:
        say("pixels: a random projection of the images' pixels. Text that scores no higher than "
            "it may only restate the image (a random VLM's captions do): it is no evidence that "
            "the VLM knows the class.")


# --- main
def check_config(cfg):
    """A wrong command fails before anything is read."""
    if not cfg.text or not cfg.split:
        die("--text and --split are needed: python probe.py --text runs/x/text/text.npy --split "
            "data/x/train.txt")
    if cfg.folds < 2 or cfg.max_images < 2 or cfg.max_iter < 1 or cfg.workers < 0 or not cfg.c > 0:
        die("--folds and --max-images must be >= 2, --max-iter >= 1, --workers >= 0, --c > 0")


def main(argv=None):
    cfg = parse_config(Config, argv)
    check_config(cfg)
    writable_dir(Path(cfg.text).parent)  # text.probe.json goes beside --text
    sample = load_sample(cfg)
    cv = folds_of(cfg, sample.y)
    say(f"probe: {len(sample.rows)} of {len(sample.items)} images, {len(np.unique(sample.y))} "
        f"classes, {cv.n_splits}-fold logistic regression")
    subsets = feature_sets(cfg, sample)
    results = {name: probe_accuracy(subsets[name], sample.y, sample.group_of, cv, cfg)
               for name in progress_bar(len(subsets), "probe", desc=f"{cv.n_splits}-fold probes",
                                        iterable=list(subsets))}
    report = report_of(cfg, sample, cv, results)
    report_path = Path(cfg.text).with_suffix(".probe.json")
    write_json(report_path, report)
    print_table(report)
    say(f"wrote {report_path}")


def say(msg):
    if is_main_process():
        print(msg, flush=True)


# --- shared helpers: byte-identical copies of tests/shared_helpers.py (test_shared.py --sync)

GROUPS = ("many", "medium", "few")


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


def is_main_process():
    """Only rank 0 of a torchrun / accelerate launch run prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


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


def class_group(count):
    """OLTR's groups by training images: many > 100, medium 20-100, few 1-19; none: unseen (OOD)."""
    return "many" if count > 100 else "medium" if count >= 20 else "few" if count > 0 else "unseen"


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


if __name__ == "__main__":
    main()
