"""Evaluation harnesses for video language models (multiple choice, open-ended QA, retrieval, classification)."""
