#!/usr/bin/env python3
"""The PyTorch side of the training benchmarks: the same model (badnet-cnn on
MNIST IDX files, or preact-resnet18 on CIFAR-10 binary batches), batch 64,
SGD (momentum 0.9, wd 5e-4), the same thread count as deadbolt. Prints one
JSON line with images/s (wall) and images per CPU second.

Two loaders are measured: `dataloader` (torch.utils.data.DataLoader over a
TensorDataset, how most PyTorch code is written) and `indexed` (a random
permutation and tensor indexing per batch, the same as deadbolt does).
On a GPU, `--channels-last` and `--amp` (float16 autocast with a gradient
scaler) are what a tuned PyTorch run would use.
"""
import argparse, gzip, json, os, struct, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BadNetCnn(nn.Module):
    def __init__(self, c=1, classes=10, side=28):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        f = ((side - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(32 * f * f, 512)
        self.fc2 = nn.Linear(512, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class PreActBlock(nn.Module):
    """BackdoorBench's PreActBlock (the names deadbolt's preact-resnet18 loads)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, c=3, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        planes, layers = 64, []
        for i, p in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(PreActBlock(planes, p, stride), PreActBlock(p, p, 1)))
            planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def read_cifar(folder):
    """data_batch_*.bin: records of 1 label byte + 3x32x32 pixel bytes."""
    raw = b"".join(open(os.path.join(folder, f), "rb").read()
                   for f in sorted(os.listdir(folder)) if f.startswith("data_batch_") and f.endswith(".bin"))
    rec = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 1 + 3 * 32 * 32)
    return rec[:, 1:].reshape(-1, 3, 32, 32).float() / 255.0, rec[:, 0].long()


def read_idx(path):
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 0x803:
        h, w = struct.unpack(">II", raw[8:16])
        return torch.frombuffer(bytearray(raw[16:16 + n * h * w]), dtype=torch.uint8).view(n, 1, h, w).float() / 255.0
    return torch.frombuffer(bytearray(raw[8:8 + n]), dtype=torch.uint8).long()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/mnist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loader", choices=["dataloader", "indexed"], default="dataloader")
    ap.add_argument("--arch", choices=["badnet-cnn", "preact-resnet18"], default="badnet-cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--amp", action="store_true", help="float16 autocast + gradient scaler (cuda)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if a.arch == "badnet-cnn":
        x = read_idx(os.path.join(a.data, "train-images-idx3-ubyte"))
        y = read_idx(os.path.join(a.data, "train-labels-idx1-ubyte"))
        model = BadNetCnn(c=x.shape[1], side=x.shape[-1]).to(dev)
    else:
        x, y = read_cifar(a.data)
        model = PreActResNet18(c=x.shape[1]).to(dev)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if a.amp and dev.type != "cuda":
        print("train_torch.py: --amp is for cuda; training in float32", file=sys.stderr)
        a.amp = False
    scaler = torch.amp.GradScaler("cuda", enabled=a.amp)
    bs = a.batch
    if a.loader == "dataloader":
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs, shuffle=True)
    else:
        x, y = x.to(dev), y.to(dev)
    n = x.shape[0]
    seconds = cpu = 0.0
    for _ in range(a.epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        if a.loader == "dataloader":
            batches = ((bx.to(dev), by.to(dev)) for bx, by in loader)
        else:
            perm = torch.randperm(n, device=dev)
            batches = ((x[perm[s:s + bs]], y[perm[s:s + bs]]) for s in range(0, n, bs))
        for bx, by in batches:
            if a.channels_last:
                bx = bx.contiguous(memory_format=fmt)
            if scaler.is_enabled():
                with torch.autocast(dev.type, dtype=torch.float16):
                    loss = F.cross_entropy(model(bx), by)
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                continue
            loss = F.cross_entropy(model(bx), by)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
    tag = "".join(s for s, on in (("-channels-last", a.channels_last), ("-amp", a.amp)) if on)
    print(json.dumps({"impl": f"pytorch-{a.loader}{tag}", "arch": a.arch, "images": n * a.epochs, "seconds": seconds,
                      "images_per_sec": n * a.epochs / seconds, "cpu_seconds": cpu,
                      "cpu_images_per_sec": n * a.epochs / cpu, "threads": a.threads, "device": a.device}))


if __name__ == "__main__":
    main()
