"""mmjax: a JAX model zoo for multimodal (image + text) image generation and editing."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `python -m mmjax.data` and config files do not pay for importing jax.
    if name in ("load", "export", "grid", "LoadedModel"):
        from mmjax import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
