"""The pipeline's stages: stage one (extract) and stage two (classify, segment), with their
shared datasets, encoders, models and runtime. Imports ``cache``, never ``pipeline``."""
