"""Evaluation of image animations (`evaluate.py`).

clip: the CLIP ViT-L/14 metric model (NNX); clip_dir: its conversion from transformers and loading;
preprocess: CLIP's image preprocessing; scores: CLIP alignment scores and `score_video` (every metric of one
video); motion: optical flow, dynamic degree, PSNR/SSIM, controllability; video: reading videos to score;
bench: the AnimateBench-style runner and its reports.
"""
