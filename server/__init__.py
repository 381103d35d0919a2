"""Loopstack inference server: ILF-accelerated image generation and Brainstacks-routed chat."""

__version__ = "0.1.0"
