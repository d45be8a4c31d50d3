"""The minilm experiment (a package only so that pytest can collect both train_test.py files)."""
