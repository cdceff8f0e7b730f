"""step3-edge runtime stage."""
