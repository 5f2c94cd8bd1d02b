"""
Sizes that cannot fit are settings to lower, said in one line, never the allocator's traceback (or, worse, the kernel's
out-of-memory kill of a run that allocated a little at a time). train.py, sample.py and bench.py:

    check(parts, device, script)   before anything is allocated or written: stop in one line when the least memory the
                                   settings need ({what: (bytes, the settings to lower)}) exceeds the device's memory
    training(...) / sampling(...)  those parts, as lower bounds: counting only what is certain to be held at once
    params(n_layer, n_embd, block_size, vocab_size)   the GPT's parameter count, from its shape
    explain_oom(lower)             an out-of-memory error that gets past the estimates ends in one line naming `lower`

The estimates are lower bounds on purpose: a run they refuse cannot fit, and a run they let through that still does
not fit ends in explain_oom's line.
"""

import contextlib
import os
import re
import sys

import torch

from configurator import fail


def device_memory(device):
    """bytes of memory of the device: the GPU's, or the machine's RAM (a container's limit if lower) for the CPU"""
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == 'mps':
        return torch.mps.recommended_max_memory()
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
        with contextlib.suppress(OSError, ValueError):
            ram = min(ram, int(open(path).read()))  # 'max' (no limit) is not a number
    return ram


def params(n_layer, n_embd, block_size, vocab_size):
    """the GPT's weights from its shape (the biases and LayerNorms, a few thousandths, left out)"""
    return n_layer * 12 * n_embd ** 2 + ((vocab_size + 63) // 64 * 64 + block_size) * n_embd


def training(n_params, n_layer, n_embd, block_size, vocab_size, batch_size, dtype, optimizer='adamw', shards=1,
             activation_checkpointing=False, batches=1, trainable=None):
    """What one training process holds at least: float32 weights, and for the trainable ones (all by default)
    gradients and optimizer state (AdamW: two moments, Muon: one momentum; optimizer None: evaluation only, the
    weights alone), divided over shards under FSDP; a micro-batch's logits, kept in float32 for the loss, and its
    activations (the input of every block, and more kept per block unless activation checkpointing); `batches`
    micro-batches' start offsets, drawn at once."""
    trainable = n_params if trainable is None else trainable
    state = 4 * (n_params + trainable * {'adamw': 3, 'muon': 2, None: 0}[optimizer]) // shards
    elem = 4 if dtype == 'float32' else 2
    per_block = 0 if optimizer is None else 1 if activation_checkpointing else 8
    acts = batch_size * block_size * ((vocab_size + 63) // 64 * 64 * 4 + max(n_layer * per_block, 1) * n_embd * elem)
    return {'the weights and optimizer state': (state, "--n_layer or --n_embd (a smaller model)"),
            'one micro-batch': (acts, "--batch_size or --block_size" + (
                ", or set --activation_checkpointing=True" if per_block else '')),
            'the batch offsets': (8 * batch_size * batches, "--eval_iters or --gradient_accumulation_steps")}


def sampling(n_params, n_layer, n_embd, block_size, vocab_size, num_samples, tokens, dtype, rows='--num_samples'):
    """What generate() holds at least for num_samples rows (the flag `rows` sets them) of `tokens` (prompt + new):
    the weights, the KV cache (as long as the tokens, at most a block), the output ids, and one step's logits and
    noise in float32."""
    elem = 4 if dtype == 'float32' else 2
    return {'the weights': (4 * n_params, "the model's size"),
            'the KV cache': (2 * n_layer * num_samples * min(tokens, block_size) * n_embd * elem, rows),
            'the generated ids': (8 * num_samples * tokens, f"--max_new_tokens or {rows}"),
            'the logits': (8 * num_samples * (vocab_size + 63) // 64 * 64, rows)}


def check(parts, device, script):
    """stop in one line when the parts ({what: (bytes, settings to lower)}) cannot fit the device's memory"""
    need, have = sum(b for b, _ in parts.values()), device_memory(device)
    if need > have:
        what, (size, lower) = max(parts.items(), key=lambda kv: kv[1][0])
        fail(f"{script} needs at least {need / 1e9:,.1f} GB of memory on {device.type} but it has {have / 1e9:,.1f} GB "
             f"({what}: {size / 1e9:,.1f} GB of it); lower {lower}")


def explain_oom(lower):
    """From here on, an out-of-memory error (CUDA's, the CPU allocator's, MPS's) that reaches the top ends the script
    with one line naming the settings to lower; any other error is reported as usual."""
    def hook(kind, e, tb):
        text = str(e)
        if issubclass(kind, (torch.OutOfMemoryError, MemoryError)) or (
                issubclass(kind, RuntimeError) and ("can't allocate memory" in text or 'out of memory' in text)):
            asked = re.search(r'[Tt]ried to allocate ([\d.]+ ?[A-Za-z]+)', text)
            print(f"error: out of memory{f' (an allocation of {asked.group(1)} failed)' if asked else ''}; lower {lower}",
                  file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)  # no teardown: a process group or a half-built model has nothing left to save
        sys.__excepthook__(kind, e, tb)
    sys.excepthook = hook
