"""
data/text/prepare.py, run as a user would on a copy in tmp_path/data/text/ (so --name=NAME writes
tmp_path/data/NAME/, never the repo's data/): text files, folders, globs and tables become bins that equal a
direct tiktoken encoding (or the char mapping) of the documents, split into train and val by the stated rules.
"""
import importlib.util
import json
import os
import random
import sys

import numpy as np
import pytest

from conftest import REPO, run_bad_inputs, run_script, text_corpus
from test_data import EOT, install, no_leftovers, read_bin


def docs_like_users_have(n=8):
    """n short documents with the awkward cases: non-ASCII, a literal <|endoftext|>, blank lines and indentation,
    CRLF line ends (read as \\n, as open() does), no final newline."""
    text = text_corpus(6_000)
    docs = [text[i * 600:(i + 1) * 600] for i in range(n)]
    docs[1] = 'naïve café — 東京 😀\n\n\n  indented\n' + docs[1]
    docs[2] = docs[2] + ' <|endoftext|> is just text here'
    docs[3] = docs[3].replace('\n', '\r\n')
    return docs


def as_read(doc):
    return doc.replace('\r\n', '\n')


def bpe(docs):
    """What the bins must hold: EOT then the GPT-2 BPE of each document, encoded whole."""
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    return np.array([t for d in docs for t in [EOT, *enc.encode_ordinary(as_read(d))]], dtype=np.uint16)


def split_docs(ids):
    """The documents of a bin (EOT before each), as token arrays."""
    starts = np.flatnonzero(ids == EOT)
    return [ids[a + 1:b] for a, b in zip(starts, [*starts[1:], len(ids)])]


def check_gpt2_split(out, docs, n_val):
    """val.bin and train.bin hold n_val and the other documents, each in corpus order, byte for byte as tiktoken
    encodes them; returns the indices of the val documents."""
    train, val = read_bin(out / 'train.bin'), read_bin(out / 'val.bin')
    want = [bpe([d])[1:] for d in docs]
    val_docs = [next(i for i, w in enumerate(want) if np.array_equal(w, v)) for v in split_docs(val)]
    assert len(val_docs) == n_val and val_docs == sorted(val_docs)
    assert np.array_equal(val, bpe([docs[i] for i in val_docs]))
    assert np.array_equal(train, bpe([d for i, d in enumerate(docs) if i not in val_docs]))
    assert not (out / 'meta.json').exists()
    no_leftovers(out)
    return val_docs


def write_files(folder, docs, ext='.txt'):
    os.makedirs(folder, exist_ok=True)
    for i, d in enumerate(docs):
        with open(os.path.join(folder, f'doc{i:02d}{ext}'), 'w', newline='') as f:
            f.write(d)
    return str(folder)


@pytest.fixture
def text(tmp_path):
    """The script in tmp_path/data/text; text(*flags) runs it (check=False for failures)."""
    script = str(install(tmp_path, 'text') / 'prepare.py')

    def run(*flags, check=True):
        return run_script(script, *flags, check=check)
    run.script = script
    return run


def test_files_folder_glob_gpt2(tmp_path, text, tiktoken_offline):
    docs = docs_like_users_have()
    notes = tmp_path / 'notes'
    write_files(notes / 'sub', docs[4:], '.txt')  # a subfolder, read in name order after the top level's
    write_files(notes, docs[:4], '.md')
    (notes / '.hidden.md').write_text('never read')
    (notes / 'image.png').write_bytes(b'\x89PNG\xff')  # a folder takes only text and table files
    p = text(f'--input={notes}', '--name=notes', '--val_fraction=0.25', '--num_proc=1')
    assert 'train.py --dataset=notes' in p.stdout
    out = tmp_path / 'data' / 'notes'
    check_gpt2_split(out, docs, n_val=2)  # 25% of 8 documents, chosen at random
    # a glob naming the same files gives the same split and bytes, and a pool of 2 writes what 1 process does
    text(f"--input={notes}/**/doc*", '--name=glob', '--val_fraction=0.25', '--num_proc=2')
    for name in ('train.bin', 'val.bin'):
        assert (tmp_path / 'data' / 'glob' / name).read_bytes() == (out / name).read_bytes()
    # replacing a dataset needs --overwrite=True; a BPE dataset replacing a char one leaves no meta.json behind
    # (train.py would read its ids as characters); and at least one document goes to val
    text(f'--input={notes}', '--name=notes', '--overwrite=True', '--tokenizer=char')
    assert (out / 'meta.json').exists()
    text(f'--input={notes}', '--name=notes', '--val_fraction=0.01', '--overwrite=True', '--num_proc=1')
    check_gpt2_split(out, docs, n_val=1)


def test_single_file_streams_in_pieces_gpt2(tmp_path, text, tiktoken_offline):
    # more than one read (1 MiB) of text: the script encodes it in pieces, and must equal encoding it whole;
    # blank lines, indented lines and CRLF line ends are where a careless cut would change the tokens
    lines = text_corpus(1_150_000).splitlines(keepends=True)
    rng = random.Random(0)
    whole = ''.join(l + rng.choice(['', '', '\n', '\n\n', '   ', ' \n']) for l in lines)
    path = tmp_path / 'book.txt'
    path.write_bytes(whole.encode().replace(b'\n\n\n', b'\r\n\r\n'))
    whole = path.read_text()  # as open() reads it: CRLF as \n
    text(f'--input={path}', '--out_dir=' + str(tmp_path / 'book'))
    n = int(len(whole) * 0.9)  # a single document: its last 10% of characters go to val
    for name, part in (('train', whole[:n]), ('val', whole[n:])):
        assert np.array_equal(read_bin(tmp_path / 'book' / f'{name}.bin'), bpe([part]))


def test_bpe_cut_rule_on_random_text(monkeypatch, tiktoken_offline):
    """bpe_pieces cuts only where the BPE of the pieces equals the BPE of the whole: random texts dense in every
    kind of whitespace, fed in random chunks, against tiktoken on the whole."""
    monkeypatch.setattr(sys, 'argv', ['prepare.py'])  # it reads its flags on import
    spec = importlib.util.spec_from_file_location('text_prepare', os.path.join(REPO, 'data', 'text', 'prepare.py'))
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    alphabet = [' ', ' ', '\n', '\n', '\r', '\t', 'a', 'Zq', '12', '.', ',', "'s", "'ll", 'é', '東', '😀', '\u00a0',
                '\u3000', '\x0b', '\x0c', '\x1c', '\x85', '\u2028', '-']
    rng = random.Random(0)
    cuts = 0
    for _ in range(3000):
        s = ''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        bounds = sorted(rng.sample(range(1, len(s)), min(len(s) - 1, rng.randint(0, 6)))) if len(s) > 1 else []
        chunks = [s[a:b] for a, b in zip([0, *bounds], [*bounds, len(s)])]
        pieces = list(prepare.bpe_pieces(chunks))
        assert ''.join(pieces) == s
        assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(s), (s, pieces)
        cuts += len(pieces) - 1
    assert cuts > 500  # the rule did cut, often


def test_char_tokenizer(tmp_path, text):
    # a folder of documents: every one ends with a newline (added where missing), vocab = the sorted characters
    docs = docs_like_users_have()
    notes = write_files(tmp_path / 'notes', docs, '.md')
    text(f'--input={notes}/*.md', '--name=notes', '--tokenizer=char', '--val_fraction=0.25')
    out = tmp_path / 'data' / 'notes'
    meta = json.load(open(out / 'meta.json'))
    read = [as_read(d) if d.endswith('\n') else as_read(d) + '\n' for d in docs]
    assert meta == {'vocab_size': len(set(''.join(read))), 'itos': sorted(set(''.join(read)))}
    train, val = (''.join(meta['itos'][i] for i in read_bin(out / f'{s}.bin')) for s in ('train', 'val'))
    val_docs = [d for d in read if d in val]
    assert len(val_docs) == 2 and val == ''.join(val_docs) and train == ''.join(d for d in read if d not in val_docs)
    no_leftovers(out)
    # one file: split by characters exactly as data/shakespeare_char does (same bins, same meta.json)
    whole = text_corpus(50_000)
    (tmp_path / 'one.txt').write_text(whole)
    text(f'--input={tmp_path / "one.txt"}', '--out_dir=' + str(tmp_path / 'one'), '--tokenizer=char')
    chars = sorted(set(whole))
    assert json.load(open(tmp_path / 'one' / 'meta.json')) == {'vocab_size': len(chars), 'itos': chars}
    n = int(len(whole) * 0.9)
    ids = np.array([chars.index(c) for c in whole], dtype=np.uint16)
    assert np.array_equal(read_bin(tmp_path / 'one' / 'train.bin'), ids[:n])
    assert np.array_equal(read_bin(tmp_path / 'one' / 'val.bin'), ids[n:])


def test_tables(tmp_path, text, tiktoken_offline):
    """jsonl, parquet and csv, one document a row (an empty or missing value is none), in the real schema's shape:
    the text column among others; docs with commas, quotes and newlines for the csv."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = [as_read(d) for d in docs_like_users_have(6)] + ['a, "quoted", comma\nand a second line']
    rows = [{'id': i, 'body': d} for i, d in enumerate(docs)]
    rows.insert(2, {'id': 99, 'body': ''})
    rows.insert(4, {'id': 98, 'body': None})
    tables = tmp_path / 'tables'
    tables.mkdir()
    with open(tables / 'a.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows[:4])
    pq.write_table(pa.Table.from_pylist(rows[4:7]), tables / 'b.parquet')
    import csv
    with open(tables / 'c.csv', 'w', newline='', encoding='utf-8-sig') as f:  # as Excel saves it: a BOM, then the header
        w = csv.DictWriter(f, fieldnames=['id', 'body'])
        w.writeheader()
        w.writerows(rows[7:])
    text(f'--input={tables}', '--name=t', '--text_column=body', '--val_fraction=0.3', '--num_proc=1')
    check_gpt2_split(tmp_path / 'data' / 't', docs, n_val=2)
    # a single table file works alone too
    text(f'--input={tables / "b.parquet"}', '--out_dir=' + str(tmp_path / 'b'), '--text_column=body')
    assert len(split_docs(read_bin(tmp_path / 'b' / 'val.bin'))) == 1


def test_bad_inputs(tmp_path, text):
    """Each is one line, a non-zero exit, and nothing written: neither data/ nor the inputs change."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = tmp_path / 'good'
    write_files(good, ['first document\n', 'second document\n'])
    (good / 'late.txt').write_bytes(b'valid then \xff\xfe bad')  # files before it read fine; still nothing written
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'empty.txt').write_text('')
    (bad / 'latin1.txt').write_bytes('caf\u00e9 au lait'.encode('latin-1'))
    (bad / 'rows.jsonl').write_text('{"body": "no text here"}\n')
    (bad / 'latin1.jsonl').write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode('latin-1'))
    (bad / 'rows.csv').write_text('id,body\n1,hello\n')
    pq.write_table(pa.Table.from_pylist([{'body': 'x'}]), bad / 'rows.parquet')
    (bad / 'garbage.parquet').write_bytes(os.urandom(500))
    (bad / 'garbage.jsonl').write_bytes(b'{"text": "fine"}\n\x00\x01 not json\n')
    (bad / 'short.txt').write_text('a')
    (bad / 'blank.jsonl').write_text('{"text": ""}\n{"text": null}\n')
    (bad / 'afile').write_text('x')
    data = tmp_path / 'data'
    (data / 'taken').mkdir()
    (data / 'taken' / 'train.bin').write_bytes(b'\x00\x00')
    s = text.script
    i = f'--input={good / "doc00.txt"}'
    # --tokenizer=char: these must not depend on having the GPT-2 tokenizer (which is loaded before reading)
    cases = [
        ([s, f'--input={tmp_path}/*.nothing', '--name=x'], "matches no files"),
        ([s, f'--input={tmp_path}/nowhere', '--name=x'], "no such file or folder"),
        ([s, f'--input={data}', '--name=x'], "matches no .txt, .md, .jsonl, .parquet or .csv files"),
        ([s, f'--input={bad}/empty.txt', '--name=x'], "empty.txt is empty"),
        ([s, f'--input={bad}/latin1.txt', '--name=x'], "latin1.txt is not UTF-8 text (byte 3: b'\\xe9')"),
        ([s, f'--input={good}', '--name=x'], "late.txt is not UTF-8 text (byte 11: b'\\xff')"),
        ([s, f'--input={bad}/latin1.jsonl', '--name=x'], "latin1.jsonl is not UTF-8 text (byte 28: b'\\xe9')"),
        ([s, f'--input={bad}/rows.jsonl', '--name=x'], "rows.jsonl has no 'text' column (its columns: body)"),
        ([s, f'--input={bad}/rows.csv', '--name=x'], "rows.csv has no 'text' column (its columns: id, body)"),
        ([s, f'--input={bad}/rows.parquet', '--name=x'], "rows.parquet has no 'text' column (its columns: body)"),
        ([s, f'--input={bad}/garbage.parquet', '--name=x'], "garbage.parquet is corrupt"),
        ([s, f'--input={bad}/garbage.jsonl', '--name=x'], "garbage.jsonl line 2 is not JSON"),
        ([s, f'--input={bad}/blank.jsonl', '--name=x'], "has no text in its 'text' column"),
        ([s, f'--input={bad}/short.txt', '--name=x'], "too short"),
        ([s, i, '--name=taken'], "pass --overwrite=True"),
        ([s, i, '--name=../escape'], "not a plain folder name"),
        ([s, i, '--name=a/b'], "not a plain folder name"),
        ([s, i, '--name=.hidden'], "not a plain folder name"),
        ([s, i], "name the dataset: --name=NAME"),
        ([s, i, '--name=text'], "choose another --name"),
        ([s, i, f'--out_dir={bad}/afile'], "is a file, not a directory"),
        ([s, i, f'--out_dir={bad}/afile/sub'], "cannot be created or written"),
        ([s, i, '--out_dir='], "--out_dir is empty"),
        ([s, i, '--name=x', '--tokenizer=bpe'], "--tokenizer=bpe"),
        ([s, i, '--name=x', '--val_fraction=1.5'], "val_fraction"),
        ([s, '--name=x'], "give the text to prepare"),
    ]
    cases = [(args + ['--tokenizer=char'] if 'bpe' not in args[-1] else args, msg) for args, msg in cases]
    run_bad_inputs(cases, protect=[data, good, bad])
    assert sorted(os.listdir(data)) == ['taken', 'text']
