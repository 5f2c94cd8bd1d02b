"""
What every script needs around the model: the hardware decisions (device, dtype, GradScaler, compile, peak
FLOP/s), writing checkpoints atomically and reading them safely, loading a model from a checkpoint or from
GPT-2 weights, and reading batches from the memmapped token files.

The decisions are small pure functions of the facts (requested setting, ranks, visible GPUs, GPU name,
compute capability), so the tests run them over every hardware case on a CPU; the pick_* wrappers only
read the facts off this machine and call them.
"""

import contextlib
import json
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch

import files
from configurator import fail
from model import GPT, GPTConfig

# the oldest release the whole test suite passes on (2.9.1; on 2.6 FSDP2 fails on CPU, and torch.optim.Muon
# arrived in 2.9); CUDA builds of 2.9+ are what the GPU path is written against
MIN_TORCH = (2, 9)
if torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH:
    fail(f"this repo needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}; "
         f"pip install -U torch (on a CPU-only machine: pip install torch==2.13.0)")

# dense (not 2:4 sparse) tensor-core peaks, (bf16, fp16, tf32 / fp32) FLOP/s, None where the GPU has no such unit, from
# NVIDIA's data sheets (B200: the HGX B200 sheet, per GPU; H100 / H200: the Hopper sheets; A100, A10, A40, L4, L40,
# L40S, RTX A6000: each its own; GeForce: the GA102 and Ada whitepapers, with float32 accumulation, which PyTorch's
# matmuls use; V100, T4: no bf16, and float32 without TF32). Keyed by the exact name torch.cuda.get_device_name gives:
# a substring would give an "NVIDIA L40S" the L4's peak. A GPU not named here (the A10G: no NVIDIA data sheet) shows
# MFU n/a, never a wrong figure.
PEAK_FLOPS = {name: peaks for names, peaks in (
    (('NVIDIA B200',), (2250e12, 2250e12, 1100e12)),
    (('NVIDIA H100 80GB HBM3', 'NVIDIA H100', 'NVIDIA H100 SXM5 80GB', 'NVIDIA H200', 'NVIDIA H200 141GB HBM3e',
      'NVIDIA GH200 480GB', 'NVIDIA GH200 144G HBM3e'), (989e12, 989e12, 494e12)),
    (('NVIDIA H100 PCIe',), (756e12, 756e12, 378e12)),
    (('NVIDIA H100 NVL', 'NVIDIA H200 NVL'), (835e12, 835e12, 418e12)),
    (('NVIDIA A100-SXM4-40GB', 'NVIDIA A100-SXM4-80GB', 'NVIDIA A100-PCIE-40GB', 'NVIDIA A100 80GB PCIe',
      'NVIDIA A100-SXM-80GB'), (312e12, 312e12, 156e12)),
    (('NVIDIA L4',), (121e12, 121e12, 60e12)),
    (('NVIDIA L40',), (181e12, 181e12, 90.5e12)),
    (('NVIDIA L40S',), (362e12, 362e12, 183e12)),
    (('NVIDIA A10',), (125e12, 125e12, 62.5e12)),
    (('NVIDIA A40',), (149.7e12, 149.7e12, 74.8e12)),
    (('NVIDIA RTX A6000',), (154.8e12, 154.8e12, 77.4e12)),
    (('NVIDIA GeForce RTX 4090',), (165.2e12, 165.2e12, 82.6e12)),
    (('NVIDIA GeForce RTX 3090',), (71e12, 71e12, 35.6e12)),
    (('Tesla V100-SXM2-16GB', 'Tesla V100-SXM2-32GB'), (None, 125e12, 15.7e12)),
    (('Tesla V100-PCIE-16GB', 'Tesla V100-PCIE-32GB'), (None, 112e12, 14e12)),
    (('Tesla V100S-PCIE-32GB',), (None, 130e12, 16.4e12)),
    (('Tesla T4',), (None, 65e12, 8.1e12))) for name in names}


# -- the decisions (pure: every hardware case is a test on a CPU) -----------------------------------------

def choose_device(requested, local_rank=0, local_world_size=None, world_size=1, n_cuda=0, has_mps=False):
    """The one device of this process, as a torch.device with an index on CUDA. local_world_size is the number of
    processes on this node if the launcher says (torchrun does), None if unknown. Raises ValueError with the fix."""
    if requested == 'auto':
        requested = 'cuda' if n_cuda else 'mps' if has_mps else 'cpu'
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == 'cpu':
        return torch.device('cpu')
    if device.type == 'mps':
        if not has_mps:
            raise ValueError(f"device '{requested}' asked for but MPS is not available here; use --device=auto or cpu")
        if world_size > 1:
            raise ValueError("several processes on MPS are not supported (gloo cannot reduce MPS tensors); "
                             "run one process, or use --device=cpu")
        return torch.device('mps')
    if device.type != 'cuda':
        raise ValueError(f"unsupported device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    if n_cuda == 0:
        raise ValueError(f"device '{requested}' asked for but CUDA is not available here; use --device=auto or cpu")
    if device.index is not None:  # an explicit GPU
        if device.index >= n_cuda:
            raise ValueError(f"device '{requested}' but only {n_cuda} GPU(s) are visible (cuda:0..cuda:{n_cuda - 1}); "
                             f"pick one of those or check CUDA_VISIBLE_DEVICES")
        if world_size > 1 and local_world_size != 1:
            raise ValueError(f"--device={requested} would put every process of this node on one GPU; under torchrun "
                             f"or srun use --device=cuda and each process takes the GPU of its local rank")
        return device
    if world_size == 1 or n_cuda == 1:
        # one GPU visible to a process of several: srun --gpus-per-task=1 shows each task only its own, whatever the
        # number of tasks on the node (LOCAL_WORLD_SIZE), so it is this process's GPU
        return torch.device('cuda', 0)
    if local_world_size is not None and local_world_size > n_cuda:
        raise ValueError(f"{local_world_size} processes on this node but only {n_cuda} GPU(s) visible; start at most "
                         f"{n_cuda} (--nproc_per_node={n_cuda})")
    if local_rank >= n_cuda:
        raise ValueError(f"local rank {local_rank} but only {n_cuda} GPU(s) visible; start at most {n_cuda} "
                         f"processes per node")
    return torch.device('cuda', local_rank)


def choose_dtype(requested, device_type, bf16_native=True):
    """'auto' -> bfloat16 where the device computes it natively, float16 on older GPUs (V100, T4: with a GradScaler,
    see grad_scaler), float32 on CPU and on MPS without bf16. bf16_native: the device has bf16 units (not emulation)."""
    if requested == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if bf16_native else 'float16'
        return 'bfloat16' if device_type == 'mps' and bf16_native else 'float32'
    if requested not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"unsupported dtype '{requested}'; use auto, float32, bfloat16 or float16")
    if requested == 'float16' and device_type == 'cpu':
        raise ValueError("dtype float16 is for GPUs; on cpu use float32 or bfloat16")
    if requested == 'bfloat16' and not bf16_native and device_type == 'mps':
        raise ValueError("this Mac's MPS has no bfloat16 (needs macOS 14+); use float32")
    return requested


def choose_ns_dtype(device_type, bf16_native):
    """the dtype of Muon's Newton-Schulz matmuls: bfloat16 where the device multiplies it natively (the iteration
    tolerates its precision, and it halves the traffic), float32 elsewhere: a CPU without AVX512-BF16 or AMX converts
    every element, and there a bfloat16 matmul runs 8-10x slower than a float32 one (reported on an AVX2-only AMD
    Zen 2, where Muon's step took 14x AdamW's with bfloat16 iterations)"""
    if device_type not in ('cuda', 'cpu', 'mps'):
        raise ValueError(f"unknown device type '{device_type}'")
    return 'bfloat16' if bf16_native else 'float32'


def cpu_bf16_native(flags):
    """a CPU computes bfloat16 in hardware with AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+) or AMX (Sapphire
    Rapids+); flags as /proc/cpuinfo names them. Others (AVX2-only x86, Arm as torch uses it here) emulate it."""
    return bool({'avx512_bf16', 'amx_bf16'} & set(flags))


def choose_compile(requested, device_type, capability=None):
    """torch.compile or not: None (auto) = on for CUDA GPUs that Triton supports (compute capability 7.0+), off on
    CPU and MPS, where compiling costs more than it saves for most runs (measured in docs/BENCHMARKS.md)."""
    triton_ok = device_type == 'cuda' and capability is not None and tuple(capability) >= (7, 0)
    if requested is None:
        return triton_ok
    if requested not in (True, False):
        raise ValueError(f"compile must be True, False or None (auto), got {requested!r}")
    if requested and device_type == 'cuda' and not triton_ok:
        raise ValueError(f"torch.compile needs a GPU of compute capability 7.0 or newer (this one: {capability}); "
                         f"use --compile=False")
    return requested


def grad_scaler(device_type, dtype, sharded=False):
    """loss scaling only for float16 (its range underflows small gradients); the sharded scaler agrees on inf/NaN
    across processes, each of which sees only its shard"""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device_type, enabled=dtype == 'float16')
    return torch.amp.GradScaler(device_type, enabled=dtype == 'float16')


def peak_flops(gpu_name, dtype):
    """dense peak FLOP/s of this GPU for dtype (float32 counts TF32, which pick_device turns on), or None:
    CPU, MPS, an unknown GPU, or a dtype the GPU has no unit for. MFU is then not shown."""
    if not gpu_name:
        return None
    column = {'bfloat16': 0, 'float16': 1, 'float32': 2}[dtype]
    return PEAK_FLOPS.get(gpu_name.strip(), (None,) * 3)[column]


# -- reading the facts off this machine -----------------------------------------------------------------

def pick_device(requested):
    """choose_device with this process's launcher variables and visible hardware; the device is made current
    (so every later CUDA call without an index lands on it) and float32 matmuls may use TF32 there."""
    env = os.environ
    try:
        device = choose_device(requested, int(env.get('LOCAL_RANK', 0)),
                               int(env['LOCAL_WORLD_SIZE']) if 'LOCAL_WORLD_SIZE' in env else None,
                               int(env.get('WORLD_SIZE', 1)), torch.cuda.device_count(),
                               torch.backends.mps.is_available())
    except ValueError as e:
        fail(str(e))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 for what autocast leaves in float32
    return device


def bf16_native(device):
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)  # the default counts slow emulation
    if device.type == 'mps':
        return torch.backends.mps.is_macos_or_newer(14, 0)
    return cpu_bf16_native(cpu_flags())


def cpu_flags():
    """this CPU's feature flags: /proc/cpuinfo's (Linux), and torch's own probes where it has them (any OS)"""
    flags = set()
    try:
        flags.update(next((l.split(':', 1)[1].split() for l in open('/proc/cpuinfo') if l.startswith('flags')), []))
    except OSError:
        pass
    for flag, probe in (('avx512_bf16', '_is_avx512_bf16_supported'), ('amx_bf16', '_is_amx_tile_supported')):
        if getattr(torch.cpu, probe, lambda: False)():
            flags.add(flag)
    return flags


def ns_dtype(device):
    """Muon's Newton-Schulz dtype on this device (choose_ns_dtype)"""
    return getattr(torch, choose_ns_dtype(device.type, bf16_native(device)))


def pick_dtype(requested, device):
    try:
        return choose_dtype(requested, device.type, bf16_native(device))
    except ValueError as e:
        fail(str(e))


def pick_compile(requested, device):
    try:
        return choose_compile(requested, device.type,
                              torch.cuda.get_device_capability(device) if device.type == 'cuda' else None)
    except ValueError as e:
        fail(str(e))


def device_peak_flops(device, dtype):
    return peak_flops(torch.cuda.get_device_name(device) if device.type == 'cuda' else None, dtype)


def sync(device):
    """wait for the device's queued work (timing needs it; CPU work is already done)"""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def autocast(device_type, dtype):
    """mixed-precision context for the forward pass; a no-op in float32"""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# -- checkpoints ------------------------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to a temp name, fsync, then rename: a crash at any moment leaves the old file or the new one.
    A failed write (disk full) removes the temp file and raises OSError with one line saying why."""
    folder, name = os.path.split(os.path.abspath(path))
    for stale in os.listdir(folder):  # temp files of writers that were killed mid-write
        if stale.startswith(name + '.tmp.'):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, stale))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # torch.save reports a full disk as a RuntimeError chained to the OSError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else e
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0][:160]
        raise OSError(f"could not write {path} ({reason}); the previous file there is unchanged") from None
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def load_checkpoint(path):
    """torch.load with weights_only=True (tensors, numbers, strings, lists and dicts, never arbitrary pickles) and
    mmap=True (tensors are paged in from the file when used, not all read into RAM by every process)."""
    if os.path.isdir(path):
        fail(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train one first, or point --out_dir at the run's directory")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if 'weights_only' in str(e) or 'Unsupported global' in str(e):
            first = "it holds Python objects that are not plain data, which could run code when loaded"
        fail(f"checkpoint {path} is corrupt, truncated or unsafe and was refused ({first})")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict) or not isinstance(ckpt.get('model_args'), dict):
        fail(f"{path} is not a checkpoint of this repo (no model / model_args dicts in it)")
    if 'attn_type' not in ckpt['model_args']:
        fail(f"{path} looks like a nanoGPT checkpoint (its model_args have no attn_type); this repo's model differs "
             f"(tanh GELU, padded vocabulary), so it is not loaded: train here, or export it to Hugging Face format "
             f"and use --init_from=that_directory")
    return ckpt


def model_from_checkpoint(ckpt, override_args=None, source='the checkpoint'):
    """GPT built from a checkpoint's model_args (plus overrides such as dropout) with its weights loaded; weights
    that do not fit the model_args (missing, extra or of another shape) are refused in one line. A LoRA run's
    checkpoint (adapters only) is loaded over its base and merged (lora.py)."""
    if 'lora' in ckpt:
        import lora
        return lora.from_checkpoint(ckpt, override_args, source)
    args = dict(ckpt['model_args'], **(override_args or {}))
    try:
        model = GPT(GPTConfig(**args))
    except (TypeError, ValueError) as e:
        fail(f"{source}: its model args are invalid ({e})")
    sd = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in ckpt['model'].items()}
    if any(torch.is_tensor(v) and v.dtype == torch.int8 for v in sd.values()):  # saved after quantize.quantize
        fail(f"{source}: its weights are int8-quantised (quantize.py makes them for decoding only, at load); train, "
             f"resume and export from the float checkpoint")
    want = model.state_dict()
    problems = [f"missing {k}" for k in want if k not in sd] + [f"unexpected {k}" for k in sd if k not in want]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, model_args give {tuple(v.shape)}"
                 for k, v in want.items() if k in sd and sd[k].shape != v.shape]
    if problems:
        fail(f"{source}: its weights do not fit its model_args ({problems[0]}"
             f"{f', and {len(problems) - 1} more' if len(problems) > 1 else ''}); was it written by this repo?")
    refuse_non_finite(sd, source, 'weights')
    model.load_state_dict(sd)
    return model


def refuse_non_finite(tensors, source, what):
    """weights (or optimizer state) holding NaN or inf are refused where they are loaded: sampled they give empty
    text, trained they give NaN, and neither says why"""
    bad = [k for k, v in tensors.items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        fail(f"{source}: NaN or inf in its {what} ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}), "
             f"so it cannot be used; take an earlier checkpoint (a run keeps ckpt_<step>.pt with --checkpoint_interval)")


def load_model(init_from, out_dir, device, override_args=None):
    """Model for sampling / evaluation: 'resume' reads out_dir/ckpt.pt, 'gpt2*' or a local HF GPT-2 directory
    goes through from_pretrained. Returns (model in eval mode on device, checkpoint dict or None)."""
    ckpt = None
    if init_from == 'resume':
        path = os.path.join(out_dir, 'ckpt.pt')
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, override_args, path)
    elif init_from.startswith('gpt2') or os.path.isdir(init_from):
        try:
            model = GPT.from_pretrained(init_from, override_args)
        except (OSError, ValueError) as e:
            fail(str(e))
        refuse_non_finite(model.state_dict(), init_from, 'weights')
    else:
        fail(f"unknown init_from '{init_from}'; use resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl "
             f"or a local Hugging Face GPT-2 directory")
    return model.eval().to(device), ckpt


def print0(*args, **kwargs):
    """print on rank 0 only (every process is rank 0 outside torchrun)"""
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs)
        sys.stdout.flush()


# -- a training run's surroundings: the launcher, wandb, the token files, the random generators, the log ------

def slurm_as_torchrun():
    """srun starting every task itself (no torchrun): its variables mapped onto torchrun's, so one code path
    serves both. MASTER_ADDR / MASTER_PORT come from the sbatch script."""
    env = os.environ
    if 'RANK' in env or int(env.get('SLURM_NTASKS', 1)) <= 1:
        return
    if not (env.get('MASTER_ADDR') and env.get('MASTER_PORT')):
        fail("several Slurm tasks but no MASTER_ADDR / MASTER_PORT: export them in the sbatch script before srun "
             "(MASTER_ADDR = the first node of the job)")
    env.update(RANK=env['SLURM_PROCID'], LOCAL_RANK=env.get('SLURM_LOCALID', '0'), WORLD_SIZE=env['SLURM_NTASKS'])
    if env.get('SLURM_NTASKS_PER_NODE', '').isdigit():
        env['LOCAL_WORLD_SIZE'] = env['SLURM_NTASKS_PER_NODE']


def check_launcher():
    """torchrun's variables come all together: RANK or WORLD_SIZE set by hand without the rest (MASTER_ADDR...) would
    fail deep in the process group's start, or quietly run one process as if it were one of several"""
    env, launch = os.environ, ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
    if 'RANK' not in env and 'WORLD_SIZE' not in env:
        return
    numbers = [env.get(k, '0') for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_PORT')]
    if not all(env.get(k) for k in launch) or not all(n.isdigit() for n in numbers) or int(numbers[0]) >= int(numbers[1]):
        fail(f"the launcher's variables are incomplete or inconsistent ({', '.join(f'{k}={env.get(k)}' for k in launch)}): start several "
             f"processes with torchrun (it sets them all), or unset {', '.join(k for k in launch if k in env)} to "
             f"train in one process")


def check_wandb():
    """the wandb module, once it is importable and has an API key (or logs offline); one line otherwise"""
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs the wandb package (pip install wandb), or set --wandb_log=False")
    if os.environ.get('WANDB_MODE') in ('offline', 'disabled', 'dryrun') or os.environ.get('WANDB_API_KEY'):
        return wandb
    try:
        logged_in = wandb.login(prompt=False)
    except Exception as e:  # a key that cannot be verified (no network), or a bad WANDB_* setting
        fail(f"wandb_log=True but W&B could not check its login ({str(e).strip().splitlines()[-1][:160]}); log "
             f"offline with WANDB_MODE=offline, or fix the W&B setup")
    if not logged_in:
        fail("wandb_log=True but no W&B API key is set: run `wandb login` (or set WANDB_API_KEY), or log "
             "offline with WANDB_MODE=offline")
    return wandb


def open_token_files(data_dir, dataset, block_size):
    """train.bin / val.bin memmapped once (uint16 token ids) and meta.json's char vocabulary (None for GPT-2 BPE);
    a missing, cut-short or too-small file and a damaged meta.json are each one line saying what to run"""
    repo = os.path.dirname(os.path.abspath(__file__))
    try:
        files.finish_pending(data_dir)  # a replacement of the dataset that its writer did not live to finish
    except OSError as e:
        fail(f"{data_dir} holds a half-done replacement of its dataset that cannot be finished ({files.why(e)}); "
             f"re-run the dataset's prepare.py")
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(path):
            how = f"python data/{dataset}/prepare.py" if os.path.isfile(os.path.join(repo, 'data', dataset, 'prepare.py')) \
                else f"python data/text/prepare.py --input=YOUR_FILES --name={dataset}"
            fail(f"dataset '{dataset}' is not prepared (no {split}.bin in {data_dir}); run: {how}")
        size = os.path.getsize(path)
        if size % 2:
            fail(f"{path} has an odd number of bytes ({size}), so it is not uint16 token ids (cut short?); "
                 f"re-run the dataset's prepare.py")
        if size <= 2 * (block_size + 1):
            fail(f"{path} has {size // 2} tokens, fewer than one block ({block_size} + 1); use a smaller "
                 f"--block_size or more data")
    meta, path = None, os.path.join(data_dir, 'meta.json')
    if os.path.exists(path):
        try:
            meta = json.load(open(path, encoding='utf-8'))
        except (ValueError, UnicodeDecodeError) as e:
            fail(f"{path} is not valid JSON ({str(e)[:80]}); re-run the dataset's prepare.py")
        if not (isinstance(meta, dict) and isinstance(meta.get('itos'), list) and meta.get('vocab_size') == len(meta['itos'])
                and all(isinstance(c, str) for c in meta['itos'])):
            fail(f"{path} must hold vocab_size and itos (the character vocabulary, as strings); re-run the dataset's "
                 f"prepare.py")
    return {s: np.memmap(os.path.join(data_dir, f'{s}.bin'), dtype=np.uint16, mode='r') for s in ('train', 'val')}, meta


def rng_state(device_type):
    """this process's random generators as plain tensors and lists (a checkpoint loads them with weights_only)"""
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            'numpy': [torch.from_numpy(np_state[1].astype(np.int64)), list(np_state[2:])],
            'python': [random.getstate()[0], list(random.getstate()[1])]}


def set_rng_state(state, device_type):
    torch.set_rng_state(state['torch'])
    if device_type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'])
    np.random.set_state(('MT19937', state['numpy'][0].numpy().astype(np.uint32), *state['numpy'][1]))
    random.setstate((state['python'][0], tuple(state['python'][1]), None))


def compile_static(fn, mode=None):
    """torch.compile for the training step, with static shapes: step 0's evals (and a short last eval batch) run
    through the same code before the first training step, and having seen other sizes there dynamo would compile the
    training step for dynamic shapes. Static, each shape has its own graph: the step's, the evals' (a few, bounded)."""
    return torch.compile(fn, mode=mode, dynamic=False)


def compile_scoring(model):
    """torch.compile for HellaSwag's forward passes: a graph of their own, dynamic in the length (one or two graphs
    for every length), apart from the training step's"""
    return torch.compile(model, dynamic=True)


def fsdp_shard(model, device_type, dtype, world_size, compile_mode=None):
    """FSDP2 over all processes: each block is a unit (its weights gathered just for its forward / backward), then
    the root, which owns the embeddings, ln_f and the tied wte / lm_head weight (one parameter, sharded once, so it
    stays tied). A block's weights are gathered in `dtype` but its input is not cast, so the residual stream stays
    float32 as under DDP with autocast; the root keeps float32 weights, which autocast casts for the head as under
    DDP; gradients are reduced in float32. (Left different from DDP: LayerNorm gains are rounded to `dtype`.)
    compile_mode (None = no compile): per block and the head, before sharding; dynamo does not trace into FSDP's
    hooks, so compiling the root would cover neither the head nor the loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if compile_mode:  # static shapes (see compile_static); samples and HellaSwag run eager under FSDP (train.py)
        for block in model.transformer.h:
            block.compile(mode=compile_mode, dynamic=False)
        model.head = compile_static(model.head, compile_mode)
    mesh = init_device_mesh(device_type, (world_size,))  # explicit: torch would otherwise pick the build's accelerator
    blocks = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=blocks)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    # the logits are a view (the padded vocabulary sliced off, no copy); FSDP warns in case a caller modifies them
    # in place, which nothing here does
    warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')


def leave_processes(code):
    """leave the process group and end this process with exit status `code`, skipping the interpreter's teardown:
    FSDP keeps the group referenced after destroy_process_group, so its gloo threads would be stopped during
    teardown, which can abort (SIGABRT) a run that has finished"""
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop_on_signals(rank):
    """SIGTERM / SIGINT (preemption, Ctrl-C) set flag['stop']: the loop checkpoints at the next step boundary and
    exits cleanly. A second Ctrl-C stops at once."""
    flag = {'stop': False}

    def request(signum, frame):
        if flag['stop'] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag['stop'] = True
        print(f"[rank {rank}] got signal {signum}: checkpointing at the end of this step", file=sys.stderr)

    signal.signal(signal.SIGTERM, request)
    signal.signal(signal.SIGINT, request)
    return flag


def load_optimizer_state(model, optimizers, state, sharded, path):
    """a checkpoint's optimizer state, keyed by parameter name with whole tensors (any world size, sharded or not,
    reads it); an earlier version's plain state_dict (parameters numbered) is read into the one AdamW"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    refuse_non_finite({f"{n}.{k}": v for n, values in state['state'].items() for k, v in values.items()}, path,
                      'optimizer state')
    if state['param_groups'] and isinstance((state['param_groups'][0]['params'] or [''])[0], int):
        if sharded or len(optimizers) > 1:
            fail(f"{path} is in an older format: resume it once with one process and AdamW, then as you wish")
        optimizers[0].load_state_dict(state)
    else:
        set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=sharded))


def unscale(scaler, optimizers):
    """scaler.unscale_ for each optimizer, before clipping. Under FSDP in float16, torch's ShardedGradScaler hands its
    found_inf, shaped (1,), to the unscale kernel with the DTensor gradients, and DTensor warns on every step that it
    takes it as replicated. That is right (each process checks its own shards, then the scaler sums found_inf over the
    processes), so that one warning is dropped here and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Found a non-scalar tensor with numel=1 and ndim!=0')
        for opt in optimizers:
            scaler.unscale_(opt)


def step_optimizers(optimizers, scaler, finite):
    """apply the step unless the loss or gradients were not finite (`finite`, a tensor on the device), the gradients
    already unscaled (scaler.unscale_). Optimizers that read found_inf (fused AdamW, muon.Muon) skip it on the device
    with no host sync, all of them together: with two, the GradScaler's per-optimizer check would step the one whose
    own gradients were finite, after clipping by a NaN norm had made them NaN. Otherwise (unfused AdamW) the GradScaler
    skips it (float16), or one sync decides."""
    if all(getattr(opt, '_step_supports_amp_scaling', False) for opt in optimizers):
        for opt in optimizers:
            opt.found_inf = (~finite).float()
            opt.step()
            del opt.found_inf  # as the GradScaler does: a later step() taken elsewhere is not skipped by this one's
        if scaler.is_enabled():
            scaler.update()  # from the inf checks unscale_ recorded: the scale backs off after an overflow
    elif scaler.is_enabled():
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
    elif finite.item():
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def append_log(path, record, wandb=None):
    """one record, every key always present, appended to log.jsonl (and sent to wandb)"""
    full = {k: record.get(k) for k in ('iter', 'loss', 'train_loss', 'val_loss', 'hellaswag', 'lr', 'grad_norm',
                                       'tokens_per_sec', 'mfu', 'time')}
    full['time'] = time.time()
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(full) + '\n')
    except OSError as e:  # a full disk: the checkpoints are whole, and resuming drops a record cut short
        fail(f"could not append to {path} ({files.why(e)}); free some space and continue with --init_from=resume")
    if wandb:
        wandb.log({k: v for k, v in full.items() if v is not None and k != 'iter'}, step=full['iter'])


def trim_log(path, iter_num):
    """a resumed run's log.jsonl keeps the records up to its checkpoint: later steps, and the evals at the
    checkpoint's step, run again. Lines cut short by a crash are dropped."""
    kept = []
    for line in open(path, encoding='utf-8', errors='replace') if os.path.exists(path) else []:
        try:
            r = json.loads(line)
            if r['iter'] < iter_num or (r['iter'] == iter_num and r['loss'] is not None):
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    try:
        files.write_files(os.path.dirname(os.path.abspath(path)), {os.path.basename(path): ''.join(kept).encode()})
    except OSError as e:
        fail(str(e))


# -- batches ----------------------------------------------------------------------------------------------

def eval_offsets(n_tokens, block_size, batch_size, eval_iters, full, seed, rank=0, world_size=1):
    """[(start offsets, weight)] one process evaluates on a split of n_tokens: eval_iters random batches (the same
    ones at every eval), or with full=True every non-overlapping block once. Every process gets as many batches
    (under FSDP all take part in every forward); the padding ones have weight 0. Weights count blocks, so the
    weighted mean over all processes is exact."""
    if full:
        blocks = torch.arange((n_tokens - 1) // block_size) * block_size
        mine, n = list(blocks[rank::world_size].split(batch_size)), -(-len(blocks[0::world_size]) // batch_size)
    else:
        mine = list(draw_offsets(torch.Generator().manual_seed(seed + 1), n_tokens, block_size, eval_iters, batch_size,
                                 rank, world_size))
        n = -(-eval_iters // world_size) if eval_iters >= world_size else eval_iters
    return [(b, len(b)) for b in mine] + [(mine[-1] if mine else torch.zeros(1, dtype=torch.long), 0)] * (n - len(mine))


def draw_offsets(generator, n_tokens, block_size, n_micro, batch_size, rank=0, world_size=1):
    """Start offsets of n_micro micro-batches of batch_size windows (block_size + 1 tokens each) in n_tokens,
    drawn at once from generator, which is the same on every process. Returns this process's share, the
    micro-batches rank, rank + world_size, ...: a (n_micro / world_size, batch_size) LongTensor (the first
    n_micro % world_size ranks get one more). So the data, and the generator's next state, are the same
    whatever the world size. Fewer micro-batches than processes (a small eval): every process gets them all."""
    offsets = torch.randint(n_tokens - block_size - 1, (n_micro, batch_size), generator=generator)
    return offsets[rank::world_size] if n_micro >= world_size else offsets


def read_batch(data, offsets, block_size, device, vocab_size=None):
    """x, y (len(offsets), block_size) on device: the block_size + 1 tokens at each start offset of a uint16
    array (a memmap opened once), in one gather. With vocab_size, an id outside it raises ValueError."""
    tok = data[offsets.numpy()[:, None] + np.arange(block_size + 1)]
    if vocab_size is not None and tok.max() >= vocab_size:
        raise ValueError(f"holds token id {int(tok.max())} but the model's vocabulary has {vocab_size}")
    t = torch.from_numpy(tok.astype(np.int64))
    if torch.device(device).type == 'cuda':  # pinned memory: the copy runs async while the GPU computes
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
