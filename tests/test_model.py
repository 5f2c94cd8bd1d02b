"""GPT: Hugging Face parity, forward contract, KV-cache generation, sampling, and the small utilities."""
import math

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig

VOCAB = 100  # padded to 128 inside the model
ATTN_TYPES = ['SM', 'GK', 'GKpoly-4', 'PA_relu', 'PA_gelu']


def tiny_gpt(attn_type='SM', seed=0, block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, **kw):
    """A tiny GPT with O(1) attention scores and O(1) logits, so greedy decoding does not collapse at once."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, attn_type=attn_type, **kw))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_(0.0, 1.0 / math.sqrt(n_embd))
            block.attn.c_proj.weight.normal_(0.0, 1.0 / math.sqrt(n_embd))
            block.mlp.c_fc.weight.normal_(0.0, 1.0 / math.sqrt(n_embd))
            block.mlp.c_proj.weight.normal_(0.0, 1.0 / math.sqrt(4 * n_embd))
        model.transformer.wpe.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 0.3)  # tied: also the token embedding
    return model.eval()


# ---------------------------------------------------------------- from_pretrained

def _randomise(hf):
    """Make every HF weight matter (default init has LayerNorms at 1/0 and zero biases, hiding mapping bugs)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith('.weight') and ('ln_' in name):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith('wte.weight'):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)


@pytest.fixture(scope='module', params=[1000, 997], ids=['vocab1000', 'vocab997'])
def hf_dir(request, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=request.param,
                                    bos_token_id=0, eos_token_id=0))
    _randomise(hf)
    path = tmp_path_factory.mktemp(f'hf{request.param}')
    hf.save_pretrained(str(path))
    return str(path), request.param


def _hf_reference(path, idx):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = hf(idx, labels=idx)
    return out.logits, out.loss


def _shifted_targets(idx):
    return torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)  # HF shifts labels inside


def test_from_pretrained_matches_hf_logits_and_loss(hf_dir):
    path, vocab = hf_dir
    idx = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    hf_logits, hf_loss = _hf_reference(path, idx)
    assert hf_logits.abs().max() > 1.0  # the weights are not trivially small: the comparison below means something

    model = GPT.from_pretrained(path).eval()
    cfg = model.config
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (vocab, 64, 2, 4, 64)
    assert cfg.attn_type == 'SM' and cfg.dropout == 0.0 and cfg.bias is True
    assert model.transformer.wte.weight.shape[0] == 1024  # padded to a multiple of 64
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading

    with torch.no_grad():
        logits, loss = model(idx, _shifted_targets(idx))
        last, none = model(idx)
    assert logits.shape == hf_logits.shape == (2, 40, vocab)
    assert (logits - hf_logits).abs().max().item() < 1e-4
    assert abs(loss.item() - hf_loss.item()) < 1e-5
    assert none is None
    assert (last - hf_logits[:, -1:]).abs().max().item() < 1e-4


def test_from_pretrained_overrides(hf_dir):
    path, vocab = hf_dir
    idx = torch.randint(0, vocab, (1, 20), generator=torch.Generator().manual_seed(2))
    hf_logits, _ = _hf_reference(path, idx)

    dropped = GPT.from_pretrained(path, override_args={'dropout': 0.1})
    assert dropped.config.dropout == 0.1
    assert all(b.attn.dropout == 0.1 for b in dropped.transformer.h)
    assert dropped.transformer.drop.p == 0.1
    dropped.eval()  # dropout only acts in training: eval logits are still HF's
    with torch.no_grad():
        assert (dropped(idx, idx)[0] - hf_logits).abs().max().item() < 1e-4
    dropped.train()
    with torch.no_grad():
        assert (dropped(idx, idx)[0] - hf_logits).abs().max().item() > 1e-3

    gk = GPT.from_pretrained(path, override_args={'attn_type': 'GK', 'dropout': 0.0}).eval()
    assert gk.config.attn_type == 'GK'
    assert all(b.attn.kind == 'GK' for b in gk.transformer.h)
    with torch.no_grad():
        gk_logits = gk(idx, idx)[0]
    assert torch.isfinite(gk_logits).all()
    assert (gk_logits - hf_logits).abs().max().item() > 1e-3  # same weights, different attention


@pytest.mark.parametrize('override, match', [({'n_layer': 4}, 'n_layer'), ({'bias': False}, 'bias'),
                                             ({'attn_type': 'PA_tanh'}, 'valid forms'),
                                             ({'dropout': 1.5}, 'dropout')])
def test_from_pretrained_bad_override_raises(hf_dir, override, match):
    with pytest.raises(ValueError, match=match):
        GPT.from_pretrained(hf_dir[0], override_args=override)


@pytest.mark.parametrize('variant', [dict(tie_word_embeddings=False), dict(layer_norm_epsilon=1e-2),
                                     dict(activation_function='relu'), dict(n_inner=100)],
                         ids=['untied_head', 'ln_eps', 'relu', 'n_inner'])
def test_from_pretrained_nonstandard_gpt2_loads_exactly_or_is_refused(tmp_path, variant):
    """A local GPT-2 directory this model cannot represent must be refused with a ValueError, never loaded wrong."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=50,
                                    bos_token_id=0, eos_token_id=0, **variant)).eval()
    _randomise(hf)
    hf.save_pretrained(str(tmp_path))
    idx = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))
    try:
        model = GPT.from_pretrained(str(tmp_path)).eval()
    except ValueError:
        return
    with torch.no_grad():
        diff = (model(idx, idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, f"{variant} loaded silently wrong: logits differ from HF by {diff:.3g}"


def test_from_pretrained_missing_local_dir_raises_oserror(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(OSError) as e:
        GPT.from_pretrained(str(tmp_path / 'no_such_model'))
    assert '\n' not in str(e.value)


def test_from_pretrained_gpt2_offline_raises_one_line_oserror(tmp_path, monkeypatch):
    import time
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # huggingface_hub reads it at import: patch the constant too
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    t0 = time.time()
    try:
        model = GPT.from_pretrained('gpt2')
    except OSError as e:
        msg = str(e)
        assert '\n' not in msg and "'gpt2'" in msg, msg
        assert len(msg) < 400, msg
        assert time.time() - t0 < 30  # offline: no network retries
    else:  # this machine has GPT-2 in its HF cache; at least check the load
        assert model.config.n_layer == 12 and model.config.vocab_size == 50257
        pytest.skip("gpt2 is in the local Hugging Face cache: the offline failure cannot be exercised")


# ---------------------------------------------------------------- forward contract

def test_forward_contract_and_padded_vocab():
    model = tiny_gpt(block_size=16)
    assert model.transformer.wte.weight.shape == (128, 32)
    assert model.lm_head.weight.shape == (128, 32)
    with torch.no_grad():  # make the padded rows dominate: were they ever scored, the checks below would see it
        model.lm_head.weight[VOCAB:] = 50.0
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, VOCAB, (3, 16), generator=g)
    targets = torch.randint(0, VOCAB, (3, 16), generator=g)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        assert logits.shape == (3, 16, VOCAB)
        assert loss.dim() == 0 and loss.dtype == torch.float32
        torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)))
        assert loss.item() < 20  # a 128-wide softmax with 28 logits near 50 * |x| would give a huge loss

        masked = targets.clone()
        masked[:, ::2] = -1  # -1 targets are ignored
        _, loss_m = model(idx, masked)
        keep = masked != -1
        torch.testing.assert_close(loss_m, F.cross_entropy(logits[keep], targets[keep]))

        last, none = model(idx)
        assert none is None
        assert last.shape == (3, 1, VOCAB)
        torch.testing.assert_close(last, logits[:, -1:], atol=1e-5, rtol=1e-5)

        short, _ = model(idx[:, :5])
        assert short.shape == (3, 1, VOCAB)
        torch.testing.assert_close(short[:, 0], logits[:, 4], atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match='block_size'):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_padded_vocab_exact_multiple_not_padded():
    model = tiny_gpt(vocab_size=128)
    assert model.transformer.wte.weight.shape[0] == 128
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 1, 128)


def test_training_step_reduces_loss():
    model = tiny_gpt(block_size=16).train()
    idx = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(4))
    opt, = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    losses = []
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- generation and the KV cache

@pytest.mark.parametrize('attn_type', ATTN_TYPES)
@pytest.mark.parametrize('B', [1, 3])
def test_greedy_cache_equals_no_cache_across_slides(attn_type, B):
    model = tiny_gpt(attn_type, block_size=16)
    prompt = torch.randint(0, VOCAB, (B, 5), generator=torch.Generator().manual_seed(5))
    cached = model.generate(prompt, 40, temperature=0, use_cache=True)
    plain = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == plain.shape == (B, 45)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain), (cached, plain)
    assert int((cached < VOCAB).all()) == 1
    for row in cached[:, 5:].tolist():
        assert len(set(row)) >= 3, row  # decoding did not collapse to one token: a real test


@pytest.mark.parametrize('attn_type', ATTN_TYPES)
def test_greedy_cache_equals_no_cache_long_prompt(attn_type):
    """A prompt longer than block_size: the first window is its last block_size tokens."""
    model = tiny_gpt(attn_type, block_size=16)
    prompt = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(6))
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    plain = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    with torch.no_grad():  # the first new token comes from the last 16 prompt tokens
        assert torch.equal(cached[:, 23], model(prompt[:, -16:])[0][:, -1].argmax(-1))


@pytest.mark.parametrize('block_size', [1, 2, 3])
def test_generate_tiny_block_sizes(block_size):
    """Sliding with block_size // 2 must keep at least one token in the window."""
    model = tiny_gpt(block_size=block_size)
    prompt = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(7))
    cached = model.generate(prompt, 6, temperature=0, use_cache=True)
    plain = model.generate(prompt, 6, temperature=0, use_cache=False)
    assert cached.shape == (2, 7)
    assert torch.equal(cached, plain)


def _greedy_nanogpt(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def _greedy_documented_slide(model, idx, n):
    """generate()'s documented window: when it would exceed block_size, restart from the last block_size // 2."""
    block = model.config.block_size
    start = max(0, idx.size(1) - block)
    for _ in range(n):
        if idx.size(1) - start > block:
            start = idx.size(1) - block // 2
        logits, _ = model(idx[:, start:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize('attn_type', ['SM', 'GK', 'PA_relu'])
def test_greedy_matches_handwritten_loops(attn_type):
    model = tiny_gpt(attn_type, block_size=16)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    n = 16 - 5 + 1  # the last of these is predicted from exactly block_size tokens: no slide yet
    with torch.no_grad():
        expected = _greedy_nanogpt(model, prompt, n)
    assert torch.equal(model.generate(prompt, n, temperature=0, use_cache=False), expected)
    assert torch.equal(model.generate(prompt, n, temperature=0, use_cache=True), expected)
    with torch.no_grad():
        expected_long = _greedy_documented_slide(model, prompt, 40)
    assert torch.equal(expected_long[:, :5 + n], expected)
    assert torch.equal(model.generate(prompt, 40, temperature=0, use_cache=False), expected_long)
    assert torch.equal(model.generate(prompt, 40, temperature=0, use_cache=True), expected_long)


def test_generate_keeps_static_caches_until_cleared():
    model = tiny_gpt(block_size=16)
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
    out = model.generate(prompt, 30, temperature=0)
    cache = model.transformer.h[0].attn.cache
    assert cache.k.shape == (2, 2, 16 + 1, 16) and model.causal_mask.shape == (16, 16 + 1)  # a spare slot (setup_caches)
    ptr = cache.k.data_ptr()
    assert torch.equal(model.generate(prompt, 30, temperature=0), out)  # reused, and stale slots are masked out
    assert model.transformer.h[0].attn.cache.k.data_ptr() == ptr
    assert torch.equal(out, model.generate(prompt, 30, temperature=0, use_cache=False))
    model.generate(prompt[:1], 3, temperature=0)  # another batch size: new caches
    assert model.transformer.h[0].attn.cache.k.shape[0] == 1
    assert not any('cache' in k or 'causal_mask' in k for k in model.state_dict())  # never saved
    model.clear_caches()
    assert model.transformer.h[0].attn.cache is None and model.causal_mask is None
    assert not model.training


def test_decode_reads_only_the_filled_span_of_the_cache():
    """a decode step attends over the filled cache positions rounded up to block // 16, not the whole cache: slots
    past that are never read (NaN planted there would poison every token if they were), eager and compiled"""
    model = tiny_gpt(block_size=64)
    prompt = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(13))
    want = model.generate(prompt, 40, temperature=0, use_cache=False)
    for compile in (False, True):
        model.setup_caches(1, None, model.cache_length(43))  # 64 positions (+1); generate keeps caches of its shape
        for block in model.transformer.h:
            block.attn.cache.k[:, :, 48:] = float('nan')  # 43 positions, rounded up to a multiple of 4: 44 read
            block.attn.cache.v[:, :, 48:] = float('nan')
        assert torch.equal(model.generate(prompt, 40, temperature=0, compile=compile), want), compile

def test_top_p_keeps_the_smallest_set_reaching_p():
    """sample_logits with top_p: only tokens of the nucleus are ever drawn, and the draw follows their probabilities"""
    from model import sample_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = torch.cat([sample_logits(logits, torch.empty(1, 4).exponential_(), 1.0, None, 0.75) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    assert freq[2] == 0 and freq[3] == 0  # 0.5 + 0.3 reaches 0.75: the nucleus is the first two
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.03 and abs(freq[1].item() - 0.3 / 0.8) < 0.03
    torch.manual_seed(0)
    draws = torch.cat([sample_logits(logits, torch.empty(1, 4).exponential_(), 1.0, None, 1.0) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)  # top_p = 1: plain sampling
    tiny = sample_logits(torch.tensor([[1.0, 3.0, 2.0]]), torch.ones(1, 3), 1e-30, None, None)
    assert tiny.item() == 1  # a vanishing temperature is greedy, not NaN


def test_top_k_draws_follow_the_softmax_of_the_k_best():
    """top_k: the noise covers only the k candidates (B, k), ids map back to the vocabulary, the draw follows
    softmax(logits / temperature) renormalised over the k best, and top_p then cuts inside them"""
    from model import sample_logits
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    for temperature in (1.0, 0.5):
        torch.manual_seed(0)
        draws = torch.cat([sample_logits(logits, torch.empty(1, 2).exponential_(), temperature, 2, None)
                           for _ in range(4000)])
        freq = torch.bincount(draws.flatten(), minlength=5).float() / 4000
        p1 = 1 / (1 + math.exp(-1 / temperature))  # token 1 against token 2, a logit apart
        assert freq[[0, 3, 4]].sum() == 0 and abs(freq[1].item() - p1) < 0.03, (temperature, freq)
    torch.manual_seed(0)  # top_k 3, then top_p 0.7: p over {1, 2, 3} is .665 / .245 / .090, the nucleus is {1, 2}
    draws = torch.cat([sample_logits(logits, torch.empty(1, 3).exponential_(), 1.0, 3, 0.7) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / 4000
    assert freq[[0, 3, 4]].sum() == 0 and abs(freq[1].item() - 0.665 / 0.910) < 0.03, freq

def test_sampling_shape_range_and_top_k_one_is_greedy():
    model = tiny_gpt(block_size=16)
    with torch.no_grad():  # padded logits would win every draw if generate() ever sampled them
        model.lm_head.weight[VOCAB:] = 50.0
    prompt = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(10))
    torch.manual_seed(0)
    out = model.generate(prompt, 30, temperature=0.8, top_k=5)
    assert out.shape == (3, 34) and out.dtype == torch.long
    assert torch.equal(out[:, :4], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB

    # top_k really restricts: every sampled token is among the 5 most likely under the same window
    torch.manual_seed(1)
    out = model.generate(prompt, 10, temperature=1.5, top_k=5, use_cache=False)
    with torch.no_grad():
        for t in range(4, 14):
            top5 = model(out[:, :t])[0][:, -1].topk(5).indices
            assert (top5 == out[:, t:t + 1]).any(-1).all()

    torch.manual_seed(2)
    hot = model.generate(prompt, 30, temperature=1.0, top_k=None)
    assert int(hot.max()) < VOCAB
    assert len(set(hot[:, 4:].flatten().tolist())) > 10  # actually sampling, not argmax

    greedy = model.generate(prompt, 30, temperature=0)
    for temperature in (1.0, 0.5, 3.0):
        torch.manual_seed(3)
        assert torch.equal(model.generate(prompt, 30, temperature=temperature, top_k=1), greedy)


def test_sampling_same_seed_same_tokens_with_and_without_cache():
    model = tiny_gpt('GK', block_size=16)
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(11))
    torch.manual_seed(4)
    a = model.generate(prompt, 25, temperature=1.0, top_k=20, use_cache=True)
    torch.manual_seed(4)
    b = model.generate(prompt, 25, temperature=1.0, top_k=20, use_cache=False)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- utilities

def test_crop_block_size():
    model = tiny_gpt(block_size=32)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        before, _ = model(idx, idx)
    wpe = model.transformer.wpe.weight.detach().clone()
    model.crop_block_size(16)
    assert model.config.block_size == 16
    assert model.transformer.wpe.weight.shape == (16, 32)
    assert isinstance(model.transformer.wpe.weight, torch.nn.Parameter)
    assert torch.equal(model.transformer.wpe.weight, wpe[:16])
    assert any(p is model.transformer.wpe.weight for p in model.parameters())
    with torch.no_grad():
        after, _ = model(idx, idx)
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))
    out = model.generate(idx[:, :4], 30, temperature=0)  # caches are sized by the new block
    assert torch.equal(out, model.generate(idx[:, :4], 30, temperature=0, use_cache=False))
    # the cropped model trains: wpe gets a gradient
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wpe.weight.grad is not None and model.transformer.wpe.weight.grad.shape == (16, 32)


def test_get_num_params():
    C, L, T = 32, 2, 16
    model = tiny_gpt(block_size=T, n_layer=L, n_embd=C)
    per_block = 12 * C * C + 13 * C  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj (weights + biases)
    total = 128 * C + T * C + L * per_block + 2 * C  # wte (tied with lm_head, padded), wpe, blocks, ln_f
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - T * C
    assert model.get_num_params() == sum(p.numel() for p in model.parameters()) - T * C
    nobias = tiny_gpt(block_size=T, n_layer=L, n_embd=C, bias=False)
    assert nobias.get_num_params(non_embedding=False) == 128 * C + T * C + L * (12 * C * C + 2 * C) + C


def test_configure_optimizers_groups():
    model = tiny_gpt()
    opt, = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type='cpu')
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert decay['lr'] == no_decay['lr'] == 1e-3 and decay['betas'] == (0.9, 0.95)
    params = list(model.parameters())
    assert len(decay['params']) + len(no_decay['params']) == len(params)  # each param once (tied head counted once)
    assert {id(p) for p in decay['params']} == {id(p) for p in params if p.dim() == 2}
    assert {id(p) for p in no_decay['params']} == {id(p) for p in params if p.dim() < 2}
    decay_ids = {id(p) for p in decay['params']}
    for name, p in model.named_parameters():
        is_matrix = name.endswith('.weight') and 'ln_' not in name
        assert (id(p) in decay_ids) == is_matrix, name
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
    loss.backward()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_configure_optimizers_with_muon():
    """Muon takes exactly the 2-D weights inside the blocks; AdamW the embeddings / tied head, LayerNorms, biases"""
    model = tiny_gpt()
    adamw, muon = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', muon_lr=0.02, muon_momentum=0.9)
    from muon import Muon
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith('transformer.h.') and p.dim() == 2}
    assert len(hidden) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert {id(p) for g in muon.param_groups for p in g['params']} == hidden
    rest = [p for g in adamw.param_groups for p in g['params']]
    assert len(rest) + len(hidden) == len(list(model.parameters())) and not hidden & {id(p) for p in rest}
    g, = muon.param_groups
    assert g['lr'] == 0.02 and g['momentum'] == 0.9
    assert g['weight_decay'] * g['lr'] == pytest.approx(0.1 * 1e-3)  # the same shrink per step as AdamW's matrices


def test_estimate_mfu():
    model = tiny_gpt(block_size=16)
    assert model.estimate_mfu(4, 0.5, None) is None
    assert model.estimate_mfu(4, 0.5, 0) is None
    mfu = model.estimate_mfu(4, 0.5, 1e12)
    assert isinstance(mfu, float)
    N, L, H, Q, T = model.get_num_params(), 2, 2, 16, 16
    expected = (6 * N + 12 * L * H * Q * T) * T * 4 / 0.5 / 1e12
    assert mfu == pytest.approx(expected, rel=1e-12)
    assert model.estimate_mfu(8, 0.5, 1e12) == pytest.approx(2 * mfu)  # linear in work, inverse in time
    assert model.estimate_mfu(4, 1.0, 1e12) == pytest.approx(mfu / 2)


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize('kwargs, match', [
    (dict(n_embd=30, n_head=4), 'divisible'),
    (dict(n_embd=64, n_head=5), 'divisible'),
    (dict(n_layer=0), 'n_layer'),
    (dict(n_head=0), 'n_head'),
    (dict(n_embd=-32), 'n_embd'),
    (dict(block_size=0), 'block_size'),
    (dict(vocab_size=-1), 'vocab_size'),
    (dict(n_layer=2.5), 'n_layer'),
    (dict(block_size='16'), 'block_size'),
    (dict(dropout=1.0), 'dropout'),
    (dict(dropout=-0.1), 'dropout'),
    (dict(attn_type='XYZ'), 'valid forms'),
    (dict(attn_type='GKpoly-0'), 'valid forms'),
    (dict(attn_type='PA_tanh'), 'valid forms'),
])
def test_config_validation(kwargs, match):
    base = dict(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match=match) as e:
        GPTConfig(**{**base, **kwargs})
    assert '\n' not in str(e.value)


def test_config_valid_variants_build():
    for attn_type in ['SM', 'GK', 'GKpoly-1', 'GKpoly-16', 'PA_relu', 'PA_gelu', 'PA_sigmoid', 'PA_silu',
                      'PA_softplus']:
        model = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, attn_type=attn_type))
        with torch.no_grad():
            assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 1, VOCAB)
