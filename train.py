"""
Train a GPT. One process on any device:
$ python train.py config/train_shakespeare_char.py
DDP on one node with 8 GPUs (any world size; gloo on CPU, nccl on CUDA, chosen automatically):
$ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
Two nodes (run on each, node_rank 0 and 1; add NCCL_IB_DISABLE=1 without InfiniBand):
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 train.py ...
Shard weights, gradients and optimizer state over the processes (FSDP2) instead of replicating them (DDP):
$ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --fsdp=True
Under Slurm, srun can start the processes itself (one task per GPU; export MASTER_ADDR and MASTER_PORT):
$ srun --ntasks-per-node=8 python train.py config/train_gpt2.py
Every global below can be set by a config file or a --key=value flag (see configurator.py).
"""

import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure, fail
from model import GPT, GPTConfig
from runtime import (autocast, draw_offsets, load_checkpoint, model_from_checkpoint, peak_flops, pick_device,
                     pick_dtype, print0, read_batch, save_atomic)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 2000  # evaluate (and checkpoint) every this many steps
log_interval = 1  # print a log line every this many steps (the only host sync in the loop)
eval_iters = 200  # batches per split for the loss estimate
eval_only = False  # evaluate once and exit, writing nothing
always_save_checkpoint = True  # checkpoint at every eval, not only when val loss improves
checkpoint_interval = 0  # also keep a copy every this many steps as ckpt_<step>.pt; 0 = never
init_from = 'scratch'  # 'scratch', 'resume' (out_dir), 'finetune' (finetune_from), 'gpt2*' or a local HF GPT-2 dir
finetune_from = ''  # for init_from='finetune': run dir whose ckpt.pt to start from (default: out_dir)
# logging
wandb_log = False  # also log every metric to Weights & Biases (imported only then)
wandb_project = 'owt'
wandb_run_name = 'gpt2'
sample_interval = 0  # every this many steps, print (and log) samples from the model; 0 = never
sample_prompt = "Hello, I'm a language model,"
sample_tokens = 32  # new tokens per sample
num_samples = 4
hellaswag_interval = 0  # every this many steps, HellaSwag accuracy (GPT-2 BPE models); 0 = never
hellaswag_limit = None  # score only the first N validation examples (None = all 10,042)
hellaswag_dir = ''  # where hellaswag_val.jsonl is, or is downloaded to (default: data/hellaswag)
# data
dataset = 'openwebtext'
data_dir = ''  # where train.bin / val.bin / meta.json live (default: data/<dataset> in this repo)
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, across all processes
batch_size = 12  # micro-batch size per process
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = False  # bias in Linears and LayerNorms (GPT-2 had them; without is a bit better and faster)
attn_type = 'SM'  # attention: SM, GK, GKpoly-<n>, PA_<act> (see model.py)
activation_checkpointing = False  # recompute each block in backward: far less activation memory, ~1/3 more compute
# AdamW
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total optimizer steps
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm; 0 = no clipping
max_bad_steps = 10  # a non-finite loss or gradient skips the step; stop after this many in a row
# learning rate schedule: linear warmup then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate / 10 per Chinchilla
# system
backend = 'auto'  # DDP backend: 'auto' = nccl on CUDA, gloo otherwise
fsdp = False  # with several processes: shard the model over them (FSDP2) instead of DDP; not taken from a resumed run
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where supported, float16 on older GPUs, float32 on cpu), or set one
compile = None  # torch.compile the model; None = on for CUDA, off elsewhere
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]
overrides = configure(globals())
ckpt = None
if init_from == 'resume':  # continue with the run's own settings, except those given again here
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    for k, v in ckpt['config'].items():
        if k in config_keys and k not in overrides and k not in ('init_from', 'out_dir', 'fsdp'):
            globals()[k] = v
config = {k: globals()[k] for k in config_keys}  # everything this run was configured with, for the checkpoint

# -- check the settings before anything is started or written -------------------
for name in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters'):
    if not isinstance(globals()[name], int) or globals()[name] <= 0:
        fail(f"{name} must be a positive integer, got {globals()[name]!r}")
for name in ('learning_rate', 'min_lr'):
    if globals()[name] < 0 or (name == 'learning_rate' and globals()[name] == 0):
        fail(f"{name} must be positive, got {globals()[name]!r}")
if max_iters < 0 or warmup_iters < 0 or lr_decay_iters <= 0:
    fail("max_iters and warmup_iters must be >= 0 and lr_decay_iters > 0")
if compile not in (None, True, False):
    fail(f"compile must be True, False or None (auto), got {compile!r}")
if init_from not in ('scratch', 'resume', 'finetune') and not init_from.startswith('gpt2') and not os.path.isdir(init_from):
    fail(f"unknown init_from '{init_from}'; use scratch, resume, finetune, gpt2, gpt2-medium, gpt2-large, "
         f"gpt2-xl or a local Hugging Face GPT-2 directory")

# -- processes and devices ---------------------------------------------------------
if 'RANK' not in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:  # srun without torchrun
    if not (os.environ.get('MASTER_ADDR') and os.environ.get('MASTER_PORT')):
        fail("several Slurm tasks but no MASTER_ADDR / MASTER_PORT: export them in the sbatch script before srun "
             "(MASTER_ADDR = the first node of the job)")
    os.environ.update(RANK=os.environ['SLURM_PROCID'], LOCAL_RANK=os.environ.get('SLURM_LOCALID', '0'),
                      WORLD_SIZE=os.environ['SLURM_NTASKS'])
ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun (or srun)?
if fsdp and not ddp:
    fail("fsdp=True shards the model over several processes: launch with torchrun (or srun), or drop --fsdp")
rank = int(os.environ.get('RANK', 0))
local_rank = int(os.environ.get('LOCAL_RANK', 0))
world_size = int(os.environ.get('WORLD_SIZE', 1))
device = pick_device(device)
if ddp and device == 'cuda':
    device = f'cuda:{local_rank % torch.cuda.device_count()}'  # srun may show each task only its own GPU
device_type = torch.device(device).type
if device_type == 'cuda':
    torch.cuda.set_device(device)
dtype = pick_dtype(dtype, device_type)
compile = (device_type == 'cuda') if compile is None else compile
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the number of "
         f"processes ({world_size}); pick a multiple of {world_size}")
accum_local = gradient_accumulation_steps // world_size  # micro-steps this process runs per step
master = rank == 0
if wandb_log and master and not eval_only:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs the wandb package (pip install wandb), or set --wandb_log=False")
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size

# -- data: train.bin / val.bin are uint16 token ids, memmapped once ----------------------
data_dir = data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
if not all(os.path.isfile(os.path.join(data_dir, f)) for f in ('train.bin', 'val.bin')):
    fail(f"dataset '{dataset}' is not prepared (no train.bin/val.bin in {data_dir}); "
         f"run: python data/{dataset}/prepare.py")
meta_path = os.path.join(data_dir, 'meta.json')
meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None  # char-level vocabulary, or None for BPE
splits = {s: np.memmap(os.path.join(data_dir, f'{s}.bin'), dtype=np.uint16, mode='r') for s in ('train', 'val')}
if hellaswag_interval and meta:
    fail("hellaswag_interval needs a GPT-2 BPE model; this dataset is char-level: set --hellaswag_interval=0")
for split, tokens in splits.items():
    if len(tokens) <= block_size + 1:
        fail(f"{split}.bin in {data_dir} has only {len(tokens)} tokens, fewer than one block ({block_size} + 1); "
             f"use a smaller --block_size or more data")

torch.manual_seed(seed)  # the same initial weights on every process

# -- the model -----------------------------------------------------------------
model_keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout', 'attn_type')
iter_num, best_val_loss = 0, 1e9
try:
    if init_from == 'scratch':
        vocab_size = meta['vocab_size'] if meta else 50257
        print0(f"initializing a new model from scratch, vocab_size {vocab_size}")
        model = GPT(GPTConfig(**{k: globals()[k] for k in model_keys}))
    elif init_from in ('resume', 'finetune'):
        if init_from == 'finetune':
            print0(f"finetuning from {finetune_from or out_dir}")
            ckpt = load_checkpoint(os.path.join(finetune_from or out_dir, 'ckpt.pt'))
        args = ckpt['model_args']
        # the same weights: a shape flag that contradicts the checkpoint is a mistake (finetune may change attention)
        fixed = ('n_layer', 'n_head', 'n_embd', 'bias') + (('attn_type',) if init_from == 'resume' else ())
        clash = [k for k in fixed if k in overrides and overrides[k] != args[k]]
        if init_from == 'resume' and block_size != args['block_size']:
            clash.append('block_size')
        if clash:
            k = clash[0]
            fail(f"--{k}={globals()[k]!r} conflicts with the checkpoint's {k}={args[k]!r}; drop the flag, "
                 f"or start a new run with init_from='finetune' and a new out_dir")
        model = model_from_checkpoint(ckpt, {'dropout': dropout,
                                             'attn_type': attn_type if 'attn_type' in overrides else args['attn_type']})
        if init_from == 'resume':
            iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    else:
        print0(f"initializing from OpenAI GPT-2 weights: {init_from}")
        model = GPT.from_pretrained(init_from, dict(dropout=dropout, attn_type=attn_type))
except (ValueError, OSError) as e:
    fail(str(e))
if block_size > model.config.block_size:
    fail(f"block_size {block_size} is larger than the model's {model.config.block_size}; use --block_size<="
         f"{model.config.block_size}")
if block_size < model.config.block_size:
    model.crop_block_size(block_size)
model_args = asdict(model.config)
model.activation_checkpointing = activation_checkpointing
if meta and meta['vocab_size'] != model.config.vocab_size:
    fail(f"dataset vocab ({meta['vocab_size']}) differs from the model's ({model.config.vocab_size}); "
         f"a char-level dataset needs a model trained on it")
for split, tokens in splits.items():  # bad token ids: check the start of each file now (and every batch later)
    top = int(tokens[:10_000_000].max())
    if top >= model_args['vocab_size']:
        fail(f"{split}.bin in {data_dir} holds token id {top} but the model's vocabulary has {model_args['vocab_size']}"
             f"; re-run the dataset's prepare.py, or the data and the model don't belong together")
model.to(device)

# out_dir must be writable before any compute is spent; it is only created when the first record is written
target = os.path.abspath(out_dir)
while not os.path.exists(target):
    target = os.path.dirname(target)
if not eval_only and not (os.path.isdir(target) and os.access(target, os.W_OK)):
    fail(f"out_dir '{out_dir}' cannot be written ({target} is not a writable directory); choose another --out_dir")

if ddp:
    dist.init_process_group(backend=('nccl' if device_type == 'cuda' else 'gloo') if backend == 'auto' else backend)
if fsdp:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    # every process holds the full (identical) weights, loaded above; each keeps only its 1/world_size shard.
    # Each block is a unit (its weights are gathered just for its forward / backward), then the root, which owns
    # the embeddings, ln_f and the tied wte / lm_head weight: one parameter, sharded once, so it stays tied.
    # Weights are gathered in `dtype` for compute; gradients are reduced and the shards kept in float32. autocast
    # (ctx) stays on as without FSDP: it keeps softmax, layer norms and the loss in float32.
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    warnings.filterwarnings('ignore', message='FSDP2-wrapped module')  # its logits are a view; never changed in place
raw_model = model  # the GPT itself (sharded under FSDP), whatever compile and DDP wrap around it below


def param_names():
    """the optimizer's parameters by name, in the order a plain optimizer state_dict numbers them 0, 1, ..."""
    name = {p: n for n, p in raw_model.named_parameters()}
    return [name[p] for group in optimizer.param_groups for p in group['params']]


def fqn_optimizer_state(sd):
    """plain optimizer state_dict (parameters numbered) -> keyed by name, as torch.distributed.checkpoint has it"""
    names = param_names()
    return {'state': {names[i]: v for i, v in sd['state'].items()},
            'param_groups': [dict(g, params=[names[i] for i in g['params']]) for g in sd['param_groups']]}


def plain_optimizer_state(sd):
    """the inverse: checkpoints hold a plain optimizer's state_dict whether the run was sharded or not"""
    index = {n: i for i, n in enumerate(param_names())}
    return {'state': {index[n]: v for n, v in sd['state'].items()},
            'param_groups': [dict(g, params=[index[n] for n in g['params']]) for g in sd['param_groups']]}


# the optimizer is made after sharding: under FSDP it updates only this process's shards (DTensors)
# (fused AdamW can't take the sharded scaler's found_inf: FSDP in float16 uses the unfused one)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                       fused=False if fsdp and dtype == 'float16' else None)
# loss scaling only for float16; the sharded scaler agrees on inf/NaN across processes (each sees only its shard)
scaler = (ShardedGradScaler if fsdp else torch.amp.GradScaler)(device_type, enabled=(dtype == 'float16'))
if init_from == 'resume':
    if fsdp:  # every process read the whole checkpoint (above) and keeps its shard of the full optimizer state
        set_optimizer_state_dict(raw_model, optimizer, fqn_optimizer_state(ckpt['optimizer']),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
torch.manual_seed(seed + rank)  # dropout differs per process; the batches come from `sampler` below
np.random.seed(seed + rank)
random.seed(seed + rank)
sampler = torch.Generator().manual_seed(seed)  # same on every process: each takes its slice of every draw
bad_steps = torch.zeros((), device=device)  # non-finite steps in a row, counted on device (no sync)
if init_from == 'resume':  # exact resume: every generator where it was
    sampler.set_state(ckpt['sampler'])
    bad_steps.fill_(ckpt.get('bad_steps', 0))
    rng = ckpt['rng'][rank] if rank < len(ckpt['rng']) else None
    if rng is not None:
        torch.set_rng_state(rng['torch'])
        if device_type == 'cuda' and rng.get('cuda') is not None:
            torch.cuda.set_rng_state(rng['cuda'])
        np.random.set_state(('MT19937', rng['numpy'][0].numpy().astype(np.uint32), *rng['numpy'][1]))
        random.setstate((rng['python'][0], tuple(rng['python'][1]), None))
ckpt = None  # free it

if compile:
    print0("compiling the model... (takes a ~minute)")
    model = torch.compile(model)  # under FSDP: the whole model, after sharding
if ddp and not fsdp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
ctx = autocast(device_type, dtype)
peak = peak_flops(device)


def get_batch(split, offsets):
    """tokens at the given start offsets -> x, y of shape (len(offsets), block_size) on the device"""
    try:
        return read_batch(splits[split], offsets, block_size, device, model_args['vocab_size'])
    except ValueError as e:
        fail(f"{split}.bin in {data_dir} {e}; re-run the dataset's prepare.py or fix --dataset")


def draw(split, n, generator):
    """n micro-batches of start offsets from one shared draw; this process's share of them"""
    return draw_offsets(generator, len(splits[split]), block_size, n, batch_size, rank, world_size)


def all_mean(t):
    """average a scalar tensor over processes (a no-op without DDP)"""
    if ddp:
        dist.all_reduce(t)
        t /= world_size
    return t


@torch.no_grad()
def estimate_loss():
    """mean loss over eval_iters batches per split; the same batches every time, split across processes"""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        offsets = draw(split, eval_iters, torch.Generator().manual_seed(seed + 1))
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        # FSDP gathers weights in every forward, so all processes run as many as rank 0 (extras are not counted)
        n = -(-eval_iters // world_size) if fsdp and eval_iters >= world_size else len(offsets)
        for i in range(n):
            X, Y = get_batch(split, offsets[min(i, len(offsets) - 1)])
            with ctx:
                _, loss = model(X, Y)
            if i < len(offsets):
                total, count = total + loss.float(), count + 1
        out[split] = (all_mean(total) / all_mean(count)).item()  # a mean over every batch, however they split
    model.train()
    return out


def get_lr(it):
    """linear warmup for warmup_iters steps, then cosine decay to min_lr at lr_decay_iters"""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def rng_state():
    """this process's random generators, as plain tensors and lists (loadable with weights_only=True)"""
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            'numpy': [torch.from_numpy(np_state[1].astype(np.int64)), list(np_state[2:])],
            'python': [random.getstate()[0], list(random.getstate()[1])]}


def save_checkpoint(name='ckpt.pt'):
    """everything needed to continue exactly: weights, optimizer, scaler, step, every RNG, the sampler"""
    rngs = [None] * world_size
    if ddp:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if fsdp:  # gather the full weights and optimizer state onto rank 0's CPU: the same file as without FSDP
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(raw_model, options=options)
        optimizer_state = get_optimizer_state_dict(raw_model, optimizer, options=options)
        if master:
            model_state['lm_head.weight'] = model_state['transformer.wte.weight']  # tied: one tensor in the file
            optimizer_state = plain_optimizer_state(optimizer_state)
    else:
        model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
    if master:
        os.makedirs(out_dir, exist_ok=True)
        save_atomic({'model': model_state, 'optimizer': optimizer_state,
                     'scaler': scaler.state_dict() if scaler.is_enabled() else None,
                     'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                     'config': config, 'meta': meta, 'sampler': sampler.get_state(), 'rng': rngs,
                     'bad_steps': int(bad_steps.item())}, os.path.join(out_dir, name))
        print(f"saved checkpoint at step {iter_num} to {os.path.join(out_dir, name)}")


def log(record):
    """append one record to out_dir/log.jsonl (every key always present) and to wandb"""
    full = {k: record.get(k) for k in ('iter', 'loss', 'train_loss', 'val_loss', 'hellaswag', 'lr', 'grad_norm',
                                       'tokens_per_sec', 'mfu', 'time')}
    full['time'] = time.time()
    os.makedirs(out_dir, exist_ok=True)
    with open(log_path, 'a') as f:
        f.write(json.dumps(full) + '\n')
    if wandb_log:
        wandb.log({k: v for k, v in full.items() if v is not None and k != 'iter'}, step=full['iter'])


def encoder():
    """text <-> ids for samples: the char vocabulary of the dataset, or GPT-2's BPE"""
    if meta:
        stoi = {c: i for i, c in enumerate(meta['itos'])}
        return (lambda s: [stoi[c] for c in s if c in stoi]), (lambda ids: ''.join(meta['itos'][i] for i in ids))
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')  # GPT-2's BPE
    return enc.encode_ordinary, enc.decode


# preemption: SIGTERM / SIGINT ask for a checkpoint at the next step boundary, then a clean exit
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    if stop_requested and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    stop_requested = True
    print(f"[rank {rank}] got signal {signum}: checkpointing at the end of this step", file=sys.stderr)


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)

log_path = os.path.join(out_dir, 'log.jsonl')
if master and not eval_only and os.path.exists(log_path):
    # a resumed run drops the records past its checkpoint (those steps run again, and the eval at the checkpoint
    # step is redone); a new run in an old out_dir starts a new log, as it will overwrite the checkpoint
    kept = []
    if init_from == 'resume':
        with open(log_path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    if r['iter'] < iter_num or (r['iter'] == iter_num and r['val_loss'] is None):
                        kept.append(line)
                except (ValueError, KeyError):
                    pass  # a line cut short by a crash
    with open(log_path + '.tmp', 'w') as f:
        f.writelines(kept)
    os.replace(log_path + '.tmp', log_path)
if hellaswag_interval:  # every process scores its share of the examples at each HellaSwag step
    import hellaswag
    hellaswag_examples = hellaswag.load_examples(limit=hellaswag_limit, data_dir=hellaswag_dir or hellaswag.data_dir)
if wandb_log and master and not eval_only:
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

print0(f"tokens per step: {tokens_per_iter:,} ({world_size} process(es) x {accum_local} micro-steps x "
       f"{batch_size} x {block_size}); device {device}, dtype {dtype}, compile {compile}")
print0(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, attn_type {model_args['attn_type']}")

# -- training loop ---------------------------------------------------------------------
t_log, last_log_iter, local_loss = time.time(), iter_num, torch.zeros((), device=device)
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        losses = estimate_loss()
        record = {'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'], 'lr': lr}
        if hellaswag_interval and (iter_num % hellaswag_interval == 0 or iter_num >= max_iters):
            # under FSDP every process scores every example: each forward needs all of them (to gather weights)
            hs = hellaswag.evaluate(raw_model, device, hellaswag_examples, ctx=ctx, rank=0 if fsdp else rank,
                                    world_size=1 if fsdp else world_size)
            record['hellaswag'] = hs['acc_norm']
        print0(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}" +
               (f", hellaswag {record['hellaswag']:.4f}" if 'hellaswag' in record else ''))
        if eval_only:
            break
        if master:
            log(record)
        if iter_num > 0 and math.isfinite(losses['val']) and (losses['val'] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint()
        t_log = time.time()  # don't count evaluation in the step time
    if checkpoint_interval and iter_num % checkpoint_interval == 0 and iter_num > 0 and not eval_only:
        save_checkpoint(f'ckpt_{iter_num:06d}.pt')  # kept: resume from it by copying it to ckpt.pt
        t_log = time.time()
    if iter_num >= max_iters:
        break
    if sample_interval and iter_num % sample_interval == 0 and (master or fsdp):  # FSDP: all generate, rank 0 prints
        encode, decode = encoder()
        x = torch.tensor([encode(sample_prompt) or [0]] * num_samples, dtype=torch.long, device=device)
        raw_model.eval()
        with torch.random.fork_rng(devices=[device] if device_type == 'cuda' else []), ctx:
            torch.manual_seed(seed + iter_num)  # sampling must not move the training RNG (exact resume)
            y = raw_model.generate(x, sample_tokens, temperature=1.0, top_k=50)
        raw_model.train()
        for i in range(num_samples if master else 0):
            print(f"sample {i}: {decode(y[i].tolist())!r}")

    # one optimizer step: accum_local micro-steps here, gradients averaged over processes by DDP / FSDP
    batches = draw('train', gradient_accumulation_steps, sampler)
    X, Y = get_batch('train', batches[0])
    for micro_step in range(accum_local):
        last = micro_step == accum_local - 1
        if fsdp:  # reduce-scatter only on the last micro-step; until then gradients add up unsharded
            raw_model.set_requires_gradient_sync(last)
        with (model.no_sync() if ddp and not fsdp and not last else nullcontext()):  # DDP: all-reduce on the last
            with ctx:
                _, loss = model(X, Y)
                loss = loss / accum_local
            if not last:
                X, Y = get_batch('train', batches[micro_step + 1])  # prefetch while the device computes
            scaler.scale(loss).backward()
        local_loss += loss.detach().float()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    if fsdp:
        grad_norm = grad_norm.full_tensor()  # a replicated DTensor: the norm over all shards, the same everywhere
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss.detach())  # loss too: a NaN loss can give NaN grads
    bad_steps = torch.where(finite, torch.zeros_like(bad_steps), bad_steps + 1)
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips non-finite steps itself
        scaler.update()
    elif optimizer.defaults.get('fused'):
        optimizer.found_inf = (~finite).float()  # fused AdamW skips the update on device: no host sync
        optimizer.step()
    elif finite.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % log_interval == 0 or (stop_requested and not ddp):  # processes agree at log steps
        stop = torch.tensor(float(stop_requested), device=device)
        if ddp:  # every process must agree to stop at the same step
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        lossf = all_mean(local_loss / (iter_num - last_log_iter)).item()
        n_bad = int(bad_steps.item())
        dt = (time.time() - t_log) / (iter_num - last_log_iter)
        mfu = raw_model.estimate_mfu(batch_size * accum_local, dt, peak)
        tps = tokens_per_iter / dt
        if master:
            print(f"step {iter_num} | loss {lossf:.4f} | lr {lr:.2e} | norm {grad_norm.item():.2f} | dt {dt * 1000:.2f}ms"
                  f" | {tps / block_size:,.1f} samples/s | {tps:,.0f} tok/s | " +
                  (f"mfu {mfu * 100:.2f}%" if mfu is not None else "mfu n/a") + (f" | skipped {n_bad}" if n_bad else ''))
            log({'iter': iter_num, 'loss': lossf, 'lr': lr, 'grad_norm': grad_norm.item(), 'tokens_per_sec': tps,
                 'mfu': mfu})
        if n_bad >= max_bad_steps:
            print0(f"error: {n_bad} steps in a row had a non-finite loss or gradient norm; stopping. The last good "
                   f"checkpoint is in {out_dir}; try a lower --learning_rate, --grad_clip, or dtype float32",
                   file=sys.stderr)
            if ddp:
                dist.destroy_process_group()
            sys.exit(3)
        t_log, last_log_iter, local_loss = time.time(), iter_num, torch.zeros((), device=device)
        if stop.item():
            save_checkpoint()
            print0(f"stopped on request at step {iter_num}; continue with --init_from=resume")
            break

if wandb_log and master and not eval_only:
    wandb.finish()
if ddp:
    # leave together, and drop DDP (its gloo work holds tensors) before the group: a process torn down while
    # another still saves, or with gloo threads alive at interpreter exit, can abort in gloo's destructors
    dist.barrier()
    del model
    dist.destroy_process_group()
