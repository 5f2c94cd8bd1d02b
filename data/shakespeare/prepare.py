"""
Prepare Tiny Shakespeare with the GPT-2 BPE tokenizer:

    python data/shakespeare/prepare.py

Downloads input.txt (once), splits it 90/10 by characters, and writes next to this script train.bin and
val.bin: GPT-2 token ids as uint16 (301,966 and 36,059 tokens for the real file). The vocabulary is
GPT-2's own 50,257 tokens, so there is no meta.json.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from configurator import configure, fail
import dataprep

url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'  # fetched only if input.txt is missing
val_fraction = 0.1  # the last 10% of the characters are held out for validation
overwrite = False  # replace a different dataset already here (rerunning on the same input.txt changes nothing)
configure(globals())
if not 0.0 < val_fraction < 1.0:
    fail(f"val_fraction must be between 0 and 1, got {val_fraction}")

here = os.path.dirname(os.path.abspath(__file__))
input_path = os.path.join(here, 'input.txt')
text = dataprep.read_or_download(input_path, url)
print(f"length of dataset in characters: {len(text):,}")
enc = dataprep.gpt2_encoding()

# split the text first, then encode each part: a token never straddles the boundary
n = int(len(text) * (1 - val_fraction))
# encode_ordinary: a literal "<|endoftext|>" in the text is just text, never the special token
ids = {'train': enc.encode_ordinary(text[:n]), 'val': enc.encode_ordinary(text[n:])}
if not ids['train'] or not ids['val']:
    fail(f"{input_path} is too short ({len(text)} characters) to split into train and val")
print(f"train has {len(ids['train']):,} tokens")
print(f"val has {len(ids['val']):,} tokens")
dataprep.write_dataset(here, ids, overwrite=overwrite)
