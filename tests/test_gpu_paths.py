"""The GPU paths' choices, checked on a CPU: a non-finite step skipped on the device (no host sync) with Muon too,
the evals and samples of a compiled run through bounded compiled graphs, and FSDP's float16 loss scaling."""
import copy

import pytest
import torch

from model import GPT, GPTConfig
from runtime import grad_scaler, step_optimizers


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32), **kw}))


def state_of(model, optimizers):
    return [t.detach().clone() for t in model.parameters()] + [
        v.clone() for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_muon_and_adamw_skip_non_finite_steps_without_a_host_sync(monkeypatch, dtype):
    """fused AdamW + Muon: a step whose loss or gradients are not finite leaves weights, moments, momentum and step
    counts exactly as they were, a finite one moves them as a plain step() does, and neither reads a tensor on the host
    (float16: through the GradScaler, which hands Muon its found_inf as it does fused AdamW)"""
    model = tiny()
    make = lambda m: m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', muon_lr=0.02, muon_momentum=0.95)
    optimizers, scaler = make(model), grad_scaler('cpu', dtype)
    assert optimizers[0].defaults['fused'] and type(optimizers[1]).__name__ == 'Muon'
    x = torch.randint(0, 65, (2, 32))
    ref = copy.deepcopy(model)
    ref_opts = make(ref)

    def host_sync(*a):
        raise AssertionError("a host sync in the optimizer step")

    def step(m, opts, poison, plain=False):
        loss = m(x, x)[1]
        scaler.scale(loss).backward() if not plain else loss.backward()
        if poison:
            [p for p in m.transformer.h[0].parameters() if p.dim() == 2][0].grad.view(-1)[0] = float('nan')
        if plain:
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return
        for opt in opts:
            scaler.unscale_(opt)
        finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(m.parameters(), float('inf'))) & torch.isfinite(loss)
        with monkeypatch.context() as mp:
            for name in ('item', '__bool__', 'tolist', '__float__', '__int__'):
                mp.setattr(torch.Tensor, name, host_sync)
            step_optimizers(opts, scaler, finite)

    step(model, optimizers, poison=False)
    step(ref, ref_opts, poison=False, plain=True)
    before = state_of(model, optimizers)
    step(model, optimizers, poison=True)  # skipped: nothing moves
    after = state_of(model, optimizers)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    step(model, optimizers, poison=False)
    step(ref, ref_opts, poison=False, plain=True)
    for p, q in zip(model.parameters(), ref.parameters()):  # the skipped step left no trace
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not hasattr(optimizers[1], 'found_inf')
    if dtype == 'float16':  # the overflow backed the loss scale off once
        assert scaler.get_scale() == 2.0 ** 15
