# evaluate the OpenAI gpt2-medium checkpoint on OpenWebText: prints train and val loss, writes nothing
# first: python data/openwebtext/prepare.py
batch_size = 8
eval_iters = 500  # 500 x 8 x 1024 = ~4M tokens per split
eval_only = True
wandb_log = False
init_from = 'gpt2-medium'
