"""
LoRA (Hu et al. 2021): fine-tune a frozen GPT through small low-rank adapters. A chosen Linear W (out x in) becomes
W x + (alpha / r) B A x, A (r x in) random, B (out x r) zero, so the first step computes exactly the base model.
Only A and B train: the base takes no gradient and no optimizer state, which is what lets gpt2-xl fine-tune on a
24 GB card (docs/BENCHMARKS.md).

    apply(model, rank, alpha, dropout, layers)   swap the named Linears for LoRALinear, freeze everything else
    merge(model)                                 fold B A into W and turn each LoRALinear back into a Linear
    base_identity(model, source)                 where the base came from and the sha256 of its weights
    from_checkpoint(ckpt, override_args, path, merge=True)   a LoRA run's checkpoint (adapters only) over its base
    peft_files(adapters, lora_config, layers)    the adapter as PEFT's adapter_config.json + adapter_model.safetensors

Layers are named by their path inside a block (LAYERS). A LoRA run's checkpoint holds 'lora' (rank, alpha,
dropout, layers, and the base's identity) and, under 'model', only the adapters: loading rebuilds the base from its
source, checks the hash (a different base is refused in one line) and loads the adapters over it.
Muon is not used for adapters: they are r-column matrices, and orthogonalising an update makes its r directions
equal in size, which is not what a low-rank correction starting from B = 0 wants; they train with AdamW, whose
learning rates for LoRA are well known (train.py says so when Muon flags are given).
"""

import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import fail

LAYERS = ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')  # the Linears of a block, by their path in it


class LoRALinear(nn.Linear):
    """a Linear (its weight and bias frozen) plus scaling * B A; state_dict keys: weight, bias, lora_A, lora_B"""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device='meta')
        self.weight, self.bias = base.weight, base.bias  # the base's own tensors: nothing copied
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self):
        """a plain Linear computing the same function (up to float rounding)"""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device='meta')
        with torch.no_grad():
            out.weight = nn.Parameter(self.weight + (self.lora_B @ self.lora_A).to(self.weight.dtype) * self.scaling)
            out.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return out


def _linears(model, layers):
    """(parent module, attribute, Linear) for every block's layer named in layers"""
    found = []
    for block in model.transformer.h:
        for name in layers:
            parent_name, attr = name.rsplit('.', 1)
            parent = block.get_submodule(parent_name)
            found.append((parent, attr, getattr(parent, attr)))
    return found


def check_layers(model, layers):
    """the comma-separated layers as a tuple; one line naming the valid ones when any is not a Linear of the model"""
    names = tuple(n.strip() for n in layers.split(',') if n.strip())
    for name in names:
        try:
            ok = isinstance(model.transformer.h[0].get_submodule(name), nn.Linear)
        except AttributeError:
            ok = False
        if not ok:
            fail(f"lora_layers names '{name}', which is not a Linear layer of this model's blocks; use some of "
                 f"{','.join(LAYERS)}")
    if not names:
        fail(f"lora_layers is empty; name some of {','.join(LAYERS)}")
    return names


def apply(model, rank, alpha, dropout, layers):
    """freeze the whole model, then give each named Linear of every block trainable adapters; returns their count"""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, linear in _linears(model, layers):
        setattr(parent, attr, LoRALinear(linear, rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge(model):
    """every LoRALinear replaced by the plain Linear it computes: the model is a GPT again (sample, export, compile)"""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapters(model):
    """the adapter tensors of a model with LoRA applied: what a LoRA run's checkpoint holds under 'model'"""
    return {k: v for k, v in model.state_dict().items() if k.endswith(('.lora_A', '.lora_B'))}


def weights_hash(model):
    """sha256 over the base weights (every tensor but the adapters, by sorted name, as float32 bytes). The rows that
    pad the vocabulary to a multiple of 64 are left out: no token reads them, and from_pretrained leaves them random."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        if not k.endswith(('.lora_A', '.lora_B')):
            t = sd[k][:model.config.vocab_size] if k in ('transformer.wte.weight', 'lm_head.weight') else sd[k]
            h.update(k.encode())
            h.update(t.detach().float().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_identity(model, source):
    """where the base came from (init_from name or directory, or a run's checkpoint) and the hash of its weights"""
    if source.startswith('run:'):
        source = 'run:' + os.path.abspath(source[4:])
    elif os.path.isdir(source):
        source = os.path.abspath(source)
    return {'source': source, 'sha256': weights_hash(model)}


def load_base(base, args, path):
    """the base GPT a LoRA checkpoint names, at its block_size; refused in one line when its weights are not the ones
    the adapters were trained on"""
    from model import GPT, GPTConfig
    from runtime import load_checkpoint, model_from_checkpoint, refuse_non_finite
    source, keep = base['source'], {'dropout': args['dropout'], 'attn_type': args['attn_type']}
    try:
        if source.startswith('scratch:'):  # random weights (a LoRA run from scratch: benchmarks, tests): the seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(source[8:]))
                model = GPT(GPTConfig(**dict(args, **keep)))
        elif source.startswith('run:'):  # a run of this repo (init_from=finetune): its ckpt.pt, merged if LoRA itself
            run_ckpt = os.path.join(source[4:], 'ckpt.pt')
            model = model_from_checkpoint(load_checkpoint(run_ckpt), keep, run_ckpt)
        else:
            model = GPT.from_pretrained(source, keep)
            refuse_non_finite(model.state_dict(), source, 'weights')
    except (OSError, ValueError) as e:
        fail(f"{path} holds LoRA adapters over {source}, which could not be loaded ({e})")
    if model.config.block_size < args['block_size']:
        fail(f"{path}: its base {source} has block_size {model.config.block_size}, the adapters were trained at "
             f"{args['block_size']}; it is not the same base")
    if model.config.block_size > args['block_size']:
        model.crop_block_size(args['block_size'])
    if weights_hash(model) != base['sha256']:
        fail(f"{path} holds LoRA adapters trained over other weights than {source} has now (sha256 differs); "
             f"give the base they were trained on")
    return model


def from_checkpoint(ckpt, override_args=None, path='the checkpoint', merge_adapters=True):
    """a LoRA run's model: its base rebuilt and checked, the adapters loaded over it, merged unless merge_adapters is
    False (training resumes unmerged)"""
    cfg, args = ckpt['lora'], dict(ckpt['model_args'], **(override_args or {}))
    model = load_base(cfg['base'], args, path)
    apply(model, cfg['rank'], cfg['alpha'], cfg['dropout'], cfg['layers'])
    sd, want = ckpt['model'], adapters(model)
    wrong = sorted(set(sd) ^ set(want)) + [k for k in want if k in sd and sd[k].shape != want[k].shape]
    if wrong:
        fail(f"{path}: its adapters do not fit its LoRA settings ({wrong[0]}); was it written by this repo?")
    from runtime import refuse_non_finite
    refuse_non_finite(sd, path, 'adapters')
    model.load_state_dict(sd, strict=False)
    return merge(model) if merge_adapters else model


def peft_files(adapter_sd, cfg, base_dir):
    """{name: bytes} of a PEFT LoRA adapter for the Hugging Face GPT-2 exported to base_dir. HF's GPT-2 keeps these
    layers as Conv1D (weight stored in x out): PEFT's fan_in_fan_out=True handles that, and its lora_A / lora_B are
    stored as ours are (r x in, out x r)."""
    import json
    from safetensors.torch import save
    tensors = {f"base_model.model.{k.removesuffix('.lora_A').removesuffix('.lora_B')}."
               f"{'lora_A' if k.endswith('lora_A') else 'lora_B'}.weight": v.detach().float().contiguous().cpu()
               for k, v in adapter_sd.items()}
    config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': os.path.abspath(base_dir),
              'r': cfg['rank'], 'lora_alpha': cfg['alpha'], 'lora_dropout': cfg['dropout'],
              'target_modules': list(cfg['layers']), 'fan_in_fan_out': True, 'bias': 'none', 'use_rslora': False,
              'inference_mode': True, 'init_lora_weights': True, 'modules_to_save': None}
    return {'adapter_config.json': json.dumps(config, indent=1).encode(),
            'adapter_model.safetensors': save(tensors, metadata={'format': 'pt'})}


def n_params(n_layer, n_embd, rank, layers):
    """the adapters' parameter count from the shape (before the model is built: memory.py's pre-flight check)"""
    sizes = {'attn.c_attn': (1, 3), 'attn.c_proj': (1, 1), 'mlp.c_fc': (1, 4), 'mlp.c_proj': (4, 1)}
    names = [n.strip() for n in layers.split(',')]
    return n_layer * rank * n_embd * sum(sum(sizes[n]) for n in names if n in sizes)


def unadapted(model):
    """the base alone: every LoRALinear back to the plain Linear it wraps (its adapters dropped)"""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device='meta')
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, attr, plain)
    return model
