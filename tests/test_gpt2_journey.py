"""The reproduce-GPT-2 journey end to end on CPU, tiny: FineWeb-Edu-schema data -> prepare -> train with
HellaSwag and samples on -> log.jsonl with every field -> plot PNG."""
import json
import os

import matplotlib.image
import numpy as np

from conftest import run_script, text_corpus
from test_hellaswag import EXAMPLES

KEYS = {'iter', 'loss', 'train_loss', 'val_loss', 'hellaswag', 'lr', 'grad_norm', 'tokens_per_sec', 'mfu', 'time'}


def test_fineweb_to_plot(tmp_path, tiktoken_offline):
    # a small dataset in FineWeb-Edu's schema (a `text` column, plus its other fields), as jsonl
    text = text_corpus(60_000)
    docs = [text[i:i + 600] for i in range(0, len(text), 600)]
    src = tmp_path / 'fw'
    src.mkdir()
    with open(src / 'part-0.jsonl', 'w') as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({'text': d, 'id': f'<urn:uuid:{i}>', 'dump': 'CC-MAIN-2024-10', 'url': f'http://x/{i}',
                                'language': 'en', 'language_score': 0.95, 'token_count': len(d) // 4,
                                'score': 3.1, 'int_score': 3}) + '\n')
    data = tmp_path / 'data' / 'fineweb_edu'
    run_script('data/fineweb_edu/prepare.py', f'--dataset={src}', f'--out_dir={data}', '--num_proc=1',
               '--val_docs=5', env={'HF_DATASETS_CACHE': str(tmp_path / 'hf_cache'), 'HF_HUB_OFFLINE': '1'})
    assert os.path.getsize(data / 'val.bin') > 0 and os.path.getsize(data / 'train.bin') > 10_000
    assert np.fromfile(data / 'train.bin', dtype=np.uint16).max() < 50257

    hs = tmp_path / 'hellaswag'
    hs.mkdir()
    with open(hs / 'hellaswag_val.jsonl', 'w') as f:
        f.writelines(json.dumps(e) + '\n' for e in EXAMPLES)
    out = tmp_path / 'out'
    p = run_script('train.py', 'config/train_gpt2_fineweb.py', f'--data_dir={data}', f'--out_dir={out}',
                   f'--hellaswag_dir={hs}', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=64',
                   '--batch_size=4', '--gradient_accumulation_steps=2', '--max_iters=30', '--warmup_iters=5',
                   '--lr_decay_iters=30', '--learning_rate=3e-3', '--eval_interval=10', '--eval_iters=4',
                   '--hellaswag_interval=15', '--sample_interval=15', '--sample_tokens=8', '--num_samples=2',
                   '--checkpoint_interval=20', '--log_interval=1', '--device=cpu', '--compile=False')
    assert p.stdout.count("sample 0: \"Hello, I'm a language model,") == 2  # at steps 0 and 15
    assert 'hellaswag' in p.stdout
    records = [json.loads(l) for l in open(out / 'log.jsonl')]
    assert all(set(r) == KEYS for r in records)
    steps = [r for r in records if r['loss'] is not None]
    evals = [r for r in records if r['val_loss'] is not None]
    assert [r['iter'] for r in steps] == list(range(1, 31))
    assert all(r['grad_norm'] > 0 and r['lr'] > 0 for r in steps)
    assert steps[0]['tokens_per_sec'] is None  # the first step compiles and warms up: never a step time
    assert all(r['tokens_per_sec'] > 0 for r in steps[1:])
    assert [r['iter'] for r in evals] == [0, 10, 20, 30] and evals[-1]['val_loss'] < evals[0]['val_loss']
    hellaswag = [r for r in records if r['hellaswag'] is not None]
    assert [r['iter'] for r in hellaswag] == [0, 15, 30]  # on its own schedule, not only where evals fall
    assert all(0 <= r['hellaswag'] <= 1 for r in hellaswag)
    assert (out / 'ckpt_000020.pt').exists() and (out / 'ckpt.pt').exists()

    png = tmp_path / 'plot.png'
    q = run_script('plot.py', f'--logs={out / "log.jsonl"}', f'--out={png}')
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert f"{min(r['val_loss'] for r in evals):.4f}" in q.stdout
