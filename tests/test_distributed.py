"""Several processes on CPU (gloo): how a step's micro-batches are split over ranks, FSDP against one process,
checkpoints that move between FSDP and one process, a Slurm-style launch, and wandb (offline, or not installed)."""
import glob
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest
import torch

from conftest import REPO, logged, run_script, write_char_dataset
from runtime import draw_offsets

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=4',
        '--log_interval=1', '--warmup_iters=5', '--learning_rate=1e-2', '--compile=False', '--device=cpu',
        '--gradient_accumulation_steps=4', '--eval_interval=4']

# runs train.py as torchrun would, but every gather of token windows from a .bin memmap is written down first:
# what each process actually read, seen from outside, with no debug flag in train.py
RECORD = '''
import os, runpy, sys
import numpy as np

# a fresh record per launch (run_script may relaunch a torchrun that aborted in gloo's teardown)
open(os.path.join(os.environ['READS_DIR'], 'rank%s.txt' % os.environ.get('RANK', '0')), 'w').close()

class Recorded(np.memmap):
    def __getitem__(self, index):
        if isinstance(index, np.ndarray) and index.ndim == 2:  # get_batch: one row of token positions per window
            path = os.path.join(os.environ['READS_DIR'], 'rank%s.txt' % os.environ.get('RANK', '0'))
            with open(path, 'a') as f:
                f.write(' '.join([os.path.basename(self.filename)] + [str(i) for i in index[:, 0]]) + '\\n')
        return super().__getitem__(index)

np.memmap = Recorded
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as if train.py had been run itself
runpy.run_path(sys.argv[0], run_name='__main__')
'''

# FSDP and one process differ only in the order float32 gradients are summed (reduce-scatter vs one sum): compared at
# full precision from log.jsonl, never the 4-decimal printout. Measured (AMD EPYC, torch 2.13, the runs fixture):
# 2.4e-7 at most, train and val; the bound leaves ~80x for other CPUs' kernels.
TOL_FSDP = 2e-5


def step_losses(stdout):
    return {int(l.split()[1]): float(l.split('| loss ')[1].split()[0]) for l in stdout.splitlines()
            if l.startswith('step ') and '| loss' in l}


def load(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)


def train(data, out, *flags, torchrun=0, script=(), env=None, check=True):
    args = [*script, 'train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, *flags]
    if torchrun:
        args = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}', *args]
    return run_script(*args, env=env, check=check)


def reads(folder, rank=0):
    """[(file, window start offsets)] in the order that process read them"""
    return [(l.split()[0], tuple(map(int, l.split()[1:]))) for l in open(os.path.join(folder, f'rank{rank}.txt'))]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """one process for 12 steps, and FSDP over 2 processes for the first 8 (a copy kept at 4), both recording reads"""
    base = tmp_path_factory.mktemp('dist')
    data = write_char_dataset(str(base / 'char'))
    (base / 'record.py').write_text(RECORD)
    for d in ('reads_one', 'reads_fsdp'):
        os.makedirs(base / d)
    one = train(data, base / 'one', '--max_iters=12', script=[str(base / 'record.py')],
                env={'READS_DIR': str(base / 'reads_one')})
    fsdp = train(data, base / 'fsdp', '--max_iters=8', '--checkpoint_interval=4', '--fsdp=True', torchrun=2,
                 script=[str(base / 'record.py')], env={'READS_DIR': str(base / 'reads_fsdp')})
    return {'base': base, 'data': data, 'one': one, 'fsdp': fsdp}


@pytest.mark.parametrize('world_size', [1, 2, 4])
def test_ranks_split_one_draw(world_size):
    """rank r takes micro-batches r, r + W, ...: disjoint, and in order together exactly the one-process draw"""
    n_tokens, block, batch = 1000, 32, 3
    for n_micro in (4, 8, 40):
        gen = torch.Generator().manual_seed(0)
        full = draw_offsets(gen, n_tokens, block, n_micro, batch)
        parts, states = [], []
        for r in range(world_size):
            g = torch.Generator().manual_seed(0)
            parts.append(draw_offsets(g, n_tokens, block, n_micro, batch, r, world_size))
            states.append(g.get_state())
        assert all(p.shape == (n_micro // world_size, batch) and p.dtype == torch.long for p in parts)
        assert torch.equal(torch.stack([parts[i % world_size][i // world_size] for i in range(n_micro)]), full)
        rows = [tuple(row.tolist()) for p in parts for row in p]
        assert len(set(rows)) == n_micro  # no micro-batch on two ranks
        assert all(torch.equal(s, gen.get_state()) for s in states)  # the next step's draw is the same everywhere
        assert 0 <= int(full.min()) and int(full.max()) < n_tokens - block - 1


def test_fewer_micro_batches_than_ranks_go_to_every_rank():
    full = draw_offsets(torch.Generator().manual_seed(1), 500, 8, 2, 5)
    for r in range(4):
        assert torch.equal(draw_offsets(torch.Generator().manual_seed(1), 500, 8, 2, 5, r, 4), full)


def test_two_torchrun_ranks_read_disjoint_halves(runs):
    """what the 2 FSDP processes read from train.bin / val.bin, compared with one process's reads"""
    base = runs['base']
    one, r0, r1 = reads(base / 'reads_one'), reads(base / 'reads_fsdp', 0), reads(base / 'reads_fsdp', 1)
    # eval at 0 (4 train + 4 val micro-batches), 4 steps of 4, eval at 4, 4 more steps, eval at 8: rank r reads
    # items r, r + 2, ... of each
    expected, pos = ([], []), 0
    for n in ([4, 4] + [4] * 4) * 2 + [4, 4]:
        for r in (0, 1):
            expected[r].extend(one[pos:pos + n][r::2])
        pos += n
    assert r0 == expected[0] and r1 == expected[1]
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(one[:pos]) and len(r0) == len(r1) == pos // 2
    assert {f for f, _ in r0} == {'train.bin', 'val.bin'}


def test_fsdp_trains_like_one_process(runs):
    one, fsdp = runs['base'] / 'one', runs['base'] / 'fsdp'
    l1, l2 = logged(one), logged(fsdp)
    assert sorted(l2) == list(range(1, 9))
    for k in l2:  # see TOL_FSDP
        assert abs(l1[k] - l2[k]) < TOL_FSDP, (k, l1[k], l2[k])
    e1, e2 = logged(one, 'val_loss'), logged(fsdp, 'val_loss')
    assert abs(e1[4] - e2[4]) < TOL_FSDP and abs(e1[8] - e2[8]) < TOL_FSDP and e2[4] < e2[0] - 0.3  # it learns
    assert '2 process(es) x 2 micro-steps' in runs['fsdp'].stdout
    assert 'Warning' not in runs['fsdp'].stderr, runs['fsdp'].stderr  # no warning a user would have to look into
    # the checkpoint is the same as one process writes: full weights (tied ones share a tensor)
    a, b = load(runs['base'] / 'one'), load(runs['base'] / 'fsdp')
    assert list(a['model']) == list(b['model']) and a.keys() == b.keys()
    assert all(a['model'][k].shape == b['model'][k].shape for k in a['model'])
    assert b['model']['lm_head.weight'].data_ptr() == b['model']['transformer.wte.weight'].data_ptr()
    # the optimizer state is keyed by parameter name and holds whole tensors, whoever wrote it
    assert list(b['optimizer']['state']) == list(a['optimizer']['state']) and 'transformer.wte.weight' in a['optimizer']['state']
    strip = lambda groups: [{k: v for k, v in g.items() if k != 'lr'} for g in groups]
    assert strip(a['optimizer']['param_groups']) == strip(b['optimizer']['param_groups'])
    for i, s in a['optimizer']['state'].items():
        shapes = lambda state: {k: (v.shape, v.dtype) for k, v in state.items()}
        assert shapes(s) == shapes(b['optimizer']['state'][i])
    assert len(b['rng']) == 2 and b['iter_num'] == 8


def from_step_4(runs, out):
    """a copy of the FSDP run as it was at step 4"""
    shutil.copytree(runs['base'] / 'fsdp', out)
    os.replace(out / 'ckpt_000004.pt', out / 'ckpt.pt')


def test_fsdp_resume_is_exact(runs, tmp_path):
    """FSDP 0-4, then FSDP resumes 4-8: bit for bit the FSDP run 0-8"""
    from_step_4(runs, tmp_path / 'r')
    p = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                   '--init_from=resume', f'--out_dir={tmp_path / "r"}', '--fsdp=True')
    assert {k: v for k, v in step_losses(runs['fsdp'].stdout).items() if k > 4} == step_losses(p.stdout)
    assert logged(tmp_path / 'r') == logged(runs['base'] / 'fsdp')  # every step's loss, to the last bit
    a, b = load(runs['base'] / 'fsdp'), load(tmp_path / 'r')
    assert b['iter_num'] == 8 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    for name, state in a['optimizer']['state'].items():
        assert all(torch.equal(v, b['optimizer']['state'][name][k]) for k, v in state.items()), name


def test_checkpoints_move_between_fsdp_and_one_process(runs, tmp_path):
    """FSDP 0-4, then one process resumes 4-8, then FSDP resumes 8-12: the same run as one process 0-12"""
    out = tmp_path / 'chain'
    from_step_4(runs, out)
    second = run_script('train.py', '--init_from=resume', f'--out_dir={out}', '--max_iters=8')
    third = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                       '--init_from=resume', f'--out_dir={out}', '--max_iters=12', '--fsdp=True')
    assert sorted(step_losses(second.stdout)) == [5, 6, 7, 8] and sorted(step_losses(third.stdout)) == [9, 10, 11, 12]
    chained, straight = logged(out), logged(runs['base'] / 'one')  # the chain's log: FSDP's 1-4, then each resume's
    assert sorted(chained) == sorted(straight) == list(range(1, 13))
    for k in straight:  # see TOL_FSDP
        assert abs(chained[k] - straight[k]) < TOL_FSDP, (k, chained[k], straight[k])
    a, b = load(runs['base'] / 'one'), load(out)
    assert b['iter_num'] == 12
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=2e-5, rtol=1e-4)
    # sample.py reads the FSDP-written checkpoint in one process
    p = run_script('sample.py', f'--out_dir={out}', '--num_samples=2', '--max_new_tokens=20', '--device=cpu',
                   '--start=The ')
    samples = p.stdout.split('---------------\n')[:-1]
    assert len(samples) == 2 and all(s.startswith('The ') and len(s) == 4 + 20 + 1 for s in samples)


def test_fsdp_skips_non_finite_steps(runs, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(runs['base'] / 'fsdp', out)
    p = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                   '--init_from=resume', f'--out_dir={out}', '--fsdp=True', '--learning_rate=1e30',
                   '--warmup_iters=0', '--decay_lr=False', '--max_bad_steps=2', '--max_iters=50', check=False)
    assert p.returncode != 0
    assert 'skipped 2' in p.stdout and "steps in a row had a non-finite loss" in p.stderr
    a, b = load(runs['base'] / 'fsdp'), load(out)
    assert b['iter_num'] == 8 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_launch_mistakes_are_one_line(runs, tmp_path):
    cases = [(['--fsdp=True'], {}, 'error: fsdp=True shards the model over several processes'),
             ([], {'SLURM_NTASKS': '2', 'SLURM_PROCID': '0'}, 'no MASTER_ADDR / MASTER_PORT')]
    for flags, env, message in cases:
        p = train(runs['data'], tmp_path / 'o', *flags, env=env, check=False)
        assert p.returncode == 2 and 'Traceback' not in p.stderr
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / 'o').exists()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_slurm_tasks_without_torchrun_equal_torchrun(runs, tmp_path):
    """two plain `python train.py` processes with srun's variables do what torchrun did, bit for bit"""
    port, procs = free_port(), []
    base_env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')}
    for r in range(2):
        env = dict(base_env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS='2', MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        with open(tmp_path / f'out{r}', 'w') as out, open(tmp_path / f'err{r}', 'w') as err:
            procs.append(subprocess.Popen([sys.executable, 'train.py', f'--data_dir={runs["data"]}',
                                           f'--out_dir={tmp_path / "slurm"}', *TINY, '--max_iters=4', '--fsdp=True'],
                                          cwd=REPO, env=env, stdout=out, stderr=err))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [(tmp_path / f'err{r}').read_text()[-2000:] for r in range(2)]
    stdout = (tmp_path / 'out0').read_text()
    assert '2 process(es) x 2 micro-steps' in stdout and not step_losses((tmp_path / 'out1').read_text())
    assert step_losses(stdout) == {k: v for k, v in step_losses(runs['fsdp'].stdout).items() if k <= 4}
    a = torch.load(runs['base'] / 'fsdp' / 'ckpt_000004.pt', map_location='cpu', weights_only=True)
    b = load(tmp_path / 'slurm')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def wandb_history(path):
    """step -> every metric logged at it, read back from an offline run's .wandb file (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, each chunk with a 7-byte header of crc, length, type)"""
    from wandb.proto import wandb_internal_pb2
    data, pos, chunks, rows = open(path, 'rb').read(), 7, b'', {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b''
            if record.WhichOneof('record_type') == 'history':
                row = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.setdefault(row['_step'], {}).update(row)
    return rows


def test_wandb_offline_run_has_the_metrics(runs, tmp_path):
    pytest.importorskip('wandb')
    env = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'WANDB_DIR': str(tmp_path),
           'WANDB_CONFIG_DIR': str(tmp_path / 'config'), 'WANDB_CACHE_DIR': str(tmp_path / 'cache'),
           'WANDB_DATA_DIR': str(tmp_path / 'data')}
    train(runs['data'], tmp_path / 'out', '--max_iters=4', '--eval_interval=2', '--wandb_log=True', env=env)
    found = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(found) == 1
    history = wandb_history(found[0])
    records = [json.loads(l) for l in open(tmp_path / 'out' / 'log.jsonl')]
    assert sorted(history) == sorted({r['iter'] for r in records}) == [0, 1, 2, 3, 4]
    for r in records:
        for k in ('loss', 'train_loss', 'val_loss', 'grad_norm', 'tokens_per_sec'):
            if r[k] is not None:
                assert history[r['iter']][k] == pytest.approx(r[k]), (r['iter'], k)
        assert 'lr' in history[r['iter']]


def test_runs_without_wandb_installed(runs, tmp_path):
    fake = tmp_path / 'fake'
    fake.mkdir()
    (fake / 'wandb.py').write_text("raise ImportError('No module named wandb (simulated)')\n")
    env = {'PYTHONPATH': os.pathsep.join([str(fake)] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
    train(runs['data'], tmp_path / 'ok', '--max_iters=2', '--eval_interval=2', env=env)
    assert (tmp_path / 'ok' / 'ckpt.pt').exists()
    p = train(runs['data'], tmp_path / 'no', '--max_iters=2', '--wandb_log=True', env=env, check=False)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert 'wandb_log=True needs the wandb package' in p.stderr and not (tmp_path / 'no').exists()


@pytest.fixture
def one_process_group(tmp_path):
    """FSDP2 in this process: a gloo group of one"""
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fsdp_and_plain(seed=0):
    import copy
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    return model, copy.deepcopy(model)


def test_fsdp_bf16_gathers_weights_low_but_leaves_the_stream_float32(one_process_group):
    """a block sees its weights gathered in bf16 but its input as float32, uncast, as under DDP with autocast (the
    residual stream stays float32); the root (embeddings, head) keeps float32 weights. The block's own forward
    needs CUDA's autocast (CPU autocast runs LayerNorm only in its input's dtype): tests/test_cuda.py runs it and
    compares the loss with DDP's"""
    from runtime import fsdp_shard
    model, _ = fsdp_and_plain()
    fsdp_shard(model, 'cpu', 'bfloat16', 1)
    seen = []

    class Seen(Exception):
        pass

    def look(block, args):
        seen.append((args[0].dtype, block.attn.c_attn.weight.dtype, block.ln_1.weight.dtype,
                     model.transformer.wte.weight.dtype))
        raise Seen

    model.transformer.h[0].register_forward_pre_hook(look)  # after FSDP's own pre-hook: weights are gathered
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast('cpu', dtype=torch.bfloat16), pytest.raises(Seen):
        model(x, x)
    assert seen == [(torch.float32, torch.bfloat16, torch.bfloat16, torch.float32)]


def test_fsdp_compile_covers_every_block_and_the_head(one_process_group):
    """under FSDP compiling the root leaves the head and loss eager (dynamo skips FSDP's hooks): fsdp_shard
    compiles each block and the head instead, two graphs, no graph break, the eager numbers"""
    from torch._dynamo.utils import counters
    from runtime import fsdp_shard
    model, plain = fsdp_and_plain()
    fsdp_shard(model, 'cpu', 'float32', 1, compile_mode='default')
    torch._dynamo.reset()
    counters.clear()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(x, x)
    loss.backward()
    assert counters['stats']['unique_graphs'] == 2 and not counters['graph_break'], dict(counters['stats'])
    _, want = plain(x, x)
    assert abs(loss.item() - want.item()) < 1e-5
