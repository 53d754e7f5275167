"""The OpenAI-compatible HTTP adapter: FastAPI routes over the same engine as gRPC, served by
uvicorn on the frontend's event loop."""
