# fine-tune GPT-2 on Tiny Shakespeare (BPE). first: python data/shakespeare/prepare.py
# gpt2-xl needs a big GPU; on a small one or a CPU use --init_from=gpt2
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2

always_save_checkpoint = False  # only save when val improves

# 1 batch x 32 micro-steps x 1024 tokens = 32,768 tokens per step; Shakespeare is ~300K tokens, so ~9 steps an epoch
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# constant small learning rate
learning_rate = 3e-5
decay_lr = False
