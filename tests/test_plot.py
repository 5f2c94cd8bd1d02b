"""plot.py on synthetic log.jsonl files."""
import json
import os

from conftest import run_bad_inputs, run_script

KEYS = ('iter', 'loss', 'train_loss', 'val_loss', 'hellaswag', 'lr', 'grad_norm', 'tokens_per_sec', 'mfu', 'time')


def write_log(path, hellaswag=True, partial_last_line=False):
    """a run of 100 steps: a train record every 10 steps, an eval record (losses, HellaSwag) every 50"""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        for it in range(0, 101, 10):
            rec = dict.fromkeys(KEYS)
            rec.update(iter=it, loss=6.0 - it / 50 + (0.3 if it == 60 else 0.0), lr=6e-4, grad_norm=1.0,
                       tokens_per_sec=1000.0, mfu=None, time=float(it))
            f.write(json.dumps(rec) + '\n')
            if it % 50 == 0:
                rec = dict.fromkeys(KEYS)
                rec.update(iter=it, train_loss=5.9 - it / 50, val_loss=6.1 - it / 60,
                           hellaswag=(0.25 + it / 2000 if it != 50 else 0.31) if hellaswag else None, time=float(it))
                f.write(json.dumps(rec) + '\n')
        if partial_last_line:
            f.write('{"iter": 110, "loss": 3.')  # a run still writing its next line
    return path


def check_png(path):
    import matplotlib.image as mpimg
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert 300 <= h <= 2000 and 600 <= w <= 4000 and w > h, img.shape
    assert img.std() > 0.01  # something was drawn


def test_plot_two_runs(tmp_path):
    a = write_log(str(tmp_path / 'run_a' / 'log.jsonl'))
    b = write_log(str(tmp_path / 'run_b' / 'log.jsonl'), hellaswag=False, partial_last_line=True)
    out = str(tmp_path / 'figs' / 'plot.png')
    p = run_script('plot.py', f'--logs={a},{b}', f'--out={out}', '--gpt2_val_loss=3.3')
    check_png(out)
    lines = p.stdout.strip().splitlines()
    assert lines[0] == (f"{a}: min train loss 4.0000 (iter 100), min val loss 4.4333 (iter 100), "
                        f"max HellaSwag 0.3100 (iter 50)")
    assert lines[1] == f"{b}: min train loss 4.0000 (iter 100), min val loss 4.4333 (iter 100), max HellaSwag n/a"
    assert not [f for f in os.listdir(tmp_path / 'figs') if f != 'plot.png']  # no temp file left


def test_plot_without_hellaswag_or_references(tmp_path):
    a = write_log(str(tmp_path / 'log.jsonl'), hellaswag=False)
    out = str(tmp_path / 'p.png')
    p = run_script('plot.py', f'--logs={a}', f'--out={out}', '--references=False')
    check_png(out)
    assert 'max HellaSwag n/a' in p.stdout


def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path):
    good = write_log(str(tmp_path / 'run' / 'log.jsonl'))
    (tmp_path / 'file.txt').write_text('a file')
    (tmp_path / 'dir.png').mkdir()
    logs = {'empty': '', 'corrupt': '{"iter": 0, "loss": 5.0}\nnot json\n{"iter": 10, "loss": 4.0}\n',
            'no_iter': '{"step": 0, "loss": 5.0}\n', 'no_losses': '{"iter": 0, "acc": 0.5}\n{"iter": 10, "acc": 0.6}\n'}
    for name, text in logs.items():
        (tmp_path / f'{name}.jsonl').write_text(text)
    (tmp_path / 'latin1.jsonl').write_bytes('{"iter": 0, "loss": 5.0, "run": "caf\u00e9"}\n'.encode('latin-1'))
    png = f'--out={tmp_path / "p.png"}'
    cases = [
        ([f'--logs={good}', f'--out={tmp_path / "file.txt" / "p.png"}'], 'is a file, not a directory'),
        ([f'--logs={good}', f'--out={tmp_path / "dir.png"}'], 'is a directory; give a file name'),
        ([f'--logs={good}', f'--out={tmp_path / "p.jpg"}'], 'must be a .png file'),
        ([f'--logs={good}', '--out='], '--out is empty'),
        ([f'--logs={tmp_path / "latin1.jsonl"}', png], 'is not UTF-8 text'),
        ([f'--logs={tmp_path / "run"}', png], 'is a directory; give a text file'),
        ([f'--logs={tmp_path / "nope.jsonl"}', png], 'no log at'),
        ([f'--logs={tmp_path / "empty.jsonl"}', png], 'is empty: no records'),
        ([f'--logs={tmp_path / "corrupt.jsonl"}', png], 'corrupt.jsonl:2 is not a log record'),
        ([f'--logs={tmp_path / "no_iter.jsonl"}', png], 'no_iter.jsonl:1 is not a log record (no integer iter)'),
        ([f'--logs={tmp_path / "no_losses.jsonl"}', png], 'no record with a loss, train_loss, val_loss or hellaswag'),
        ([f'--logs={good},,{good}', png], 'has an empty entry (entry 2)'),
        ([f'--logs={good},{tmp_path}/run/../run/log.jsonl', png], 'names the same log twice'),
        ([f'--logs={good}', png, '--gpt2_hellaswag=29.55'], '--gpt2_hellaswag must be an accuracy in [0, 1]'),
        ([f'--logs={good}', png, '--gpt2_val_loss=-3.3'], '--gpt2_val_loss must be a positive loss'),
    ]
    run_bad_inputs([(['plot.py', *args], message) for args, message in cases], protect=[tmp_path])
    assert not (tmp_path / 'p.png').exists()
