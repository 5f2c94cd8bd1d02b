# The architecture flags that won on the CPU baby recipe, plus Muon: stack it on any recipe
#   python train.py config/train_shakespeare_char.py config/modern.py ...
# Each flag alone vs Muon alone, 600 steps of the README CPU recipe, whole-val loss (docs/ARCHITECTURE.md):
# rope -0.075, qk_norm -0.010, rmsnorm -0.006 kept; relu2 +0.087, untied head +0.007, softcap +0.002 and
# zero_init +0.001 left out (they did not pay at this size).
optimizer = 'muon'
pos_emb = 'rope'
qk_norm = True
norm = 'rmsnorm'
