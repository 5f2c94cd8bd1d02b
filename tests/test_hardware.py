"""The hardware decisions of runtime.py as decision tables over every case a user meets (one GPU, torchrun on
8 GPUs, two nodes, srun with one GPU per task, explicit cuda:N, V100 / T4 / A100 / H100, MPS, CPU), and the thin
wrappers that read the facts off the machine, with CUDA's queries faked so the GPU lines run here."""
import os

import pytest
import torch

import runtime
from runtime import (choose_compile, choose_device, choose_dtype, choose_ns_dtype, cpu_bf16_native, grad_scaler,
                     peak_flops)

cuda = lambda i: torch.device('cuda', i)

# (requested, local_rank, local_world_size, world_size, visible GPUs, MPS) -> device, or a piece of the error
DEVICE_CASES = [
    # one process
    (('auto', 0, None, 1, 1, False), cuda(0)),  # `python train.py` on a one-GPU box
    (('cuda', 0, None, 1, 1, False), cuda(0)),  # the same with --device=cuda (torch.cuda.set_device needs an index)
    (('cuda', 0, None, 1, 4, False), cuda(0)),
    (('cuda:2', 0, None, 1, 4, False), cuda(2)),
    (('cuda:1', 0, None, 1, 1, False), 'only 1 GPU(s) are visible'),
    (('auto', 0, None, 1, 0, False), torch.device('cpu')),
    (('cpu', 0, None, 1, 8, False), torch.device('cpu')),
    (('auto', 0, None, 1, 0, True), torch.device('mps')),
    (('mps', 0, None, 1, 0, False), 'MPS is not available'),
    (('cuda', 0, None, 1, 0, False), 'CUDA is not available'),
    (('tpu', 0, None, 1, 0, False), "device 'tpu'"),
    (('cuda:x', 0, None, 1, 1, False), "unknown device 'cuda:x'"),
    # torchrun, one node of 8 GPUs: each local rank its own GPU
    *[(('auto', r, 8, 8, 8, False), cuda(r)) for r in range(8)],
    *[(('cuda', r, 8, 8, 8, False), cuda(r)) for r in (0, 5)],
    # two nodes of 8: global rank 12 is local rank 4
    (('cuda', 4, 8, 16, 8, False), cuda(4)),
    # srun with --gpus-per-task=1: every task sees one GPU, its own, as cuda:0 (local ranks 0..7)
    *[(('auto', r, None, 8, 1, False), cuda(0)) for r in (0, 1, 7)],
    # the same with LOCAL_WORLD_SIZE=8 from SLURM_NTASKS_PER_NODE (srun --ntasks-per-node=8 --gpus-per-task=1)
    *[((req, r, 8, 16, 1, False), cuda(0)) for req in ('auto', 'cuda') for r in (0, 3, 7)],
    # srun with all 8 GPUs visible to every task (no LOCAL_WORLD_SIZE): the local rank picks
    (('cuda', 3, None, 8, 8, False), cuda(3)),
    (('cuda', 3, None, 8, 2, False), 'local rank 3 but only 2 GPU(s)'),
    (('auto', 0, 4, 4, 2, False), '4 processes on this node but only 2 GPU(s)'),
    # an explicit index under torchrun would put every process on that GPU
    (('cuda:1', 0, 2, 2, 2, False), 'every process of this node on one GPU'),
    (('cuda:0', 0, 1, 4, 1, False), cuda(0)),  # one process per node: allowed
    # CPU / MPS under a launcher
    (('cpu', 1, 2, 2, 0, False), torch.device('cpu')),
    (('auto', 1, 2, 2, 0, False), torch.device('cpu')),
    (('mps', 0, 2, 2, 0, True), 'several processes on MPS'),
]


@pytest.mark.parametrize('args, want', DEVICE_CASES)
def test_choose_device(args, want):
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want.replace('(', r'\(').replace(')', r'\)')):
            choose_device(*args)
    else:
        got = choose_device(*args)
        assert got == want and (got.type != 'cuda' or got.index is not None)


# (requested, device type, native bf16) -> dtype or error; the GradScaler is on exactly for float16
DTYPE_CASES = [
    (('auto', 'cuda', True), 'bfloat16'),  # A100, H100, H200, L4, RTX 30xx / 40xx
    (('auto', 'cuda', False), 'float16'),  # V100, T4: emulated bf16 would be slow
    (('bfloat16', 'cuda', False), 'bfloat16'),  # asked for explicitly: allowed (emulated)
    (('float16', 'cuda', True), 'float16'),
    (('float32', 'cuda', True), 'float32'),
    (('auto', 'cpu', True), 'float32'),
    (('bfloat16', 'cpu', True), 'bfloat16'),
    (('float16', 'cpu', True), 'float16 is for GPUs'),
    (('auto', 'mps', True), 'bfloat16'),  # macOS 14+
    (('auto', 'mps', False), 'float32'),
    (('bfloat16', 'mps', False), 'needs macOS 14'),
    (('float8', 'cuda', True), "unsupported dtype 'float8'"),
]


@pytest.mark.parametrize('args, want', DTYPE_CASES)
def test_choose_dtype_and_scaler(args, want):
    if want not in ('bfloat16', 'float16', 'float32'):
        with pytest.raises(ValueError, match=want):
            choose_dtype(*args)
        return
    assert choose_dtype(*args) == want
    assert grad_scaler('cpu', want).is_enabled() == (want == 'float16')  # built for cpu here: no GPU to build on


# Muon's Newton-Schulz dtype: (CPU flags as /proc/cpuinfo names them, or a GPU's bf16 fact) -> dtype
ZEN2 = 'fpu sse2 avx avx2 fma sha_ni'.split()  # AVX2 only: bf16 emulated (issue 25: Muon 14x slower per step)
ZEN4 = ZEN2 + 'avx512f avx512bw avx512_bf16'.split()  # this repo's CI machine (AMD EPYC): native bf16 dot products
SAPPHIRE_RAPIDS = ZEN2 + 'avx512f avx512_bf16 amx_tile amx_bf16 amx_int8'.split()
SKYLAKE_SP = ZEN2 + 'avx512f avx512bw avx512_vnni'.split()  # AVX-512 but no bf16 instructions
GRAVITON3 = 'fp asimd sve bf16 i8mm'.split()  # Arm's bf16 flag: not taken (torch's CPU matmul path is not measured)


@pytest.mark.parametrize('flags, device_type, bf16, want', [
    (ZEN2, 'cpu', False, 'float32'),
    (ZEN4, 'cpu', True, 'bfloat16'),
    (SAPPHIRE_RAPIDS, 'cpu', True, 'bfloat16'),
    (SKYLAKE_SP, 'cpu', False, 'float32'),
    (GRAVITON3, 'cpu', False, 'float32'),
    ([], 'cpu', False, 'float32'),  # no /proc/cpuinfo (macOS) and no torch probe: the safe choice
    (None, 'cuda', True, 'bfloat16'),  # A100, H100, H200, L4
    (None, 'cuda', False, 'float32'),  # V100, T4: bf16 emulated
    (None, 'mps', True, 'bfloat16'),  # macOS 14+
    (None, 'mps', False, 'float32'),
])
def test_choose_ns_dtype(flags, device_type, bf16, want):
    if flags is not None:
        assert cpu_bf16_native(flags) is bf16
    assert choose_ns_dtype(device_type, bf16) == want
    with pytest.raises(ValueError, match="unknown device type 'xla'"):
        choose_ns_dtype('xla', True)


def test_ns_dtype_on_this_machine():
    """the facts read here feed the same table: bfloat16 exactly where this CPU has AVX512-BF16 or AMX"""
    flags = runtime.cpu_flags()
    assert runtime.ns_dtype(torch.device('cpu')) == (torch.bfloat16 if {'avx512_bf16', 'amx_bf16'} & flags
                                                     else torch.float32)


@pytest.mark.parametrize('args, want', [
    ((None, 'cuda', (9, 0)), True), ((None, 'cuda', (8, 0)), True), ((None, 'cuda', (7, 0)), True),
    ((None, 'cuda', (6, 1)), False),  # Pascal: Triton cannot compile for it
    ((True, 'cuda', (6, 1)), 'compute capability 7.0'),
    ((False, 'cuda', (9, 0)), False),
    ((None, 'cpu', None), False), ((True, 'cpu', None), True), ((None, 'mps', None), False),
    (('yes', 'cpu', None), 'compile must be True, False or None'),
])
def test_choose_compile(args, want):
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            choose_compile(*args)
    else:
        assert choose_compile(*args) is want


@pytest.mark.parametrize('name, dtype, want', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12), ('NVIDIA H100 80GB HBM3', 'float32', 494e12),
    ('NVIDIA H100 PCIe', 'bfloat16', 756e12), ('NVIDIA H100 NVL', 'bfloat16', 835e12),
    ('NVIDIA H200', 'bfloat16', 989e12), ('NVIDIA GH200 480GB', 'bfloat16', 989e12),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312e12), ('NVIDIA A100 80GB PCIe', 'float16', 312e12),
    ('NVIDIA L40S', 'bfloat16', 362e12), ('NVIDIA L4', 'bfloat16', 121e12),
    ('Tesla V100-SXM2-16GB', 'float16', 125e12), ('Tesla V100-SXM2-16GB', 'bfloat16', None),  # no bf16 units
    ('Tesla T4', 'float16', 65e12), ('NVIDIA GeForce RTX 4090', 'bfloat16', 165.2e12),
    ('NVIDIA GeForce GTX 1080', 'bfloat16', None), (None, 'float32', None),  # unknown GPU, CPU: MFU not shown
    # names that contain another's: each its own data sheet, never the first substring's
    ('NVIDIA L40', 'bfloat16', 181e12), ('NVIDIA L40S', 'float32', 183e12), ('NVIDIA L4', 'float32', 60e12),
    ('NVIDIA A10', 'bfloat16', 125e12), ('NVIDIA A40', 'bfloat16', 149.7e12),
    ('NVIDIA RTX A6000', 'bfloat16', 154.8e12), ('NVIDIA H200 NVL', 'bfloat16', 835e12),
    ('NVIDIA H100 NVL', 'float32', 418e12), ('NVIDIA H100 PCIe', 'float32', 378e12),
    ('NVIDIA A100-SXM4-40GB', 'float32', 156e12), ('NVIDIA A100-PCIE-40GB', 'bfloat16', 312e12),
    ('NVIDIA GeForce RTX 3090', 'bfloat16', 71e12), ('Tesla V100-PCIE-32GB', 'float16', 112e12),
    ('Tesla V100S-PCIE-32GB', 'float32', 16.4e12),
    # no data sheet, or a cut-down or different chip whose name contains a known one: n/a
    ('NVIDIA A10G', 'bfloat16', None), ('NVIDIA GeForce RTX 4090 D', 'bfloat16', None),
    ('NVIDIA GeForce RTX 3090 Ti', 'bfloat16', None), ('NVIDIA L4 Tensor Core GPU', 'bfloat16', None),
    ('NVIDIA A100X', 'bfloat16', None), ('NVIDIA H800', 'bfloat16', None),
])
def test_peak_flops(name, dtype, want):
    assert peak_flops(name, dtype) == want


def test_pick_device_wires_the_launcher_and_makes_the_gpu_current(monkeypatch):
    """pick_device reads torchrun's variables and the visible GPUs, and makes its choice current on CUDA"""
    current = []
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: current.append(d))
    monkeypatch.setattr(torch, 'set_float32_matmul_precision', lambda p: current.append(p))
    for k, v in dict(RANK='11', LOCAL_RANK='3', WORLD_SIZE='16', LOCAL_WORLD_SIZE='8').items():
        monkeypatch.setenv(k, v)
    assert runtime.pick_device('cuda') == cuda(3)
    assert current == [cuda(3), 'high']
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')  # one process per node may name its GPU
    assert runtime.pick_device('cuda:5') == cuda(5)


@pytest.mark.parametrize('localid', ['0', '5', '7'])
def test_slurm_one_gpu_per_task_takes_its_gpu(monkeypatch, localid):
    """srun --ntasks-per-node=8 --gpus-per-task=1 python train.py: srun's variables mapped by slurm_as_torchrun
    (LOCAL_WORLD_SIZE=8) and one visible GPU per task: every task takes that GPU"""
    current = []
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: current.append(d))
    monkeypatch.setattr(torch, 'set_float32_matmul_precision', lambda p: None)
    monkeypatch.setattr(os, 'environ', dict(  # a copy: slurm_as_torchrun writes torchrun's variables into it
        SLURM_NTASKS='16', SLURM_NTASKS_PER_NODE='8', SLURM_PROCID=str(8 + int(localid)), SLURM_LOCALID=localid,
        MASTER_ADDR='node1', MASTER_PORT='29500'))
    runtime.slurm_as_torchrun()
    assert (os.environ['LOCAL_WORLD_SIZE'], os.environ['LOCAL_RANK']) == ('8', localid)
    assert runtime.pick_device('auto') == cuda(0) and current == [cuda(0)]


def test_bf16_check_excludes_emulation(monkeypatch):
    seen = {}

    def fake(including_emulation=True):
        seen['including_emulation'] = including_emulation
        return False  # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', fake)
    assert runtime.pick_dtype('auto', cuda(0)) == 'float16' and seen == {'including_emulation': False}


def test_every_script_picks_its_device_through_runtime():
    """sample.py, hellaswag.py, bench.py and train.py all select the device (so cuda:1 is current, not GPU 0)"""
    import os
    from conftest import REPO
    for script in ('train.py', 'sample.py', 'hellaswag.py', 'bench.py'):
        src = open(os.path.join(REPO, script)).read()
        assert 'pick_device(device)' in src and 'pick_dtype(dtype, device)' in src, script
        assert 'torch.cuda.synchronize()' not in src and 'max_memory_allocated()' not in src, script


def test_checkpoints_are_memory_mapped_not_read_whole(monkeypatch, tmp_path):
    """every process of a big run loads the checkpoint: mmap=True pages tensors in from the file on use"""
    torch.save({'model': {}, 'model_args': {'attn_type': 'SM'}}, tmp_path / 'ckpt.pt')
    seen = {}
    load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **k: seen.update(k) or load(*a, **k))
    runtime.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert seen.get('mmap') is True and seen.get('weights_only') is True


def test_too_old_torch_is_one_line():
    from conftest import run_script
    p = run_script('-c', "import torch; torch.__version__ = '2.5.1'; import runtime", check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith('error: this repo needs torch >= 2.9, found 2.5.1')
    assert len(p.stderr.strip().splitlines()) == 1
