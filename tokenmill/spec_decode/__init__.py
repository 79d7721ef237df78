"""Speculative decoding: the config (config.py), proposers (ngram.py) and the exact rejection sampler
(rejection_sampler.py). config.py and ngram.py are torch-free."""
