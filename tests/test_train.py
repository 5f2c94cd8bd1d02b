"""train.py and sample.py end to end, as a user runs them (subprocesses), on tiny models and a char dataset."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, logged, run_script, write_char_dataset
from runtime import load_checkpoint, model_from_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=4', '--gradient_accumulation_steps=1',
        '--log_interval=1', '--warmup_iters=5', '--learning_rate=1e-2', '--compile=False', '--device=cpu']


# One process and 2 DDP processes differ only in the order float32 gradients are summed (the all-reduce), ~1e-7
# relative; compared at full precision from log.jsonl (never the 4-decimal printout, whose rounding alone is 1e-4).
# Measured (AMD EPYC with avx512_bf16, torch 2.13, seed 1337, the flags of the tests below): AdamW 2.4e-7 at most
# over 8 steps; Muon 6.0e-5 over 12 steps, its bfloat16 Newton-Schulz turning the 1e-7 into a flipped last bit of
# some bf16 entries of the update. The bounds leave ~80x and ~8x for other CPUs' kernels, and stay far below what a
# real error moves (a gradient averaged wrongly, or a skipped micro-batch: 1e-2 and more).
TOL_DDP_ADAMW = 2e-5
TOL_DDP_MUON = 5e-4


@pytest.fixture(scope='module')
def char_data(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('char')))


def train(data, out, *flags, torchrun=0, check=True):
    args = ['train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, *flags]
    if torchrun:
        args = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}', *args]
    return run_script(*args, check=check)


def load(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)


def step_losses(stdout):
    return {int(l.split()[1]): float(l.split('| loss ')[1].split()[0]) for l in stdout.splitlines() if l.startswith('step ') and '| loss' in l}


def test_training_lowers_loss_and_checkpoints(char_data, tmp_path):
    p = train(char_data, tmp_path, '--max_iters=60', '--eval_interval=30', '--gradient_accumulation_steps=2')
    losses = step_losses(p.stdout)
    assert len(losses) == 60
    assert sum(list(losses.values())[-5:]) / 5 < losses[1] - 0.5  # the char model learns quickly
    ck = load(tmp_path)
    assert ck['iter_num'] == 60 and ck['model_args']['attn_type'] == 'SM' and ck['meta']['vocab_size'] > 0
    assert set(ck) >= {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config', 'sampler', 'rng'}
    records = [json.loads(l) for l in open(tmp_path / 'log.jsonl')]
    assert all(set(r) == {'iter', 'loss', 'train_loss', 'val_loss', 'hellaswag', 'lr', 'grad_norm',
                          'tokens_per_sec', 'mfu', 'time'} for r in records)
    evals = [r for r in records if r['val_loss'] is not None]
    assert [r['iter'] for r in evals] == [0, 30, 60] and evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5
    assert 'tok/s' in p.stdout and 'mfu n/a' in p.stdout and 'dt ' in p.stdout  # no MFU on CPU: no peak to divide by


def test_resume_is_bit_identical(char_data, tmp_path):
    flags = ['--eval_interval=10', '--dropout=0.1', '--gradient_accumulation_steps=2']
    straight = train(char_data, tmp_path / 'a', '--max_iters=20', *flags)
    first = train(char_data, tmp_path / 'b', '--max_iters=10', *flags)
    p = run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "b"}', '--max_iters=20')
    a, b = load(tmp_path / 'a'), load(tmp_path / 'b')
    assert b['iter_num'] == 20
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert {**step_losses(first.stdout), **step_losses(p.stdout)} == step_losses(straight.stdout)


def test_ddp_two_processes_match_one(char_data, tmp_path):
    flags = ['--max_iters=8', '--eval_interval=8', '--gradient_accumulation_steps=4']
    one = train(char_data, tmp_path / 'one', *flags)
    two = train(char_data, tmp_path / 'two', *flags, torchrun=2)
    l1, l2 = logged(tmp_path / 'one'), logged(tmp_path / 'two')
    assert len(l1) == len(l2) == 8 and step_losses(one.stdout)[8] == round(l1[8], 4)
    for k in l1:  # see TOL_DDP_ADAMW
        assert abs(l1[k] - l2[k]) < TOL_DDP_ADAMW, (k, l1[k], l2[k])
    a, b = load(tmp_path / 'one'), load(tmp_path / 'two')
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-5, rtol=1e-4)
    assert '2 process(es) x 2 micro-steps' in two.stdout


def test_finetune_into_another_attention_keeps_the_source(char_data, tmp_path):
    src, dst = tmp_path / 'src', tmp_path / 'dst'
    train(char_data, src, '--max_iters=40', '--eval_interval=40')
    before = hashlib.sha256(open(src / 'ckpt.pt', 'rb').read()).hexdigest()
    p = train(char_data, dst, '--init_from=finetune', f'--finetune_from={src}', '--attn_type=GKpoly-8',
              '--max_iters=6', '--eval_interval=6', '--learning_rate=1e-3')
    assert hashlib.sha256(open(src / 'ckpt.pt', 'rb').read()).hexdigest() == before
    ck = load(dst)
    assert ck['model_args']['attn_type'] == 'GKpoly-8' and ck['iter_num'] == 6
    assert step_losses(p.stdout)[1] < 3.6  # starts from trained weights, not from scratch (ln 62 = 4.1)


def test_init_from_local_hf_directory(tmp_path):
    transformers = pytest.importorskip('transformers')
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=300)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / 'hf')
    data = tmp_path / 'bpe'
    os.makedirs(data)
    gen = torch.Generator().manual_seed(0)
    for split in ('train', 'val'):
        torch.randint(300, (5000,), generator=gen).to(torch.int32).numpy().astype('uint16').tofile(data / f'{split}.bin')
    p = train(data, tmp_path / 'out', f'--init_from={tmp_path / "hf"}', '--max_iters=4', '--eval_interval=4')
    ck = load(tmp_path / 'out')
    assert ck['model_args']['vocab_size'] == 300 and ck['model_args']['block_size'] == 32  # cropped from 64
    assert ck['model_args']['bias'] is True and ck['meta'] is None
    assert 'initializing from OpenAI GPT-2 weights' in p.stdout


def test_eval_only_writes_nothing(char_data, tmp_path):
    train(char_data, tmp_path / 'run', '--max_iters=4', '--eval_interval=4')
    before = sorted(os.listdir(tmp_path / 'run'))
    mtime = os.path.getmtime(tmp_path / 'run' / 'ckpt.pt')
    p = run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "run"}', '--eval_only=True')
    assert 'val loss' in p.stdout
    assert sorted(os.listdir(tmp_path / 'run')) == before and os.path.getmtime(tmp_path / 'run' / 'ckpt.pt') == mtime


def test_sample_from_checkpoint(char_data, tmp_path):
    train(char_data, tmp_path, '--max_iters=30', '--eval_interval=30')
    p = run_script('sample.py', f'--out_dir={tmp_path}', '--num_samples=3', '--max_new_tokens=40', '--device=cpu',
                   '--start=The ')
    samples = p.stdout.split('---------------\n')[:-1]
    assert len(samples) == 3 and all(s.startswith('The ') and len(s) == 4 + 40 + 1 for s in samples)
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('And so')
    p = run_script('sample.py', f'--out_dir={tmp_path}', '--num_samples=1', '--max_new_tokens=5', f'--start=FILE:{prompt}')
    assert p.stdout.startswith('And so')
    # the same seed gives the same samples
    q = run_script('sample.py', f'--out_dir={tmp_path}', '--num_samples=1', '--max_new_tokens=5', f'--start=FILE:{prompt}')
    assert p.stdout == q.stdout


def test_configurator_errors_are_one_line(char_data, tmp_path):
    cases = [(['--learning_rat=1e-3'], "unknown config key 'learning_rat'", 'learning_rate'),
             (['--batch_size=big'], "config key 'batch_size' wants a int", None),
             (['--compile'], "needs a value", None),
             (['no_such_config'], "config file 'no_such_config' not found", 'train_shakespeare_char')]
    for args, msg, hint in cases:
        p = run_script('train.py', *args, f'--out_dir={tmp_path / "x"}', check=False)
        assert p.returncode != 0 and 'Traceback' not in p.stderr
        assert p.stderr.strip().count('\n') == 0 and msg in p.stderr, p.stderr
        if hint:
            assert hint in p.stderr
        assert not os.path.exists(tmp_path / 'x')


def test_config_by_bare_name_and_flags_override(monkeypatch):
    sys.path.insert(0, REPO)
    from configurator import configure, sources
    g = dict(out_dir='out', eval_only=False, init_from='scratch', batch_size=1, learning_rate=1e-3, compile=None,
             eval_iters=1, wandb_log=False)
    configure(g, ['eval_gpt2_xl', '--batch_size=4', '--learning_rate=1', '--compile=False'])
    assert g['init_from'] == 'gpt2-xl' and g['eval_only'] is True
    assert g['batch_size'] == 4 and g['learning_rate'] == 1.0 and isinstance(g['learning_rate'], float)
    assert g['compile'] is False
    # where each value came from: train.py lets a checkpoint overrule a config file's shape, never a typed flag
    assert sources['init_from'] == os.path.join('config', 'eval_gpt2_xl.py') and sources['batch_size'] == '--batch_size=4'


def test_activation_checkpointing_trains_identically(char_data, tmp_path):
    """--activation_checkpointing=True recomputes each block in backward: the same run to the last bit, dropout on"""
    flags = ['--max_iters=8', '--eval_interval=8', '--dropout=0.1']
    plain = train(char_data, tmp_path / 'a', *flags)
    ckpt = train(char_data, tmp_path / 'b', *flags, '--activation_checkpointing=True')
    assert step_losses(plain.stdout) == step_losses(ckpt.stdout) and len(step_losses(plain.stdout)) == 8
    a, b = load(tmp_path / 'a'), load(tmp_path / 'b')
    assert b['config']['activation_checkpointing'] is True
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


# train.py under a clock that moves only when told: each optimizer step (its one clip_grad_norm_) takes 0.25 s, each
# eval (eval_offsets, once per split) and each checkpoint write 100 s. A log line's dt must then read exactly 250.00ms
# whatever the machine's load: the time of steps it did not count, or steps it counted without their time, show.
FAKE_CLOCK = """
import runpy, sys, time, torch, runtime
clock = [0.0]
time.time = lambda: clock[0]
def costs(f, seconds):
    def timed(*args, **kwargs):
        clock[0] += seconds
        return f(*args, **kwargs)
    return timed
torch.nn.utils.clip_grad_norm_ = costs(torch.nn.utils.clip_grad_norm_, 0.25)
runtime.eval_offsets = costs(runtime.eval_offsets, 100.0)
runtime.save_atomic = costs(runtime.save_atomic, 100.0)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_step_time_counts_only_timed_steps(char_data, tmp_path):
    """dt, tokens/s and MFU cover only the steps timed in their log window: the first step (compilation), evals and
    checkpoints inside a window (here at steps 2, 4, 6... of windows 1-4, 5-8...) are never credited to it"""
    def run(out, *flags):
        return run_script('-c', FAKE_CLOCK, 'train.py', f'--data_dir={char_data}', f'--out_dir={out}', *TINY, *flags,
                          fork=True)
    p = run(tmp_path / 'a', '--max_iters=12', '--log_interval=4', '--eval_interval=2')
    lines = [l for l in p.stdout.splitlines() if l.startswith('step ') and '| loss' in l]
    assert len(lines) == 3 and all('| dt 250.00ms | 16.0 samples/s | 512 tok/s |' in l for l in lines), lines
    rates = {r['iter']: r['tokens_per_sec'] for r in map(json.loads, open(tmp_path / 'a' / 'log.jsonl'))
             if r['loss'] is not None}
    assert rates == {4: 512.0, 8: 512.0, 12: 512.0}  # 4 x 32 tokens per step, one step per 0.25 s
    one = run(tmp_path / 'b', '--max_iters=1', '--eval_interval=1000')
    assert 'dt n/a (untimed)' in one.stdout  # its only step was the first


def test_muon_learns_resumes_exactly_and_matches_ddp(char_data, tmp_path):
    """optimizer='muon': Muon for the block matrices, AdamW for the rest; with gradient accumulation, exact resume
    (both optimizers' state in the checkpoint), and 2 DDP processes equal to one within float rounding"""
    flags = ['--optimizer=muon', '--max_iters=12', '--eval_interval=6', '--gradient_accumulation_steps=4']
    straight = train(char_data, tmp_path / 'a', *flags)
    losses = logged(tmp_path / 'a')
    assert len(losses) == 12 and losses[12] < losses[1] - 0.5 and 'optimizer muon' in straight.stdout
    train(char_data, tmp_path / 'b', *flags[:1], '--max_iters=6', *flags[2:])
    run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "b"}', '--max_iters=12')
    assert logged(tmp_path / 'b') == losses  # bit for bit: the same float32 values at every step, the resumed ones too
    a, b = load(tmp_path / 'a'), load(tmp_path / 'b')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    muon_state = a['optimizer']['state']['transformer.h.0.attn.c_attn.weight']
    assert set(muon_state) == {'momentum_buffer'}  # a Muon matrix; the embeddings carry AdamW's moments
    assert {'exp_avg', 'exp_avg_sq'} <= set(a['optimizer']['state']['transformer.wte.weight'])
    p = run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "a"}', '--eval_only=True', '--eval_full=True')
    assert 'every val block once' in p.stdout  # loads Muon's state too
    train(char_data, tmp_path / 'c', *flags, torchrun=2)
    ddp = logged(tmp_path / 'c')
    assert sorted(ddp) == sorted(losses)
    for k in losses:  # not bit-exact: see TOL_DDP_MUON
        assert abs(ddp[k] - losses[k]) < TOL_DDP_MUON, (k, ddp[k], losses[k])


def test_eval_full_scores_every_val_block_once(char_data, tmp_path):
    """--eval_only=True --eval_full=True: the val loss is the mean over every non-overlapping block of val.bin"""
    train(char_data, tmp_path, '--max_iters=4', '--eval_interval=4')
    p = run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path}', '--eval_only=True', '--eval_full=True',
                   '--batch_size=7')  # 7 does not divide the number of blocks: a short last batch
    reported = float(p.stdout.split('val loss ')[1].split(',')[0])
    model = model_from_checkpoint(load_checkpoint(str(tmp_path / 'ckpt.pt'))).eval()
    val = np.fromfile(os.path.join(char_data, 'val.bin'), dtype=np.uint16).astype(np.int64)
    n = (len(val) - 1) // 32
    x = torch.from_numpy(val[:n * 32]).view(n, 32)
    y = torch.from_numpy(val[1:n * 32 + 1]).view(n, 32)
    with torch.no_grad():
        expected = torch.stack([model(x[i:i + 50], y[i:i + 50])[1] * len(x[i:i + 50]) for i in range(0, n, 50)]).sum() / n
    assert abs(reported - expected.item()) < 1e-4, (reported, expected.item())
    assert 'every val block once' in p.stdout
