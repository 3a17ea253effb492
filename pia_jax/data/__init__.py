"""Training data: video sources, preparation into tfds ArrayRecord shards, clip sampling and a resumable loader.

Needs the `train` extra (PyAV, OpenCV, Pillow, tensorflow-datasets); the model code never imports this package.
"""

from pia_jax.data.clips import (
                                PIXEL_VALUES,
                                DataConfig,
                                Draws,
                                draw,
                                make_example,
                                quantize,
                                sample_window,
                                transform_clip,
)
from pia_jax.data.latents import LatentMismatch, LatentSpec, make_latent_example
from pia_jax.data.loader import Loader, Records, dataset_metadata, open_dataset
from pia_jax.data.sources import Row, generic_rows, rows_from, webvid_rows
from pia_jax.data.video import VideoError, VideoInfo, decode_frames, probe

__all__ = ["PIXEL_VALUES", "DataConfig", "Draws", "LatentMismatch", "LatentSpec", "Loader", "Records", "Row",
           "VideoError", "VideoInfo", "dataset_metadata", "decode_frames", "draw", "generic_rows", "make_example",
           "make_latent_example", "open_dataset", "probe", "quantize", "rows_from", "sample_window", "transform_clip",
           "webvid_rows"]
