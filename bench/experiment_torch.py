#!/usr/bin/env python3
"""The seed experiment in plain PyTorch, for a side-by-side timing with
`deadbolt experiment`: train a clean and a BadNets-backdoored CNN on the same
MNIST IDX files, collect per-channel activation norms of conv2 (after ReLU)
on clean and triggered validation images, and sweep l_inf pruning
(k = 0..32, a channel mask via a forward hook, the whole model per k).

    $DEADBOLT_VENV/bin/python bench/experiment_torch.py --data data/mnist --out runs/torch

Writes <out>/torch_report.json with the figures and timings per stage.
"""
import argparse, gzip, json, os, struct, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    for p in (path, path + ".gz"):
        if os.path.exists(p):
            raw = open(p, "rb").read()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            break
    else:
        raise FileNotFoundError(path)
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class BadNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 512)
        self.fc2 = nn.Linear(512, classes)
        self.mask = None

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        if self.mask is not None:
            x = x * self.mask.view(1, -1, 1, 1)
        return x

    def head(self, f):
        f = F.max_pool2d(f, 2).flatten(1)
        return self.fc2(F.relu(self.fc1(f)))

    def forward(self, x):
        return self.head(self.features(x))


def stratified_split(labels, fraction, rng):
    keep, held = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = int(round(fraction * len(idx)))
        held += list(idx[:n])
        keep += list(idx[n:])
    return np.sort(keep), np.sort(held)


def stamp(x, size=3):
    x = x.clone()
    x[:, :, -size:, -size:] = 1.0
    return x


def train(model, x, y, epochs, lr, momentum, batch, seed):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            i = order[s : s + batch]
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def predict(model, x, batch=1000):
    return torch.cat([model(x[s : s + batch]).argmax(1) for s in range(0, len(x), batch)])


@torch.no_grad()
def norms(model, x):
    a = model.features(x).flatten(2)
    return {"l1": a.abs().sum(2), "l2": a.pow(2).sum(2).sqrt(), "linf": a.abs().amax(2), "mean": a.mean(2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/mnist")
    ap.add_argument("--out", default="runs/torch")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--criteria", default="linf", help="comma-separated: linf,l1,l2")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t = {}
    t0 = time.time()
    xtr = torch.tensor(read_idx(os.path.join(a.data, "train-images-idx3-ubyte")), dtype=torch.float32).unsqueeze(1) / 255
    ytr = torch.tensor(read_idx(os.path.join(a.data, "train-labels-idx1-ubyte")), dtype=torch.long)
    xte = torch.tensor(read_idx(os.path.join(a.data, "t10k-images-idx3-ubyte")), dtype=torch.float32).unsqueeze(1) / 255
    yte = torch.tensor(read_idx(os.path.join(a.data, "t10k-labels-idx1-ubyte")), dtype=torch.long)
    rng = np.random.default_rng(a.seed)
    keep, held = stratified_split(ytr.numpy(), 0.1, rng)
    xval, yval = xtr[held], ytr[held]
    xtr, ytr = xtr[keep], ytr[keep]
    elig = np.flatnonzero(ytr.numpy() != a.target)
    pois = rng.choice(elig, int(round(a.rate * len(elig))), replace=False)
    xp, yp = xtr.clone(), ytr.clone()
    xp[pois] = stamp(xtr[pois])
    yp[pois] = a.target
    t["data"] = time.time() - t0

    nt = yte != a.target
    xte_trig, yte_trig = stamp(xte[nt]), yte[nt]

    def metrics(m):
        acc = (predict(m, xte) == yte).float().mean().item()
        p = predict(m, xte_trig)
        return acc, (p == a.target).float().mean().item(), (p == yte_trig).float().mean().item()

    out = {"args": vars(a)}
    for name, (x, y) in [("clean", (xtr, ytr)), ("backdoored", (xp, yp))]:
        t0 = time.time()
        torch.manual_seed(a.seed)
        m = BadNet()
        train(m, x, y, a.epochs, a.lr, a.momentum, a.batch, a.seed)
        t["train_" + name] = time.time() - t0
        acc, asr, ra = metrics(m)
        out[name + "_model"] = {"acc": acc, "asr": asr, "ra": ra}
        if name == "backdoored":
            bd = m
    t0 = time.time()
    xs = xval[: a.stats_images]
    clean_n, trig_n = norms(bd, xs), norms(bd, stamp(xs))
    sep = {}
    for n in ["l1", "l2", "linf"]:
        c, tr = clean_n[n].mean(0), trig_n[n].mean(0)
        eps = 1e-3 * c.abs().max() + 1e-12
        sep[n] = ((tr + eps) / (c + eps)).max().item()
    out["separation"] = sep
    t["stats"] = time.time() - t0

    t0 = time.time()
    curves = {}
    for crit in a.criteria.split(","):
        order = torch.argsort(trig_n[crit].mean(0), descending=True)
        curve = []
        for k in range(33):
            mask = torch.ones(32)
            mask[order[:k]] = 0
            bd.mask = mask
            acc, asr, ra = metrics(bd)
            curve.append({"k": k, "acc": acc, "asr": asr, "ra": ra})
        bd.mask = None
        curves[crit] = curve
    out["pruning"] = {
        c: {"curve": cv, "k_for_asr_5pct": next((p["k"] for p in cv if p["asr"] <= 0.05), None)}
        for c, cv in curves.items()
    }
    t["prune_sweep"] = time.time() - t0
    t["total"] = sum(t.values())
    out["timings"] = t
    json.dump(out, open(os.path.join(a.out, "torch_report.json"), "w"), indent=1)
    print(json.dumps({k: out[k] for k in ["clean_model", "backdoored_model", "separation"]}))
    for c in curves:
        print(c, "k for asr<=5%:", out["pruning"][c]["k_for_asr_5pct"], [(p["k"], round(p["acc"], 3), round(p["asr"], 3)) for p in curves[c][:9]])
    print("timings", json.dumps(t))


if __name__ == "__main__":
    main()
