"""Every speed lever computes the same numbers as the plain path: activation checkpointing, fused AdamW,
torch.compile (inductor on CPU), SDPA attention, and bf16 autocast (within bf16's precision)."""
import copy

import pytest
import torch

from model import GPT, GPTConfig


def tiny(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=3, n_head=4, n_embd=32, dropout=dropout, bias=False))


def batch(seed, B=4, T=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (B, T), generator=g), torch.randint(0, 97, (B, T), generator=g)


def train(model, steps, forward=None, fused=False, autocast_dtype=None):
    """`steps` AdamW steps on fixed batches; returns the losses. The RNG is reseeded so dropout masks match."""
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', fused=fused)
    forward = model if forward is None else forward
    losses = []
    torch.manual_seed(123)
    for i in range(steps):
        x, y = batch(i % 2)  # two batches, seen again and again: the loss must fall
        with torch.autocast('cpu', dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_activation_checkpointing_gives_identical_loss_and_grads(dropout):
    model = tiny(dropout)
    x, y = batch(0)
    out = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks; checkpointing replays them in the recomputation
        _, loss = model(x, y)
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert out[0][0] == out[1][0]
    for name, g in out[0][1].items():
        assert torch.equal(g, out[1][1][name]), name


def test_activation_checkpointing_is_off_for_inference_and_cache():
    model = tiny()
    model.activation_checkpointing = True
    idx = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        want = model.generate(idx, 8, temperature=0, use_cache=False)
        assert torch.equal(model.generate(idx, 8, temperature=0), want)


def test_fused_adamw_matches_plain_adamw():
    a, b = tiny(), tiny()
    la, lb = train(a, 5, fused=True), train(b, 5, fused=False)
    assert la == pytest.approx(lb, rel=1e-5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    assert la[-1] < la[0] - 0.05  # and it trains


def test_all_levers_together_match_the_reference_path():
    """fast: SDPA attention, fused AdamW, torch.compile, activation checkpointing.
    reference: naive attention, plain AdamW, eager, no checkpointing. Same losses, same weights.
    (No dropout here: compiled code draws its masks from its own generator, so they differ by design.)"""
    ref, fast = tiny(), tiny()
    for block in ref.transformer.h:
        block.attn.reference = True
    fast.activation_checkpointing = True
    l_ref = train(ref, 4, fused=False)
    l_fast = train(fast, 4, forward=torch.compile(fast), fused=True)
    assert l_fast == pytest.approx(l_ref, rel=1e-4)
    for (n, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


def test_bf16_autocast_stays_close_to_float32():
    a = tiny()
    b = copy.deepcopy(a)
    l32, l16 = train(a, 5, fused=True), train(b, 5, fused=True, autocast_dtype=torch.bfloat16)
    assert l16 == pytest.approx(l32, rel=2e-2)  # bf16 keeps ~3 significant digits
    assert l16[-1] < l16[0] - 0.05
