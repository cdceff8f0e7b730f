"""step3-edge app stage."""
