"""
Rerun the README's attention comparison with one command, and write the result to docs/ATTENTION.md:

    python compare_attention.py                                   # SM, GK, GKpoly-8, PA_relu, 2000 steps each
    python compare_attention.py --attn_types=SM,GK,PA_gelu --retrain=True

Each attn_type is one `python train.py config/train_shakespeare_char.py` run with the README CPU recipe
(4 layers, 4 heads, 128 wide, 64 context, batch 12, 2000 steps, dropout 0) into out_prefix + attn_type.
A run whose log already reached max_iters with the same settings is reused, not retrained (retrain=False).
The doc has two tables:
  1. per attn_type: val loss at equal iterations, best val loss, median training tokens/s
  2. GKpoly-n vs GK on real activations: the GK run's checkpoint is run on validation batches, q, k, v
     are captured per layer (forward hooks on attn.c_attn), and attend(q, k, v, 'GKpoly', n) is compared
     with attend(q, k, v, 'GK'); plus the val loss of the GK-trained model with GKpoly-n swapped in
     (no finetuning), on the same batches train.py's own evaluation uses.
"""

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys

import numpy as np
import torch

from configurator import configure, fail, writable_dir, writable_file
from model import attend, parse_attn_type
from runtime import draw_offsets, load_checkpoint, model_from_checkpoint, pick_device, read_batch

# -----------------------------------------------------------------------------
attn_types = 'SM,GK,GKpoly-8,PA_relu'  # comma-separated, one training run each
out_prefix = 'out-attn-'  # run for attn_type X goes to out_prefix + X
doc = 'docs/ATTENTION.md'  # the markdown report (written to a temp file, then renamed)
data_dir = ''  # char dataset with train.bin / val.bin / meta.json (default: data/shakespeare_char)
retrain = False  # False: reuse a run whose log.jsonl reached max_iters with these settings
# the README CPU recipe, on top of config/train_shakespeare_char.py
max_iters = 2000  # lr_decay_iters follows it
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
eval_iters = 20
eval_interval = 250
log_interval = 50
device = 'cpu'  # for the training runs; the GKpoly analysis is small and runs on cpu in float64
# the report
report_iters = ()  # iterations at which val losses are compared; () = max_iters/4, /2 and max_iters
poly_degrees = (2, 4, 8, 16, 32, 64)  # n of GKpoly-n compared with GK
# -----------------------------------------------------------------------------
configure(globals())

REPO = os.path.dirname(os.path.abspath(__file__))
# every setting is checked here, so that a mistake costs seconds, not the hour of training before it shows
types = [t.strip() for t in attn_types.split(',')]
if not any(types):
    fail("attn_types is empty; e.g. --attn_types=SM,GK")
if '' in types:
    fail(f"--attn_types={attn_types} has an empty entry (entry {types.index('') + 1}); separate with single commas")
if len(set(types)) < len(types):
    fail(f"--attn_types={attn_types} lists an attn_type twice; give each once")
for t in types:
    try:
        parse_attn_type(t)
    except ValueError as e:
        fail(str(e))
for name in ('max_iters', 'n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'eval_iters', 'eval_interval',
             'log_interval'):
    if globals()[name] <= 0:
        fail(f"--{name} must be a positive integer, got {globals()[name]!r}")
if n_embd % n_head:
    fail(f"--n_embd={n_embd} must be divisible by --n_head={n_head}")
if not poly_degrees or any(type(n) is not int or n <= 0 for n in poly_degrees):
    fail(f"--poly_degrees must be a tuple of positive integers like (2, 8), got {poly_degrees!r}")
eval_steps = f"0, {eval_interval}, {2 * eval_interval}, ... and {max_iters}"
if any(type(i) is not int or not 0 <= i <= max_iters or (i % eval_interval and i != max_iters) for i in report_iters):
    fail(f"--report_iters={report_iters!r}: each must be a step with an eval ({eval_steps}), as a tuple like (500,)")
pick_device(device)
data_path = os.path.abspath(data_dir) if data_dir else os.path.join(REPO, 'data', 'shakespeare_char')
for split in ('train', 'val'):
    path = os.path.join(data_path, f'{split}.bin')
    if not os.path.isfile(path):
        fail(f"no char dataset in {data_path} (no {split}.bin); run: python data/shakespeare_char/prepare.py")
    if os.path.getsize(path) // 2 <= block_size + 1:
        fail(f"{path} has only {os.path.getsize(path) // 2} tokens, fewer than one block ({block_size} + 1); "
             f"use a smaller --block_size")
if not out_prefix:
    fail("--out_prefix is empty; runs would land in ./SM, ./GK, ...: give e.g. --out_prefix=out-attn-")
for t in types:
    writable_dir(out_prefix + t, '--out_prefix')
writable_file(doc, '--doc')
# by default the last evals by a quarter and by half of max_iters, and the final one
report_at = tuple(report_iters) or tuple(sorted({max_iters // 4 // eval_interval * eval_interval,
                                                 max_iters // 2 // eval_interval * eval_interval, max_iters} - {0}))


def run_flags(attn_type):
    """train.py settings of one run; they are also what a reused run's checkpoint config must match"""
    flags = dict(out_dir=out_prefix + attn_type, attn_type=attn_type, n_layer=n_layer, n_head=n_head,
                 n_embd=n_embd, block_size=block_size, batch_size=batch_size, max_iters=max_iters,
                 lr_decay_iters=max_iters, eval_iters=eval_iters, eval_interval=eval_interval,
                 log_interval=log_interval, dropout=0.0, device=device, compile=False)
    if data_dir:
        flags['data_dir'] = data_path
    return flags


def read_log(path):
    """records of a log.jsonl; a line cut short by a crash (or garbled) is skipped"""
    records = []
    for line in open(path, encoding='utf-8', errors='replace'):
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in records if isinstance(r, dict)]


def is_complete(attn_type):
    """the run has its final eval in the log and a checkpoint trained with the same settings"""
    flags = run_flags(attn_type)
    log_path, ckpt_path = (os.path.join(flags['out_dir'], f) for f in ('log.jsonl', 'ckpt.pt'))
    if not (os.path.isfile(log_path) and os.path.isfile(ckpt_path)):
        return False
    if not any(r.get('iter') == max_iters and r.get('val_loss') is not None for r in read_log(log_path)):
        return False
    try:
        cfg = dict(torch.load(ckpt_path, map_location='cpu', weights_only=True).get('config', {}))
    except Exception:
        print(f"{flags['out_dir']}: unreadable checkpoint; training again")
        return False
    differ = [k for k, v in flags.items() if k not in ('out_dir', 'device') and cfg.get(k) != v]
    if differ:
        print(f"{flags['out_dir']}: trained with other settings ({', '.join(differ)}); training again")
    return not differ


def train(attn_type):
    flags = run_flags(attn_type)
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), os.path.join(REPO, 'config', 'train_shakespeare_char.py'),
           *(f'--{k}={v}' for k, v in flags.items()), '--overwrite=True']  # chosen above: a stale or partial run
    print(f"training {attn_type}: {shlex.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        fail(f"the {attn_type} run failed (see its output above); fix it and run compare_attention.py again")


def fmt(x, digits=4):
    return '-' if x is None else f"{x:.{digits}f}"


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def training_table():
    rows = []
    for t in types:
        records = read_log(os.path.join(out_prefix + t, 'log.jsonl'))
        evals = {r['iter']: r['val_loss'] for r in records if r.get('val_loss') is not None}
        best = min(evals, key=evals.get)
        tps = [r['tokens_per_sec'] for r in records if r.get('tokens_per_sec') is not None]
        seconds = records[-1]['time'] - records[0]['time']  # step-0 eval to the last record: training and evals
        rows.append([t, *(fmt(evals.get(i)) for i in report_at), f"{evals[best]:.4f} (iter {best})",
                     f"{statistics.median(tps):,.0f}" if tps else '-', f"{seconds:.0f}"])
    return table(['attn_type', *(f"val loss @ {i}" for i in report_at), 'best val loss',
                  'median train tokens/s', 'wall s'], rows)


def val_batches(cfg):
    """the val batches of train.py's estimate_loss (same generator, same draw), so GK's loss matches its log"""
    val = np.memmap(os.path.join(data_path, 'val.bin'), dtype=np.uint16, mode='r')
    T = cfg['block_size']
    offsets = draw_offsets(torch.Generator().manual_seed(cfg['seed'] + 1), len(val), T, cfg['eval_iters'],
                           cfg['batch_size'])
    for offs in offsets:
        yield read_batch(val, offs, T, 'cpu')


@torch.no_grad()
def val_loss(model, cfg, attn_type):
    for block in model.transformer.h:  # the same weights, another attention
        block.attn.kind, block.attn.arg = parse_attn_type(attn_type)
    losses = [model(X, Y)[1].item() for X, Y in val_batches(cfg)]
    return sum(losses) / len(losses)


@torch.no_grad()
def poly_table():
    """GKpoly-n vs GK on the q, k, v of the trained GK model; returns (markdown, notes)"""
    ckpt = load_checkpoint(os.path.join(out_prefix + 'GK', 'ckpt.pt'))
    cfg, model = ckpt['config'], model_from_checkpoint(ckpt).eval()
    # q, k, v of every layer on the first val batch, captured where the block computes them
    captured = []
    hooks = [b.attn.c_attn.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
             for b in model.transformer.h]
    X, Y = next(val_batches(cfg))
    model(X, Y)
    for h in hooks:
        h.remove()
    C, nh = model.config.n_embd, model.config.n_head
    qkvs = [tuple(t.double().view(X.size(0), X.size(1), nh, C // nh).transpose(1, 2) for t in o.split(C, dim=2))
            for o in captured]  # float64: the differences measured are the polynomial's, not rounding
    refs = [attend(q, k, v, 'GK') for q, k, v in qkvs]  # causal, full square
    # the range of the Gaussian-kernel score s = -|q - k|^2 / (2 sqrt(d)) that p_n has to follow
    d = C // nh
    allowed = torch.ones(X.size(1), X.size(1), dtype=torch.bool).tril()
    s = torch.cat([(-torch.cdist(q, k) ** 2 / (2 * math.sqrt(d)))[..., allowed].flatten() for q, k, _ in qkvs])
    s_q = torch.quantile(s[torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                         torch.tensor([0.01, 0.5], dtype=s.dtype))
    base = val_loss(model, cfg, 'GK')
    rows = []
    for n in poly_degrees:
        diffs = [(attend(q, k, v, 'GKpoly', n) - ref).abs() for (q, k, v), ref in zip(qkvs, refs)]
        loss = val_loss(model, cfg, f'GKpoly-{n}')
        rows.append([f"GKpoly-{n}", f"{max(x.max().item() for x in diffs):.3e}",
                     f"{sum(x.mean().item() for x in diffs) / len(diffs):.3e}", f"{loss:.4f}", f"{loss - base:+.2g}"])
    notes = (f"GK checkpoint: {out_prefix}GK/ckpt.pt at iter {ckpt['iter_num']} (its best val loss), "
             f"{cfg['n_layer']} layers x {nh} heads, head size {d}. Output errors over all layers on one val batch "
             f"({X.size(0)} x {X.size(1)} tokens), in float64; mean |GK output| = "
             f"{sum(r.abs().mean().item() for r in refs) / len(refs):.3e}. Val loss on train.py's {cfg['eval_iters']} "
             f"eval batches; GK itself: {base:.4f}. Score s = -|q-k|^2/(2 sqrt(d)) on these activations: "
             f"median {s_q[1].item():.2f}, 1st percentile {s_q[0].item():.2f}, min {s.min().item():.2f} "
             f"(p_n clamps s at -n).")
    return table(['attn_type', 'max abs err vs GK', 'mean abs err vs GK', 'val loss (swapped in)', 'vs GK'],
                 rows), notes


# -- train what is missing ---------------------------------------------------------------
for t in types:
    if not retrain and is_complete(t):
        print(f"{out_prefix + t}: complete run found, reusing it (--retrain=True to train again)")
    else:
        train(t)

# -- the report --------------------------------------------------------------------------
train_md = training_table()
poly_md, poly_notes = poly_table() if 'GK' in types else (None, "no GK run in attn_types: nothing to compare with")
flags = run_flags('<attn_type>')
cpu = platform.processor() or platform.machine()
if os.path.isfile('/proc/cpuinfo'):  # Linux names the CPU model only here
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), cpu)
machine = (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
           f"python {platform.python_version()}, {platform.system()}")
report = f"""# Attention variants on shakespeare_char

Generated by `{shlex.join(['python', 'compare_attention.py', *sys.argv[1:]])}` on {datetime.date.today().isoformat()}.
Machine: {machine}.

Each run: `python train.py config/train_shakespeare_char.py {' '.join(f'--{k}={v}' for k, v in flags.items())}`
(the README CPU recipe; the same seed, data and batches for every variant). Tokens/s is measured on this
machine while it runs, so it is only comparable within one table.

## Training

{train_md}

## GKpoly-n as an approximation of GK, on the trained GK model's activations

{poly_md or ''}

{poly_notes}
"""
os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
tmp = f"{doc}.tmp.{os.getpid()}"
with open(tmp, 'w') as f:
    f.write(report)
os.replace(tmp, doc)
print(f"\n{train_md}\n\n{poly_md or ''}\n\n{poly_notes}\n\nwrote {doc}")
