"""train.py and sample.py end to end, as a user runs them (subprocesses), on tiny models and a char dataset."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_script, write_char_dataset
from runtime import load_checkpoint, model_from_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=4', '--gradient_accumulation_steps=1',
        '--log_interval=1', '--warmup_iters=5', '--learning_rate=1e-2', '--compile=False', '--device=cpu']


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
    l1, l2 = step_losses(one.stdout), step_losses(two.stdout)
    assert len(l1) == len(l2) == 8
    for k in l1:
        assert abs(l1[k] - l2[k]) < 1e-4, (k, l1[k], l2[k])
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


def test_step_time_counts_only_timed_steps(char_data, tmp_path):
    """An eval inside a log window (at step 6 of the window 4..8) must not credit the window with the steps before
    it: dt stays near the dt of a run without evals, instead of reading about half (tokens/s about 2x)"""
    flags = ['--max_iters=24', '--log_interval=4', '--n_embd=128', '--batch_size=16', '--block_size=32',
             '--eval_iters=20']
    def dts(stdout):
        return sorted(float(l.split('| dt ')[1].split('ms')[0]) for l in stdout.splitlines() if '| dt ' in l)
    plain = dts(train(char_data, tmp_path / 'a', *flags, '--eval_interval=1000').stdout)
    evals = train(char_data, tmp_path / 'b', *flags, '--eval_interval=2')
    with_evals = dts(evals.stdout)
    ratio = with_evals[len(with_evals) // 2] / plain[len(plain) // 2]  # medians
    assert 0.7 < ratio < 1.5, (ratio, plain, with_evals)
    first = [l for l in evals.stdout.splitlines() if l.startswith('step 4 |')][0]
    assert '| dt ' in first  # steps 2-4 were timed; step 1 (compilation, warm-up) was not
    assert 'dt n/a (untimed)' in train(char_data, tmp_path / 'c', '--max_iters=1', '--eval_interval=1000').stdout


def test_muon_learns_resumes_exactly_and_matches_ddp(char_data, tmp_path):
    """optimizer='muon': Muon for the block matrices, AdamW for the rest; with gradient accumulation, exact resume
    (both optimizers' state in the checkpoint), and 2 DDP processes equal to one"""
    flags = ['--optimizer=muon', '--max_iters=12', '--eval_interval=6', '--gradient_accumulation_steps=4']
    straight = train(char_data, tmp_path / 'a', *flags)
    losses = step_losses(straight.stdout)
    assert len(losses) == 12 and losses[12] < losses[1] - 0.5 and 'optimizer muon' in straight.stdout
    train(char_data, tmp_path / 'b', *flags[:1], '--max_iters=6', *flags[2:])
    resumed = run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "b"}', '--max_iters=12')
    assert {k: v for k, v in losses.items() if k > 6} == step_losses(resumed.stdout)
    a, b = load(tmp_path / 'a'), load(tmp_path / 'b')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    muon_state = a['optimizer']['state']['transformer.h.0.attn.c_attn.weight']
    assert set(muon_state) == {'momentum_buffer'}  # a Muon matrix; the embeddings carry AdamW's moments
    assert {'exp_avg', 'exp_avg_sq'} <= set(a['optimizer']['state']['transformer.wte.weight'])
    p = run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path / "a"}', '--eval_only=True', '--eval_full=True')
    assert 'every val block once' in p.stdout  # loads Muon's state too
    ddp = step_losses(train(char_data, tmp_path / 'c', *flags, torchrun=2).stdout)
    for k in losses:
        assert abs(ddp[k] - losses[k]) < 1e-4, (k, ddp[k], losses[k])


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
