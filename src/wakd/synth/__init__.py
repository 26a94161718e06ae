"""The demo stack: a synthetic city, place pretraining on its rendered views, the raw-pixel
floor and `make demo`. The paper's modules never import it (tests/test_layers.py).
"""
