"""
Overrides a script's module-level globals from config files and --key=value flags:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
    python train.py eval_gpt2_xl          # a bare name means config/eval_gpt2_xl.py

Config files are plain Python, executed as your own code (never run one you did not write or read).
Flags are parsed with ast.literal_eval (never eval): numbers, booleans, None, quoted strings, tuples;
anything that is not a literal is taken as a string (--device=cpu). A key the script does not have,
or a value of the wrong type, stops the script with one line that names the key and the closest valid ones; so
does a number that is not finite (1e400 is inf, in a flag or a config file).
Used by train.py, sample.py, bench.py and the prepare/eval scripts:  configure(globals())
`sources` then says where each overridden value came from: its --key=value flag, or the config file's path
(train.py lets a checkpoint's shape win over a config file, but not over a flag the user typed).
"""

import ast
import difflib
import math
import os
import sys

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config')
sources = {}  # key -> the flag ('--n_layer=4') or config file path that last set it, filled by configure()


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def writable_dir(path, flag):
    """fail unless `path` is, or can be created as, a writable directory (nothing is created here)"""
    if not path:
        fail(f"{flag} is empty; give a directory, e.g. {flag}=out")
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        fail(f"{flag}={path} is a file, not a directory; choose another {flag}")
    while not os.path.exists(target):  # the folders that would be created must hang off a writable directory
        target = os.path.dirname(target)
    if not os.path.isdir(target) or not os.access(target, os.W_OK):
        fail(f"{flag}={path} cannot be created or written ({target} is not a writable directory); choose another {flag}")
    return path


def writable_file(path, flag):
    """fail unless a file can be written at `path` (its folder existing or creatable, and path not a directory)"""
    if not path:
        fail(f"{flag} is empty; give a file name")
    if os.path.isdir(path):
        fail(f"{flag}={path} is a directory; give a file name")
    writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    return path


def read_text(path, flag):
    """the whole of a UTF-8 text file; a missing file, a directory or bytes that are not UTF-8 fail in one line"""
    if os.path.isdir(path):
        fail(f"{flag}: {path} is a directory; give a text file")
    if not os.path.isfile(path):
        fail(f"{flag}: {path} does not exist")
    data = open(path, 'rb').read()
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        fail(f"{flag}: {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
             f"convert it, e.g. iconv -t utf-8")


def unused(keys, why):
    """say once (rank 0) which of keys, given as --key=value flags, have no effect in this run, and why"""
    given = [k for k in keys if any(a.startswith(f'--{k}=') for a in sys.argv[1:])]
    if given and os.environ.get('RANK', '0') == '0':
        print(f"note: {', '.join('--' + k for k in given)} {'has' if len(given) == 1 else 'have'} no effect {why}",
              file=sys.stderr)


def _check(key, value, defaults, source, optional=()):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the globals at the top of the script"
        fail(f"unknown config key '{key}' ({source}){hint}")
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
        fail(f"config key '{key}' is {value!r}, not a finite number ({source}); give a real value")
    want = defaults[key]
    if want is None:
        return value  # a None default (an optional limit, or 'auto') takes any literal
    if value is None:
        if key not in optional:
            fail(f"config key '{key}' cannot be None; it wants a {type(want).__name__} like {want!r} ({source})")
        return value
    if isinstance(want, float) and type(value) is int:
        if abs(value) >= 2 ** 1024:
            fail(f"config key '{key}' is {value}, too large for a float ({source}); give a real value")
        return float(value)  # --learning_rate=1 is fine for a float
    if type(value) is not type(want):
        fail(f"config key '{key}' wants a {type(want).__name__} like {want!r}, got {value!r} ({source})")
    return value


def configure(g, argv=None, optional=()):
    """Apply sys.argv[1:] (or argv) to the dict g (a script's globals()); returns the dict of overridden keys.
    A value must have its default's type; None only where the default is None or the key is in `optional`."""
    defaults = {k: v for k, v in g.items()
                if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))
                and not callable(v)}
    changed = {}
    sources.clear()
    for arg in (sys.argv[1:] if argv is None else argv):
        if not arg.startswith('--'):
            path = arg if os.path.exists(arg) else os.path.join(CONFIG_DIR, arg + ('' if arg.endswith('.py') else '.py'))
            if not os.path.isfile(path):
                fail(f"config file '{arg}' not found (looked at {arg} and {os.path.relpath(path)}); "
                     f"available: {', '.join(sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py')))}")
            scope = {'__file__': os.path.abspath(path)}  # as for any Python file: a config may build on another
            try:
                exec(compile(open(path).read(), path, 'exec'), scope)
            except Exception as e:
                fail(f"config file {path} failed: {type(e).__name__}: {e}")
            for k, v in scope.items():
                if k.startswith('_') or type(v).__name__ == 'module' or callable(v):
                    continue  # the file's own imports and helpers
                g[k] = changed[k] = _check(k, v, defaults, path, optional)
                sources[k] = arg if path == arg else os.path.join('config', os.path.basename(path))
        else:
            if '=' not in arg:
                fail(f"flag '{arg}' needs a value: --key=value")
            key, raw = arg[2:].split('=', 1)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word: take it as a string
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = raw  # --out_dir=123 or --init_from=gpt2 stay strings
            g[key] = changed[key] = _check(key, value, defaults, arg, optional)
            sources[key] = arg
    return changed
