"""moe-embed."""
