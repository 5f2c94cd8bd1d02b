"""Naive, materialised attention for every variant, straight from its formula (model.py's docstring); the tests
compare model.attend (SDPA and the fused forms) against it, alone and inside the full model."""
import contextlib
import math

import torch

import model
from model import PA_ACTIVATIONS, causal_mask, gk_poly, parse_attn_type


def attend_reference(q, k, v, attn_type, mask=None):
    """q: (B, nh, Tq, d); k, v: (B, nh, Tk, d). mask: (Tq, Tk) bool, True where a query may look; by default
    causal with the queries the last Tq positions."""
    kind, arg = parse_attn_type(attn_type)
    Tq, Tk, d = q.size(-2), k.size(-2), q.size(-1)
    allowed = causal_mask(Tq, Tk, q.device) if mask is None else mask
    if kind == 'SM':
        w = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~allowed, float('-inf')), dim=-1)
    elif kind in ('GK', 'GKpoly'):
        s = -((q.unsqueeze(-2) - k.unsqueeze(-3)) ** 2).sum(-1) / (2 * math.sqrt(d))  # (B, nh, Tq, Tk)
        if kind == 'GK':
            w = torch.softmax(s.masked_fill(~allowed, float('-inf')), dim=-1)  # = exp(s) / sum exp(s)
        else:
            w = gk_poly(s, arg).masked_fill(~allowed, 0.0)
            w = w / (w.sum(-1, keepdim=True) + 1e-6)
    else:
        w = PA_ACTIVATIONS[arg](q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~allowed, 0.0)
        w = w / allowed.sum(-1, keepdim=True)
    return w @ v


def attend_fast(q, k, v, attn_type):
    """model.attend with the queries the last Tq of the Tk positions (the causal square when Tq == Tk)"""
    Tq, Tk = q.size(-2), k.size(-2)
    return model.attend(q, k, v, *parse_attn_type(attn_type), mask=None if Tq == Tk else causal_mask(Tq, Tk))


@contextlib.contextmanager
def reference_attention():
    """every attention layer of every model runs attend_reference instead of the fast path (dropout must be 0)"""
    fast = model.attend

    def naive(q, k, v, kind, arg=None, mask=None, dropout_p=0.0):
        assert dropout_p == 0.0
        name = kind if arg is None else f'{kind}-{arg}' if kind == 'GKpoly' else f'{kind}_{arg}'
        return attend_reference(q, k, v, name, mask)

    model.attend = naive
    try:
        yield
    finally:
        model.attend = fast
