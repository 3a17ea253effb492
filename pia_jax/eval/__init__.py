"""Evaluation of image animations (`evaluate.py`).

clip: the CLIP ViT-L/14 metric model (NNX); clip_dir: its conversion from transformers and loading;
preprocess: CLIP's image preprocessing; scores: CLIP alignment scores and `score_video` (every metric of one
video); motion: optical flow, dynamic degree, PSNR/SSIM, controllability; video: reading videos to score;
animate: the evaluations' one door to the sampler (a cache of Animators); sheet: contact sheets; bench: the
AnimateBench-style runner and its reports. The toy world's evaluation (`pia_jax.toy.evaluate`) uses animate, sheet
and motion.psnr too.
"""
