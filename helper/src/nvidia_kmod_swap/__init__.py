"""nvidia-kmod-swap: take an NVIDIA driver update live by swapping the loaded kernel modules."""

__version__ = "0.1.0"
