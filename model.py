"""
One self-contained GPT-2 language model, nanoGPT style.

- learned positions, pre-LayerNorm blocks, tanh-GELU MLP (as GPT-2), tied embedding / LM head
- attention through scaled_dot_product_attention (flash where the device has it), plus the
  attention variants of `attn_type` below (naive references of each live in tests/reference.py)
- generate(): a static KV cache written in place, the prompt prefilled at once, then one token per step by a
  function that has the same shapes at every position, so it can be compiled once (CUDA graphs on GPUs; on CPUs
  exported and called without torch.compile's per-call guards)
- from_pretrained() for the OpenAI checkpoints or any local Hugging Face GPT-2 directory
- opt-in architecture of the speedrun era (GPTConfig; defaults are GPT-2, bit for bit; scored in docs/ARCHITECTURE.md):
  pos_emb='rope' (rotary q and k, no position table), norm='rmsnorm', qk_norm (q and k RMS-normalised per head),
  mlp_act='relu2' (squared ReLU), tie_embeddings=False (a separate LM head), logit_softcap=c (c * tanh(logits / c)),
  zero_init (every block's output projections start at zero, so each block starts as the identity)

Attention variants (`attn_type`), for query i and causal window j <= i, d = head size:
  SM          w_ij = softmax_j(q_i.k_j / sqrt(d))                          (standard, default)
  GK          w_ij = exp(-|q_i - k_j|^2 / (2 sqrt(d))) / sum_j' (same)     (Gaussian kernel)
              since |q-k|^2 = |q|^2 - 2q.k + |k|^2 and |q_i|^2 cancels in the normalisation,
              GK = softmax_j((q_i.k_j - |k_j|^2/2) / sqrt(d)): an ordinary SDPA call on
              q' = [q, 1], k' = [k, -|k|^2/2]. Exact, and never materialises T x T.
  GKpoly-n    GK with exp(s) replaced by p_n(s) = (1 + max(s, -n)/n)^n, s = -|q-k|^2/(2 sqrt(d)) <= 0.
              p_n is the classic (1 + s/n)^n limit of exp: 0 <= p_n <= 1 on the whole range, monotone,
              and it converges to exp uniformly on s <= 0 as n grows. The clamp at -n keeps it from
              turning back up for far-away keys (where exp is already < e^-n). Weights are normalised
              by their sum (+1e-6 so a query whose keys are all out of range gets zero, not NaN).
  PA_<act>    w_ij = act(q_i.k_j / sqrt(d)) / (i + 1)   for act in relu, gelu, sigmoid, silu, softplus.
              No softmax. Dividing by the number of attended positions keeps the output an average
              (its scale does not grow with position), which is what softmax's normalisation gave.
"""

import math
import operator
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

PA_ACTIVATIONS = {'relu': F.relu, 'gelu': F.gelu, 'sigmoid': torch.sigmoid, 'silu': F.silu, 'softplus': F.softplus}
ATTN_FORMS = "SM, GK, GKpoly-<n> (n a positive integer, e.g. GKpoly-8), PA_<act> (act one of " + ", ".join(PA_ACTIVATIONS) + ")"


def parse_attn_type(attn_type):
    """'GKpoly-8' -> ('GKpoly', 8); 'PA_relu' -> ('PA', 'relu'); bad forms raise one clear ValueError."""
    if attn_type in ('SM', 'GK'):
        return attn_type, None
    m = re.fullmatch(r'GKpoly-(\d+)', str(attn_type))
    if m and int(m.group(1)) > 0:
        return 'GKpoly', int(m.group(1))
    m = re.fullmatch(r'PA_(\w+)', str(attn_type))
    if m and m.group(1) in PA_ACTIVATIONS:
        return 'PA', m.group(1)
    raise ValueError(f"unknown attn_type {attn_type!r}; valid forms: {ATTN_FORMS}")


# GPT-2's settings of the architecture flags (GPTConfig): anything else is not a GPT-2 (export, from_pretrained)
GPT2_ARCH = dict(pos_emb='learned', norm='layernorm', qk_norm=False, mlp_act='gelu', tie_embeddings=True,
                 logit_softcap=0.0, zero_init=False)
ARCH_CHOICES = dict(pos_emb=('learned', 'rope'), norm=('layernorm', 'rmsnorm'), mlp_act=('gelu', 'relu2'))


def check_arch(**flags):
    """one clear ValueError for an architecture flag that has no meaning (flags: any of GPT2_ARCH's keys)"""
    for k, v in flags.items():
        if k in ARCH_CHOICES and v not in ARCH_CHOICES[k]:
            raise ValueError(f"unknown {k} {v!r}; use {' or '.join(map(repr, ARCH_CHOICES[k]))}")
        if k == 'logit_softcap' and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf):
            raise ValueError(f"logit_softcap must be a number >= 0 (0 = off), got {v!r}")
        if k in ('qk_norm', 'tie_embeddings', 'zero_init') and not isinstance(v, bool):
            raise ValueError(f"{k} must be True or False, got {v!r}")


def rope_tables(block_size, head_size, base=10000.0):
    """cos and sin of rotary positions, (block_size, head_size / 2) each: pair i turns by pos * base^(-2i / hs)"""
    freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angle = torch.outer(torch.arange(block_size, dtype=torch.float32), freq)
    return angle.cos(), angle.sin()


def rotate(x, cos, sin):
    """rotary embedding of x (B, nh, T, hs) at the positions of cos / sin (T, hs / 2): the two halves of each head
    are rotated as pairs, so q_i.k_j depends on i - j only. Every attn_type scores through q.k and |k| (rotations keep
    norms), so rope serves them all"""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def norm_layer(config, size=None):
    """GPT-2's LayerNorm, or RMSNorm (no mean subtraction, no bias: cheaper, and as good in recent models)"""
    if config.norm == 'rmsnorm':
        return nn.RMSNorm(size or config.n_embd, eps=1e-5)
    return nn.LayerNorm(size or config.n_embd, bias=config.bias)


def gk_poly(s, n):
    """degree-n polynomial stand-in for exp(s) on s <= 0 (see the module docstring)"""
    return (1 + s.clamp(min=-n) / n) ** n


def causal_mask(Tq, Tk, device=None):
    """(Tq, Tk) bool, True where query i (at absolute position Tk - Tq + i) may see key j"""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def attend(q, k, v, kind, arg=None, mask=None, dropout_p=0.0):
    """Fast attention. q: (B, nh, Tq, d); k, v: (B, nh, Tk, d); (kind, arg) from parse_attn_type.
    mask None: the causal square (Tq == Tk), which SDPA's flash kernels take as is_causal. Otherwise a
    (Tq, Tk) bool mask, True where a query may look (the KV cache's rows: keys up to each query's position)."""
    d = q.size(-1)
    if kind == 'SM':
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)
    if kind == 'GK':
        # one extra dimension turns the Gaussian kernel into softmax attention; CUDA's flash kernels want the
        # head size padded to a multiple of 8 (zeros change no dot product), the CPU kernel is faster without
        pad = (-(d + 1)) % 8 if q.is_cuda else 0
        qa = torch.cat([q, q.new_ones(*q.shape[:-1], 1), q.new_zeros(*q.shape[:-1], pad)], dim=-1)
        ka = torch.cat([k, -0.5 * k.pow(2).sum(-1, keepdim=True), k.new_zeros(*k.shape[:-1], pad)], dim=-1)
        va = F.pad(v, (0, pad + 1))
        y = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=mask is None, scale=1.0 / math.sqrt(d))
        return y[..., :d]
    # the polynomial and pointwise forms have no fused kernel: one matmul for the scores, one for the output
    qk = q @ k.transpose(-2, -1)
    allowed = causal_mask(q.size(-2), k.size(-2), q.device) if mask is None else mask
    if kind == 'GKpoly':
        s = (2 * qk - q.pow(2).sum(-1, keepdim=True) - k.pow(2).sum(-1).unsqueeze(-2)) / (2 * math.sqrt(d))
        w = gk_poly(s, arg).masked_fill(~allowed, 0.0)
        w = w / (w.sum(-1, keepdim=True) + 1e-6)
    else:  # PA
        w = PA_ACTIVATIONS[arg](qk / math.sqrt(d)).masked_fill(~allowed, 0.0)
        w = w / allowed.sum(-1, keepdim=True)
    w = F.dropout(w, p=dropout_p, training=dropout_p > 0)
    return w @ v


def fused_row(x):
    """True when x is a single row being compiled for a CPU (a decode step at batch 1): see project()"""
    return x.shape[:-1].numel() == 1 and x.device.type == 'cpu' and torch.compiler.is_compiling()


def project(layer, x):
    """layer(x) = x @ W.T (+ b). When compiling for a single row on a CPU (a decode step at batch 1), written as a
    product and a sum over W's rows instead: inductor fuses them into one reduction that streams W at memory speed on every core, where
    the BLAS matrix-vector product behind layer(x) reaches about a third of it (docs/BENCHMARKS.md). Eager, training
    and GPU code take layer(x) as it is, and so do quantised layers (quantize.py), which do the same themselves."""
    if type(layer) is nn.Linear and fused_row(x):
        y = (x.unsqueeze(-2) * layer.weight).sum(-1)
        return y if layer.bias is None else y + layer.bias
    return layer(x)


class KVCache(nn.Module):
    """Keys and values of every position so far, (B, n_head, block_size, head_size), allocated once and written in
    place at the positions being decoded: every decode step has the same shapes, so one compiled graph serves all."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        # zeros, not empty: a masked slot gets weight 0, and 0 * NaN from uninitialised memory would still be NaN
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v, span):
        """write k, v at positions pos; return the first span positions, those the caller attends over"""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k[:, :, :span], self.v[:, :, :span]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.kind, self.arg = parse_attn_type(config.attn_type)  # resolved once, not on every call
        self.cache = None  # a KVCache while generating (GPT.setup_caches)
        if config.qk_norm:  # bounded q.k: no attention logit can blow up, whatever the learning rate does to q and k
            self.q_norm = nn.RMSNorm(config.n_embd // config.n_head, eps=1e-5)
            self.k_norm = nn.RMSNorm(config.n_embd // config.n_head, eps=1e-5)

    def forward(self, x, pos=None, mask=None, rope=None):
        B, T, C = x.size()
        q, k, v = project(self.c_attn, x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if hasattr(self, 'q_norm'):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (cos, sin) at this call's positions; the cache then holds rotated keys
            q, k = rotate(q, *rope), rotate(k, *rope)
        if pos is not None:  # decoding: store this step's keys / values, attend over the whole cache under mask
            k, v = self.cache.update(pos, k, v, mask.size(-1))
        y = attend(q, k, v, self.kind, self.arg, mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(project(self.c_proj, y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's own GELU; the exact erf form drifts from its weights
        self.relu2 = config.mlp_act == 'relu2'  # squared ReLU (Primer; modded-nanogpt): sparse, and cheaper than GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = project(self.c_fc, x)
        h = F.relu(h).square() if self.relu2 else self.gelu(h)
        return self.dropout(project(self.c_proj, h))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x, pos=None, mask=None, rope=None):
        x = x + self.attn(self.ln_1(x), pos, mask, rope)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # logits are this wide; the embedding is padded to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    attn_type: str = 'SM'  # see the module docstring
    # the architecture flags (module docstring); GPT2_ARCH holds GPT-2's values, the defaults
    pos_emb: str = 'learned'  # 'learned' (a position table) or 'rope' (rotary q and k)
    norm: str = 'layernorm'  # or 'rmsnorm'
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    mlp_act: str = 'gelu'  # or 'relu2' (squared ReLU)
    tie_embeddings: bool = True  # False: the LM head has its own weights
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c)
    zero_init: bool = False  # the blocks' output projections (attention and MLP c_proj) start at zero

    def __post_init__(self):
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        parse_attn_type(self.attn_type)
        check_arch(**{k: getattr(self, k) for k in GPT2_ARCH})
        if self.pos_emb == 'rope' and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos_emb='rope' rotates pairs of each head's dimensions; the head size "
                             f"{self.n_embd // self.n_head} is odd (n_embd / n_head)")


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        padded_vocab = (config.vocab_size + 63) // 64 * 64
        learned = config.pos_emb == 'learned'
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab, config.n_embd),
            **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if learned else {}),  # GPT-2's order
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm_layer(config),
        ))
        if not learned:  # rope: fixed tables, not weights (not saved); float32 whatever the model's dtype
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, padded_vocab, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.activation_checkpointing = False  # True: keep only block inputs, recompute the rest in backward
        self.register_buffer('causal_mask', None, persistent=False)  # set with the KV caches (setup_caches)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith('c_proj.weight'):  # zero_init: each block starts as the identity (modded-nanogpt)
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init:
                    torch.nn.init.zeros_(p)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are subtracted by default (token ones are tied to the head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, pos=None, span=None):
        """idx (B, T) -> (logits, loss). With targets: logits for every position and the mean cross-entropy
        (targets of -1 are ignored). Without: only the last position's logits, loss None.
        pos: None for a causal pass over positions 0..T-1 (training, evaluation); while generating, a (T,) tensor
        of the absolute positions of idx, whose keys and values go into the KV cache (setup_caches), and span: how
        many cache positions to attend over (None: the whole cache)."""
        B, T = idx.size()
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"cannot forward {T} positions, block_size is only {self.config.block_size}")
            positions, mask = torch.arange(T, device=idx.device), None
        else:
            positions = pos
            # attend over the cache's first span positions (generate passes the filled ones, rounded up), not all of
            # it: a decode step at batch 1 reads those keys and values as well as every weight
            span = span or self.transformer.h[0].attn.cache.k.size(2)
            mask = self.causal_mask[pos, :span]  # (T, span): the keys each query may see, stale ones not
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos_emb == 'learned':
            x = x + self.transformer.wpe(positions)
        else:
            rope = self.rope_cos[positions], self.rope_sin[positions]
        x = self.transformer.drop(x)
        # activation checkpointing: keep one (B, T, C) input per block instead of all its intermediates, for ~1/3 more compute
        recompute = self.activation_checkpointing and pos is None and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:  # non-reentrant: the RNG is replayed, so dropout masks match the first pass
                x = torch.utils.checkpoint.checkpoint(block, x, None, None, rope, use_reentrant=False)
            else:
                x = block(x, pos, mask, rope)
        return self.head(x, targets)

    def head(self, x, targets=None):
        """final LayerNorm, LM head and loss; a method of its own so that FSDP runs can compile it (train.py)"""
        x = self.transformer.ln_f(x)
        V = self.config.vocab_size
        if targets is not None:
            logits = self.softcap(self.lm_head(x)[..., :V])  # a strided view, no copy: padded columns never scored
            loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.softcap(project(self.lm_head, x[:, -1:, :])[..., :V]), None

    def softcap(self, logits):
        """logit_softcap c > 0: c * tanh(logits / c), a smooth bound at +-c (Gemma 2; modded-nanogpt)"""
        c = self.config.logit_softcap
        return c * torch.tanh(logits / c) if c > 0 else logits

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. load GPT-2's 1024 and train at 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """Load 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' from the hub, or any local directory that
        transformers.GPT2LMHeadModel.from_pretrained reads. override_args: dropout and/or attn_type."""
        override_args = override_args or {}
        bad = set(override_args) - {'dropout', 'attn_type'}
        if bad:
            raise ValueError(f"from_pretrained can only override dropout and attn_type, not {sorted(bad)}")
        from transformers import AutoConfig, GPT2LMHeadModel  # imported here: only needed for this
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # no config warnings or progress bars: errors are ours to report
        hf_logging.disable_progress_bar()
        try:
            hc = AutoConfig.from_pretrained(name_or_path)
            if hc.model_type != 'gpt2':  # checked before the weights: GPT2LMHeadModel would load it as random ones
                raise ValueError(f"{name_or_path} is a '{hc.model_type}' model, not a GPT-2; this repo's GPT only "
                                 f"loads GPT-2 weights")
            hf, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        except OSError as e:
            raise OSError(f"could not load GPT-2 weights {name_or_path!r}: not a local model directory, and the "
                          f"hub is unreachable or the name is unknown ({str(e).splitlines()[0][:160]})") from None
        buffers = ('.attn.bias', '.attn.masked_bias')  # causal-mask buffers that older transformers saved
        problems = [f"missing {k}" for k in sorted(info['missing_keys'])]
        problems += [f"unexpected {k}" for k in sorted(info['unexpected_keys']) if not k.endswith(buffers)]
        problems += [f"mismatched {m[0] if isinstance(m, tuple) else m}" for m in info['mismatched_keys']]
        unsupported = {'scale_attn_weights=False': not getattr(hc, 'scale_attn_weights', True),
                       'scale_attn_by_inverse_layer_idx': getattr(hc, 'scale_attn_by_inverse_layer_idx', False),
                       'reorder_and_upcast_attn': getattr(hc, 'reorder_and_upcast_attn', False),
                       'add_cross_attention': getattr(hc, 'add_cross_attention', False),
                       'tie_word_embeddings=False': not getattr(hc, 'tie_word_embeddings', True),
                       f'layer_norm_epsilon={hc.layer_norm_epsilon}': hc.layer_norm_epsilon != 1e-5,
                       f'activation_function={hc.activation_function}':
                           hc.activation_function not in ('gelu_new', 'gelu_pytorch_tanh'),
                       f'n_inner={hc.n_inner}': hc.n_inner not in (None, 4 * hc.n_embd)}
        problems += [k for k, v in unsupported.items() if v]
        if problems:  # this GPT is exactly GPT-2: anything else would load or compute silently wrong
            raise ValueError(f"{name_or_path}: not a standard GPT-2 this model computes identically ("
                             f"{', '.join(problems[:3])}{', ...' if len(problems) > 3 else ''})")
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, bias=True, **override_args)
        model = cls(config)
        sd = model.state_dict()
        conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith(buffers)}
        if set(hf_sd) != set(sd):
            raise ValueError(f"{name_or_path}: its GPT-2 weights do not map onto this model "
                             f"({sorted(set(hf_sd) ^ set(sd))[:3]})")
        with torch.no_grad():
            for k, v in hf_sd.items():
                if k.endswith(conv1d):
                    v = v.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
                sd[k][:v.shape[0]].copy_(v)  # [:rows] leaves the vocab padding of wte / lm_head untouched
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None, muon_lr=None,
                             muon_momentum=0.95):
        """A list of optimizers. AdamW decays only matrices (Linear and embedding weights), never biases or LayerNorm
        gains. With muon_lr: Muon takes the 2-D weights inside the blocks (attention and MLP projections; it
        orthogonalises each update, which needs whole matrices) and AdamW keeps the embeddings, the head (tied to
        them), LayerNorms and biases. fused=None: fused AdamW where the device has it."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        is_hidden = lambda n, p: muon_lr and p.dim() == 2 and n.startswith('transformer.h.')
        hidden = [p for n, p in named if is_hidden(n, p)]
        rest = [p for n, p in named if not is_hidden(n, p)]
        groups = [{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}]
        # fused AdamW is one kernel for all params on cuda and cpu (and skips a step on device via found_inf)
        fused = device_type in ('cuda', 'cpu') if fused is None else fused
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)]
        if hidden:
            # decoupled decay of lr * weight_decay per step: scaled so a matrix shrinks as fast as under AdamW
            from muon import Muon
            optimizers.append(Muon(hidden, lr=muon_lr, momentum=muon_momentum,
                                   weight_decay=weight_decay * learning_rate / muon_lr))
        return optimizers

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s (PaLM appendix B count) over peak_flops; None if peak unknown."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        achieved = flops_per_token * T * fwdbwd_per_iter / dt
        return achieved / peak_flops if peak_flops else None

    def setup_caches(self, batch_size, dtype=None, length=None):
        """KV caches of batch_size x length positions (block_size by default) in every attention layer (dtype: the
        weights' by default), and the causal mask they are read through. generate() sizes them by cache_length().
        Kept until clear_caches(), so later calls reuse them (and any CUDA graph recorded on them); a call with the
        same shape and dtype is a no-op."""
        cfg, w = self.config, self.transformer.wte.weight  # the activations' dtype (the head may be int8)
        # one slot more than asked: generate's span never covers a whole cache, so the slice it attends is always a
        # strided view and one compiled graph serves every span (a whole-cache slice is contiguous: a second graph)
        shape = (batch_size, cfg.n_head, (length or cfg.block_size) + 1, cfg.n_embd // cfg.n_head)
        dtype = dtype or w.dtype
        first = self.transformer.h[0].attn.cache
        if first is not None and first.k.shape == shape and first.k.dtype == dtype and first.k.device == w.device:
            return
        for block in self.transformer.h:
            block.attn.cache = KVCache(shape, dtype, w.device)
        self.causal_mask = causal_mask(cfg.block_size + 1, cfg.block_size + 1, w.device)[:-1]  # as wide as a cache

    def cache_length(self, n):
        """The cache length for n positions: the smallest of block/8, block/4, block/2 and block that holds them (the
        whole block once the window slides). A step reads only the span it attends (generate), but the cache is
        allocated whole, so a short generation should not hold a full block; and every distinct length is a new
        compiled graph (a cache's shape is static to dynamo, whose recompile limit of 8 fails a fullgraph function
        outright), so lengths come from this fixed set: at most 4 decode and 4 prefill graphs per batch size,
        whatever the prompts and lengths asked for."""
        block = self.config.block_size
        return next(L for L in (-(-block // 8), -(-block // 4), -(-block // 2), block) if L >= min(n, block))

    def clear_caches(self):
        """free the KV caches (training never needs them)"""
        for block in self.transformer.h:
            block.attn.cache = None
        self.causal_mask = None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, compile=False,
                 stop_token=None, on_token=None):
        """Sample max_new_tokens after idx (B, T); temperature 0 is greedy. With the cache (default) the prompt is
        prefilled in one forward and then each token costs one position's work; compile=True runs the two steps
        compiled (see compiled_steps). When the context fills block_size it slides: the window restarts from the
        last block_size // 2 tokens (absolute positions change, so those are prefilled again). use_cache=False runs
        the same windows recomputing everything; it gives the same tokens. stop_token: stop once every row has
        produced it (checked every 16 tokens; the caller cuts each row there). on_token(ids (B, 1)) is called with
        every new token, for streaming. Returns (B, T + tokens generated)."""
        B, T0 = idx.shape
        block, V, device = self.config.block_size, self.config.vocab_size, idx.device
        out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=device)  # no per-token concatenation
        out[:, :T0] = idx
        room = block  # how many cache positions a step may attend over: the cache's length, less its spare slot
        if use_cache:
            autocast = torch.is_autocast_enabled(device.type)
            self.setup_caches(B, torch.get_autocast_dtype(device.type) if autocast else None,
                              self.cache_length(T0 + max_new_tokens))
            room = self.transformer.h[0].attn.cache.k.size(2) - 1
        prefill_fn, decode_fn = compiled_steps(device.type) if compile and use_cache else (prefill, decode_one)
        start, cached = max(0, T0 - block), 0  # first token of the window; how many of the window are in the cache
        grain = max(1, block // 16)  # attention reads the filled cache rounded up to this: <= 16 spans (CUDA graphs)
        draws = top_k if top_k is not None and top_k < V else V  # sample_logits' noise: one per candidate token
        if compile and use_cache and device.type == 'cpu':  # the decode step without dynamo's per-call checks
            decode_fn = exported_decode(self, B, draws, temperature, top_k, top_p)
        done = torch.zeros(B, 1, dtype=torch.bool, device=device)
        t = T0
        while t < T0 + max_new_tokens:
            if t - start > block:  # full: slide the window, rebuild the cache from the kept half
                start, cached = t - max(1, block // 2), 0
            noise = None if temperature == 0 else torch.empty(B, draws, device=device).exponential_()
            span = min(room, -(-(t - start) // grain) * grain)  # the cache positions filled so far, rounded up
            if not use_cache:
                logits, _ = self(out[:, start:t])
                nxt = sample_logits(logits[:, -1], noise, temperature, top_k, top_p)
            elif t - start - cached == 1:  # one new token: the decode step, one graph for every position and span
                # a contiguous copy: out's row stride (its total length) would be guarded on, one graph per length
                last = out[:, t - 1:t].clone(memory_format=torch.contiguous_format)
                nxt = decode_fn(self, last, torch.full((1,), t - 1 - start, device=device), span, noise, temperature,
                                top_k, top_p)
            else:  # the prompt, or a slid window: all its tokens in one forward
                nxt = prefill_fn(self, out[:, start + cached:t], torch.arange(cached, t - start, device=device), span,
                                 noise, temperature, top_k, top_p)
            cached = t - start
            out[:, t] = nxt[:, 0]  # copied out at once: a CUDA graph's output is overwritten by its next replay
            t += 1
            if on_token is not None:
                on_token(out[:, t - 1:t])
            if stop_token is not None:
                done |= nxt == stop_token
                if (t - T0) % 16 == 0 and done.all():  # the only host sync, every 16 tokens
                    break
        return out[:, :t]


def sample_logits(logits, noise, temperature, top_k=None, top_p=None):
    """(B, V) logits -> (B, 1) next ids. temperature 0: argmax. Otherwise a sample from softmax(logits / temperature),
    cut to the top_k tokens and / or the smallest set whose probability reaches top_p, drawn as argmax(p / noise)
    with noise ~ Exp(1) per candidate, (B, top_k) or (B, V) (the exponential race: exact, no host sync, no RNG inside
    a compiled graph, so the compiled and eager paths draw the same tokens from the same noise)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # <= 0 before dividing: no overflow to inf
    ids = None
    if top_k is not None and top_k < logits.size(-1):  # the rest works on top_k candidates, not the vocabulary
        logits, ids = torch.topk(logits, top_k)
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the set before this token already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    pick = (probs / noise).argmax(-1, keepdim=True)
    return pick if ids is None else ids.gather(-1, pick)


def prefill(model, idx, pos, span, noise, temperature, top_k, top_p):
    """several tokens at positions pos into the cache (the prompt, or a slid window); the next token after them"""
    logits, _ = model(idx, pos=pos, span=span)
    return sample_logits(logits[:, -1], noise, temperature, top_k, top_p)


def decode_one(model, idx, pos, span, noise, temperature, top_k, top_p):
    """one token (B, 1) at position pos (a 1-element tensor), attending over the cache's first span positions"""
    logits, _ = model(idx, pos=pos, span=span)
    return sample_logits(logits[:, -1], noise, temperature, top_k, top_p)


_compiled = {}


def compiled_steps(device_type):
    """prefill compiled for any prompt length, decode_one compiled once for every position and span (the span is a
    dynamic size; with CUDA graphs on CUDA, one recorded per span: a decode step is dozens of small kernels, and
    replaying them as one graph removes their launch cost). On a CPU generate() takes its decode step from
    exported_decode instead (the same function, without dynamo's per-call guards).
    Two separate functions, so each keeps its own compiled code. The first call of each pays the compilation."""
    if device_type not in _compiled:
        how = dict(mode='reduce-overhead') if device_type == 'cuda' else {}
        _compiled[device_type] = (torch.compile(prefill, fullgraph=True, dynamic=True),
                                  torch.compile(decode_one, fullgraph=True, dynamic=True, **how))  # dynamic: any span
    return _compiled[device_type]


_decode_steps = {}  # the compiled decode steps (exported_decode), by model structure, shapes and sampling settings


class _DecodeStep(nn.Module):
    """decode_one with the sampling settings fixed, as the module torch.export takes"""

    def __init__(self, model, temperature, top_k, top_p):
        super().__init__()
        self.model, self.settings = model, (temperature, top_k, top_p)

    def forward(self, idx, pos, span, noise):
        return decode_one(self.model, idx, pos, span, noise, *self.settings)


def exported_decode(model, B, draws, temperature, top_k, top_p):
    """decode_one for this model's structure and these sampling settings, compiled by inductor from a torch.export
    graph whose inputs are the weights and caches themselves (the span a dynamic size), and called directly: a
    torch.compile'd function checks ~2,200 guards on every call (each weight's and cache's dtype, shape and strides,
    the modules' attributes), 0.6-0.9 ms per token at 124M on a 2-core CPU, a sixth of an int8 step
    (docs/BENCHMARKS.md). Compiled once per structure (module types, tensor names, shapes and dtypes, config) and
    settings, so new caches, a re-cast twin (train.py's samples) or new weights of the same shapes reuse it (a
    process that changes temperature, top_k or top_p compiles a step for each: dynamo's took them as symbols).
    Returns decode_fn(model, idx, pos, span, noise, *settings) -> next ids, as decode_one."""
    step = _DecodeStep(model, temperature, top_k, top_p)
    autocast = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None
    structure = (repr(model.config), model.training, tuple(type(m).__name__ for m in model.modules()),
                 tuple((n, t.dtype, t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]))
    key = (structure, B, draws, temperature, top_k, top_p, autocast)
    if key not in _decode_steps:
        cache = model.transformer.h[0].attn.cache.k
        # an example span, of a size no tensor has: an equal one would be taken for the same symbol by inductor
        # (a graph then wrong for every other span); the graph holds for the range export proves (checked below)
        sizes = {n for t in [*model.parameters(), *model.buffers(), model.causal_mask] for n in t.shape} | {B, draws}
        span = next((n for n in range(cache.size(2) - 1, 1, -1) if n not in sizes), None)
        if span is None:  # a cache of a few positions: nothing to gain
            return decode_one
        idx = torch.zeros(B, 1, dtype=torch.long, device=cache.device)
        pos = torch.zeros(1, dtype=torch.long, device=cache.device)
        noise = None if temperature == 0 else torch.ones(B, draws, device=cache.device)
        program = torch.export.export(step, (idx, pos, span, noise), strict=False,
                                      dynamic_shapes=(None, None, torch.export.Dim.DYNAMIC, None))
        # the graph takes the weights, caches and constant tensors first (input_specs names them), then ours
        names = [spec.target for spec in program.graph_signature.input_specs if spec.target is not None]
        sym = next(n.meta['val'] for n in program.graph.nodes if n.op == 'placeholder' and n.name == 'span')
        bounds = program.range_constraints[sym.node.expr]
        # inductor compiles for the graph's own example inputs, every weight's shape fixed and only the span a symbol
        # (given the real tensors it traces them afresh with every size a symbol: loops over unknown bounds); it finds
        # their fake mode through the outputs' 'example_value', where dynamo leaves it and export does not
        for out in program.graph_module.graph.output_node().args[0]:
            out.meta['example_value'] = out.meta['val']
        examples = [n.meta['val'] for n in program.graph_module.graph.find_nodes(op='placeholder')]
        # a pointwise input of more than 4 ops is computed once, not again inside every row of the weight reduction
        # it broadcasts into (a LayerNorm's output: 3,072 times in c_fc, 50,304 in the LM head): ~5-8% at 124M int8
        with torch._inductor.config.patch(realize_opcount_threshold=4):
            fn = torch._inductor.standalone_compile(program.graph_module, examples, dynamic_shapes='from_graph')
        _decode_steps[key] = fn, names, int(bounds.lower), int(bounds.upper)
    fn, names, lo, hi = _decode_steps[key]
    state = [operator.attrgetter(name)(step) for name in names]  # this model's own tensors, in place: no copies

    def decode_fn(model, idx, pos, span, noise, *settings):
        if not lo <= span <= hi:  # a span the graph was not proved for (a span of 1: block_size < 32) runs eagerly
            return decode_one(model, idx, pos, span, noise, *settings)
        return fn(*state, idx, pos, span, noise)[0]  # the graph's outputs come as a list
    return decode_fn
