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

import math
import os
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from configurator import configure, writable_dir
import dataprep
from dataprep import EOT, fail

dataset = 'openwebtext'  # a Hub dataset name, or a local directory / .json(l) / .parquet / .csv file with a 'text' column
num_proc = min(8, os.cpu_count() or 1)  # processes for tokenizing; about half your CPU cores is a good start
num_docs = None  # use only the first num_docs documents (None = all); for trying the pipeline small
val_fraction = 0.0005  # fraction of the documents held out for validation, chosen at random
seed = 2357  # seed of the train/val shuffle, so the split is the same on every run
out_dir = ''  # where train.bin / val.bin go; not given = next to this script
overwrite = False  # replace the dataset already in out_dir
overridden = configure(globals())
no_text = 0  # documents whose text is null: left out, and counted


def batches(dset, split):
    """(n, items) for the documents of dset, 1024 at a time: the text of each, then EOT (see dataprep.encode)."""
    global no_text
    for batch in dset.select_columns(['text']).iter(batch_size=1024):
        no_text += batch['text'].count(None)
        yield len(batch['text']), [(split, item) for text in batch['text'] if text is not None for item in (text, EOT)]


if __name__ == '__main__':  # the tokenizing processes may re-import this file; only the parent runs the pipeline
    if num_proc < 1:
        fail(f"num_proc must be at least 1, got {num_proc}")
    if not 0.0 < val_fraction < 1.0:
        fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if num_docs is not None and (type(num_docs) is not int or num_docs < 2):
        fail(f"num_docs must be None or a whole number >= 2 (one train and one val document), got {num_docs!r}")
    dataset = os.path.expanduser(dataset)  # the shell leaves a ~ in --dataset=~/docs alone
    out = out_dir if 'out_dir' in overridden else os.path.dirname(os.path.abspath(__file__))
    writable_dir(out, '--out_dir')
    dataprep.check_overwrite(out, overwrite, '--out_dir')

    dataprep.gpt2_encoding()  # fail now, not in a worker, if the tokenizer cannot be had
    dataprep.start_pool(num_proc)
    ds = dataprep.load_docs(dataset)
    if 'text' not in ds.column_names:
        fail(f"'{dataset}' has no 'text' column (its columns: {', '.join(ds.column_names)})")
    if getattr(ds.features['text'], 'dtype', None) not in ('string', 'large_string'):
        fail(f"the 'text' column of '{dataset}' holds {ds.features['text']}, not strings")
    if num_docs is not None:
        ds = ds.select(range(min(num_docs, len(ds))))
    if len(ds) < 2:
        fail(f"'{dataset}' has {len(ds)} document(s); train and val need at least one each")
    print(f"{len(ds):,} documents from '{dataset}'")
    if len(ds) - math.ceil(val_fraction * len(ds)) < 1:  # the count train_test_split holds out
        fail(f"val_fraction={val_fraction} of {len(ds)} documents leaves none for train.bin; lower --val_fraction")

    # the original dataset has only a train split, so hold out a random val_fraction of it (at least one document)
    split = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    split = {'train': split['train'], 'val': split['test']}

    files = dataprep.open_bins(out)  # temp bins, put in place when both are complete
    try:
        for name, dset in split.items():
            n_tokens = 0
            with tqdm(total=len(dset), unit='doc', desc=f'tokenizing the {name} split') as bar:
                for n, ids in dataprep.tokenized(batches(dset, name)):
                    dataprep.append(files, ids)
                    n_tokens += len(ids.get(name, ()))
                    bar.update(n)
            print(f"{name}.bin: {len(dset):,} documents, {n_tokens:,} tokens")
    except KeyboardInterrupt:
        fail("interrupted; nothing was written, rerun to start again")
    dataprep.stop_pool()
    dataprep.finish_bins(files)
    if no_text:
        print(f"note: {no_text:,} document(s) had no text (null) and were left out")

    # to read the bins later: np.memmap(path, dtype=np.uint16, mode='r')
