"""fractal_jax: FractalNet and its baselines in JAX/Flax."""
__version__ = "0.1.0"
