"""pia-jax: PIA (Personalized Image Animator) in JAX/Flax NNX.

Folders, each importing only from those listed before it (tests/test_structure.py checks):
  models/    the networks (configs as data, UNet + motion modules + PIA's condition input, VAE, CLIP text tower)
  files.py   local or gs:// paths, written complete or not at all;  sharding.py  the one table of sharding rules
  weights/   files <-> parameters: strict PyTorch loading, the converted model directory, checkpoint conversion
  media.py   images and videos in and out
  sampling/  image + prompt + affinity -> video: schedulers, the compiled denoising loop, long videos, `Animator`
  eval/, data/   the metrics and AnimateBench runner; training data and the affinity scores of real clips
  training/  the train step, state, checkpoints, loop and tasks
  toy/       the toy world: procedural videos, its one-command recipe and evaluation
"""
