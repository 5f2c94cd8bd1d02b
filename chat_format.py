"""
The one chat format, written down once: data/chat/prepare.py renders conversations with it, train.py reads the
files it makes, chat.py renders the history with it, and export.py writes it as the tokenizer's Jinja
`chat_template` (so transformers' apply_chat_template gives the very same tokens; tests/test_chat.py checks).

GPT-2's vocabulary has no special token but <|endoftext|>, so the template is plain text with <|endoftext|> closing
every turn:

    System: You are terse.<|endoftext|>User: What is 2+2?<|endoftext|>Assistant: 4<|endoftext|>

A reply is asked for by ending with "Assistant:"; the model answers " 4<|endoftext|>". Only the assistant's words and
the <|endoftext|> that closes them are trained on (the mask). Each turn is one piece between <|endoftext|>s, and the
role's "Name:" always ends a BPE pre-token, so tokenizing a turn whole (as transformers does) or name and words
apart (to find the mask) gives the same tokens.

A char-level chat dataset (tokenizer=char) numbers its characters as data/shakespeare_char does and adds
'<|endoftext|>' as one more token at the end of the vocabulary (meta.json's itos).

On disk (data/<name>/, written whole or not at all): train.bin / val.bin (uint16 tokens, conversations one after
another), <split>.mask.bin (uint8, 1 where the token is a target), <split>.convs.bin (int64, where each conversation
starts), chat.json (this format's name, the tokenizer, counts).
"""

import json
import os

import numpy as np
import torch

from configurator import fail

FORMAT = 'gpt2-plain-v1'  # bump when the template changes: chat.json and checkpoints carry it
EOT = '<|endoftext|>'
ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}
# the same template for transformers (tokenizer_config.json's chat_template)
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
                 "<|endoftext|>{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def problem(messages):
    """what is wrong with a conversation ('' if nothing): a list of {'role', 'content'} with an assistant turn"""
    if not isinstance(messages, list) or not messages:
        return "it has no messages (want a list of {\"role\": ..., \"content\": ...})"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or 'role' not in m or m['role'] is None:
            return f"message {i} has no role"
        if m['role'] not in ROLES:
            return f"message {i} has the unknown role {m['role']!r} (roles: {', '.join(ROLES)})"
        if not isinstance(m.get('content'), str):
            return f"message {i} has content that is not a string ({type(m.get('content')).__name__})"
        if EOT in m['content']:
            return f"message {i} contains {EOT}, which this format uses to end a turn"
    if not any(m['role'] == 'assistant' for m in messages):
        return "it has no assistant turn (nothing to learn from)"
    return ''


def render(messages, encode, eot, reply=False):
    """a conversation -> (ids, mask): the tokens of the template, and 1 for each token that is trained on (the
    assistant's words and their <|endoftext|>). reply=True ends with "Assistant:" for the model to answer.
    encode: text -> ids without special tokens; eot: the id of <|endoftext|>."""
    ids, mask = [], []
    for m in messages:
        name = encode(ROLES[m['role']] + ':')
        turn = encode(f"{ROLES[m['role']]}: {m['content']}")
        assert turn[:len(name)] == name, "a role name must end a pre-token"
        learn = int(m['role'] == 'assistant')
        ids += turn + [eot]
        mask += [0] * len(name) + [learn] * (len(turn) - len(name) + 1)
    if reply:
        name = encode('Assistant:')
        ids, mask = ids + name, mask + [0] * len(name)
    return ids, mask


def tokenizer(meta):
    """(encode, token_bytes, eot) for a model: GPT-2's BPE when meta is None, else its char vocabulary (eot None
    when that vocabulary has no <|endoftext|>: not a chat vocabulary)"""
    if meta is None:
        from dataprep import gpt2_encoding
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode_single_token_bytes, enc.eot_token
    itos = meta['itos']
    stoi = {c: i for i, c in enumerate(itos) if len(c) == 1}

    def encode(text):
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise ValueError(f"characters outside this model's vocabulary: {''.join(unknown)!r}")
        return [stoi[c] for c in text]
    return encode, lambda i: itos[i].encode('utf-8'), itos.index(EOT) if EOT in itos else None


def open_dataset(data_dir, splits, block_size):
    """A chat dataset's targets and windows, or None when data_dir holds plain text. Each window starts at a
    conversation's first token, so no answer is ever seen without its question; a conversation longer than the block
    is trained on its first block_size tokens, and one with no answer in its first block (or starting in the last
    block of its file, where no full window fits) is skipped. Returns ({split: {'starts', 'mask'}}, chat.json, a line
    of counts to print)."""
    path = os.path.join(data_dir, 'chat.json')
    if not os.path.exists(path):
        return None, None, ''
    fix = "re-run data/chat/prepare.py"
    try:
        info = json.load(open(path, encoding='utf-8'))
        assert isinstance(info, dict) and isinstance(info.get('format'), str)
    except (ValueError, AssertionError) as e:
        fail(f"{path} is damaged ({str(e)[:80] or 'not a record'}); {fix}")
    if info['format'] != FORMAT:
        fail(f"{data_dir} holds chat data in format {info['format']!r}, this repo reads {FORMAT!r}; {fix}")
    out, notes = {}, []
    for split, tokens in splits.items():
        mask_path, convs_path = (os.path.join(data_dir, f'{split}.{k}.bin') for k in ('mask', 'convs'))
        if not (os.path.isfile(mask_path) and os.path.isfile(convs_path)):
            fail(f"{data_dir} has chat.json but no {os.path.basename(mask_path)} / {os.path.basename(convs_path)}; {fix}")
        mask = np.memmap(mask_path, dtype=np.uint8, mode='r')
        starts = np.fromfile(convs_path, dtype=np.int64)
        if len(mask) != len(tokens) or not len(starts) or starts[0] != 0 or np.any(np.diff(starts) <= 0) \
                or starts[-1] >= len(tokens):
            fail(f"{data_dir}: {split}.bin, {split}.mask.bin and {split}.convs.bin do not belong together; {fix}")
        ends = np.append(starts[1:], len(tokens))
        targets = np.flatnonzero(mask)
        first = targets[np.minimum(np.searchsorted(targets, starts), len(targets) - 1)] if len(targets) else starts
        ok = (first >= starts) & (first < ends) & (first <= starts + block_size) & (starts + block_size < len(tokens))
        long = int(((ends - starts) > block_size + 1).sum())
        notes.append(f"{split} {len(starts):,} conversations" +
                     (f", {long:,} longer than block_size {block_size} (trained on their first block)" if long else '') +
                     (f", {int((~ok).sum()):,} skipped (no answer in their first block, or too near the end of the "
                      f"file for a whole window)" if (~ok).any() else ''))
        if not ok.any():
            fail(f"{split}.bin in {data_dir}: no conversation has an answer within its first block of {block_size} "
                 f"tokens and room for a whole window; use a larger --block_size or more conversations")
        out[split] = {'starts': torch.from_numpy(starts[ok]), 'mask': mask}
    return out, info, f"chat data ({FORMAT}): " + '; '.join(notes)


def mask_targets(y, mask, offsets, block_size):
    """targets outside the mask become -1 (ignored by the loss): the window at each offset predicts tokens
    offset + 1 .. offset + block_size"""
    keep = mask[offsets.numpy()[:, None] + 1 + np.arange(block_size)].astype(bool)
    return y.masked_fill(~torch.from_numpy(keep).to(y.device), -1)
