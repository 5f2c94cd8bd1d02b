"""
Weight formats for decoding (gpt-fast's shape: the model file stays the float model; one call here changes it).

A decode step at batch 1 reads every weight once, so its speed is bandwidth / bytes of weights:
- cast_weights(model, dtype): Linear and token-embedding weights stored in the autocast dtype (bf16 / fp16), so a
  compiled step reads 2 bytes per weight instead of casting float32 weights again on every token (which moves
  4 + 2 + 2 bytes: inductor keeps the parameters as graph inputs, docs/BENCHMARKS.md). LayerNorms and the position
  table stay float32 (a few KB, and the residual stream keeps float32 precision).
- quantize(model, 'int8'): every Linear of the blocks and the LM head swapped for an int8 twin with one float scale
  per output channel (weight-only: activations stay float), made once at load. Compiled, the int8 weights are
  dequantised inside the fused multiply-reduce; no float copy is kept. The token embedding (one row read per
  token) stays float.
Both are for decoding and scoring only: a quantised model refuses to train and is never saved.
"""

import copy

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import fused_row

FORMATS = ('none', 'int8')


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale (+ bias), q int8 (out, in), scale (out,): w ~= q * scale, |w - q * scale| <= scale / 2"""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # per output channel: one large row costs only itself
        self.register_buffer('weight', torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer('scale', scale.to(linear.weight.dtype))
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        if self.training:
            raise RuntimeError("an int8-quantised model is for decoding and evaluation only; train the float model")
        if fused_row(x):  # one row, compiled for a CPU: int8 loads converted inside the reduction (model.project)
            y = (x.unsqueeze(-2) * self.weight).sum(-1) * self.scale
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize(model, kind):
    """swap the blocks' Linears and the LM head for int8 twins, in place (kind 'none' leaves the model as is)"""
    if kind not in FORMATS:
        raise ValueError(f"unknown quantize {kind!r}; use {' or '.join(FORMATS)}")
    if kind == 'none':
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return model.eval()


def cast_weights(model, dtype, copy_weights=False):
    """model with its Linear and token-embedding weights stored in dtype ('bfloat16' or 'float16'; 'float32' returns
    model unchanged), for running under autocast(dtype). copy_weights=True leaves model untouched and returns a twin
    (train.py's samples: the big weights are cast straight into the twin, never copied in float32)."""
    if dtype == 'float32':
        return model
    wpe = model.transformer.wpe.weight if 'wpe' in model.transformer else None  # pos_emb='rope' has no table
    big = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))
           for p in m.parameters(recurse=False) if p is not wpe]
    if any(type(p) is not nn.Parameter for p in big):  # DTensor shards (FSDP): autocast casts them as gathered
        return model
    if copy_weights:  # deepcopy's memo maps each big weight to its cast twin: ties kept, no float32 detour
        memo = {id(p): nn.Parameter(p.detach().to(getattr(torch, dtype)), requires_grad=False) for p in big}
        return copy.deepcopy(model, memo)
    for p in big:
        p.data = p.data.to(getattr(torch, dtype))
    return model


def decoding_model(model, dtype, kind='none'):
    """sample.py's (and hellaswag.py's, bench.py's, chat.py's) model for decoding: weights in the inference dtype, then
    quantised if asked. Errors (an unknown kind) raise ValueError."""
    return quantize(cast_weights(model, dtype), kind)


if __name__ == '__main__':
    # What each format costs a trained model: whole-val loss and greedy agreement with float32.
    # $ python quantize.py --out_dir=out-shakespeare --dataset=shakespeare
    import os

    import numpy as np

    from configurator import configure, fail
    from runtime import autocast, load_model

    out_dir = 'out'  # the run whose ckpt.pt is measured
    dataset = 'shakespeare'  # its val.bin is data/<dataset>/val.bin
    formats = 'float32,bfloat16,int8'  # weight formats compared with float32
    greedy_tokens = 500  # greedy tokens compared position by position with float32's
    configure(globals())
    val = np.memmap(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset, 'val.bin'),
                    dtype=np.uint16, mode='r')
    ref = ref_loss = ref_top1 = None
    for fmt in formats.split(','):
        if fmt not in ('float32', 'bfloat16', 'int8'):
            fail(f"unknown format '{fmt}'; use float32, bfloat16 or int8")
        model, _ = load_model('resume', out_dir, torch.device('cpu'))
        dtype = 'bfloat16' if fmt == 'bfloat16' else 'float32'
        model = decoding_model(model, dtype, 'int8' if fmt == 'int8' else 'none')
        T = model.config.block_size
        blocks = torch.arange((len(val) - 1) // T) * T  # every non-overlapping block of val once
        total, n, top1 = 0.0, 0, []
        with torch.no_grad(), autocast('cpu', dtype):
            for b in blocks.split(16):
                x = torch.stack([torch.from_numpy(val[i:i + T].astype(np.int64)) for i in b.tolist()])
                y = torch.stack([torch.from_numpy(val[i + 1:i + 1 + T].astype(np.int64)) for i in b.tolist()])
                logits, loss = model(x, y)
                total, n = total + loss.item() * len(b), n + len(b)
                top1.append(logits.argmax(-1).flatten())
            out = model.generate(torch.tensor([[int(val[0])]]), greedy_tokens, temperature=0)[0, 1:]
        top1 = torch.cat(top1)
        if ref is None:
            ref, ref_loss, ref_top1 = out, total / n, top1
        agree = (out == ref).float().mean().item()  # free-running: after the first difference the texts part ways
        same_top1 = (top1 == ref_top1).float().mean().item()  # teacher-forced: every val position on its own
        print(f"{fmt:>9}: val loss {total / n:.5f} ({total / n - ref_loss:+.5f}) over {n} blocks of {T}; top-1 "
              f"prediction as {formats.split(',')[0]}'s at {same_top1:.2%} of val positions; {greedy_tokens} greedy "
              f"tokens agreeing position by position: {agree:.1%} (distinct tokens {len(set(out.tolist()))})", flush=True)
