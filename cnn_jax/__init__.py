"""cnn_jax: convolutional image classifiers as pure JAX functions."""

__version__ = "0.1.0"
