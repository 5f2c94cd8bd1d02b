"""
Prepare Tiny Shakespeare with the GPT-2 BPE tokenizer:

    python data/shakespeare/prepare.py

Downloads input.txt (once), splits it 90/10 by characters, and writes next to this script train.bin and
val.bin: GPT-2 token ids as uint16 (301,966 and 36,059 tokens for the real file). The vocabulary is
GPT-2's own 50,257 tokens, so there is no meta.json.
"""

import os
import sys
import urllib.request

import numpy as np
import tiktoken

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from configurator import configure, fail

url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'  # fetched only if input.txt is missing
val_fraction = 0.1  # the last 10% of the characters are held out for validation
configure(globals())

here = os.path.dirname(os.path.abspath(__file__))


def save(path, data):
    # write to a temp name first so an interrupted run never leaves a half-written file behind
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def download(path):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        fail(f"could not download {url} ({e}); check your network, or put the text at {path}")
    save(path, data)


input_path = os.path.join(here, 'input.txt')
if not os.path.exists(input_path):
    print(f"downloading {url}")
    download(input_path)
try:
    with open(input_path, encoding='utf-8') as f:
        text = f.read()
except (OSError, UnicodeDecodeError) as e:
    fail(f"cannot read {input_path} as UTF-8 text: {e}")
if not 0.0 < val_fraction < 1.0:
    fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
print(f"length of dataset in characters: {len(text):,}")

# r50k_base is GPT-2's tokenizer (same ranks and regex); the "gpt2" name needs extra files to download
try:
    enc = tiktoken.get_encoding('r50k_base')
except Exception as e:
    fail(f"could not load the GPT-2 tokenizer r50k_base ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
        "tiktoken downloads it once, so check your network or set TIKTOKEN_CACHE_DIR to a cache that holds it")

# split the text first, then encode each part: a token never straddles the boundary
n = int(len(text) * (1 - val_fraction))
# encode_ordinary: a literal "<|endoftext|>" in the text is just text, never the special token
train_ids = np.array(enc.encode_ordinary(text[:n]), dtype=np.uint16)
val_ids = np.array(enc.encode_ordinary(text[n:]), dtype=np.uint16)
if len(train_ids) == 0 or len(val_ids) == 0:
    fail(f"{input_path} is too short ({len(text)} characters) to split into train and val")
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

save(os.path.join(here, 'train.bin'), train_ids.tobytes())
save(os.path.join(here, 'val.bin'), val_ids.tobytes())
