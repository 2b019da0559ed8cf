"""Stage one: frozen encoders that turn images and texts into cached features."""
