"""remotecli: a control plane for per-user microVMs running AI coding CLIs."""
__version__ = "0.1.0"
