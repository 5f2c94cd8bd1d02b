"""
Prepare OpenWebText (about 8M web documents, 9B GPT-2 tokens) for training:

    python data/openwebtext/prepare.py                        # the Hugging Face Hub dataset 'openwebtext'
    python data/openwebtext/prepare.py --num_docs=10000       # try it small first
    python data/openwebtext/prepare.py --dataset=my_docs/     # or local json/jsonl/parquet files with a 'text' column

Holds out a random val_fraction of the documents, tokenizes every document with the GPT-2 BPE in a
process pool, appends the end-of-text token 50256 after each one, and writes train.bin and val.bin
(uint16 token ids) next to this script or in out_dir. The full run downloads and caches tens of GB in the
Hugging Face cache, and gives a train.bin of ~17 GB (~9B tokens) and a val.bin of ~8.5 MB (~4M tokens).
"""

import os
import sys

import numpy as np
import pyarrow.compute as pc
import tiktoken
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from configurator import configure, fail

dataset = 'openwebtext'  # a Hub dataset name, or a local directory / .json(l) / .parquet / .csv file with a 'text' column
num_proc = min(8, os.cpu_count() or 1)  # processes for tokenizing; about half your CPU cores is a good start
num_docs = None  # use only the first num_docs documents (None = all); for trying the pipeline small
val_fraction = 0.0005  # fraction of the documents held out for validation, chosen at random
seed = 2357  # seed of the train/val shuffle, so the split is the same on every run
out_dir = ''  # where train.bin / val.bin go; '' = next to this script
configure(globals())

EOT = 50256  # <|endoftext|>: separates documents, so the model learns where one ends


def one_line(e):
    # library errors can span many lines; the user gets the gist in one
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def load():
    """The 'train' split of the dataset: a local file or directory when that path exists, else the Hub."""
    if not os.path.exists(dataset) and (dataset.startswith(('.', '/', '~')) or dataset.count('/') > 1):
        fail(f"no such file or directory: {dataset}")  # clearly a path, not a Hub name like 'owner/name'
    if os.path.isfile(dataset):
        # a single file needs its format named; a directory (or a Hub name) is recognised by datasets itself
        ext = dataset.removesuffix('.gz').rsplit('.', 1)[-1].lower()
        builder = {'json': 'json', 'jsonl': 'json', 'parquet': 'parquet', 'csv': 'csv', 'txt': 'text'}.get(ext)
        if builder is None:
            fail(f"don't know how to read {dataset}: use a .json, .jsonl, .parquet, .csv or .txt file, or a directory of them")
        return load_dataset(builder, data_files=dataset, split='train')
    try:
        return load_dataset(dataset, split='train')
    except ConnectionError as e:
        fail(f"could not reach the Hugging Face Hub for '{dataset}' ({one_line(e)}); check your network, "
            f"or pass --dataset=LOCAL_PATH (a directory or .jsonl/.parquet file with a 'text' column)")
    except FileNotFoundError as e:
        fail(f"dataset '{dataset}' is neither a local path nor found on the Hub ({one_line(e)})")


def process(example):
    # looked up here, not kept in a global: datasets pickles the function (and its globals) to fingerprint
    # its cache, and the tokenizer's 50k-entry table takes seconds to pickle; tiktoken caches it per process
    enc = tiktoken.get_encoding('r50k_base')
    # encode_ordinary ignores special tokens, so "<|endoftext|>" typed inside a document stays plain text
    ids = enc.encode_ordinary(example['text'])
    ids.append(EOT)
    # every GPT-2 token id is < 50257, so uint16 holds them (and takes a quarter of int64's cache space)
    return {'ids': np.array(ids, dtype=np.uint16), 'len': len(ids)}


def write(dset, path):
    """Write all token ids of dset to path, a batch of documents at a time, never the whole split in memory."""
    n_tokens = pc.sum(dset.with_format('arrow')['len']).as_py()
    tmp = path + '.tmp'  # a run killed halfway leaves path untouched (or absent), never half-written
    arr = np.memmap(tmp, dtype=np.uint16, mode='w+', shape=(n_tokens,))
    i = 0
    with tqdm(total=n_tokens, unit='tok', unit_scale=True, desc=f'writing {path}') as bar:
        for batch in dset.with_format('arrow').iter(batch_size=1024):
            # Arrow flattens the batch's token lists into one array without a Python object per document
            ids = pc.list_flatten(batch['ids']).to_numpy()
            arr[i:i + len(ids)] = ids
            i += len(ids)
            bar.update(len(ids))
    assert i == n_tokens
    arr.flush()
    del arr
    os.replace(tmp, path)
    return n_tokens


if __name__ == '__main__':  # the tokenizing processes may re-import this file; only the parent runs the pipeline
    if num_proc < 1:
        fail(f"num_proc must be at least 1, got {num_proc}")
    if not 0.0 < val_fraction < 1.0:
        fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if num_docs is not None and (type(num_docs) is not int or num_docs < 2):
        fail(f"num_docs must be None or a whole number >= 2 (one train and one val document), got {num_docs!r}")
    dataset = os.path.expanduser(dataset)  # the shell leaves a ~ in --dataset=~/docs alone
    out = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out, exist_ok=True)

    # r50k_base is GPT-2's tokenizer (same ranks and regex); the "gpt2" name needs extra files to download
    try:
        tiktoken.get_encoding('r50k_base')  # fail now, not in a worker, if the tokenizer cannot be had
    except Exception as e:
        fail(f"could not load the GPT-2 tokenizer r50k_base ({one_line(e)}); tiktoken downloads it once, "
            "so check your network or set TIKTOKEN_CACHE_DIR to a cache that holds it")

    from datasets import load_dataset  # imported here: it is slow to import, and the checks above are not
    try:
        ds = load()
    except Exception as e:  # a malformed local file, a broken download, ...
        fail(f"could not load '{dataset}': {one_line(e)}")
    if 'text' not in ds.column_names:
        fail(f"'{dataset}' has no 'text' column (its columns: {', '.join(ds.column_names)})")
    if getattr(ds.features['text'], 'dtype', None) not in ('string', 'large_string'):
        fail(f"the 'text' column of '{dataset}' holds {ds.features['text']}, not strings")
    if num_docs is not None:
        ds = ds.select(range(min(num_docs, len(ds))))
    if len(ds) < 2:
        fail(f"'{dataset}' has {len(ds)} document(s); train and val need at least one each")
    print(f"{len(ds):,} documents from '{dataset}'")

    # the original dataset has only a train split, so hold out a random val_fraction of it (at least one document)
    split = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    split = {'train': split['train'], 'val': split['test']}

    for name, dset in split.items():
        # datasets caches the tokenized split on disk, so a rerun with the same settings skips this step
        tokenized = dset.map(process, remove_columns=dset.column_names, num_proc=min(num_proc, len(dset)),
                             desc=f'tokenizing the {name} split')
        path = os.path.join(out, f'{name}.bin')
        n_tokens = write(tokenized, path)
        print(f"{name}.bin: {len(dset):,} documents, {n_tokens:,} tokens")

    # to read the bins later: np.memmap(path, dtype=np.uint16, mode='r')
