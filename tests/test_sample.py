"""sample.py as a user runs it: batch and streaming output, top-p, stopping at <|endoftext|>, and its bad inputs.
The checkpoints are made here (random tiny GPTs in this repo's format): no training needed."""

import pytest
import torch

from conftest import run_bad_inputs, run_script, text_corpus
from model import GPT, GPTConfig


def save(model, path, meta=None):
    path.mkdir(parents=True, exist_ok=True)
    torch.save({'model': model.state_dict(), 'model_args': vars(model.config), 'meta': meta}, path / 'ckpt.pt')
    return path


@pytest.fixture(scope='module')
def char_ckpt(tmp_path_factory):
    chars = sorted(set(text_corpus(20_000)))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # logits of order 1: varied samples, and a greedy path that is not one repeated token
        model.lm_head.weight.normal_(0.0, 0.2)
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    return save(model, tmp_path_factory.mktemp('char'), {'vocab_size': len(chars), 'itos': chars})


def samples(stdout):
    return stdout.split('---------------\n')[:-1]


def test_batch_and_stream_print_the_same_greedy_samples(char_ckpt):
    args = ['sample.py', f'--out_dir={char_ckpt}', '--start=The ', '--num_samples=2', '--max_new_tokens=50',
            '--temperature=0', '--device=cpu']
    batch = samples(run_script(*args).stdout)
    stream = samples(run_script(*args, '--stream=True').stdout)
    assert len(batch) == 2 and all(s.startswith('The ') and len(s) == 4 + 50 + 1 for s in batch)  # slides past 32
    assert stream == batch


def test_top_p_and_seeds(char_ckpt):
    args = ['sample.py', f'--out_dir={char_ckpt}', '--start=a', '--num_samples=3', '--max_new_tokens=30',
            '--temperature=1.0', '--top_k=None', '--device=cpu']
    a = run_script(*args, '--top_p=0.9').stdout
    assert a == run_script(*args, '--top_p=0.9').stdout  # the same seed, the same samples
    assert a != run_script(*args, '--top_p=0.9', '--seed=7').stdout
    greedy = run_script(*args[:-3], '--temperature=0', '--device=cpu').stdout
    assert run_script(*args, '--top_p=1e-9').stdout == greedy  # a tiny nucleus is the top token alone


def test_bpe_samples_stop_at_endoftext(tmp_path, tiktoken_offline):
    """a model that always predicts <|endoftext|> (50256): samples end there, unless stop_at_eot=False"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=1, n_embd=8, bias=True))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # the final features are all ones, whatever the input
        model.lm_head.weight[50256] = 10.0  # so 50256 wins every step by a wide margin
    ckpt = save(model, tmp_path / 'bpe')
    args = ['sample.py', f'--out_dir={ckpt}', '--start=Hello', '--num_samples=2', '--max_new_tokens=20', '--device=cpu']
    assert samples(run_script(*args).stdout) == ['Hello\n', 'Hello\n']
    assert samples(run_script(*args, '--stream=True').stdout) == ['Hello\n', 'Hello\n']
    full = samples(run_script(*args, '--stop_at_eot=False').stdout)
    assert full == ['Hello' + '<|endoftext|>' * 20 + '\n'] * 2


def test_sample_bad_inputs(char_ckpt, tmp_path):
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
    (tmp_path / 'long.txt').write_text('a' * 40)
    base = ['sample.py', f'--out_dir={char_ckpt}', '--device=cpu']
    run_bad_inputs([
        (base + ['--top_p=0'], "top_p must be in (0, 1]"),
        (base + ['--top_p=1.5'], "top_p must be in (0, 1]"),
        (base + ['--temperature=-1'], "temperature must be >= 0"),
        (base + ['--top_k=0'], "top_k must be a positive integer"),
        (base + ['--max_new_tokens=-1'], "must be positive"),
        (base + ['--num_samples=None'], "cannot be None"),
        (base + [f'--start=FILE:{tmp_path}'], "is a directory"),
        (base + [f'--start=FILE:{tmp_path / "latin1.txt"}'], "is not UTF-8 text (byte 3"),
        (base + [f'--start=FILE:{tmp_path / "long.txt"}'], "the prompt is 40 tokens but the model sees at most 32"),
        (base + ['--dtype=float16'], "float16 is for GPUs"),
        (base + ['--stream=maybe'], "wants a bool"),
        (base + ['--quantize=int3'], "unknown quantize 'int3'; use none or int8"),
    ], protect=[char_ckpt, tmp_path])
