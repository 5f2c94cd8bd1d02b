# GPT-2 (124M) on FineWeb-Edu with Muon for the block matrices and AdamW for the rest: config/train_gpt2_fineweb.py
# with optimizer='muon', to set its val-loss and HellaSwag curves beside the AdamW run's.
# first: python data/fineweb_edu/prepare.py
# then:  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_muon.py
# plot:  python plot.py --logs=out-gpt2-fineweb/log.jsonl,out-gpt2-muon/log.jsonl
#
# Not yet run at this scale (no GPU has been lent to this project): on the CPU baby recipe Muon at lr 0.02
# reaches AdamW's 2000-step val loss in fewer than half the steps (docs/BENCHMARKS.md), but how many steps it
# saves here, and whether 0.02 is its best learning rate at 124M, are open. Speedruns of this model use Muon
# rates of about 0.02-0.05 with momentum 0.95. Muon needs each matrix whole, so this runs with DDP, not FSDP.
import os

exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_gpt2_fineweb.py')).read())

out_dir = 'out-gpt2-muon'
wandb_run_name = 'gpt2-124M-muon'
optimizer = 'muon'
muon_lr = 0.02  # Muon's peak learning rate; the schedule (warmup, cosine to min_lr / learning_rate of it) applies
muon_momentum = 0.95
