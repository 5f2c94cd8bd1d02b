"""
One self-contained GPT-2 language model, nanoGPT style.

- learned positions, pre-LayerNorm blocks, tanh-GELU MLP (as GPT-2), tied embedding / LM head
- attention through scaled_dot_product_attention (flash where the device has it), plus the
  attention variants of `attn_type` below, each with a naive reference kept for the tests
- generate() with a preallocated KV cache
- from_pretrained() for the OpenAI checkpoints or any local Hugging Face GPT-2 directory

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


def gk_poly(s, n):
    """degree-n polynomial stand-in for exp(s) on s <= 0 (see the module docstring)"""
    return (1 + s.clamp(min=-n) / n) ** n


def causal_mask(Tq, Tk, device):
    """(Tq, Tk) bool, True where query i (at absolute position Tk - Tq + i) may see key j"""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def attend(q, k, v, attn_type, dropout_p=0.0):
    """Fast attention. q: (B, nh, Tq, d); k, v: (B, nh, Tk, d), Tk >= Tq; queries are the last Tq positions."""
    kind, arg = parse_attn_type(attn_type)
    Tq, Tk, d = q.size(-2), k.size(-2), q.size(-1)
    # SDPA's is_causal aligns the mask top-left, so it is only right when Tq == Tk; one query sees everything
    mask = None if Tq == 1 or Tq == Tk else causal_mask(Tq, Tk, q.device)
    is_causal = Tq == Tk and Tq > 1
    if kind == 'SM':
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    if kind == 'GK':
        # one extra dimension turns the Gaussian kernel into softmax attention; CUDA's flash kernels want the
        # head size padded to a multiple of 8 (zeros change no dot product), the CPU kernel is faster without
        pad = (-(d + 1)) % 8 if q.is_cuda else 0
        qa = torch.cat([q, q.new_ones(*q.shape[:-1], 1), q.new_zeros(*q.shape[:-1], pad)], dim=-1)
        ka = torch.cat([k, -0.5 * k.pow(2).sum(-1, keepdim=True), k.new_zeros(*k.shape[:-1], pad)], dim=-1)
        va = F.pad(v, (0, pad + 1))
        y = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=is_causal, scale=1.0 / math.sqrt(d))
        return y[..., :d]
    # the polynomial and pointwise forms have no fused kernel: one matmul for the scores, one for the output
    qk = q @ k.transpose(-2, -1)
    allowed = causal_mask(Tq, Tk, q.device)
    if kind == 'GKpoly':
        s = (2 * qk - q.pow(2).sum(-1, keepdim=True) - k.pow(2).sum(-1).unsqueeze(-2)) / (2 * math.sqrt(d))
        w = gk_poly(s, arg).masked_fill(~allowed, 0.0)
        w = w / (w.sum(-1, keepdim=True) + 1e-6)
    else:  # PA
        w = PA_ACTIVATIONS[arg](qk / math.sqrt(d)).masked_fill(~allowed, 0.0)
        w = w / allowed.sum(-1, keepdim=True)
    w = F.dropout(w, p=dropout_p, training=dropout_p > 0)
    return w @ v


def attend_reference(q, k, v, attn_type):
    """Naive, materialised version of every variant straight from its formula; the tests compare attend() to it."""
    kind, arg = parse_attn_type(attn_type)
    Tq, Tk, d = q.size(-2), k.size(-2), q.size(-1)
    allowed = causal_mask(Tq, Tk, q.device)
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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.attn_type = config.attn_type
        self.reference = False  # tests flip this to run attend_reference instead of the fast path

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # write this step's keys/values into the preallocated buffers, attend to all so far
            k_buf, v_buf, pos = cache
            k_buf[:B, :, pos:pos + T] = k
            v_buf[:B, :, pos:pos + T] = v
            k, v = k_buf[:B, :, :pos + T], v_buf[:B, :, :pos + T]
        if self.reference:
            y = attend_reference(q, k, v, self.attn_type)
        else:
            y = attend(q, k, v, self.attn_type, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's own GELU; the exact erf form drifts from its weights
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
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

    def __post_init__(self):
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        parse_attn_type(self.attn_type)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        padded_vocab = (config.vocab_size + 63) // 64 * 64
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, padded_vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.activation_checkpointing = False  # True: keep only block inputs, recompute the rest in backward
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, caches=None, pos=0):
        """idx (B, T) -> (logits, loss). With targets: logits for every position and the mean cross-entropy
        (targets of -1 are ignored). Without: only the last position's logits, loss None.
        caches/pos: KV-cache buffers from new_caches() and the absolute position of idx[:, 0]."""
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"cannot forward {pos + T} positions, block_size is only {self.config.block_size}")
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device))
        x = self.transformer.drop(x)
        # activation checkpointing: keep one (B, T, C) input per block instead of all its intermediates, for ~1/3 more compute
        recompute = self.activation_checkpointing and caches is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:  # non-reentrant: the RNG is replayed, so dropout masks match the first pass
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if caches is None else (*caches[i], pos))
        x = self.transformer.ln_f(x)
        V = self.config.vocab_size
        if targets is not None:
            logits = self.lm_head(x)[..., :V]  # a strided view, no copy: the padded columns are never scored
            loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :])[..., :V], None

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. load GPT-2's 1024 and train at 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """Load 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' from the hub, or any local directory that
        transformers.GPT2LMHeadModel.from_pretrained reads. override_args: dropout and/or attn_type."""
        override_args = override_args or {}
        bad = set(override_args) - {'dropout', 'attn_type'}
        if bad:
            raise ValueError(f"from_pretrained can only override dropout and attn_type, not {sorted(bad)}")
        from transformers import GPT2LMHeadModel  # imported here: only needed for this
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # no config warnings or progress bars: errors are ours to report
        hf_logging.disable_progress_bar()
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load GPT-2 weights {name_or_path!r}: not a local model directory, and the "
                          f"hub is unreachable or the name is unknown ({str(e).splitlines()[0][:160]})") from None
        hc = hf.config
        unsupported = {'scale_attn_by_inverse_layer_idx': getattr(hc, 'scale_attn_by_inverse_layer_idx', False),
                       'reorder_and_upcast_attn': getattr(hc, 'reorder_and_upcast_attn', False),
                       'tie_word_embeddings': not getattr(hc, 'tie_word_embeddings', True),
                       'layer_norm_epsilon': hc.layer_norm_epsilon != 1e-5,
                       'activation_function': hc.activation_function not in ('gelu_new', 'gelu_pytorch_tanh'),
                       'n_inner': hc.n_inner not in (None, 4 * hc.n_embd)}
        if any(unsupported.values()):  # this GPT is exactly GPT-2: anything else would load silently wrong
            raise ValueError(f"{name_or_path}: not a standard GPT-2 (unsupported config: "
                             f"{', '.join(k for k, v in unsupported.items() if v)})")
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, bias=True, **override_args)
        model = cls(config)
        sd = model.state_dict()
        conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        with torch.no_grad():
            for k, v in hf.state_dict().items():
                if k.endswith('.attn.bias') or k.endswith('.attn.masked_bias'):
                    continue  # causal-mask buffers of older transformers versions
                if k not in sd:
                    raise ValueError(f"{name_or_path}: unexpected weight {k}")
                if k.endswith(conv1d):
                    v = v.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
                sd[k][:v.shape[0]].copy_(v)  # [:rows] leaves the vocab padding of wte / lm_head untouched
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None):
        """AdamW; decay only matrices (Linear and embedding weights), never biases or LayerNorm gains.
        fused=None: fused where the device has it."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        # fused AdamW is one kernel for all params on cuda and cpu (and skips a step on device via found_inf)
        fused = device_type in ('cuda', 'cpu') if fused is None else fused
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s (PaLM appendix B count) over peak_flops; None if peak unknown."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        achieved = flops_per_token * T * fwdbwd_per_iter / dt
        return achieved / peak_flops if peak_flops else None

    def new_caches(self, batch_size, device=None, dtype=None):
        """Preallocated (k, v) buffers, (B, n_head, block_size, head_size) per layer, for generate()."""
        cfg, w = self.config, self.lm_head.weight
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        return [(torch.empty(shape, device=device or w.device, dtype=dtype or w.dtype),
                 torch.empty(shape, device=device or w.device, dtype=dtype or w.dtype)) for _ in range(cfg.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, caches=None):
        """Sample max_new_tokens after idx (B, T). With the KV cache each new token costs one position's work.
        When the context fills block_size, it slides: the window restarts from the last block_size // 2
        tokens (absolute positions change, so the cache is rebuilt from them). use_cache=False runs the same
        windows without a cache, recomputing everything each token; both give the same tokens.
        temperature 0 means greedy (argmax)."""
        block = self.config.block_size
        start = max(0, idx.size(1) - block)  # first token of the current window
        pos = 0  # tokens of the window already in the cache
        if use_cache and caches is None:
            caches = self.new_caches(idx.size(0), dtype=torch.get_autocast_dtype(idx.device.type)
                                     if torch.is_autocast_enabled(idx.device.type) else None)
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block:  # full: slide the window, the cache must be rebuilt
                start, pos = idx.size(1) - max(1, block // 2), 0
            if use_cache:
                logits, _ = self(idx[:, start + pos:], caches=caches, pos=pos)
                pos = idx.size(1) - start
            else:
                logits, _ = self(idx[:, start:])
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
