"""Fast-simulation surrogate pipeline for calorimeter showers.

Stages (each a module with ``python -m surrogate.<stage> --help``): simulate, ingest,
train, generate, validate, report.
"""

__version__ = "0.1.0"
