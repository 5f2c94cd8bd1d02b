"""Chat fine-tuning end to end: data/chat/prepare.py (the format, the mask, bad input), train.py on chat data (masked
targets, conversation-aligned windows; plain datasets unchanged) and chat.py. The acceptance test trains a small model
from scratch on a synthetic task whose reply depends on the user's words (reverse them) and scores chat.py --prompt on
held-out conversations; `pytest --full` runs it at full size."""
import contextlib
import io
import json
import os
import random
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import chat_format
from conftest import REPO, run_bad_inputs, run_script, write_char_dataset

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=4',
        '--gradient_accumulation_steps=1', '--warmup_iters=2', '--learning_rate=1e-2', '--compile=False',
        '--device=cpu']
# the acceptance model: 2 layers x 64 wide, windows of 48 characters (a conversation is 30 to 45)
CHAT = ['--n_layer=2', '--n_head=4', '--n_embd=64', '--block_size=48', '--batch_size=16',
        '--gradient_accumulation_steps=1', '--warmup_iters=10', '--learning_rate=3e-3', '--min_lr=3e-4',
        '--eval_iters=10', '--log_interval=50', '--compile=False', '--device=cpu']


def reversal(n, seed):
    """conversations whose answer is the user's four letters reversed; some open with a system message"""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        word = ''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(4))
        out.append(([{'role': 'system', 'content': 'Reverse.'}] if r.random() < 0.3 else []) +
                   [{'role': 'user', 'content': word}, {'role': 'assistant', 'content': word[::-1]}])
    return out


def write_jsonl(path, convs):
    with open(path, 'w') as f:
        for c in convs:
            f.write(json.dumps({'messages': c}) + '\n')
    return path


def ask(out, prompt, system='', extra=()):
    """chat.py --prompt run in this process (runpy: the script as a user runs it, without a Python start per
    prompt); returns what it printed"""
    argv = sys.argv
    sys.argv = ['chat.py', f'--out_dir={out}', f'--prompt={prompt}', '--temperature=0', '--device=cpu'] + \
               ([f'--system={system}'] if system else []) + list(extra)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(REPO, 'chat.py'), run_name='__main__')
        assert e.value.code == 0
    finally:
        sys.argv = argv
    return buf.getvalue()


def score(out, convs, extra=()):
    right = 0
    for c in convs:
        system = c[0]['content'] if c[0]['role'] == 'system' else ''
        right += ask(out, c[-2]['content'], system, extra) == c[-1]['content'] + '\n'
    return right / len(convs)


def test_render_and_prepare_write_the_mask(tmp_path):
    conv = [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': 'hi'},
            {'role': 'assistant', 'content': 'yo'}, {'role': 'user', 'content': 'ok?'},
            {'role': 'assistant', 'content': 'ok'}]
    data = tmp_path / 'data'
    write_jsonl(tmp_path / 'c.jsonl', [conv, conv[1:3]])
    run_script('data/chat/prepare.py', f'--input={tmp_path / "c.jsonl"}', f'--out_dir={data}', '--tokenizer=char',
               '--val_fraction=0.5')
    meta = json.load(open(data / 'meta.json'))
    itos = meta['itos']
    assert itos[-1] == chat_format.EOT and meta['vocab_size'] == len(itos)
    ids = {s: np.fromfile(data / f'{s}.bin', dtype=np.uint16).tolist() for s in ('train', 'val')}
    mask = {s: np.fromfile(data / f'{s}.mask.bin', dtype=np.uint8).tolist() for s in ('train', 'val')}
    split = 'train' if len(ids['train']) > len(ids['val']) else 'val'
    text = ''.join(itos[i] for i in ids[split])
    assert text == ('System: Be kind.<|endoftext|>User: hi<|endoftext|>Assistant: yo<|endoftext|>User: ok?'
                    '<|endoftext|>Assistant: ok<|endoftext|>')
    # trained on: the space and words after "Assistant:", and the <|endoftext|> closing them; nothing else
    assert ''.join(itos[i] for i, m in zip(ids[split], mask[split]) if m) == ' yo<|endoftext|> ok<|endoftext|>'
    assert np.fromfile(data / f'{split}.convs.bin', dtype=np.int64).tolist() == [0]
    assert json.load(open(data / 'chat.json'))['format'] == chat_format.FORMAT


@pytest.fixture(scope='module')
def plain_run(tmp_path_factory):
    """a plain char dataset and a short run on it"""
    root = tmp_path_factory.mktemp('plain')
    data = write_char_dataset(str(root / 'data'), val_frac=0.2)
    run_script('train.py', f'--data_dir={data}', f'--out_dir={root / "run"}', *TINY, '--max_iters=6',
               '--eval_interval=3', '--dropout=0.1')
    return root


@pytest.fixture(scope='module')
def chat_runs(tmp_path_factory, full):
    """the reversal task prepared, and trained from scratch with and without the mask at equal steps"""
    root = tmp_path_factory.mktemp('chat')
    steps = 400 if full else 250
    write_jsonl(root / 'train.jsonl', reversal(4000, 0))
    run_script('data/chat/prepare.py', f'--input={root / "train.jsonl"}', f'--out_dir={root / "data"}',
               '--tokenizer=char')
    runs = {mask: root / f'mask-{mask}' for mask in (True, False)}
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda kv: run_script(
            'train.py', f'--data_dir={root / "data"}', f'--out_dir={kv[1]}', *CHAT, f'--max_iters={steps}',
            f'--lr_decay_iters={steps}', f'--eval_interval={steps}', f'--chat_mask={kv[0]}'), runs.items()))
    assert 'chat data (gpt2-plain-v1): train 3,600 conversations' in done[0].stdout
    return root, runs, steps


def test_plain_datasets_train_bit_identically(plain_run, tmp_path):
    """the chat path with every token a target and a window at every offset is the plain path, loss for loss: so
    a plain dataset, which never enters it, trains as before"""
    chat = write_char_dataset(str(tmp_path / 'chat'), val_frac=0.2)
    for split in ('train', 'val'):
        n = len(np.fromfile(os.path.join(chat, f'{split}.bin'), dtype=np.uint16))
        np.ones(n, dtype=np.uint8).tofile(os.path.join(chat, f'{split}.mask.bin'))
        np.arange(n - 32 - 1, dtype=np.int64).tofile(os.path.join(chat, f'{split}.convs.bin'))
    json.dump({'format': chat_format.FORMAT}, open(os.path.join(chat, 'chat.json'), 'w'))
    run_script('train.py', f'--data_dir={chat}', f'--out_dir={tmp_path / "out"}', *TINY, '--max_iters=6',
               '--eval_interval=3', '--dropout=0.1')
    logs = [[{k: r[k] for k in ('iter', 'loss', 'val_loss')} for r in map(json.loads, open(out / 'log.jsonl'))]
            for out in (plain_run / 'run', tmp_path / 'out')]
    assert logs[0] == logs[1] and len(logs[0]) == 9


def test_chat_bad_input(tmp_path, plain_run, chat_runs):
    good = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]
    bad = {'no_role': [{'content': 'hi'}, good[1]], 'bot': [{'role': 'bot', 'content': 'hi'}, good[1]],
           'number': [{'role': 'user', 'content': 7}, good[1]], 'no_answer': [good[0]]}
    for name, conv in bad.items():
        write_jsonl(tmp_path / f'{name}.jsonl', [good, conv])
    (tmp_path / 'empty.jsonl').write_text('')
    (tmp_path / 'notjson.jsonl').write_text(json.dumps({'messages': good}) + '\nthis is prose\n')
    (tmp_path / 'text.jsonl').write_text('{"text": "plain"}\n{"text": "words"}\n')
    out = tmp_path / 'out'
    prep = lambda f, *flags: ['data/chat/prepare.py', f'--input={tmp_path / f}', f'--out_dir={out}', *flags]
    root, runs, _ = chat_runs
    cases = [(prep('no_role.jsonl'), 'row 2: message 1 has no role'),
             (prep('bot.jsonl'), "message 1 has the unknown role 'bot'"),
             (prep('number.jsonl'), 'message 1 has content that is not a string'),
             (prep('no_answer.jsonl'), 'row 2: it has no assistant turn'),
             (prep('empty.jsonl'), 'is empty'),
             (prep('notjson.jsonl'), 'line 2 is not JSON'),
             (prep('text.jsonl'), "has no 'messages' column"),
             # a chat run resumed on plain text, and a plain run on chat data
             (['train.py', '--init_from=resume', f'--out_dir={runs[True]}', f'--data_dir={plain_run / "data"}',
               f'--max_iters=300'], 'was trained on a chat dataset and'),
             (['train.py', '--init_from=resume', f'--out_dir={plain_run / "run"}', f'--data_dir={root / "data"}',
               '--max_iters=8'], 'was trained on a plain-text dataset'),
             (['chat.py', f'--out_dir={runs[True]}', f'--prompt={"abcd" * 20}', '--device=cpu'],
              'the model sees at most 48'),
             (['chat.py', f'--out_dir={plain_run / "run"}', '--prompt=hi', '--device=cpu'], 'has no <|endoftext|>')]
    run_bad_inputs(cases, protect=[runs[True], plain_run / 'run'])
    assert not out.exists()


def test_chat_acceptance(chat_runs, full, tmp_path):
    """>= 95% exact replies on held-out conversations through chat.py --prompt, and the same steps without the mask
    (every token a target) do worse. CI: 250 steps, 100 held out; --full: 400 steps, 1000 held out."""
    root, runs, steps = chat_runs
    held_out = reversal(1000 if full else 100, 1)
    masked, unmasked = score(runs[True], held_out), score(runs[False], held_out)
    print(f"held-out exact replies after {steps} steps: masked {masked:.1%}, unmasked {unmasked:.1%}")
    assert masked >= 0.95 and unmasked <= masked - 0.3, (masked, unmasked)
    assert score(runs[True], held_out[:20], ['--quantize=int8']) >= 0.95  # int8 weights answer as well
    # the interactive session: streaming replies, /reset, /exit
    p = subprocess.run([sys.executable, 'chat.py', f'--out_dir={runs[True]}', '--temperature=0', '--device=cpu'],
                       cwd=REPO, input='abcd\n/reset\nwxyz\n/exit\nnever\n', capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == 'you> assistant> dcba\nyou> you> assistant> zyxw\nyou> ', p.stdout
    assert '(history cleared)' in p.stderr
    # a model not trained on chat data is allowed, and said so once
    ck = torch.load(runs[True] / 'ckpt.pt', weights_only=True)
    ck['chat'] = None
    os.makedirs(tmp_path / 'unsaid')
    torch.save(ck, tmp_path / 'unsaid' / 'ckpt.pt')
    p = run_script('chat.py', f'--out_dir={tmp_path / "unsaid"}', '--prompt=abcd', '--temperature=0', '--device=cpu')
    assert p.stdout == 'dcba\n' and p.stderr.count('was not trained on chat data') == 1
