"""Filling a built model with weights: one WeightLoader per load format (registry.py), `load_model` in
model_loader.py. Finding the model and reading its config and tokenizer is tokenmill/source's job."""
