"""
Sample from a trained model (out_dir/ckpt.pt) or from OpenAI's GPT-2:
$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=5 --max_new_tokens=100
$ python sample.py --start=FILE:prompt.txt --stream=True --top_p=0.9
All num_samples share the prompt, so they are generated together in one batch with a static KV cache; with
stream=True they are made one at a time and printed token by token. BPE samples end at <|endoftext|> unless
stop_at_eot=False. compile=None compiles the decode step on CUDA: a one-time cost of tens of seconds, then each
token is one CUDA graph replay (see the README for when it pays elsewhere).
"""

import codecs
import sys

import torch

import memory
from configurator import configure, fail, read_text, unused
from dataprep import gpt2_encoding
from quantize import FORMATS, decoding_model
from runtime import autocast, load_model, pick_compile, pick_device, pick_dtype

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF GPT-2 dir
out_dir = 'out'  # with init_from='resume'
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 10  # samples to draw
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = unchanged, < 1.0 = more conservative, 0 = greedy
top_k = 200  # keep only the top_k most likely tokens; None = all
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1.0 = all
stream = False  # print each token as it is made (samples one after another instead of one batch)
stop_at_eot = True  # BPE models: a sample ends at <|endoftext|>
seed = 1337
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where native, float16 on older GPUs, float32 on cpu), or set one
compile = None  # torch.compile the prefill and decode steps; None = on for CUDA GPUs, off elsewhere
quantize = 'none'  # 'int8': int8 weights with per-channel scales, made at load (quantize.py): ~4x fewer bytes per token
# -----------------------------------------------------------------------------
configure(globals(), optional=('top_k',))
memory.explain_oom("--num_samples or --max_new_tokens")
if num_samples <= 0 or max_new_tokens <= 0:
    fail("num_samples and max_new_tokens must be positive")
if temperature < 0:
    fail(f"temperature must be >= 0 (0 = greedy), got {temperature}")
if top_k is not None and top_k <= 0:
    fail(f"top_k must be a positive integer or None (all tokens), got {top_k}")
if not 0 < top_p <= 1:
    fail(f"top_p must be in (0, 1] (1 = all tokens), got {top_p}")
if not 0 <= seed < 2**64:
    fail(f"seed must be in [0, 2**64), got {seed}")
if quantize not in FORMATS:
    fail(f"unknown quantize '{quantize}'; use {' or '.join(FORMATS)}")
if temperature == 0:
    unused(('top_k', 'top_p'), 'with temperature=0 (greedy: the most likely token is always taken)')
if init_from != 'resume':
    unused(('out_dir',), f"with init_from='{init_from}'")
if start.startswith('FILE:'):  # the prompt from a file; checked before the (slow) model load
    prompt_file = start[5:]
    start = read_text(prompt_file, f"--start=FILE:{prompt_file}")
    if not start:
        fail(f"prompt file '{prompt_file}' is empty; put some text in it or use --start=\"...\"")

device = pick_device(device)
dtype = pick_dtype(dtype, device)
compile = pick_compile(compile, device)
torch.manual_seed(seed)

model, ckpt = load_model(init_from, out_dir, device)
model = decoding_model(model, dtype, quantize)  # weights stored as decoding reads them
meta = ckpt.get('meta') if ckpt else None
eot = None
if meta:  # a char-level model decodes with its dataset's vocabulary (stored as JSON in the checkpoint)
    itos = meta['itos']
    stoi = {c: i for i, c in enumerate(itos)}
    unknown = sorted(set(start) - set(stoi))
    if unknown:
        fail(f"the prompt has characters outside this model's vocabulary: {''.join(unknown)!r}; remove them")
    ids = [stoi[c] for c in start]
    token_bytes = lambda i: itos[i].encode('utf-8')
    unused(('stop_at_eot',), 'for a char-level model (it has no <|endoftext|>)')
else:  # GPT-2's BPE
    enc = gpt2_encoding()
    ids = enc.encode(start, allowed_special={'<|endoftext|>'})
    token_bytes = enc.decode_single_token_bytes
    eot = enc.eot_token if stop_at_eot else None
if not ids:
    fail("the prompt encodes to no tokens; give a non-empty --start")
if len(ids) > model.config.block_size:
    fail(f"the prompt is {len(ids)} tokens but the model sees at most {model.config.block_size} (its block_size); "
         f"shorten it")
cfg = model.config
memory.check(memory.sampling(sum(p.numel() for p in model.parameters()), cfg.n_layer, cfg.n_embd, cfg.block_size,
                             cfg.vocab_size, 1 if stream else num_samples, len(ids) + max_new_tokens, dtype),
             device, 'sample.py')


def text(row):
    """a row of ids as text, cut after the prompt at the first <|endoftext|> (kept out of the text)"""
    new = row[len(ids):]
    if eot is not None and eot in new:
        new = new[:new.index(eot)]
    return b''.join(token_bytes(i) for i in row[:len(ids)] + new).decode('utf-8', errors='replace')


x = torch.tensor([ids], dtype=torch.long, device=device)
with torch.no_grad(), autocast(device.type, dtype):
    if not stream:
        y = model.generate(x.expand(num_samples, -1), max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, compile=compile, stop_token=eot)
        for row in y.tolist():
            print(text(row))
            print('---------------')
    for _ in range(num_samples if stream else 0):
        utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')  # a character may span several tokens
        finished = False

        def show(tok):
            global finished
            if finished or tok.item() == eot:
                finished = True
                return
            sys.stdout.write(utf8.decode(token_bytes(tok.item())))
            sys.stdout.flush()

        sys.stdout.write(utf8.decode(b''.join(token_bytes(i) for i in ids)))
        model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, compile=compile,
                       stop_token=eot, on_token=show)
        print(utf8.decode(b'', final=True))
        print('---------------')
