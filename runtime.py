"""
What every script needs around the model: picking the device and dtype, the peak FLOP/s the MFU is
measured against, writing checkpoints atomically, reading them safely, and loading a model from a
checkpoint or from GPT-2 weights.
"""

import contextlib
import os
import sys

import numpy as np
import torch

from configurator import fail
from model import GPT, GPTConfig

# dense bf16 peak FLOP/s by device name, so MFU is measured against the GPU actually used
# (first match wins, so the PCIe / NVL H100s come before the SXM one)
PEAK_BF16_FLOPS = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'A100': 312e12,
                   'L40S': 362e12, 'A10G': 125e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12}


def pick_device(device):
    """'auto' -> cuda, else mps, else cpu. Anything else must be a device torch knows and has.
    On CUDA it also lets float32 matmuls use TF32 tensor cores (what is left outside bf16 autocast)."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        kind = torch.device(device).type
    except RuntimeError:
        fail(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if kind == 'cuda' and not torch.cuda.is_available():
        fail(f"device '{device}' asked for but CUDA is not available here; use --device=auto or --device=cpu")
    if kind == 'mps' and not torch.backends.mps.is_available():
        fail(f"device '{device}' asked for but MPS is not available here; use --device=auto or --device=cpu")
    if kind not in ('cpu', 'cuda', 'mps'):
        fail(f"unsupported device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if kind == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def pick_dtype(dtype, device_type):
    """'auto' -> bfloat16 where the device has it, else float16 on cuda (with a GradScaler), float32 on cpu."""
    if dtype == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        return 'bfloat16' if device_type == 'mps' else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        fail(f"unsupported dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    if dtype == 'float16' and device_type == 'cpu':
        fail("dtype float16 is not supported for training on cpu; use float32 or bfloat16")
    return dtype


def autocast(device_type, dtype):
    """mixed-precision context for the forward pass; a no-op in float32"""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def peak_flops(device):
    """dense bf16 peak of this GPU from PEAK_BF16_FLOPS, or None (cpu, mps, unknown GPU: MFU is not shown)"""
    if torch.device(device).type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def save_atomic(obj, path):
    """torch.save to a temp name, fsync, then rename: a crash at any moment leaves the old file or the new one."""
    folder, name = os.path.split(os.path.abspath(path))
    for stale in os.listdir(folder):  # temp files of writers that were killed mid-write
        if stale.startswith(name + '.tmp.'):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, stale))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts, never arbitrary pickles."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train one first, or point --out_dir at the run's directory")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        fail(f"checkpoint {path} is corrupt, truncated or unsafe and was refused ({first})")
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        fail(f"checkpoint {path} is not one of this repo's checkpoints (no model / model_args)")
    return ckpt


def model_from_checkpoint(ckpt, override_args=None):
    """GPT built from a checkpoint's model_args (plus overrides such as dropout) with its weights loaded."""
    args = dict(ckpt['model_args'], **(override_args or {}))
    try:
        model = GPT(GPTConfig(**args))
    except (TypeError, ValueError) as e:
        fail(f"checkpoint model args are invalid: {e}")
    sd = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in ckpt['model'].items()}
    model.load_state_dict(sd)
    return model


def load_model(init_from, out_dir, device, override_args=None):
    """Model for sampling / evaluation: 'resume' reads out_dir/ckpt.pt, 'gpt2*' or a local HF GPT-2 directory
    goes through from_pretrained. Returns (model in eval mode on device, checkpoint dict or None)."""
    ckpt = None
    if init_from == 'resume':
        ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
        model = model_from_checkpoint(ckpt, override_args)
    elif init_from.startswith('gpt2') or os.path.isdir(init_from):
        try:
            model = GPT.from_pretrained(init_from, override_args)
        except (OSError, ValueError) as e:
            fail(str(e))
    else:
        fail(f"unknown init_from '{init_from}'; use resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl "
             f"or a local Hugging Face GPT-2 directory")
    return model.eval().to(device), ckpt


def print0(*args, **kwargs):
    """print on rank 0 only (every process is rank 0 outside torchrun)"""
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs)
        sys.stdout.flush()


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
