"""Private implementation modules; the public API is re-exported from ``jaxmem``."""
