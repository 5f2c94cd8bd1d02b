# The architecture flags that won on the CPU baby recipe, plus Muon: stack it on any recipe
#   python train.py config/train_shakespeare_char.py config/modern.py ...
# Each flag alone vs Muon alone, 600 steps of the README CPU recipe, whole-val loss (docs/ARCHITECTURE.md):
# rope -0.075 and qk_norm -0.010 kept; relu2 +0.087, untied head +0.007, softcap +0.002 and zero_init +0.001 left
# out (they did not pay at this size). rmsnorm (-0.006 alone) was dropped in the second round: with rope and qk_norm
# it did not lower the loss (500-step schedule, 3 seeds: 1.8005 with it, 1.7935 without) and its backward made a
# CPU step 11% dearer, so the preset reached AdamW's loss later (33% of AdamW's time with it, 28% without).
optimizer = 'muon'
pos_emb = 'rope'
qk_norm = True
