"""The bad-input battery: each mistake a new or careless user makes, run through the real scripts as subprocesses.
Every case must end with a non-zero exit, exactly one `error: ...` line that names the input and the way out, no
traceback, and every file that existed before byte-identical after (conftest.run_bad_inputs). The data scripts',
export.py's, plot.py's and compare_attention.py's own cases live beside their other tests."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_bad_inputs, run_script, snapshot, write_char_dataset
from model import GPT, GPTConfig

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
    wrapper = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv = sys.argv[1:]; "
               "runpy.run_path('train.py', run_name='__main__')")
    p = subprocess.run([sys.executable, '-c', wrapper, 'train.py', '--init_from=resume', f'--out_dir={tmp_path / "run"}',
                        '--max_iters=8', '--eval_interval=2'], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    err = p.stderr.strip()
    assert p.returncode == 2 and 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert err.startswith('error: could not write') and 'File too large' in err and 'unchanged' in err, err
    assert snapshot(tmp_path / 'run' / 'ckpt.pt') == before
    assert not [f for f in os.listdir(tmp_path / 'run') if '.tmp' in f]


def test_overwrite_replaces_a_run_on_request(world, tmp_path):
    t, data = world
    shutil.copytree(t / 'run', tmp_path / 'run')
    old = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['iter_num']
    run_script('train.py', f'--data_dir={data}', f'--out_dir={tmp_path / "run"}', *TINY, '--max_iters=2',
               '--eval_interval=2', '--overwrite=True')
    assert old == 6 and torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['iter_num'] == 2
