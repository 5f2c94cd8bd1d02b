"""compare.py and gkpoly.py end to end on tiny models, and the train_11 / PA / EVAL configs, as a user runs them."""
import hashlib
import json
import math
import os
import statistics

import pytest
import torch

from conftest import run_bad_inputs, run_script, write_char_dataset

TINY = ('--device=cpu --compile=False --n_layer=2 --n_head=2 --n_embd=32 --block_size=32 --batch_size=4 '
        '--eval_iters=2 --max_iters=32 --lr_decay_iters=32 --eval_interval=8 --log_interval=4')
DEGREES = [2, 4, 8, 16, 32, 64]


@pytest.fixture(scope='module')
def char_data(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('char')))


def tables(md):
    """the markdown tables of md, each as {first cell: [other cells]} of its rows (header and rule left out)"""
    out = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith(('| variant |', '| attn_type |')):
            out.append({})
        elif line.startswith('|') and not line.startswith('|---'):
            out[-1][cells[0]] = cells[1:]
    return out


def number(cell):
    return float(cell.split()[0].replace(',', ''))  # '3.9400 ± 0.0012' -> 3.94


def snapshot(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), 'rb').read()).hexdigest() for f in os.listdir(folder)}


def final_losses(run):
    return [r['val_loss'] for r in map(json.loads, open(os.path.join(run, 'log.jsonl')))
            if r['iter'] == 32 and r['val_loss'] is not None]


def test_compare_end_to_end_and_gkpoly(char_data, tmp_path):
    doc = tmp_path / 'docs' / 'RUNS.md'
    args = ['compare.py', f'--data_dir={char_data}', f'--out_prefix={tmp_path}/o/', f'--doc={doc}', f'--common={TINY}',
            '--variants=SM:;GK:--attn_type=GK', '--seeds=(1, 2)', '--time_steps=3']
    p = run_script(*args)
    md = doc.read_text()
    steps, times = tables(md)
    assert list(steps) == list(times) == ['SM', 'GK'] and 'val loss @ 8 | val loss @ 16 | val loss @ 32' in md
    runs = {(v, s): tmp_path / 'o' / f'{v}-s{s}' for v in ('SM', 'GK') for s in (1, 2)}
    assert all(json.load(open(d / 'compare.json'))['command'][-1] == f'--out_dir={tmp_path}/o/{v}-s{s}'
               for (v, s), d in runs.items())
    for v in ('SM', 'GK'):  # every loss the whole-val one of the runs' logs, mean ± standard error over seeds
        xs = [final_losses(runs[v, s])[0] for s in (1, 2)]
        assert steps[v][2] == f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs) / math.sqrt(2):.4f}"
    sm, gk = ([final_losses(runs[v, s])[0] for s in (1, 2)] for v in ('SM', 'GK'))
    assert steps['GK'][3] == f"{statistics.fmean(gk) - statistics.fmean(sm):+.4f}" and steps['SM'][3:] == ['-', '-']
    scipy_stats = pytest.importorskip('scipy.stats')
    assert steps['GK'][4] == f"{scipy_stats.ttest_ind(gk, sm, equal_var=False).pvalue:.2g}"  # Welch, as scipy has it
    assert number(times['SM'][0]) > 0 and times['SM'][1] == '100%' and times['SM'][2] == '32'
    assert 'separate 3-step run of each variant' in md and md.startswith('<!-- written by compare.py')
    assert "every val block once" in p.stdout and '| GK |' in p.stdout and 'wrote' in p.stdout

    # again: every run is finished with the same command and every variant timed, so nothing runs
    q = run_script(*args)
    assert '4 run(s) already finished with the same command: kept' in q.stdout and '[1/' not in q.stdout
    assert 'timing ' not in q.stdout and tables(doc.read_text()) == [steps, times]
    assert len(json.load(open(tmp_path / 'o' / 'compare_timing.json'))) == 2

    # GKpoly-n against GK on the GK run's activations: p_n -> exp as n grows
    g = run_script('gkpoly.py', f'--run={runs["GK", 1]}')
    poly = tables(g.stdout)[0]
    assert list(poly) == [f'GKpoly-{n}' for n in DEGREES]
    errs = {n: [number(c) for c in poly[f'GKpoly-{n}']] for n in DEGREES}
    mean_err = [errs[n][1] for n in DEGREES]
    assert all(a > b for a, b in zip(mean_err, mean_err[1:])), mean_err
    assert errs[64][0] < errs[2][0] and mean_err[-1] < mean_err[0] / 10

    # other settings in the same run dirs are refused, and retrained only on request (passed on to train.py)
    other = [*args[:4], f'--common={TINY.replace("--max_iters=32", "--max_iters=16")}', '--variants=SM:', '--seeds=(1,)']
    before = snapshot(runs['SM', 1])
    r = run_script(*other, check=False)
    assert r.returncode == 2 and 'SM-s1 holds another or an unfinished run' in r.stderr
    assert snapshot(runs['SM', 1]) == before
    run_script(*other, '--overwrite=True', '--time_steps=0')  # timed from the runs' own logs
    assert 'median over the training runs' in doc.read_text()
    assert final_losses(runs['SM', 1]) == [] and '--max_iters=16' in json.load(open(runs['SM', 1] / 'compare.json'))['command']


def test_bad_inputs_fail_before_any_training(char_data, tmp_path):
    """each would otherwise train first (the TINY runs, so a regression shows in seconds) and fail after"""
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'mine.md').write_text('# my notes\n')
    (tmp_path / 'o-x-s1').mkdir()
    (tmp_path / 'o-x-s1' / 'log.jsonl').write_text('{}\n')
    base = ['compare.py', f'--data_dir={char_data}', f'--out_prefix={tmp_path}/o-', f'--doc={tmp_path}/a.md',
            f'--common={TINY}', '--variants=SM:', '--seeds=(1,)']
    cases = [
        ([f'--doc={tmp_path / "docs"}'], 'is a directory; give a file name'),
        ([f'--doc={tmp_path / "mine.md"}'], 'exists and was not written by compare.py'),
        (['--variants=SM:;;GK:'], 'has an empty entry'),
        (['--variants=SM:;SM:--attn_type=GK'], "names 'SM' twice"),
        (['--variants=SM:--attn_typo=GK'], "train.py has no setting 'attn_typo'"),
        (['--variants=SM:--seed=3'], '--seed is set by compare.py itself'),
        (['--variants=SM:config/nope.py'], 'no config file config/nope.py'),
        (['--variants=SM:seed=3'], "is neither a --key=value flag nor a config file"),
        (['--variants=a b:'], 'needs a name of letters'),
        (['--seeds=(1, 1)'], '--seeds must be a tuple of distinct integers'),
        (['--variants=x:'], 'o-x-s1 holds another or an unfinished run'),
        (['--time_lock=/nonexistent/lock'], 'is not a file'),
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
