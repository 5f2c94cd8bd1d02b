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


FSDP_FLOAT16 = r'''
import os, sys, warnings
sys.path.insert(0, os.getcwd())
import torch, torch.distributed as dist
from model import GPT, GPTConfig
from runtime import fsdp_shard, grad_scaler, step_optimizers, unscale
warnings.simplefilter('error')  # any warning fails the run
dist.init_process_group('gloo')
losses, norms = [], []
for sharded in (False, True):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
    if sharded:
        fsdp_shard(model, 'cpu', 'float32', 1)  # as train.py shards (float16 weights need a GPU)
    optimizers = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    scaler = grad_scaler('cpu', 'float16', sharded=sharded)
    x = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))
    for step in range(4):
        loss = model(x, x)[1]
        scaler.scale(loss).backward()
        if step == 1:  # an overflow in one shard
            g = model.transformer.h[1].mlp.c_fc.weight.grad
            (g.to_local() if sharded else g).view(-1)[0] = float('inf')
        unscale(scaler, optimizers)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        norm = norm.full_tensor() if sharded else norm
        step_optimizers(optimizers, scaler, torch.isfinite(norm) & torch.isfinite(loss.detach()))
        losses.append(loss.item())
    norms.append(scaler.get_scale())
print('LOSSES', (losses[:4], losses[4:]))
print('SCALES', norms)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


def test_fsdp_float16_loss_scaling_is_silent_and_skips_overflows():
    """FSDP in float16 (V100s): the sharded GradScaler with DTensor gradients and fused AdamW warns about nothing
    (every warning an error), skips the step with an overflow in one shard and backs the scale off, and trains as the
    unsharded model with a plain GradScaler does"""
    import socket
    from conftest import run_script
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    p = run_script('-c', FSDP_FLOAT16, env=dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                                                 MASTER_PORT=str(port)))
    lines = {l.split()[0]: eval(l.split(' ', 1)[1]) for l in p.stdout.splitlines() if l[:6] in ('LOSSES', 'SCALES')}
    plain, sharded = lines['LOSSES']
    assert plain[1] == plain[2] and sharded[1] == sharded[2]  # the overflow step moved nothing
    assert plain[3] < plain[2] - 0.01  # the others learn
    assert sharded == pytest.approx(plain, abs=1e-5) and lines['SCALES'] == [2.0 ** 15] * 2


def eager_compile(monkeypatch):
    """torch.compile with dynamo's own decisions (graphs, guards, static or dynamic shapes) but no code generation:
    what is compiled, and how often, is the same as with inductor, in a fraction of the time"""
    real = torch.compile

    def compile(fn=None, **kw):
        return real(fn, **{**kw, 'backend': 'eager', 'mode': None})

    monkeypatch.setattr(torch, 'compile', compile)
    torch._dynamo.reset()


def test_compiled_training_keeps_static_shapes_after_evals_hellaswag_and_samples(monkeypatch):
    """a compiled run's step 0: evals (a short last batch too), HellaSwag (lengths vary) and samples run before the
    first training step. The training step still compiles static (another batch size would compile anew), HellaSwag and
    the samples take graphs of their own, and a second round of all of them compiles nothing"""
    import hellaswag
    import model as model_module
    import runtime
    from torch._dynamo.utils import counters
    eager_compile(monkeypatch)
    monkeypatch.setattr(model_module, '_compiled', {}, raising=False)  # generate's compiled steps, fresh

    class CharEncoder:  # HellaSwag's rendering without GPT-2's BPE: one token per character
        n_vocab = 65

        def encode(self, s):
            return [ord(c) % 65 for c in s]

    monkeypatch.setattr(hellaswag, '_enc', CharEncoder())
    examples = [{'ctx': 'ab' * (2 + i), 'endings': ['c' * (1 + (i + j) % 5) for j in range(4)], 'label': i % 4}
                for i in range(9)]
    raw = tiny()
    compiled, scorer = runtime.compile_static(raw), runtime.compile_scoring(raw)
    graphs = lambda: counters['stats']['unique_graphs']
    x = lambda b: torch.randint(0, 65, (b, 32), generator=torch.Generator().manual_seed(b))

    def extras():
        raw.eval()
        with torch.no_grad():
            for b in (4, 3):  # eval batches, the last one short (eval_full)
                compiled(x(b), x(b))
        scores = hellaswag.evaluate(scorer, 'cpu', examples, batch_size=2)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            samples = raw.generate(x(2)[:, :5], 8, temperature=1.0, top_k=50, compile=True)
        raw.clear_caches()  # as train.py does after its samples
        raw.train()
        return scores, samples

    counters.clear()
    first = extras()
    before_training = graphs()
    for _ in range(2):
        compiled(x(4), x(4))[1].backward()
    assert graphs() == before_training + 1  # the training step: one graph
    compiled(x(2), x(2))[1].backward()
    assert graphs() == before_training + 2  # static: another batch size is another graph
    again = extras()
    assert graphs() == before_training + 2, "the second round of evals, HellaSwag and samples compiled again"
    assert first[0] == again[0] and first[0] == hellaswag.evaluate(raw, 'cpu', examples, batch_size=2)
    assert torch.equal(first[1], again[1])
    torch._dynamo.reset()


FSDP_COMPILED = r'''
import os, sys
sys.path.insert(0, os.getcwd())
import torch, torch.distributed as dist
from torch._dynamo.utils import counters
real = torch.compile
torch.compile = lambda fn=None, **kw: real(fn, **{**kw, 'backend': 'eager', 'mode': None})  # dynamo's decisions only
from model import GPT, GPTConfig
from runtime import fsdp_shard
dist.init_process_group('gloo')
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
fsdp_shard(model, 'cpu', 'float32', 1, compile_mode='default')
x = lambda b: torch.randint(0, 65, (b, 32), generator=torch.Generator().manual_seed(b))
model.eval()
with torch.no_grad():
    for b in (4, 3):  # step 0's evals, the last batch short
        model(x(b), x(b))
with torch.compiler.set_stance('force_eager'):  # train.py's samples and HellaSwag under FSDP
    model.generate(x(2)[:, :5], 8, temperature=1.0, top_k=50)
model.clear_caches()
model.train()
seen = [counters['stats']['unique_graphs']]
for b in (4, 4, 2):
    model(x(b), x(b))[1].backward()
    seen.append(counters['stats']['unique_graphs'])
print('GRAPHS', seen)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


def test_fsdp_compiled_blocks_keep_the_training_step_static():
    """FSDP compiles per block: step 0's evals (two batch sizes) go through the blocks' graphs and the samples run eager
    (no graph), so the training step still compiles static: its first step compiles, the second nothing, another
    batch size anew"""
    import socket
    from conftest import run_script
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    p = run_script('-c', FSDP_COMPILED, env=dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                                                  MASTER_PORT=str(port)))
    seen = eval(p.stdout.split('GRAPHS', 1)[1].strip().splitlines()[0])
    assert seen[1] > seen[0] and seen[2] == seen[1] and seen[3] > seen[2], seen
