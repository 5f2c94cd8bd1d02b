"""
auto_batch=True: the largest micro-batch that fits this device, found by trial steps, with the micro-steps set so that
the tokens per optimizer step stay what the config asked (gradient_accumulation_steps x batch_size x block_size).

A trial is one forward and backward of the model on random tokens, with the optimizer state (and DDP's gradient
buckets) held aside as one block of memory; an out-of-memory error means too big. The sizes tried are the divisors of
the sequences each process runs per step, so the step keeps its exact size: the largest first (on a big GPU one trial
answers), then by bisection. Trials run eager (a compiled model would compile for every size tried and then treat the
batch dimension as dynamic; it needs less memory than eager, not more). Every process takes the smallest answer.
"""

import torch


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def is_oom(e):
    """CUDA's out-of-memory error, or MPS's and the CPU allocator's (RuntimeErrors)"""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ('out of memory' in str(e) or "can't allocate memory" in str(e)))


def largest(candidates, fits):
    """the largest of the ascending candidates for which fits(c) is True, 0 if none: the largest is tried first, then
    bisection (memory grows with the micro-batch, so below one that fits all fit and above one that does not none do)"""
    if fits(candidates[-1]):
        return candidates[-1]
    lo, hi = -1, len(candidates) - 1  # candidates[lo] fits (lo = -1: none known to), candidates[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid
    return candidates[lo] if lo >= 0 else 0


def empty_cache(device):
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    elif device.type == 'mps':
        torch.mps.empty_cache()


def trial(model, batch, block_size, vocab_size, device, ctx, reserve_bytes):
    """True when one training micro-step of `batch` sequences fits beside reserve_bytes held aside"""
    def step():
        held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)  # noqa: F841 (held until step returns)
        x = torch.randint(vocab_size, (batch, block_size)).to(device)
        with ctx:
            loss = model(x, x)[1]
        loss.backward()

    try:
        step()
        fits = True
    except Exception as e:  # the error's traceback holds step's tensors: freed when the except block ends
        if not is_oom(e):
            raise
        fits = False
    model.zero_grad(set_to_none=True)
    empty_cache(device)
    return fits


def choose(model, samples, block_size, vocab_size, device, ctx, reserve_bytes, limit=None, ddp=False, log=print):
    """the micro-batch for `samples` sequences per process per step: the largest divisor of it (at most `limit`) whose
    trial fits, the smallest over processes under DDP; 0 when not even 1 fits. The random generators are left as
    they were (trials draw tokens and dropout masks)."""
    candidates = [d for d in divisors(samples) if limit is None or d <= limit] or [1]
    tried = []

    def fits(b):
        tried.append((b, trial(model, b, block_size, vocab_size, device, ctx, reserve_bytes)))
        return tried[-1][1]

    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        best = largest(candidates, fits)
    if ddp:
        agreed = torch.tensor(best, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        best = int(agreed.item())
    said = ', '.join(f"{b} ({'fits' if ok else 'out of memory'})" for b, ok in tried)
    log(f"auto_batch: tried micro-batches {said}; using {best}" + (" (the smallest over the processes)" if ddp else ''))
    return best
