# The architecture flags that won on the CPU baby recipe, plus Muon: stack it on any recipe
#   python train.py config/train_shakespeare_char.py config/modern.py ...
# Scores, seeds and commands of every flag alone and of this preset: docs/ARCHITECTURE.md.
optimizer = 'muon'
