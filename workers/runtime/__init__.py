"""The model runtime: dense ONNX segments, the torch router, per-expert ONNX sessions,
pooling, and the pieces every caller shares (tasks, request validation, tokenizer).

Modules here are imported by the frontend too (tasks, requests, tokenizer): those import
neither torch nor ONNX Runtime.
"""
