"""Playing tasks: the environments' own experts now; policy engines and the explorer build on it."""
