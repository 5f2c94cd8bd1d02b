# GPT-2 (124M) on FineWeb-Edu with config/modern.py on top: the architecture flags that won on the CPU baby recipe
# (docs/ARCHITECTURE.md) and Muon for the block matrices, to set its val-loss and HellaSwag curves beside the AdamW
# (config/train_gpt2_fineweb.py) and Muon-only (config/train_gpt2_muon.py) runs.
# first: python data/fineweb_edu/prepare.py
# then:  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_modern.py
# plot:  python plot.py --logs=out-gpt2-fineweb/log.jsonl,out-gpt2-muon/log.jsonl,out-gpt2-modern/log.jsonl
#
# NOT YET RUN (no GPU has been lent to this project): every figure behind the preset is from a 0.8M-parameter char
# model on a CPU. Whether each flag still pays at 124M, and the best Muon and AdamW rates with them, are open.
# Not a GPT-2 architecture any more: export.py refuses it (Hugging Face GPT-2 would compute something else).
import os

_here = os.path.dirname(os.path.abspath(__file__))
exec(open(os.path.join(_here, 'train_gpt2_fineweb.py')).read())
exec(open(os.path.join(_here, 'modern.py')).read())

out_dir = 'out-gpt2-modern'
wandb_run_name = 'gpt2-124M-modern'
bias = False  # GPT-2's biases were kept in train_gpt2_fineweb.py only so that it exports; this cannot export anyway
