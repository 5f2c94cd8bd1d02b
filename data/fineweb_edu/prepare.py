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
While a run is under way the bins are train.bin.tmp and val.bin.tmp; they get their real names when it is done.
"""

import itertools
import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from configurator import configure, writable_dir
import dataprep
from dataprep import EOT, fail

dataset = 'HuggingFaceFW/fineweb-edu'  # a Hub dataset name, or a local directory / .json(l) / .parquet / .csv file with a 'text' column
name = 'sample-10BT'  # the subset of the Hub dataset (ignored for a local path)
num_docs = None  # stop after this many documents (None = all); for trying the pipeline small
val_docs = 10_000  # the first val_docs documents go to val.bin; unless set, at most 1% of num_docs
num_proc = min(8, os.cpu_count() or 1)  # tokenizing processes; 1 = tokenize in this process
chunk_docs = 1024  # documents per batch handed to a tokenizing process
checkpoint_s = 30.0  # seconds between progress saves; a crash costs at most this much work
out_dir = ''  # where train.bin, val.bin and progress.json go; not given = next to this script
overwrite = False  # start over, replacing the dataset (or the unfinished run) already in out_dir
overridden = configure(globals())
no_text = 0  # documents whose text is null: left out, and counted

# what progress.json holds, checked before a run continues from it
PROGRESS = {'dataset': str, 'name': (str, type(None)), 'val_docs': int, 'docs': int, 'done': bool,
            'num_docs': (int, type(None))}


def has_text(doc, i):
    """True for a document with text, False for one whose text is null (left out, and counted); anything else stops"""
    global no_text
    if doc.get('text') is None and 'text' in doc:
        no_text += 1
        return False
    if not isinstance(doc.get('text'), str):
        fail(f"document {i} of '{dataset}' has no 'text' string (its fields: {', '.join(doc)})")
    return True


def batches(docs, start, stop):
    """(n, items) for documents start..stop-1 of docs, chunk_docs at a time: EOT then the text of each, for val.bin
    while fewer than val_docs are done and for train.bin after (see dataprep.encode)."""
    items, i, n = [], start, 0
    for doc in itertools.islice(docs, None if stop is None else stop - start):
        split = 'val' if i < val_docs else 'train'
        if has_text(doc, i):
            items += [(split, EOT), (split, doc['text'])]
        i, n = i + 1, n + 1
        if n == chunk_docs:
            yield n, items
            items, n = [], 0
    if n:
        yield n, items


if __name__ == '__main__':  # the tokenizing processes may re-import this file; only the parent runs the pipeline
    for key, least in (('num_proc', 1), ('chunk_docs', 1), ('val_docs', 1)):
        if globals()[key] < least:
            fail(f"{key} must be at least {least}, got {globals()[key]}")
    if num_docs is not None and (type(num_docs) is not int or num_docs < 2):
        fail(f"num_docs must be None or a whole number >= 2 (one val and one train document), got {num_docs!r}")
    dataset = os.path.expanduser(dataset)  # the shell leaves a ~ in --dataset=~/docs alone
    local = os.path.exists(dataset)
    source, subset = (os.path.abspath(dataset), None) if local else (dataset, name)  # what progress.json records
    out = out_dir if 'out_dir' in overridden else os.path.dirname(os.path.abspath(__file__))
    writable_dir(out, '--out_dir')
    progress_path = os.path.join(out, 'progress.json')
    if os.path.isdir(out):
        dataprep.claim(out)  # before reading progress.json: no other run may be writing it

    # resume from progress.json if an earlier run left one, but only a run over the same documents
    state = None if overwrite else dataprep.read_progress(progress_path, out, PROGRESS)
    if state is not None:
        if state['val_docs'] < 1:
            fail(f"{progress_path} is damaged (val_docs is {state['val_docs']}); delete {progress_path} to start over")
        if (state['dataset'], state['name']) != (source, subset):
            fail(f"{progress_path} is from a run over '{state['dataset']}' ({state['name']}); pass that --dataset "
                 f"and --name to continue it, or use another --out_dir (or delete it) to start over")
        if 'val_docs' in overridden and val_docs != state['val_docs']:
            fail(f"{progress_path} is from a run with val_docs={state['val_docs']}; "
                 f"drop --val_docs to continue it, or use another --out_dir (or delete it) to start over")
        val_docs = state['val_docs']
        if state['done'] and state['num_docs'] in (None, num_docs):
            print(f"already complete: {state['docs']:,} documents, val.bin {state['tokens']['val']:,} tokens, "
                  f"train.bin {state['tokens']['train']:,} tokens in {out}")
            sys.exit(0)
        if num_docs is not None and state['docs'] > num_docs:
            fail(f"{out} already holds {state['docs']:,} documents, more than --num_docs={num_docs}")
        print(f"resuming after {state['docs']:,} documents")
        state = {**state, 'done': False, 'num_docs': None}  # a finished trial run being extended is not done any more
    else:
        if not os.path.exists(progress_path):
            dataprep.check_overwrite(out, overwrite, '--out_dir')  # a dataset another script wrote
        if num_docs is not None and 'val_docs' not in overridden:
            val_docs = min(val_docs, max(1, num_docs // 100))  # a small trial run keeps most documents for train
        state = {'dataset': source, 'name': subset, 'val_docs': val_docs,
                 'docs': 0, 'tokens': {'val': 0, 'train': 0}, 'done': False, 'num_docs': None}
    if num_docs is not None and val_docs >= num_docs:
        fail(f"val_docs ({val_docs}) must be smaller than num_docs ({num_docs}), or train.bin would be empty")

    dataprep.gpt2_encoding()  # fail now, not in a worker, if the tokenizer cannot be had
    dataprep.start_pool(num_proc)
    stream = dataprep.load_docs(dataset, name, streaming=True)
    if state['docs']:
        # skipping still reads the skipped documents, but reading is quick next to tokenizing them
        stream = stream.skip(state['docs'])
    # streaming opens the files (or the connection) only when reading starts: read the first document now,
    # so a damaged file or a missing 'text' stops the run before anything is written
    docs = iter(stream)
    try:
        first = next(docs, None)
    except Exception as e:
        fail(dataprep.unreadable(dataset, e))
    if first is not None:
        has_text(first, state['docs'])
        no_text = 0  # counted again when batches() reads it
    docs = itertools.chain([first] if first is not None else [], docs)

    files = dataprep.open_bins(out, state['tokens'])
    dataprep.checkpoint(state, files, progress_path)

    t0, last_save, new_tokens = time.time(), time.time(), 0
    bar = tqdm(initial=state['docs'], total=num_docs, unit='doc', desc='tokenizing')
    try:
        for n, ids in dataprep.tokenized(batches(docs, state['docs'], num_docs)):
            dataprep.append(files, ids)
            # a single assignment, so an interrupt can never leave the counts half updated
            state = {**state, 'docs': state['docs'] + n,
                     'tokens': {s: state['tokens'][s] + len(ids.get(s, ())) for s in state['tokens']}}
            new_tokens += sum(len(v) for v in ids.values())
            bar.update(n)
            if time.time() - last_save >= checkpoint_s:
                dataprep.checkpoint(state, files, progress_path)
                last_save = time.time()
    except KeyboardInterrupt:
        bar.close()  # before the message, so the error is the last line
        dataprep.checkpoint(state, files, progress_path)
        fail(f"interrupted after {state['docs']:,} documents; progress is saved, rerun the same command to continue")
    except Exception as e:  # the network while streaming from the Hub, or a damaged local file
        bar.close()
        dataprep.checkpoint(state, files, progress_path)
        if local:
            fail(f"stopped after {state['docs']:,} documents: {dataprep.unreadable(dataset, e)}, "
                 f"then rerun the same command to continue (progress is saved)")
        fail(f"stopped after {state['docs']:,} documents ({dataprep.one_line(e)}); progress is saved, "
             f"rerun the same command to continue (streaming from the Hub? check your network)")
    finally:
        bar.close()
        dataprep.stop_pool()

    # done: either num_docs was reached, or the whole dataset was read (recorded as num_docs None)
    reached = num_docs is not None and state['docs'] == num_docs
    state = {**state, 'done': True, 'num_docs': num_docs if reached else None}
    dataprep.finish_bins(files)  # the real names first: a crash before the record below only redoes the last step
    dataprep.checkpoint(state, {}, progress_path)
    dt = time.time() - t0
    print(f"done: {state['docs']:,} documents; val.bin {state['tokens']['val']:,} tokens, train.bin {state['tokens']['train']:,} tokens")
    print(f"this run: {new_tokens:,} tokens in {dt:.1f}s ({new_tokens / max(dt, 1e-9):,.0f} tokens/s with num_proc={num_proc})")
    if no_text:
        print(f"note: {no_text:,} document(s) had no text (null) and were left out")
    if state['tokens']['train'] == 0:
        print(f"warning: train.bin is empty: the dataset has no more than val_docs={val_docs} documents")
