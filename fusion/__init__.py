"""Stage two: fusion models and task heads trained from cached features only."""
