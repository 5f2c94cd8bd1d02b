# one layer, one head on Tiny Shakespeare characters: the smallest transformer in which to study an attention
# first: python data/shakespeare_char/prepare.py
# python train.py config/train_11.py --attn_type=GK        (about 3-4 minutes on 2 CPU cores)
# then: python train.py config/EVAL.py --out_dir=out-11

out_dir = 'out-11'
eval_interval = 250
eval_iters = 50
log_interval = 50
always_save_checkpoint = False  # keep only the best val loss

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64  # 64 characters: long enough for words and line structure, cheap for a T x T attention

n_layer = 1
n_head = 1  # a single attention map, d = n_embd, nothing averaged over heads
n_embd = 128
dropout = 0.0  # too small to overfit in this many steps
attn_type = 'SM'  # the attention under study: SM, GK, GKpoly-<n>, PA_<act> (set with --attn_type=...)

learning_rate = 1e-3  # small networks can take a higher rate
max_iters = 2000
lr_decay_iters = 2000  # make equal to max_iters usually
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit higher because there are few tokens per step
warmup_iters = 100
