"""The worker process boundary: the loop a worker runs and the wire protocol it speaks."""
