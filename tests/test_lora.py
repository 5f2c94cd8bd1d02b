"""LoRA (lora.py): the layer's algebra in-process, then train.py runs over a tiny base: adapters-only checkpoints,
the base's first-step loss, exact resume, merging on load (sample.py, --eval_only), a different base refused."""
import json
import os

import pytest
import torch

import lora
from conftest import run_bad_inputs, run_script, write_char_dataset
from model import GPT, GPTConfig
from runtime import load_checkpoint, model_from_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=4',
        '--gradient_accumulation_steps=1', '--warmup_iters=2', '--learning_rate=1e-2', '--compile=False',
        '--device=cpu']


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32))


def test_zero_b_is_the_base_and_merge_agrees():
    model, x = tiny(), torch.randint(65, (3, 16))
    base_logits = model(x, x)[0]
    n = lora.apply(model, 4, 8.0, 0.0, lora.LAYERS)
    assert n == lora.n_params(2, 32, 4, ','.join(lora.LAYERS)) == 2 * 4 * 32 * (4 + 2 + 5 + 5)
    assert torch.equal(model(x, x)[0], base_logits)  # B = 0: exactly the base, not merely close
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.endswith(('lora_A', 'lora_B')) for k in trainable)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith('lora_B'):
                p.normal_(0, 0.5)
    model(x, x)[1].backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())  # the base gets no gradient
    unmerged = model(x, x)[0].detach()
    assert (unmerged - base_logits).abs().max() > 1e-2
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x, x)[0], unmerged, atol=1e-5, rtol=1e-5)  # float32 rounding only


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """a base run (the char model), and LoRA runs from it: 6 steps straight, and 3 + 3 resumed"""
    root = tmp_path_factory.mktemp('lora')
    data = write_char_dataset(str(root / 'data'))
    train = lambda out, *flags: run_script('train.py', f'--data_dir={data}', f'--out_dir={root / out}', *TINY, *flags)
    train('base', '--max_iters=30', '--eval_interval=30')
    flags = ['--init_from=finetune', f'--finetune_from={root / "base"}', '--lora_rank=4', '--lora_alpha=8',
             '--lora_dropout=0.1', '--eval_interval=3', '--learning_rate=1e-2']
    straight = train('lora', '--max_iters=6', *flags)
    train('half', '--max_iters=3', *flags)
    resumed = run_script('train.py', '--init_from=resume', f'--out_dir={root / "half"}', '--max_iters=6')
    return root, data, straight, resumed


def log(path):
    return [json.loads(l) for l in open(path / 'log.jsonl')]


def test_lora_run_checkpoint_resume_and_merge(runs):
    root, data, straight, resumed = runs
    ck = load_checkpoint(str(root / 'lora' / 'ckpt.pt'))
    assert set(ck['model']) == {f'transformer.h.{i}.{n}.lora_{ab}' for i in (0, 1) for n in lora.LAYERS for ab in 'AB'}
    assert ck['lora']['base']['source'] == f"run:{root / 'base'}" and len(ck['lora']['base']['sha256']) == 64
    assert 'trainable' in straight.stdout
    # the first eval of the LoRA run is the base's own loss on the same batches (B starts at zero)
    base_val = [r for r in log(root / 'base') if r['val_loss'] is not None][-1]['val_loss']
    evals = [r['val_loss'] for r in log(root / 'lora') if r['val_loss'] is not None]
    assert evals[0] == base_val and evals[-1] < base_val - 0.005
    # exact resume: the same adapters and optimizer state as the straight run (dropout included)
    half = load_checkpoint(str(root / 'half' / 'ckpt.pt'))
    for k, v in ck['model'].items():
        assert torch.equal(v, half['model'][k]), k
    assert log(root / 'half')[-1]['loss'] == log(root / 'lora')[-1]['loss']
    # loading merges: the base's weights plus B A, every other weight the base's own
    merged = model_from_checkpoint(ck).eval()
    base = model_from_checkpoint(load_checkpoint(str(root / 'base' / 'ckpt.pt'))).eval()
    sd, bsd = merged.state_dict(), base.state_dict()
    w = 'transformer.h.1.mlp.c_fc.weight'
    delta = ck['model'][w[:-6] + 'lora_B'] @ ck['model'][w[:-6] + 'lora_A'] * 2.0
    torch.testing.assert_close(sd[w], bsd[w] + delta)
    assert torch.equal(sd['transformer.wte.weight'], bsd['transformer.wte.weight'])
    # sample.py and train.py --eval_only take the LoRA run directly
    p = run_script('sample.py', f'--out_dir={root / "lora"}', '--start=The ', '--num_samples=1',
                   '--max_new_tokens=20', '--temperature=0', '--device=cpu')
    itos = ck['meta']['itos']
    stoi = {c: i for i, c in enumerate(itos)}
    y = merged.generate(torch.tensor([[stoi[c] for c in 'The ']]), 20, temperature=0)
    assert p.stdout.split('\n---')[0] == ''.join(itos[i] for i in y[0].tolist())
    e = run_script('train.py', '--init_from=resume', f'--out_dir={root / "lora"}', '--eval_only=True')
    assert f"val loss {evals[-1]:.4f}" in e.stdout


def test_lora_bad_input(runs):
    root, data, _, _ = runs
    flags = [f'--data_dir={data}', *TINY, '--init_from=finetune', f'--finetune_from={root / "base"}',
             f'--out_dir={root / "never"}']
    cases = [(['train.py', *flags, '--lora_rank=-1'], 'lora_rank must be an integer >= 0'),
             (['train.py', *flags, '--lora_rank=4', '--lora_dropout=1.0'], 'lora_dropout must be in [0, 1)'),
             (['train.py', *flags, '--lora_rank=4', '--lora_layers=attn.qkv'], "'attn.qkv', which is not a Linear"),
             (['train.py', '--init_from=resume', f'--out_dir={root / "lora"}', '--lora_rank=8'],
              "--lora_rank=8 on the command line conflicts with the checkpoint's lora_rank=4")]
    run_bad_inputs(cases, protect=[root / 'lora', root / 'base'])
    # adapters whose base has changed since (its hash differs): every script that loads the run refuses it
    other = root / 'other'
    os.makedirs(other, exist_ok=True)
    ck = torch.load(root / 'lora' / 'ckpt.pt', weights_only=True)
    ck['lora']['base']['sha256'] = '0' * 64
    torch.save(ck, other / 'ckpt.pt')
    run_bad_inputs([(['sample.py', f'--out_dir={other}', '--device=cpu'], 'trained over other weights'),
                    (['export.py', f'--out_dir={other}'], 'trained over other weights')], protect=[other])


def test_peft_export_and_chat_template(tmp_path, tiktoken_offline):
    """export.py --peft=True: the base as a Hugging Face GPT-2 and the adapter in PEFT's format, which the real peft
    package loads to the logits of this repo's LoRA model; the exported tokenizer's chat_template renders
    conversations to the very tokens of chat_format.render"""
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    import chat_format
    from dataprep import gpt2_encoding
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / 'base')
    model = GPT.from_pretrained(str(tmp_path / 'base'))
    base = lora.base_identity(model, str(tmp_path / 'base'))
    layers = ('attn.c_attn', 'mlp.c_proj')
    lora.apply(model, 4, 8.0, 0.0, layers)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith('lora_B'):
                p.normal_(0, 0.2)
    run = tmp_path / 'run'
    os.makedirs(run)
    torch.save({'model': lora.adapters(model), 'model_args': vars(model.config), 'iter_num': 3, 'meta': None,
                'lora': {'rank': 4, 'alpha': 8.0, 'dropout': 0.0, 'layers': list(layers), 'base': base}},
               run / 'ckpt.pt')
    run_script('export.py', f'--out_dir={run}', '--peft=True', env={'TIKTOKEN_CACHE_DIR': tiktoken_offline})
    assert sorted(os.listdir(run / 'hf-adapter')) == ['adapter_config.json', 'adapter_model.safetensors',
                                                      'export_manifest.json']
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(run / 'hf'), str(run / 'hf-adapter')).eval()
    x = torch.randint(50257, (2, 32))
    with torch.no_grad():
        ours, theirs = model.eval()(x, x)[0], peft_model(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - GPT2LMHeadModel.from_pretrained(run / 'hf')(x).logits).abs().max().item() > 1e-2  # B A matters
    # the chat template written into the tokenizer gives chat_format's tokens
    tok, enc = AutoTokenizer.from_pretrained(run / 'hf'), gpt2_encoding()
    convs = [[{'role': 'user', 'content': 'Hi there!'}, {'role': 'assistant', 'content': ' Hello,\n\n  friend :)'}],
             [{'role': 'system', 'content': 'Answer in French.'}, {'role': 'user', 'content': '  two  spaces\n'},
              {'role': 'assistant', 'content': '...ok'}, {'role': 'user', 'content': 'naïve café? 你好'}]]
    for conv in convs:
        for reply in (False, True):
            ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=reply)
            ids = ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids
            assert list(ids) == chat_format.render(conv, enc.encode_ordinary, enc.eot_token, reply=reply)[0]


def test_lora_under_ddp_and_activation_checkpointing_matches_one_process(runs):
    """two torchrun processes (gloo) and recomputed blocks train the adapters to the one-process losses: DDP averages
    the adapters' gradients only (the frozen base has none), and checkpointing recomputes the adapted Linears"""
    root, data = runs[0], runs[1]
    flags = [f'--data_dir={data}', *TINY, '--gradient_accumulation_steps=2', '--init_from=finetune',
             f'--finetune_from={root / "base"}', '--lora_rank=4', '--max_iters=4', '--eval_interval=4']
    run_script('train.py', f'--out_dir={root / "one"}', *flags)
    run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               f'--out_dir={root / "ddp"}', '--backend=gloo', *flags)
    run_script('train.py', f'--out_dir={root / "ac"}', '--activation_checkpointing=True', *flags)
    one = [r['loss'] for r in log(root / 'one') if r.get('loss') is not None]
    assert len(one) == 4 and one[-1] != one[0]
    for other in ('ddp', 'ac'):  # all-reduce order and recomputation: float32 rounding, no more
        got = [r['loss'] for r in log(root / other) if r.get('loss') is not None]
        assert got == pytest.approx(one, abs=1e-5), (other, got, one)
