"""The architecture flags (GPTConfig: pos_emb, norm, qk_norm, mlp_act, tie_embeddings, logit_softcap, zero_init):
GPT-2 unchanged by default, each flag computing what it says, the KV cache exact with all of them, and train.py /
export.py keeping them (checkpoints, resume) or refusing them (contradictions) in one line."""
import math
import os

import pytest
import torch
from torch.nn import functional as F

from conftest import run_bad_inputs, run_script, write_char_dataset
from model import GPT, GPT2_ARCH, GPTConfig, attend, parse_attn_type, rope_tables, rotate

VOCAB = 65
ALL = dict(pos_emb='rope', norm='rmsnorm', qk_norm=True, mlp_act='relu2', tie_embeddings=False, logit_softcap=5.0)
FLAGS = [dict(pos_emb='rope'), dict(norm='rmsnorm'), dict(qk_norm=True), dict(mlp_act='relu2'),
         dict(tie_embeddings=False), dict(logit_softcap=5.0), dict(zero_init=True), ALL]


def tiny(seed=0, block_size=16, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, **kw))


def batch(T=16, B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model):
    """every weight O(1) and different, so that no flag hides behind an init of ones, zeros or tiny values"""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.1 * noise if n.endswith('bias') else 1 + 0.2 * noise if p.dim() == 1 else
                    noise / math.sqrt(p.shape[-1]))
    return model.eval()


def test_defaults_are_gpt2_bit_for_bit():
    x = batch()
    a, b = tiny(), tiny(**GPT2_ARCH)
    assert list(a.state_dict()) == list(b.state_dict()) and 'transformer.wpe.weight' in a.state_dict()
    assert a.transformer.wte.weight is a.lm_head.weight
    assert all(isinstance(m, torch.nn.LayerNorm) for n, m in a.named_modules() if n.endswith(('ln_1', 'ln_2', 'ln_f')))
    la, lb = a(x, x)[1], b(x, x)[1]
    assert torch.equal(la, lb)
    # GPT-2's forward written out: learned positions, LayerNorm, tanh-GELU, tied head, no cap
    m = perturb(tiny())
    with torch.no_grad():
        h = m.transformer.wte(x) + m.transformer.wpe.weight[:16]
        for blk in m.transformer.h:
            q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(32, dim=2)
            q, k, v = (t.view(2, 16, 2, 16).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 32)
            h = h + blk.attn.c_proj(y)
            h = h + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(h)), approximate='tanh'))
        ref = F.linear(m.transformer.ln_f(h), m.transformer.wte.weight)[..., :VOCAB]
        torch.testing.assert_close(m(x, x)[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('attn_type', ['SM', 'GK', 'GKpoly-4', 'PA_relu'])
def test_rope_is_relative_for_every_attn_type(attn_type):
    """the same q, k, v at positions shifted by 37 attend identically: rope encodes only i - j"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 16, generator=g, dtype=torch.float64) for _ in range(3))
    cos, sin = (t.double() for t in rope_tables(64, 16))
    kind, arg = parse_attn_type(attn_type)
    out = [attend(rotate(q, cos[s:s + 12], sin[s:s + 12]), rotate(k, cos[s:s + 12], sin[s:s + 12]), v, kind, arg)
           for s in (0, 37)]
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-4)  # the tables are float32 angles
    plain = attend(q, k, v, kind, arg)
    assert (out[0] - plain).abs().max() > 1e-2  # and it does change the attention
    scores = rotate(q, cos[:12], sin[:12]) @ rotate(k, cos[:12], sin[:12]).transpose(-2, -1)
    torch.testing.assert_close(scores.diagonal(dim1=-2, dim2=-1), (q * k).sum(-1), atol=1e-6, rtol=1e-5)  # i = j: no turn


def test_each_flag_computes_what_it_says():
    x = batch()
    m = perturb(tiny(pos_emb='rope'))
    assert 'transformer.wpe.weight' not in m.state_dict() and 'rope_cos' not in m.state_dict()
    assert m.get_num_params() == m.get_num_params(non_embedding=False)  # no position table to subtract

    m = perturb(tiny(norm='rmsnorm'))
    h = torch.randn(2, 16, 32)
    ln = m.transformer.h[0].ln_1
    torch.testing.assert_close(ln(h), h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * ln.weight)

    # qk_norm: q and k are normalised per head, so scaling their projections changes nothing
    base, normed = perturb(tiny()), perturb(tiny(qk_norm=True))
    before = (base(x, x)[1], normed(x, x)[1])
    with torch.no_grad():
        for m in (base, normed):
            for blk in m.transformer.h:
                blk.attn.c_attn.weight[:64] *= 7.0  # the q and k rows
                blk.attn.c_attn.bias[:64] *= 7.0
    assert torch.allclose(normed(x, x)[1], before[1], atol=1e-5) and not torch.allclose(base(x, x)[1], before[0])

    m = perturb(tiny(mlp_act='relu2'))
    mlp, h = m.transformer.h[0].mlp, torch.randn(2, 16, 32)
    torch.testing.assert_close(mlp(h), mlp.c_proj(F.relu(mlp.c_fc(h)) ** 2))

    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.get_num_params() == tied.get_num_params() + 128 * 32  # the head's own (padded) rows

    capped, plain = perturb(tiny(logit_softcap=5.0)), perturb(tiny())
    with torch.no_grad():
        for m in (capped, plain):
            m.lm_head.weight.mul_(50)  # raw logits in the hundreds
        raw = plain(x, x)[0]
        assert raw.abs().max() > 50 and capped(x, x)[0].abs().max() <= 5.0
        torch.testing.assert_close(capped(x, x)[0], 5.0 * torch.tanh(raw / 5.0))

    m = tiny(zero_init=True)
    assert all(p.abs().max() == 0 for n, p in m.named_parameters() if n.endswith('c_proj.weight'))
    h = torch.randn(2, 16, 32)
    assert torch.equal(m.transformer.h[0](h), h)  # each block starts as the identity
    _, loss = m(x, x)
    loss.backward()
    assert all(p.grad.abs().max() > 0 for n, p in m.named_parameters() if n.endswith('c_proj.weight'))  # and learns


@pytest.mark.parametrize('flags', FLAGS, ids=lambda f: ','.join(f'{k}={v}' for k, v in f.items()))
def test_kv_cache_decode_equals_full_forward(flags):
    m = perturb(tiny(block_size=16, **flags))
    x = batch(T=16)
    with torch.no_grad():
        full = m(x, x)[0]
        m.setup_caches(2)
        steps = [m(x[:, :5], pos=torch.arange(5))[0]]  # the prompt, then one token at a time
        steps += [m(x[:, t:t + 1], pos=torch.tensor([t]))[0] for t in range(5, 16)]
        m.clear_caches()
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)
    # and generate's sliding window (16 tokens, slid twice): cached and recomputed sampling draw the same tokens
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        runs.append(m.generate(x[:, :5], 30, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1]) and len(set(runs[0][0, 5:].tolist())) >= 5


def test_bad_values_are_refused():
    for kw, match in [(dict(pos_emb='alibi'), "unknown pos_emb 'alibi'"), (dict(norm='batchnorm'), 'unknown norm'),
                      (dict(mlp_act='swiglu'), 'unknown mlp_act'), (dict(logit_softcap=-1.0), 'logit_softcap'),
                      (dict(qk_norm=1), 'qk_norm must be True or False'),
                      (dict(pos_emb='rope', n_head=32, n_embd=96), 'head size 3 is odd')]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**{**dict(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB), **kw})


# ---------------------------------------------------------------- train.py and export.py, as a user runs them

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=2',
        '--gradient_accumulation_steps=1', '--log_interval=1', '--warmup_iters=2', '--compile=False', '--device=cpu',
        '--eval_interval=4', '--max_iters=2']  # a bad case that is not refused ends at once
ALL_FLAGS = ['--pos_emb=rope', '--norm=rmsnorm', '--qk_norm=True', '--mlp_act=relu2', '--tie_embeddings=False',
             '--logit_softcap=15.0', '--zero_init=True']


def test_checkpoint_round_trip_resume_and_refusals(tmp_path):
    data = write_char_dataset(str(tmp_path / 'char'))
    train = lambda out, *f: run_script('train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, *ALL_FLAGS, *f)
    straight = train(tmp_path / 'a', '--max_iters=8', '--optimizer=muon')
    train(tmp_path / 'b', '--max_iters=4', '--optimizer=muon')
    run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "b"}', '--max_iters=8')
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in 'ab')
    for k, v in dict(pos_emb='rope', norm='rmsnorm', qk_norm=True, mlp_act='relu2', tie_embeddings=False,
                     logit_softcap=15.0, zero_init=True).items():
        assert a['model_args'][k] == v and a['config'][k] == v, k
    assert not torch.equal(a['model']['lm_head.weight'], a['model']['transformer.wte.weight'])  # both saved
    assert b['iter_num'] == 8 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])  # exact resume
    assert 'step 8:' in straight.stdout
    run = str(tmp_path / 'a')
    run_bad_inputs([
        (['train.py', f'--data_dir={data}', '--out_dir=' + str(tmp_path / 'new'), '--pos_emb=alibi'], "unknown pos_emb"),
        (['train.py', f'--data_dir={data}', '--out_dir=' + str(tmp_path / 'new'), '--mlp_act=swiglu'], "unknown mlp_act"),
        (['train.py', f'--data_dir={data}', '--out_dir=' + str(tmp_path / 'new'), '--logit_softcap=-2.0'],
         "logit_softcap must be a number >= 0"),
        (['train.py', f'--data_dir={data}', '--out_dir=' + str(tmp_path / 'new'), *TINY, '--n_head=32',
          '--pos_emb=rope'], "head size 1 is odd"),
        (['train.py', '--init_from=resume', f'--out_dir={run}', '--pos_emb=learned', '--max_iters=12'],
         "--pos_emb=learned on the command line conflicts with the checkpoint's pos_emb='rope'"),
        (['train.py', '--init_from=finetune', f'--finetune_from={run}', '--out_dir=' + str(tmp_path / 'ft'),
          f'--data_dir={data}', '--tie_embeddings=True'], "--tie_embeddings=True on the command line conflicts with the checkpoint's"),
        (['train.py', '--init_from=gpt2', '--out_dir=' + str(tmp_path / 'g'), f'--data_dir={data}', '--qk_norm=True'],
         "--qk_norm=True on the command line conflicts with gpt2's qk_norm=False"),
        (['export.py', f'--out_dir={run}'], "cannot be exported: this is not GPT-2's architecture"),
    ], protect=[run])
    assert not any(os.path.exists(tmp_path / d) for d in ('new', 'ft', 'g'))
