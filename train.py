"""
Train a GPT, on one device or many:
$ python train.py config/train_shakespeare_char.py
$ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py        # DDP; --fsdp=True shards instead
Two nodes, Slurm's srun, FSDP: see the README. Every global below can be set by a config file or a --key=value flag
(configurator.py). The file reads top to bottom: settings, checks, processes and devices, data, model, optimizer,
checkpoints, evaluation and learning-rate schedule, the loop. The hardware decisions (which GPU, dtype, compile,
peak FLOP/s) and the mechanics of files, batches and generators are in runtime.py.
"""

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import autobatch
import chat_format
import lora
import memory
from configurator import configure, fail, sources, unused, writable_dir
from dataprep import gpt2_encoding
from files import lock_dir
from model import GPT, GPT2_ARCH, GPTConfig, check_arch
from quantize import cast_weights
from runtime import (append_log, autocast, check_wandb, device_peak_flops, draw_offsets, eval_offsets, fsdp_shard,
                     grad_scaler, leave_processes, load_checkpoint, load_optimizer_state,
                     model_from_checkpoint, open_token_files, pick_compile, pick_device, pick_dtype, print0,
                     read_batch, rng_state, save_atomic, set_rng_state, slurm_as_torchrun, step_optimizers,
                     stop_on_signals, sync, trim_log)
from runtime import check_launcher, refuse_non_finite
from runtime import compile_scoring, compile_static, unscale

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
overwrite = False  # let a fresh run replace the run already in out_dir (otherwise it refuses)
eval_interval = 2000  # evaluate (and checkpoint) every this many steps
log_interval = 1  # print a log line every this many steps (the only host sync in the loop)
eval_iters = 200  # batches per split for the loss estimate
eval_full = False  # val loss over every non-overlapping block of val.bin once (exact) instead of eval_iters random batches
eval_only = False  # evaluate once and exit, writing nothing
always_save_checkpoint = True  # checkpoint at every eval; False: ckpt.pt keeps the best val loss, a stop saves ckpt_last.pt
checkpoint_interval = 0  # also keep a copy every this many steps as ckpt_<step>.pt; 0 = never
init_from = 'scratch'  # 'scratch', 'resume' (out_dir), 'finetune' (finetune_from), 'gpt2*' or a local HF GPT-2 dir
finetune_from = ''  # for init_from='finetune': run dir whose ckpt.pt to start from (default: out_dir)
# logging
wandb_log = False  # also log every metric to Weights & Biases (imported only then)
wandb_project = 'owt'
wandb_run_name = 'gpt2'
sample_interval = 0  # every this many steps, print samples from the model; 0 = never
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
auto_batch = False  # find the largest micro-batch that fits by trial steps; micro-steps set so tokens per step stay
block_size = 1024
chat_mask = True  # chat datasets (data/chat/prepare.py): learn only the assistant's tokens; False: every token
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = False  # bias in Linears and LayerNorms (GPT-2 had them; without is a bit better and faster)
attn_type = 'SM'  # attention: SM, GK, GKpoly-<n>, PA_<act> (see model.py)
# architecture (model.py, docs/ARCHITECTURE.md; config/modern.py sets the ones that paid): the defaults are GPT-2
pos_emb = 'learned'  # 'learned' position table, or 'rope' (rotary q and k)
norm = 'layernorm'  # or 'rmsnorm'
qk_norm = False  # RMS-normalise q and k per head before attention
mlp_act = 'gelu'  # or 'relu2' (squared ReLU)
tie_embeddings = True  # False: the LM head gets its own weights
logit_softcap = 0.0  # > 0: logits = c * tanh(logits / c)
zero_init = False  # the blocks' output projections start at zero
activation_checkpointing = False  # recompute each block in backward: far less activation memory, ~1/3 more compute
# LoRA (lora.py): train low-rank adapters on a frozen base; the checkpoint holds only them and the base's identity
lora_rank = 0  # the adapters' rank; 0 = off (every weight trains)
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_layers = 'attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj'  # which Linears of every block get adapters
# optimizer
optimizer = 'adamw'  # 'adamw', or 'muon': Muon for the weight matrices inside the blocks, AdamW for the rest
learning_rate = 6e-4  # max learning rate (AdamW's)
muon_lr = 0.02  # max learning rate of the Muon matrices (optimizer='muon'); the schedule scales it like learning_rate
muon_momentum = 0.95
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
backend = 'auto'  # process-group backend: 'auto' = nccl on CUDA, gloo otherwise
fsdp = False  # with several processes: shard the model over them (FSDP2) instead of DDP; not taken from a resumed run
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda' (under torchrun: the GPU of the local rank), 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where native, float16 + GradScaler on older GPUs, float32 on cpu), or set one
compile = None  # torch.compile the model; None = on for CUDA GPUs that support it, off elsewhere
compile_mode = 'default'  # or 'max-autotune': minutes more compiling for faster kernels; 'reduce-overhead': CUDA graphs
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]
overrides = configure(globals())
flags = {k for k in overrides if sources[k].startswith('--')}  # typed on the command line; the rest came from config files


def give_way(keys, to):
    """one note naming the config-file values that the checkpoint or pretrained weights overrule (flags are refused)"""
    by_file = {}
    for k in keys:
        if k in overrides and k not in flags:
            by_file.setdefault(sources[k], []).append(f"{k}={overrides[k]!r}")
    if by_file:
        said = '; '.join(', '.join(kv) + ' from ' + f for f, kv in by_file.items())
        print0(f"note: {said} {'give' if sum(map(len, by_file.values())) > 1 else 'gives'} way to {to}", file=sys.stderr)


memory.explain_oom("--batch_size or --block_size, or set --activation_checkpointing=True (or train a smaller model)")
ckpt, ckpt_path = None, None
if init_from == 'resume':  # continue with the run's own settings, except those given again here
    ckpt_path = os.path.join(out_dir, 'ckpt_last.pt')  # only there when it is newer than ckpt.pt (see save_checkpoint)
    ckpt_path = ckpt_path if os.path.exists(ckpt_path) else os.path.join(out_dir, 'ckpt.pt')
    ckpt = load_checkpoint(ckpt_path)
    missing = [k for k in ('optimizer', 'iter_num', 'best_val_loss', 'config', 'sampler', 'rng') if k not in ckpt]
    if missing:
        fail(f"{ckpt_path} cannot be resumed (it has no {missing[0]}); start from its weights with "
             f"--init_from=finetune --finetune_from={out_dir} and a new --out_dir")
    own = ('init_from', 'out_dir', 'fsdp', 'overwrite', 'eval_only')  # this command's choices, never the run's
    taken = {k: v for k, v in ckpt['config'].items() if k in config_keys and k not in flags and k not in own}
    give_way([k for k, v in taken.items() if globals()[k] != v],
             "the checkpoint's (a resume continues its own run; a --key=value flag changes a setting)")
    globals().update(taken)
config = {k: globals()[k] for k in config_keys}  # everything this run was configured with, for the checkpoint

# -- check the settings before anything is started or written -------------------
for name, least in (('batch_size', 1), ('block_size', 1), ('gradient_accumulation_steps', 1), ('eval_interval', 1),
                    ('log_interval', 1), ('eval_iters', 1), ('max_bad_steps', 1), ('max_iters', 0), ('warmup_iters', 0),
                    ('lr_decay_iters', 1), ('checkpoint_interval', 0), ('sample_interval', 0), ('sample_tokens', 1),
                    ('num_samples', 1), ('hellaswag_interval', 0), ('lora_rank', 0)):
    if globals()[name] < least:
        fail(f"{name} must be an integer >= {least}, got {globals()[name]!r}")
for ok, what in ((learning_rate > 0, 'learning_rate must be positive'), (min_lr >= 0, 'min_lr must be >= 0'),
                 (muon_lr > 0, 'muon_lr must be positive'), (0 <= muon_momentum < 1, 'muon_momentum must be in [0, 1)'),
                 (weight_decay >= 0, 'weight_decay must be >= 0'), (grad_clip >= 0, 'grad_clip must be >= 0 (0 = off)'),
                 (0 <= beta1 < 1 and 0 <= beta2 < 1, 'beta1 and beta2 must be in [0, 1)'),
                 (0 <= seed < 2**31, 'seed must be in [0, 2**31)'),
                 (lora_alpha > 0, 'lora_alpha must be positive'), (0 <= lora_dropout < 1, 'lora_dropout must be in [0, 1)'),
                 (hellaswag_limit is None or (isinstance(hellaswag_limit, int) and hellaswag_limit > 0),
                  'hellaswag_limit must be a positive integer or None')):
    if not ok:
        fail(f"{what}; check the flag or config file that sets it")
try:
    check_arch(**{k: globals()[k] for k in GPT2_ARCH})
except ValueError as e:
    fail(str(e))
if compile_mode not in ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'):
    fail(f"unknown compile_mode '{compile_mode}'; use default, reduce-overhead, max-autotune or "
         f"max-autotune-no-cudagraphs")
if optimizer not in ('adamw', 'muon'):
    fail(f"unknown optimizer '{optimizer}'; use adamw or muon")
if auto_batch and fsdp:
    fail("auto_batch=True finds the micro-batch by trial steps on each process's whole model, and FSDP shards it over "
         "the processes: set --batch_size with --fsdp=True")
if lora_rank and fsdp:
    fail("lora_rank > 0 with fsdp=True is not supported: a LoRA run holds the frozen base plus small adapters, which "
         "fits each GPU where full fine-tuning does not; train with DDP (drop --fsdp)")
if optimizer == 'muon' and fsdp:
    fail("optimizer='muon' orthogonalises each weight matrix's update, which needs the whole matrix, and FSDP shards "
         "them: train with DDP (drop --fsdp) or use --optimizer=adamw")
if init_from not in ('scratch', 'resume', 'finetune') and not init_from.startswith('gpt2') and not os.path.isdir(init_from):
    fail(f"unknown init_from '{init_from}'; use scratch, resume, finetune, gpt2, gpt2-medium, gpt2-large, "
         f"gpt2-xl or a local Hugging Face GPT-2 directory")
def taken():
    """why a fresh run may not write out_dir ('' if it may): another run's checkpoint is there"""
    if init_from != 'resume' and not overwrite and any(os.path.exists(os.path.join(out_dir, f))
                                                       for f in ('ckpt.pt', 'ckpt_last.pt')):
        return (f"out_dir '{out_dir}' already holds a run; continue it with --init_from=resume, or replace it with "
                f"--overwrite=True (or choose another --out_dir)")
    return ''


if not eval_only:
    writable_dir(out_dir, '--out_dir')
    if taken():
        fail(taken())

# -- processes and devices ---------------------------------------------------------
slurm_as_torchrun()
check_launcher()
ddp = 'RANK' in os.environ  # launched by torchrun (or srun)?
if fsdp and not ddp:
    fail("fsdp=True shards the model over several processes: launch with torchrun (or srun), or drop --fsdp")
rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
master = rank == 0
device = pick_device(device)  # a torch.device with the GPU index this process owns, made current
device_type = device.type
dtype = pick_dtype(dtype, device)
compile = pick_compile(compile, device)
# flags given that have no effect in this combination: said once, never silently dropped
for keys, off, why in ((('compile_mode',), not compile, 'with compile off'),
                       (('muon_lr', 'muon_momentum'), optimizer != 'muon', f"with optimizer='{optimizer}'"),
                       (('finetune_from',), init_from != 'finetune', f"with init_from='{init_from}'"),
                       (('warmup_iters', 'lr_decay_iters', 'min_lr'), not decay_lr, 'with decay_lr=False'),
                       (('sample_prompt', 'sample_tokens', 'num_samples'), not sample_interval, 'with sample_interval=0'),
                       (('hellaswag_limit', 'hellaswag_dir'), not hellaswag_interval, 'with hellaswag_interval=0'),
                       (('wandb_project', 'wandb_run_name'), not wandb_log, 'with wandb_log=False'),
                       (('overwrite',), init_from == 'resume', 'with init_from=resume (it continues its own run)'),
                       (('auto_batch',), eval_only, 'with eval_only=True'),
                       (('lora_alpha', 'lora_dropout', 'lora_layers'), not lora_rank, 'with lora_rank=0'),
                       (('optimizer', 'muon_lr', 'muon_momentum'), lora_rank and optimizer == 'muon',
                        'with lora_rank > 0: the adapters train with AdamW (see lora.py)')):
    if off:
        unused(keys, why)
if fsdp and device_type == 'cpu' and dtype != 'float32':  # its blocks' float32 stream meets bf16 LayerNorm weights
    fail(f"fsdp=True in {dtype} needs GPUs (CPU autocast runs LayerNorm only in its input's dtype); use --dtype=float32")
backend = ('nccl' if device_type == 'cuda' else 'gloo') if backend == 'auto' else backend
if backend == 'nccl' and device_type != 'cuda':
    fail(f"backend nccl needs CUDA GPUs, and this run is on {device_type}; use --backend=auto (gloo)")
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the number of "
         f"processes ({world_size}); pick a multiple of {world_size}")
accum_local = gradient_accumulation_steps // world_size  # micro-steps this process runs per step
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
wandb = check_wandb() if wandb_log and master and not eval_only else None

# -- data: train.bin / val.bin are uint16 token ids, memmapped once ----------------------
data_dir = data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
splits, meta = open_token_files(data_dir, dataset, block_size)  # meta: a char vocabulary, or None for GPT-2 BPE
chat, chat_info, chat_note = chat_format.open_dataset(data_dir, splits, block_size)  # None: plain text
if chat:
    print0(chat_note)
else:
    unused(('chat_mask',), 'on a plain-text dataset')
if chat and eval_full:
    fail("eval_full=True is for plain-text datasets (it scores every block once); a chat dataset is evaluated on "
         "random conversations: drop --eval_full")
# windows to draw per split: for a chat dataset, its conversations (a window number is looked up in get_batch)
n_windows = {s: len(chat[s]['starts']) + block_size + 1 if chat else len(t) for s, t in splits.items()}
if hellaswag_interval:  # examples (downloaded once) are checked now, before any file is touched
    if meta:
        fail("hellaswag_interval needs a GPT-2 BPE model; this dataset is char-level: set --hellaswag_interval=0")
    import hellaswag
    hellaswag_examples = hellaswag.load_examples(limit=hellaswag_limit, data_dir=hellaswag_dir or hellaswag.data_dir)
if meta:  # text <-> ids for samples: the dataset's characters, or GPT-2's BPE
    stoi = {c: i for i, c in enumerate(meta['itos'])}
    unknown = sorted(set(sample_prompt) - set(stoi)) if sample_interval else []
    if unknown:
        fail(f"sample_prompt has characters outside this dataset's vocabulary: {''.join(unknown)!r}; remove them or "
             f"set another --sample_prompt")
    encode, decode = (lambda s: [stoi[c] for c in s]), (lambda ids: ''.join(meta['itos'][i] for i in ids))
elif sample_interval:
    enc = gpt2_encoding()
    encode, decode = enc.encode_ordinary, enc.decode

# -- the model -----------------------------------------------------------------
def take_shape(have, source, fix):
    """the weights being loaded fix these settings: a value from a config file (or a default) gives way, with a
    note; a flag typed on the command line that contradicts them is a mistake, not a request: one line"""
    differ = [k for k, v in have.items() if globals()[k] != v]
    for k in differ:
        if k in flags:
            fail(f"{sources[k]} on the command line conflicts with {source}'s {k}={have[k]!r}; {fix}")
    give_way(differ, f"{source}'s")
    globals().update(have)
    config.update(have)


def check_fits(n_params, n_layer, n_embd, vocab_size, trainable=None):
    """one line, before anything is allocated or written, when the least memory the run needs exceeds the device's"""
    memory.check(memory.training(n_params, n_layer, n_embd, block_size, vocab_size, 1 if auto_batch else batch_size,
                                 dtype, None if eval_only else optimizer, world_size if fsdp else 1,
                                 activation_checkpointing, gradient_accumulation_steps + eval_iters, trainable),
                 device, 'train.py')


torch.manual_seed(seed)  # the same initial weights on every process
iter_num, best_val_loss, lora_run = 0, 1e9, None
try:
    if init_from == 'scratch':
        vocab_size = meta['vocab_size'] if meta else 50257
        check_fits(memory.params(n_layer, n_embd, block_size, vocab_size), n_layer, n_embd, vocab_size,
                   lora.n_params(n_layer, n_embd, lora_rank, lora_layers) if lora_rank else None)  # before building
        print0(f"initializing a new model from scratch, vocab_size {vocab_size}")
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                              vocab_size=vocab_size, dropout=dropout, attn_type=attn_type,
                              **{k: globals()[k] for k in GPT2_ARCH}))
    elif init_from in ('resume', 'finetune'):
        if init_from == 'finetune':
            ckpt_path = os.path.join(finetune_from or out_dir, 'ckpt.pt')
            print0(f"finetuning from {ckpt_path}")
            ckpt = load_checkpoint(ckpt_path)
        args = ckpt['model_args']  # the same weights, so the same shape (a finetune may change the attention)
        same = {k: args[k] for k in ('n_layer', 'n_head', 'n_embd', 'bias')}
        same.update({k: args.get(k, v) for k, v in GPT2_ARCH.items()})  # the weights' architecture (older: GPT-2's)
        if init_from == 'resume':
            if bool(ckpt.get('chat')) != bool(chat):
                fail(f"{ckpt_path} was trained on {'a chat' if ckpt.get('chat') else 'a plain-text'} dataset and "
                     f"{data_dir} holds {'a chat' if chat else 'a plain-text'} one; resume on its own kind of data, or "
                     f"start a new run from it with --init_from=finetune")
            same.update(attn_type=args['attn_type'], block_size=args['block_size'],
                        optimizer=ckpt['config'].get('optimizer', 'adamw'),
                        **{k: ckpt['config'].get(k, globals()[k]) for k in ('lora_rank', 'lora_alpha', 'lora_layers')})
        take_shape(same, 'the checkpoint', "drop the flag, or start a new run with init_from='finetune' and a new "
                                           "out_dir" if init_from == 'resume' else "drop the flag")
        keep = {'dropout': dropout, 'attn_type': attn_type if 'attn_type' in overrides else args['attn_type']}
        if init_from == 'resume' and 'lora' in ckpt:  # the adapters over their base, unmerged: they train on
            model, lora_run = lora.from_checkpoint(ckpt, keep, ckpt_path, merge_adapters=False), ckpt['lora']
        else:  # (a finetune from a LoRA run starts from its merged weights)
            model = model_from_checkpoint(ckpt, keep, ckpt_path)
        if init_from == 'resume':
            iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    else:
        take_shape(dict(GPT2_ARCH), init_from, "GPT-2's architecture is fixed: drop the flag, or train from "
                                               "scratch")  # before any download
        print0(f"initializing from OpenAI GPT-2 weights: {init_from}")
        model = GPT.from_pretrained(init_from, dict(dropout=dropout, attn_type=attn_type))
        take_shape({k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'bias')},
                   init_from, "a pretrained model's shape is fixed: drop the flag")
        refuse_non_finite(model.state_dict(), init_from, 'weights')
except (ValueError, OSError) as e:
    fail(str(e))
if block_size > model.config.block_size and 'block_size' not in flags:  # a config file's (or the default) context
    give_way(['block_size'], f"the model's block_size={model.config.block_size}")
    block_size = config['block_size'] = model.config.block_size
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if block_size > model.config.block_size:
    fail(f"block_size {block_size} is larger than the model's {model.config.block_size}; use --block_size<="
         f"{model.config.block_size}")
if block_size < model.config.block_size:
    model.crop_block_size(block_size)
if lora_rank and lora_run is None:  # adapters on the base as it is now (cropped): its hash is what they belong to
    layers = lora.check_layers(model, lora_layers)
    base = lora.base_identity(model, f"scratch:{seed}" if init_from == 'scratch' else
                              f"run:{finetune_from or out_dir}" if init_from == 'finetune' else init_from)
    lora.apply(model, lora_rank, lora_alpha, lora_dropout, layers)
    lora_run = {'rank': lora_rank, 'alpha': lora_alpha, 'dropout': lora_dropout, 'layers': list(layers), 'base': base}
model_args = asdict(model.config)
model.activation_checkpointing = activation_checkpointing
check_fits(sum(p.numel() for p in model.parameters()), model_args['n_layer'], model_args['n_embd'], model_args['vocab_size'],
           sum(p.numel() for p in model.parameters() if p.requires_grad))
if meta and meta['vocab_size'] != model.config.vocab_size:
    fail(f"dataset vocab ({meta['vocab_size']}) differs from the model's ({model.config.vocab_size}); "
         f"a char-level dataset needs a model trained on it")
for split, tokens in splits.items():  # bad token ids: check the start of each file now (and every batch later)
    top = int(tokens[:10_000_000].max())
    if top >= model_args['vocab_size']:
        fail(f"{split}.bin in {data_dir} holds token id {top} but the model's vocabulary has {model_args['vocab_size']}"
             f"; re-run the dataset's prepare.py, or the data and the model don't belong together")
model.to(device)

# -- processes talk; the model is sharded (FSDP), compiled and wrapped (DDP), in that order ---------------
if ddp:  # device_id binds the group to this process's GPU (and connects NCCL at once)
    dist.init_process_group(backend, device_id=device if device_type == 'cuda' else None)
if auto_batch and not eval_only:  # before compile and DDP: trials run eager, each process on its own GPU
    n_params = sum(p.numel() for p in model.parameters())
    per_seq = memory.training(n_params, model_args['n_layer'], model_args['n_embd'], block_size,
                              model_args['vocab_size'], 1, dtype, optimizer, 1, activation_checkpointing)
    per_seq = per_seq['one micro-batch'][0]  # off CUDA, trials stay below half the memory: no kernel OOM kill
    # held aside during trials: AdamW's two moments (Muon's one momentum is less), DDP's gradient buckets, and a
    # twentieth of the memory for what a trial does not hold (the optimizer's temporaries, fragmentation)
    reserve = (8 + 4 * ddp) * n_params + memory.device_memory(device) // 20
    batch_size = autobatch.choose(model, accum_local * batch_size, block_size, model_args['vocab_size'], device,
                                  autocast(device_type, dtype), reserve, ddp=ddp, log=print0,
                                  limit=None if device_type == 'cuda' else memory.device_memory(device) // (2 * per_seq))
    if not batch_size:
        print0(f"error: auto_batch=True: not even one sequence of block_size {block_size} fits this device's memory "
               f"beside the optimizer state; lower --block_size, set --activation_checkpointing=True, or train a "
               f"smaller model", file=sys.stderr)
        if ddp:
            leave_processes(2)
        sys.exit(2)
    accum_local = tokens_per_iter // (world_size * batch_size * block_size)
    gradient_accumulation_steps = accum_local * world_size
    # a resumed run keeps this micro-batch (its batches, hence exact resume, depend on it)
    config.update(batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps, auto_batch=False)
raw_model = model  # the GPT itself (sharded under FSDP), whatever compile and DDP wrap around it below
if fsdp:
    fsdp_shard(model, device_type, dtype, world_size, compile_mode if compile else None)
elif compile:
    print0("compiling the model... (takes a ~minute)")
    model = compile_static(model, compile_mode)  # the training step's shapes, whatever ran first
if ddp and not fsdp:
    model = DDP(model, device_ids=[device.index] if device_type == 'cuda' else None)
ctx = autocast(device_type, dtype)
# HellaSwag and the samples: their own compiled graphs, bounded (compile_scoring; generate's prefill and decode). Under
# FSDP dynamo compiles only per block (it cannot trace FSDP's hooks), where each of their lengths would be a graph of
# its own: they run eager there, and the blocks' graphs stay the training step's and the evals'
scorer = compile_scoring(raw_model) if compile and not fsdp else raw_model
inference = (lambda: torch.compiler.set_stance('force_eager')) if compile and fsdp else nullcontext
peak = device_peak_flops(device, dtype)  # for MFU: None on CPU and unknown GPUs

# -- optimizer: made after sharding, so under FSDP it updates only this process's shards ----------------
# (fused AdamW everywhere, FSDP in float16 included: step_optimizers hands it its found_inf, not the sharded scaler)
optimizers = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                            muon_lr=muon_lr if optimizer == 'muon' and not lora_run else None,
                                            muon_momentum=muon_momentum)
scaler = grad_scaler(device_type, dtype, sharded=fsdp)
if init_from == 'resume':
    load_optimizer_state(raw_model, optimizers, ckpt['optimizer'], fsdp, ckpt_path)
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
    if rank < len(ckpt['rng']):  # a run resumed on more processes: the new ones keep their fresh seeds
        set_rng_state(ckpt['rng'][rank], device_type)
ckpt = None  # free it


# -- batches, evaluation, learning-rate schedule --------------------------------------------------------
def get_batch(split, offsets):
    """tokens at the given start offsets -> x, y of shape (len(offsets), block_size) on the device"""
    if chat:
        offsets = chat[split]['starts'][offsets]  # window numbers -> the starts of conversations
    try:
        x, y = read_batch(splits[split], offsets, block_size, device, model_args['vocab_size'])
        return (x, chat_format.mask_targets(y, chat[split]['mask'], offsets, block_size)) if chat and chat_mask else (x, y)
    except ValueError as e:
        fail(f"{split}.bin in {data_dir} {e}; re-run the dataset's prepare.py or fix --dataset")


def all_sum(t):
    """sum a tensor over processes (a no-op in one process)"""
    if ddp:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def estimate_loss():
    """mean loss per split, its batches split across processes; with eval_full the val loss is exact"""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for offsets, weight in eval_offsets(n_windows[split], block_size, batch_size, eval_iters,
                                            eval_full and split == 'val', seed, rank, world_size):
            X, Y = get_batch(split, offsets)
            with ctx:
                _, loss = model(X, Y)
            total, count = total + loss.float() * weight, count + weight
        out[split] = (all_sum(total) / all_sum(count)).item()
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


# -- checkpoints and the log ------------------------------------------------------------
def save_checkpoint(name):
    """everything needed to continue exactly: weights, optimizer (keyed by parameter name, whole tensors, the same file
    with or without FSDP), scaler, step, every RNG, the sampler. ckpt_last.pt exists only while newer than ckpt.pt."""
    rngs = [None] * world_size
    if ddp:
        dist.all_gather_object(rngs, rng_state(device_type))
    else:
        rngs = [rng_state(device_type)]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # under FSDP: gathered to rank 0's CPU
    model_state = get_model_state_dict(raw_model, options=options) if fsdp else raw_model.state_dict()
    if lora_run:  # the adapters alone, and what identifies the base they belong to
        model_state = lora.adapters(raw_model)
    optimizer_state = get_optimizer_state_dict(raw_model, optimizers, options=options)
    if master:
        if not lora_run and raw_model.config.tie_embeddings:
            model_state['lm_head.weight'] = model_state['transformer.wte.weight']  # tied: one tensor in the file
        os.makedirs(out_dir, exist_ok=True)
        try:
            save_atomic({'model': model_state, 'optimizer': optimizer_state,
                         'scaler': scaler.state_dict() if scaler.is_enabled() else None,
                         'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                         'config': config, 'meta': meta, 'sampler': sampler.get_state(), 'rng': rngs,
                         'bad_steps': int(bad_steps.item()), 'chat': chat_info, **({'lora': lora_run} if lora_run else {})},
                        os.path.join(out_dir, name))
        except OSError as e:
            fail(str(e))
        if name == 'ckpt.pt' and os.path.exists(os.path.join(out_dir, 'ckpt_last.pt')):
            os.remove(os.path.join(out_dir, 'ckpt_last.pt'))  # older now: resume must take ckpt.pt
        print(f"saved checkpoint at step {iter_num} to {os.path.join(out_dir, name)}", flush=True)


log_path = os.path.join(out_dir, 'log.jsonl')
stop = stop_on_signals(rank)  # preemption: checkpoint at the next step, then exit cleanly

# every check has passed: only now are files touched, by one run at a time. Another run writing out_dir stops this
# one (every process of it); the lock dies with its process, so a killed run never blocks the next
busy = ''
if master and not eval_only:
    holder = lock_dir(out_dir)
    busy = (f"out_dir '{out_dir}' is in use by another run ({holder}); wait for it to end or stop it, or choose another "
            f"--out_dir" if holder else taken())  # taken() again: a fresh run may have begun and ended since the check
if ddp:
    agreed = [busy]
    dist.broadcast_object_list(agreed, src=0)
    if agreed[0]:
        print0(f"error: {agreed[0]}", file=sys.stderr)
        leave_processes(2)
if busy:
    fail(busy)
if master and not eval_only:
    trim_log(log_path, iter_num)  # a fresh run (iter 0) starts an empty log
    if init_from != 'resume' and os.path.exists(os.path.join(out_dir, 'ckpt_last.pt')):
        os.remove(os.path.join(out_dir, 'ckpt_last.pt'))  # a fresh run (--overwrite): the old stop point is not ours
    if wandb:
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

print0(f"tokens per step: {tokens_per_iter:,} ({world_size} process(es) x {accum_local} micro-steps x "
       f"{batch_size} x {block_size}); device {device}, dtype {dtype}, compile {compile}, optimizer {optimizer}")
print0(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, attn_type {model_args['attn_type']}" +
       (f", LoRA rank {lora_run['rank']} on {','.join(lora_run['layers'])}: "
        f"{sum(p.numel() for p in raw_model.parameters() if p.requires_grad) / 1e6:.3f}M trainable" if lora_run else ''))

# -- training loop ---------------------------------------------------------------------
# dt, tokens/s and MFU cover only the steps timed in each window: evals, checkpoints, samples and the first step
# (compilation) restart the window, so nothing untimed is credited to the steps around it
t_window, steps_window, first_step = time.time(), 0, True
last_log_iter, local_loss = iter_num, torch.zeros((), device=device)
while True:
    lr = get_lr(iter_num)
    for opt, top in zip(optimizers, (learning_rate, muon_lr)):  # Muon's peak lr is scaled as AdamW's is
        for group in opt.param_groups:
            group['lr'] = top * lr / learning_rate

    do_eval = iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only
    do_hellaswag = hellaswag_interval and (iter_num % hellaswag_interval == 0 or iter_num >= max_iters or eval_only)
    if do_eval or do_hellaswag:
        record = {'iter': iter_num, 'lr': lr}
        if do_eval:
            losses = estimate_loss()
            record.update(train_loss=losses['train'], val_loss=losses['val'])
        if do_hellaswag:  # every process scores its share (under FSDP, all take part in every forward)
            with inference():
                record['hellaswag'] = hellaswag.evaluate(scorer, device, hellaswag_examples, ctx=ctx, rank=rank,
                                                         world_size=world_size)['acc_norm']
        print0(f"step {iter_num}:" + (f" train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}"
                                      + (", every val block once" if eval_full else '') if do_eval else '') +
               (f"{',' if do_eval else ''} hellaswag {record['hellaswag']:.4f}" if do_hellaswag else ''))
        if eval_only:
            break
        if master:
            append_log(log_path, record, wandb)
        if do_eval and iter_num > 0 and math.isfinite(losses['val']) and (losses['val'] < best_val_loss
                                                                            or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint('ckpt.pt')
        t_window, steps_window = time.time(), 0
    if checkpoint_interval and iter_num % checkpoint_interval == 0 and iter_num > 0:
        save_checkpoint(f'ckpt_{iter_num:06d}.pt')  # kept: resume from it by copying it to ckpt.pt
        t_window, steps_window = time.time(), 0
    if iter_num >= max_iters:
        break
    if sample_interval and iter_num % sample_interval == 0 and (master or fsdp):  # FSDP: all generate, rank 0 prints
        x = torch.tensor([encode(sample_prompt) or [0]] * num_samples, dtype=torch.long, device=device)
        raw_model.eval()
        with torch.random.fork_rng(devices=[device] if device_type == 'cuda' else []), ctx, inference():
            torch.manual_seed(seed + iter_num)  # sampling must not move the training RNG (exact resume)
            # a twin with the weights in the autocast dtype: not cast again on every token
            y = cast_weights(raw_model, dtype, copy_weights=True).generate(x, sample_tokens, temperature=1.0, top_k=50,
                                                                           compile=compile and not fsdp)
        raw_model.clear_caches()
        raw_model.train()
        for i in range(num_samples if master else 0):
            print(f"sample {i}: {decode(y[i].tolist())!r}", flush=True)
        t_window, steps_window = time.time(), 0

    # one optimizer step: accum_local micro-steps here, gradients averaged over processes by DDP / FSDP
    batches = draw_offsets(sampler, n_windows['train'], block_size, gradient_accumulation_steps, batch_size, rank,
                           world_size)
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
    unscale(scaler, optimizers)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    if fsdp:
        grad_norm = grad_norm.full_tensor()  # a replicated DTensor: the norm over all shards, the same everywhere
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss.detach())  # loss too: a NaN loss can give NaN grads
    bad_steps = torch.where(finite, torch.zeros_like(bad_steps), bad_steps + 1)
    step_optimizers(optimizers, scaler, finite)
    iter_num += 1
    steps_window += 1
    if first_step:  # the first step compiles (and warms the allocator): not a step time
        sync(device)
        t_window, steps_window, first_step = time.time(), 0, False

    if iter_num % log_interval == 0 or (stop['stop'] and not ddp):  # processes agree at log steps
        stopping = torch.tensor(float(stop['stop']), device=device)
        if ddp:  # every process must agree to stop at the same step
            dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
        lossf = (all_sum(local_loss) / (world_size * (iter_num - last_log_iter))).item()  # waits for the device
        n_bad = int(bad_steps.item())
        dt = (time.time() - t_window) / steps_window if steps_window else None
        mfu = raw_model.estimate_mfu(batch_size * accum_local, dt, peak) if dt else None
        tps = tokens_per_iter / dt if dt else None
        if master:
            timing = (f"dt {dt * 1000:.2f}ms | {tps / block_size:,.1f} samples/s | {tps:,.0f} tok/s | " +
                      (f"mfu {mfu * 100:.2f}%" if mfu is not None else "mfu n/a")) if dt else "dt n/a (untimed)"
            print(f"step {iter_num} | loss {lossf:.4f} | lr {lr:.2e} | norm {grad_norm.item():.2f} | {timing}" +
                  (f" | skipped {n_bad}" if n_bad else ''), flush=True)  # flushed: `| tee` sees each step
            append_log(log_path, {'iter': iter_num, 'loss': lossf, 'lr': lr, 'grad_norm': grad_norm.item(),
                                  'tokens_per_sec': tps, 'mfu': mfu}, wandb)
        if n_bad >= max_bad_steps:
            saved = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
            print0(f"error: {n_bad} steps in a row had a non-finite loss or gradient norm; stopping. " +
                   (f"The last good checkpoint is in {out_dir}" if saved else "No checkpoint was written") +
                   "; try a lower --learning_rate, --grad_clip, or dtype float32", file=sys.stderr)
            if ddp:
                leave_processes(3)
            sys.exit(3)
        t_window, steps_window, last_log_iter = time.time(), 0, iter_num
        local_loss = torch.zeros((), device=device)
        if stopping.item():
            save_checkpoint('ckpt.pt' if always_save_checkpoint else 'ckpt_last.pt')  # the best stays in ckpt.pt
            print0(f"stopped on request at step {iter_num}; continue with --init_from=resume")
            break

if device_type == 'cuda':
    print0(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")
if wandb:
    wandb.finish()
if ddp:  # leave together (a process torn down while another still saves can abort in gloo), DDP dropped first
    dist.barrier()
    del model
    leave_processes(0)
