"""The hardware the suite runs on, in one line: `make test` prints it first, so a failure report
carries it.

    python tests/hardware.py
"""
import os
import platform
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_helpers import auto_dtype, has_native_bf16  # noqa: E402  (the stages' own decision)


def describe():
    """CPU model, cores, the CPU flags that change a default (--dtype / --precision auto), GPU or
    not."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile|avx512f|avx2)\b", cpuinfo)))
    # the stages' own test (it reads only device.type: a torch.device without importing torch)
    native = has_native_bf16(SimpleNamespace(type="cpu"))
    gpu = "none"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        gpu = "unknown (no torch)"
    return ("hardware: "
            f"{model.group(1).strip() if model else platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; CPU flags {' '.join(flags) or 'none of avx2/avx512'}; "
            f"native bf16 on the CPU: {'yes' if native else 'no'} "
            f"(--dtype auto = {auto_dtype('cpu', native)[0]}); GPU: {gpu}")


if __name__ == "__main__":
    print(describe())
