"""Models with shape-only parameters (`nnx.eval_shape`): what loading fills, what the trainer splits, at no memory.

Isolated here because building them needs one workaround: jax 0.10 composes the message of a tracer's `.sharding`
AttributeError eagerly, walking every equation traced so far (jax-ml/jax#40041), and flax probes `.sharding` on
each RNG-counter update, so `nnx.eval_shape` of a model is quadratic in its size (10 s for the tiny test UNet, 16 s
at SD1.5 size, instead of 1 s and 1.7 s). Nothing shows that message while a model is built, so it is skipped then,
by swapping one method of a private JAX class for the duration of the build only; where that class or method is
gone (another jax), nothing is patched.
"""

import contextlib
import functools

from flax import nnx


@contextlib.contextmanager
def _cheap_tracer_errors():
    """The module docstring's workaround, for the duration of the block."""
    try:
        from jax._src.interpreters.partial_eval import DynamicJaxprTracer as tracer
        original = tracer.__dict__["_origin_msg"]
    except (ImportError, KeyError):
        yield
        return
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


@functools.lru_cache(maxsize=16)
def _abstract(cls, cfg, kwargs: tuple):
    with _cheap_tracer_errors():
        return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **dict(kwargs)))


def abstract_model(cls, cfg, **kwargs) -> nnx.Module:
    """`cls(cfg, **kwargs)` with shape-only parameters (nothing allocated), fresh for the caller to fill; models of
    one configuration are traced once per process."""
    try:
        return nnx.clone(_abstract(cls, cfg, tuple(sorted(kwargs.items()))))
    except TypeError:  # unhashable arguments (e.g. a dict of attention kernels): trace every time
        with _cheap_tracer_errors():
            return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kwargs))
