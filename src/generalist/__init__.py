"""generalist-at: Generalist adversarial training and honest robustness evaluation."""

__version__ = "0.1.0"
