"""
Plot training runs from their log.jsonl: loss on the left, HellaSwag accuracy on the right.

    python plot.py                                            # out/log.jsonl -> plot.png
    python plot.py --logs=out-a/log.jsonl,out-b/log.jsonl --out=compare.png

train.py writes one JSON object per line with the keys iter, loss (train loss of that step), train_loss
and val_loss (estimate_loss at an eval), hellaswag (acc_norm), lr, grad_norm, tokens_per_sec, mfu and
time, null when not measured in that record. The train curve is `loss` (or `train_loss` for a log that
has no per-step losses). The reference lines are OpenAI's GPT-2 124M and GPT-3 paper's 124M model.
"""

import json
import math
import os

from configurator import configure, fail, read_text, writable_file

# -----------------------------------------------------------------------------
logs = 'out/log.jsonl'  # comma-separated list of log.jsonl files, one curve each
out = 'plot.png'  # the PNG to write
gpt2_hellaswag = 0.2955  # HellaSwag acc_norm of OpenAI GPT-2 124M
gpt3_hellaswag = 0.337  # HellaSwag acc_norm of GPT-3 124M (Brown et al. 2020)
gpt2_val_loss = None  # a reference line for the val loss panel, if set (e.g. GPT-2 124M on your val set)
references = True  # draw the reference lines
# -----------------------------------------------------------------------------
configure(globals())

paths = [p.strip() for p in logs.split(',')]
if not any(paths):
    fail("no logs given; use --logs=out/log.jsonl[,other/log.jsonl]")
if '' in paths:
    fail(f"--logs={logs} has an empty entry (entry {paths.index('') + 1}); separate the log files with single commas")
if len({os.path.abspath(p) for p in paths}) < len(paths):
    fail(f"--logs={logs} names the same log twice; give each run's log.jsonl once")
for name, v, ok, want in (('gpt2_hellaswag', gpt2_hellaswag, lambda v: 0 <= v <= 1, 'an accuracy in [0, 1]'),
                          ('gpt3_hellaswag', gpt3_hellaswag, lambda v: 0 <= v <= 1, 'an accuracy in [0, 1]'),
                          ('gpt2_val_loss', gpt2_val_loss, lambda v: 0 < v < math.inf, 'a positive loss')):
    if v is not None and (type(v) not in (int, float) or not ok(v)):
        fail(f"--{name} must be {want} or None, got {v!r}")
writable_file(out, '--out')
if not out.lower().endswith('.png'):
    fail(f"--out={out} must be a .png file; e.g. --out=plot.png")


def read_log(path):
    """the records of one log.jsonl; a last line cut short (a run still writing) is skipped"""
    if not os.path.lexists(path):
        fail(f"no log at {path}; train with logging on, or point --logs at a run's log.jsonl")
    raw = read_text(path, '--logs').split('\n')
    lines = [(i, line) for i, line in enumerate(raw, 1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or type(rec.get('iter')) is not int:
                raise ValueError('no integer iter')
        except ValueError as e:
            if k == len(lines) - 1 and lineno == len(raw):  # no newline after it yet
                continue
            fail(f"{path}:{lineno} is not a log record ({str(e)[:80]})")
        records.append(rec)
    if not records:
        fail(f"{path} is empty: no records logged yet")
    if not any(key in r for r in records for key in ('loss', 'train_loss', 'val_loss', 'hellaswag')):
        fail(f"{path} has no record with a loss, train_loss, val_loss or hellaswag key; "
             f"is it a log.jsonl written by train.py?")
    return records


def series(records, key):
    """(iters, values) of the records where key was measured"""
    pts = [(r['iter'], r[key]) for r in records
           if type(r.get(key)) in (int, float) and math.isfinite(r[key])]  # type(): a bool is an int, not a value
    return [p[0] for p in pts], [p[1] for p in pts]


def label(path):
    """a curve's name: the run directory, or the whole path when that is ambiguous"""
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    same = [p for p in paths if os.path.basename(os.path.dirname(os.path.abspath(p))) == run]
    return run if len(same) == 1 else path


def best(xs, ys, pick):
    """'value (iter n)' of the min / max point, or n/a"""
    if not ys:
        return 'n/a'
    i = ys.index(pick(ys))
    return f"{ys[i]:.4f} (iter {xs[i]})"


runs = [(path, read_log(path)) for path in paths]

try:
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt
except ImportError:
    fail("plot.py needs matplotlib: pip install matplotlib")

fig, (ax_loss, ax_hs) = plt.subplots(1, 2, figsize=(14, 5))
any_loss = any_hs = False
for k, (path, records) in enumerate(runs):
    color = f"C{k % 10}"
    train = series(records, 'loss')
    if not train[0]:
        train = series(records, 'train_loss')
    val = series(records, 'val_loss')
    hs = series(records, 'hellaswag')
    name = label(path)
    if train[0]:
        ax_loss.plot(*train, color=color, alpha=0.5, lw=1, label=f"{name} train")
    if val[0]:
        ax_loss.plot(*val, color=color, lw=2, marker='o', ms=3, label=f"{name} val")
    if hs[0]:
        ax_hs.plot(*hs, color=color, lw=2, marker='o', ms=3, label=name)
    any_loss = any_loss or bool(train[0] or val[0])
    any_hs = any_hs or bool(hs[0])
    print(f"{path}: min train loss {best(*train, min)}, min val loss {best(*val, min)}, "
          f"max HellaSwag {best(*hs, max)}")

if references and gpt2_val_loss is not None:
    ax_loss.axhline(gpt2_val_loss, color='gray', ls='--', lw=1, label=f"GPT-2 124M val ({gpt2_val_loss:.4g})")
if references and gpt2_hellaswag is not None:
    ax_hs.axhline(gpt2_hellaswag, color='red', ls='--', lw=1, label=f"GPT-2 124M ({gpt2_hellaswag:.4g})")
if references and gpt3_hellaswag is not None:
    ax_hs.axhline(gpt3_hellaswag, color='green', ls='--', lw=1, label=f"GPT-3 124M ({gpt3_hellaswag:.4g})")
for ax, title, ylabel, has_points, empty in (
        (ax_loss, 'loss', 'cross-entropy', any_loss, 'no losses in these logs'),
        (ax_hs, 'HellaSwag', 'acc_norm', any_hs, 'no HellaSwag evaluations in these logs')):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not has_points:
        ax.text(0.5, 0.5, empty, ha='center', va='center', transform=ax.transAxes, color='gray')
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
fig.tight_layout()

# write next to the target, then rename: a reader never sees half a PNG
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
tmp = f"{out}.tmp.{os.getpid()}"
try:
    fig.savefig(tmp, format='png', dpi=100)
    os.replace(tmp, out)
except OSError as e:
    if os.path.exists(tmp):
        os.remove(tmp)
    fail(f"could not write {out}: {e}")
print(f"wrote {out}")
