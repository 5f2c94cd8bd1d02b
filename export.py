"""
Export a checkpoint as a Hugging Face GPT-2 directory, so the rest of the ecosystem can use it:

    python export.py --out_dir=out                        # reads out/ckpt.pt, writes out/hf
    python export.py --out_dir=out --export_dir=my-gpt2

    from transformers import GPT2LMHeadModel, AutoTokenizer
    model = GPT2LMHeadModel.from_pretrained('out/hf'); tok = AutoTokenizer.from_pretrained('out/hf')

The directory gets config.json, model.safetensors and, for GPT-2 BPE models, the GPT-2 tokenizer
(vocab.json, merges.txt, tokenizer.json), built offline from tiktoken's r50k_base ranks.
Our model is GPT-2's architecture, so the mapping is exact: Linear weights are transposed back to
HF's Conv1D layout, the padded embedding rows are dropped, a bias=False model gets zero biases
(a zero bias is no bias). Only softmax attention (attn_type 'SM') exists in HF GPT-2.
The export is built in a temporary directory and renamed into place when complete. It also writes
export_manifest.json, the sha256 of every file it wrote: an existing --export_dir is replaced only when
that manifest shows it is an earlier, unchanged export holding nothing else; any other directory is refused.
"""

import hashlib
import json
import os
import shutil

import torch

import chat_format
import lora
from configurator import configure, fail, unused, writable_dir
from files import sweep, why
from model import GPT2_ARCH
from runtime import load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
out_dir = 'out'  # reads out_dir/ckpt.pt
export_dir = ''  # where the HF directory goes (left out: out_dir/hf)
peft = False  # a LoRA run: export_dir gets its base, adapter_dir its adapter in PEFT's format (False: merged, as any run)
adapter_dir = ''  # with peft=True, where the adapter goes (left out: export_dir-adapter)
# -----------------------------------------------------------------------------
given = configure(globals())
if not out_dir:
    fail("--out_dir is empty; give the run's directory, e.g. --out_dir=out")
if 'export_dir' not in given:
    export_dir = os.path.join(out_dir, 'hf')
writable_dir(export_dir, '--export_dir')
adapter_dir = adapter_dir or export_dir.rstrip(os.sep) + '-adapter'
if peft:
    writable_dir(adapter_dir, '--adapter_dir')

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
MANIFEST = 'export_manifest.json'  # {'written_by': 'export.py', 'files': {name: sha256}}: what an export may delete


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def not_an_export(path):
    """why the existing directory path must not be replaced ('' when it may): only an earlier export of this script,
    unchanged and holding nothing else, may go, so that no file of the user's is ever deleted"""
    if os.path.islink(path):
        return "it is a symbolic link"
    names = sorted(os.listdir(path))
    try:
        with open(os.path.join(path, MANIFEST), encoding='utf-8') as f:
            manifest = json.load(f)
        written = manifest['files'] if manifest.get('written_by') == 'export.py' else None
    except (OSError, ValueError, AttributeError, KeyError):
        written = None
    some = lambda ns: ', '.join(ns[:3]) + (', ...' if len(ns) > 3 else '')
    if names and not isinstance(written, dict):
        return f"it holds {some(names)}, with no {MANIFEST} saying export.py wrote them"
    names = [n for n in names if n != MANIFEST]
    if others := [n for n in names if n not in written]:
        return f"it holds {some(others)}, which export.py did not write"

    def unchanged(name):
        full = os.path.join(path, name)
        try:
            return os.path.isfile(full) and not os.path.islink(full) and sha256(full) == written[name]
        except OSError:
            return False
    if changed := [n for n in names if not unchanged(n)]:
        return f"{some(changed)} changed since it was exported"
    return ''


def refuse_export_dir(reason, export_dir=export_dir, flag='--export_dir'):
    fail(f"{flag}={export_dir} exists and is not an earlier export that can be replaced ({reason}); "
         f"export elsewhere with --export_dir=NEW_DIR, or move what you want to keep out of it and delete it yourself")


if os.path.isdir(export_dir) and (reason := not_an_export(export_dir)):
    refuse_export_dir(reason)
if peft and os.path.isdir(adapter_dir) and (reason := not_an_export(adapter_dir)):
    refuse_export_dir(reason, adapter_dir, '--adapter_dir')


def byte_to_unicode():
    """GPT-2's vocab.json / merges.txt spell bytes as printable characters: the printable Latin-1 bytes stand for
    themselves, the other 68 (controls, space, ...) are shifted to chr(256 + k) in byte order"""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def bpe_merges(ranks):
    """GPT-2's merge list from tiktoken's ranks: the token of rank r is the merge of the two pieces that byte-pair
    encoding of its own bytes reaches just before the end, when only merges ranked below r are allowed"""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair, as the encoder does
            r, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            assert r < rank, f"token {token!r} cannot be built from lower-ranked merges"
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def write_gpt2_tokenizer(path, block_size, enc):
    """GPT-2's vocab.json and merges.txt, rebuilt from the ranks of enc (tiktoken's r50k_base), into path (which
    already holds the model's config.json); transformers then adds its tokenizer.json and tokenizer_config.json"""
    from transformers import AutoTokenizer
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != enc.eot_token}
    spell = byte_to_unicode()
    word = lambda b: ''.join(spell[x] for x in b)
    vocab = {word(t): i for t, i in ranks.items()}
    vocab['<|endoftext|>'] = enc.eot_token
    with open(os.path.join(path, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + ''.join(f"{word(a)} {word(b)}\n" for a, b in bpe_merges(ranks)))
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=block_size)
    tokenizer.chat_template = chat_format.CHAT_TEMPLATE  # apply_chat_template gives chat.py's tokens
    tokenizer.save_pretrained(path)


# the checkpoint, and everything that would stop the export, before anything is written
ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
args = ckpt['model_args']
if other := [f"{k}={args[k]!r}" for k, v in GPT2_ARCH.items() if args.get(k, v) != v]:
    fail(f"{', '.join(other)} cannot be exported: this is not GPT-2's architecture, so Hugging Face GPT-2 would load "
         f"its weights but compute something else")
if args.get('attn_type', 'SM') != 'SM':
    fail(f"attn_type '{args['attn_type']}' cannot be exported: Hugging Face GPT-2 only has softmax attention "
         f"('SM'), so it would load this model's weights but compute something else")
try:
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:
    fail("export.py needs transformers: pip install transformers")
if peft and 'lora' not in ckpt:
    fail(f"--peft=True exports a LoRA run's adapter, and {os.path.join(out_dir, 'ckpt.pt')} is not a LoRA run; "
         f"export it without --peft")
if not peft:
    unused(('adapter_dir',), 'without --peft=True')
    model = model_from_checkpoint(ckpt).eval()  # a LoRA run merged
else:  # the base exported as it is, the adapters apart
    model = lora.from_checkpoint(ckpt, None, os.path.join(out_dir, 'ckpt.pt'), merge_adapters=False)
    adapter_sd, model = lora.adapters(model), lora.unadapted(model).eval()
cfg = model.config
meta = ckpt.get('meta')
V = cfg.vocab_size

# the same network as a transformers GPT-2 (tie_word_embeddings: lm_head is wte, as in ours)
bpe = meta is None
hf_config = GPT2Config(vocab_size=V, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, activation_function='gelu_new', resid_pdrop=cfg.dropout,
                       embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5,
                       tie_word_embeddings=True, bos_token_id=50256 if bpe and V > 50256 else None,
                       eos_token_id=50256 if bpe and V > 50256 else None)
hf = GPT2LMHeadModel(hf_config).eval()
sd = model.state_dict()
with torch.no_grad():
    for name, p in hf.named_parameters():  # tied lm_head.weight is not listed: it is wte
        if name in sd:
            w = sd[name]
        elif name.endswith('.bias'):
            w = torch.zeros_like(p)  # bias=False model
        else:
            fail(f"internal: no weight for {name} in the checkpoint")
        if name.endswith(CONV1D):
            w = w.t()  # nn.Linear stores (out, in), HF's Conv1D (in, out)
        if name == 'transformer.wte.weight':
            w = w[:V]  # our embedding is padded to a multiple of 64 rows
        if w.shape != p.shape:
            fail(f"internal: {name} has shape {tuple(w.shape)}, HF GPT-2 wants {tuple(p.shape)}")
        p.copy_(w)

# check before writing: both models must give the same logits
x = torch.randint(V, (2, min(cfg.block_size, 16)))
with torch.no_grad():
    diff = (hf(x).logits - model(x, torch.zeros_like(x))[0]).abs().max().item()
if diff > 1e-3:
    fail(f"internal: the HF model's logits differ from ours by {diff:.2e}; nothing was written")

notes = []
enc = None
if bpe and V >= 50257:
    try:
        import tiktoken
        enc = tiktoken.get_encoding('r50k_base')
    except Exception as e:
        notes.append(f"no tokenizer written (tiktoken could not load r50k_base: {type(e).__name__}; offline, set "
                     f"TIKTOKEN_CACHE_DIR to a cache that has it); or, on a machine with network: python -c \"from "
                     f"transformers import AutoTokenizer; AutoTokenizer.from_pretrained('gpt2').save_pretrained("
                     f"'{export_dir}')\"")
elif bpe:
    notes.append(f"no tokenizer written: vocab_size {V} is smaller than GPT-2's 50257")
else:
    notes.append("character-level model: Hugging Face has no tokenizer for a char vocab; char_vocab.json "
                 "holds it (token id i is itos[i]: encode with [itos.index(c) for c in text])")

parent, name = os.path.split(os.path.abspath(export_dir))
if os.path.isdir(parent):
    sweep(parent, name)  # the temp directories of exports that were killed midway
tmp = f"{export_dir.rstrip(os.sep)}.tmp.{os.getpid()}"
try:
    hf.save_pretrained(tmp)  # config.json + model.safetensors; transformers handles the tied weights
    if enc is not None:
        write_gpt2_tokenizer(tmp, cfg.block_size, enc)
    if not bpe:
        with open(os.path.join(tmp, 'char_vocab.json'), 'w', encoding='utf-8') as f:
            json.dump({'vocab_size': V, 'itos': meta.get('itos')}, f, ensure_ascii=False)
    files = {n: sha256(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, MANIFEST), 'w', encoding='utf-8') as f:
        json.dump({'written_by': 'export.py', 'checkpoint': os.path.abspath(os.path.join(out_dir, 'ckpt.pt')),
                   'iter_num': ckpt.get('iter_num'), 'files': files}, f, indent=1)
except Exception as e:
    shutil.rmtree(tmp, ignore_errors=True)
    fail(f"could not write the export to {export_dir} ({why(e)}); nothing was replaced")



def put_in_place(tmp, export_dir, flag='--export_dir'):
    """swap the finished directory tmp into place. An earlier export is replaced only now, after a second look (the
    export may have taken a while), and of it only the files its manifest lists are deleted"""
    old = f"{export_dir.rstrip(os.sep)}.old.{os.getpid()}"
    written = []
    if os.path.lexists(export_dir):
        if not os.path.isdir(export_dir) or (reason := not_an_export(export_dir)):
            shutil.rmtree(tmp, ignore_errors=True)
            refuse_export_dir(reason if os.path.isdir(export_dir) else "it is not a directory", export_dir, flag)
        if os.path.isfile(os.path.join(export_dir, MANIFEST)):
            written = [*json.load(open(os.path.join(export_dir, MANIFEST), encoding='utf-8'))['files'], MANIFEST]
    try:
        if os.path.lexists(export_dir):
            os.replace(export_dir, old)
        os.replace(tmp, export_dir)
    except OSError as e:
        fail(f"could not move the finished export {tmp} to {export_dir}: {e}")
    if os.path.isdir(old):
        for name in os.listdir(old):
            if name in written and os.path.isfile(os.path.join(old, name)):
                os.remove(os.path.join(old, name))
        try:
            os.rmdir(old)
        except OSError:
            print(f"note: files appeared in {export_dir} during the export; they are kept in {old}")


put_in_place(tmp, export_dir)
if peft:  # adapter_config.json + adapter_model.safetensors, built whole in a temp directory as the base was
    parent, name = os.path.split(os.path.abspath(adapter_dir))
    if os.path.isdir(parent):
        sweep(parent, name)
    tmp = f"{adapter_dir.rstrip(os.sep)}.tmp.{os.getpid()}"
    try:
        os.makedirs(tmp)
        contents = lora.peft_files(adapter_sd, ckpt['lora'], export_dir)
        for n, data in contents.items():
            with open(os.path.join(tmp, n), 'wb') as f:
                f.write(data)
        with open(os.path.join(tmp, MANIFEST), 'w', encoding='utf-8') as f:
            json.dump({'written_by': 'export.py', 'checkpoint': os.path.abspath(os.path.join(out_dir, 'ckpt.pt')),
                       'files': {n: sha256(os.path.join(tmp, n)) for n in sorted(contents)}}, f, indent=1)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"could not write the adapter to {adapter_dir} ({why(e)}); the base is in {export_dir}, no adapter was "
             f"replaced")
    put_in_place(tmp, adapter_dir, '--adapter_dir')

print(f"exported {os.path.join(out_dir, 'ckpt.pt')} (iter {ckpt.get('iter_num')}, "
      f"{sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M params, max logit diff {diff:.1e}) to {export_dir}")
print(f"files: {', '.join(sorted(os.listdir(export_dir)))}")
for note in notes:
    print(note)
if peft:
    print(f"adapter (PEFT LoRA, rank {ckpt['lora']['rank']}) in {adapter_dir}; load with: peft.PeftModel.from_pretrained("
          f"transformers.GPT2LMHeadModel.from_pretrained('{export_dir}'), '{adapter_dir}')")
else:
    print(f"load with: transformers.GPT2LMHeadModel.from_pretrained('{export_dir}')")
