"""
The data/*/prepare.py scripts, run as a user would: each on a copy in tmp_path/data/<name>/ (with
configurator.py and dataprep.py at tmp_path/, where its sys.path line looks), so nothing is ever written into the repo's data/.
The web-scale ones get a tiny local dataset in the real schema (json lines with a 'text' column) via --dataset.
"""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import REPO, SHAKESPEARE, full_disk, leftovers, run_bad_inputs, run_script, text_corpus

EOT = 50256


def install(tmp_path, name):
    """A copy of data/<name>/prepare.py at tmp_path/data/<name>/prepare.py; returns its directory."""
    d = tmp_path / 'data' / name
    d.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, 'data', name, 'prepare.py'), d)
    for module in ('configurator.py', 'dataprep.py', 'files.py'):
        shutil.copy(os.path.join(REPO, module), tmp_path)
    return d


def hf_env(tmp_path):
    # datasets' cache stays in tmp_path, and nothing waits on a network that is not there
    return {'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}


def make_docs(n):
    """n documents of varied length cut from text_corpus(), with the awkward cases mixed in: non-ASCII text,
    an empty document, and one spelling out <|endoftext|>, which must stay plain text, never become token 50256."""
    text = text_corpus(60_000)
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, len(text)), size=n - 1, replace=False))
    docs = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    docs[3] = 'naïve café — 東京 😀\n' + docs[3]
    docs[5] = ''
    docs[7] = docs[7] + ' <|endoftext|> is just text here'
    return docs


def write_docs(directory, docs, files=2):
    """The docs as json lines split over a few files (read in name order), with an extra column like the real data."""
    os.makedirs(directory)
    per = -(-len(docs) // files)
    for k in range(files):
        with open(os.path.join(directory, f'part-{k:02d}.jsonl'), 'w') as f:
            for i in range(k * per, min((k + 1) * per, len(docs))):
                f.write(json.dumps({'text': docs[i], 'id': f'doc-{i}'}) + '\n')
    return str(directory)


def read_bin(path):
    assert os.path.getsize(path) % 2 == 0
    return np.fromfile(path, dtype=np.uint16)


def decode_docs(ids, eot_first):
    """Split a token stream at its EOTs and decode each document (EOT before each doc, or after each)."""
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    cuts = np.flatnonzero(ids == EOT)
    if eot_first:
        assert len(ids) == 0 or ids[0] == EOT
        pieces = [p[1:] for p in np.split(ids, cuts)[1:]]
    else:
        assert len(ids) > 0 and ids[-1] == EOT
        pieces = [p[:-1] for p in np.split(ids, cuts + 1)[:-1]]
    return [enc.decode(p.tolist()) for p in pieces]


def no_leftovers(d):
    """no temp file (NAME.tmp or NAME.tmp.<pid>) and no unfinished replacement (files.JOURNAL) left in d"""
    assert not [f for f in os.listdir(d) if '.tmp' in f or f == '.commit.json']


def error_line(p):
    """A user error ends the script with a non-zero exit and one clear 'error:' line, no traceback."""
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('error: '), p.stderr
    return last


# ----------------------------------------------------------------------------- Tiny Shakespeare

def shakespeare_input(d):
    """The real Tiny Shakespeare next to the script when ../shared has it (then exact figures are checked)."""
    real = os.path.isfile(SHAKESPEARE)
    text = open(SHAKESPEARE).read() if real else text_corpus()
    (d / 'input.txt').write_text(text)
    return text, real


def test_shakespeare_char(tmp_path):
    d = install(tmp_path, 'shakespeare_char')
    text, real = shakespeare_input(d)
    p = run_script(str(d / 'prepare.py'), cwd=str(tmp_path))
    assert 'vocab size' in p.stdout
    meta = json.load(open(d / 'meta.json'))
    chars = sorted(set(text))
    assert meta == {'vocab_size': len(chars), 'itos': chars}
    train, val = read_bin(d / 'train.bin'), read_bin(d / 'val.bin')
    n = int(len(text) * 0.9)
    assert ''.join(meta['itos'][i] for i in train) == text[:n]
    assert ''.join(meta['itos'][i] for i in val) == text[n:]
    if real:
        assert len(chars) == 65 and (len(train), len(val)) == (1_003_854, 111_540)
    no_leftovers(d)


def test_shakespeare_bpe(tmp_path, tiktoken_offline):
    d = install(tmp_path, 'shakespeare')
    text, real = shakespeare_input(d)
    run_script(str(d / 'prepare.py'), cwd=str(tmp_path))
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    train, val = read_bin(d / 'train.bin'), read_bin(d / 'val.bin')
    n = int(len(text) * 0.9)
    assert enc.decode(train.tolist()) == text[:n] and enc.decode(val.tolist()) == text[n:]
    if real:
        assert (len(train), len(val)) == (301_966, 36_059)
    assert not (d / 'meta.json').exists()  # GPT-2's own vocab: nothing to record
    no_leftovers(d)


def test_shakespeare_user_errors(tmp_path):
    d = install(tmp_path, 'shakespeare_char')
    (d / 'input.txt').write_text(text_corpus(5_000))
    assert 'unknown config key' in error_line(run_script(str(d / 'prepare.py'), '--val_fractoin=0.2', check=False))
    assert 'val_fraction' in error_line(run_script(str(d / 'prepare.py'), '--val_fraction=1.5', check=False))
    (d / 'input.txt').write_bytes(b'\xff\xfe not utf-8 \xff')
    assert 'UTF-8' in error_line(run_script(str(d / 'prepare.py'), check=False))
    assert sorted(os.listdir(d)) == ['input.txt', 'prepare.py']  # no output, and no half-written output


# ----------------------------------------------------------------------------- OpenWebText

def test_openwebtext(tmp_path, tiktoken_offline):
    d = install(tmp_path, 'openwebtext')
    docs = make_docs(400)
    src = write_docs(tmp_path / 'docs', docs)
    run_script(str(d / 'prepare.py'), f'--dataset={src}', '--num_proc=2', '--val_fraction=0.05',
               env=hf_env(tmp_path))
    train, val = read_bin(d / 'train.bin'), read_bin(d / 'val.bin')
    train_docs, val_docs = decode_docs(train, eot_first=False), decode_docs(val, eot_first=False)
    assert len(val_docs) == 20 and len(train_docs) == 380  # a random 5% held out, EOT after every document
    assert sorted(train_docs + val_docs) == sorted(docs)
    no_leftovers(d)
    # the split is seeded and tokenizing is order-preserving, so one process gives the very same bytes
    other = tmp_path / 'one_proc'
    run_script(str(d / 'prepare.py'), f'--dataset={src}', '--num_proc=1', '--val_fraction=0.05',
               f'--out_dir={other}', env=hf_env(tmp_path))
    for name in ('train.bin', 'val.bin'):
        assert (other / name).read_bytes() == (d / name).read_bytes()


def test_openwebtext_user_errors(tmp_path, tiktoken_offline):
    d = install(tmp_path, 'openwebtext')
    env = hf_env(tmp_path)  # HF_HUB_OFFLINE stands in for a machine without network
    msg = error_line(run_script(str(d / 'prepare.py'), env=env, check=False))
    assert 'check your network' in msg and '--dataset=' in msg
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'a.jsonl').write_text('{"body": "no text column"}\n{"body": "here either"}\n')
    assert "no 'text' column" in error_line(run_script(str(d / 'prepare.py'), f'--dataset={bad}', env=env, check=False))
    assert 'no such file' in error_line(run_script(str(d / 'prepare.py'), f'--dataset={tmp_path}/nope.jsonl', env=env, check=False))
    assert sorted(os.listdir(d)) == ['prepare.py']


# ----------------------------------------------------------------------------- FineWeb-Edu

@pytest.fixture
def fineweb(tmp_path, tiktoken_offline):
    """Runs the fineweb_edu prepare script on a tiny local dataset; run(out_dir, *flags) -> CompletedProcess."""
    d = install(tmp_path, 'fineweb_edu')
    docs = make_docs(400)
    src = write_docs(tmp_path / 'docs', docs)

    def run(out, *flags, check=True):
        return run_script(str(d / 'prepare.py'), f'--dataset={src}', f'--out_dir={out}', '--chunk_docs=16', *flags,
                          env=hf_env(tmp_path), check=check)
    run.docs = docs
    return run


def bins(out):
    return {name: (out / name).read_bytes() for name in ('train.bin', 'val.bin')}


def test_fineweb_edu(tmp_path, fineweb):
    out = tmp_path / 'straight'
    p = fineweb(out, '--num_proc=1', '--val_docs=20')
    assert 'tokens/s' in p.stdout
    train, val = read_bin(out / 'train.bin'), read_bin(out / 'val.bin')
    # the first val_docs documents, in order, go to val; each starts with EOT
    assert decode_docs(val, eot_first=True) == fineweb.docs[:20]
    assert decode_docs(train, eot_first=True) == fineweb.docs[20:]
    state = json.load(open(out / 'progress.json'))
    assert state['done'] and state['docs'] == 400
    assert state['tokens'] == {'train': len(train), 'val': len(val)}
    no_leftovers(out)
    # a rerun has nothing to do and touches nothing
    before = bins(out)
    assert 'already complete' in fineweb(out, '--num_proc=1').stdout
    assert bins(out) == before
    # a pool of 2 tokenizes the batches out of order but writes them in order: the same bytes
    fineweb(tmp_path / 'pool', '--num_proc=2', '--val_docs=20')
    assert bins(tmp_path / 'pool') == before


def test_fineweb_edu_resume(tmp_path, fineweb):
    straight = tmp_path / 'straight'
    fineweb(straight, '--num_proc=2', '--val_docs=2')
    want = bins(straight)

    # a trial run stops at num_docs (val_docs scales down to 1% of it) and says so when repeated...
    trial = tmp_path / 'trial'
    fineweb(trial, '--num_proc=2', '--num_docs=250')
    state = json.load(open(trial / 'progress.json'))
    assert (state['docs'], state['val_docs'], state['done']) == (250, 2, True)
    assert 'already complete' in fineweb(trial, '--num_docs=250').stdout
    assert 'more than --num_docs' in error_line(fineweb(trial, '--num_docs=100', check=False))
    # ...and a full run later carries on from it, ending with the same bytes as one straight run
    assert 'resuming after 250 documents' in fineweb(trial, '--num_proc=2').stdout
    assert bins(trial) == want

    # a crash: progress.json was last saved after document 100, but the bins had more written after that save
    crash = tmp_path / 'crash'
    shutil.copytree(straight, crash)
    val, train = read_bin(crash / 'val.bin'), read_bin(crash / 'train.bin')
    starts = np.flatnonzero(train == EOT)  # train.bin holds documents 2, 3, ...: document k starts at starts[k - 2]
    state = json.load(open(crash / 'progress.json'))
    state.update(docs=100, done=False, num_docs=None, tokens={'val': len(val), 'train': int(starts[98])})
    (crash / 'progress.json').write_text(json.dumps(state))
    with open(crash / 'val.bin', 'ab') as f:
        f.write(b'\x01\x02' * 7)  # part of a batch the crash cut short
    assert 'resuming after 100 documents' in fineweb(crash, '--num_proc=1').stdout
    assert bins(crash) == want
    no_leftovers(crash)


def test_fineweb_edu_user_errors(tmp_path, fineweb):
    out = tmp_path / 'out'
    fineweb(out, '--num_docs=50', '--val_docs=5')
    before = bins(out)
    # resuming only continues the same documents with the same split
    assert 'val_docs=5' in error_line(fineweb(out, '--val_docs=6', check=False))
    assert 'pass that --dataset' in error_line(fineweb(out, f'--dataset={tmp_path}', check=False))
    assert bins(out) == before
    # no network: one line saying what to do, and nothing written
    nowhere = tmp_path / 'nowhere'
    p = run_script(str(tmp_path / 'data' / 'fineweb_edu' / 'prepare.py'), f'--out_dir={nowhere}',
                   env=hf_env(tmp_path), check=False)
    assert '--dataset=' in error_line(p)
    assert not nowhere.exists() or os.listdir(nowhere) == []
    assert 'num_proc' in error_line(fineweb(out, '--num_proc=0', check=False))


# ----------------------------------------------------------------------------- bad inputs of the web-scale scripts

def test_web_out_dir_and_damaged_progress(tmp_path):
    """An --out_dir that cannot be a directory, and a progress.json that cannot be trusted: one line each, before
    anything is read or written (so neither the tokenizer nor the dataset is needed)."""
    owt, fw = (str(install(tmp_path, name) / 'prepare.py') for name in ('openwebtext', 'fineweb_edu'))
    afile = tmp_path / 'afile'
    afile.write_text('x')
    good = {'dataset': str(tmp_path / 'docs'), 'name': None, 'val_docs': 2, 'docs': 5,
            'tokens': {'val': 3, 'train': 7}, 'done': False, 'num_docs': None}

    def out_with(record):
        """an out_dir holding 3 + 7 tokens of bins and this progress.json"""
        d = tmp_path / f'out{len(os.listdir(tmp_path))}'
        d.mkdir()
        (d / 'val.bin').write_bytes(b'\x01\x00' * 3)
        (d / 'train.bin').write_bytes(b'\x01\x00' * 7)
        (d / 'progress.json').write_text(record if isinstance(record, str) else json.dumps(record))
        return str(d)

    damaged = [('{"docs": 5,', 'JSONDecodeError'), ('[1, 2]', 'it holds a list'),
               ({k: v for k, v in good.items() if k not in ('done', 'tokens')}, 'no done, tokens'),
               ({**good, 'docs': '5'}, "docs is '5'"), ({**good, 'docs': -1}, 'docs is -1'),
               ({**good, 'done': 'yes'}, "done is 'yes'"), ({**good, 'val_docs': 0}, 'val_docs is 0'),
               ({**good, 'tokens': {'val': 3, 'train': 1.5}}, 'tokens is'),
               ({**good, 'tokens': {'val': 3}}, 'tokens is'),
               ({**good, 'tokens': {'val': 3, 'train': 70}}, 'holds 7 tokens but')]
    dirs = [out_with(record) for record, _ in damaged]
    cases = [([fw, f'--dataset={good["dataset"]}', f'--out_dir={d}'], why) for d, (_, why) in zip(dirs, damaged)]
    for script in (owt, fw):
        cases += [([script, f'--out_dir={afile}'], 'is a file, not a directory'),
                  ([script, f'--out_dir={afile}/sub'], 'cannot be created or written'),
                  ([script, '--out_dir='], '--out_dir is empty')]
    done = run_bad_inputs(cases, protect=[*dirs, afile, tmp_path / 'data'])
    assert all('progress.json to start over' in p.stderr for p in done[:len(damaged)])


def test_web_corrupt_local_files(tmp_path, tiktoken_offline):
    """A damaged local dataset is reported as a damaged file (never as a network problem), with nothing written."""
    owt, fw = (str(install(tmp_path, name) / 'prepare.py') for name in ('openwebtext', 'fineweb_edu'))
    (tmp_path / 'garbage.parquet').write_bytes(os.urandom(600))
    (tmp_path / 'garbage.jsonl').write_bytes(b'{"text": "fine"}\n\x00\x01 not json\n')
    env = hf_env(tmp_path)
    cases = [([script, f'--dataset={tmp_path / name}', f'--out_dir={tmp_path / "out"}'],
              f"{tmp_path / name} (ArrowInvalid", env)
             for script, name in ((owt, 'garbage.parquet'), (fw, 'garbage.jsonl'))]
    for p in run_bad_inputs(cases, protect=[tmp_path / 'out', tmp_path / 'data']):
        assert 'corrupt' in p.stderr and 'network' not in p.stderr
    # streaming reads a folder's files one after another: one found damaged midway stops the run saying so
    docs = write_docs(tmp_path / 'docs', make_docs(40))
    with open(os.path.join(docs, 'part-01.jsonl'), 'a') as f:
        f.write('{"text": "cut off\n')
    msg = error_line(run_script(fw, f'--dataset={docs}', f'--out_dir={tmp_path / "out"}', '--num_proc=1',
                                '--chunk_docs=4', '--val_docs=2', env=env, check=False))
    assert 'corrupt' in msg and 'network' not in msg and 'rerun the same command to continue' in msg


def test_web_null_texts_empty_split_and_full_disk(tmp_path, tiktoken_offline):
    """The web-scale scripts on a jsonl with null texts (left out, and said so); a val_fraction that would leave
    train.bin empty (one line); a full disk while each replaces a dataset (one line, the old bins untouched, and only
    FineWeb-Edu's resumable progress left, for the rerun to continue)."""
    from concurrent.futures import ThreadPoolExecutor
    owt, fw = (str(install(tmp_path, name) / 'prepare.py') for name in ('openwebtext', 'fineweb_edu'))
    docs = make_docs(40)
    src = tmp_path / 'docs.jsonl'
    with open(src, 'w') as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({'text': d}) + '\n' + ('{"text": null}\n' if i in (2, 30) else ''))
    env = {**hf_env(tmp_path), 'TQDM_DISABLE': '1'}
    runs = {'owt': [owt, '--val_fraction=0.1'], 'fw': [fw, '--val_docs=4']}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(lambda k: run_script(*runs[k], f'--dataset={src}', f'--out_dir={tmp_path / k}',
                                                            '--num_proc=1', env=env), runs)))
    for name, p in done.items():
        assert 'note: 2 document(s) had no text (null) and were left out' in p.stdout
    train, val = read_bin(tmp_path / 'owt' / 'train.bin'), read_bin(tmp_path / 'owt' / 'val.bin')
    assert sorted(decode_docs(train, eot_first=False) + decode_docs(val, eot_first=False)) == sorted(docs)
    train, val = read_bin(tmp_path / 'fw' / 'train.bin'), read_bin(tmp_path / 'fw' / 'val.bin')
    assert decode_docs(val, eot_first=True) + decode_docs(train, eot_first=True) == docs
    bins = [tmp_path / k / f'{s}.bin' for k in runs for s in ('train', 'val')]
    run_bad_inputs([([owt, f'--dataset={src}', f'--out_dir={tmp_path / "none"}', '--val_fraction=0.99'],
                     "val_fraction=0.99 of 42 documents leaves none for train.bin", env),
                    (full_disk(2_000) + [owt, f'--dataset={src}', f'--out_dir={tmp_path / "owt"}', '--overwrite=True',
                                         '--num_proc=1'], "(File too large); nothing was replaced", env),
                    (full_disk(2_000) + [fw, f'--dataset={src}', f'--out_dir={tmp_path / "fw"}', '--overwrite=True',
                                         '--num_proc=1', '--val_docs=4'], "progress.json keeps the work done", env)],
                   protect=bins)
    assert not leftovers(tmp_path / 'owt') and not (tmp_path / 'none').exists()
    assert sorted(leftovers(tmp_path / 'fw')) == [str(tmp_path / 'fw' / f'{s}.bin.tmp') for s in ('train', 'val')]
