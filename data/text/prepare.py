r"""
Train on your own text: .txt/.md files, or .jsonl/.parquet/.csv tables with a text column, become
data/NAME/train.bin and val.bin, which train.py finds with --dataset=NAME:

    python data/text/prepare.py --input='notes/*.md' --name=notes --tokenizer=char
    python train.py --dataset=notes --out_dir=out-notes --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 \
        --batch_size=12 --gradient_accumulation_steps=1 --max_iters=2000 --lr_decay_iters=2000 --warmup_iters=100 \
        --learning_rate=2e-3 --min_lr=2e-4 --eval_interval=250 --eval_iters=20 --device=cpu --compile=False
    python sample.py --out_dir=out-notes

(train.py's defaults are GPT-2's on 8 GPUs: the flags above are the baby-GPT recipe of the README for a CPU.)

--input is a file, a folder (its .txt, .md, .jsonl, .parquet and .csv files, subfolders included) or a glob
in quotes ('books/**/*.txt'; every file it matches is used). Each text file is one document, and so is each
row of a table (its --text_column; empty rows are skipped). val_fraction of the documents, chosen at random
(at least one), go to val.bin and the rest to train.bin, in their order; a single document is split instead,
its last val_fraction of characters going to val.bin (as data/shakespeare_char does).

--tokenizer=gpt2 (the default) writes GPT-2 BPE ids with the end-of-text token 50256 before each document, as
data/fineweb_edu does. --tokenizer=char numbers the distinct characters of the whole corpus in sorted order and
writes meta.json as data/shakespeare_char does; documents then end with a newline (added where one is missing)
so that they do not run into each other.

The text is streamed twice: a first pass checks every file, counts the documents and collects the characters,
so bad input stops the run before anything is written; the second tokenizes in a process pool and appends to
the bins. Neither the text nor the tokens are ever all in memory, so a corpus larger than RAM works. The bins
are written under temp names and put in place together with meta.json at the end: a failed run (a full disk
included) leaves nothing half-written, and a dataset it was to replace as it was.
"""

import codecs
import csv
import glob
import io
import itertools
import json
import os
import re
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from configurator import configure, writable_dir
import dataprep
from dataprep import EOT, fail

input = ''  # a file, a folder, or a glob in quotes: --input='notes/*.md', --input='books/**/*.txt'
name = ''  # the dataset's name: writes data/NAME/train.bin and val.bin, for train.py --dataset=NAME
tokenizer = 'gpt2'  # 'gpt2' (GPT-2's BPE, for training or fine-tuning GPT-2 models) or 'char' (one id per character)
text_column = 'text'  # the column that holds the text in .jsonl, .parquet and .csv files
val_fraction = 0.1  # the share of documents (of characters, with a single document) held out for val.bin
overwrite = False  # replace the dataset already in data/NAME
out_dir = ''  # write here instead of data/NAME (then --name is not needed)
num_proc = min(8, os.cpu_count() or 1)  # tokenizing processes; 1 = tokenize in this process
overridden = configure(globals())

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this repo's data/
TABLES = ('.jsonl', '.parquet', '.csv')
FOLDER_FILES = ('.txt', '.md') + TABLES  # what a folder's files are taken for; a glob or a file names its own
CHUNK = 1 << 20  # bytes read from a file, and characters handed to a tokenizing process, at a time
SEED = 2357  # which documents go to val.bin: the same every run


def find_files(pattern):
    """The files --input names, sorted: the document order."""
    path = os.path.expanduser(pattern)  # a quoted ~ is left alone by the shell
    if os.path.isdir(path):
        found = []
        for d, dirs, files in os.walk(path):
            dirs[:] = [x for x in dirs if not x.startswith('.')]  # .git and the like
            found += [os.path.join(d, f) for f in files if not f.startswith('.') and f.lower().endswith(FOLDER_FILES)]
    elif os.path.isfile(path):
        found = [path]
    elif any(c in path for c in '*?['):
        found = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    else:
        fail(f"--input={pattern}: no such file or folder")
    if not found:
        kinds = "no .txt, .md, .jsonl, .parquet or .csv files" if os.path.isdir(path) else "no files"
        fail(f"--input={pattern} matches {kinds}")
    return sorted(found)


def text_chunks(path, bar=None):
    """The text of a UTF-8 file, about CHUNK characters at a time, newlines as open() gives them (\\r\\n and \\r
    become \\n). The first byte that is not UTF-8 stops the run, naming the file and the byte's offset."""
    decoder = codecs.getincrementaldecoder('utf-8')()
    newlines = io.IncrementalNewlineDecoder(None, translate=True)
    offset = 0
    with open(path, 'rb') as f:
        while True:
            data = f.read(CHUNK)
            pending = len(decoder.getstate()[0])  # the bytes of a character cut off by the previous read
            try:
                text = newlines.decode(decoder.decode(data, final=not data), final=not data)
            except UnicodeDecodeError as e:
                fail(f"{path} is not UTF-8 text (byte {offset - pending + e.start:,}: {e.object[e.start:e.start + 1]!r}); "
                     f"convert it, e.g. iconv -t utf-8, or leave it out of --input")
            offset += len(data)
            if bar is not None:
                bar.update(len(data))
            if text:
                yield text
            if not data:
                return


def missing_column(path, columns):
    fail(f"{path} has no '{text_column}' column (its columns: {', '.join(map(str, columns)) or 'none'}); "
         f"name the text column with --text_column=")


def rows(path):
    """The --text_column value of each row of a .jsonl, .csv or .parquet file (None where a row has no text)."""
    if path.lower().endswith('.parquet'):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
        except Exception as e:
            fail(f"{path} is corrupt or not a parquet file ({dataprep.one_line(e)})")
        if text_column not in schema.names:
            missing_column(path, schema.names)
        kind = schema.field(text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            fail(f"the '{text_column}' column of {path} holds {kind}, not text; name another with --text_column=")
        try:
            for batch in parquet.iter_batches(batch_size=1024, columns=[text_column]):
                yield from batch.column(0).to_pylist()
        except Exception as e:  # a damaged page or footer
            fail(f"{path} is corrupt ({dataprep.one_line(e)})")
        return
    try:
        with open(path, encoding='utf-8-sig', newline='') as f:  # -sig: a byte-order mark (Excel's CSV) is no text
            if path.lower().endswith('.csv'):
                csv.field_size_limit(2**31 - 1)  # a document is one field, and the default limit is 128 KiB
                reader = csv.reader(f)
                try:
                    header = next(reader, [])
                    if text_column not in header:
                        missing_column(path, header)
                    col = header.index(text_column)
                    for row in reader:
                        yield row[col] if col < len(row) else None
                except csv.Error as e:
                    fail(f"{path} line {reader.line_num} is not CSV ({e}); is the file corrupt?")
                return
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    fail(f"{path} line {i} is not JSON ({e}); is the file corrupt?")
                if not isinstance(row, dict) or text_column not in row:
                    missing_column(path, row if isinstance(row, dict) else [])
                value = row[text_column]
                if value is not None and not isinstance(value, str):
                    fail(f"{path} line {i}: '{text_column}' holds {type(value).__name__} {str(value)[:40]!r}, not text")
                yield value
    except UnicodeDecodeError:
        for _ in text_chunks(path):  # find the offending byte, and fail naming it
            pass


def documents(files, bar=None):
    """(path, pieces) for each document in order: a text file's pieces, or a table row's text as one piece."""
    for path in files:
        if path.lower().endswith(TABLES):
            for text in rows(path):
                if text:  # an empty or missing value is no document
                    yield path, (text,)
            if bar is not None:
                bar.update(os.path.getsize(path))
        else:
            yield path, text_chunks(path, bar)


def bpe_pieces(chunks):
    """The text of chunks again, cut only where GPT-2's BPE of the pieces equals the BPE of the whole.
    Tokenizing starts by splitting text into words, spaces and newlines (tiktoken's regex, with a look-ahead after
    whitespace), and BPE never merges across those splits; cutting anywhere else, even at the end of a line, can
    change tokens: '\\n\\n' or '\\n ' at a cut would be tokenized as two pieces instead of one. Cutting right before
    a newline that is followed by a character other than whitespace is exact: that newline is a token of its own,
    and whatever precedes it ends where it would in the whole (checked against tiktoken on many random texts in
    tests/test_text_data.py). A text with no such place (one gigantic line) is held whole."""
    held = ''
    for chunk in chunks:
        lo = max(len(held) - 1, 0)  # newlines before lo were turned down already, and what follows them is unchanged
        held += chunk
        cut = held.rfind('\n', lo, len(held) - 1)
        while cut > 0 and held[cut + 1].isspace():  # isspace covers all that the regex's \s does, and more
            cut = held.rfind('\n', lo, cut)
        if cut > 0:
            yield held[:cut]
            held = held[cut:]
    if held:
        yield held


def head(chunks, n, rest):
    """The first n characters of chunks; the remainder of the chunk that crosses n goes to rest."""
    for chunk in chunks:
        if len(chunk) < n:
            n -= len(chunk)
            yield chunk
        else:
            yield chunk[:n]
            rest.append(chunk[n:])
            return


if __name__ == '__main__':  # the tokenizing processes may re-import this file; only the parent runs the pipeline
    if not input:
        fail("give the text to prepare: --input=FILE, a folder, or a quoted glob like --input='notes/*.md'")
    if tokenizer not in ('gpt2', 'char'):
        fail(f"--tokenizer={tokenizer}: use gpt2 (GPT-2's BPE) or char (one id per character)")
    if not 0.0 < val_fraction < 1.0:
        fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if num_proc < 1:
        fail(f"num_proc must be at least 1, got {num_proc}")
    if 'out_dir' in overridden:
        out = writable_dir(out_dir, '--out_dir')
    else:
        if not name:
            fail("name the dataset: --name=NAME writes data/NAME/train.bin and val.bin (train with --dataset=NAME)")
        if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', name):
            fail(f"--name={name} is not a plain folder name (letters, digits, _ . -): it becomes data/{name}/")
        out = os.path.join(DATA, name)
        if os.path.exists(os.path.join(out, 'prepare.py')):
            fail(f"data/{name} is the home of {os.path.join('data', name, 'prepare.py')}; choose another --name")
        writable_dir(out, '--name')
    dataprep.check_overwrite(out, overwrite, '--out_dir' if 'out_dir' in overridden else '--name')
    files = find_files(input)
    if tokenizer == 'gpt2':
        dataprep.gpt2_encoding()  # fail now, not in a worker, if the tokenizer cannot be had
    dataprep.start_pool(num_proc)  # before pyarrow starts its threads

    # first pass: every file read and checked, the documents counted, the characters collected
    n_docs, n_chars, unterminated, chars, seen = 0, 0, 0, set(), set()
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit='B', unit_scale=True, desc='checking',
               disable=None)  # a bar at a terminal only, so that a bad input ends the output in one line
    try:
        for path, pieces in documents(files, bar):
            size, last = 0, ''
            for piece in pieces:
                size += len(piece)
                last = piece[-1]
                if tokenizer == 'char':
                    chars.update(piece)
            if size == 0:
                fail(f"{path} is empty; put some text in it, or leave it out of --input")
            n_docs, n_chars, unterminated = n_docs + 1, n_chars + size, unterminated + (last != '\n')
            seen.add(path)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written")
    bar.close()
    empty = [f for f in files if f not in seen]
    if empty:
        fail(f"{empty[0]} has no text in its '{text_column}' column; leave it out of --input")
    single = n_docs == 1
    if single:
        n_train = int(n_chars * (1 - val_fraction))  # the last val_fraction of the characters go to val.bin
        if n_train == 0 or n_train == n_chars:
            fail(f"{files[0]} is too short ({n_chars} characters) to split into train and val")
        is_val = None
        print(f"1 document of {n_chars:,} characters: the first {n_train:,} for train.bin, the rest for val.bin")
    else:
        n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
        is_val = np.zeros(n_docs, dtype=bool)
        is_val[np.random.default_rng(SEED).choice(n_docs, n_val, replace=False)] = True
        print(f"{len(files):,} file(s), {n_docs:,} documents, {n_chars:,} characters; {n_val:,} of the documents for val.bin")
    codes = None
    if tokenizer == 'char':
        if unterminated and not single:
            chars.add('\n')  # the newline that ends a document
        chars = dataprep.char_vocab(chars, input)
        codes = dataprep.code_points(chars)
        print(f"vocab size: {len(chars):,}")

    def items():
        """(split, item) for everything that goes into the bins, in order: EOT and text pieces (dataprep.encode)."""
        docs = documents(files)
        if single:
            path, pieces = next(docs)
            pieces, rest = iter(pieces), []
            parts = [('train', head(pieces, n_train, rest)), ('val', itertools.chain(rest, pieces))]
        else:
            parts = (('val' if is_val[i] else 'train', pieces) for i, (path, pieces) in enumerate(docs))
        for split, pieces in parts:
            if tokenizer == 'gpt2':
                yield split, EOT
                yield from ((split, piece) for piece in bpe_pieces(pieces))
                continue
            last = ''
            for piece in pieces:
                if piece:  # the tail of a single document can start with an empty piece
                    yield split, piece
                    last = piece[-1]
            if last != '\n' and not single:
                yield split, '\n'

    def batches():
        """(characters, items) about CHUNK characters at a time"""
        batch, size = [], 0
        for split, item in items():
            batch.append((split, item))
            size += len(item) if isinstance(item, str) else 0
            if size >= CHUNK:
                yield size, batch
                batch, size = [], 0
        if batch:
            yield size, batch

    # second pass: tokenize and append to temp bins, put in place with meta.json (or its removal) when complete
    bins = dataprep.open_bins(out)
    tokens = {'train': 0, 'val': 0}
    total = n_chars + (unterminated if tokenizer == 'char' and not single else 0)
    try:
        with tqdm(total=total, unit='char', unit_scale=True, desc='tokenizing') as bar:
            for size, ids in dataprep.tokenized(batches(), codes):
                dataprep.append(bins, ids)
                for split, v in ids.items():
                    tokens[split] += len(v)
                bar.update(size)
    except KeyboardInterrupt:
        fail(f"interrupted; nothing was written to {out}")
    except Exception as e:  # the first pass read every file: most likely one changed or vanished since
        fail(f"tokenizing failed ({dataprep.one_line(e)}); nothing was written to {out}")
    dataprep.stop_pool()
    dataprep.finish_bins(bins, chars if tokenizer == 'char' else None)  # BPE replacing char: meta.json goes
    print(f"train.bin {tokens['train']:,} tokens, val.bin {tokens['val']:,} tokens in {out}")
    if 'out_dir' not in overridden:
        print(f"train on it: python train.py --dataset={name} (see the top of {os.path.relpath(__file__)})")
