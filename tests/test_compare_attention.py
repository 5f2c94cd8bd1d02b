"""compare_attention.py end to end on a tiny model, and the train_11 / PA / EVAL configs, as a user runs them."""
import hashlib
import json
import math
import os

import pytest
import torch

from conftest import run_bad_inputs, run_script, write_char_dataset

TINY = ['--max_iters=32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
        '--eval_iters=2', '--eval_interval=8', '--log_interval=4']
VARIANTS = ['SM', 'GK', 'GKpoly-8', 'PA_relu']
DEGREES = [2, 4, 8, 16, 32, 64]


@pytest.fixture(scope='module')
def char_data(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('char')))


def tables(md):
    """the markdown tables of md, each as {first cell: [other cells]} of its rows (header and rule left out)"""
    out = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| attn_type |'):
            out.append({})
        elif line.startswith('|') and not line.startswith('|---'):
            out[-1][cells[0]] = cells[1:]
    return out


def number(cell):
    return float(cell.split()[0].replace(',', ''))  # '3.94 (iter 32)' -> 3.94, '11,556' -> 11556


def snapshot(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), 'rb').read()).hexdigest() for f in os.listdir(folder)}


def test_compare_attention_end_to_end(char_data, tmp_path):
    doc = tmp_path / 'docs' / 'ATTENTION.md'
    args = ['compare_attention.py', f'--data_dir={char_data}', f'--out_prefix={tmp_path}/out-attn-', f'--doc={doc}',
            *TINY]
    p = run_script(*args)
    md = doc.read_text()
    rows, poly = tables(md)
    assert list(rows) == VARIANTS and list(poly) == [f'GKpoly-{n}' for n in DEGREES]
    for t in VARIANTS:
        assert len(rows[t]) == 6 and all(math.isfinite(number(c)) for c in rows[t]), rows[t]
        assert os.path.isfile(tmp_path / f'out-attn-{t}' / 'ckpt.pt')
    assert 'val loss @ 8 | val loss @ 16 | val loss @ 32' in md
    errs = {n: [number(c) for c in poly[f'GKpoly-{n}']] for n in DEGREES}
    assert all(math.isfinite(x) for e in errs.values() for x in e)
    mean_err = [errs[n][1] for n in DEGREES]
    assert all(a > b for a, b in zip(mean_err, mean_err[1:])), mean_err  # p_n -> exp as n grows
    assert errs[64][0] < errs[2][0] and mean_err[-1] < mean_err[0] / 10
    # swapping GKpoly-64 into the GK model barely moves its val loss, which matches the run's own evaluation
    gk_log = [json.loads(l) for l in open(tmp_path / 'out-attn-GK' / 'log.jsonl')]
    gk_val = min(r['val_loss'] for r in gk_log if r['val_loss'] is not None)
    assert abs(errs[64][2] - gk_val) < 1e-3
    assert f'GK itself: {gk_val:.4f}' in md
    assert 'CPUs, torch ' + torch.__version__ in md and 'compare_attention.py --data_dir=' in md
    assert 'wrote' in p.stdout and '| GKpoly-64 |' in p.stdout  # the tables are printed too
    assert not [f for f in os.listdir(doc.parent) if '.tmp' in f]

    # again: every run is complete, so nothing is trained and the report is the same
    q = run_script(*args)
    assert q.stdout.count('complete run found, reusing it') == 4 and 'training ' not in q.stdout
    assert tables(doc.read_text()) == [rows, poly]

    # other settings in the same out_dir are not mistaken for a finished run
    r = run_script(*args, '--attn_types=SM', '--max_iters=16')
    assert 'trained with other settings (max_iters, lr_decay_iters)' in r.stdout and 'training SM' in r.stdout
    assert [list(t) for t in tables(doc.read_text())] == [['SM']] and 'no GK run in attn_types' in doc.read_text()


def test_bad_inputs_fail_before_any_training(char_data, tmp_path):
    """each would otherwise train first (the TINY runs, so a regression shows in seconds) and fail after"""
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'file.txt').write_text('a file')
    base = ['compare_attention.py', f'--data_dir={char_data}', f'--out_prefix={tmp_path}/o-', f'--doc={tmp_path}/a.md',
            *TINY, '--attn_types=SM']
    cases = [
        ([f'--doc={tmp_path / "docs"}'], 'is a directory; give a file name'),
        ([f'--doc={tmp_path / "file.txt" / "a.md"}'], 'is a file, not a directory'),
        ([f'--out_prefix={tmp_path / "file.txt"}/o-'], 'cannot be created or written'),
        (['--attn_types=SM,GKpoly-x'], "unknown attn_type 'GKpoly-x'"),
        (['--attn_types=SM,,GK'], 'has an empty entry (entry 2)'),
        (['--report_iters=(5,)'], 'each must be a step with an eval (0, 8, 16, ... and 32)'),
    ]
    run_bad_inputs([([*base, *args], message) for args, message in cases], protect=[tmp_path, char_data])


def test_train_11_pa_and_eval_configs(char_data, tmp_path):
    short = ['--max_iters=12', '--lr_decay_iters=12', '--eval_interval=6', '--eval_iters=2', '--log_interval=6',
             '--device=cpu', '--compile=False', f'--data_dir={char_data}']
    runs = {'11': ('config/train_11.py', '--attn_type=GK'), 'pa': ('config/PA.py',)}
    for name, (config, *flags) in runs.items():
        run_script('train.py', config, f'--out_dir={tmp_path / name}', *short, *flags)
    ck11 = torch.load(tmp_path / '11' / 'ckpt.pt', map_location='cpu', weights_only=True)
    ckpa = torch.load(tmp_path / 'pa' / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert [ck11['model_args'][k] for k in ('n_layer', 'n_head', 'attn_type')] == [1, 1, 'GK']
    assert ckpa['model_args']['attn_type'] == 'PA_relu' and ckpa['model_args']['n_layer'] == 4
    for name in runs:
        out = tmp_path / name
        before = snapshot(out)
        p = run_script('train.py', 'config/EVAL.py', f'--out_dir={out}')
        assert snapshot(out) == before  # nothing written, nothing rewritten
        line = [l for l in p.stdout.splitlines() if 'val loss' in l][-1]
        ck = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)
        logged = [json.loads(l) for l in open(out / 'log.jsonl')]
        val = next(r['val_loss'] for r in logged if r['iter'] == ck['iter_num'] and r['val_loss'] is not None)
        assert line.startswith(f"step {ck['iter_num']}:") and line.endswith(f"val loss {val:.4f}")  # same batches
    p = run_script('train.py', 'config/EVAL.py', f'--out_dir={tmp_path / "none"}', check=False)
    assert p.returncode != 0 and 'no checkpoint at' in p.stderr and not os.path.exists(tmp_path / 'none')


def test_eval_keeps_log_records_past_the_best_checkpoint(char_data, tmp_path):
    run_script('train.py', f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--n_layer=1', '--n_head=1',
               '--n_embd=16', '--block_size=16', '--batch_size=4', '--eval_iters=2', '--max_iters=4',
               '--eval_interval=4', '--compile=False', '--device=cpu')
    with open(tmp_path / 'log.jsonl', 'a') as f:  # steps run after the best checkpoint, as a longer run has
        f.write(json.dumps({'iter': 5, 'loss': 4.0}) + '\n')
    before = snapshot(tmp_path)
    run_script('train.py', 'config/EVAL.py', f'--out_dir={tmp_path}')
    assert snapshot(tmp_path) == before
