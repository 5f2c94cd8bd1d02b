# GPT-2 (124M) on OpenWebText, nanoGPT's recipe: ~2.85 val loss after ~300B tokens
# first: python data/openwebtext/prepare.py
# then, one node of 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# 12 batch x 1024 tokens x 40 micro-steps = ~491,520 tokens per step (40 must divide by the GPU count); auto_batch
# keeps those tokens per step with the largest micro-batch that fits each GPU (a 24 GB card too)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8
auto_batch = True

# 600,000 steps: ~300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
