"""quantize.py: weights stored in the decoding dtype (no cast per token), int8 weight-only twins, and their refusals."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, GPTConfig
from quantize import Int8Linear, cast_weights, decoding_model, quantize


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(dict(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=64), **kw))).eval()
    with torch.no_grad():  # logits of order 1: a greedy path that is not one repeated token
        model.lm_head.weight.normal_(0.0, 0.2)
    return model


class WeightCasts(TorchDispatchMode):
    """counts dtype conversions of whole weight matrices (what autocast does to float32 weights on every call)"""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.n = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and tuple(args[0].shape) in self.shapes:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_bf16_weights_are_not_cast_per_token():
    """float32 weights under bf16 autocast are converted to bf16 copies (eager: once per autocast region, the copies
    cached beside the weights; compiled: on every decode step, one conversion kernel per weight in inductor's code,
    docs/BENCHMARKS.md); cast once, none are, and the tokens and logits stay those of the autocast path"""
    model = tiny()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    x = torch.randint(0, 65, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        with WeightCasts(shapes) as before:
            model.generate(x, 3, temperature=0)
        ref_logits = model(x)[0].float()
        ref = model.generate(x, 20, temperature=0)
        twin = cast_weights(model, 'bfloat16', copy_weights=True)
        with WeightCasts(shapes) as after:
            twin.generate(x, 3, temperature=0)
        logits = twin(x)[0].float()
        assert torch.equal(twin.generate(x, 20, temperature=0), ref)
    assert before.n == 2 * 4 + 1 and after.n == 0, (before.n, after.n)  # 4 Linears per block + the head
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()  # embeddings rounded once: bf16 noise
    assert model.lm_head.weight.dtype == torch.float32  # the training model is untouched
    assert twin.lm_head.weight.dtype == torch.bfloat16 and twin.lm_head.weight is twin.transformer.wte.weight
    assert twin.transformer.wpe.weight.dtype == twin.transformer.ln_f.weight.dtype == torch.float32
    assert cast_weights(model, 'float32') is model


def test_int8_twins_are_close_and_hold_no_float_copy():
    model = tiny()
    x = torch.randint(0, 65, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_logits, _ = model(x)
        ref = model.generate(x, 40, temperature=0)
        q = quantize(copy.deepcopy(model), 'int8')
        logits, _ = q(x)
        out = q.generate(x, 40, temperature=0)
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 4 + 1 and not any(type(m) is torch.nn.Linear for m in q.modules())
    for m in linears:  # int8 weights, a float scale per output row, nothing else of the weight's size
        assert m.weight.dtype == torch.int8 and m.scale.shape == (m.out_features,)
        assert all(t.numel() < m.weight.numel() for n, t in m.named_buffers() if n != 'weight')
    # per-row rounding error of w is at most scale / 2: the logits move by well under a percent of their range
    assert (logits - ref_logits).abs().max() < 0.02 * ref_logits.abs().max()
    assert (out == ref).float().mean() > 0.9
    with pytest.raises(RuntimeError, match='for decoding and evaluation only'):
        q.train()(x, x)
    with pytest.raises(ValueError, match="unknown quantize 'int3'; use none or int8"):
        decoding_model(tiny(), 'float32', 'int3')


def test_quantised_checkpoints_and_training_are_refused(tmp_path):
    """quantisation is made at load for decoding: an int8 state dict saved anyway is refused by export, resume and
    sample.py in one line (train and export the float checkpoint), and train.py has no quantize flag"""
    from conftest import run_bad_inputs
    model = quantize(tiny(), 'int8')
    (tmp_path / 'q').mkdir()
    torch.save({'model': model.state_dict(), 'model_args': vars(model.config), 'meta': None, 'iter_num': 0},
               tmp_path / 'q' / 'ckpt.pt')
    said = "its weights are int8-quantised (quantize.py makes them for decoding only, at load)"
    run_bad_inputs([
        (['export.py', f'--out_dir={tmp_path / "q"}', f'--export_dir={tmp_path / "hf"}'], said),
        (['sample.py', f'--out_dir={tmp_path / "q"}', '--device=cpu'], said),
        (['train.py', '--quantize=int8', f'--out_dir={tmp_path / "t"}'], "unknown config key 'quantize'"),
    ], protect=[tmp_path])


def test_every_format_decodes_a_model_without_a_position_table():
    """pos_emb='rope' has no wpe: bf16 weights and int8 twins are still made, and decode close to float32"""
    model = tiny(pos_emb='rope', norm='rmsnorm', qk_norm=True)
    x = torch.randint(0, 65, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)[0]
        for dtype, kind in (('bfloat16', 'none'), ('float32', 'int8')):
            q = decoding_model(copy.deepcopy(model), dtype, kind)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
                logits = q(x)[0].float()
                assert q.generate(x, 5, temperature=0).shape == (1, 13)
            assert (logits - ref).abs().max() < 0.05 * ref.abs().max(), (dtype, kind)
