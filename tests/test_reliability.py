"""Crash safety, exact resume and bad input, each run as a user would (subprocesses)."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script, write_char_dataset

ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}  # as run_script: the same arithmetic in every run
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=2', '--gradient_accumulation_steps=1',
        '--log_interval=1', '--warmup_iters=5', '--learning_rate=1e-2', '--dropout=0.1', '--device=cpu']


@pytest.fixture(scope='module')
def char_data(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('char')))


@pytest.fixture(scope='module')
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    run_script('train.py', f'--data_dir={char_data}', f'--out_dir={out}', *TINY, '--max_iters=6', '--eval_interval=6')
    return out


def snapshot(path):
    """name -> sha256 of every file under path (None if path does not exist)"""
    if not os.path.exists(path):
        return None
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


def weights(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)['model']


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_torchrun_world_size_must_divide_accumulation(char_data, tmp_path):
    p = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                   f'--data_dir={char_data}', f'--out_dir={tmp_path / "o"}', *TINY, '--gradient_accumulation_steps=3',
                   check=False)
    assert p.returncode != 0 and not (tmp_path / 'o').exists()
    ours = [l for l in p.stderr.splitlines() if l.startswith('error: ')]
    assert ours and "gradient_accumulation_steps (3) must be divisible by the number of processes (2)" in ours[0]
    assert 'File "' + os.path.join(REPO, 'train.py') not in p.stderr  # no traceback from our script


def test_sigterm_checkpoints_and_resume_is_exact(char_data, tmp_path):
    flags = [f'--data_dir={char_data}', *TINY, '--eval_interval=1000', '--max_iters=300', '--n_embd=64']
    proc = subprocess.Popen([sys.executable, 'train.py', f'--out_dir={tmp_path / "a"}', *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    for line in proc.stdout:  # let it train a little, then preempt it
        if line.startswith('step 20 |'):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert 'stopped on request' in out
    stopped_at = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)['iter_num']
    assert 20 <= stopped_at < 300
    run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "a"}')
    run_script('train.py', f'--out_dir={tmp_path / "b"}', *flags)
    assert_same_weights(tmp_path / 'a', tmp_path / 'b')


def test_stop_keeps_the_best_checkpoint_when_not_always_saving(char_data, tmp_path):
    """always_save_checkpoint=False: ckpt.pt holds the best model; a SIGTERM saves the stop point to ckpt_last.pt,
    which resume takes (it is newer), and the resumed run ends exactly as an uninterrupted one"""
    flags = [f'--data_dir={char_data}', *TINY, '--eval_interval=10', '--max_iters=60', '--n_embd=64']
    proc = subprocess.Popen([sys.executable, 'train.py', f'--out_dir={tmp_path / "a"}', *flags,
                             '--always_save_checkpoint=False'], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    for line in proc.stdout:
        if line.startswith('step 25 |'):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    best = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    last = torch.load(tmp_path / 'a' / 'ckpt_last.pt', weights_only=True)
    assert best['iter_num'] in (10, 20) and 25 <= last['iter_num'] < 60  # the best was not overwritten
    assert last['best_val_loss'] == best['best_val_loss']
    run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "a"}', '--always_save_checkpoint=True')
    assert not (tmp_path / 'a' / 'ckpt_last.pt').exists()  # superseded by a newer ckpt.pt
    run_script('train.py', f'--out_dir={tmp_path / "b"}', *flags)
    assert_same_weights(tmp_path / 'a', tmp_path / 'b')


def last_logged_step(out):
    """the highest step in out/log.jsonl so far (0 if none), skipping a line still being written"""
    steps = [0]
    if (out / 'log.jsonl').exists():
        for line in open(out / 'log.jsonl'):
            try:
                steps.append(json.loads(line)['iter'])
            except ValueError:
                pass
    return max(steps)


def test_sigkill_at_random_moments_loses_nothing(char_data, tmp_path):
    """Kill a real training run many times, at random moments (checkpoint writes included), resume each time:
    it reaches the last step with a loadable checkpoint and the very weights of an uninterrupted run."""
    flags = [f'--data_dir={char_data}', *TINY, '--eval_interval=5', '--max_iters=200', '--n_embd=64',
             '--batch_size=8', '--block_size=64']
    run_script('train.py', f'--out_dir={tmp_path / "straight"}', *flags)
    out, rng, kills = tmp_path / 'killed', random.Random(0), 0
    for attempt in range(40):
        ckpt = out / 'ckpt.pt'
        args = ['--init_from=resume', f'--out_dir={out}'] if ckpt.exists() else [f'--out_dir={out}', *flags]
        if ckpt.exists():
            torch.load(ckpt, weights_only=True)  # the checkpoint left by the kill is complete
        # kill by progress, not by the clock (a fast machine would finish first): 10-50 steps past the
        # furthest step logged so far, then 0-50 ms later, which lands in steps, evals and checkpoint writes alike
        target = last_logged_step(out) + rng.randint(10, 50)
        proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=ONE_THREAD)
        while proc.poll() is None and (target >= 200 or last_logged_step(out) < target):
            time.sleep(0.005)
        if proc.poll() is None:
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0:
            break
        assert proc.returncode == -signal.SIGKILL, f'train.py failed on its own (exit {proc.returncode})'
        kills += 1
    assert kills >= 3, f"the run finished after {kills} kills; make it longer"
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 200
    assert_same_weights(out, tmp_path / 'straight')
    assert not [f for f in os.listdir(out) if '.tmp.' in f]  # no temp files left behind
    records = [json.loads(l) for l in open(out / 'log.jsonl')]
    steps = [r['iter'] for r in records if r['loss'] is not None]
    evals = [r['iter'] for r in records if r['val_loss'] is not None]
    assert steps == list(range(1, 201)) and evals == list(range(0, 201, 5))  # the log has each step and eval once


def test_ddp_resume_is_exact(char_data, tmp_path):
    flags = [f'--data_dir={char_data}', *TINY, '--eval_interval=6', '--gradient_accumulation_steps=2']
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py']
    run_script(*torchrun, f'--out_dir={tmp_path / "a"}', *flags, '--max_iters=12')
    run_script(*torchrun, f'--out_dir={tmp_path / "b"}', *flags, '--max_iters=6')
    run_script(*torchrun, f'--out_dir={tmp_path / "b"}', '--init_from=resume', '--max_iters=12')
    assert_same_weights(tmp_path / 'a', tmp_path / 'b')


def test_non_finite_steps_are_skipped_then_stop(trained, tmp_path):
    out = tmp_path / 'run'
    os.makedirs(out)
    for f in os.listdir(trained):
        open(out / f, 'wb').write(open(trained / f, 'rb').read())
    # an absurd learning rate blows the weights up after one step; every later step is non-finite
    p = run_script('train.py', '--init_from=resume', f'--out_dir={out}', '--learning_rate=1e30', '--warmup_iters=0',
                   '--decay_lr=False', '--max_bad_steps=3', '--max_iters=50', '--eval_interval=2', check=False)
    assert p.returncode == 3
    assert "steps in a row had a non-finite loss or gradient norm" in p.stderr and 'Traceback' not in p.stderr
    assert 'skipped' in p.stdout
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 6  # the last good checkpoint is kept
    assert_same_weights(out, trained)


def test_no_pickle_in_the_repo():
    """checkpoints load with weights_only=True and metadata is JSON: no pickle module anywhere"""
    for d, _, files in os.walk(REPO):
        if '.git' in d or 'tests' in d:
            continue
        for f in files:
            if f.endswith('.py'):
                src = open(os.path.join(d, f)).read()
                assert 'import pickle' not in src and 'weights_only=False' not in src, f
