"""fastdiff.apps."""
