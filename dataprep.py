"""
What the data/*/prepare.py scripts share, so that each of them says only where its text comes from and how
it is split into train and val:

    gpt2_encoding()              GPT-2's BPE (tiktoken's r50k_base), or one line saying why it cannot be had
    start_pool() / tokenized()   batches of documents tokenized by a process pool, in order, a few at a time
    claim() / check_overwrite()  one writer per dataset folder; an existing dataset replaced only with --overwrite=True
    open_bins() / append() / finish_bins()  token ids appended to temp bins, put in place with meta.json once complete
    write_dataset()              a small dataset held in memory (bins and meta.json), written whole or not at all
    read_progress() / checkpoint()  progress.json, with which a long run continues after a crash
    char_vocab() / char_ids()    char-level ids (meta.json holds the vocabulary)
    load_docs()                  a local json(l)/parquet/csv file or folder, or a Hugging Face Hub dataset
    save() / read_or_download()  small files written atomically; a source text fetched once

A dataset (train.bin, val.bin and meta.json, or no meta.json for GPT-2 BPE) is replaced as a whole or not at all
(files.commit): a full disk or a kill never leaves bins and a vocabulary that do not belong together.

Bins hold uint16 token ids, one after another: GPT-2's 50,257 ids fit, and so does any char vocabulary
of up to 65,536 characters. train.py memmaps them; meta.json ({"vocab_size": N, "itos": [chars]}) marks
a char-level dataset.
"""

import collections
import errno
import json
import multiprocessing
import os
import signal
import urllib.request

import numpy as np

import configurator
import files

CHAT_FILES = ('chat.json', 'train.mask.bin', 'val.mask.bin', 'train.convs.bin', 'val.convs.bin')  # chat_format.py
EOT = 50256  # GPT-2's <|endoftext|>: marks where documents meet, so the model learns the boundaries
pool, pool_size = None, 0  # the tokenizing processes, once started
unfinished = []  # temp bins of a run that cannot be resumed: removed if it fails
resumable = False  # the open bins are counted by progress.json: kept if the run fails, for the next run to continue


def fail(msg):
    """configurator.fail, after stopping the pool and removing the half-written bins of a run that cannot resume"""
    if pool is not None:
        pool.terminate()  # a pool left running at exit makes multiprocessing print a traceback
    for path in unfinished:
        if os.path.exists(path) and not os.path.exists(os.path.join(os.path.dirname(path), files.JOURNAL)):
            os.remove(path)  # (unless a journal holds them: files.commit then completes the change on the next run)
    configurator.fail(msg)


def one_line(e):
    # library errors can span many lines; the user gets the gist in one
    if type(e).__name__ == 'DatasetGenerationError' and e.__cause__ is not None:
        e = e.__cause__  # its own message only says that generating failed; the cause says why
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def write_failed(e, where):
    """a write failed (most likely a full disk): one line; a fresh run's temp bins are removed (fail), a resumable
    run's are kept for the next run to continue"""
    fail(f"could not write to {where} ({files.why(e)}); " + (
        "progress.json keeps the work done: free some space and rerun the same command to continue" if resumable else
        "nothing was replaced: free some space and run again"))


def save(path, data):
    try:
        files.write_files(os.path.dirname(os.path.abspath(path)), {os.path.basename(path): data})
    except OSError as e:
        fail(str(e))


def read_or_download(path, url):
    """The text of path (a UTF-8 file), fetched from url first if it is not there yet."""
    if not os.path.exists(path):
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
        except OSError as e:
            fail(f"could not download {url} ({e}); check your network, or put the text at {path}")
        save(path, data)
    return configurator.read_text(path, 'the source text')


def gpt2_encoding():
    """GPT-2's BPE: tiktoken's r50k_base (the same ranks and regex as its 'gpt2', under the name its offline cache
    holds); every script loads it here"""
    import tiktoken
    try:
        return tiktoken.get_encoding('r50k_base')
    except Exception as e:  # offline without a cache: a chain of connection errors
        fail(f"could not load GPT-2's BPE (tiktoken r50k_base: {type(e).__name__}); it is downloaded once, so "
             f"offline set TIKTOKEN_CACHE_DIR to a folder holding its cache (see the README's offline set-up)")


# ----------------------------------------------------------------------------- char-level vocabulary

def char_vocab(chars, source):
    """The characters sorted, so the same text always gets the same ids; at most 65,536 fit in uint16."""
    chars = sorted(chars)
    if len(chars) > 2**16:
        fail(f"{source} has {len(chars):,} distinct characters; uint16 ids allow at most 65,536 (use --tokenizer=gpt2)")
    return chars


def code_points(chars):
    """The vocabulary as the sorted array char_ids looks characters up in."""
    return np.array([ord(c) for c in chars], dtype=np.uint32)


def char_ids(text, codes):
    """The id of each character of text: its rank among the vocabulary's code points (every one must be there)."""
    # UTF-32 turns the text into code points without a Python object per character
    # (surrogatepass: JSON can spell a lone surrogate, and it is a character of the vocabulary like any other)
    points = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)
    return np.searchsorted(codes, points).astype(np.uint16)


def meta_json(chars):
    # JSON, not pickle: loading a pickle can run arbitrary code
    return json.dumps({'vocab_size': len(chars), 'itos': chars}).encode()


# ----------------------------------------------------------------------------- tokenizing in a pool

def encode(batch, codes=None):
    """{split: uint16 ids} of a batch of (split, item) pairs, item a text or EOT; GPT-2 BPE, or with codes, char ids.
    Runs in the pool's processes."""
    ids = collections.defaultdict(list)
    if codes is None:
        import tiktoken
        enc = tiktoken.get_encoding('r50k_base')  # loaded once per process, then cached by tiktoken
        for split, item in batch:
            if isinstance(item, str):
                ids[split].extend(enc.encode_ordinary(item))  # ordinary: "<|endoftext|>" in a text stays plain text
            else:
                ids[split].append(item)
        ids = {split: np.array(v, dtype=np.uint32) for split, v in ids.items()}
        assert all(v.max(initial=0) < 2**16 for v in ids.values()), "a token id does not fit in uint16"
        return {split: v.astype(np.uint16) for split, v in ids.items()}
    for split, item in batch:
        ids[split].append(char_ids(item, codes))
    return {split: np.concatenate(v) for split, v in ids.items()}


def start_pool(num_proc):
    """num_proc tokenizing processes (none for 1). Start them before anything that makes threads (datasets,
    pyarrow): forking a process with threads running can deadlock. The workers ignore Ctrl-C, so only this
    process handles it (and saves what it has)."""
    global pool, pool_size
    if num_proc > 1:
        pool = multiprocessing.Pool(num_proc, signal.signal, (signal.SIGINT, signal.SIG_IGN))
        pool_size = num_proc


def stop_pool():
    global pool
    if pool is not None:
        pool.terminate()
        pool = None


def tokenized(batches, codes=None):
    """(info, {split: ids}) for each (info, batch) of batches, in order (see encode for a batch; info is passed on)."""
    if pool is None:
        for info, batch in batches:
            yield info, encode(batch, codes)
        return
    # not pool.imap: it reads its whole input as fast as it can, which for billions of tokens means into memory;
    # a bounded queue of async tasks keeps the order and the memory small while all processes stay busy
    pending = collections.deque()
    for info, batch in batches:
        pending.append((info, pool.apply_async(encode, (batch, codes))))
        if len(pending) >= 2 * pool_size:
            info, result = pending.popleft()
            yield info, result.get()
    while pending:
        info, result = pending.popleft()
        yield info, result.get()


# ----------------------------------------------------------------------------- bins and progress

def check_overwrite(out, overwrite, flag=None):
    """the rule of every script that writes a dataset: one already in out is replaced only with --overwrite=True"""
    existing = [f for f in ('train.bin', 'val.bin', 'meta.json') if os.path.isfile(os.path.join(out, f))]
    if existing and not overwrite:
        fail(f"{out} already holds a dataset ({', '.join(existing)}); pass --overwrite=True to replace it" +
             (f", or choose another {flag}" if flag else ''))


def claim(out):
    """this process becomes the one writer of the dataset folder out (created if missing) until it exits"""
    busy = files.lock_dir(out)
    if busy:
        fail(f"{out} is being written by another process ({busy}); wait for it to finish, or stop it")


def write_dataset(out, ids, chars=None, overwrite=False):
    """A small dataset held in memory: {split: ids} -> out/<split>.bin, and meta.json for a char vocabulary (removed
    if not: a BPE dataset replacing a char one must not keep it), all replaced together or not at all. A different
    dataset already there is replaced only with overwrite; the very same one is left as it is."""
    claim(out)
    contents = {f'{split}.bin': np.asarray(v, dtype=np.uint16).tobytes() for split, v in ids.items()}
    contents['meta.json'] = meta_json(chars) if chars is not None else None
    contents.update({n: None for n in CHAT_FILES})  # a chat dataset's mask and conversations go with the bins they fit
    path = lambda name: os.path.join(out, name)
    if not overwrite and all((open(path(n), 'rb').read() if os.path.isfile(path(n)) else None) == data
                             for n, data in contents.items()):
        print(f"{out} already holds this very dataset; nothing to do")
        return
    check_overwrite(out, overwrite)
    try:
        files.write_files(out, contents)
    except OSError as e:
        fail(str(e))


def open_bins(out, tokens=None):
    """{'train': file, 'val': file} appending to temp bins in out; finish_bins puts them in place.
    tokens None: a fresh run, whose temp bins are removed if it fails. Else a resumed run (progress.json): its bins
    are <split>.bin.tmp, each cut back to the tokens[split] ids that progress.json counted (a finished <split>.bin
    being extended is moved back to its .tmp name first, so train.py never reads a bin while it grows)."""
    global resumable
    claim(out)
    bins = {}
    for split in ('train', 'val'):
        path = os.path.join(out, f'{split}.bin')
        if tokens is None:
            bins[split] = open(os.path.join(out, files.temp_name(f'{split}.bin')), 'wb')
            unfinished.append(bins[split].name)
            continue
        if not os.path.exists(path + '.tmp') and os.path.exists(path) and tokens[split]:
            os.replace(path, path + '.tmp')
        bins[split] = open(path + '.tmp', 'ab')
        bins[split].truncate(2 * tokens[split])  # anything after it was written after the last checkpoint
        resumable = True
    return bins


def append(bins, ids):
    """ids {split: uint16 ids} appended to the open bins"""
    try:
        for split, v in ids.items():
            bins[split].write(v.tobytes())
    except OSError as e:
        write_failed(e, os.path.dirname(bins[split].name))


def sync(bins):
    for f in bins.values():
        f.flush()
        os.fsync(f.fileno())


def finish_bins(bins, chars=None):
    """Close the temp bins and put them in place as out/<split>.bin, with meta.json for a char vocabulary (removed if
    not), all in one change (files.commit): on disk first, so a crash never leaves a short bin."""
    out = os.path.dirname(bins['train'].name)
    try:
        sync(bins)
        for f in bins.values():
            f.close()
        temps = {f'{split}.bin': os.path.basename(f.name) for split, f in bins.items()}
        temps['meta.json'] = None
        temps.update({n: None for n in CHAT_FILES})
        if chars is not None:
            temps['meta.json'] = files.temp_name('meta.json')
            unfinished.append(os.path.join(out, temps['meta.json']))
            with open(os.path.join(out, temps['meta.json']), 'wb') as f:
                f.write(meta_json(chars))
                f.flush()
                os.fsync(f.fileno())
        files.commit(out, temps)
        unfinished.clear()
    except OSError as e:
        write_failed(e, out)


def checkpoint(state, bins, path):
    # the bins reach the disk before the record that counts them, so the record never claims more than is there
    try:
        sync(bins)
        folder, name = os.path.split(os.path.abspath(path))
        files.write_files(folder, {name: json.dumps(state, indent=1).encode()})
    except OSError as e:
        write_failed(e, os.path.dirname(os.path.abspath(path)))


def read_progress(path, out, fields):
    """The state an earlier run saved in progress.json (None if there is none), every field checked against fields
    ({key: type or tuple of types}; 'tokens' is always {'train': int, 'val': int}) and its counts against the bins
    in out, so a damaged record stops the run in one line before anything is written."""
    if not os.path.exists(path):
        return None
    fix = f"delete {path} to start over (the bins are then rewritten from the start)"
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path} is damaged ({one_line(e)}); {fix}")
    if not isinstance(state, dict):
        fail(f"{path} is damaged (it holds a {type(state).__name__}, not a record); {fix}")
    fields = {**fields, 'tokens': dict}
    missing = [k for k in fields if k not in state]
    if missing:
        fail(f"{path} is damaged (no {', '.join(missing)}); {fix}")
    for key, types in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        # exact types: JSON's true is a bool, and a bool is not a count
        if type(state[key]) not in types or (type(state[key]) is int and state[key] < 0):
            fail(f"{path} is damaged ({key} is {state[key]!r}); {fix}")
    tokens = state['tokens']
    if sorted(tokens) != ['train', 'val'] or any(type(n) is not int or n < 0 for n in tokens.values()):
        fail(f"{path} is damaged (tokens is {tokens!r}); {fix}")
    for split, n in tokens.items():
        bin_path = os.path.join(out, f'{split}.bin')
        bin_path += '.tmp' if os.path.exists(bin_path + '.tmp') else ''  # a run in progress writes the .tmp
        size = os.path.getsize(bin_path) if os.path.exists(bin_path) else 0
        if size < 2 * n:
            fail(f"{bin_path} holds {size // 2:,} tokens but {path} counts {n:,}; {fix}")
    return state


# ----------------------------------------------------------------------------- Hugging Face datasets

def load_docs(dataset, name=None, streaming=False):
    """The 'train' split of dataset: a local directory or .json(l)/.parquet/.csv/.txt file when that path exists,
    else a Hub dataset (subset name). A local file that cannot be read is reported as damaged, never as a network
    problem; streaming, that shows only when reading starts, so read the first document with unreadable() at hand."""
    # the documents never go to a torch DataLoader, so spare datasets the seconds it spends importing torch for one
    os.environ.setdefault('USE_TORCH', '0')
    import datasets  # imported here: it is slow to import, and the callers' checks before this are not
    local = os.path.exists(dataset)
    if not local and (dataset.startswith(('.', '/', '~')) or dataset.count('/') > 1):
        fail(f"no such file or directory: {dataset}")  # clearly a path, not a Hub name like 'owner/name'
    if local:
        # a damaged file makes datasets log its own error lines and progress bars; the user gets ours, in one line
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if os.path.isfile(dataset):
            # a single file needs its format named; a directory (or a Hub name) is recognised by datasets itself
            ext = dataset.removesuffix('.gz').rsplit('.', 1)[-1].lower()
            builder = {'json': 'json', 'jsonl': 'json', 'parquet': 'parquet', 'csv': 'csv', 'txt': 'text'}.get(ext)
            if builder is None:
                fail(f"don't know how to read {dataset}: use a .json, .jsonl, .parquet, .csv or .txt file, "
                     f"or a directory of them")
            return datasets.load_dataset(builder, data_files=dataset, split='train', streaming=streaming)
        return datasets.load_dataset(dataset, name=None if local else name, split='train', streaming=streaming)
    except Exception as e:
        fail(unreadable(dataset, e))


def unreadable(dataset, e):
    """What to tell the user when reading dataset raised e."""
    cause = e
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT,
                                                                                    errno.EFBIG)):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:  # a full disk while datasets writes its cache: the dataset itself is fine
        return (f"could not cache '{dataset}' for reading ({files.why(cause)}); free some space (Hugging Face's cache "
                f"is under HF_HOME, ~/.cache/huggingface by default) and run again")
    if os.path.exists(dataset):
        where = 'it is' if os.path.isfile(dataset) else 'a file in it is'
        return (f"could not read the local dataset {dataset} ({one_line(e)}): {where} corrupt or not in the format "
                f"its name says; fix or remove it")
    if isinstance(e, ConnectionError):
        return (f"could not reach the Hugging Face Hub for '{dataset}' ({one_line(e)}); check your network, "
                f"or pass --dataset=LOCAL_PATH (a directory or .jsonl/.parquet file with a 'text' column)")
    if isinstance(e, FileNotFoundError):
        return f"dataset '{dataset}' is neither a local path nor found on the Hub ({one_line(e)})"
    return f"could not load '{dataset}': {one_line(e)}"
