"""export.py: our checkpoint -> a Hugging Face GPT-2 directory that transformers loads and that computes the same."""
import json
import os
import shutil
from dataclasses import asdict

import torch

from conftest import TIKTOKEN_CACHE, run_bad_inputs, run_script

from model import GPT, GPTConfig
from runtime import save_atomic


def make_checkpoint(out_dir, meta=None, **kw):
    """a small random GPT of ours saved the way train.py saves it; returns the model"""
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32), **kw})
    model = GPT(cfg)
    with torch.no_grad():  # random biases and LayerNorm gains, so a wrong mapping of any of them shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(out_dir, exist_ok=True)
    save_atomic({'model': model.state_dict(), 'model_args': asdict(cfg), 'iter_num': 7, 'best_val_loss': 9.9,
                 'config': {}, 'meta': meta}, os.path.join(out_dir, 'ckpt.pt'))
    return model.eval()


def export(out_dir, *extra, tiktoken_cache=None, check=True):
    env = {'TIKTOKEN_CACHE_DIR': tiktoken_cache} if tiktoken_cache else {}
    return run_script('export.py', f'--out_dir={out_dir}', *extra, env=env, check=check)


def our_logits(model, x):
    with torch.no_grad():
        return model(x, torch.zeros_like(x))[0]


def check_same_logits(model, hf_dir, vocab_size, block_size):
    """HF GPT-2 loaded from the export, and our GPT loaded back from it, compute what the original does"""
    from transformers import GPT2LMHeadModel
    x = torch.randint(vocab_size, (3, block_size))
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf_logits = hf(x).logits
    assert (hf_logits - our_logits(model, x)).abs().max().item() < 1e-4
    back = GPT.from_pretrained(hf_dir).eval()
    assert (our_logits(back, x) - our_logits(model, x)).abs().max().item() < 1e-4


def test_export_bpe_model_with_tokenizer(tmp_path, tiktoken_offline):
    import tiktoken
    from transformers import AutoTokenizer
    from conftest import text_corpus
    model = make_checkpoint(str(tmp_path), bias=True)
    p = export(str(tmp_path), tiktoken_cache=TIKTOKEN_CACHE)
    hf_dir = str(tmp_path / 'hf')
    files = set(os.listdir(hf_dir))
    assert {'config.json', 'model.safetensors', 'vocab.json', 'merges.txt', 'tokenizer.json'} <= files, files
    assert not [f for f in os.listdir(tmp_path) if '.tmp.' in f or '.old.' in f]
    assert 'load with' in p.stdout
    cfg = json.load(open(os.path.join(hf_dir, 'config.json')))
    assert (cfg['n_positions'], cfg['vocab_size'], cfg['n_layer'], cfg['n_head'], cfg['n_embd']) == (32, 50257, 2, 2, 32)
    assert cfg['activation_function'] == 'gelu_new'
    check_same_logits(model, hf_dir, 50257, 32)

    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.model_max_length == 32 and tok.eos_token_id == 50256
    # the rebuilt merges encode like r50k_base itself: prose, whitespace runs, digits, non-ASCII text
    text = text_corpus(20_000) + "  h\u00e9llo w\u00f6rld \u65e5\u672c\u8a9e \U0001f642 \n\n\t  x   12345678 it's I'LL  \r\n \u00bd \u2211 "
    assert tok.encode(text) == tiktoken.get_encoding('r50k_base').encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_bias_false_export_then_a_char_export_replaces_it(tmp_path):
    """bias=False exports exactly (zero biases); with no tokenizer available it says how to add one. A second export
    to the same directory replaces that earlier export whole; with a file of the user's in it, it is refused"""
    model = make_checkpoint(str(tmp_path / 'run'), bias=False)
    empty = tmp_path / 'empty_cache'  # tiktoken finds nothing here (and cannot download in a test)
    empty.mkdir()
    hf_dir = tmp_path / 'exported'
    p = export(str(tmp_path / 'run'), f'--export_dir={hf_dir}', tiktoken_cache=str(empty))
    assert 'no tokenizer written' in p.stdout and "from_pretrained('gpt2')" in p.stdout
    assert not (hf_dir / 'tokenizer.json').exists()
    check_same_logits(model, str(hf_dir), 50257, 32)
    manifest = json.load(open(hf_dir / 'export_manifest.json'))
    assert set(manifest['files']) == set(os.listdir(hf_dir)) - {'export_manifest.json'}

    itos = [chr(i) for i in range(32, 97)]
    char = make_checkpoint(str(tmp_path / 'char'), meta={'vocab_size': 65, 'itos': itos}, vocab_size=65, bias=False,
                           n_layer=1)
    p = export(str(tmp_path / 'char'), f'--export_dir={hf_dir}')
    assert 'no tokenizer for a char vocab' in p.stdout
    assert not [f for f in os.listdir(tmp_path) if '.tmp.' in f or '.old.' in f]
    assert json.load(open(hf_dir / 'char_vocab.json'))['itos'] == itos
    assert json.load(open(hf_dir / 'config.json'))['vocab_size'] == 65
    check_same_logits(char, str(hf_dir), 65, 32)

    # the same export with a file of the user's added, or one of its files edited, is no longer just an export
    extra, edited = tmp_path / 'extra', tmp_path / 'edited'
    shutil.copytree(hf_dir, extra)
    (extra / 'notes.txt').write_text('mine')
    shutil.copytree(hf_dir, edited)
    (edited / 'config.json').write_text((edited / 'config.json').read_text() + ' ')
    run_bad_inputs([(['export.py', f'--out_dir={tmp_path / "char"}', f'--export_dir={extra}'],
                     'notes.txt, which export.py did not write'),
                    (['export.py', f'--out_dir={tmp_path / "char"}', f'--export_dir={edited}'],
                     'config.json changed since it was exported')], protect=[tmp_path])


def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path):
    run, gk = str(tmp_path / 'run'), str(tmp_path / 'gk')
    make_checkpoint(run, n_layer=1)
    make_checkpoint(gk, attn_type='GK', n_layer=1)
    user = tmp_path / 'u'  # a directory of the user's that happens to hold a config.json
    user.mkdir()
    (user / 'config.json').write_text('{}')
    (user / 'precious.txt').write_text('keep')
    (tmp_path / 'file.txt').write_text('a file')
    cases = [
        ([f'--export_dir={user}'], f"--export_dir={user} exists and is not an earlier export"),
        ([f'--export_dir={tmp_path / "file.txt" / "hf"}'], 'cannot be created or written'),
        (['--export_dir='], '--export_dir is empty'),
        ([f'--out_dir={gk}'], "attn_type 'GK' cannot be exported"),
    ]
    run_bad_inputs([(['export.py', f'--out_dir={run}', *args], message) for args, message in cases],
                   protect=[tmp_path])
    assert (user / 'precious.txt').read_bytes() == b'keep'
    assert not [f for f in os.listdir(tmp_path) if f not in ('run', 'gk', 'u', 'file.txt')]
    assert os.listdir(tmp_path / 'run') == ['ckpt.pt']
