"""Downstream protocols on frozen or fine-tuned backbones: linear probe, k-NN and fine-tuning."""
