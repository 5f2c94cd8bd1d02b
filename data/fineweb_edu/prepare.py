"""
Prepare FineWeb-Edu sample-10BT (about 9.7M educational web pages, 10B GPT-2 tokens) for training:

    python data/fineweb_edu/prepare.py                        # streams it from the Hugging Face Hub
    python data/fineweb_edu/prepare.py --num_docs=20000       # try it small first; a larger run later continues it
    python data/fineweb_edu/prepare.py --dataset=my_docs/     # or local json/jsonl/parquet files with a 'text' column

The first val_docs documents go to val.bin and the rest to train.bin, each document preceded by the
end-of-text token 50256, as uint16 ids. Documents are streamed, tokenized in order by a process pool and
appended to the bins batch by batch, so neither the text nor the tokens are ever all in memory.
The full run writes ~20 GB of train.bin. It is resumable: every checkpoint_s seconds the bins are fsynced
and then progress.json records the documents done and the tokens in each bin. After a crash or Ctrl-C,
rerun the same command: it cuts the bins back to the recorded sizes and continues after the recorded document.
"""

import collections
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time

import numpy as np
import tiktoken
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from configurator import configure

dataset = 'HuggingFaceFW/fineweb-edu'  # a Hub dataset name, or a local directory / .json(l) / .parquet / .csv file with a 'text' column
name = 'sample-10BT'  # the subset of the Hub dataset (ignored for a local path)
num_docs = None  # stop after this many documents (None = all); for trying the pipeline small
val_docs = 10_000  # the first val_docs documents go to val.bin; unless set, at most 1% of num_docs
num_proc = min(8, os.cpu_count() or 1)  # tokenizing processes; 1 = tokenize in this process
chunk_docs = 1024  # documents per batch handed to a tokenizing process
checkpoint_s = 30.0  # seconds between progress saves; a crash costs at most this much work
out_dir = ''  # where train.bin, val.bin and progress.json go; '' = next to this script
overridden = configure(globals())

EOT = 50256  # <|endoftext|>: marks where each document starts, so the model learns the boundaries
pool = None  # the tokenizing processes, once started


def die(msg):
    if pool is not None:
        pool.terminate()  # a pool left running at exit makes multiprocessing print a traceback
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def one_line(e):
    # library errors can span many lines; the user gets the gist in one
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def open_stream():
    """The 'train' split as a stream of {'text': ...} dicts: a local file or directory when that path exists, else the Hub."""
    if not os.path.exists(dataset) and (dataset.startswith(('.', '/', '~')) or dataset.count('/') > 1):
        die(f"no such file or directory: {dataset}")  # clearly a path, not a Hub name like 'owner/name'
    if os.path.isfile(dataset):
        # a single file needs its format named; a directory (or a Hub name) is recognised by datasets itself
        ext = dataset.removesuffix('.gz').rsplit('.', 1)[-1].lower()
        builder = {'json': 'json', 'jsonl': 'json', 'parquet': 'parquet', 'csv': 'csv', 'txt': 'text'}.get(ext)
        if builder is None:
            die(f"don't know how to read {dataset}: use a .json, .jsonl, .parquet, .csv or .txt file, or a directory of them")
        return load_dataset(builder, data_files=dataset, split='train', streaming=True)
    try:
        # streaming: 10B tokens of parquet need not be downloaded (and cached, ~30 GB) before we start
        return load_dataset(dataset, name=None if os.path.isdir(dataset) else name, split='train', streaming=True)
    except ConnectionError as e:
        die(f"could not reach the Hugging Face Hub for '{dataset}' ({one_line(e)}); check your network, "
            f"or pass --dataset=LOCAL_PATH (a directory or .jsonl/.parquet file with a 'text' column)")
    except FileNotFoundError as e:
        die(f"dataset '{dataset}' is neither a local path nor found on the Hub ({one_line(e)})")


def batches(stream, start, stop):
    """(split, texts) for documents start..stop-1 of the stream, in order; no batch spans both val and train."""
    texts, i = [], start
    for doc in itertools.islice(stream, None if stop is None else stop - start):
        if not isinstance(doc.get('text'), str):
            die(f"document {i} of '{dataset}' has no 'text' string (its fields: {', '.join(doc)})")
        texts.append(doc['text'])
        i += 1
        if len(texts) == chunk_docs or i == val_docs:
            yield ('val' if i <= val_docs else 'train'), texts
            texts = []
    if texts:
        yield ('val' if i <= val_docs else 'train'), texts


def tokenize(texts):
    """One uint16 array of the token ids of a batch of documents, each preceded by EOT (runs in the pool's processes)."""
    enc = tiktoken.get_encoding('r50k_base')  # GPT-2's BPE; tiktoken loads it once per process and caches it
    ids = []
    for text in texts:
        ids.append(EOT)
        ids.extend(enc.encode_ordinary(text))  # ordinary: "<|endoftext|>" inside a document stays plain text
    ids = np.array(ids, dtype=np.uint32)
    assert ids.max() < 2**16, "a token id does not fit in uint16"  # never for GPT-2 (ids < 50257), but checked
    return ids.astype(np.uint16)


def tokenized(todo):
    """(split, n_docs, ids) for each (split, texts) batch of todo, in order, with up to 2 * num_proc batches in the pool."""
    if pool is None:
        for split, texts in todo:
            yield split, len(texts), tokenize(texts)
        return
    # not pool.imap: it reads its whole input as fast as it can, which for a 10B-token stream means into memory;
    # a bounded queue of async tasks keeps the order and the memory small while all processes stay busy
    pending = collections.deque()
    for split, texts in todo:
        pending.append((split, len(texts), pool.apply_async(tokenize, (texts,))))
        if len(pending) >= 2 * num_proc:
            split, n, result = pending.popleft()
            yield split, n, result.get()
    while pending:
        split, n, result = pending.popleft()
        yield split, n, result.get()


def checkpoint(state, files, path):
    # the bins reach the disk before the record that counts them, so the record never claims more than is there
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves either the old record or the new one


if __name__ == '__main__':  # the tokenizing processes may re-import this file; only the parent runs the pipeline
    for key, least in (('num_proc', 1), ('chunk_docs', 1), ('val_docs', 1)):
        if globals()[key] < least:
            die(f"{key} must be at least {least}, got {globals()[key]}")
    if num_docs is not None and (type(num_docs) is not int or num_docs < 2):
        die(f"num_docs must be None or a whole number >= 2 (one val and one train document), got {num_docs!r}")
    dataset = os.path.expanduser(dataset)  # the shell leaves a ~ in --dataset=~/docs alone
    local = os.path.exists(dataset)
    source, subset = (os.path.abspath(dataset), None) if local else (dataset, name)  # what progress.json records
    out = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out, exist_ok=True)
    paths = {'val': os.path.join(out, 'val.bin'), 'train': os.path.join(out, 'train.bin')}
    progress_path = os.path.join(out, 'progress.json')

    # resume from progress.json if an earlier run left one, but only a run over the same documents
    if os.path.exists(progress_path):
        try:
            with open(progress_path) as f:
                state = json.load(f)
        except ValueError as e:
            die(f"{progress_path} is damaged ({e}); delete it and both bins to start over")
        if (state['dataset'], state['name']) != (source, subset):
            die(f"{progress_path} is from a run over '{state['dataset']}' ({state['name']}); pass that --dataset "
                f"and --name to continue it, or use another --out_dir (or delete it) to start over")
        if 'val_docs' in overridden and val_docs != state['val_docs']:
            die(f"{progress_path} is from a run with val_docs={state['val_docs']}; "
                f"drop --val_docs to continue it, or use another --out_dir (or delete it) to start over")
        val_docs = state['val_docs']
        if state['done'] and state['num_docs'] in (None, num_docs):
            print(f"already complete: {state['docs']:,} documents, val.bin {state['tokens']['val']:,} tokens, "
                  f"train.bin {state['tokens']['train']:,} tokens in {out}")
            sys.exit(0)
        if num_docs is not None and state['docs'] > num_docs:
            die(f"{out} already holds {state['docs']:,} documents, more than --num_docs={num_docs}")
        print(f"resuming after {state['docs']:,} documents")
        state = {**state, 'done': False, 'num_docs': None}  # a finished trial run being extended is not done any more
    else:
        if num_docs is not None and 'val_docs' not in overridden:
            val_docs = min(val_docs, max(1, num_docs // 100))  # a small trial run keeps most documents for train
        state = {'dataset': source, 'name': subset, 'val_docs': val_docs,
                 'docs': 0, 'tokens': {'val': 0, 'train': 0}, 'done': False, 'num_docs': None}
    if num_docs is not None and val_docs >= num_docs:
        die(f"val_docs ({val_docs}) must be smaller than num_docs ({num_docs}), or train.bin would be empty")

    try:
        tiktoken.get_encoding('r50k_base')  # fail now, not in a worker, if the tokenizer cannot be had
    except Exception as e:
        die(f"could not load the GPT-2 tokenizer r50k_base ({one_line(e)}); tiktoken downloads it once, "
            "so check your network or set TIKTOKEN_CACHE_DIR to a cache that holds it")
    # start the processes before the stream: forking after the download threads exist is asking for deadlocks;
    # the workers ignore Ctrl-C, so only this process handles it (and saves the progress)
    pool = multiprocessing.Pool(num_proc, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if num_proc > 1 else None

    # the stream never goes to a torch DataLoader, so spare datasets the seconds it spends importing torch for one
    os.environ.setdefault('USE_TORCH', '0')
    from datasets import load_dataset  # imported here: it is slow to import, and the checks above are not
    try:
        stream = open_stream()
    except Exception as e:  # a malformed local file, a broken download, ...
        die(f"could not load '{dataset}': {one_line(e)}")
    if state['docs']:
        # skipping still reads the skipped documents, but reading is quick next to tokenizing them
        stream = stream.skip(state['docs'])

    # cut each bin back to what progress.json counted: anything after it is from a run that stopped before its next save
    files = {}
    for split, path in paths.items():
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if size < 2 * state['tokens'][split]:
            die(f"{path} holds {size // 2:,} tokens but {progress_path} counts {state['tokens'][split]:,}; "
                f"delete both bins and {progress_path} to start over")
        files[split] = open(path, 'ab')
        files[split].truncate(2 * state['tokens'][split])
    checkpoint(state, files, progress_path)

    t0, last_save, new_tokens = time.time(), time.time(), 0
    bar = tqdm(initial=state['docs'], total=num_docs, unit='doc', desc='tokenizing')
    try:
        for split, n, ids in tokenized(batches(stream, state['docs'], num_docs)):
            files[split].write(ids.tobytes())
            # a single assignment, so an interrupt can never leave the counts half updated
            state = {**state, 'docs': state['docs'] + n, 'tokens': {**state['tokens'], split: state['tokens'][split] + len(ids)}}
            new_tokens += len(ids)
            bar.update(n)
            if time.time() - last_save >= checkpoint_s:
                checkpoint(state, files, progress_path)
                last_save = time.time()
    except KeyboardInterrupt:
        bar.close()  # before the message, so the error is the last line
        checkpoint(state, files, progress_path)
        die(f"interrupted after {state['docs']:,} documents; progress is saved, rerun the same command to continue")
    except Exception as e:  # most likely the network, while streaming from the Hub
        bar.close()
        checkpoint(state, files, progress_path)
        die(f"stopped after {state['docs']:,} documents ({one_line(e)}); progress is saved, "
            f"rerun the same command to continue (streaming from the Hub? check your network)")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()

    # done: either num_docs was reached, or the whole dataset was read (recorded as num_docs None)
    reached = num_docs is not None and state['docs'] == num_docs
    state = {**state, 'done': True, 'num_docs': num_docs if reached else None}
    checkpoint(state, files, progress_path)
    for f in files.values():
        f.close()
    dt = time.time() - t0
    print(f"done: {state['docs']:,} documents; val.bin {state['tokens']['val']:,} tokens, train.bin {state['tokens']['train']:,} tokens")
    print(f"this run: {new_tokens:,} tokens in {dt:.1f}s ({new_tokens / max(dt, 1e-9):,.0f} tokens/s with num_proc={num_proc})")
    if state['tokens']['train'] == 0:
        print(f"warning: train.bin is empty: the dataset has no more than val_docs={val_docs} documents")
