"""fastdiff.eval."""
