"""Integrations of the DASG kernels into other libraries (Hugging Face transformers)."""
