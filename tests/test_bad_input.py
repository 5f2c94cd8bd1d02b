"""The bad-input battery: each mistake a new or careless user makes, run through the real scripts as subprocesses.
Every case must end with a non-zero exit, exactly one `error: ...` line that names the input and the way out, no
traceback, and every file that existed before byte-identical after (conftest.run_bad_inputs). The data scripts',
export.py's, plot.py's and compare.py's own cases live beside their other tests.
After the general battery, one test per cause of lost or wrong work: a full disk under every writer, two writers on
one directory, numbers that are not numbers, sizes that cannot fit, flags that would be ignored, and odd but legal
input."""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (REPO, full_disk, leftovers, run_bad_inputs, run_script, snapshot, text_corpus,
                      write_char_dataset)
from model import GPT, GPTConfig
from test_data import install

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=2',
        '--gradient_accumulation_steps=1', '--log_interval=1', '--warmup_iters=5', '--learning_rate=1e-2',
        '--device=cpu']


class Payload:
    """unpickling this runs a command: the classic malicious checkpoint"""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """a char dataset, a trained run, and the damaged files the cases need"""
    t = tmp_path_factory.mktemp('bad')
    data = write_char_dataset(str(t / 'char'))
    run_script('train.py', f'--data_dir={data}', f'--out_dir={t / "run"}', *TINY, '--max_iters=6', '--eval_interval=6')
    for name, change in [('nanogpt', lambda c: c['model_args'].pop('attn_type')),  # nanoGPT's own format
                         ('mismatch', lambda c: c['model_args'].update(n_embd=64, n_head=2)),
                         ('weights_only', lambda c: c.pop('optimizer'))]:
        c = torch.load(t / 'run' / 'ckpt.pt', weights_only=True)
        change(c)
        os.makedirs(t / name)
        torch.save(c, t / name / 'ckpt.pt')
    raw = open(t / 'run' / 'ckpt.pt', 'rb').read()
    os.makedirs(t / 'corrupt')
    (t / 'corrupt' / 'ckpt.pt').write_bytes(raw[:len(raw) // 2])
    os.makedirs(t / 'evil')
    torch.save({'model': Payload(t / 'pwned'), 'model_args': {}}, t / 'evil' / 'ckpt.pt')
    for name, fix in [('bad_ids', lambda d: np.full(1000, 60000, dtype=np.uint16).tofile(d / 'val.bin')),
                      ('short', lambda d: np.zeros(10, dtype=np.uint16).tofile(d / 'val.bin')),
                      ('empty_bin', lambda d: open(d / 'train.bin', 'wb').close()),
                      ('odd_bin', lambda d: open(d / 'train.bin', 'ab').write(b'\0')),
                      ('bad_meta', lambda d: (d / 'meta.json').write_text('{"vocab_size": 65, ')),
                      ('meta_key', lambda d: (d / 'meta.json').write_text('{"vocab_size": 65}'))]:
        shutil.copytree(data, t / name)
        fix(t / name)
    (t / 'a_file').write_text('x')
    (t / 'empty.txt').write_text('')
    (t / 'latin1.txt').write_bytes('na\xefve'.encode('latin-1'))
    transformers = pytest.importorskip('transformers')
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32,
                                                         vocab_size=100)).save_pretrained(t / 'hf')
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2)).save_pretrained(t / 'llama')
    torch.manual_seed(0)  # a GPT-2 BPE checkpoint (vocab 50257), for the tokenizer cases
    bpe = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    os.makedirs(t / 'bpe')
    torch.save({'model': bpe.state_dict(), 'model_args': vars(bpe.config), 'meta': None}, t / 'bpe' / 'ckpt.pt')
    return t, data


def test_train_sample_hellaswag_bench(world):
    t, data = world
    new = t / 'new_out'  # must not exist after any case
    base = ['train.py', f'--data_dir={data}', f'--out_dir={new}', *TINY, '--max_iters=2']
    resume = ['train.py', '--init_from=resume', '--max_iters=8']
    sample = ['sample.py', f'--out_dir={t / "run"}', '--device=cpu']
    offline = {'TIKTOKEN_CACHE_DIR': str(t / 'no_cache'), 'HTTPS_PROXY': 'http://127.0.0.1:9',
               'HTTP_PROXY': 'http://127.0.0.1:9', 'NO_PROXY': ''}  # tiktoken cannot download: refused at once
    no_wandb_key = {'WANDB_API_KEY': None, 'WANDB_MODE': None, 'HOME': str(t / 'home'), 'WANDB_CONFIG_DIR': str(t / 'wb'),
                    'WANDB_DIR': str(t / 'wb'), 'NETRC': str(t / 'home' / '.netrc')}
    cases = [
        # settings: keys, types, values
        (base + ['--n_layr=2'], "unknown config key 'n_layr'"),
        (base + ['--batch_size=1.5'], "config key 'batch_size' wants a int"),
        (base + ['--batch_size=None'], "config key 'batch_size' cannot be None"),
        (['train.py', 'config/no_such.py'], "not found"),
        (base + ['--n_embd=30', '--n_head=4'], "must be divisible by n_head"),
        (base + ['--batch_size=0'], "batch_size must be an integer >= 1"),
        (base + ['--n_layer=0'], "n_layer must be a positive integer"),
        (base + ['--learning_rate=-0.1'], "learning_rate must be positive"),
        (base + ['--weight_decay=-1.0'], "weight_decay must be >= 0"),
        (base + ['--beta2=1.0'], "beta1 and beta2 must be in [0, 1)"),
        (base + ['--seed=-1'], "seed must be in [0, 2**31)"),
        (base + ['--seed=5000000000'], "seed must be in [0, 2**31)"),
        (base + ['--max_bad_steps=0'], "max_bad_steps must be an integer >= 1"),
        (base + ['--checkpoint_interval=-1'], "checkpoint_interval must be an integer >= 0"),
        (base + ['--optimizer=sgd'], "unknown optimizer 'sgd'; use adamw or muon"),
        (base + ['--optimizer=muon', '--muon_lr=0.0'], "muon_lr must be positive"),
        (base + ['--optimizer=muon', '--fsdp=True'], "optimizer='muon' orthogonalises each weight matrix's update"),
        (base + ['--compile_mode=fast'], "unknown compile_mode 'fast'"),
        # hardware the run cannot have
        (base + ['--dtype=float8'], "unsupported dtype 'float8'"),
        (base + ['--dtype=float16'], "float16 is for GPUs"),
        (base + ['--device=tpu'], "device 'tpu'"),
        (base + ['--device=cuda'], "CUDA is not available"),
        (base + ['--device=cuda:3'], "CUDA is not available"),
        (base + ['--backend=nccl'], "backend nccl needs CUDA GPUs"),
        (base + ['--fsdp=True'], "fsdp=True shards the model over several processes"),
        (base + ['--fsdp=True', '--dtype=bfloat16'], "fsdp=True in bfloat16 needs GPUs",
         {'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
          'MASTER_PORT': '29500'}),  # as torchrun sets them
        # where it writes
        (base + [f'--out_dir={t / "a_file" / "out"}'], "cannot be created or written"),
        (base + [f'--out_dir={t / "a_file"}'], "is a file, not a directory"),
        (base + ['--out_dir='], "--out_dir is empty"),
        (base + [f'--out_dir={t / "run"}'], "already holds a run; continue it with --init_from=resume, or replace it "
                                             "with --overwrite=True"),
        # weights: pretrained, checkpoints of other kinds, damaged or unsafe ones
        (base + [f'--init_from={t / "hf"}', '--block_size=64'], "larger than the model's 32"),
        (base + [f'--init_from={t / "hf"}', '--n_layer=3'], "conflicts with"),
        (base + [f'--init_from={t / "llama"}'], "is a 'llama' model, not a GPT-2"),
        (base + ['--init_from=gpt3'], "unknown init_from 'gpt3'"),
        (resume + [f'--out_dir={new}'], "no checkpoint at"),
        (resume + [f'--out_dir={t / "corrupt"}'], "corrupt, truncated or unsafe"),
        (resume + [f'--out_dir={t / "evil"}'], "could run code when loaded"),
        (resume + [f'--out_dir={t / "nanogpt"}'], "looks like a nanoGPT checkpoint"),
        (resume + [f'--out_dir={t / "mismatch"}'], "its weights do not fit its model_args"),
        (resume + [f'--out_dir={t / "weights_only"}'], "cannot be resumed (it has no optimizer)"),
        (resume + [f'--out_dir={t / "run"}', '--n_layer=3'], "conflicts with the checkpoint's n_layer=2"),
        (resume + [f'--out_dir={t / "run"}', '--optimizer=muon'], "conflicts with the checkpoint's optimizer='adamw'"),
        # checks that come before a resumed run touches its log
        (resume + [f'--out_dir={t / "run"}', '--hellaswag_interval=2'], "hellaswag_interval needs a GPT-2 BPE model"),
        (resume + [f'--out_dir={t / "run"}', '--wandb_log=True'], "no W&B API key is set", no_wandb_key),
        # data files
        (base[:1] + [f'--out_dir={new}', '--dataset=nowhere'], "python data/text/prepare.py --input="),
        (base[:1] + [f'--out_dir={new}', '--dataset=openwebtext', f'--data_dir={t / "empty_dir"}'],
         "python data/openwebtext/prepare.py"),
        (base + [f'--data_dir={t / "bad_ids"}'], "holds token id 60000"),
        (base + [f'--data_dir={t / "short"}'], "fewer than one block"),
        (base + [f'--data_dir={t / "empty_bin"}'], "has 0 tokens"),
        (base + [f'--data_dir={t / "odd_bin"}'], "odd number of bytes"),
        (base + [f'--data_dir={t / "bad_meta"}'], "meta.json is not valid JSON"),
        (base + [f'--data_dir={t / "meta_key"}'], "must hold vocab_size and itos"),
        # sample.py
        (sample + [f'--start=FILE:{t / "missing.txt"}'], "does not exist"),
        (sample + [f'--start=FILE:{t}'], "is a directory"),
        (sample + [f'--start=FILE:{t / "empty.txt"}'], "is empty"),
        (sample + [f'--start=FILE:{t / "latin1.txt"}'], "is not UTF-8 text (byte 2"),
        (sample + ['--start=\u00e9\u20ac'], "outside this model's vocabulary"),
        (['sample.py', f'--out_dir={new}'], "no checkpoint at"),
        (['sample.py', f'--out_dir={t / "nanogpt"}'], "looks like a nanoGPT checkpoint"),
        (['sample.py', f'--out_dir={t / "mismatch"}'], "its weights do not fit its model_args"),
        (['sample.py', f'--init_from={t / "llama"}'], "not a GPT-2"),
        (sample + ['--top_k=0'], "top_k"),
        (sample + ['--temperature=-0.5'], "temperature must be >= 0"),
        (['sample.py', f'--out_dir={t / "bpe"}', '--device=cpu'], "could not load GPT-2's BPE", offline),
        (base + ['--dataset=x', f'--data_dir={t / "bpe_data"}', '--sample_interval=1'],
         "could not load GPT-2's BPE", offline),
        (['export.py', f'--out_dir={t / "nanogpt"}', f'--export_dir={t / "exported"}'], "looks like a nanoGPT"),
        # hellaswag.py and bench.py
        (['hellaswag.py', f'--data_dir={t / "a_file" / "hs"}', '--init_from=resume', f'--out_dir={t / "run"}',
          '--device=cpu'], "cannot be created or written"),
        (['hellaswag.py', '--init_from=resume', f'--out_dir={t / "run"}', '--device=cpu'], "character-level model"),
        (['bench.py', f'--text_file={t / "latin1.txt"}', '--mode=data'], "is not UTF-8 text"),
        (['bench.py', '--mode=sample', '--max_new_tokens=-1'], "max_new_tokens must be a positive integer"),
        (['bench.py', '--mode=sample', '--prompt_tokens=0'], "prompt_tokens must be a positive integer"),
    ]
    os.makedirs(t / 'bpe_data')
    for split in ('train', 'val'):
        np.arange(2000, dtype=np.uint16).tofile(t / 'bpe_data' / f'{split}.bin')
    os.makedirs(t / 'home')
    protect = [t / d for d in ('run', 'char', 'corrupt', 'evil', 'nanogpt', 'mismatch', 'bpe', 'hf', 'a_file')]
    run_bad_inputs(cases, protect=protect)
    assert not new.exists()
    assert not (t / 'pwned').exists()  # the payload never ran


def test_full_disk_leaves_the_previous_checkpoint(world, tmp_path):
    """a checkpoint write that fails (here: a file size limit, as a full disk fails it) is one line; the temp file is
    removed and the previous checkpoint is untouched"""
    t, _ = world
    shutil.copytree(t / 'run', tmp_path / 'run')
    before = snapshot(tmp_path / 'run' / 'ckpt.pt')
    limit = os.path.getsize(tmp_path / 'run' / 'ckpt.pt') // 2
    p = run_script(*full_disk(limit), 'train.py', '--init_from=resume', f'--out_dir={tmp_path / "run"}',
                   '--max_iters=8', '--eval_interval=2', check=False)
    err = p.stderr.strip()
    assert p.returncode == 2 and 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert err.startswith('error: could not write') and 'File too large' in err and 'unchanged' in err, err
    assert snapshot(tmp_path / 'run' / 'ckpt.pt') == before
    assert not [f for f in os.listdir(tmp_path / 'run') if '.tmp' in f]


def test_overwrite_replaces_a_run_on_request(world, tmp_path):
    """--overwrite=True replaces a run; flags that this combination does not use are named once, not dropped silently"""
    t, data = world
    shutil.copytree(t / 'run', tmp_path / 'run')
    old = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['iter_num']
    p = run_script('train.py', f'--data_dir={data}', f'--out_dir={tmp_path / "run"}', *TINY, '--max_iters=2',
                   '--eval_interval=2', '--overwrite=True', '--compile=False', '--compile_mode=max-autotune',
                   '--muon_lr=0.05')
    assert old == 6 and torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['iter_num'] == 2
    notes = [line for line in p.stderr.splitlines() if line.startswith('note: ')]
    assert notes == ["note: --compile_mode has no effect with compile off",
                     "note: --muon_lr has no effect with optimizer='adamw'"], p.stderr


# ----------------------------------------------------------------------------- a full disk, under every writer

def test_full_disk_under_every_writer_leaves_the_old_files(world, tmp_path):
    """Each writer on a disk that fills up midway (conftest.full_disk): one line, no temp file left, and the files that
    were there byte-identical. A dataset is replaced whole or not at all: never new bins beside an old meta.json."""
    t, data = world
    ds = tmp_path / 'ds'  # a char dataset that --overwrite=True would replace with another text's
    shutil.copytree(data, ds)
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text(text_corpus(60_000)[::-1])
    sc = install(tmp_path / 'sc', 'shakespeare_char')  # its own dataset, from another input.txt
    write_char_dataset(str(sc), text_corpus(20_000))
    (sc / 'input.txt').write_text(text_corpus(60_000)[::-1])
    resumed = tmp_path / 'resumed'  # a run whose resume rewrites its log
    shutil.copytree(t / 'run', resumed)
    exp = tmp_path / 'exp'  # a run with an earlier export (export.py may replace it), and a killed export's temp dir
    os.makedirs(exp / 'hf')
    shutil.copy(t / 'run' / 'ckpt.pt', exp)
    (exp / 'hf' / 'config.json').write_text('{}')
    (exp / 'hf' / 'export_manifest.json').write_text(json.dumps(
        {'written_by': 'export.py', 'files': {'config.json': hashlib.sha256(b'{}').hexdigest()}}))
    os.makedirs(exp / 'hf.tmp.999999999')  # beyond any pid: its process is gone
    quiet = {'TQDM_DISABLE': '1'}  # progress bars (the scripts', transformers') off: stderr is the error line alone
    cases = [
        (full_disk(20_000) + ['data/text/prepare.py', f'--input={corpus}', f'--out_dir={ds}', '--overwrite=True',
                              '--tokenizer=char', '--num_proc=1'], "(File too large); nothing was replaced", quiet),
        (full_disk(20_000) + [str(sc / 'prepare.py'), '--overwrite=True'],
         "train.bin (File too large); the files there are unchanged", quiet),
        (full_disk(os.path.getsize(resumed / 'log.jsonl') // 2) + ['train.py', '--init_from=resume',
                                                                   f'--out_dir={resumed}', '--max_iters=8'],
         "log.jsonl (File too large); the files there are unchanged"),
        (full_disk(600) + ['train.py', f'--data_dir={data}', f'--out_dir={tmp_path / "fresh"}', *TINY],
         "could not append to"),
        (full_disk(10_000) + ['export.py', f'--out_dir={exp}'], f"could not write the export to {exp / 'hf'} (", quiet),
    ]
    run_bad_inputs(cases, protect=[ds, sc, resumed, exp])
    assert not leftovers(tmp_path)  # the killed export's hf.tmp.999999999 included


def test_a_set_of_files_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """files.write_files, the one writer of sets: a failure on its second file changes nothing; a death between its
    renames is completed by the next reader (or writer), so the set is never seen half old, half new"""
    import files
    d = tmp_path / 'ds'
    files.write_files(str(d), {'train.bin': b'old train', 'val.bin': b'old val', 'meta.json': b'old meta'})
    before = snapshot(d)

    def full_disk_on(name):
        real = open

        def fake(path, *args, **kwargs):
            if os.path.basename(path).startswith(name + '.tmp.'):
                raise OSError(errno.ENOSPC, 'No space left on device')
            return real(path, *args, **kwargs)
        monkeypatch.setattr(files, 'open', fake, raising=False)
    full_disk_on('val.bin')
    with pytest.raises(OSError, match=r"val.bin \(No space left on device\); the files there are unchanged"):
        files.write_files(str(d), {'train.bin': b'new train', 'val.bin': b'new val', 'meta.json': None})
    assert snapshot(d) == before and not leftovers(d)
    full_disk_on(files.JOURNAL)  # the journal itself cannot be written
    with pytest.raises(OSError, match='No space left on device'):
        files.write_files(str(d), {'train.bin': b'new train', 'val.bin': b'new val', 'meta.json': None})
    assert snapshot(d) == before and not leftovers(d)
    monkeypatch.undo()

    real_replace, renames = os.replace, []

    def killed_after_one_rename(src, dst):  # the journal's rename, then one file's, then the process is gone
        if len(renames) == 2:
            raise SystemExit('killed')
        renames.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', killed_after_one_rename)
    with pytest.raises(SystemExit):
        files.write_files(str(d), {'train.bin': b'new train', 'val.bin': b'new val', 'meta.json': None})
    monkeypatch.undo()
    assert (d / files.JOURNAL).exists() and (d / 'train.bin').read_bytes() == b'new train'
    assert (d / 'val.bin').read_bytes() == b'old val'  # half old, half new: no reader may see this
    files.finish_pending(str(d))  # what train.py does before it reads a dataset
    assert sorted(os.listdir(d)) == ['train.bin', 'val.bin'] and (d / 'val.bin').read_bytes() == b'new val'


# ----------------------------------------------------------------------------- two writers, one directory

def test_one_writer_per_directory(world, tmp_path):
    """A second train.py on a run's out_dir is refused in one line while the first runs, every process of it (DDP
    included), and a dataset folder being written is refused the same way; a killed run's lock dies with it."""
    t, data = world
    out, ds = tmp_path / 'out', tmp_path / 'ds'
    run = ['train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, '--eval_interval=5']
    procs = []
    try:
        first = subprocess.Popen([sys.executable, *run, '--max_iters=100000'], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        procs.append(first)
        for line in first.stdout:
            if line.startswith('saved checkpoint'):  # it has a checkpoint to resume from
                break
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = str(s.getsockname()[1])
        ranks = [subprocess.Popen([sys.executable, *run, '--overwrite=True', '--gradient_accumulation_steps=2'], cwd=REPO,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, 'OMP_NUM_THREADS': '1', 'RANK': str(r), 'LOCAL_RANK': str(r),
                                       'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
                                       'MASTER_PORT': port}) for r in (0, 1)]
        procs += ranks
        shutil.copytree(data, ds)
        held = os.open(ds, os.O_RDONLY)  # this process writes ds, as a prepare script would
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = f"is in use by another run (pid {first.pid}: train.py"
        run_bad_inputs([([*run, '--overwrite=True'], busy),
                        (['data/text/prepare.py', f'--input={ds / "meta.json"}', f'--out_dir={ds}', '--overwrite=True',
                          '--tokenizer=char'], f"is being written by another process (pid {os.getpid()}"),
                        (['data/fineweb_edu/prepare.py', f'--out_dir={ds}', '--overwrite=True'], "is being written")],
                       protect=[ds])
        os.close(held)
        for r, p in enumerate(ranks):  # both processes of the DDP run stop, rank 0 saying why
            _, err = p.communicate(timeout=300)
            assert p.returncode == 2 and 'Traceback' not in err, err
            assert (busy in err and len(err.strip().splitlines()) == 1) if r == 0 else not err.strip(), err
        assert first.poll() is None  # the first run went on, untouched
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    step = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    run_script('train.py', '--init_from=resume', f'--out_dir={out}', f'--max_iters={step + 5}')  # not blocked
    steps = [r['iter'] for r in map(json.loads, open(out / 'log.jsonl')) if r['loss'] is not None]
    assert steps == list(range(1, step + 6))  # one writer: every step once, in order


# ----------------------------------------------------------------------------- numbers that are not numbers

def test_non_finite_numbers_are_refused_where_they_enter(world, tmp_path):
    """inf and NaN in flags and config files, and in a checkpoint's weights or optimizer state, whatever reads it"""
    t, data = world
    for name, where in (('nan_weights', 'model'), ('inf_moments', 'optimizer')):
        c = torch.load(t / 'run' / 'ckpt.pt', weights_only=True)
        if where == 'model':
            c['model']['transformer.h.0.attn.c_attn.weight'][0, 0] = float('nan')
        else:
            c['optimizer']['state']['transformer.h.0.mlp.c_fc.weight']['exp_avg_sq'][0, 0] = float('inf')
        os.makedirs(tmp_path / name)
        torch.save(c, tmp_path / name / 'ckpt.pt')
    (tmp_path / 'nan_config.py').write_text("learning_rate = float('nan')\n")
    new = tmp_path / 'new'
    base = [f'--data_dir={data}', f'--out_dir={new}', *TINY]
    nan = f"NaN or inf in its weights (transformer.h.0.attn.c_attn.weight)"
    cases = [
        (['train.py', *base, '--learning_rate=1e400'], "config key 'learning_rate' is inf, not a finite number"),
        (['train.py', *base, '--optimizer=muon', '--muon_lr=1e400'], "config key 'muon_lr' is inf"),
        (['train.py', str(tmp_path / 'nan_config.py'), *base], "config key 'learning_rate' is nan"),
        (['train.py', *base, '--min_lr=1' + '0' * 400], "too large for a float"),
        (['sample.py', f'--out_dir={tmp_path / "nan_weights"}', '--device=cpu'], nan),
        (['export.py', f'--out_dir={tmp_path / "nan_weights"}', f'--export_dir={new}'], nan),
        (['train.py', '--init_from=resume', f'--out_dir={tmp_path / "nan_weights"}'], nan),
        (['train.py', *base, '--init_from=finetune', f'--finetune_from={tmp_path / "nan_weights"}'], nan),
        (['train.py', '--init_from=resume', f'--out_dir={tmp_path / "inf_moments"}'],
         "NaN or inf in its optimizer state (transformer.h.0.mlp.c_fc.weight.exp_avg_sq)"),
    ]
    run_bad_inputs(cases, protect=[tmp_path / 'nan_weights', tmp_path / 'inf_moments'])
    assert not new.exists()


# ----------------------------------------------------------------------------- sizes that cannot fit

def test_sizes_that_cannot_fit_are_one_line(world):
    """checked against the machine's memory before anything is allocated or written (a resume's log included); each
    names the setting to lower. The sizes are far beyond any machine's memory."""
    t, data = world
    new = t / 'new_big'
    base = ['train.py', f'--data_dir={data}', f'--out_dir={new}', *TINY]
    sample = ['sample.py', f'--out_dir={t / "run"}', '--device=cpu']
    cases = [
        (base + ['--n_embd=1048576'], "(the weights and optimizer state: "),
        (base + ['--batch_size=10000000000'], "lower --batch_size or --block_size"),
        (base + ['--eval_iters=1000000000000000'], "lower --eval_iters or --gradient_accumulation_steps"),
        (['train.py', '--init_from=resume', f'--out_dir={t / "run"}', '--batch_size=10000000000'], "lower --batch_size"),
        (sample + ['--max_new_tokens=1000000000000'], "lower --max_new_tokens or --num_samples"),
        (sample + ['--num_samples=1000000000'], "(the KV cache: "),
        (['bench.py', '--mode=sample', '--device=cpu', '--sample_batch=100000000'], "lower --sample_batch"),
    ]
    run_bad_inputs(cases, protect=[t / 'run'])
    assert not new.exists()


# ----------------------------------------------------------------------------- odd but legal input

def test_odd_but_legal_input_is_one_line(world, tmp_path):
    """what a careful user could still type: a launcher's variables half exported, a vocabulary of numbers, a sample
    prompt with characters the dataset lacks (sample.py refuses them too), a seed beyond 64 bits"""
    t, data = world
    ints = tmp_path / 'int_vocab'
    shutil.copytree(data, ints)
    meta = json.load(open(ints / 'meta.json'))
    (ints / 'meta.json').write_text(json.dumps({**meta, 'itos': list(range(meta['vocab_size']))}))
    new = tmp_path / 'new'
    base = ['train.py', f'--data_dir={data}', f'--out_dir={new}', *TINY]
    unset = {k: None for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    cases = [
        (base, "the launcher's variables are incomplete or inconsistent (RANK=0, WORLD_SIZE=None", {**unset, 'RANK': '0'}),
        (base, "or unset WORLD_SIZE to train in one process", {**unset, 'WORLD_SIZE': '2'}),
        (['train.py', f'--data_dir={ints}', *base[2:]], "itos (the character vocabulary, as strings)"),
        (base + ['--sample_interval=1', '--sample_prompt=caf\u00e9\u20ac'],
         "sample_prompt has characters outside this dataset's vocabulary"),
        (['sample.py', f'--out_dir={t / "run"}', '--device=cpu', f'--seed={2 ** 70}'], "seed must be in [0, 2**64)"),
    ]
    run_bad_inputs(cases, protect=[t / 'run', ints])
    assert not new.exists()
