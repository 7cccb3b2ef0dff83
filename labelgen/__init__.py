"""labelgen: annotation-free instance-segmentation labels."""
__version__ = "0.1.0"
