"""Serving: the model manager and the OpenAI-compatible request handling above the engines."""
