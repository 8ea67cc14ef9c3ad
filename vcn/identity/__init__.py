"""The identity model: face-ID backbones, their per-movie adaptation, embeddings and crop quality.

``backbone`` loads any base model behind one interface (``models`` holds the
networks and their weight readers), ``selfsup`` adapts it to one movie by
self-distillation, ``embeddings`` and ``quality`` turn aligned chips into
unit-length embeddings and SER-FIQ scores.
"""
