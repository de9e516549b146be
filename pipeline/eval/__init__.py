"""Evaluation: LM scores (CE, bits/byte, KL rate), calibration, generation quality, sharpness."""
