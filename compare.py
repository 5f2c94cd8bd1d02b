"""
Score training variants against a baseline, honestly: variants x seeds, each one real `python train.py` run, every
loss the whole validation set (--eval_full=True), and a table of mean, standard error, difference to the baseline and
its p-value (Welch's t-test), at equal steps and at equal wall time, written to a doc this script owns:

    python compare.py --variants="baseline:;rope:--pos_emb=rope;muon:--optimizer=muon" --seeds="(1337, 1)"
    python compare.py --variants="SM:;GK:--attn_type=GK" --doc=docs/ATTENTION_RUNS.md

variants: 'name:flags;name:flags;...', the first is the baseline; flags are train.py flags (or config files of this
repo, like config/modern.py) added to `recipe` and `common` (later flags win). Runs go one at a time (they would only fight over the cores), seed by seed, into
out_prefix + name + '-s' + seed. A run that finished with the same command is kept, so an interrupted comparison
continues where it stopped; a run dir holding anything else is refused unless --overwrite=True (passed on to train.py).
Equal wall time needs each variant's time per step: by default measured after training by a short run of
`time_steps` steps per variant (train.py's own dt, which leaves out evals and the first step), holding `time_lock`
(a file to flock, e.g. /work/.cpu.lock on a shared machine) so that nothing else runs meanwhile; kept in
out_prefix's compare_timing.json, so a variant is timed once.
"""

import datetime
import fcntl
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

from configurator import configure, fail, writable_dir, writable_file
from files import why, write_files

# -----------------------------------------------------------------------------
recipe = 'config/train_shakespeare_char.py'  # the train.py config file every run starts from
# the README CPU recipe (nanoGPT's baby GPT at lr 2e-3), added to the recipe for every run
common = ('--device=cpu --compile=False --eval_iters=20 --log_interval=10 --block_size=64 --batch_size=12 --n_layer=4 '
          '--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --learning_rate=2e-3 '
          '--min_lr=2e-4')
variants = 'baseline:;rope:--pos_emb=rope'  # 'name:flags;...'; the first is the baseline
seeds = (1337, 1)
out_prefix = 'out-compare/'  # run dir of variant X, seed S: out_prefix + 'X-sS'
data_dir = ''  # passed to every run when set
doc = 'docs/COMPARE.md'  # the report; only a file this script wrote is replaced (unless --overwrite=True)
overwrite = False  # retrain run dirs that hold another or an unfinished run; replace a doc compare.py did not write
time_steps = 50  # steps of each variant's timing run (0: time per step from the training runs' own logs instead)
time_lock = ''  # a file to flock during the timing runs, so that nothing else runs meanwhile
report_iters = ()  # steps of the equal-steps table; () = the baseline's last eval and those nearest 1/4 and 1/2 of it
# -----------------------------------------------------------------------------
configure(globals())

REPO = os.path.dirname(os.path.abspath(__file__))
MARK = '<!-- written by compare.py: it replaces this file when run again -->'
OWNED = ('seed', 'out_dir', 'eval_full', 'overwrite', 'init_from')  # flags compare.py sets itself


def train_keys():
    """train.py's settings, read from its source (its globals above the configurator call)"""
    src = open(os.path.join(REPO, 'train.py')).read().split('config_keys =')[0]
    return set(re.findall(r'^([a-z_][a-z0-9_]*) = ', src, re.M))


def parse_flags(text, where):
    try:
        flags = shlex.split(text)
    except ValueError as e:
        fail(f"{where}: {e}")
    keys = train_keys()
    flags = [os.path.join(REPO, f) if f.endswith('.py') and not f.startswith('--') else f for f in flags]
    for f in flags:
        key = f[2:].split('=', 1)[0]
        if f.endswith('.py') and not f.startswith('--'):  # a config file stacked on the recipe (config/modern.py)
            if not os.path.isfile(f):
                fail(f"{where}: no config file {os.path.relpath(f, REPO)} in {REPO}")
            continue
        if not f.startswith('--') or '=' not in f:
            fail(f"{where}: {f!r} is neither a --key=value flag nor a config file")
        if key not in keys:
            fail(f"{where}: train.py has no setting '{key}'")
        if key in OWNED:
            fail(f"{where}: --{key} is set by compare.py itself for every run; leave it out")
    return flags


# every setting is checked here, so that a mistake costs seconds, not the hours of training before it shows
entries = [v.strip() for v in variants.split(';')]
if not variants.strip() or '' in entries:
    fail(f"--variants={variants!r} has an empty entry; give 'name:flags;name:flags', e.g. 'baseline:;rope:--pos_emb=rope'")
runs_of = {}  # name -> its train.py flags
for e in entries:
    name, sep, flags = e.partition(':')
    name = name.strip()
    if not sep or not re.fullmatch(r'[A-Za-z0-9_.+-]+', name):
        fail(f"--variants entry {e!r} needs a name of letters, digits, _ . + - and a colon before its flags, "
             f"e.g. 'rope:--pos_emb=rope'")
    if name in runs_of:
        fail(f"--variants names {name!r} twice; give each variant once")
    runs_of[name] = parse_flags(flags, f"variant {name!r}")
common_flags = parse_flags(common, '--common')
names, base = list(runs_of), next(iter(runs_of))
if not isinstance(seeds, tuple) or not seeds or any(type(s) is not int or not 0 <= s < 2**31 for s in seeds) \
        or len(set(seeds)) < len(seeds):
    fail(f"--seeds must be a tuple of distinct integers in [0, 2**31), like (1337, 1), got {seeds!r}")
if not os.path.isfile(recipe) and not os.path.isfile(os.path.join(REPO, recipe)):
    fail(f"--recipe={recipe}: no such config file")
recipe_path = os.path.abspath(recipe if os.path.isfile(recipe) else os.path.join(REPO, recipe))
if type(time_steps) is not int or time_steps < 0 or 0 < time_steps < 3:
    fail(f"--time_steps must be 0 (time from the runs' logs) or at least 3, got {time_steps!r}")
if time_lock and not os.path.isfile(time_lock):
    fail(f"--time_lock={time_lock} is not a file; give an existing lock file (e.g. /work/.cpu.lock) or leave it empty")
if not isinstance(report_iters, tuple) or any(type(i) is not int or i < 0 for i in report_iters):
    fail(f"--report_iters must be a tuple of steps like (500, 2000), got {report_iters!r}")
if not out_prefix:
    fail("--out_prefix is empty; runs would land in ./baseline-s1337, ...: give e.g. --out_prefix=out-compare/")
writable_file(doc, '--doc')
if os.path.exists(doc) and not overwrite:
    with open(doc, encoding='utf-8', errors='replace') as f:
        if f.readline().strip() != MARK:
            fail(f"--doc={doc} exists and was not written by compare.py; choose another --doc, or replace it with "
                 f"--overwrite=True")


def run_dir(name, seed):
    return f"{out_prefix}{name}-s{seed}"


def command(name, seed, flags=None):
    """the train.py command of one run (what a finished run's compare.json must match)"""
    data = [f'--data_dir={os.path.abspath(data_dir)}'] if data_dir else []
    return ['train.py', recipe_path, *common_flags, *(runs_of[name] if flags is None else flags), *data,
            f'--seed={seed}', '--eval_full=True', f'--out_dir={run_dir(name, seed)}']


def finished(name, seed):
    try:
        with open(os.path.join(run_dir(name, seed), 'compare.json')) as f:
            return json.load(f).get('command') == command(name, seed)
    except (OSError, ValueError, AttributeError):
        return False


todo = []  # seed by seed: an interrupted comparison still has every variant at its first seeds
for seed in seeds:
    for name in names:
        d = run_dir(name, seed)
        writable_dir(d, '--out_prefix')
        if finished(name, seed):
            continue
        if os.path.isdir(d) and os.listdir(d) and not overwrite:
            fail(f"{d} holds another or an unfinished run; remove it, choose another --out_prefix, or retrain it "
                 f"with --overwrite=True")
        todo.append((name, seed))


def train(args, where):
    """one train.py run; its output streams through, its last stderr line is the error when it fails"""
    p = subprocess.Popen([sys.executable, os.path.join(REPO, args[0]), *args[1:]], stderr=subprocess.PIPE, text=True)
    err = [line for line in p.stderr if not sys.stderr.write(line)]
    if p.wait() != 0:
        last = next((l.strip() for l in reversed(err) if l.strip()), f'exit status {p.returncode}')
        fail(f"the {where} run failed: {last.removeprefix('error: ')}")


# -- the runs, one at a time --------------------------------------------------------------------
done = len(names) * len(seeds) - len(todo)
if done:
    print(f"{done} run(s) already finished with the same command: kept")
for i, (name, seed) in enumerate(todo):
    args = command(name, seed) + (['--overwrite=True'] if overwrite else [])
    print(f"[{i + 1}/{len(todo)}] {name}, seed {seed}: python {shlex.join(args)}", flush=True)
    marker = os.path.join(run_dir(name, seed), 'compare.json')
    if os.path.exists(marker):
        os.remove(marker)  # a run being replaced is no longer the finished one
    train(args, f"{name} (seed {seed})")
    try:
        write_files(run_dir(name, seed), {'compare.json': json.dumps({'command': command(name, seed)}).encode()})
    except OSError as e:
        fail(str(e))


def read_log(name, seed):
    records = []
    for line in open(os.path.join(run_dir(name, seed), 'log.jsonl'), encoding='utf-8', errors='replace'):
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in records if isinstance(r, dict)]


curves = {n: [{r['iter']: r['val_loss'] for r in read_log(n, s) if r.get('val_loss') is not None} for s in seeds]
          for n in names}  # whole-val loss at each eval step, per seed


# -- time per step ------------------------------------------------------------------------------
def timing_args(name):
    return ['train.py', recipe_path, *common_flags, *runs_of[name],
            *([f'--data_dir={os.path.abspath(data_dir)}'] if data_dir else []), f'--max_iters={time_steps}',
            f'--eval_interval={time_steps}', '--eval_iters=1', '--log_interval=1', '--always_save_checkpoint=False']


def timing_run(name):
    """median ms per step of a short run of the variant (evals out of the way)"""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*timing_args(name), f'--out_dir={tmp}']
        p = subprocess.run([sys.executable, os.path.join(REPO, args[0]), *args[1:]], capture_output=True, text=True)
    if p.returncode:
        last = next((l for l in reversed(p.stderr.splitlines()) if l.strip()), f'exit status {p.returncode}')
        fail(f"the {name} timing run failed: {last.removeprefix('error: ')}")
    dts = [float(m) for m in re.findall(r'\| dt ([0-9.]+)ms', p.stdout)]
    return statistics.median(dts)


def logged_ms(name):
    """median ms per step over the training runs' own log lines (noisy on a shared machine)"""
    tokens = tokens_per_step(name)
    return statistics.median(1000 * tokens / r['tokens_per_sec'] for s in seeds for r in read_log(name, s)
                             if r.get('tokens_per_sec'))


def tokens_per_step(name):
    import torch  # only here: the checkpoint's config holds the resolved batch shape
    ck = torch.load(os.path.join(run_dir(name, seeds[0]), 'ckpt.pt'), map_location='cpu', weights_only=True)
    c = ck['config']
    return c['gradient_accumulation_steps'] * c['batch_size'] * c['block_size']


timing_file = os.path.join(os.path.dirname(out_prefix + 'x'), 'compare_timing.json')  # ms/step by command, kept
if time_steps:
    try:
        with open(timing_file) as f:
            known = dict(json.load(f))
    except (OSError, ValueError, TypeError):
        known = {}
    ms = {name: known[json.dumps(timing_args(name))] for name in names if json.dumps(timing_args(name)) in known}
    if len(ms) < len(names):
        lock = open(time_lock) if time_lock else None
        if lock:
            print(f"timing: waiting for {time_lock}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            if name not in ms:
                print(f"timing {name}: {time_steps} steps", flush=True)
                ms[name] = known[json.dumps(timing_args(name))] = timing_run(name)
        if lock:
            lock.close()
        try:
            write_files(os.path.dirname(timing_file) or '.', {os.path.basename(timing_file): json.dumps(known).encode()})
        except OSError as e:
            fail(str(e))
    timing = (f"ms/step: median of train.py's dt over a separate {time_steps}-step run of each variant, one after "
              f"another{', holding ' + time_lock if time_lock else ''} (evals and the first step are not timed)")
else:
    ms = {name: logged_ms(name) for name in names}
    timing = "ms/step: median over the training runs' own log lines (includes whatever else ran on the machine)"


# -- statistics -------------------------------------------------------------------------------------
def betainc(a, b, x):
    """the regularised incomplete beta function I_x(a, b) (a continued fraction, as in Numerical Recipes 6.4)"""
    if x <= 0 or x >= 1:
        return max(0.0, min(1.0, x))
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this: use the symmetry
        return 1.0 - betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a


def welch_p(x, y):
    """two-sided p-value of Welch's t-test (unequal variances) that x and y have the same mean; None if n < 2"""
    if len(x) < 2 or len(y) < 2:
        return None
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    diff = statistics.fmean(x) - statistics.fmean(y)
    if vx + vy == 0:
        return 1.0 if diff == 0 else 0.0
    t2 = diff * diff / (vx + vy)
    df = (vx + vy) ** 2 / (vx * vx / (len(x) - 1) + vy * vy / (len(y) - 1))
    return betainc(df / 2, 0.5, df / (df + t2))


def stats(xs):
    """'1.8150 ± 0.0021' (mean ± standard error; a single seed has no error)"""
    if not xs:
        return '-'
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None
    return f"{statistics.fmean(xs):.4f}" + (f" ± {se:.4f}" if se is not None else '')


def versus(xs, ys):
    """difference of means to the baseline and its p-value"""
    if not xs or not ys:
        return '-', '-'
    p = welch_p(xs, ys)
    return f"{statistics.fmean(xs) - statistics.fmean(ys):+.4f}", '-' if p is None else f"{p:.2g}"


def at(name, step):
    return [c[step] for c in curves[name] if step in c]


def at_most(name, step):
    """per seed: the last eval at or before step (a run that ended earlier gives its final loss), and that step"""
    picks = [max((i for i in c if i <= step), default=None) for c in curves[name]]
    return [c[i] for c, i in zip(curves[name], picks) if i is not None], max((i for i in picks if i is not None),
                                                                          default=None)


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


# -- the tables -------------------------------------------------------------------------------------
base_evals = sorted(set.intersection(*(set(c) for c in curves[base])))
if not base_evals:
    fail(f"the {base} runs logged no val loss; check their log.jsonl")
last = base_evals[-1]
steps = report_iters or tuple(sorted({max((i for i in base_evals if i <= last * f), default=last)
                                      for f in (0.25, 0.5)} | {last} - {0}))
equal_steps = table(['variant', *(f"val loss @ {s}" for s in steps), f"vs {base} @ {steps[-1]}", 'p'],
                    [[n, *(stats(at(n, s)) for s in steps),
                      *(versus(at(n, steps[-1]), at(base, steps[-1])) if n != base else ('-', '-'))]
                     for n in names])
budget = ms[base] * last  # the baseline's training time, evals left out
target = statistics.fmean(at(base, last))
rows = []
for n in names:
    losses, step = at_most(n, budget / ms[n])
    reach = next((i for i in sorted(set.intersection(*(set(c) for c in curves[n])))
                  if statistics.fmean(at(n, i)) <= target), None)
    final = max(set.intersection(*(set(c) for c in curves[n])))
    rows.append([n, f"{ms[n]:.1f}", f"{final * ms[n] / budget:.0%}", step if step is not None else '-',
                 stats(losses), *(versus(losses, at(base, last)) if n != base else ('-', '-')),
                 f"{reach} ({reach * ms[n] / budget:.0%})" if reach is not None else 'not reached'])
equal_time = table(['variant', 'ms/step', 'run time (vs baseline)', f"step at {base}'s time", 'val loss there',
                    f"vs {base} @ {last}", 'p', f"first eval <= {target:.4f} (time vs baseline)"], rows)

cpu = platform.processor() or platform.machine()
if os.path.isfile('/proc/cpuinfo'):  # Linux names the CPU model only here
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), cpu)
machine = f"{cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}, {platform.system()}"
report = f"""{MARK}
# {', '.join(names)}: {len(seeds)} seed(s) each

Generated by `{shlex.join(['python', 'compare.py', *sys.argv[1:]])}` on {datetime.date.today().isoformat()}.
Machine: {machine}.

Each run (in order; later flags win): `python {shlex.join(command('VARIANT', 'SEED', ['FLAGS'])).replace(REPO + os.sep, '')}`
with FLAGS:

{chr(10).join(f"- {n}: `{shlex.join(runs_of[n]).replace(REPO + os.sep, '') or '(none: the recipe)'}`" for n in names)}

Seeds {', '.join(map(str, seeds))}. Every loss is over the whole validation set (eval_full). Mean ± standard error over
seeds; p: Welch's t-test against {base} (two-sided; '-' with one seed).

## At equal steps

{equal_steps}

## At equal wall time

{timing}. The baseline's {last} steps take {budget / 1000:.1f} s at its rate; each variant is scored at the last eval
it reaches within that time (rounded down to an eval step: never in the variant's favour). The last column: the
first eval at which the variant's mean loss is at or below the baseline's final mean, and its time then.

{equal_time}
"""
try:
    write_files(os.path.dirname(os.path.abspath(doc)), {os.path.basename(doc): report.encode()})
except OSError as e:
    fail(str(e))
print(f"\n{equal_steps}\n\n{equal_time}\n\nwrote {doc}")
