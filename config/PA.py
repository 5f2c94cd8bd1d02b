# pointwise attention (relu(q.k / sqrt(d)) / (i + 1), no softmax) on Tiny Shakespeare characters,
# the README CPU recipe's size, so it compares directly with the SM / GK runs of compare.py
# first: python data/shakespeare_char/prepare.py
# python train.py config/PA.py            (another activation: --attn_type=PA_gelu; ~2 minutes on 2 CPU cores)

out_dir = 'out-pa'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False  # keep only the best val loss

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
attn_type = 'PA_relu'  # PA_<act>: relu, gelu, sigmoid, silu, softplus

learning_rate = 1e-3  # small networks can take a higher rate
max_iters = 2000
lr_decay_iters = 2000  # make equal to max_iters usually
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit higher because there are few tokens per step
warmup_iters = 100
