"""The architectures this system is compared against, serving the same model-store version."""
