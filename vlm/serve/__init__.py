"""Serving a trained model: `vlm serve MODEL` (vlm.serve.app) answers OpenAI-style chat requests about videos and
serves a web page to chat with one. Needs the `serve` extra (FastAPI, uvicorn, python-multipart)."""
