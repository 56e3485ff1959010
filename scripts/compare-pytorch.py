#!/usr/bin/env python3
"""Train the same transformer in PyTorch and in potluck, alternately, and print the speed ratio.

Both use the same libtorch (the project venv's torch 2.13.0), the same shapes, the same batch and
the same thread count, so any gap is potluck's own overhead: copies to and from flat buffers, the
optimizer in Rust, shapes that defeat the fast kernels. Both step with AdamW and f32 state:
PyTorch's torch.optim.AdamW (foreach), potluck's AdamW on flat buffers, as
`potluck bench train --optimizer adamw` measures.

Usage (from the repository root, after `make build` and `make venv-pytorch`):

    .venv/bin/python scripts/compare-pytorch.py --config small --rounds 5
    .venv/bin/python scripts/compare-pytorch.py --config gpt --batch 8 --rounds 3

The model here is written from potluck's configuration (`potluck model-info --json`): pre-LN
blocks shared across layers, rotary positions (text / row / column groups), the layers'
attention masks, GEGLU, tied embeddings, loss (text CE + 7 image CE) / 8.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

POTLUCK = "target/release/potluck"


def slot(t, p):
    if p < t["text_len"]:
        return ("text", p, 0, 0)
    k = p - t["text_len"]
    return ("image", t["text_len"], k // t["image_grid"] + 1, k % t["image_grid"] + 1)


def allowed(t, pattern, q, k):
    if k > q:
        return False
    sq, sk = slot(t, q), slot(t, k)
    if sk[0] == "text":
        return True
    if sq[0] == "text":
        return False
    (_, _, qr, qc), (_, _, kr, kc) = sq, sk
    if pattern == "full":
        return True
    if pattern == "axial_row":
        return kr == qr
    if pattern == "axial_col":
        return kc == qc
    size = int(pattern[len("conv"):])
    h = size // 2
    return kr + h >= qr and abs(kc - qc) <= h


def rotary(t, pairs, length):
    axial = pairs // 3
    seq = pairs - 2 * axial
    out = torch.zeros(length, pairs)
    for p in range(length):
        _, s, r, c = slot(t, p)
        for i in range(pairs):
            if i < seq:
                out[p, i] = s * 10000 ** (-i / max(seq, 1))
            elif i < seq + axial:
                out[p, i] = r * 10000 ** (-(i - seq) / max(axial, 1))
            else:
                out[p, i] = c * 10000 ** (-(i - seq - axial) / max(axial, 1))
    return out


class Dalle(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        t = cfg["tokens"]
        d, hidden = cfg["d_model"], cfg["ff_mult"] * cfg["d_model"]
        self.t = t
        self.embedding = torch.nn.Parameter(torch.randn(t["text_vocab"] + t["image_vocab"], d) * 0.02)
        self.blocks = torch.nn.ModuleList()
        for _ in cfg["blocks"]:
            self.blocks.append(torch.nn.ModuleDict({
                "qkv": torch.nn.Linear(d, 3 * d, bias=False),
                "out": torch.nn.Linear(d, d),
                "ff_in": torch.nn.Linear(d, 2 * hidden),
                "ff_out": torch.nn.Linear(hidden, d),
            }))
        self.norms = torch.nn.ModuleList(
            torch.nn.ModuleList([torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)]) for _ in range(cfg["layers"]))
        self.final = torch.nn.LayerNorm(d)
        length = t["text_len"] + t["image_grid"] ** 2 - 1
        self.masks = {}
        for pattern in set(cfg["blocks"]):
            m = torch.tensor([[allowed(t, pattern, q, k) for k in range(length)] for q in range(length)])
            self.masks[pattern] = m
        angles = rotary(t, d // cfg["heads"] // 2, length)
        self.register_buffer("rot", torch.polar(torch.ones_like(angles), angles))

    def rotate(self, x):
        # Pairs (x[2i], x[2i+1]) as complex numbers, turned by the position's angles.
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * self.rot).flatten(-2)

    def forward(self, text, image):
        t, cfg = self.t, self.cfg
        ids = torch.cat([text, image[:, :-1] + t["text_vocab"]], 1)
        h = F.embedding(ids, self.embedding)
        b, length, d = h.shape
        heads = cfg["heads"]
        for i in range(cfg["layers"]):
            u = i % len(cfg["blocks"])
            blk, (na, nf) = self.blocks[u], self.norms[i]
            qkv = blk["qkv"](na(h)).view(b, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            qk = self.rotate(qkv[:2])
            q, k, v = qk[0], qk[1], qkv[2]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[cfg["blocks"][u]])
            h = h + blk["out"](o.transpose(1, 2).reshape(b, length, d))
            a, g = blk["ff_in"](nf(h)).chunk(2, -1)
            h = h + blk["ff_out"](a * F.gelu(g))
        h = self.final(h)
        tv, tl = t["text_vocab"], t["text_len"]
        image_logits = h[:, tl - 1:] @ self.embedding[tv:].T
        image_ce = F.cross_entropy(image_logits.reshape(-1, t["image_vocab"]), image.reshape(-1))
        if tl > 1:
            text_logits = h[:, :tl - 1] @ self.embedding[:tv].T
            text_ce = F.cross_entropy(text_logits.reshape(-1, tv), text[:, 1:].reshape(-1))
        else:
            text_ce = torch.zeros(())
        return (text_ce + 7 * image_ce) / 8


def torch_rate(model, opt, text, image, steps, warmup):
    for _ in range(warmup):
        opt.zero_grad(set_to_none=False)
        model(text, image).backward()
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        model(text, image).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return text.shape[0] / statistics.median(times)


def potluck_rate(args):
    out = subprocess.run(
        [POTLUCK, "bench", "train", "--config", args.config, "--batch", str(args.batch),
         "--steps", str(args.steps), "--warmup", str(args.warmup), "--variants", "f32",
         "--optimizer", "adamw", "--json"],
        check=True, capture_output=True, text=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report["variants"][0]["samples_per_s"], report["sgemm_gflops"], report["train_gflop_per_sample"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    info = json.loads(subprocess.run([POTLUCK, "model-info", "--config", args.config, "--json"],
                                     check=True, capture_output=True, text=True).stdout)
    cfg = info["config"]
    torch.manual_seed(0)
    model = Dalle(cfg)
    n = sum(p.numel() for p in model.parameters())
    if n != info["unique_params"]:
        sys.exit(f"parameter count {n} differs from potluck's {info['unique_params']}: models differ")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    t = cfg["tokens"]
    g = torch.Generator().manual_seed(1)
    text = torch.randint(t["text_vocab"], (args.batch, t["text_len"]), generator=g)
    image = torch.randint(t["image_vocab"], (args.batch, t["image_grid"] ** 2), generator=g)
    print(f"{args.config}: {n} parameters, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'round':>5} {'potluck/s':>10} {'pytorch/s':>10} {'ratio':>6} {'sgemm GFLOP/s':>14}")
    ratios, ours_all, theirs_all, sgemms = [], [], [], []
    for r in range(args.rounds):
        ours, sgemm, gflop = potluck_rate(args)
        theirs = torch_rate(model, opt, text, image, args.steps, args.warmup)
        ratios.append(ours / theirs)
        ours_all.append(ours)
        theirs_all.append(theirs)
        sgemms.append(sgemm)
        print(f"{r:>5} {ours:>10.2f} {theirs:>10.2f} {ours / theirs:>6.3f} {sgemm:>14.0f}")
    ours, theirs, sgemm = map(statistics.median, (ours_all, theirs_all, sgemms))
    print(f"median: potluck {ours:.2f} samples/s ({ours * gflop:.0f} GFLOP/s, "
          f"{100 * ours * gflop / sgemm:.0f}% of sgemm), pytorch {theirs:.2f} samples/s "
          f"({theirs * gflop:.0f} GFLOP/s); ratio potluck/pytorch {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
