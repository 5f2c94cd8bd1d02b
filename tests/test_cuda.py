"""GPU acceptance suite: the CUDA paths that CPU tests can only reach with faked queries, run for real. Skipped
without CUDA. On a GPU machine (a few minutes on one GPU):

    python -m pytest -q tests/test_cuda.py -s

-s shows the closing 124M benchmark table (tokens/s, MFU, peak memory); record it in docs/BENCHMARKS.md."""
import re

import pytest
import torch

from conftest import run_script, write_char_dataset
from model import GPT, GPTConfig
from runtime import device_peak_flops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ['--n_layer=2', '--n_head=4', '--n_embd=128', '--block_size=64', '--batch_size=8', '--eval_iters=4',
        '--log_interval=1', '--warmup_iters=2', '--learning_rate=3e-3', '--gradient_accumulation_steps=2',
        '--eval_interval=20', '--max_iters=20']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('char')))


def train(data, out, *flags, torchrun=0):
    args = ['train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, *flags]
    if torchrun:
        args = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}', *args]
    return run_script(*args, env={'OMP_NUM_THREADS': '4'})


def losses(stdout):
    return {int(l.split()[1]): float(l.split('| loss ')[1].split()[0]) for l in stdout.splitlines()
            if l.startswith('step ') and '| loss' in l}


def learns(stdout):
    l = losses(stdout)
    return len(l) == 20 and sum(list(l.values())[-3:]) / 3 < l[1] - 0.5


@pytest.mark.parametrize('flags', [['--device=cuda'], ['--dtype=float16'], ['--compile=False']],
                         ids=['bf16-compiled', 'fp16-gradscaler', 'eager'])
def test_one_gpu(data, tmp_path, flags):
    """`python train.py` on one GPU without torchrun (--device=cuda needs no index), bf16 and fp16 + GradScaler"""
    p = train(data, tmp_path, *flags)
    assert learns(p.stdout), p.stdout[-2000:]
    auto = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'  # V100, T4: fp16
    dtype = 'float16' if '--dtype=float16' in flags else auto
    assert f"device cuda:0, dtype {dtype}" in p.stdout
    if device_peak_flops(torch.device('cuda', 0), dtype):  # a GPU in the peak table: MFU is shown
        assert re.search(r'mfu \d', p.stdout), p.stdout[-1000:]


@pytest.mark.parametrize('fsdp', [False, True], ids=['ddp', 'fsdp2'])
def test_torchrun_one_process(data, tmp_path, fsdp):
    """under torchrun: nccl, DDP with the local rank's GPU, or FSDP2 on a CUDA mesh; the checkpoint resumes"""
    p = train(data, tmp_path, f'--fsdp={fsdp}', torchrun=1)
    assert learns(p.stdout) and '1 process(es)' in p.stdout, p.stdout[-2000:]
    q = run_script('train.py', '--init_from=resume', f'--out_dir={tmp_path}', '--max_iters=24')
    assert sorted(losses(q.stdout)) == [21, 22, 23, 24]


def test_fsdp_and_ddp_train_alike_in_bf16(data, tmp_path):
    """FSDP gathers block weights in bf16 but keeps the residual stream float32, as DDP with autocast: same losses
    up to the LayerNorm gains' bf16 rounding"""
    flags = ['--compile=False', '--dtype=bfloat16']
    ddp = losses(train(data, tmp_path / 'ddp', *flags, torchrun=1).stdout)
    fsdp = losses(train(data, tmp_path / 'fsdp', *flags, '--fsdp=True', torchrun=1).stdout)
    for k in ddp:
        assert fsdp[k] == pytest.approx(ddp[k], rel=5e-3, abs=5e-3), (k, fsdp[k], ddp[k])


def test_fsdp_float16_is_silent_and_learns(data, tmp_path):
    """FSDP in float16 (several V100s): the sharded GradScaler with DTensor gradients and fused AdamW learns, warns
    about nothing, and trains as DDP in float16 does"""
    flags = ['--compile=False', '--dtype=float16']
    p = train(data, tmp_path / 'fsdp', *flags, '--fsdp=True', torchrun=1)
    assert learns(p.stdout) and 'dtype float16' in p.stdout, p.stdout[-2000:]
    assert 'non-scalar tensor' not in p.stderr and 'UserWarning' not in p.stderr, p.stderr[-2000:]
    ddp = losses(train(data, tmp_path / 'ddp', *flags, torchrun=1).stdout)
    for k, v in losses(p.stdout).items():
        assert v == pytest.approx(ddp[k], rel=1e-2, abs=1e-2), (k, v, ddp[k])


def test_slurm_tasks_with_one_gpu_each_start(data, tmp_path):
    """srun --ntasks-per-node=2 --gpus-per-task=1 without torchrun: srun's variables (LOCAL_WORLD_SIZE=2 from
    SLURM_NTASKS_PER_NODE) and one visible GPU per task; both tasks take cuda:0 (the same GPU here, so gloo)"""
    import os
    import socket
    import subprocess
    import sys
    from conftest import REPO
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE')}
        env.update(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS='2', SLURM_NTASKS_PER_NODE='2',
                   CUDA_VISIBLE_DEVICES=os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0],
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='4', PYTHONUNBUFFERED='1')
        procs.append(subprocess.Popen([sys.executable, 'train.py', f'--data_dir={data}', f'--out_dir={tmp_path}',
                                       *TINY, '--max_iters=4', '--backend=gloo', '--compile=False'], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in out]
    assert 'device cuda:0' in out[0][0] and '2 process(es)' in out[0][0], out[0][0][-2000:]


def test_auto_batch_fits_the_gpt2_recipe_on_a_24gb_card(tmp_path):
    """config/train_gpt2.py (124M, block 1024, 491,520 tokens per step) with this GPU capped at 22 GB (a 24 GB card
    less its CUDA context): auto_batch picks a micro-batch that fits, keeps the tokens per step, and trains"""
    import os
    data = write_char_dataset(str(tmp_path / 'data'))
    os.remove(os.path.join(data, 'meta.json'))  # ids under 50257: a GPT-2 BPE vocabulary, the recipe's logits
    cap = 22e9 / torch.cuda.get_device_properties(0).total_memory
    p = run_script('-c', f"import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction({cap}); "
                         "sys.argv = sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')",
                   'train.py', 'config/train_gpt2.py', f'--data_dir={data}', f'--out_dir={tmp_path / "o"}',
                   '--max_iters=2', '--eval_iters=2', '--eval_interval=2', '--log_interval=1', '--compile=False')
    chosen = int(re.search(r'auto_batch: tried .*; using (\d+)', p.stdout).group(1))
    assert 1 <= chosen < 480 and 480 % chosen == 0, p.stdout[-2000:]
    assert f'tokens per step: 491,520 (1 process(es) x {480 // chosen} micro-steps x {chosen} x 1024)' in p.stdout
    assert len(losses(p.stdout)) == 2


@pytest.mark.parametrize('torchrun, flags', [(0, []), (1, ['--fsdp=True'])], ids=['compiled', 'fsdp-compiled'])
def test_compiled_run_with_evals_and_samples(data, tmp_path, torchrun, flags):
    """compiled, step 0's evals (a short last val batch) and samples before the first training step: the run learns,
    samples go through generate's compiled steps (FSDP: eager), and dynamo never reaches its recompile limit"""
    p = train(data, tmp_path, '--compile=True', '--eval_full=True', '--sample_interval=10', '--num_samples=2',
              '--sample_tokens=16', '--sample_prompt=Th', *flags, torchrun=torchrun)
    assert learns(p.stdout) and 'sample 1:' in p.stdout, p.stdout[-2000:]
    assert 'recompile_limit' not in p.stderr and 'cache_size_limit' not in p.stderr, p.stderr[-2000:]


def test_compile_on_and_off_agree_in_bf16(data, tmp_path):
    a = losses(train(data, tmp_path / 'c', '--compile=True').stdout)
    b = losses(train(data, tmp_path / 'e', '--compile=False').stdout)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=2e-2, abs=2e-2), (k, a[k], b[k])


def test_flash_attention_is_selected():
    """SM training attention (causal, no mask) runs on the flash kernel: with only flash allowed, it must not fail"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=256)).cuda()
    x = torch.randint(0, 512, (4, 256), device='cuda')
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast('cuda', dtype=torch.bfloat16):
        _, loss = model(x, x)
        loss.backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast('cuda', dtype=torch.bfloat16):
            model(x, x)[1].backward()
        torch.cuda.synchronize()
    names = ' '.join(e.name for e in prof.events()).lower()
    assert 'flash' in names, "the default SDPA dispatch did not pick the flash kernel"


def test_kv_cache_greedy_bf16_matches_float32():
    """greedy decoding in bf16 (eager and compiled with CUDA graphs) gives float32's tokens wherever float32's
    top-two margin is wider than bf16's rounding could close"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=64)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 / p.shape[1] ** 0.5 * 4)
    prompt = torch.randint(0, 97, (2, 5), device='cuda')
    ref = model.generate(prompt, 40, temperature=0)
    with torch.no_grad():  # float32 margins along the reference path
        logits = torch.stack([model(ref[:, :t])[0][:, -1] for t in range(5, 45)], 1).float()
    top2 = logits.topk(2, dim=-1).values
    safe = (top2[..., 0] - top2[..., 1] > 0.1).all(0)  # steps where both rows are decided
    n = int(safe.long().cumprod(0).sum())  # compare up to the first close call
    assert n >= 5, "the reference path has no confident steps; reseed the test"
    with torch.autocast('cuda', dtype=torch.bfloat16):
        eager = model.generate(prompt, 40, temperature=0)
        compiled = model.generate(prompt, 40, temperature=0, compile=True)
    assert torch.equal(eager[:, :5 + n], ref[:, :5 + n]) and torch.equal(compiled[:, :5 + n], ref[:, :5 + n])


def test_124m_benchmark_row():
    """GPT-2 124M, block 1024, bf16, compiled: the bench.py row to record (tokens/s, MFU, peak memory)"""
    p = run_script('bench.py', '--batch_size=16', '--iters=10', '--warmup_iters=3')
    print('\n' + p.stdout)
    assert re.search(r'\| SM .*\d+(\.\d+)?% ', p.stdout) or 'n/a' in p.stdout, p.stdout
