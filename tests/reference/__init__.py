"""Reference forms for the equivalence tests: upstream's operations, which the product computes in faster forms."""
