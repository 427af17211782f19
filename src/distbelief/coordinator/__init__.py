"""The coordinator of Sandblaster L-BFGS."""
