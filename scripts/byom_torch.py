#!/usr/bin/env python3
"""PyTorch side of deadbolt's bring-your-own-model tests and scenario matrix.

Trains small models *in PyTorch* on the real MNIST digits (the IDX files of
`deadbolt data fetch-mnist`), clean or backdoored with triggers deadbolt's own
trigger code does not make (a random binary patch anywhere, a checkerboard or
solid patch off the corners, a blended noise pattern, all-to-all relabelling),
exports them as safetensors state_dicts with a model card, and checks models
deadbolt wrote: strict `load_state_dict`, predictions, ACC and ASR with the
real trigger.

Subcommands (all print one JSON object on stdout):
  prepare  --mnist DIR --out DIR [--defender N] [--seed S]
           test split -> OUT/defender (N images) and OUT/test (the rest), IDX
  train    --mnist DIR --out DIR [--seed S] [--epochs E] [--trigger KIND ...]
           OUT/model.safetensors, OUT/card.toml, OUT/trigger.safetensors
           (mask [1,H,W], pattern [C,H,W], image space), OUT/metrics.json
  evaluate --model F --card F --data DIR [--trigger F --target T --mode M]
           ACC (and ASR with the real trigger) of a state_dict on DIR's IDX
  predict  --model F --card F --data DIR --n N --out F
           predicted labels of the first N images
  logits   --model F --card F --images F --out F
           logits of the `images` of a safetensors file
  resnet18 --out DIR [--channels C --size S --classes K --seed S]
           a torchvision-named resnet18 (random weights, random BN stats),
           its card, inputs and logits, to check deadbolt's forward
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

MEAN, STD = 0.1307, 0.3081


# ----------------------------------------------------------------- data
def read_idx(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        import gzip

        raw = gzip.decompress(raw)
    magic = struct.unpack(">I", raw[:4])[0]
    if magic == 0x803:
        n, h, w = struct.unpack(">III", raw[4:16])
        return np.frombuffer(raw, np.uint8, n * h * w, 16).reshape(n, 1, h, w)
    if magic == 0x801:
        (n,) = struct.unpack(">I", raw[4:8])
        return np.frombuffer(raw, np.uint8, n, 8).astype(np.int64)
    raise SystemExit(f"{path}: not an IDX file")


def write_idx(dir_, images, labels, prefix="t10k"):
    os.makedirs(dir_, exist_ok=True)
    n, _, h, w = images.shape
    with open(os.path.join(dir_, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes())
    with open(os.path.join(dir_, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


def load_split(dir_, split):
    p = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(dir_, f"{p}-images-idx3-ubyte"))
    y = read_idx(os.path.join(dir_, f"{p}-labels-idx1-ubyte"))
    return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y)


# ----------------------------------------------------------------- models
class BadNetCnn(nn.Module):
    """deadbolt's badnet-cnn: the same layers and parameter names."""

    def __init__(self, c=1, h=28, w=28, classes=10):
        super().__init__()
        side = lambda s: ((s - 4) // 2 - 4) // 2
        self.conv1 = nn.Conv2d(c, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * side(h) * side(w), 512)
        self.fc2 = nn.Linear(512, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, inp, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inp != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inp, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(out + idt)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's module tree (and so its state_dict
    names), with a configurable input channel count."""

    def __init__(self, c=3, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = 64
        for i, planes in enumerate([64, 128, 256, 512]):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(inp, planes, stride), BasicBlock(planes, planes, 1))
            setattr(self, f"layer{i + 1}", layer)
            inp = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def build(card):
    c, h, w = card["input_shape"]
    if card["arch"] == "badnet-cnn":
        return BadNetCnn(c, h, w, card["classes"])
    if card["arch"] == "resnet18":
        return ResNet18(c, card["classes"])
    raise SystemExit(f"unsupported arch {card['arch']}")


def read_card(path):
    text = open(path).read()
    if path.endswith(".json"):
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # python < 3.11
        import tomli as tomllib
    return tomllib.loads(text)


def write_card(path, arch, shape, classes, mean, std):
    with open(path, "w") as f:
        f.write(f'arch = "{arch}"\n')
        f.write(f"input_shape = [{', '.join(str(v) for v in shape)}]\n")
        f.write(f"classes = {classes}\n")
        f.write(f"mean = [{', '.join(repr(float(v)) for v in mean)}]\n")
        f.write(f"std = [{', '.join(repr(float(v)) for v in std)}]\n")


def normalise(x, card):
    mean = torch.tensor(card["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(card["std"], dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------- triggers
def make_trigger(a, c, h, w):
    """Mask [1,H,W] and pattern [C,H,W] in image space, from the args."""
    rng = np.random.default_rng(a.trigger_seed)
    mask = torch.zeros(1, h, w)
    pattern = torch.zeros(c, h, w)
    if a.trigger == "blend":
        mask[:] = a.alpha
        pattern[:] = torch.from_numpy(rng.random((c, h, w)).astype(np.float32))
        return mask, pattern
    s, r, col = a.size, a.row, a.col
    if r < 0 or col < 0 or r + s > h or col + s > w:
        raise SystemExit(f"a {s}x{s} patch at ({r}, {col}) does not fit {h}x{w}")
    if a.trigger == "random":
        p = rng.integers(0, 2, (s, s)).astype(np.float32)
        while p.sum() in (0, s * s):  # a real pattern, not solid
            p = rng.integers(0, 2, (s, s)).astype(np.float32)
    elif a.trigger == "checkerboard":
        p = ((np.arange(s)[:, None] + np.arange(s)[None, :]) % 2 == 0).astype(np.float32)
    elif a.trigger == "solid":
        p = np.ones((s, s), np.float32)
    else:
        raise SystemExit(f"unknown trigger {a.trigger}")
    mask[0, r : r + s, col : col + s] = 1.0
    pattern[:, r : r + s, col : col + s] = torch.from_numpy(p)
    return mask, pattern


def stamp(x, mask, pattern):
    return x * (1 - mask) + pattern * mask


def target_of(y, mode, target, classes):
    return torch.full_like(y, target) if mode == "all-to-one" else (y + 1) % classes


def asr(model, x, y, card, mask, pattern, mode, target):
    keep = y != target if mode == "all-to-one" else torch.ones_like(y, dtype=torch.bool)
    xt = stamp(x[keep], mask, pattern)
    want = target_of(y[keep], mode, target, card["classes"])
    pred = predict(model, xt, card)
    return float((pred == want).float().mean()), int(keep.sum())


@torch.no_grad()
def predict(model, x, card, batch=1000):
    model.eval()
    out = [model(normalise(x[i : i + batch], card)).argmax(1) for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ----------------------------------------------------------------- commands
def cmd_prepare(a):
    x = read_idx(os.path.join(a.mnist, "t10k-images-idx3-ubyte"))
    y = read_idx(os.path.join(a.mnist, "t10k-labels-idx1-ubyte"))
    rng = np.random.default_rng(a.seed)
    d_idx, t_idx = [], []
    per = a.defender / len(x)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(per * len(idx)))
        d_idx += list(idx[:k])
        t_idx += list(idx[k:])
    d_idx, t_idx = np.sort(d_idx), np.sort(t_idx)
    write_idx(os.path.join(a.out, "defender"), x[d_idx], y[d_idx])
    write_idx(os.path.join(a.out, "test"), x[t_idx], y[t_idx])
    print(json.dumps({"defender": len(d_idx), "test": len(t_idx)}))


def cmd_train(a):
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.set_num_threads(a.threads)
    x, y = load_split(a.mnist, "train")
    xt, yt = load_split(a.mnist, "test") if a.test is None else load_split(a.test, "test")
    c, h, w = x.shape[1:]
    card = {"arch": a.arch, "input_shape": [c, h, w], "classes": 10, "mean": [MEAN], "std": [STD]}
    model = build(card)
    mask, pattern = make_trigger(a, c, h, w)
    xp, yp = x.clone(), y.clone()
    poisoned = 0
    if a.rate > 0:
        g = torch.Generator().manual_seed(a.seed + 1)
        elig = (y != a.target).nonzero().squeeze(1) if a.mode == "all-to-one" else torch.arange(len(y))
        n = int(round(a.rate * len(elig)))
        chosen = elig[torch.randperm(len(elig), generator=g)[:n]]
        xp[chosen] = stamp(x[chosen], mask, pattern)
        yp[chosen] = target_of(y[chosen], a.mode, a.target, 10)
        poisoned = n
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    g = torch.Generator().manual_seed(a.seed + 2)
    for _ in range(a.epochs):
        model.train()
        perm = torch.randperm(len(xp), generator=g)
        for i in range(0, len(xp), a.batch):
            idx = perm[i : i + a.batch]
            loss = F.cross_entropy(model(normalise(xp[idx], card)), yp[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    os.makedirs(a.out, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(a.out, "model.safetensors"))
    write_card(os.path.join(a.out, "card.toml"), a.arch, [c, h, w], 10, [MEAN], [STD])
    save_file({"mask": mask.contiguous(), "pattern": pattern.contiguous()},
              os.path.join(a.out, "trigger.safetensors"))
    acc = float((predict(model, xt, card) == yt).float().mean())
    a_sr, n_t = asr(model, xt, yt, card, mask, pattern, a.mode, a.target)
    m = {"acc": acc, "asr": a_sr, "n_test": len(yt), "n_triggered": n_t, "poisoned": poisoned,
         "trigger": a.trigger, "size": a.size, "row": a.row, "col": a.col, "target": a.target,
         "rate": a.rate, "mode": a.mode, "seed": a.seed, "alpha": a.alpha}
    json.dump(m, open(os.path.join(a.out, "metrics.json"), "w"), indent=1)
    print(json.dumps(m))


def load_model(model_path, card_path):
    card = read_card(card_path)
    model = build(card)
    # strict: every key, no extra, same shapes
    model.load_state_dict(load_file(model_path), strict=True)
    return model.eval(), card


def cmd_evaluate(a):
    torch.set_num_threads(a.threads)
    model, card = load_model(a.model, a.card)
    x, y = load_split(a.data, "test")
    out = {"acc": float((predict(model, x, card) == y).float().mean()), "n": len(y)}
    if a.trigger:
        t = load_file(a.trigger)
        out["asr"], out["n_triggered"] = asr(model, x, y, card, t["mask"], t["pattern"], a.mode, a.target)
    print(json.dumps(out))


def cmd_predict(a):
    torch.set_num_threads(a.threads)
    model, card = load_model(a.model, a.card)
    x, _ = load_split(a.data, "test")
    pred = predict(model, x[: a.n], card)
    json.dump(pred.tolist(), open(a.out, "w"))
    print(json.dumps({"n": len(pred)}))


def cmd_logits(a):
    torch.set_num_threads(a.threads)
    model, card = load_model(a.model, a.card)
    x = load_file(a.images)["images"]
    with torch.no_grad():
        y = model(normalise(x, card))
    save_file({"logits": y.contiguous()}, a.out)
    print(json.dumps({"n": len(y)}))


def cmd_resnet18(a):
    torch.manual_seed(a.seed)
    model = ResNet18(a.channels, a.classes)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(17)
    model.eval()
    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(a.out, "model.safetensors"))
    mean, std = [0.5] * a.channels, [0.25] * a.channels
    write_card(os.path.join(a.out, "card.toml"), "resnet18", [a.channels, a.size, a.size], a.classes, mean, std)
    x = torch.rand(4, a.channels, a.size, a.size)
    with torch.no_grad():
        y = model((x - 0.5) / 0.25)
    save_file({"images": x.contiguous(), "logits": y.contiguous()}, os.path.join(a.out, "io.safetensors"))
    print(json.dumps({"params": len(model.state_dict())}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("--mnist", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--defender", type=int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("train")
    q.add_argument("--mnist", required=True)
    q.add_argument("--test", help="folder with t10k-* IDX files to report ACC/ASR on")
    q.add_argument("--out", required=True)
    q.add_argument("--arch", default="badnet-cnn")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--epochs", type=int, default=4)
    q.add_argument("--batch", type=int, default=64)
    q.add_argument("--lr", type=float, default=0.02)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--trigger", default="random", choices=["random", "checkerboard", "solid", "blend"])
    q.add_argument("--trigger-seed", type=int, default=7)
    q.add_argument("--size", type=int, default=4)
    q.add_argument("--row", type=int, default=3)
    q.add_argument("--col", type=int, default=12)
    q.add_argument("--alpha", type=float, default=0.15)
    q.add_argument("--target", type=int, default=3)
    q.add_argument("--rate", type=float, default=0.0)
    q.add_argument("--mode", default="all-to-one", choices=["all-to-one", "all-to-all"])
    for name in ["evaluate", "predict"]:
        q = sub.add_parser(name)
        q.add_argument("--model", required=True)
        q.add_argument("--card", required=True)
        q.add_argument("--data", required=True)
        q.add_argument("--threads", type=int, default=2)
        if name == "evaluate":
            q.add_argument("--trigger")
            q.add_argument("--target", type=int, default=0)
            q.add_argument("--mode", default="all-to-one")
        else:
            q.add_argument("--n", type=int, default=200)
            q.add_argument("--out", required=True)
    q = sub.add_parser("logits")
    q.add_argument("--model", required=True)
    q.add_argument("--card", required=True)
    q.add_argument("--images", required=True, help="safetensors with `images` [N,C,H,W] in [0,1]")
    q.add_argument("--out", required=True)
    q.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("resnet18")
    q.add_argument("--out", required=True)
    q.add_argument("--channels", type=int, default=3)
    q.add_argument("--size", type=int, default=32)
    q.add_argument("--classes", type=int, default=10)
    q.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate,
     "predict": cmd_predict, "logits": cmd_logits, "resnet18": cmd_resnet18}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
