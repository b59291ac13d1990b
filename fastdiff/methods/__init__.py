"""fastdiff.methods."""
