"""Classify one image with a student trained by vlmkd, using torch, torchvision and PIL only
(no file of vlmkd).

    python examples/classify.py runs/demo/vlmkd photo.png   # prints the class name, then the logits
"""
import json
import sys

import torch
from PIL import Image
from torchvision import transforms

run, image = sys.argv[1], sys.argv[2]
meta = json.load(open(f"{run}/student.json"))
# student.pt2 runs any --arch; torchvision / timm users can load student.safetensors instead
net = torch.export.load(f"{run}/student.pt2").module()
p = meta["preprocess"]
preprocess = transforms.Compose([
    transforms.Resize(round(p["res"] / p["crop_ratio"])), transforms.CenterCrop(p["res"]),
    transforms.ToTensor(), transforms.Normalize(p["mean"], p["std"])])
logits = net(preprocess(Image.open(image).convert("RGB"))[None])
print(meta["classes"][logits.argmax()], json.dumps(logits[0].tolist()))
