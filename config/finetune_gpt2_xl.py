# fine-tune OpenAI's GPT-2 XL (1.5B) on OpenWebText: a short run with a small learning rate, bf16
# first: python data/openwebtext/prepare.py
# then:  python train.py config/finetune_gpt2_xl.py      (one 80 GB GPU; on 24-40 GB cards add --fsdp=True under torchrun)

out_dir = 'out-gpt2-xl-ft'
init_from = 'gpt2-xl'
dataset = 'openwebtext'
dtype = 'bfloat16'
wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'ft-gpt2-xl'

# 1 x 1024 tokens x 32 micro-steps = 32,768 tokens per step
batch_size = 1
block_size = 1024
gradient_accumulation_steps = 32
dropout = 0.0

max_iters = 200
learning_rate = 1e-5  # small: the model is already good, we only nudge it
min_lr = 1e-6
warmup_iters = 20
lr_decay_iters = 200
weight_decay = 0.1

eval_interval = 50
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # only keep the best val loss (a checkpoint is ~19 GB with AdamW state)
