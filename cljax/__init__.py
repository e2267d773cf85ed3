"""cljax: continual learning with GEM and A-GEM, functional and jit-compiled in JAX."""

__version__ = "0.1.0"
