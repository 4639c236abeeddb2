"""Weights layer: checkpoint folders and stores behind one interface, and every file q3lab writes."""
