"""hellaswag.py against a direct, one-example-at-a-time computation with a Hugging Face GPT-2."""
import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from conftest import TIKTOKEN_CACHE, run_script

import hellaswag
from model import GPT, GPTConfig
from runtime import save_atomic

N_POSITIONS = 64
LONG_CTX = ("The instructor keeps talking about the rules of the game while the players stretch, jog in place, "
            "tie their shoes and drink water from bottles lined up on the bench at the side of the court. ") * 2


def example(i, ctx_a, ctx_b, endings, label, activity='Playing volleyball', source='activitynet~v_test'):
    """one line in the format of hellaswag_val.jsonl (made-up text, real fields)"""
    return {'ind': 1000 + i, 'activity_label': activity, 'ctx_a': ctx_a, 'ctx_b': ctx_b,
            'ctx': (ctx_a + ' ' + ctx_b.capitalize()).strip(), 'split': 'val',
            'split_type': 'indomain' if i % 2 else 'zeroshot', 'label': label, 'endings': endings,
            'source_id': f'{source}{i:03d}'}


EXAMPLES = [
    example(0, "A man stands on a ladder next to a house.", "he",
            ["scrapes old paint off the window frame.", "swims across the lake.",
             "eats a sandwich in the kitchen of the boat.", "plays the drums loudly."], 0, 'Painting'),
    example(1, "Two girls sit at a table with bowls of flour and eggs.", "they",
            ["mix the ingredients together with a whisk.", "drive off in a red car.",
             "jump into the pool and start to swim laps.", "laugh."], 0, 'Baking cookies'),
    example(2, "A dog runs across a grassy field.", "the dog",
            ["reads a newspaper.", "catches a frisbee in its mouth and runs back to its owner.",
             "starts the lawn mower.", "sings"], 1, 'Playing frisbee with dog'),
    example(3, "[header] How to clean a cast iron pan [title] Let the pan cool.", "",
            ["[step] Rinse it under hot water and scrub with a brush.", "[step] Throw it in the ocean.",
             "[step] Paint it blue, then wait three weeks before you cook with it again.", "[step] Sell it."],
            0, 'Home and Garden', 'wikihow~'),
    example(4, "A woman is kneeling on a yoga mat in a bright room.", "she",
            ["bends forward and stretches her arms.", "opens the refrigerator.",
             "flies a kite over the mountains while the sun sets.", "is."], 0, 'Doing yoga'),
    example(5, LONG_CTX, "the coach",  # longer than n_positions: truncated from the left
            ["blows the whistle and the game begins.", "bakes a pie.",
             "writes a letter to the mayor about the state of the roads in the town.", "sleeps"], 0),
    example(6, "A boy holds a violin under his chin.", "he",
            ["draws the bow across the strings.", "throws the violin into the fire.",
             "waters the plants.", "runs a marathon in the rain without stopping."], 0, 'Playing violin'),
    example(7, "People are rowing a boat down a river.", "the boat",
            ["drifts into a calm pool near the bank.", "turns into a bird.",
             "passes under a bridge as they keep rowing.", "explodes"], 2, 'Rafting'),
]


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    """a tiny randomly initialised GPT-2 in Hugging Face format"""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # a wide init so the 4 endings get clearly different losses (near-uniform logits would make ties likely)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=N_POSITIONS, vocab_size=50257, initializer_range=0.1)
    d = str(tmp_path_factory.mktemp('hf'))
    GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    return d


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('hellaswag')
    with open(d / 'hellaswag_val.jsonl', 'w') as f:
        for ex in EXAMPLES:
            f.write(json.dumps(ex) + '\n')
    return str(d)


def direct_losses(hf_dir, examples):
    """(avg, sum) per example and ending: HF forward on one row at a time, cross-entropy by hand"""
    import tiktoken
    from transformers import GPT2LMHeadModel
    enc = tiktoken.get_encoding('r50k_base')
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    avg, tot = torch.zeros(len(examples), 4, dtype=torch.float64), torch.zeros(len(examples), 4, dtype=torch.float64)
    for i, ex in enumerate(examples):
        ctx = enc.encode(ex['ctx'])
        for j, ending in enumerate(ex['endings']):
            end = enc.encode(' ' + ending)
            row = (ctx + end)[-N_POSITIONS:]
            with torch.no_grad():
                logits = hf(torch.tensor([row])).logits[0]
            logp = F.log_softmax(logits.double(), dim=-1)
            nll = [-logp[t - 1, row[t]].item() for t in range(len(row) - len(end), len(row))]
            tot[i, j], avg[i, j] = sum(nll), sum(nll) / len(nll)
    return avg, tot


def test_matches_direct_hf_computation(hf_dir, data_dir, tiktoken_offline):
    examples = hellaswag.load_examples(data_dir=data_dir)
    assert len(examples) == len(EXAMPLES)
    assert len(hellaswag.encoder().encode(examples[5]['ctx'])) > N_POSITIONS  # the truncation path is exercised
    model = GPT.from_pretrained(hf_dir).eval()
    avg, tot = hellaswag.ending_losses(model, 'cpu', examples, batch_size=3)
    ref_avg, ref_tot = direct_losses(hf_dir, examples)
    assert torch.allclose(avg, ref_avg, atol=1e-5, rtol=0), (avg - ref_avg).abs().max()
    assert torch.allclose(tot, ref_tot, atol=1e-4, rtol=1e-6), (tot - ref_tot).abs().max()
    labels = torch.tensor([ex['label'] for ex in examples])
    chars = torch.tensor([[len(' ' + e) for e in ex['endings']] for ex in examples], dtype=torch.float64)
    want = {'acc_norm': (ref_avg.argmin(1) == labels).float().mean().item(),
            'acc': (ref_tot.argmin(1) == labels).float().mean().item(),
            'acc_char': ((ref_tot / chars).argmin(1) == labels).float().mean().item(), 'n': len(examples)}
    res = hellaswag.evaluate(model, 'cpu', examples, batch_size=3)
    assert res['n'] == want['n']
    for k in ('acc_norm', 'acc', 'acc_char'):  # acc_char: lm-evaluation-harness's normalisation, by characters
        assert res[k] == pytest.approx(want[k]), k
    assert not model.training  # ending_losses leaves the mode as it found it (eval here)


def test_batch_size_does_not_change_results(hf_dir, data_dir, tiktoken_offline):
    examples = hellaswag.load_examples(data_dir=data_dir)
    model = GPT.from_pretrained(hf_dir).train()  # evaluation must switch dropout off itself, and switch it back
    one = hellaswag.ending_losses(model, 'cpu', examples, batch_size=1)
    assert model.training
    for bs in (3, 8):
        many = hellaswag.ending_losses(model, 'cpu', examples, batch_size=bs)
        for a, b in zip(one, many):  # equal up to float32 rounding of differently shaped matmuls
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-6), (bs, (a - b).abs().max())
            assert torch.equal(a.argmin(1), b.argmin(1))
    assert hellaswag.evaluate(model, 'cpu', examples, batch_size=1) == hellaswag.evaluate(model, 'cpu', examples, batch_size=8)


def test_rank_shards_add_up(hf_dir, data_dir, tiktoken_offline):
    """without torch.distributed each rank returns its own shard's counts; together they are the whole set"""
    examples = hellaswag.load_examples(data_dir=data_dir)
    model = GPT.from_pretrained(hf_dir)
    full = hellaswag.evaluate(model, 'cpu', examples)
    shards = [hellaswag.evaluate(model, 'cpu', examples, rank=r, world_size=3) for r in range(3)]
    assert sum(s['n'] for s in shards) == full['n']
    assert sum(s['acc_norm'] * s['n'] for s in shards) == pytest.approx(full['acc_norm'] * full['n'])
    assert sum(s['acc'] * s['n'] for s in shards) == pytest.approx(full['acc'] * full['n'])
    assert sum(s['acc_char'] * s['n'] for s in shards) == pytest.approx(full['acc_char'] * full['n'])


def test_limit_and_download_cache(tmp_path, data_dir, monkeypatch):
    src = os.path.join(data_dir, 'hellaswag_val.jsonl')
    monkeypatch.setattr(hellaswag, 'URL', 'file://' + src)  # a "download" that needs no network
    cache = tmp_path / 'cache'
    assert len(hellaswag.load_examples(limit=3, data_dir=str(cache))) == 3
    assert open(cache / 'hellaswag_val.jsonl').read() == open(src).read()
    monkeypatch.setattr(hellaswag, 'URL', 'file:///nonexistent/hellaswag_val.jsonl')
    assert len(hellaswag.load_examples(data_dir=str(cache))) == len(EXAMPLES)  # cached: no second download


def test_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hellaswag, 'URL', 'file:///nonexistent/hellaswag_val.jsonl')
    with pytest.raises(SystemExit) as e:
        hellaswag.load_examples(data_dir=str(tmp_path / 'empty'))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: could not download HellaSwag') and '\n' not in err
    assert os.listdir(tmp_path / 'empty') == []  # no partial file left behind


def test_script_end_to_end(hf_dir, data_dir, tiktoken_offline):
    p = run_script('hellaswag.py', f'--init_from={hf_dir}', f'--data_dir={data_dir}', '--limit=5',
                   '--batch_size=2', '--device=cpu', env={'TIKTOKEN_CACHE_DIR': TIKTOKEN_CACHE})
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith('acc_norm ') and ' n 5 ' in last and 'examples/s' in last, p.stdout


def test_script_refuses_char_level_checkpoint(tmp_path, data_dir, tiktoken_offline):
    cfg = GPTConfig(block_size=32, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    meta = {'vocab_size': 65, 'itos': [chr(32 + i) for i in range(65)]}
    save_atomic({'model': GPT(cfg).state_dict(), 'model_args': asdict(cfg), 'iter_num': 0, 'best_val_loss': 9.9,
                 'config': {}, 'meta': meta}, str(tmp_path / 'ckpt.pt'))
    p = run_script('hellaswag.py', '--init_from=resume', f'--out_dir={tmp_path}', f'--data_dir={data_dir}',
                   '--device=cpu', env={'TIKTOKEN_CACHE_DIR': TIKTOKEN_CACHE}, check=False)
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and 'GPT-2 BPE' in p.stderr, p.stderr


def test_script_bad_flag_is_one_line(tmp_path):
    p = run_script('hellaswag.py', '--batch_size=0', f'--data_dir={tmp_path}', check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
