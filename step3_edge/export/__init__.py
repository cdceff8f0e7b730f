"""step3-edge export stage."""
