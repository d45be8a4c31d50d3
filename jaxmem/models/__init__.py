"""Example models used by jaxmem's benchmarks, experiments and notebooks.

Modules (import them directly):
  ``jaxmem.models.digits``: scikit-learn digits data with a fixed split and the 64-256-256-10 MLP.
"""
