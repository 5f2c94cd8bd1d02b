"""
Benchmarks, each one command that prints a small table:
$ python bench.py                                  # training step: ms/iter, tokens/s, MFU, peak memory
$ python bench.py --attn_type=SM,GK,GKpoly-8,PA_relu --n_layer=6 --n_embd=384 --n_head=6 --block_size=256
$ python bench.py --profile=True                   # also writes a PyTorch profiler trace (chrome://tracing)
$ python bench.py --mode=sample                    # KV-cache vs full-recompute generation
"""

import os
import resource
import time

import numpy as np
import torch

from configurator import configure, fail
from model import GPT, GPTConfig
from runtime import autocast, peak_flops, pick_device, pick_dtype

# -----------------------------------------------------------------------------
mode = 'train'  # 'train': optimizer steps; 'sample': generation with and without the KV cache
batch_size = 12
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50257
bias = False
attn_type = 'SM'  # one attention, or several separated by commas for one row each
real_data = False  # True: batches from data/<dataset>/train.bin; False: random tokens
dataset = 'openwebtext'
warmup_iters = 5  # untimed steps first (compilation, allocator warm-up)
iters = 20  # timed steps
max_new_tokens = 500  # sample mode: tokens generated
prompt_tokens = 16  # sample mode: prompt length
seed = 1337
device = 'auto'
dtype = 'auto'
compile = None  # None = on for CUDA, off elsewhere
profile = False  # write a torch.profiler trace of the timed steps to bench_trace/
# -----------------------------------------------------------------------------
configure(globals())
device = pick_device(device)
device_type = torch.device(device).type
dtype = pick_dtype(dtype, device_type)
compile = (device_type == 'cuda') if compile is None else compile
ctx = autocast(device_type, dtype)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
peak = peak_flops(device)


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()


def peak_memory_gb():
    """peak device memory (cuda) or peak resident memory of this process (cpu, mps)"""
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def make_model(attn):
    torch.manual_seed(seed)
    try:
        cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, bias=bias, attn_type=attn)
    except ValueError as e:
        fail(str(e))
    return GPT(cfg).to(device)


def batches():
    """endless (x, y) batches: random tokens, or real ones from the memmapped train.bin"""
    g = torch.Generator().manual_seed(seed)
    if real_data:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset, 'train.bin')
        if not os.path.isfile(path):
            fail(f"no {path}; run python data/{dataset}/prepare.py or use --real_data=False")
        data = np.memmap(path, dtype=np.uint16, mode='r')
    while True:
        if real_data:
            ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).numpy()
            t = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64))
        else:
            t = torch.randint(vocab_size, (batch_size, block_size + 1), generator=g)
        if device_type == 'cuda':
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
        yield t[:, :-1], t[:, 1:]


def bench_train(attn):
    model = make_model(attn)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if compile else model
    data = batches()
    X, Y = next(data)

    def step():
        nonlocal X, Y
        with ctx:
            _, loss = step_model(X, Y)
        X, Y = next(data)  # the next batch loads while the device computes
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup_iters):
        step()
    sync()
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    prof = None
    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device_type == 'cuda' else [])
        prof = torch.profiler.profile(activities=acts, record_shapes=True, with_stack=False,
                                      on_trace_ready=torch.profiler.tensorboard_trace_handler('bench_trace'))
        prof.start()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step()
        if prof:
            prof.step()
    sync()
    dt = (time.perf_counter() - t0) / iters
    if prof:
        prof.stop()
        print(f"profiler trace written to bench_trace/ ({attn})")
    flops = model.estimate_mfu(batch_size, dt, 1.0)  # achieved FLOP/s (peak of 1)
    mfu = model.estimate_mfu(batch_size, dt, peak)
    return {'attn_type': attn, 'ms/iter': dt * 1000, 'tokens/s': batch_size * block_size / dt,
            'TFLOP/s': flops / 1e12, 'MFU': f"{mfu * 100:.1f}%" if mfu else 'n/a',
            'peak mem GB': peak_memory_gb(), 'loss': loss.item()}


def bench_sample(attn):
    model = make_model(attn).eval()
    prompt = torch.randint(vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    rows, outs = [], {}
    for use_cache in (True, False):
        with torch.no_grad(), ctx:
            model.generate(prompt, 8, temperature=0, use_cache=use_cache)  # warm-up
            sync()
            t0 = time.perf_counter()
            outs[use_cache] = model.generate(prompt, max_new_tokens, temperature=0, use_cache=use_cache)
            sync()
        dt = time.perf_counter() - t0
        rows.append({'attn_type': attn, 'kv cache': use_cache, 'new tokens': max_new_tokens, 'seconds': dt,
                     'tokens/s': max_new_tokens / dt})
    rows[0]['speedup'] = rows[1]['seconds'] / rows[0]['seconds']
    rows[0]['same tokens'] = bool(torch.equal(outs[True], outs[False]))
    return rows


def table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:,.3f}" if isinstance(v, float) and abs(v) < 100 else (f"{v:,.0f}" if isinstance(v, float) else str(v))
    cells = [[fmt(r.get(c, '')) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print('| ' + ' | '.join(c.ljust(w) for c, w in zip(cols, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for row in cells:
        print('| ' + ' | '.join(v.ljust(w) for v, w in zip(row, widths)) + ' |')


print(f"device {device} ({torch.cuda.get_device_name(device) if device_type == 'cuda' else os.cpu_count()} "
      f"{'' if device_type == 'cuda' else 'cpus, ' + str(torch.get_num_threads()) + ' threads'}), dtype {dtype}, "
      f"compile {compile}, torch {torch.__version__}")
print(f"model {n_layer}x{n_embd} ({n_head} heads), block {block_size}, vocab {vocab_size}" +
      (f", batch {batch_size}" if mode == 'train' else f", batch 1, prompt {prompt_tokens} tokens"))
if mode == 'train':
    table([bench_train(a) for a in attn_type.split(',')])
elif mode == 'sample':
    table([r for a in attn_type.split(',') for r in bench_sample(a)])
else:
    fail(f"unknown mode '{mode}'; use train or sample")
