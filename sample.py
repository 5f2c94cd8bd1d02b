"""
Sample from a trained model (out_dir/ckpt.pt) or from OpenAI's GPT-2:
$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=5 --max_new_tokens=100
$ python sample.py --start=FILE:prompt.txt
All num_samples share the prompt, so they are generated together in one batch, with the KV cache.
"""

import os

import torch

from configurator import configure, fail
from runtime import autocast, load_model, pick_device, pick_dtype

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF GPT-2 dir
out_dir = 'out'  # with init_from='resume'
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 10  # samples to draw (one batch)
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = unchanged, < 1.0 = more conservative, 0 = greedy
top_k = 200  # keep only the top_k most likely tokens; None = all
seed = 1337
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where supported, else float32 on cpu / float16 on cuda), or set one
compile = False  # torch.compile the model (pays off only for long generations on a GPU)
# -----------------------------------------------------------------------------
configure(globals())
if num_samples <= 0 or max_new_tokens <= 0:
    fail("num_samples and max_new_tokens must be positive")
if temperature < 0 or (top_k is not None and (not isinstance(top_k, int) or top_k <= 0)):
    fail("temperature must be >= 0 and top_k a positive integer or None")
if start.startswith('FILE:'):  # the prompt from a file; checked before the (slow) model load
    path = start[5:]
    if not os.path.isfile(path):
        fail(f"prompt file '{path}' does not exist (from --start=FILE:{path})")
    start = open(path, encoding='utf-8').read()
    if not start:
        fail(f"prompt file '{path}' is empty; put some text in it or use --start=\"...\"")

device = pick_device(device)
device_type = torch.device(device).type
dtype = pick_dtype(dtype, device_type)
torch.manual_seed(seed)

model, ckpt = load_model(init_from, out_dir, device)
meta = ckpt.get('meta') if ckpt else None
if meta:  # a char-level model decodes with its dataset's vocabulary (stored as JSON in the checkpoint)
    itos = meta['itos']
    stoi = {c: i for i, c in enumerate(itos)}
    unknown = sorted(set(start) - set(stoi))
    if unknown:
        fail(f"the prompt has characters outside this model's vocabulary: {''.join(unknown)!r}; remove them")
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda ids: ''.join(itos[i] for i in ids)
else:  # GPT-2's BPE
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')  # identical to GPT-2's encoding
    encode = lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})
    decode = lambda ids: enc.decode(ids)
if compile:  # generate() calls forward with a growing length: compile it for dynamic shapes
    model.forward = torch.compile(model.forward, dynamic=True)

ids = encode(start)
if not ids:
    fail("the prompt encodes to no tokens; give a non-empty --start")
x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
with torch.no_grad(), autocast(device_type, dtype):
    y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
for row in y.tolist():
    print(decode(row))
    print('---------------')
