"""
Prepare Tiny Shakespeare as a character-level dataset:

    python data/shakespeare_char/prepare.py

Downloads input.txt (once), maps each distinct character to an id, and writes next to this script
train.bin / val.bin (uint16 ids, the first 90% / last 10% of the characters) and meta.json
({"vocab_size": N, "itos": [the characters in id order]}), which train.py and sample.py read.
"""

import json
import os
import sys
import urllib.request

import numpy as np

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

# the vocabulary is every character that occurs, sorted, so ids are stable for the same text
chars = sorted(set(text))
if len(chars) > 65536:
    fail(f"{input_path} has {len(chars):,} distinct characters; uint16 ids allow at most 65,536")
print(f"vocab size: {len(chars)}")
print(f"all the unique characters: {''.join(chars)!r}")
stoi = {c: i for i, c in enumerate(chars)}

n = int(len(text) * (1 - val_fraction))
if n == 0 or n == len(text):
    fail(f"{input_path} is too short ({len(text)} characters) to split into train and val")
train_ids = np.array([stoi[c] for c in text[:n]], dtype=np.uint16)
val_ids = np.array([stoi[c] for c in text[n:]], dtype=np.uint16)
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

save(os.path.join(here, 'train.bin'), train_ids.tobytes())
save(os.path.join(here, 'val.bin'), val_ids.tobytes())
# JSON, not pickle: loading a pickle can run arbitrary code
save(os.path.join(here, 'meta.json'), json.dumps({'vocab_size': len(chars), 'itos': chars}).encode())
