# a baby GPT on Tiny Shakespeare characters: ~10M parameters (nanoGPT reports ~1.47 val loss in a few GPU minutes)
# first: python data/shakespeare_char/prepare.py
# CPU recipe (README): add --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --max_iters=2000
#                          --lr_decay_iters=2000 --eval_iters=20 --dropout=0.0

out_dir = 'out-shakespeare-char'
eval_interval = 250  # the model overfits on this small dataset, so evaluate often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep only the best val loss

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a higher rate
max_iters = 5000
lr_decay_iters = 5000  # make equal to max_iters usually
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit higher because there are few tokens per step
warmup_iters = 100
