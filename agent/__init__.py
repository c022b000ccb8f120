"""nvidia-agent: keeps a prebuilt NVIDIA driver matched to the running kernel."""

__version__ = "0.1.0"
