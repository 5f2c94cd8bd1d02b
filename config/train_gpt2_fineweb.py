# Reproduce GPT-2 (124M) on FineWeb-Edu 10B tokens with the GPT-3 Small recipe; watch HellaSwag pass GPT-2's 0.2955
# first: python data/fineweb_edu/prepare.py
# then:  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py   (or plain python, 1 GPU)
# plot:  python plot.py --logs=out-gpt2-fineweb/log.jsonl

out_dir = 'out-gpt2-fineweb'
dataset = 'fineweb_edu'
wandb_log = False
wandb_project = 'gpt2-fineweb'
wandb_run_name = 'gpt2-124M'

# GPT-2 124M, the exact architecture (biases included, so it exports to Hugging Face as a GPT2LMHeadModel)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = True
dropout = 0.0

# 524,288 (2**19) tokens per step: 32 x 1024 tokens x 16 micro-steps (16 must divide by the GPU count)
batch_size = 32
gradient_accumulation_steps = 16

# GPT-3 Small: max lr 6e-4, 10% floor, 715 warmup steps (375M tokens), one epoch of 10B tokens = 19,073 steps
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 715
max_iters = 19073
lr_decay_iters = 19073
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250  # val loss
eval_iters = 20  # 20 x 32 x 1024 = 655K tokens per split at each eval (x processes)
hellaswag_interval = 250
sample_interval = 250
log_interval = 10
checkpoint_interval = 5000  # keep a checkpoint every 5,000 steps (and at the end)
