"""The README's CPU commands, read from the README itself and run in the order it gives them, on a copy of the repo.

Each command runs as written, with a few flags appended (later flags win) that only make it tiny: 2 layers x 32
wide and a handful of steps. Shape flags are appended to fresh runs only, so a resume or a finetune meets the
config file's shape exactly as a user does (issue: `--init_from=resume` after the README's CPU run used to stop on
the config file's n_layer=6). A README edit that drops, reorders or breaks one of these commands fails here.
"""
import json
import os
import re
import shlex
import shutil

import pytest
import torch

from conftest import REPO, run_script, text_corpus

TINY_RUN = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=4', '--max_iters=6', '--lr_decay_iters=6',
            '--warmup_iters=2', '--eval_interval=3', '--eval_iters=2', '--log_interval=1']
TINY_MORE = ['--batch_size=4', '--max_iters=3', '--eval_interval=3', '--eval_iters=2']  # shape from the checkpoint
TINY_SAMPLE = ['--num_samples=1', '--max_new_tokens=24']

# (what the README's command starts with, flags appended here); in the README's order
WALK = [
    ('python data/shakespeare_char/prepare.py', []),
    ('python train.py config/train_shakespeare_char.py --device=cpu', TINY_RUN),
    ('python sample.py --out_dir=out-shakespeare-char', TINY_SAMPLE),
    ("python data/text/prepare.py --input='notes/*.md' --name=notes --tokenizer=char", ['--num_proc=1']),
    ('python train.py config/train_shakespeare_char.py --dataset=notes', TINY_RUN),
    ('python sample.py --out_dir=out-notes', TINY_SAMPLE),
    ('python train.py config/train_shakespeare_char.py --init_from=resume', ['--max_iters=9']),
    ('python train.py config/train_shakespeare_char.py --attn_type=GK', TINY_RUN),
    ('python train.py config/train_shakespeare_char.py --init_from=finetune', TINY_MORE),
    ('python train.py config/PA.py', TINY_RUN),
    ('python train.py config/EVAL.py', []),
]


def readme_commands():
    """every shell command in the README's ```sh blocks, in order, as argument lists (comments and && split off)"""
    text = open(os.path.join(REPO, 'README.md')).read()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():  # a trailing backslash continues the command
            for part in line.split('&&'):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(words)
    return commands


def find(commands, start):
    """index of the first README command that begins with `start` (as words)"""
    want = shlex.split(start)
    for i, words in enumerate(commands):
        if words[:len(want)] == want:
            return i
    raise AssertionError(f"the README no longer has a command starting with: {start}")


@pytest.fixture(scope='module')
def repo_copy(tmp_path_factory):
    """the repo's scripts and configs in a fresh folder (no datasets, no runs), as a new clone would have them"""
    dst = tmp_path_factory.mktemp('readme') / 'repo'
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns('.git', '__pycache__', '.pytest_cache', 'out*', '*.bin',
                                                             'meta.json', 'input.txt', 'progress.json', 'hellaswag'))
    # offline: the README says to put Tiny Shakespeare's input.txt next to the prepare script (a short piece of it)
    open(dst / 'data' / 'shakespeare_char' / 'input.txt', 'w').write(text_corpus(60_000))
    (dst / 'notes').mkdir()
    for i in range(3):  # "your own text": a few markdown files
        open(dst / 'notes' / f'{i}.md', 'w').write(text_corpus(20_000 * (i + 1))[20_000 * i:])
    return dst


def test_readme_cpu_commands_run_in_order(repo_copy):
    commands = readme_commands()
    at = [find(commands, start) for start, _ in WALK]
    assert at == sorted(at), "the README gives these commands in another order than this walk"
    for (start, extra), i in zip(WALK, at):
        words = commands[i]
        assert words[0] == 'python'
        p = run_script(*words[1:], *extra, cwd=repo_copy, env={'TIKTOKEN_CACHE_DIR': None}, timeout=120, check=False,
                       fork=True)  # as `python ...` would run it, without importing torch 11 times
        assert p.returncode == 0 and 'Traceback' not in p.stderr, (words, p.stdout[-1500:], p.stderr[-1500:])
        if start.startswith('python sample.py'):
            assert len(p.stdout.strip()) > 10, (words, p.stdout)  # a sample was printed
    run = repo_copy / 'out-shakespeare-char'
    resumed = torch.load(run / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert resumed['iter_num'] == 9 and resumed['model_args']['n_layer'] == 2  # continued, in its own shape
    iters = [json.loads(line)['iter'] for line in open(run / 'log.jsonl')]
    assert iters == sorted(iters) and iters[-1] == 9  # one log, carried on from step 6
    tuned = torch.load(repo_copy / 'out-gkpoly8' / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert tuned['model_args']['attn_type'] == 'GKpoly-8' and tuned['model_args']['n_layer'] == 2
    assert tuned['model_args']['block_size'] == 64  # the CPU recipe's context, not the config file's 256
    assert (repo_copy / 'data' / 'notes' / 'meta.json').exists()
    # every --text_file the README names exists once its commands have run
    for words in commands:
        for w in words:
            if w.startswith('--text_file='):
                assert (repo_copy / w.split('=', 1)[1]).is_file(), w
