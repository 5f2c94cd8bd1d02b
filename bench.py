"""
Benchmarks: one command per figure, each printing a small table (results: docs/BENCHMARKS.md).
$ python bench.py                         # GPT-2 124M training step of train.py: ms/iter, tokens/s, MFU, peak memory
$ python bench.py --attn_type=SM,GK,GKpoly-8,PA_relu --n_layer=6 --n_head=6 --n_embd=384 --block_size=256
$ python bench.py --n_layer=48 --n_head=25 --n_embd=1600 --bias=True --batch_size=1   # gpt2-xl fine-tuning memory
$ python bench.py --activation_checkpointing=True --compile_mode=max-autotune          # try a lever
$ python bench.py --mode=sample           # generation: no cache vs static KV cache vs compiled, against the bound
$ python bench.py --mode=data             # tokenising with 1 process vs a pool; batches from the memmap
$ python bench.py --mode=eval             # val-loss tokens/s; HellaSwag examples/s one at a time vs batched
$ python bench.py --mode=finetune_memory --n_layer=48 --n_head=25 --n_embd=1600 --bias=True --batch_size=1 \
      --block_size=256 --iters=2     # gpt2-xl fine-tuning, full AdamW vs LoRA: train.py's peak memory by component
"""

import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import memory
from configurator import configure, fail, read_text, unused
from model import GPT, GPTConfig, KVCache
from quantize import FORMATS, decoding_model
from runtime import autocast, draw_offsets, pick_compile, pick_device, pick_dtype, read_batch, sync

# -----------------------------------------------------------------------------
mode = 'train'  # 'train', 'sample', 'data', 'eval' or 'finetune_memory' (see above)
batch_size = 12
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50257
bias = False
attn_type = 'SM'  # one attention, or several separated by commas for one row each
activation_checkpointing = False  # recompute each block in backward (less memory, more compute)
real_data = False  # True: batches from data/<dataset>/train.bin; False: random tokens
dataset = 'openwebtext'
warmup_iters = 5  # untimed steps first (compilation, allocator warm-up)
iters = 20  # timed steps (train), timed batches (eval, data)
max_new_tokens = 600  # sample mode: tokens generated in the long run
short_tokens = 100  # sample mode: tokens generated in the short run, whose time is subtracted (start-up cancels)
prompt_tokens = 1  # sample mode: prompt length
sample_batch = 8  # sample mode: the larger batch timed beside batch 1
temperature = 0.8  # sample mode: sample.py's default; 0 = greedy (every path must give the same tokens)
top_k = 200  # sample mode: sample.py's default; None = all tokens
quantize = 'none'  # sample mode: weight formats, one or several separated by commas: none (dtype's), int8
no_cache = False  # sample mode: also time the full recompute per token (nanoGPT's way); slow for big models
text_file = ''  # data mode: documents are cut from this text file; '' = generated text
data_chars = 20_000_000  # data mode: characters of text to tokenise
num_proc = 2  # data mode: processes in the tokenising pool, compared with 1
hellaswag_limit = 200  # eval mode: HellaSwag validation examples scored (downloaded once); 0 = skip HellaSwag
hellaswag_dir = ''  # eval mode: where hellaswag_val.jsonl is (default: data/hellaswag)
seed = 1337
device = 'auto'
dtype = 'auto'
compile = None  # None = on for CUDA, off elsewhere
compile_mode = 'default'  # torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
lora_rank = 16  # finetune_memory mode: the LoRA run's rank (adapters on every Linear of the blocks)
# -----------------------------------------------------------------------------
configure(globals(), optional=('top_k',))
memory.explain_oom("--batch_size or --block_size (or --sample_batch / --max_new_tokens in sample mode)")
if mode not in ('train', 'sample', 'data', 'eval', 'finetune_memory'):
    fail(f"unknown mode '{mode}'; use train, sample, data, eval or finetune_memory")
if not (isinstance(lora_rank, int) and lora_rank > 0):
    fail(f"lora_rank must be a positive integer, got {lora_rank!r}")
if not 0 <= seed < 2**64:
    fail(f"seed must be in [0, 2**64), got {seed}")
for name in ('batch_size', 'block_size', 'iters', 'num_proc', 'data_chars', 'hellaswag_limit', 'max_new_tokens',
             'short_tokens', 'prompt_tokens', 'sample_batch'):
    if not isinstance(globals()[name], int) or globals()[name] < (name != 'hellaswag_limit'):
        fail(f"{name} must be a {'non-negative' if name == 'hellaswag_limit' else 'positive'} integer, got {globals()[name]!r}")
if not 0 < vocab_size <= 2**16:
    fail(f"vocab_size must be between 1 and 65,536 (token ids are uint16, as in train.bin), got {vocab_size}")
if short_tokens >= max_new_tokens:
    fail(f"short_tokens ({short_tokens}) must be below max_new_tokens ({max_new_tokens}): their difference is timed")
if any(k not in FORMATS for k in quantize.split(',')):
    fail(f"unknown quantize '{quantize}'; use {' or '.join(FORMATS)}, or several separated by commas")
if top_k is not None and top_k <= 0:
    fail(f"top_k must be a positive integer or None (all tokens), got {top_k}")
if compile_mode not in ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'):
    fail(f"unknown compile_mode '{compile_mode}'; use default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs")
source_text = read_text(text_file, '--text_file') if text_file else None  # data mode: checked before any timing
device = pick_device(device)
device_type = device.type
dtype = pick_dtype(dtype, device)
compile = pick_compile(compile, device)
ctx = autocast(device_type, dtype)
REPO = os.path.dirname(os.path.abspath(__file__))
for only, keys in (('sample', ('max_new_tokens', 'short_tokens', 'prompt_tokens', 'sample_batch', 'temperature', 'top_k',
                               'quantize', 'no_cache')),
                   ('data', ('text_file', 'data_chars', 'num_proc')), ('eval', ('hellaswag_limit', 'hellaswag_dir'))):
    if mode != only:
        unused(keys, f"with mode='{mode}' (they are for mode='{only}')")
if not compile or mode == 'sample':
    unused(('compile_mode',), 'with compile off' if not compile else 'in sample mode (decoding compiles its own way)')
n_params = memory.params(n_layer, n_embd, block_size, vocab_size)  # sizes checked before anything is allocated
if mode == 'sample':
    memory.check(memory.sampling(n_params, n_layer, n_embd, block_size, vocab_size, sample_batch,
                                 prompt_tokens + max_new_tokens, dtype, '--sample_batch'), device, 'bench.py')
elif mode == 'eval':
    memory.check(memory.training(n_params, n_layer, n_embd, block_size, vocab_size, batch_size, dtype, None), device,
                 'bench.py')


def make_model(attn):
    torch.manual_seed(seed)
    try:
        cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, bias=bias, attn_type=attn)
    except ValueError as e:
        fail(str(e))
    model = GPT(cfg).to(device)
    model.activation_checkpointing = activation_checkpointing
    return model


def compiled(model):
    return torch.compile(model, mode=compile_mode) if compile else model


def batches():
    """endless (x, y) batches, loaded as train.py loads them: from the memmapped train.bin, or from random tokens"""
    g = torch.Generator().manual_seed(seed)
    if real_data:
        path = os.path.join(REPO, 'data', dataset, 'train.bin')
        if not os.path.isfile(path):
            fail(f"no {path}; run python data/{dataset}/prepare.py or use --real_data=False")
        data = np.memmap(path, dtype=np.uint16, mode='r')
        if len(data) <= block_size + 1:
            fail(f"{path} has {len(data)} tokens, fewer than one block of {block_size} + 1; use a smaller --block_size")
    else:
        data = np.random.default_rng(seed).integers(vocab_size, size=max(10**6, 2 * (block_size + 1)), dtype=np.uint16)
    while True:
        try:
            yield read_batch(data, draw_offsets(g, len(data), block_size, 1, batch_size)[0], block_size, device,
                             vocab_size)
        except ValueError as e:
            fail(f"{path} {e}: use --vocab_size to match the data (GPT-2 BPE: 50257)")


def bench_train(attn, tmp):
    """train.py itself, not a copy of its step: warmup_iters untimed steps, then iters timed ones, on random tokens
    (or --real_data). Its own log gives the step time (evals and the first step are outside it) and MFU; peak
    memory is CUDA's allocator peak, which train.py prints, or on CPU the process's resident high-water mark."""
    data = os.path.join(REPO, 'data', dataset)
    if not real_data:
        data = os.path.join(tmp, 'random')
        if not os.path.isdir(data):
            os.makedirs(data)
            rng = np.random.default_rng(seed)
            for split in ('train', 'val'):
                rng.integers(vocab_size, size=max(10**6, 4 * (block_size + 1)), dtype=np.uint16).tofile(
                    os.path.join(data, f'{split}.bin'))
            if vocab_size != 50257:  # train.py reads any other vocabulary size from a char-level meta.json
                with open(os.path.join(data, 'meta.json'), 'w') as f:
                    json.dump({'vocab_size': vocab_size, 'itos': [chr(0x100 + i) for i in range(vocab_size)]}, f)
    out = os.path.join(tmp, f'out-{attn}')
    steps = warmup_iters + iters
    flags = dict(data_dir=data, out_dir=out, overwrite=True, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                 block_size=block_size, batch_size=batch_size, bias=bias, attn_type=attn, dropout=0.0,
                 activation_checkpointing=activation_checkpointing, gradient_accumulation_steps=1, max_iters=steps,
                 lr_decay_iters=steps, warmup_iters=0, eval_iters=1, eval_interval=steps, log_interval=1,
                 always_save_checkpoint=False, device=str(device), dtype=dtype, compile=compile,
                 compile_mode=compile_mode, seed=seed)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *(f'--{k}={v}' for k, v in flags.items())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource use: its peak resident memory
    if status:
        fail(f"train.py failed for attn_type {attn}: "
             f"{output.strip().splitlines()[-1].removeprefix('error: ') if output.strip() else status}")
    records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    timed = [r for r in records if r['loss'] is not None][-iters:]
    if any(r['tokens_per_sec'] is None for r in timed):
        fail("some timed steps were untimed (an eval or a checkpoint among them); raise --warmup_iters")
    dt = sum(batch_size * block_size / r['tokens_per_sec'] for r in timed) / len(timed)
    gpu_peak = re.search(r'peak GPU memory ([\d.]+) GB', output)
    with torch.device('meta'):  # only for its FLOP count: no memory, no initialisation
        model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd, bias=bias, attn_type=attn))
    mfu = timed[-1]['mfu']
    return {'attn_type': attn, 'ms/iter': dt * 1000, 'tokens/s': batch_size * block_size / dt,
            'TFLOP/s': model.estimate_mfu(batch_size, dt, 1.0) / 1e12, 'MFU': f"{mfu * 100:.1f}%" if mfu else 'n/a',
            'peak mem GB': float(gpu_peak.group(1)) if gpu_peak else usage.ru_maxrss / 1e6, 'loss': timed[-1]['loss']}


def bandwidth():
    """bytes/s this device reads: the best of several sums over a buffer far larger than any cache"""
    buf = torch.ones(256 * 2**20 // 4 if device_type == 'cpu' else 2**30 // 4, device=device)  # 256 MB / 1 GB
    best = float('inf')
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * buf.element_size() / best


def bytes_per_step(model):
    """what a decode step reads: every weight, scale and bias once (the LM head's padded rows included), but not the
    embedding tables (one row each) nor the KV cache"""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Embedding, KVCache)):
            continue
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if id(t) not in seen:  # the tied head is counted once, as the head
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def kv_bytes_per_step(model):
    """what a decode step's attention reads from the KV caches (keys and values of every layer and row), at the mean
    span of the timed steps (those of the long run past the short one). The spans' rounding up is not counted: the
    bound stays an upper one."""
    cache = model.transformer.h[0].attn.cache.k  # (B, n_head, positions, head_size): the last (short) run's
    span = min(model.config.block_size, prompt_tokens + (short_tokens + max_new_tokens) / 2)
    return 2 * len(model.transformer.h) * cache[:, :, 0].numel() * cache.element_size() * span


def bench_sample(attn, kind):
    """tokens/s of sample.py's own path (quantize.decoding_model, then model.generate under autocast with sample.py's
    sampling settings), eager and compiled, as (max_new_tokens - short_tokens) / (time of a max_new_tokens run - time
    of a short_tokens run), so prefill and the first call's compilation cancel; against the memory-streaming bound
    (a decode step of B tokens reads every weight once, and each row's keys and values in every layer:
    bytes / bandwidth). The bandwidth is measured between the runs and the best reading kept: on a busy machine one
    reading comes out low."""
    model = decoding_model(make_model(attn).eval(), dtype, kind)
    weight_bytes = bytes_per_step(model)
    paths = ([('no cache', dict(use_cache=False))] if no_cache else []) + [('kv cache', {})] + \
        ([('kv cache, compiled', dict(compile=True))] if compile else [])  # --compile=True on CPU
    rows, steps, step_bytes, readings = [], [], [], [bandwidth()]
    for B in sorted({1, sample_batch}):
        prompt = torch.randint(vocab_size, (B, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
        outs = []
        for name, kw in paths:
            def run(n):
                torch.manual_seed(seed)
                sync(device)
                t0 = time.perf_counter()
                out = model.generate(prompt, n, temperature=temperature, top_k=top_k, **kw)
                sync(device)
                return out, time.perf_counter() - t0
            with torch.no_grad(), ctx:
                _, first = run(max_new_tokens)  # compiles (and slides past the block if it is that long)
                run(short_tokens)  # compiles the short run's cache length
                out, long_s = run(max_new_tokens)
                _, short_s = run(short_tokens)
            readings.append(bandwidth())
            outs.append(out)
            steps.append((max_new_tokens - short_tokens) / (long_s - short_s))
            step_bytes.append(weight_bytes + (kv_bytes_per_step(model) if kw.get('use_cache', True) else 0))
            rows.append({'attn_type': attn, 'weights': kind if kind != 'none' else dtype, 'batch': B, 'path': name,
                         'first call s': first, 'tokens/s': f"{B * steps[-1]:,.1f}",
                         'same tokens': all(torch.equal(o, outs[0]) for o in outs)})
        model.clear_caches()
    bw = max(readings)
    kv = ', '.join(f'{(b - weight_bytes) / 1e6:,.3f}' for b in sorted(set(step_bytes)) if b > weight_bytes)
    print(f"{kind if kind != 'none' else dtype} weights: {weight_bytes / 1e6:,.1f} MB read per decode step, the KV "
          f"cache {kv or 0} MB more (by batch); read bandwidth {bw / 1e9:,.1f} GB/s (best of {len(readings)}, measured "
          f"between the runs: {', '.join(f'{r / 1e9:.1f}' for r in readings)})")
    for r, s, b in zip(rows, steps, step_bytes):
        r['bound tok/s'] = f"{r['batch'] * bw / b:,.1f}"
        frac = s / (bw / b)
        r['of bound'] = f"{frac:.0%}" + (" (above the bound: the bandwidth reading is unreliable)" if frac > 1 else '')
    return rows


def generated_text(n_chars):
    """English-like filler: sentences of made-up words (a stand-in when no text_file is given)"""
    rng = random.Random(seed)
    syllables = ['ka', 'to', 'ri', 'en', 'mo', 'sa', 'lu', 'ne', 'di', 'por', 'the', 'and', 'ing', 'ver', 'al', 'st']
    words = [''.join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    out, n = [], 0
    while n < n_chars:
        s = ' '.join(rng.choices(words, k=rng.randint(4, 20))).capitalize() + rng.choice(['. ', '? ', '.\n'])
        out.append(s)
        n += len(s)
    return ''.join(out)


def bench_tokenize(tmp):
    """data/fineweb_edu/prepare.py over the same local documents with 1 process and with a pool of num_proc;
    the tokens/s are its own report, and both runs must write identical bins"""
    text = source_text or generated_text(1_000_000)
    if not text.strip():
        fail(f"{text_file} holds no text")
    docs, n = os.path.join(tmp, 'docs.jsonl'), 0
    with open(docs, 'w') as f:  # 2,000-character documents, the text repeated until there are data_chars
        for doc in itertools.cycle([text[i:i + 2000] for i in range(0, len(text), 2000)]):
            if n >= data_chars:
                break
            f.write(json.dumps({'text': doc}) + '\n')
            n += len(doc)
    rows = []
    for procs in sorted({1, num_proc}):
        out = os.path.join(tmp, f'proc{procs}')
        p = subprocess.run([sys.executable, os.path.join(REPO, 'data', 'fineweb_edu', 'prepare.py'),
                            f'--dataset={docs}', f'--out_dir={out}', f'--num_proc={procs}', '--val_docs=10'],
                           capture_output=True, text=True)
        m = re.search(r'this run: ([\d,]+) tokens in [\d.]+s \(([\d,]+) tokens/s', p.stdout)
        if p.returncode or not m:
            fail(f"prepare.py failed: {(p.stderr.strip().splitlines() or ['no output'])[-1].removeprefix('error: ')}")
        rows.append({'tokenise': 'prepare.py', 'processes': procs, 'tokens': int(m.group(1).replace(',', '')),
                     'tokens/s': float(m.group(2).replace(',', ''))})
    if len(rows) > 1:
        same = all(open(os.path.join(tmp, f'proc1/{b}'), 'rb').read() ==
                   open(os.path.join(tmp, f'proc{num_proc}/{b}'), 'rb').read() for b in ('train.bin', 'val.bin'))
        rows[1].update({'speedup': rows[1]['tokens/s'] / rows[0]['tokens/s'], 'same bins': same})
    return rows


def bench_batches(tmp):
    """train.py's batch loading (one gather from a memmap opened once) vs reopening the memmap for every batch"""
    path = os.path.join(tmp, 'proc1', 'train.bin')
    if os.path.getsize(path) // 2 <= block_size + 1:
        fail(f"{data_chars:,} characters give fewer tokens than one block of {block_size}; raise --data_chars")
    rows = []
    for reopen in (False, True):
        data = np.memmap(path, dtype=np.uint16, mode='r')
        g = torch.Generator().manual_seed(seed)
        n_batches = 50 * iters
        t0 = time.perf_counter()
        for _ in range(n_batches):
            if reopen:
                data = np.memmap(path, dtype=np.uint16, mode='r')
            offsets = draw_offsets(g, len(data), block_size, 1, batch_size)[0]
            read_batch(data, offsets, block_size, device, 2**16)  # with train.py's id check (every uint16 passes)
        sync(device)
        dt = (time.perf_counter() - t0) / n_batches
        rows.append({'batches': f"{batch_size} x {block_size}", 'memmap': 'reopened per batch' if reopen else 'opened once',
                     'us/batch': dt * 1e6, 'tokens/s': batch_size * block_size / dt})
    return rows


def bench_eval(attn):
    """estimate_loss's work: forward passes under no_grad on batch_size x block_size, timed"""
    model = make_model(attn).eval()
    step_model = compiled(model)
    data = batches()
    with torch.no_grad():
        for i in range(warmup_iters + iters):
            if i == warmup_iters:
                sync(device)
                t0 = time.perf_counter()
            X, Y = next(data)
            with ctx:
                _, loss = step_model(X, Y)
        sync(device)
    dt = (time.perf_counter() - t0) / iters
    return {'eval': f'val loss ({attn})', 'batch': batch_size, 'items/s': batch_size * block_size / dt,
            'unit': 'tokens', 'result': f"loss {loss.item():.4f}"}


def hellaswag_examples():
    """HellaSwag's validation examples (checked before any timing, so a missing file fails at once)"""
    import hellaswag
    if vocab_size < hellaswag.encoder().n_vocab:
        fail(f"HellaSwag needs the GPT-2 vocabulary: use --vocab_size=50257 (got {vocab_size}), or --hellaswag_limit=0")
    return hellaswag.load_examples(hellaswag_limit, hellaswag_dir or hellaswag.data_dir)


def bench_hellaswag(examples):
    """hellaswag.evaluate one example per forward vs hellaswag.batch_size examples per forward; same accuracy"""
    import hellaswag
    model = make_model(attn_type.split(',')[0])
    rows = []
    for bs in (1, hellaswag.batch_size):
        hellaswag.evaluate(model, device, examples[:bs], bs, ctx)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        res = hellaswag.evaluate(model, device, examples, bs, ctx)
        sync(device)
        rows.append({'eval': 'hellaswag', 'batch': bs, 'items/s': res['n'] / (time.perf_counter() - t0),
                     'unit': 'examples', 'result': f"acc_norm {res['acc_norm']:.4f} (n {res['n']})"})
    rows[1]['speedup'] = rows[1]['items/s'] / rows[0]['items/s']
    return rows


def finetune_memory(tmp):
    """train.py fine-tuning this shape (random weights: init_from=scratch, random tokens), full AdamW and then LoRA:
    memory.py's pre-flight parts (lower bounds) and the process's measured peak resident memory (CUDA: the allocator's
    peak), or the one line with which train.py refused to start"""
    data = os.path.join(tmp, 'random')
    os.makedirs(data)
    rng = np.random.default_rng(seed)
    for split in ('train', 'val'):
        rng.integers(vocab_size, size=4 * (block_size + 1), dtype=np.uint16).tofile(os.path.join(data, f'{split}.bin'))
    import lora
    rows = []
    for rank in (0, lora_rank):
        trainable = lora.n_params(n_layer, n_embd, rank, ','.join(lora.LAYERS)) if rank else None
        parts = memory.training(n_params, n_layer, n_embd, block_size, vocab_size, batch_size, dtype, 'adamw', 1,
                                activation_checkpointing, 2, trainable)
        flags = dict(data_dir=data, out_dir=os.path.join(tmp, f'out-{rank}'), n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, block_size=block_size, batch_size=batch_size, bias=bias, dropout=0.0,
                     activation_checkpointing=activation_checkpointing, gradient_accumulation_steps=1,
                     max_iters=iters, eval_iters=1, eval_interval=iters, log_interval=1, lora_rank=rank,
                     always_save_checkpoint=False, device=str(device), dtype=dtype, compile=compile, seed=seed)
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *(f'--{k}={v}' for k, v in flags.items())],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        gpu_peak = re.search(r'peak GPU memory ([\d.]+) GB', output)
        refused = next((l for l in output.splitlines() if l.startswith('error: ')), None)
        losses = re.findall(r'\| loss ([\d.]+)', output)
        rows.append({'run': f'LoRA r{rank}' if rank else 'full AdamW',
                     'trainable M': (trainable or n_params) / 1e6,
                     'weights+grads+optimizer GB (est.)': parts['the weights and optimizer state'][0] / 1e9,
                     'one micro-batch GB (est.)': parts['one micro-batch'][0] / 1e9,
                     'measured peak GB': ('refused before allocating' if refused else f"{float(gpu_peak.group(1)) if gpu_peak else usage.ru_maxrss / 1e6:.2f}"
                                          + (' (GPU)' if gpu_peak else ' (RSS)')),
                     'steps': len(losses), 'note': (refused or (f"loss {losses[-1]}" if losses else
                                                               (output.strip().splitlines() or ['?'])[-1]))[:110]})
    return rows


def table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: (f"{v:,.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}" if isinstance(v, (int, float))
                     and not isinstance(v, bool) else str(v))
    cells = [[fmt(r.get(c, '')) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print('| ' + ' | '.join(c.ljust(w) for c, w in zip(cols, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for row in cells:
        print('| ' + ' | '.join(v.ljust(w) for v, w in zip(row, widths)) + ' |')
    print()


print(f"device {device} ({torch.cuda.get_device_name(device) if device_type == 'cuda' else os.cpu_count()} "
      f"{'' if device_type == 'cuda' else 'cpus, ' + str(torch.get_num_threads()) + ' threads'}), dtype {dtype}, "
      f"compile {compile}{f' ({compile_mode})' if compile else ''}, torch {torch.__version__}")
if mode != 'data':
    print(f"model {n_layer}x{n_embd} ({n_head} heads), block {block_size}, vocab {vocab_size}" +
          (f", batch {batch_size}" if mode != 'sample' else f", batch 1 and {sample_batch}, prompt {prompt_tokens} "
           f"token(s), {max_new_tokens} minus {short_tokens} new, temperature {temperature}, top_k {top_k}") +
          (", activation checkpointing" if activation_checkpointing else ''))
if mode == 'train':
    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        table([bench_train(a, tmp) for a in attn_type.split(',')])
elif mode == 'sample':
    table([r for a in attn_type.split(',') for k in quantize.split(',') for r in bench_sample(a, k)])
elif mode == 'data':
    with tempfile.TemporaryDirectory(prefix='bench_data_') as tmp:
        print(f"text: {text_file or 'generated'}, {data_chars:,} characters in 2,000-character documents")
        table(bench_tokenize(tmp))
        table(bench_batches(tmp))
elif mode == 'finetune_memory':
    with tempfile.TemporaryDirectory(prefix='bench_finetune_') as tmp:
        table(finetune_memory(tmp))
else:
    examples = hellaswag_examples() if hellaswag_limit else None
    table([bench_eval(a) for a in attn_type.split(',')] + (bench_hellaswag(examples) if examples else []))
