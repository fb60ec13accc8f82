#!/usr/bin/env python3
"""The PyTorch side of the training benchmark: the same badnet-cnn, the same
MNIST IDX training data, batch 64, SGD (momentum 0.9, wd 5e-4), the same
thread count as deadbolt. Prints one JSON line with images/s.

Two loaders are measured: `dataloader` (torch.utils.data.DataLoader over a
TensorDataset, how most PyTorch code is written) and `indexed` (a random
permutation and tensor indexing per batch, the same as deadbolt does).
"""
import argparse, gzip, json, os, struct, time

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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    x = read_idx(os.path.join(a.data, "train-images-idx3-ubyte"))
    y = read_idx(os.path.join(a.data, "train-labels-idx1-ubyte"))
    model = BadNetCnn(side=x.shape[-1]).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if a.loader == "dataloader":
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    else:
        x, y = x.to(dev), y.to(dev)
    n = x.shape[0]
    seconds = 0.0
    for _ in range(a.epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.train()
        if a.loader == "dataloader":
            batches = ((bx.to(dev), by.to(dev)) for bx, by in loader)
        else:
            perm = torch.randperm(n, device=dev)
            batches = ((x[perm[s:s + 64]], y[perm[s:s + 64]]) for s in range(0, n, 64))
        for bx, by in batches:
            loss = F.cross_entropy(model(bx), by)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
    print(json.dumps({"impl": f"pytorch-{a.loader}", "images": n * a.epochs, "seconds": seconds,
                      "images_per_sec": n * a.epochs / seconds, "threads": a.threads, "device": a.device}))


if __name__ == "__main__":
    main()
