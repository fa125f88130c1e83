#!/usr/bin/env bash
# Does the text head learn what the captions say? Class-derived captions vs the same captions shuffled across
# images, on fashion-mnist-lt, with the real all-MiniLM-L6-v2: caption probe (probe.py) and zero-shot
# accuracy through the kept text head (eval.py --class-text), same seed and budget for both.
#
#     bash bench/text_head_check.sh [OUT] [EPOCHS]      # ~15 min on 2 CPU cores at 30 epochs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/text-head-check}
EPOCHS=${2:-30}
DATA=${DATA:-data/fmnist-lt}
$PY prepare.py fashion-mnist-lt --out "$DATA" >/dev/null
mkdir -p "$OUT"
# Captions that name the class in five phrasings (one per prompt id), and the same texts dealt to other images.
$PY - "$DATA" "$OUT" <<'EOF'
import hashlib, json, random, sys
from pathlib import Path
data, out = Path(sys.argv[1]), Path(sys.argv[2])
split = data / "train.txt"
labels = [int(line.rsplit(maxsplit=1)[1]) for line in split.read_text().splitlines()]
names = data.joinpath("classes.txt").read_text().splitlines()
phrasings = {"general": "a photo of a {}.", "t1": "the shape of a {}.", "t2": "the texture of a {}.",
             "t3": "a {} as it is worn or used.", "t4": "what makes it a {}."}
prompts = [{"id": p, "text": p, "sha256": hashlib.sha256(p.encode()).hexdigest()} for p in phrasings]
rng = random.Random(0)
order = list(range(len(labels)))
rng.shuffle(order)
for name, source in (("aligned", list(range(len(labels)))), ("shuffled", order)):
    with open(out / f"{name}.jsonl", "w") as f:
        for i, j in enumerate(source):
            for p, text in phrasings.items():
                f.write(json.dumps({"index": i, "prompt": p, "text": text.format(names[labels[j]])}) + "\n")
    meta = {"model": f"class-derived ({name})", "quant": "none", "prompts": prompts, "split": str(split),
            "split_sha256": hashlib.sha256(split.read_bytes()).hexdigest(), "num_images": len(labels), "tiny_random": False}
    (out / f"{name}.meta.json").write_text(json.dumps(meta))
EOF
$PY encode.py --classes "$DATA/classes.txt" --model minilm --out "$OUT/text"
for name in aligned shuffled; do
  $PY encode.py --captions "$OUT/$name.jsonl" --split "$DATA/train.txt" --model minilm --out "$OUT/text" --name "$name"
  $PY probe.py --text "$OUT/text/$name.npy" --split "$DATA/train.txt"
  $PY train.py --data "$DATA" --loss la --epochs "$EPOCHS" --text "$OUT/text/$name.npy" --overwrite --out "$OUT/$name"
done
$PY eval.py "$OUT/aligned/final.pt" "$OUT/shuffled/final.pt" --data "$DATA" --split test \
    --class-text "$OUT/text/classes.npy" --tsne-samples 0 --out "$OUT/report"
