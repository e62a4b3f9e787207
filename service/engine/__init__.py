"""The serving engine: mixed-checkpoint batches through one prompted forward."""
