"""Evaluation tasks (so far: passkey retrieval)."""
