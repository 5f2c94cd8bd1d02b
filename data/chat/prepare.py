"""
Conversations for chat fine-tuning (SFT): JSON lines or parquet rows of {"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]} (the form Hugging Face chat datasets use), or a Hub dataset, become
data/NAME/ in the chat format of chat_format.py: the tokens, and a mask of what is trained on (the assistant's
words and the <|endoftext|> that ends them).

    python data/chat/prepare.py --input='chats/*.jsonl' --name=mychat
    python data/chat/prepare.py --dataset=HuggingFaceH4/no_robots --name=no_robots     # where the network allows
    python train.py --dataset=mychat --init_from=gpt2-medium --lora_rank=16 ...        # see the README

--tokenizer=gpt2 (default) for GPT-2 models; --tokenizer=char numbers the characters of the rendered conversations
and adds <|endoftext|> as one more token (small models trained from scratch, as the tests do). val_fraction of the
conversations, chosen at random (at least one), go to val. Every conversation is checked before anything is written
(roles, string contents, an assistant turn); the first bad one stops the run naming its file and number. The
dataset is written whole or not at all, and replaces another only with --overwrite=True.
"""

import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import chat_format
import dataprep
import files
from configurator import configure, writable_dir
from dataprep import fail

input = ''  # a .jsonl / .json / .parquet file, or a glob in quotes: --input='chats/*.jsonl'
dataset = ''  # or a Hugging Face Hub dataset name (its 'train' split)
subset = ''  # the Hub dataset's subset (configuration) name, if it has several
name = ''  # the dataset's name: writes data/NAME/, for train.py --dataset=NAME
messages_column = 'messages'  # the column holding each conversation's list of messages
tokenizer = 'gpt2'  # 'gpt2' (GPT-2's BPE) or 'char' (one id per character, plus <|endoftext|>)
val_fraction = 0.1  # the share of conversations held out for val
overwrite = False  # replace the dataset already in data/NAME
out_dir = ''  # write here instead of data/NAME (then --name is not needed)
configure(globals())

SEED = 2357  # which conversations go to val: the same every run
if bool(input) == bool(dataset):
    fail("give exactly one of --input=FILE_OR_GLOB (local .jsonl / .parquet) and --dataset=HUB_NAME")
if not (name or out_dir):
    fail("--name is empty; name the dataset (it is written to data/NAME), or give --out_dir")
if tokenizer not in ('gpt2', 'char'):
    fail(f"unknown tokenizer '{tokenizer}'; use gpt2 or char")
if not 0 < val_fraction < 1:
    fail(f"val_fraction must be in (0, 1), got {val_fraction}")
out = out_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
writable_dir(out, '--out_dir' if out_dir else '--name')
dataprep.check_overwrite(out, overwrite, '--name')


def diagnose(path):
    """datasets could not read a local JSON file: find the line that is not a JSON record, in one line"""
    with open(path, encoding='utf-8', errors='replace') as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    fail(f"{path} line {i} is not JSON ({e}); want JSON lines, one conversation per line")
                if not isinstance(row, dict):
                    fail(f"{path} line {i} is a JSON {type(row).__name__}, not a record with '{messages_column}'")
                if why := chat_format.problem(row.get(messages_column)):
                    fail(f"{path} line {i}: {why}")


def conversations(source):
    """(where, messages) of every row of a local file or Hub dataset, read with datasets"""
    if os.path.isfile(source) and os.path.getsize(source) == 0:
        fail(f"{source} is empty; it should hold one conversation per line")
    local_json = os.path.isfile(source) and source.lower().endswith(('.json', '.jsonl'))
    try:
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        if local_json:
            rows = datasets.load_dataset('json', data_files=source, split='train')
        else:
            rows = dataprep.load_docs(source, subset or None)
    except Exception as e:
        if local_json:
            diagnose(source)  # names the bad line, or passes if every line is a good conversation
        fail(dataprep.unreadable(source, e))
    if messages_column not in rows.column_names:
        fail(f"{source} has no '{messages_column}' column (its columns: {', '.join(rows.column_names) or 'none'}); "
             f"chat data holds a list of messages per row (plain text goes through data/text/prepare.py), or name "
             f"the column with --messages_column=")
    if len(rows) == 0:
        fail(f"{source} holds no conversations")
    for i, row in enumerate(rows, 1):
        yield f"{source} row {i}", row[messages_column]


if dataset:
    sources = [dataset]
else:
    path = os.path.expanduser(input)
    sources = [path] if os.path.isfile(path) else sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not sources:
        fail(f"--input={input}: no such file, and no file matches it")

convs = []
for source in sources:
    for where, messages in conversations(source):
        if why := chat_format.problem(messages):
            fail(f"{where}: {why}")
        convs.append([{'role': m['role'], 'content': m['content']} for m in messages])
if len(convs) < 2:
    fail(f"only {len(convs)} conversation: at least two are needed (one for train, one for val)")

if tokenizer == 'gpt2':
    enc = dataprep.gpt2_encoding()
    encode, eot, meta = enc.encode_ordinary, enc.eot_token, None
else:  # the characters of the rendered text (role names included), and <|endoftext|> as the last id
    chars = set()
    for messages in convs:
        for m in messages:
            chars.update(f"{chat_format.ROLES[m['role']]}: {m['content']}")
    itos = sorted(chars) + [chat_format.EOT]
    if len(itos) > 65536:
        fail(f"{len(itos):,} distinct characters do not fit uint16 ids; use --tokenizer=gpt2")
    stoi = {c: i for i, c in enumerate(itos[:-1])}
    encode, eot, meta = (lambda s: [stoi[c] for c in s]), len(itos) - 1, {'vocab_size': len(itos), 'itos': itos}

rng = np.random.default_rng(SEED)
val = set(rng.choice(len(convs), max(1, round(len(convs) * val_fraction)), replace=False).tolist())
contents, counts = {}, {}
for split, members in (('train', [c for i, c in enumerate(convs) if i not in val]),
                       ('val', [c for i, c in enumerate(convs) if i in val])):
    ids, mask, starts = [], [], []
    for messages in members:
        starts.append(len(ids))
        i, m = chat_format.render(messages, encode, eot)
        ids += i
        mask += m
    contents[f'{split}.bin'] = np.array(ids, dtype=np.uint16).tobytes()
    contents[f'{split}.mask.bin'] = np.array(mask, dtype=np.uint8).tobytes()
    contents[f'{split}.convs.bin'] = np.array(starts, dtype=np.int64).tobytes()
    counts[split] = {'conversations': len(members), 'tokens': len(ids), 'trained_tokens': int(sum(mask))}
contents['meta.json'] = json.dumps(meta, ensure_ascii=False).encode() if meta else None
contents['chat.json'] = json.dumps({'format': chat_format.FORMAT, 'tokenizer': tokenizer, 'splits': counts,
                                    'source': dataset or input}, indent=1).encode()
dataprep.claim(out)
dataprep.check_overwrite(out, overwrite, '--name')  # again, now that this process is the one writer
try:
    files.write_files(out, contents)
except OSError as e:
    fail(str(e))
for split, c in counts.items():
    print(f"{split}: {c['conversations']:,} conversations, {c['tokens']:,} tokens, {c['trained_tokens']:,} trained on")
print(f"wrote {out}: train with python train.py --dataset={name or out} (chat data: the loss is on the assistant's "
      f"words only)" if name else f"wrote {out}: train with python train.py --data_dir={out}")
