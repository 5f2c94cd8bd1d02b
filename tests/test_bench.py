"""bench.py: every mode runs as its docstring says and prints a table whose checks hold (tiny sizes, CPU)."""
import json
import re

import pytest

from conftest import run_script
from test_hellaswag import EXAMPLES

TINY = ['--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=2',
        '--iters=2', '--warmup_iters=1']


def tables(stdout):
    """every markdown table in the output, as lists of {column: cell}"""
    out, cols = [], None
    for line in stdout.splitlines():
        if not line.startswith('|'):
            cols = None
            continue
        cells = [c.strip() for c in line.strip('|').split('|')]
        if cols is None:
            cols = cells
            out.append([])
        elif not set(line) <= set('|-'):
            out[-1].append(dict(zip(cols, cells)))
    return out


def number(cell):
    return float(cell.replace(',', '').rstrip('%'))


def test_train_rows_per_attention_and_activation_checkpointing():
    p = run_script('bench.py', *TINY, '--vocab_size=65', '--attn_type=SM,GK', '--activation_checkpointing=True')
    [rows] = tables(p.stdout)
    assert [r['attn_type'] for r in rows] == ['SM', 'GK']
    for r in rows:
        assert number(r['tokens/s']) > 0 and number(r['peak mem GB']) > 0 and r['MFU'] == 'n/a'  # no peak on CPU
        assert 3.0 < number(r['loss']) < 5.0  # ~ln(65) for random tokens
    assert 'activation checkpointing' in p.stdout


def test_sample_paths_give_the_same_tokens():
    """no cache and the static cache, at batch 1 and 2, with the slide past block_size, in float32 and int8: the same
    tokens within each format (compiled decoding is left out on CPU unless --compile=True; tests/test_fast_paths.py
    checks its tokens); the bound comes from the bytes each format reads"""
    p = run_script('bench.py', '--mode=sample', *TINY, '--vocab_size=65', '--max_new_tokens=40', '--short_tokens=10',
                   '--prompt_tokens=4', '--sample_batch=2', '--no_cache=True', '--quantize=none,int8')
    [rows] = tables(p.stdout)
    assert [(r['weights'], r['batch'], r['path']) for r in rows] == [
        (w, b, path) for w in ('float32', 'int8') for b in ('1', '2') for path in ('no cache', 'kv cache')]
    assert all(r['same tokens'] == 'True' and number(r['tokens/s']) > 0 and r['of bound'].endswith('%') for r in rows)
    assert all(len(r['tokens/s'].split('.')[1]) == 1 for r in rows)  # one format for every tokens/s
    mb = {w: float(m) for w, m in re.findall(r'(\w+) weights: ([\d.]+) MB read per decode step', p.stdout)}
    assert set(mb) == {'float32', 'int8'} and mb['int8'] < 0.4 * mb['float32'], mb
    assert 'best of 5, measured between the runs' in p.stdout
    # keys and values: 2 x 2 layers x batch x 32 wide x 4 bytes, at the timed steps' mean span (4 + (10 + 40) / 2)
    assert p.stdout.count('the KV cache 0.015, 0.030 MB more (by batch)') == 2, p.stdout
    assert all(number(r['bound tok/s']) > 0 for r in rows)


def test_data_pool_writes_the_same_bins(tiktoken_offline):
    p = run_script('bench.py', '--mode=data', '--data_chars=300000', '--num_proc=2', '--block_size=64', '--iters=2',
                   env={'HF_HUB_OFFLINE': '1'}, timeout=300)
    tokenise, loading = tables(p.stdout)
    assert [r['processes'] for r in tokenise] == ['1', '2']
    assert tokenise[0]['tokens'] == tokenise[1]['tokens'] and number(tokenise[0]['tokens']) > 50_000
    assert tokenise[1]['same bins'] == 'True'
    assert [r['memmap'] for r in loading] == ['opened once', 'reopened per batch']
    assert all(number(r['us/batch']) > 0 for r in loading)


def test_eval_batched_hellaswag_scores_equal_one_at_a_time(tiktoken_offline, tmp_path):
    with open(tmp_path / 'hellaswag_val.jsonl', 'w') as f:
        for ex in EXAMPLES:
            f.write(json.dumps(ex) + '\n')
    p = run_script('bench.py', '--mode=eval', *TINY, f'--hellaswag_dir={tmp_path}', '--hellaswag_limit=8')
    [rows] = tables(p.stdout)
    assert [(r['eval'], r['batch']) for r in rows] == [('val loss (SM)', '2'), ('hellaswag', '1'), ('hellaswag', '8')]
    assert rows[1]['result'] == rows[2]['result'] and '(n 8)' in rows[1]['result']
    assert 10.0 < number(rows[0]['result'].split()[1]) < 11.5  # ~ln(50257): a random model on random tokens


@pytest.mark.parametrize('flag, message', [
    ('--mode=nope', "unknown mode 'nope'; use train, sample, data, eval or finetune_memory"),
    ('--compile_mode=fast', "unknown compile_mode 'fast'; use default, reduce-overhead, max-autotune or "
                            "max-autotune-no-cudagraphs"),
    ('--text_file=/no/such.txt', "--text_file: /no/such.txt does not exist"),
    ('--iters=0', "iters must be a positive integer, got 0"),
    ('--max_new_tokens=-1', "max_new_tokens must be a positive integer, got -1"),
    ('--prompt_tokens=0', "prompt_tokens must be a positive integer, got 0"),
    ('--quantize=int3', "unknown quantize 'int3'; use none or int8, or several separated by commas"),
    ('--short_tokens=600', "short_tokens (600) must be below max_new_tokens (600): their difference is timed"),
])
def test_bad_flags_are_one_line(flag, message):
    p = run_script('bench.py', flag, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"error: {message}"]
