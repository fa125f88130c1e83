"""The canonical copy of the model code train.py and eval.py both carry (eval.py rebuilds a
checkpoint from its arch, num_classes and widths with the same classes). tests/test_shared.py pins
each copy byte-identical to the one here, as it does the helpers of tests/shared_helpers.py: edit it
here, then `python tests/test_shared.py --sync`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from shared_helpers import die


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, 16/32/64 channels), the usual CIFAR-LT student."""

    def __init__(self, depth):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        layers, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(n):
                layers.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


CIFAR_ARCHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


def build_timm(name, res):
    """A timm model from scratch without its classifier: its output is the pooled pre-logits."""
    import timm
    if not timm.is_model(name):
        die(f"unknown --arch timm:{name}; "
            "`python -c 'import timm; print(timm.list_models())'` lists them")
    try:  # ViT-like models are built for the training resolution; others take no img_size
        net, kwargs = (timm.create_model(name, pretrained=False, num_classes=0, img_size=res),
                       {"img_size": res})
    except TypeError:
        net, kwargs = timm.create_model(name, pretrained=False, num_classes=0), {}
    net.classifier_name, net.constructor_kwargs = (net.pretrained_cfg.get("classifier", "head"),
                                                   kwargs)
    return net, getattr(net, "head_hidden_size", None) or net.num_features


def build_backbone(arch, res):
    """(module mapping images to features, feature width). torchvision models lose their last
    Linear; the export puts it back from `classifier_name` and `constructor_kwargs`."""
    if arch in CIFAR_ARCHS:
        return CifarResNet(CIFAR_ARCHS[arch]), 64
    if arch.startswith("timm:"):
        return build_timm(arch.removeprefix("timm:"), res)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        known = sorted(CIFAR_ARCHS) + \
            sorted(torchvision.models.list_models(module=torchvision.models))
        die(f"unknown --arch {arch!r}; known: {', '.join(known)}, or timm:<name>")
    kwargs = {"image_size": res} if arch.startswith("vit_") else {}
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    parent, name, last = None, None, None
    for module_name, module in net.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, name, last = module, f"{module_name}.{child_name}".lstrip("."), child
    setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    net.classifier_name, net.constructor_kwargs = name, kwargs
    return net, last.in_features


class Student(nn.Module):
    """Backbone + classifier. head='linear': a Linear; head='cosine': cosine similarity of
    clip_proj(feature) to fixed class-text embeddings over tau (Li et al.). clip_proj also serves
    imitation and alignment."""

    def __init__(self, arch, num_classes, res, head="linear", clip_dim=0, class_text=None,
                 tau=0.07):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, res)
        self.head = nn.Linear(self.feat_dim, num_classes) if head == "linear" else None
        self.clip_proj = nn.Linear(self.feat_dim, clip_dim) if clip_dim else None
        self.register_buffer("class_text", class_text, persistent=False)
        self.tau = tau

    def forward(self, images):
        feats = self.backbone(images)
        clip_emb = self.clip_proj(feats) if self.clip_proj is not None else None
        if self.head is not None:
            logits = self.head(feats)
        else:
            logits = F.normalize(clip_emb, dim=-1) @ self.class_text.to(clip_emb.dtype).T / self.tau
        return feats, logits, clip_emb


class TextHead(nn.Module):
    """VLM-KD's image projection and text adaptor into a shared space; dropped for deployment."""

    def __init__(self, feat_dim, text_dim, embed_dim, hidden, temp, learn_temp):
        super().__init__()
        self.proj = nn.Linear(feat_dim, embed_dim)
        self.adaptor = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, embed_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temp)), requires_grad=learn_temp)
