"""The worker side: `runtime` executes the model from a bundle; `process` is the worker
process boundary (its loop and the wire protocol to the frontend)."""
