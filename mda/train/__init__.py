"""The one training loop and pretraining."""
