"""Every speed lever computes the same numbers as the plain path: activation checkpointing, fused AdamW,
torch.compile (inductor on CPU), SDPA attention, and bf16 autocast (within bf16's precision)."""
import copy
import gc
import weakref

import pytest
import torch

from model import GPT, GPTConfig
from reference import reference_attention


def tiny(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=3, n_head=4, n_embd=32, dropout=dropout, bias=False))


def batch(seed, B=4, T=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (B, T), generator=g), torch.randint(0, 97, (B, T), generator=g)


def train(model, steps, forward=None, fused=False, autocast_dtype=None):
    """`steps` AdamW steps on fixed batches; returns the losses. The RNG is reseeded so dropout masks match."""
    opt, = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', fused=fused)
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
    fast.activation_checkpointing = True
    with reference_attention():
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


# ---------------------------------------------------------------- compiled sampling and evaluation (inductor, CPU)

def compile_counts(fn, reset=True):
    """run fn with dynamo's counters cleared (and its compiled code, unless reset=False):
    (result, graphs compiled, graph breaks)"""
    from torch._dynamo.utils import counters
    if reset:
        torch._dynamo.reset()
    counters.clear()
    result = fn()
    return result, counters['stats']['unique_graphs'], sum(counters['graph_break'].values())


@pytest.mark.parametrize('B', [1, 2])  # batch 1 on CPU takes model.project's fused multiply-reduce path
def test_compiled_generate_is_two_graphs_and_the_same_tokens(B):
    """200 tokens through a 32-token window (prefill, decode, slides): one decode graph for every position, one
    dynamic prefill graph, no graph break, and the same tokens as eager for the same seed"""
    model = tiny().eval()
    prompt = torch.randint(0, 97, (B, 5), generator=torch.Generator().manual_seed(0))

    def run(compile):
        torch.manual_seed(7)
        return model.generate(prompt, 200, temperature=0.9, top_k=40, top_p=0.95, compile=compile)

    eager = run(False)
    (compiled, graphs, breaks) = compile_counts(lambda: run(True))
    assert torch.equal(compiled, eager)
    assert graphs <= 2 and breaks == 0, (graphs, breaks)
    _, graphs, _ = compile_counts(lambda: run(True), reset=False)  # warm: nothing new to compile
    assert graphs == 0


def test_cpu_decode_step_runs_without_dynamo_and_is_compiled_once():
    """on a CPU the compiled decode step is inductor's code for a torch.export graph that takes the weights and caches
    as inputs, called with no dynamo guards per token: dynamo compiles only the prefill. One step per structure and
    sampling settings, reused by a twin with other tensors (train.py's samples) and by new caches; int8 weights and bf16
    weights under autocast take it too; a span of 1 (block_size < 32), which the graph is not proved for, runs eagerly"""
    import model as model_module
    from quantize import cast_weights, quantize
    model_module._decode_steps.clear()
    model = tiny().eval()
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))

    def run(m, compile, n=40, x=prompt):
        torch.manual_seed(3)
        return m.generate(x, n, temperature=0.8, top_k=20, compile=compile)

    eager = run(model, False)
    compiled, graphs, breaks = compile_counts(lambda: run(model, True))
    assert torch.equal(compiled, eager) and graphs == 1 and breaks == 0, (graphs, breaks)  # the prefill's graph
    assert len(model_module._decode_steps) == 1
    cache = weakref.ref(model.transformer.h[0].attn.cache.k)
    model.clear_caches()
    gc.collect()
    assert cache() is None  # the compiled step keeps no tensor of the model it was compiled on
    twin = copy.deepcopy(model)  # the same structure, other tensors, new caches
    twin.transformer.h[0].mlp.c_fc.weight.data.mul_(2)  # read in place, not baked in: the twin's tokens are its own
    assert torch.equal(run(twin, True), run(twin, False)) and not torch.equal(run(twin, False), eager)
    assert len(model_module._decode_steps) == 1
    q = quantize(copy.deepcopy(model), 'int8')
    assert torch.equal(run(q, True), run(q, False))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        b = cast_weights(copy.deepcopy(model), 'bfloat16')
        assert torch.equal(run(b, True, 8), run(b, False, 8))  # bf16 sums in another order part ways later
    assert len(model_module._decode_steps) == 3
    torch.manual_seed(0)
    small = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16, bias=False)).eval()
    assert torch.equal(run(small, True, 30, prompt[:, :1]), run(small, False, 30, prompt[:, :1]))


def test_compiled_hellaswag_bounded_compiles(monkeypatch):
    """examples of many lengths and a short last batch: at most two graphs (static, then dynamic), same scores"""
    import hellaswag

    class CharEncoder:  # HellaSwag's rendering without GPT-2's BPE: one token per character
        n_vocab = 97

        def encode(self, s):
            return [ord(c) % 97 for c in s]

    monkeypatch.setattr(hellaswag, '_enc', CharEncoder())
    g = torch.Generator().manual_seed(1)
    word = lambda n: ''.join(chr(97 + int(i)) for i in torch.randint(0, 26, (n,), generator=g))
    examples = [{'ctx': word(3 + 2 * i), 'endings': [word(1 + (i + j) % 5) for j in range(4)], 'label': i % 4}
                for i in range(11)]
    model = tiny().eval()
    eager = hellaswag.evaluate(model, 'cpu', examples, batch_size=2)
    compiled, graphs, breaks = compile_counts(lambda: hellaswag.evaluate(torch.compile(model), 'cpu', examples, 2))
    assert compiled == eager and eager['n'] == 11
    assert graphs <= 2 and breaks == 0, (graphs, breaks)


def test_batched_muon_matches_torch_muon():
    """muon.Muon (matrices of one shape orthogonalised as one batch, tall ones transposed in) makes the same updates
    as torch.optim.Muon (one matrix at a time) up to bfloat16 rounding in the Newton-Schulz iteration"""
    from muon import Muon
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128)] * 2
    ours = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.05, ns_dtype=torch.bfloat16)  # torch's rule, any CPU
    b = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.05, nesterov=True)
    start = [p.detach().clone() for p in ours]
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, ref, start):
        moved = (q - p0).abs().max()
        assert moved > 1e-2  # the updates are real
        # bfloat16 keeps ~3 digits, and the two order their matmuls differently: a percent or so of the movement
        assert (p - q).norm() < 0.02 * (q - p0).norm() and (p - q).abs().max() < 0.05 * moved, p.shape
    with pytest.raises(ValueError, match='2-D'):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_compiled_generate_bounded_graphs_over_many_lengths():
    """a long-lived process (a notebook, a chat whose history grows) asking for 14 different (prompt, n): the caches
    come in 4 lengths, so at most 4 decode + 4 prefill graphs, never dynamo's recompile limit (8, a hard failure
    under fullgraph), and every call gives eager's tokens"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=64, bias=False)).eval()
    pairs = [(1, 3), (2, 5), (3, 9), (5, 4), (7, 12), (4, 20), (9, 14), (11, 25), (6, 33), (20, 21), (13, 40),
             (30, 30), (2, 61), (40, 50)]  # totals 4..90: every cache length, and slides past the block
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (1, T), generator=g) for T, _ in pairs]

    def run_all():
        return [model.generate(p, n, temperature=0, compile=True) for p, (_, n) in zip(prompts, pairs)]

    compiled, graphs, breaks = compile_counts(run_all)  # raised FailOnRecompileLimitHit on the 9th length before
    assert graphs <= 8 and breaks == 0, (graphs, breaks)
    assert {model.cache_length(T + n) for T, n in pairs} == {8, 16, 32, 64}
    for c, p, (_, n) in zip(compiled, prompts, pairs):
        assert torch.equal(c, model.generate(p, n, temperature=0))
