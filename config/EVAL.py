# evaluate a checkpoint: print its train and val loss on the run's own data, then exit, writing nothing
# python train.py config/EVAL.py --out_dir=out-shakespeare-char
# the run's settings (dataset, block_size, eval_iters, attn_type...) come from its checkpoint; flags override them,
# e.g. --eval_iters=200 for a tighter estimate, or --device=cpu

init_from = 'resume'
eval_only = True
