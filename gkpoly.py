"""
How well GKpoly-n approximates GK attention on a trained GK model's real activations (docs/ATTENTION.md):

    python compare.py --variants="SM:;GK:--attn_type=GK" --seeds="(1337,)"   # trains out-compare/GK-s1337
    python gkpoly.py --run=out-compare/GK-s1337

The checkpoint is run on one validation batch, q, k, v are captured per layer (forward hooks on attn.c_attn), and
attend(q, k, v, 'GKpoly', n) is compared with attend(q, k, v, 'GK') in float64; then GKpoly-n is swapped into the
GK-trained model (no finetuning) and its val loss taken on the batches train.py's own evaluation uses.
Prints a markdown table; writes nothing.
"""

import math
import os

import numpy as np
import torch

from configurator import configure, fail
from model import attend, parse_attn_type
from runtime import draw_offsets, load_checkpoint, model_from_checkpoint, read_batch

# -----------------------------------------------------------------------------
run = 'out-compare/GK-s1337'  # a run dir whose ckpt.pt was trained with attn_type='GK'
poly_degrees = (2, 4, 8, 16, 32, 64)  # n of GKpoly-n compared with GK
# -----------------------------------------------------------------------------
configure(globals())
if not poly_degrees or any(type(n) is not int or n <= 0 for n in poly_degrees):
    fail(f"--poly_degrees must be a tuple of positive integers like (2, 8), got {poly_degrees!r}")
ckpt = load_checkpoint(os.path.join(run, 'ckpt.pt'))
if ckpt['model_args'].get('attn_type') != 'GK':
    fail(f"{run} was trained with attn_type {ckpt['model_args'].get('attn_type')!r}, not 'GK'; give a GK run")
cfg, model = ckpt['config'], model_from_checkpoint(ckpt).eval()
data_path = cfg.get('data_dir') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', cfg['dataset'])
if not os.path.isfile(os.path.join(data_path, 'val.bin')):
    fail(f"{run} was trained on {data_path}, which has no val.bin now; prepare that dataset again")


def val_batches():
    """the val batches of train.py's estimate_loss (same generator, same draw), so GK's loss matches its log"""
    val = np.memmap(os.path.join(data_path, 'val.bin'), dtype=np.uint16, mode='r')
    T = cfg['block_size']
    for offs in draw_offsets(torch.Generator().manual_seed(cfg['seed'] + 1), len(val), T, cfg['eval_iters'],
                             cfg['batch_size']):
        yield read_batch(val, offs, T, 'cpu')


@torch.no_grad()
def val_loss(attn_type):
    for block in model.transformer.h:  # the same weights, another attention
        block.attn.kind, block.attn.arg = parse_attn_type(attn_type)
    losses = [model(X, Y)[1].item() for X, Y in val_batches()]
    return sum(losses) / len(losses)


with torch.no_grad():
    captured = []  # q, k, v of every layer on the first val batch, where the block computes them
    hooks = [b.attn.c_attn.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
             for b in model.transformer.h]
    X, Y = next(val_batches())
    model(X, Y)
    for h in hooks:
        h.remove()
    C, nh = model.config.n_embd, model.config.n_head
    qkvs = [tuple(t.double().view(X.size(0), X.size(1), nh, C // nh).transpose(1, 2) for t in o.split(C, dim=2))
            for o in captured]  # float64: the differences measured are the polynomial's, not rounding
    refs = [attend(q, k, v, 'GK') for q, k, v in qkvs]
    d = C // nh  # the range of the Gaussian-kernel score s = -|q - k|^2 / (2 sqrt(d)) that p_n has to follow
    allowed = torch.ones(X.size(1), X.size(1), dtype=torch.bool).tril()
    s = torch.cat([(-torch.cdist(q, k) ** 2 / (2 * math.sqrt(d)))[..., allowed].flatten() for q, k, _ in qkvs])
    s_q = torch.quantile(s[torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                         torch.tensor([0.01, 0.5], dtype=s.dtype))
    base = val_loss('GK')
    lines = ['| attn_type | max abs err vs GK | mean abs err vs GK | val loss (swapped in) | vs GK |', '|---|---|---|---|---|']
    for n in poly_degrees:
        diffs = [(attend(q, k, v, 'GKpoly', n) - ref).abs() for (q, k, v), ref in zip(qkvs, refs)]
        loss = val_loss(f'GKpoly-{n}')
        lines.append(f"| GKpoly-{n} | {max(x.max().item() for x in diffs):.3e} | "
                     f"{sum(x.mean().item() for x in diffs) / len(diffs):.3e} | {loss:.4f} | {loss - base:+.2g} |")
print('\n'.join(lines))
print(f"\nGK checkpoint: {run}/ckpt.pt at iter {ckpt['iter_num']}, {cfg['n_layer']} layers x {nh} heads, head size {d}. "
      f"Output errors over all layers on one val batch ({X.size(0)} x {X.size(1)} tokens), in float64; mean |GK "
      f"output| = {sum(r.abs().mean().item() for r in refs) / len(refs):.3e}. Val loss on train.py's "
      f"{cfg['eval_iters']} eval batches; GK itself: {base:.4f}. Score s = -|q-k|^2/(2 sqrt(d)) on these "
      f"activations: median {s_q[1].item():.2f}, 1st percentile {s_q[0].item():.2f}, min {s.min().item():.2f} "
      f"(p_n clamps s at -n).")
