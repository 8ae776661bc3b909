"""Side-by-side benchmarks of psmamba against the methods users would pick instead (see README.md)."""
