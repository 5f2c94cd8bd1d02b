"""
Prepare Tiny Shakespeare as a character-level dataset:

    python data/shakespeare_char/prepare.py

Downloads input.txt (once), maps each distinct character to an id, and writes next to this script
train.bin / val.bin (uint16 ids, the first 90% / last 10% of the characters) and meta.json
({"vocab_size": N, "itos": [the characters in id order]}), which train.py and sample.py read.
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

# the vocabulary is every character that occurs, sorted, so ids are stable for the same text
chars = dataprep.char_vocab(set(text), input_path)
print(f"vocab size: {len(chars)}")
print(f"all the unique characters: {''.join(chars)!r}")

n = int(len(text) * (1 - val_fraction))
if n == 0 or n == len(text):
    fail(f"{input_path} is too short ({len(text)} characters) to split into train and val")
codes = dataprep.code_points(chars)
ids = {'train': dataprep.char_ids(text[:n], codes), 'val': dataprep.char_ids(text[n:], codes)}
print(f"train has {len(ids['train']):,} tokens")
print(f"val has {len(ids['val']):,} tokens")
dataprep.write_dataset(here, ids, chars, overwrite)
