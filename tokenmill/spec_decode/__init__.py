"""Speculative decoding: the config (config.py), proposers (ngram.py; draft_model.py; eagle.py, over the heads of
models/llama_eagle.py) and the exact rejection sampler (rejection_sampler.py). config.py and ngram.py are
torch-free."""
