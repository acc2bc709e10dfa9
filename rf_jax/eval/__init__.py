"""Metrics and a Fashion-MNIST classifier that score generated text and images."""
