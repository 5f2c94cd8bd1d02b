"""
HellaSwag validation accuracy of a GPT-2 BPE model, the benchmark GPT-2 / GPT-3 are compared on.

    python hellaswag.py --init_from=gpt2                      # OpenAI GPT-2 124M: acc_norm ~0.2955
    python hellaswag.py --init_from=resume --out_dir=out      # a checkpoint of ours
    python hellaswag.py --init_from=path/to/hf_dir --limit=500

Each example is a context and 4 candidate endings. Every ending is appended to the context
(" " + ending, GPT-2 BPE) and the model's cross-entropy on the ending's tokens is measured:
  acc_norm: the ending with the lowest AVERAGE per-token loss wins (the usual nanoGPT / llm.c figure)
  acc:      the ending with the lowest SUM of losses wins
  acc_char: the lowest sum divided by the ending's length in characters: lm-evaluation-harness's acc_norm is
            normalised this way (by characters, not tokens), and lm-eval also rewrites the context (it cleans
            WikiHow markup and joins ctx_a / ctx_b itself), so its figures and ours differ by a point or so
Several examples go through one forward pass, right-padded to the longest row; attention is causal,
so the padding after a row's last token cannot change what the model predicts inside it.

train.py calls evaluate() during training; the validation set (10,042 examples) is downloaded once
into data_dir.
"""

import contextlib
import json
import os
import time
import urllib.request

import torch
from torch.nn import functional as F

from configurator import configure, fail, read_text, writable_dir

URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'

# -----------------------------------------------------------------------------
init_from = 'gpt2'  # 'resume' (out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF GPT-2 dir
out_dir = 'out'  # where 'resume' finds ckpt.pt
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'hellaswag')  # download cache
device = 'auto'  # auto, cpu, cuda, cuda:N, mps
dtype = 'auto'  # auto, float32, bfloat16, float16
batch_size = 8  # examples per forward pass (4 rows each)
limit = None  # score only the first `limit` examples (None: all 10,042)
compile = False  # torch.compile the model
quantize = 'none'  # 'int8': score with int8 weights (quantize.py), to see what quantisation costs
# -----------------------------------------------------------------------------

_enc = None


def encoder():
    """GPT-2's BPE, loaded once"""
    global _enc
    if _enc is None:
        from dataprep import gpt2_encoding
        _enc = gpt2_encoding()
    return _enc


def download(data_dir):
    """hellaswag_val.jsonl in data_dir, downloaded only if it is not there yet; returns its path"""
    path = os.path.join(data_dir, 'hellaswag_val.jsonl')
    if os.path.isfile(path):
        return path
    writable_dir(data_dir, 'the HellaSwag data_dir')
    os.makedirs(data_dir, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with urllib.request.urlopen(URL, timeout=60) as r, open(tmp, 'wb') as f:
            f.write(r.read())
    except Exception as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"could not download HellaSwag from {URL} ({type(e).__name__}: {str(e)[:120]}); "
             f"put hellaswag_val.jsonl into {data_dir} by hand")
    os.replace(tmp, path)  # a half-finished download never looks like the real file
    return path


def load_examples(limit=None, data_dir=data_dir):
    """The validation examples as dicts (ctx, endings, label, ...), the first `limit` of them if set."""
    path = download(data_dir)
    examples = []
    for lineno, line in enumerate(read_text(path, 'HellaSwag data').splitlines(), 1):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ok = (isinstance(ex['ctx'], str) and isinstance(ex['endings'], list) and len(ex['endings']) == 4
                  and all(isinstance(e, str) for e in ex['endings']) and ex['label'] in (0, 1, 2, 3))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            fail(f"{path}:{lineno} is not a HellaSwag example (wants ctx, 4 endings, label 0-3); "
                 f"delete the file to download it again")
        examples.append(ex)
    if not examples:
        fail(f"{path} holds no examples; delete it to download it again")
    return examples


def render(example, block_size):
    """4 rows of token ids (context + ending) and, for each, how many of its last tokens are the ending.
    A row longer than block_size loses tokens from the left (the context's start goes first)."""
    enc = encoder()
    ctx = enc.encode(example['ctx'])
    rows, n_end = [], []
    for ending in example['endings']:
        end = enc.encode(' ' + ending)  # the ending continues the context's last word: GPT-2 wants the space
        row = (ctx + end)[-block_size:]
        rows.append(row)
        n_end.append(min(len(end), len(row) - 1))  # the first token of a row is never predicted, so never scored
    return rows, n_end


@torch.no_grad()
def ending_losses(model, device, examples, batch_size=8, ctx=contextlib.nullcontext(), progress=False, forwards=0):
    """(avg, total): float64 tensors (len(examples), 4), the mean and the sum of the per-token cross-entropy
    over each ending's tokens. One forward pass per batch_size examples, no loop over tokens. forwards: run at
    least this many forward passes, repeating a batch and discarding it (FSDP needs every process in every one)."""
    raw = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    block_size = getattr(raw, '_orig_mod', raw).config.block_size
    was_training = raw.training
    raw.eval()
    avg, total = torch.zeros(len(examples), 4, dtype=torch.float64), torch.zeros(len(examples), 4, dtype=torch.float64)
    rendered = [render(ex, block_size) for ex in examples]
    # examples of similar length share a batch, so little of the compute goes to padding
    order = sorted(range(len(examples)), key=lambda i: max(len(r) for r in rendered[i][0]))
    starts = list(range(0, len(examples), batch_size))
    starts += [0] * (forwards - len(starts))  # padding passes: the first batch again (the same numbers again)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, unit='batch', desc='hellaswag')
    for start in starts:
        ids = order[start:start + batch_size]
        # a short last batch is padded with copies of its last example: every forward has batch_size * 4 rows,
        # so a compiled model sees only the length change (one dynamic graph) and CUDA graphs can be reused
        padded = ids + ids[-1:] * (min(batch_size, len(examples)) - len(ids))
        rows = [r for i in padded for r in rendered[i][0]]
        n_end = [n for i in padded for n in rendered[i][1]]
        T = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)  # pad token 0: only ever after a row's end
        scored = torch.zeros(len(rows), T, dtype=torch.bool)  # position t predicts token t + 1
        for i, (r, n) in enumerate(zip(rows, n_end)):
            idx[i, :len(r)] = torch.tensor(r)
            scored[i, len(r) - 1 - n:len(r) - 1] = True
        targets = torch.full_like(idx, -1)
        targets[:, :-1] = torch.where(scored[:, :-1], idx[:, 1:], -1)
        idx, targets, scored = idx.to(device), targets.to(device), scored.to(device)
        with ctx:
            logits, _ = raw(idx, targets)  # with targets the model returns the logits of every position
        # cross-entropy of the scored positions only, in float32 whatever the autocast dtype
        losses = F.cross_entropy(logits[scored].float(), targets[scored], reduction='none')
        row_of = scored.nonzero(as_tuple=True)[0]
        sums = torch.zeros(len(rows), device=losses.device).index_add_(0, row_of, losses).cpu().double()
        counts = scored.sum(1).clamp(min=1).cpu()
        total[ids] = sums.view(-1, 4)[:len(ids)]
        avg[ids] = (sums / counts).view(-1, 4)[:len(ids)]
    raw.train(was_training)
    return avg, total


def evaluate(model, device, examples, batch_size=8, ctx=contextlib.nullcontext(), rank=0, world_size=1,
             progress=False):
    """{'acc_norm', 'acc', 'acc_char', 'n'} over examples. Each rank scores examples[rank::world_size], every rank
    running as many forward passes (FSDP gathers weights in each); with torch.distributed initialised the counts
    are summed over ranks, so every rank returns the same global result."""
    share = examples[rank::world_size]
    mine = share or examples[:1]  # a rank with nothing to score still joins every forward
    forwards = -(-len(examples[0::world_size]) // batch_size) if world_size > 1 else 0
    avg, total = ending_losses(model, device, mine, batch_size, ctx, progress, forwards)
    if not share:
        mine, avg, total = [], avg[:0], total[:0]
    labels = torch.tensor([ex['label'] for ex in mine], dtype=torch.long)
    chars = torch.tensor([[len(' ' + e) for e in ex['endings']] for ex in mine], dtype=torch.float64).view(-1, 4)
    counts = torch.tensor([len(mine), (avg.argmin(1) == labels).sum().item(), (total.argmin(1) == labels).sum().item(),
                           ((total / chars).argmin(1) == labels).sum().item()], dtype=torch.long, device=device)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    n, correct_norm, correct, correct_char = counts.tolist()
    if n == 0:
        raise ValueError("no HellaSwag examples to evaluate")
    return {'acc_norm': correct_norm / n, 'acc': correct / n, 'acc_char': correct_char / n, 'n': n}


if __name__ == '__main__':
    configure(globals())
    from quantize import FORMATS, decoding_model
    from runtime import autocast, load_model, pick_compile, pick_device, pick_dtype

    if batch_size < 1:
        fail(f"batch_size must be a positive integer, got {batch_size}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        fail(f"limit must be a positive integer or None, got {limit!r}")
    if quantize not in FORMATS:
        fail(f"unknown quantize '{quantize}'; use {' or '.join(FORMATS)}")
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    compile = pick_compile(compile, device)
    if not os.path.isfile(os.path.join(data_dir, 'hellaswag_val.jsonl')):
        writable_dir(data_dir, '--data_dir')  # it will be downloaded there
    model, ckpt = load_model(init_from, out_dir, device)
    if ckpt is not None and ckpt.get('meta') is not None:
        fail(f"HellaSwag needs a GPT-2 BPE model; {os.path.join(out_dir, 'ckpt.pt')} is a character-level model")
    if model.config.vocab_size < encoder().n_vocab:
        fail(f"HellaSwag needs a GPT-2 BPE model (vocab >= {encoder().n_vocab}); this one has {model.config.vocab_size}")
    examples = load_examples(limit, data_dir)
    model = decoding_model(model, dtype, quantize)  # weights stored in the dtype autocast computes in
    if compile:  # one graph for the first length, one dynamic graph for all the others
        model = torch.compile(model)
    t0 = time.time()
    res = evaluate(model, device, examples, batch_size, autocast(device.type, dtype), progress=True)
    dt = time.time() - t0
    print(f"acc_norm {res['acc_norm']:.4f}  acc {res['acc']:.4f}  acc_char {res['acc_char']:.4f}  n {res['n']}  "
          f"({res['n'] / dt:.1f} examples/s)")
