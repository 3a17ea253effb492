"""Files <-> parameters: strict, table-driven loading of PyTorch state dicts (`loading`, re-exported here), the
converted model directory (`model_dir`), and the conversion of PyTorch checkpoints (`convert/`)."""

from pia_jax.weights.loading import (DIFFUSERS_UNET, DIFFUSERS_VAE, TRANSFORMERS_CLIP_TEXT, KeyMap, WeightLoadError,
                                     fill, load_state_dict, map_keys, merge_unet_and_adapter, param_shapes,
                                     problems_error, read_state_dict)

__all__ = ["DIFFUSERS_UNET", "DIFFUSERS_VAE", "TRANSFORMERS_CLIP_TEXT", "KeyMap", "WeightLoadError", "fill",
           "load_state_dict", "map_keys", "merge_unet_and_adapter", "param_shapes", "problems_error", "read_state_dict"]
