"""auto_batch=True (autobatch.py): the largest micro-batch that fits, found by trial steps under a fake allocator that
runs out of memory above a set number of bytes, and train.py keeping the tokens per step the config asked."""
import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import autobatch
from conftest import run_script, write_char_dataset
from model import GPT, GPTConfig


class FakeMemory(TorchDispatchMode):
    """every op's new tensors counted as allocated until the last tensor on their storage is gone; an allocation
    taking the total above `limit` bytes raises torch.OutOfMemoryError, as CUDA's allocator does"""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.live, self.peak, self.refs = limit, 0, 0, {}

    def release(self, ptr, n):
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if ptr not in self.refs:
                    self.refs[ptr], self.live = 0, self.live + n
                self.refs[ptr] += 1
                weakref.finalize(t, self.release, ptr, n)
                if self.live > self.limit:
                    raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} bytes (fake)")
                self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize('n', [1, 2, 7, 12, 60, 480])
def test_largest_finds_the_threshold_in_few_trials(n):
    """bisection over the divisors: the largest that fits, whatever the threshold, in 1 + log2 trials"""
    candidates = autobatch.divisors(n)
    for threshold in range(0, n + 1):
        tried = []
        got = autobatch.largest(candidates, lambda b: tried.append(b) or b <= threshold)
        assert got == max([c for c in candidates if c <= threshold], default=0)
        assert len(tried) <= 2 + len(candidates).bit_length()


def test_choose_finds_the_largest_micro_batch_under_a_memory_limit():
    """real trial steps (forward and backward of a tiny GPT) under the fake allocator: the answer is the largest
    divisor of the step's sequences whose step fits beside the reserve, the model and the generators are untouched"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
    cpu, ctx, reserve = torch.device('cpu'), torch.autocast('cpu', enabled=False), 100_000
    peak = {}
    for b in (1, 2, 4, 8, 16):  # each micro-batch's real peak, reserve included
        with FakeMemory(1 << 40) as mem:
            assert autobatch.trial(model, b, 32, 65, cpu, ctx, reserve)
        peak[b] = mem.peak
    assert all(peak[b] < peak[2 * b] for b in (1, 2, 4, 8))
    weights, rng, said = [p.detach().clone() for p in model.parameters()], torch.get_rng_state(), {}
    for limit, want in (((peak[4] + peak[8]) // 2, 4), (peak[16], 16), ((peak[1] + peak[2]) // 2, 1), (peak[1] - 1, 0)):
        with FakeMemory(limit):
            said[want] = []
            assert autobatch.choose(model, 16, 32, 65, cpu, ctx, reserve, log=said[want].append) == want, said
    assert said[4] == ['auto_batch: tried micro-batches 16 (out of memory), 2 (fits), 4 (fits), 8 (out of memory); '
                       'using 4'], said
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    with FakeMemory((peak[4] + peak[8]) // 2):  # a cap (off CUDA: from the estimate) is obeyed
        assert autobatch.choose(model, 16, 32, 65, cpu, ctx, reserve, limit=2, log=print) == 2


def test_train_keeps_the_tokens_per_step(tmp_path):
    """train.py --auto_batch=True: the micro-batch found (all 16 sequences of a step fit here), the micro-steps set so
    that gradient_accumulation_steps x batch_size x block_size tokens stay per step, and the run learns"""
    data = write_char_dataset(str(tmp_path / 'data'))
    flags = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--eval_iters=2', '--max_iters=6',
             '--eval_interval=6', '--log_interval=1', '--warmup_iters=0', '--learning_rate=3e-3', '--device=cpu',
             '--compile=False', f'--data_dir={data}']
    p = run_script('train.py', *flags, f'--out_dir={tmp_path / "a"}', '--auto_batch=True', '--batch_size=4',
                   '--gradient_accumulation_steps=4')
    assert 'auto_batch: tried micro-batches 16 (fits); using 16' in p.stdout, p.stdout
    assert 'tokens per step: 512 (1 process(es) x 1 micro-steps x 16 x 32)' in p.stdout, p.stdout
    losses = [float(x) for x in re.findall(r'\| loss ([\d.]+)', p.stdout)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert (ckpt['config']['batch_size'], ckpt['config']['gradient_accumulation_steps']) == (16, 1)  # resume keeps it


AGREE = r"""
import os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), 'tests')]
import torch, torch.distributed as dist
import autobatch
from model import GPT, GPTConfig
from test_autobatch import FakeMemory
dist.init_process_group('gloo')
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
cpu, ctx = torch.device('cpu'), torch.autocast('cpu', enabled=False)
with FakeMemory(1 << 40) as mem:
    autobatch.trial(model, 2 if dist.get_rank() else 8, 32, 65, cpu, ctx, 0)
with FakeMemory(mem.peak):  # rank 0 fits 8 sequences, rank 1 only 2
    found = autobatch.choose(model, 16, 32, 65, cpu, ctx, 0, ddp=True, log=print)
    sys.stdout.write(f'RANK {dist.get_rank()} {found}\n')  # one write: the two processes share the pipe
    sys.stdout.flush()
dist.destroy_process_group()
"""


def test_every_process_takes_the_smallest_answer(tmp_path):
    """under DDP each process tries on its own device, and all take the smallest micro-batch found"""
    (tmp_path / 'agree.py').write_text(AGREE)
    p = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(tmp_path / 'agree.py'))
    assert sorted(re.findall(r'RANK (\d) (\d+)', p.stdout)) == [('0', '2'), ('1', '2')], p.stdout
    assert 'using 2 (the smallest over the processes)' in p.stdout


def test_fsdp_is_refused_in_one_line(tmp_path):
    from conftest import run_bad_inputs
    run_bad_inputs([(['train.py', '--auto_batch=True', '--fsdp=True', f'--out_dir={tmp_path / "o"}'],
                     "auto_batch=True finds the micro-batch by trial steps")])
    assert not (tmp_path / 'o').exists()
