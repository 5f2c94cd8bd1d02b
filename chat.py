"""
Talk to a model in the terminal, in the chat format of chat_format.py (what data/chat/prepare.py trains on):
$ python chat.py --out_dir=out-chat                   # interactive: /reset starts over, /exit (or Ctrl-D) leaves
$ python chat.py --out_dir=out-chat --prompt="Hi!"    # one user message: prints only the reply, then exits
$ python chat.py --init_from=gpt2-medium --system="You are a helpful assistant."
Replies stream token by token and end at <|endoftext|>; Ctrl-C stops a reply and keeps the session. The history is
rendered whole for every reply and kept within the model's block_size: the oldest turns are dropped first (a system
message stays). A LoRA run is merged on load. temperature=0 is greedy; decoding is sample.py's (model.generate,
compiled where compile says so).
"""

import codecs
import sys

import torch

import chat_format
import memory
from configurator import configure, fail, unused
from quantize import FORMATS, decoding_model
from runtime import autocast, load_model, pick_compile, pick_device, pick_dtype

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF GPT-2 dir
out_dir = 'out'  # with init_from='resume'
prompt = ''  # one user message: answer it, print only the reply, exit (for scripts); '' = interactive
system = ''  # a system message that opens every conversation
max_new_tokens = 256  # the longest reply, in tokens (less when the history leaves less room in the block)
temperature = 0.8  # 1.0 = unchanged, < 1.0 = more conservative, 0 = greedy
top_k = 200  # keep only the top_k most likely tokens; None = all
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1.0 = all
seed = 1337
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where native, float16 on older GPUs, float32 on cpu), or set one
compile = None  # torch.compile the prefill and decode steps; None = on for CUDA GPUs, off elsewhere
quantize = 'none'  # 'int8': int8 weights with per-channel scales, made at load (quantize.py)
# -----------------------------------------------------------------------------
configure(globals(), optional=('top_k',))
memory.explain_oom("--max_new_tokens")
if max_new_tokens <= 0:
    fail(f"max_new_tokens must be positive, got {max_new_tokens}")
if temperature < 0:
    fail(f"temperature must be >= 0 (0 = greedy), got {temperature}")
if top_k is not None and top_k <= 0:
    fail(f"top_k must be a positive integer or None (all tokens), got {top_k}")
if not 0 < top_p <= 1:
    fail(f"top_p must be in (0, 1] (1 = all tokens), got {top_p}")
if quantize not in FORMATS:
    fail(f"unknown quantize '{quantize}'; use {' or '.join(FORMATS)}")
if not 0 <= seed < 2**64:
    fail(f"seed must be in [0, 2**64), got {seed}")
if temperature == 0:
    unused(('top_k', 'top_p'), 'with temperature=0 (greedy: the most likely token is always taken)')
if init_from != 'resume':
    unused(('out_dir',), f"with init_from='{init_from}'")
for text, flag in ((prompt, '--prompt'), (system, '--system')):
    if chat_format.EOT in text:
        fail(f"{flag} contains {chat_format.EOT}, which ends a turn in the chat format; remove it")

device = pick_device(device)
dtype = pick_dtype(dtype, device)
compile = pick_compile(compile, device)
torch.manual_seed(seed)
model, ckpt = load_model(init_from, out_dir, device)
encode, token_bytes, eot = chat_format.tokenizer(ckpt.get('meta') if ckpt else None)
if eot is None:
    fail("this model's character vocabulary has no <|endoftext|>, so it cannot end a turn: it was not trained on a "
         "chat dataset (data/chat/prepare.py --tokenizer=char)")
trained = (ckpt or {}).get('chat')
if not trained:
    print(f"note: {out_dir if init_from == 'resume' else init_from} was not trained on chat data "
          f"(data/chat/prepare.py): its replies may not follow the conversation", file=sys.stderr)
elif trained.get('format') != chat_format.FORMAT:
    print(f"note: the model was trained on chat format {trained.get('format')!r}, this chat.py writes "
          f"{chat_format.FORMAT!r}", file=sys.stderr)
model = decoding_model(model, dtype, quantize)  # weights stored as decoding reads them
cfg, block = model.config, model.config.block_size
memory.check(memory.sampling(sum(p.numel() for p in model.parameters()), cfg.n_layer, cfg.n_embd, block,
                             cfg.vocab_size, 1, block, dtype), device, 'chat.py')
room = min(max_new_tokens, max(1, block // 4))  # kept free for the reply when old turns must go


def context(history):
    """the ids to answer: the system message and as many of the latest turns as leave room for a reply (oldest go
    first); ValueError when even the last message alone does not fit the block"""
    opening = [{'role': 'system', 'content': system}] if system else []
    while True:
        ids, _ = chat_format.render(opening + history, encode, eot, reply=True)
        if len(ids) + room <= block or len(history) == 1:
            break
        history.pop(0)
        while history and history[0]['role'] != 'user':  # a conversation starts with a user's turn
            history.pop(0)
    if len(ids) >= block:
        raise ValueError(f"the message is {len(ids)} tokens in the chat format, and the model sees at most {block} "
                         f"(its block_size); shorten it")
    return ids


def answer(ids, stream):
    """the model's reply to the context ids, printed as it is made when stream; Ctrl-C stops it (what was said so far
    is the reply)"""
    utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')  # a character may span several tokens
    state = {'text': '', 'done': False}

    def show(tok):
        t = tok.item()
        if state['done'] or t == eot:
            state['done'] = True
            return
        piece = utf8.decode(token_bytes(t))
        if not state['text'] and piece.startswith(' '):
            piece = piece[1:]  # the template's space after "Assistant:"
        state['text'] += piece
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()

    x = torch.tensor([ids], dtype=torch.long, device=device)
    try:
        with torch.no_grad(), autocast(device.type, dtype):
            model.generate(x, min(max_new_tokens, block - len(ids)), temperature=temperature, top_k=top_k,
                           top_p=top_p, compile=compile, stop_token=eot, on_token=show)
    except KeyboardInterrupt:
        if stream:
            sys.stdout.write(' [stopped]')
    return state['text']


def check(text):
    try:
        encode(text)
    except ValueError as e:
        return str(e)
    return ''


if prompt:
    if why := check(prompt) or check(system):
        fail(f"the prompt has {why}; remove them")
    try:
        ids = context([{'role': 'user', 'content': prompt}])
    except ValueError as e:
        fail(str(e))
    print(answer(ids, stream=False), flush=True)
    sys.exit(0)

if why := check(system):
    fail(f"--system has {why}; remove them")
print(f"chatting with {out_dir if init_from == 'resume' else init_from} (block of {block} tokens): /reset starts "
      f"over, /exit or Ctrl-D leaves, Ctrl-C stops a reply", file=sys.stderr)
history = []
while True:
    try:
        line = input('you> ')
    except EOFError:
        print()
        break
    except KeyboardInterrupt:
        print()
        continue
    text = line.strip()
    if text == '/exit':
        break
    if text == '/reset':
        history = []
        print('(history cleared)', file=sys.stderr)
        continue
    if not text:
        continue
    if why := check(text) or (chat_format.EOT in text and f"{chat_format.EOT}, which ends a turn"):
        print(f"error: the message has {why}; say it another way", file=sys.stderr)
        continue
    history.append({'role': 'user', 'content': text})
    try:
        ids = context(history)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        history.pop()
        continue
    sys.stdout.write('assistant> ')
    history.append({'role': 'assistant', 'content': answer(ids, stream=True)})
    print(flush=True)
