"""Other engines run side by side with radixkv by the benches (each in its own venv)."""
