"""A world where the truth is known: pictures of shapes with true captions, a noisy web split with
tagged corruptions, tiny BLIP models trained on the clean split (shipped in `checkpoints/`), the
web served on 127.0.0.1 (`sample_web`), `capfilt demo`, and `capfilt bench quality`.

May import every stage package (`core` to `inspect`); not `perf`.
"""
