"""Offline data tools: synthetic data generator, format converters and validators."""
